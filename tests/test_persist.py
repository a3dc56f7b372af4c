"""The policy file: round trip, and refusals that leave the model as it was."""

import shutil

import pytest
import torch
from model_utils import C, D, K, mlp_model, random_policy
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from eenet_fast import FileFormatError, PolicyError, pooled_linear_head, wrap
from eenet_fast.persist import _old_heads_digest, content_digest
from eenet_fast.runtime import EarlyExitModel


def test_policy_save_load_round_trip_and_mismatch(tmp_path):
    model = mlp_model()
    random_policy(model, "eenet", 3, 0.4)
    x = torch.randn(50, D)
    before = model(x)
    model.save_policy(tmp_path / "policy.safetensors")
    model.policy = None
    model.load_policy(tmp_path / "policy.safetensors")
    after = model(x)
    assert torch.equal(before.exits, after.exits) and torch.equal(before.logits, after.logits)
    other = EarlyExitModel([nn.Identity()] * K, [nn.Linear(D, C + 1) for _ in range(K)]).eval()
    with pytest.raises(ValueError, match="other exits or classes"):
        other.load_policy(tmp_path / "policy.safetensors")
    with torch.no_grad():
        model.heads[1].bias.add_(0.1)  # same structure, other weights: the policy would be silently off
    with pytest.raises(ValueError, match="exit heads with other weights"):
        model.load_policy(tmp_path / "policy.safetensors")


def test_a_refused_file_leaves_the_model_as_it_was(tmp_path):
    model = mlp_model()
    model.heads[0] = nn.Sequential(nn.Linear(D, C))
    model.new_heads = (0,)  # as if wrap had added head 0: its weights are saved with the policy
    random_policy(model, "maxprob", 1, 0.5)
    model.save_policy(tmp_path / "p.safetensors")
    policy = model.policy
    with torch.no_grad():
        model.heads[1].bias.add_(0.1)  # the model was changed after saving: the file must be refused
        model.heads[0][0].weight.mul_(2)
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    with pytest.raises(ValueError, match="exit heads with other weights"):
        model.load_policy(tmp_path / "p.safetensors")
    assert all(torch.equal(v, heads_before[k]) for k, v in model.heads.state_dict().items())
    assert model.policy is policy


def test_a_policy_file_loads_into_a_fresh_model_on_its_device_and_precision(tmp_path):
    model = mlp_model()
    random_policy(model, "eenet", 4, 0.6)
    model.save_policy(tmp_path / "p.safetensors")
    fresh = mlp_model()
    loaded = fresh.load_policy(tmp_path / "p.safetensors")
    assert loaded.thresholds.dtype == torch.float32 and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(33, D)
    assert torch.equal(fresh(x).exits, model(x).exits)


# ------------------------------------------------------------ a policy bound to its whole model


def _seq_model(seed):
    torch.manual_seed(seed)
    seq = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D))
    return wrap(seq, exits_after=[1, 3, 4], heads=pooled_linear_head(C), example_input=torch.randn(2, D)).eval()


def test_a_policy_calibrated_on_another_backbone_is_refused_naming_the_backbone(tmp_path):
    model = _seq_model(0)
    random_policy(model, "maxprob", 0, 0.5)
    model.save_policy(tmp_path / "p.safetensors")
    other = _seq_model(1)  # same structure, every head added by wrap and restored from the file: only the backbone differs
    heads_before = {k: v.clone() for k, v in other.heads.state_dict().items()}
    with pytest.raises(PolicyError, match="backbone with other weights"):
        other.load_policy(tmp_path / "p.safetensors")
    assert other.policy is None and all(torch.equal(v, heads_before[k]) for k, v in other.heads.state_dict().items())
    same = _seq_model(0)
    same.load_policy(tmp_path / "p.safetensors")
    x = torch.randn(50, D)
    assert torch.equal(same(x).exits, model(x).exits)


