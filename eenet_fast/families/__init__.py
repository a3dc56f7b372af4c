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

from torch import nn

from eenet_fast.families.backbone import Backbone, every_few, split_after
from eenet_fast.families.huggingface import hf_bert_backbone, hf_vit_backbone
from eenet_fast.families.vision import resnet_backbone, timm_vit_backbone, torchvision_vit_backbone

__all__ = ["Backbone", "find_backbone", "split_after", "every_few", "FAMILIES"]

FAMILIES = ("resnet", "vit", "bert")


def find_backbone(model: nn.Module) -> Backbone | None:
    """The :class:`Backbone` of ``model`` if its structure is one of :data:`FAMILIES`, else ``None``."""
    for find in (resnet_backbone, timm_vit_backbone, torchvision_vit_backbone, hf_vit_backbone, hf_bert_backbone):
        backbone = find(model)
        if backbone is not None:
            return backbone
    return None
