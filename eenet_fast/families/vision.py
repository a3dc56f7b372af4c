"""ResNets (torchvision's layout) and ViTs (timm's and torchvision's layouts)."""

from __future__ import annotations

import torch
from torch import nn

from eenet_fast.families.backbone import Backbone, every_few
from eenet_fast.heads import TokenHead, conv_head

__all__ = ["resnet_backbone", "timm_vit_backbone", "torchvision_vit_backbone"]


# ---------------------------------------------------------------- ResNet (torchvision layout)
def resnet_backbone(model: nn.Module) -> Backbone | None:
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


def timm_vit_backbone(model: nn.Module) -> Backbone | None:
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


def torchvision_vit_backbone(model: nn.Module) -> Backbone | None:
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