def test_each_part_of_the_model_is_named_when_it_differs(tmp_path):
    model = mlp_model()
    random_policy(model, "maxprob", 0, 0.5)
    model.save_policy(tmp_path / "p.safetensors")
    for part, change, match in [
        ("classes", lambda m: m.heads.__setitem__(2, nn.Linear(D, C + 1)), "other exits or classes"),
        ("head", lambda m: m.heads[0].bias.data.add_(0.1), "exit heads with other weights"),
        ("stage", lambda m: m.stages[2][0].weight.data.mul_(1.01), "backbone with other weights"),
    ]:
        changed = mlp_model()
        change(changed)
        with pytest.raises(PolicyError, match=match):
            changed.load_policy(tmp_path / "p.safetensors")


# ------------------------------------------------------------------- every field of the file checked


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(path, edit, digest=True):
    """Apply ``edit(metadata, tensors)`` to the file, with its content digest recomputed (an edit made on purpose)."""
    metadata, tensors = _read(path)
    edit(metadata, tensors)
    if digest:
        metadata["content_digest"] = content_digest(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def eenet_file(tmp_path_factory):
    model = mlp_model()
    random_policy(model, "eenet", 0, 0.5)
    path = tmp_path_factory.mktemp("policy") / "eenet.safetensors"
    model.save_policy(path)
    return path


def _set(key, value):
    return lambda metadata, tensors: metadata.__setitem__(key, value)


def _tensor(key, fn):
    return lambda metadata, tensors: tensors.__setitem__(key, fn(tensors[key].clone()))


def _nan_at(t, index):
    t[index] = float("nan")
    return t


@pytest.mark.parametrize(
    "edit, match",
    [
        (_set("options", "{not json"), "'options' is not valid JSON"),
        (_set("options", "[16, 0]"), "must be a JSON object"),
        (_set("options", '{"hidden": -1, "seed": 0}'), "hidden must be an integer >= 0"),
        (_set("options", '{"hidden": 16, "seed": 1180591620717411303424}'), r"seed must be an integer in \[0, "),
        (_set("options", '{"hiden": 16}'), "takes no option 'hiden'"),
        (_set("budget", "NaN"), "budget must be a finite number"),
        (_set("budget", '"0.5"'), "budget must be a finite number"),
        (_set("budget", "0.5"), r"below the first exit's cost 1\.0"),
        (_set("num_classes", "1"), "num_classes must be an integer >= 2"),
        (_set("num_classes", "true"), "num_classes must be an integer >= 2"),
        (_set("num_classes", "6"), "do not fit its options and classes"),
        (_set("policy", "nope"), "names the policy 'nope'"),
        (_set("latency", '{"batch_sizes": [1], "exit_times": [[1.0]], "full_times": [1.0], "spread": [[0.0], [0.0]]}'),
         "latency field is not a valid cost model.*times 1 exits, the file has 3"),
        (_set("latency", '{"batch_sizes": [1]}'), "latency field is not a valid cost model"),
        (_set("policy", "oracle"), "names the policy 'oracle'"),
        (lambda m, t: m.pop("budget"), "lacks the metadata field 'budget'"),
        (lambda m, t: m.pop("stages_digest"), "lacks the metadata field 'stages_digest'"),
        (_set("format", "eenet_fast.policy/9"), "not an eenet_fast policy file of this version"),
        (_tensor("thresholds", lambda t: _nan_at(t, 0)), r"numbers or \+-inf, the last -inf"),
        (_tensor("thresholds", lambda t: t.clamp_min(0.5)), r"numbers or \+-inf, the last -inf"),
        (_tensor("thresholds", lambda t: t[:2]), r"float32 \[3\]"),
        (_tensor("thresholds", lambda t: t.double()), r"float32 \[3\]"),
        (_tensor("costs", lambda t: t.flip(0)), "strictly increasing"),
        (_tensor("scheduler.score_heads.1.linear", lambda t: _nan_at(t, 0)), "holds NaN or Inf"),
        (_tensor("scheduler.score_heads.1.linear", lambda t: t[:1]), "do not fit its options and classes"),
        (lambda m, t: t.__setitem__("extra", torch.zeros(2)), "unexpected tensors extra"),
        (lambda m, t: t.pop("scheduler.score_heads.0.linear"), "do not fit its options and classes"),
        (lambda m, t: t.__setitem__("head.x.weight", torch.zeros(2)), r"not named head\.<exit>\.<weight>"),
        (lambda m, t: t.__setitem__("head.1.weight", torch.zeros(C, D)), "not a head wrap added"),
    ],
)
def test_an_edited_policy_file_is_refused_naming_the_field(eenet_file, tmp_path, edit, match):
    path = tmp_path / "edited.safetensors"
    shutil.copy(eenet_file, path)
    _rewrite(path, edit)
    model = mlp_model()
    with pytest.raises((FileFormatError, PolicyError), match=match):
        model.load_policy(path)
    assert model.policy is None


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda data: data[: len(data) // 2], "not a readable policy file"),
        (lambda data: b"", "not a readable policy file"),
        (lambda data: b"thresholds = [0.5, inf]\n", "not a readable policy file"),
        (lambda data: data[:-4] + bytes(b ^ 0x10 for b in data[-4:]), "corrupted or was edited"),
    ],
)
def test_a_damaged_policy_file_is_a_file_format_error(eenet_file, tmp_path, damage, match):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damage(eenet_file.read_bytes()))
    with pytest.raises(FileFormatError, match=match):
        mlp_model().load_policy(path)


