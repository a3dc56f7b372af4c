"""Hugging Face ``*ForImageClassification`` ViTs and BERT-style ``*ForSequenceClassification``
encoders, whose stages pass a dict with the batch first (hidden states and masks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from eenet_fast.families.backbone import Backbone, every_few
from eenet_fast.heads import TokenHead

__all__ = ["hf_vit_backbone", "hf_bert_backbone"]


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


def hf_vit_backbone(model: nn.Module) -> Backbone | None:
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
        # positional: the fifth parameter (the cache, None here) is ``cache`` in transformers 5.24 and
        # ``past_key_values`` in 5.17 (the GPU image's version)
        mask, _ = self.masks(attention_mask, None, hidden, None, None)
        return {"hidden": hidden, "mask": mask, "attention_mask": attention_mask}


class _TextOutput(nn.Module):
    """Pooler (when the model has one), dropout, classifier: the sequence classifier's own output path."""

    def __init__(self, pooler: nn.Module | None, dropout: nn.Module | None, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, state: dict[str, Any]) -> torch.Tensor:
        features = state["hidden"] if self.pooler is None else self.pooler(state["hidden"])
        return self.classifier(features if self.dropout is None else self.dropout(features))


def hf_bert_backbone(model: nn.Module) -> Backbone | None:
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
