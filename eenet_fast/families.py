"""The backbones people use, recognised by structure (attribute names), not by import, and cut into
blocks so that :func:`eenet_fast.wrap` can place exits after them (``exits_after`` counts blocks).

* ``resnet``: torchvision's layout, ``conv1 bn1 relu maxpool layer1.. avgpool fc``. A block is a
  layer group (``layer1`` is block 0).
* ``vit``: timm's ``VisionTransformer`` (``patch_embed``, ``blocks``, ``norm``, ``head``,
  ``forward_head``), torchvision's (``conv_proj``, ``class_token``, ``encoder.layers``,
  ``encoder.ln``, ``heads``) or a Hugging Face ``*ForImageClassification`` (``<base>.embeddings``
  with ``patch_embeddings``, ``<base>.layers`` or ``<base>.encoder.layer``, ``<base>.layernorm``,
  ``classifier``). A block is a transformer layer.
* ``bert``: a Hugging Face ``*ForSequenceClassification`` encoder (``<base>.embeddings`` with
  ``word_embeddings``, ``<base>.encoder.layer``, an optional ``<base>.pooler``, ``classifier``):
  BERT, RoBERTa, MiniLM, ... A block is an encoder layer.

Every family keeps the model's own output path (``avgpool``/``fc``, final norm and classifier,
pooler and classifier) as the last exit, applied exactly as the model's forward applies it, so the
last exit reproduces the model's output. Early exits get new heads: :func:`conv_head` for CNNs,
:class:`TokenHead` for transformers.

Between stages, timm and torchvision ViTs pass their tokens ``[B, T, H]``; Hugging Face models pass
a dict with the batch first: ``hidden`` ``[B, T, H]`` and, for text, ``mask`` (the attention mask
as the model's layers take it, or ``None``) and ``attention_mask`` ``[B, T]`` (the tokenizer's),
so that the masks are compacted with the samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from eenet_fast.heads import TokenHead, conv_head

__all__ = ["Backbone", "find_backbone", "split_after", "FAMILIES"]

FAMILIES = ("resnet", "vit", "bert")


@dataclass(frozen=True)
class Backbone:
    """A recognised model cut into blocks.

    Attributes:
        family: one of :data:`FAMILIES`.
        stem: runs before block 0 (a CNN's stem, a transformer's embeddings and mask).
        blocks: the blocks after which exits may go, in order.
        output_head: the model's own path from the last block's output to its logits.
        new_head: builds a new exit head for the output of block ``i``.
        default_exits: block indices after which exits go when the user names none.
        block_name: what a block is, for messages.
    """

    family: str
    stem: nn.Module
    blocks: list[nn.Module]
    output_head: nn.Module
    new_head: Callable[[int], nn.Module]
    default_exits: list[int]
    block_name: str

    def stages(self, exits_after: list[int]) -> list[nn.Module]:
        """Stage ``k`` runs blocks ``exits_after[k-1]+1 .. exits_after[k]`` (the stem first in stage 0)."""
        return split_after(self.blocks, exits_after, self.block_name, self.stem, ", where the model's own classifier is the last exit")


def split_after(
    blocks: Sequence[nn.Module],
    exits_after: Sequence[int],
    block_name: str,
    stem: nn.Module | None = None,
    last_note: str = "",
) -> list[nn.Module]:
    """Cut ``blocks`` into stages: stage ``k`` is an ``nn.Sequential`` of blocks
    ``exits_after[k-1]+1 .. exits_after[k]``, with ``stem`` first in stage 0.

    Raises:
        ValueError: ``exits_after`` is not increasing block indices ending at the last block.
    """
    cuts, last = list(exits_after), len(blocks) - 1
    if not cuts or cuts != sorted(set(cuts)) or cuts[0] < 0 or cuts[-1] != last:
        raise ValueError(
            f"exits_after must be increasing {block_name} indices (0-based) ending at the last {block_name} "
            f"({last}{last_note}), got {cuts}"
        )
    bounds = [-1, *cuts]
    first = [stem] if stem is not None else []
    return [nn.Sequential(*(first if lo < 0 else []), *blocks[lo + 1 : hi + 1]) for lo, hi in zip(bounds, bounds[1:])]


def find_backbone(model: nn.Module) -> Backbone | None:
    """The :class:`Backbone` of ``model`` if its structure is one of :data:`FAMILIES`, else ``None``."""
    for find in (_resnet, _timm_vit, _torchvision_vit, _hf_vit, _hf_bert):
        backbone = find(model)
        if backbone is not None:
            return backbone
    return None


def every_few(num_blocks: int, exits: int = 4) -> list[int]:
    """About ``exits`` evenly spaced block indices ending at the last: 12 blocks -> 2, 5, 8, 11; 6 -> 1, 3, 5."""
    step = -(-num_blocks // exits)
    return [*range(num_blocks - 1, -1, -step)][::-1]


# ---------------------------------------------------------------- ResNet (torchvision layout)
def _resnet(model: nn.Module) -> Backbone | None:
    names = ("conv1", "bn1", "relu", "maxpool", "avgpool", "fc")
    groups = []
    while isinstance(getattr(model, f"layer{len(groups) + 1}", None), nn.Module):
        groups.append(getattr(model, f"layer{len(groups) + 1}"))
    if not groups or not all(hasattr(model, n) for n in names) or not isinstance(model.fc, nn.Linear):
        return None
    num_classes = model.fc.out_features

    def new_head(i: int) -> nn.Module:
        norms = [m for m in list(groups[i].children())[-1].modules() if isinstance(m, nn.BatchNorm2d)]
        if not norms:
            raise ValueError(f"cannot tell layer{i + 1}'s output channels (no BatchNorm2d in its last block); give heads=")
        return conv_head(norms[-1].num_features, num_classes)

    return Backbone(
        family="resnet",
        stem=nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool),
        blocks=groups,
        output_head=nn.Sequential(model.avgpool, nn.Flatten(1), model.fc),
        new_head=new_head,
        default_exits=list(range(len(groups))),
        block_name="layer group",
    )


# ------------------------------------------------------------------- timm ViT
class _TimmEmbed(nn.Module):
    """Patch embedding, position embedding (and class/register tokens), patch dropout, pre-norm:
    the start of timm's ``forward_features``, run through the model's own modules and methods. The
    model's direct parameters (``cls_token``, ``pos_embed``, ...) are registered here too, so the
    wrapped model moves and freezes them."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        for name, param in vit.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.patch_embed = vit.patch_embed
        for name in ("pos_drop", "patch_drop", "norm_pre"):
            setattr(self, name, getattr(vit, name, None) or nn.Identity())
        self.pos_embed_fn = vit._pos_embed  # a bound method of the model; uses the modules above

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.patch_drop(self.pos_embed_fn(self.patch_embed(images))))