def test_an_edit_without_its_digest_is_refused_as_corruption(eenet_file, tmp_path):
    path = tmp_path / "edited.safetensors"
    shutil.copy(eenet_file, path)
    _rewrite(path, _set("budget", "2.5"), digest=False)
    with pytest.raises(FileFormatError, match="corrupted or was edited"):
        mlp_model().load_policy(path)


def test_a_file_of_the_previous_format_loads_with_a_warning_about_the_backbone(tmp_path):
    model = mlp_model()
    random_policy(model, "maxprob", 0, 0.5)
    path = tmp_path / "old.safetensors"
    model.save_policy(path)

    def as_format_2(metadata, tensors):
        metadata.update(format="eenet_fast.policy/2", heads_digest=_old_heads_digest(model.heads))
        del metadata["stages_digest"], metadata["content_digest"]

    _rewrite(path, as_format_2, digest=False)
    fresh = mlp_model()
    with pytest.warns(UserWarning, match="does not record the backbone"):
        fresh.load_policy(path)
    x = torch.randn(40, D)
    assert torch.equal(fresh(x).exits, model(x).exits)


def test_a_policy_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    model = mlp_model()
    random_policy(model, "maxprob", 0, 0.5)
    path = tmp_path / "p.safetensors"
    model.save_policy(path)
    before = path.read_bytes()
    random_policy(model, "maxprob", 1, 0.7)
    monkeypatch.setattr("eenet_fast.files.os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        model.save_policy(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


def test_a_time_budget_policy_keeps_its_latency_model_in_the_file(tmp_path):
    model = mlp_model()
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(16, D, generator=g), torch.randint(C, (16,), generator=g)) for _ in range(3)]
    policy = model.calibrate(loader, 100.0, "maxprob", costs="latency", batch_size=8, progress=False)  # tiny: exits dear
    model.save_policy(tmp_path / "p.safetensors")
    loaded = mlp_model().load_policy(tmp_path / "p.safetensors")
    assert loaded.latency.batch_sizes == (1, 2, 4, 8) == policy.latency.batch_sizes
    assert torch.equal(loaded.latency.exit_times, policy.latency.exit_times)
    assert loaded.latency.costs() == policy.latency.costs()
