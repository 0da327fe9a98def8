"""Backbones from timm, with a small-image option, and their parameter groups."""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
from timm.models.resnet import ResNet
from torch import nn

from methods.checks import check_rules
from methods.versions import require


@dataclass
class BackboneConfig:
    """Args:
    name: any timm model name (`resnet18`, `vit_small_patch16_224`, ...); trained from scratch.
    small_images: ResNets get a 3x3 stride-1 stem and no max-pool (CIFAR-style), so 32 px
        images keep their resolution through the network.
    img_size, patch_size: passed to ViTs (e.g. 32 and 4 for a 32 px sample).
    kwargs: any other `timm.create_model` arguments (e.g. `channels`, `embed_dim`, `depth`).
    """

    name: str = "resnet18"
    small_images: bool = False
    img_size: int | None = None
    patch_size: int | None = None
    kwargs: dict = field(default_factory=dict)

    def validate(self) -> None:
        check_rules("backbone", self, {
            "name": (timm.is_model(self.name), "a timm model name (see timm.list_models())"),
            **{key: (getattr(self, key) is None or (isinstance(getattr(self, key), int) and getattr(self, key) >= 1),
                     "a positive integer or null") for key in ("img_size", "patch_size")},
        })


def create_backbone(config: BackboneConfig) -> nn.Module:
    """A timm model without classifier (`num_classes=0`); `.num_features` is its output width.

    `forward(images: (N, 3, H, W)) -> (N, num_features)` pooled features.
    """
    kwargs = dict(config.kwargs)
    for key in ("img_size", "patch_size"):
        if getattr(config, key) is not None:
            kwargs[key] = getattr(config, key)
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    model = timm.create_model(config.name, pretrained=False, num_classes=0, **kwargs)
    if config.small_images and isinstance(model, ResNet):
        small_image_stem(model)
    return model


def small_image_stem(model: ResNet) -> ResNet:
    """The CIFAR-style stem for small images, in place: a 3x3 stride-1 `conv1` and no max-pool, so
    a 32 px image is not cut to 8 px before the first block (He et al., 2016, section 4.2; SimCLR
    appendix B.9)."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def is_no_decay(name: str, parameter: torch.Tensor) -> bool:
    """Biases, norm weights and ViT tokens/position embeddings take no weight decay (nor LARS
    adaptation): every 1-d parameter, and names timm marks as such."""
    return parameter.ndim <= 1 or name.endswith(".bias") or any(
        token in name for token in ("pos_embed", "cls_token", "mask_token", "reg_token")
    )


DECAY, NO_DECAY = "decay", "no_decay"  # the tags of the two optimizer groups (methods.base.checked_groups)


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: DECAY (weight decay applies) and NO_DECAY (biases, norms)."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (no_decay if is_no_decay(name, parameter) else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": DECAY},
        {"params": no_decay, "weight_decay": 0.0, "group": NO_DECAY},
    ]


@torch.no_grad()
def vit_last_attention(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A timm ViT's last-block self-attention of the class token over the patches, per head.
    `images: (N, 3, H, W)` -> `(N, heads, H / p, W / p)`; each map sums to 1 over patches and
    prefix tokens together. Rebuilds the last block's attention from its own layers (timm's
    forward does not return the weights)."""
    if not hasattr(vit, "blocks"):
        raise ValueError(f"{type(vit).__name__}: attention maps need a ViT backbone")
    require("timm", "draws ViT attention maps (VisionTransformer._pos_embed)")
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for block in vit.blocks[:-1]:
        x = block(x)
    attention = vit.blocks[-1].attn
    tokens = vit.blocks[-1].norm1(x)
    n, length, _ = tokens.shape
    qkv = attention.qkv(tokens).reshape(n, length, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])
    weights = ((q * attention.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, heads, L, L)
    prefix = vit.num_prefix_tokens
    grid = (images.shape[-2] // vit.patch_embed.patch_size[0], images.shape[-1] // vit.patch_embed.patch_size[1])
    return weights[:, :, 0, prefix:].reshape(n, attention.num_heads, *grid)