class _TimmOutput(nn.Module):
    """Final norm, then timm's ``forward_head`` (pooling, ``fc_norm``, ``head``): the model's own output path."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        for name in ("norm", "attn_pool", "fc_norm", "head_drop", "head"):
            module = getattr(vit, name, None)
            if isinstance(module, nn.Module):
                setattr(self, name, module)
        self.forward_head = vit.forward_head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.norm(tokens))


def _timm_vit(model: nn.Module) -> Backbone | None:
    blocks = getattr(model, "blocks", None)
    parts = ("patch_embed", "norm", "head")
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks) or not all(
        isinstance(getattr(model, n, None), nn.Module) for n in parts
    ):
        return None
    if not (callable(getattr(model, "forward_head", None)) and callable(getattr(model, "_pos_embed", None))):
        return None
    num_classes, hidden = getattr(model, "num_classes", 0), getattr(model, "embed_dim", None)
    if not num_classes or hidden is None:
        raise ValueError(f"{type(model).__name__} has no classifier head (num_classes=0); create it with num_classes=C")
    pool = "cls" if getattr(model, "global_pool", "token") == "token" and getattr(model, "cls_token", None) is not None else "mean"
    return Backbone(
        family="vit",
        stem=_TimmEmbed(model),
        blocks=list(blocks),
        output_head=_TimmOutput(model),
        new_head=lambda i: TokenHead(hidden, num_classes, pool=pool),
        default_exits=every_few(len(blocks)),
        block_name="transformer block",
    )


# ------------------------------------------------------------ torchvision ViT
class _TorchvisionEmbed(nn.Module):
    """Patch projection, class token, position embedding and dropout, as torchvision's
    ``VisionTransformer.forward`` and ``Encoder.forward`` apply them before the first layer."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.conv_proj, self.dropout = vit.conv_proj, vit.encoder.dropout
        self.class_token, self.pos_embedding = vit.class_token, vit.encoder.pos_embedding
        self.process_input = vit._process_input  # a bound method of the model; uses conv_proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.process_input(images)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class _TorchvisionOutput(nn.Module):
    """Final layer norm, class token, ``heads``: torchvision's own output path."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.ln, self.heads = vit.encoder.ln, vit.heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.heads(self.ln(tokens)[:, 0])


def _torchvision_vit(model: nn.Module) -> Backbone | None:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    needed = (
        isinstance(getattr(model, "conv_proj", None), nn.Module)
        and isinstance(getattr(model, "heads", None), nn.Module)
        and isinstance(getattr(model, "class_token", None), torch.Tensor)
        and isinstance(getattr(encoder, "pos_embedding", None), torch.Tensor)
        and isinstance(getattr(encoder, "ln", None), nn.Module)
        and isinstance(layers, nn.Sequential)
        and len(layers) > 0
        and callable(getattr(model, "_process_input", None))
    )
    if not needed:
        return None
    hidden, num_classes = model.hidden_dim, model.num_classes
    return Backbone(
        family="vit",
        stem=_TorchvisionEmbed(model),
        blocks=list(layers),
        output_head=_TorchvisionOutput(model),
        new_head=lambda i: TokenHead(hidden, num_classes, pool="cls"),
        default_exits=every_few(len(layers)),
        block_name="encoder layer",
    )


# ------------------------------------------------------------- Hugging Face transformers
def _hf_base(model: nn.Module, embedding: str) -> nn.Module | None:
    """The child holding ``embeddings.<embedding>`` (``model.bert``, ``model.vit``, ...)."""
    for child in model.children():
        if hasattr(getattr(child, "embeddings", None), embedding):
            return child
    return None


def _hf_layers(base: nn.Module) -> nn.ModuleList | None:
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        layers = getattr(getattr(base, "encoder", None), "layer", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


class _Layer(nn.Module):
    """One transformer layer on the dict state: ``hidden`` goes through, the mask rides along."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:
        out = self.layer(state["hidden"], state.get("mask"))
        return {**state, "hidden": out[0] if isinstance(out, tuple) else out}


