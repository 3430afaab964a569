"""The attention probabilities a ViT itself computes, read from its own forward pass.

featviz never re-derives attention from ``q·kᵀ`` by hand: a re-derivation silently drops whatever
the model adds (rotary position embeddings, relative position biases, q/k norms, separate q/k/v
projections) and gives a plausible-looking but different map. Two ways are exact:

- **timm attention modules** whose unfused path featviz has read: ``timm.layers.Attention`` (ViT,
  DeiT, DINO/DINOv2 in timm), ``timm.layers.AttentionRope``, ``timm.models.eva.EvaAttention``
  (DINOv3, EVA, Perception Encoder: RoPE is passed to ``forward``) and ``timm.models.beit.Attention``
  (relative position bias). For the forward being read, each such module is switched to its
  unfused path (``fused_attn = False``: the same computation, written out) and the input of its
  ``attn_drop`` is recorded: ``softmax(q·scale @ kᵀ + bias)`` after everything the model applies.
  The switch is undone afterwards, also on error.
- **a model that says how**: ``model.attention_maps(x, block) -> (N, heads, T, T)`` (featviz's
  Hugging Face adapter, which runs the transformers model with eager attention).

Any other attention module is refused in one line (``ArchitectureError``), never approximated.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from featviz.errors import ArchitectureError

# module.qualname of the attention classes whose unfused path is exactly
#   attn = softmax(q * scale @ kᵀ [+ bias]); attn = self.attn_drop(attn); x = attn @ v
# (read in timm 1.0.31: layers/attention.py, models/eva.py, models/beit.py)
INSTRUMENTED = frozenset({
    "timm.layers.attention.Attention",
    "timm.layers.attention.AttentionRope",
    "timm.models.eva.EvaAttention",
    "timm.models.beit.Attention",
})


def class_path(module: nn.Module) -> str:
    """``module.qualname`` of the module's class (``timm.models.eva.EvaAttention``)."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def has_own_maps(model: nn.Module) -> bool:
    """Whether the model computes its attention maps itself (``attention_maps(x, block)``)."""
    return callable(getattr(model, "attention_maps", None))


def check_instrumentable(attn: nn.Module, index: int) -> None:
    """Refuse an attention module whose probabilities featviz cannot read exactly.

    Raises:
        ArchitectureError: not one of ``INSTRUMENTED`` (a subclass may change the computation), or
            without ``fused_attn`` and an ``attn_drop`` module.
    """
    path = class_path(attn)
    if path in INSTRUMENTED and hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None),
                                                                           nn.Module):
        return
    raise ArchitectureError(
        f"block {index}'s attention is {path}, whose attention probabilities featviz cannot read "
        "from the model's own computation (it reads timm's Attention, AttentionRope, EvaAttention and "
        "BEiT Attention, and models with attention_maps()); featviz attention refuses rather than "
        "show a different map: use `featviz cam` or `featviz pca`"
    )


@contextmanager
def _unfused_capture(attn: nn.Module, index: int, store: dict[int, torch.Tensor], query: int | None = None):
    """Switch ``attn`` to its unfused path and record the input of its ``attn_drop`` (one query row with ``query``)."""
    was = attn.fused_attn

    def hook(_m, args):
        a = args[0].detach()
        store[index] = a if query is None else a[:, :, query : query + 1].clone()  # not a view of all rows

    handle = attn.attn_drop.register_forward_pre_hook(hook)
    attn.fused_attn = False
    try:
        yield
    finally:
        attn.fused_attn = was
        handle.remove()


def _check_probs(a: torch.Tensor, index: int, tokens: int, batch: int, rows: int | None = None) -> torch.Tensor:
    rows = tokens if rows is None else rows
    if a.ndim != 4 or a.shape[0] != batch or a.shape[-2:] != (rows, tokens):
        raise ArchitectureError(
            f"block {index}'s attention has shape {tuple(a.shape)}, not (batch {batch}, heads, {rows}, "
            f"{tokens}); featviz cannot tell which token is which, so it shows no map"
        )
    sums = a.float().sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise ArchitectureError(
            f"block {index}'s recorded attention rows sum to {float(sums.min()):.3g}..{float(sums.max()):.3g}, "
            "not 1: they are not softmax probabilities, so featviz shows no map"
        )
    return a.float()


@torch.no_grad()
def model_attention(model: nn.Module, blocks: Sequence[nn.Module], x: torch.Tensor, indices: Sequence[int],
                    tokens: int, *, query: int | None = None) -> dict[int, torch.Tensor]:
    """The attention probabilities of ``blocks[i]`` for each ``i`` in ``indices``, as the model computes them.

    Args:
        model: The ViT (timm-like, or with ``attention_maps``).
        blocks: Its transformer blocks.
        x: The (N, 3, H, W) batch.
        indices: The blocks to read.
        tokens: Tokens per image (prefix + patches), checked against what the model produced.
        query: Keep only this token's row (``(N, heads, 1, tokens)``; the class token is 0): the
            memory of one row instead of ``tokens`` rows per block.

    Returns:
        ``{i: (N, heads, tokens, tokens)}`` float32 probabilities (rows sum to 1).

    Raises:
        ArchitectureError: an attention featviz cannot read exactly, or not the expected shape.
    """
    wanted = list(indices)
    one = None if query is None else 1
    if has_own_maps(model):
        rows = slice(None) if query is None else slice(query, query + 1)
        return {i: _check_probs(model.attention_maps(x, i)[:, :, rows], i, tokens, len(x), one) for i in wanted}
    for i in wanted:
        check_instrumentable(blocks[i].attn, i)
    store: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        for i in wanted:
            stack.enter_context(_unfused_capture(blocks[i].attn, i, store, query))
        forward = getattr(model, "forward_features", model)
        forward(x)
    missing = [i for i in wanted if i not in store]
    if missing:
        raise ArchitectureError(
            f"the forward pass never reached block {missing[0]}'s attention softmax "
            f"({class_path(blocks[missing[0]].attn)}); featviz shows no map"
        )
    return {i: _check_probs(store[i], i, tokens, len(x), one) for i in wanted}
