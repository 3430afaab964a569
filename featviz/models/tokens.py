"""The tokens of a ViT: its patch size, its prefix tokens by kind, and where they sit (``TokenLayout``).

Every count is read from the model itself, never assumed:

- the patch size from ``patch_embed.patch_size`` (timm, and featviz's Hugging Face adapter) or a
  torchvision ViT's ``conv_proj``;
- the prefix tokens from timm's ``num_prefix_tokens`` (class + register/storage + distillation:
  DINOv3 in timm has 1 class and 4 storage tokens, so 5), else from the token parameters;
- how many of them are class tokens: an explicit ``num_class_tokens`` (adapters that hold no
  ``cls_token`` parameter say so this way), else a ``cls_token``/``class_token`` tensor;
- how many are register tokens (DINOv3 calls them storage tokens): an explicit ``num_reg_tokens``,
  else the ``reg_token``/``register_tokens``/``storage_tokens`` parameter's shape.

``featviz.models.features`` re-exports these names; use them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_REGISTER_PARAMETERS = ("reg_token", "register_tokens", "storage_tokens")


def patch_size(model: nn.Module) -> tuple[int, int] | None:
    """A ViT's patch size (timm ``patch_embed.patch_size``, torchvision ``patch_size``); None for CNNs."""
    pe = getattr(model, "patch_embed", None)
    patch = getattr(pe, "patch_size", None)
    if patch is None and isinstance(getattr(model, "conv_proj", None), nn.Conv2d):  # torchvision ViT
        patch = model.conv_proj.kernel_size
    if patch is None:
        return None
    return (int(patch), int(patch)) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))


def prefix_tokens(model: nn.Module) -> int:
    """Class + register + distillation tokens before the patch tokens (timm ``num_prefix_tokens``)."""
    if hasattr(model, "num_prefix_tokens"):
        return int(model.num_prefix_tokens)
    if isinstance(getattr(model, "class_token", None), torch.Tensor):  # torchvision ViT
        return 1
    count = sum(int(isinstance(getattr(model, a, None), torch.Tensor)) for a in ("cls_token", "dist_token"))
    return count + register_parameter_tokens(model)


def register_parameter_tokens(model: nn.Module) -> int:
    """Register tokens counted from the ``reg_token`` (``register_tokens``, ``storage_tokens``) shape."""
    for name in _REGISTER_PARAMETERS:
        reg = getattr(model, name, None)
        if isinstance(reg, torch.Tensor):
            return int(reg.shape[1] if reg.ndim == 3 else reg.shape[0])
    return 0


def class_tokens(model: nn.Module) -> int:
    """Class tokens: an explicit ``num_class_tokens``, else 1 with a ``cls_token``/``class_token`` tensor."""
    explicit = getattr(model, "num_class_tokens", None)
    if isinstance(explicit, int) and not isinstance(explicit, bool):
        return explicit
    return int(any(isinstance(getattr(model, a, None), torch.Tensor) for a in ("cls_token", "class_token")))


def register_tokens(model: nn.Module) -> int:
    """Register (DINOv3: storage) tokens: ``num_reg_tokens``, else the register parameter's shape."""
    explicit = getattr(model, "num_reg_tokens", None)
    if isinstance(explicit, int) and not isinstance(explicit, bool):
        return explicit
    return register_parameter_tokens(model)


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of a ViT input sit: the prefix tokens first, then the patch grid row-major.

    Attributes:
        grid: Patch rows and columns.
        prefix: Class + register + distillation tokens before the patches.
        patch: The patch size (H, W) in pixels.
        class_tokens: How many of the prefix tokens are class tokens.
        register_tokens: How many are register tokens (DINOv3's storage tokens; the rest are
            distillation or other tokens). The split of ``prefix`` describes it and takes no
            part in equality.
    """

    grid: tuple[int, int]
    prefix: int
    patch: tuple[int, int]
    class_tokens: int = field(default=1, compare=False)
    register_tokens: int = field(default=0, compare=False)

    @property
    def other_prefix(self) -> int:
        """Distillation and other prefix tokens: neither class nor register tokens."""
        return self.prefix - self.class_tokens - self.register_tokens

    def to_dict(self) -> dict[str, Any]:
        """The grid and the prefix tokens by kind, as manifests and summaries record them."""
        return {
            "grid": list(self.grid),
            "class": self.class_tokens,
            "register": self.register_tokens,
            "other": self.other_prefix,
            "excluded_from_maps": self.prefix,
        }


def layout_of(model: nn.Module, grid: tuple[int, int], patch: tuple[int, int]) -> TokenLayout:
    """The ``TokenLayout`` of ``model`` for a ``grid`` of ``patch``-sized patches, counted from the model."""
    return TokenLayout((int(grid[0]), int(grid[1])), prefix_tokens(model), patch, class_tokens(model),
                       register_tokens(model))