class _ImageEmbed(nn.Module):
    """``pixel_values`` ``[B, C, H, W]`` -> ``{"hidden": [B, T, H]}``, as the ViT model's forward does."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        return {"hidden": self.embeddings(pixel_values.to(dtype))}


class _ImageOutput(nn.Module):
    """Final layer norm, class token, classifier: the ViT classifier's own output path."""

    def __init__(self, norm: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.norm, self.classifier = norm, classifier

    def forward(self, state: dict[str, Any]) -> torch.Tensor:
        return self.classifier(self.norm(state["hidden"])[:, 0, :])


def _hf_vit(model: nn.Module) -> Backbone | None:
    base = _hf_base(model, "patch_embeddings")
    layers = _hf_layers(base) if base is not None else None
    classifier = getattr(model, "classifier", None)
    if layers is None or not isinstance(getattr(base, "layernorm", None), nn.Module) or not isinstance(classifier, nn.Linear):
        return None
    hidden, num_classes = classifier.in_features, classifier.out_features
    return Backbone(
        family="vit",
        stem=_ImageEmbed(base.embeddings),
        blocks=[_Layer(layer) for layer in layers],
        output_head=_ImageOutput(base.layernorm, classifier),
        new_head=lambda i: TokenHead(hidden, num_classes, pool="cls"),
        default_exits=every_few(len(layers)),
        block_name="transformer layer",
    )


class _TextEmbed(nn.Module):
    """A tokenizer's batch (``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids``)
    -> ``{"hidden", "mask", "attention_mask"}``: the embeddings and the attention mask the encoder's
    layers take, built as the model's own forward builds them."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.embeddings = base.embeddings
        self.masks = base._create_attention_masks  # a bound method: the base's layers are not registered here

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                "a wrapped text encoder takes the tokenizer's output: a dict with input_ids [B, T] "
                "(and attention_mask, token_type_ids), e.g. tokenizer(texts, padding=True, return_tensors='pt')"
            )
        hidden = self.embeddings(
            input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"), position_ids=batch.get("position_ids")
        )
        attention_mask = batch.get("attention_mask")
        mask, _ = self.masks(
            attention_mask=attention_mask,
            encoder_attention_mask=None,
            embedding_output=hidden,
            encoder_hidden_states=None,
            cache=None,
        )
        return {"hidden": hidden, "mask": mask, "attention_mask": attention_mask}


class _TextOutput(nn.Module):
    """Pooler (when the model has one), dropout, classifier: the sequence classifier's own output path."""

    def __init__(self, pooler: nn.Module | None, dropout: nn.Module | None, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, state: dict[str, Any]) -> torch.Tensor:
        features = state["hidden"] if self.pooler is None else self.pooler(state["hidden"])
        return self.classifier(features if self.dropout is None else self.dropout(features))


def _hf_bert(model: nn.Module) -> Backbone | None:
    base = _hf_base(model, "word_embeddings")
    layers = _hf_layers(base) if base is not None else None
    classifier = getattr(model, "classifier", None)
    config = getattr(model, "config", None)
    if layers is None or not isinstance(classifier, nn.Module) or config is None:
        return None
    if getattr(config, "is_decoder", False):
        raise ValueError(f"{type(model).__name__} is a decoder; only bidirectional encoders can be wrapped as BERT-style")
    if not hasattr(base, "_create_attention_masks"):
        raise ValueError(
            f"{type(base).__name__} has no _create_attention_masks: eenet_fast wraps BERT-style encoders of "
            "transformers 5 (pip install 'eenet-fast[transformers]')"
        )
    pooler = getattr(base, "pooler", None)
    dropout = getattr(model, "dropout", None) if pooler is not None else None
    hidden, num_classes = config.hidden_size, config.num_labels
    return Backbone(
        family="bert",
        stem=_TextEmbed(base),
        blocks=[_Layer(layer) for layer in layers],
        output_head=_TextOutput(pooler, dropout, classifier),
        new_head=lambda i: TokenHead(hidden, num_classes, pool="mean"),
        default_exits=every_few(len(layers)),
        block_name="encoder layer",
    )
