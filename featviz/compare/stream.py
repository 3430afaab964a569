"""Images through one or two models, every chosen layer pooled per image, minibatch CKA on the way.

For each batch the images are decoded and transformed once (``data.images.eval_transform`` at one
input size for both models, then each model's own normalisation), each model runs once with all
its layers tapped (``models.taps.LayerTaps``: the class token of a ViT block, the global average
of a CNN map), and the unbiased HSIC of every pair of layers is added to a ``MinibatchCKA``. The
batches are random samples of the images, without replacement (seeded), as Nguyen et al. (2021)
draw their minibatches (all of one size: a last, smaller one is left out of CKA and counted in
``skipped_batches``); the pooled vectors are kept (float32, in the input order) for the measures
that need all rows at once (mutual k-NN, CKNNA, SVCCA, the per-layer k-NN accuracy). So the memory
is the pooled vectors (N × Σ D_l × 4 bytes) plus one minibatch, whatever the maps' sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from featviz.compare.measures import MinibatchCKA
from featviz.data.images import LabelledImages, collate, eval_transform, normalization_of, resize_rule
from featviz.errors import DataError, OptionError
from featviz.registry import parse_layers


@dataclass
class Side:
    """One model to compare: its display name, the module, the layers to tap and its description."""

    name: str
    model: Any
    layers: list[str]
    description: dict[str, Any] = field(default_factory=dict)


@dataclass
class Streamed:
    """What one pass over the images gave.

    Attributes:
        ids: The images used, in input order.
        labels: Their labels (-1 = none).
        class_names: Label names.
        pooled: ``pooled[s][l]``: side ``s``'s layer ``l`` as (n, D) float32, rows as ``ids``.
        pooling: ``pooling[s][layer]``: how that layer was pooled (``models.taps.POOLINGS``).
        cka: The minibatch CKA accumulator over all layers of all sides (side 0's first).
        skipped: Ids of images that could not be decoded.
    """

    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    pooled: list[list[np.ndarray]]
    pooling: list[dict[str, str]]
    cka: MinibatchCKA
    skipped: list[str]


class _Unnormalised:
    """``eval_transform`` without the normalisation: each model normalises the same [0, 1] tensor."""

    def __init__(self, hw: tuple[int, int], center_crop: bool | None):
        self.tf = eval_transform(hw, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), center_crop=center_crop)

    def __call__(self, img: Any) -> torch.Tensor:
        return self.tf(img)


def sample_order(n: int, *, batch_size: int, batches: int | None, seed: int) -> np.ndarray:
    """The images to use, in the order they are batched: a seeded permutation, ``batches`` × ``batch_size`` at most."""
    order = np.random.default_rng(seed).permutation(n)
    return order if batches is None else order[: batches * batch_size]


def stream_layers(
    sides: Sequence[Side],
    src: LabelledImages,
    *,
    hw: tuple[int, int],
    center_crop: bool | None,
    batch_size: int,
    batches: int | None,
    seed: int,
    device: Any,
    progress: Callable[..., Iterable] | None = None,
) -> Streamed:
    """Run ``sides`` over ``src`` in random minibatches; pooled vectors of every layer and minibatch CKA.

    Args:
        sides: One or two models with their layers.
        src: The images (paths or PIL images) and labels.
        hw: The input size for every model.
        center_crop: ``eval_transform``'s choice (None: its default for ``hw``).
        batch_size: Images per minibatch (the HSIC minibatch and the forward batch).
        batches: At most this many minibatches (None: every image once).
        seed: Seeds the minibatch sampling.
        device: A torch device.
        progress: Wraps the batch loop (a progress bar).

    Raises:
        DataError: no image could be decoded.
    """
    from featviz.data.images import ImageDataset, check_pixels
    from featviz.models.taps import LayerTaps

    order = sample_order(len(src), batch_size=batch_size, batches=batches, seed=seed)
    used = np.sort(order)
    row_of = np.full(len(src), -1, np.int64)
    row_of[used] = np.arange(len(used))
    dataset = ImageDataset(src.items, src.labels, _Unnormalised(hw, center_crop), strict=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), collate_fn=collate)
    norms = []
    for side in sides:
        side.model = side.model.to(device).eval()
        mean, std = normalization_of(side.model)
        norms.append(
            (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))
        )
    pooled: list[list[np.ndarray]] = [[] for _ in sides]
    filled = np.zeros(len(used), bool)
    skipped: list[int] = []
    acc = MinibatchCKA()
    taps = [LayerTaps(side.model, side.layers) for side in sides]
    for t in taps:
        t.__enter__()
    try:
        it = loader if progress is None else progress(loader, total=len(loader))
        with torch.inference_mode():
            for x, _y, idx, bad in it:
                for i in bad:
                    check_pixels(src.items[i])
                skipped += [int(i) for i in bad]
                if x is None:
                    continue
                rows = row_of[idx.numpy()]
                x = x.to(device)
                vecs: list[np.ndarray] = []
                for s, (tap, (mean, std)) in enumerate(zip(taps, norms, strict=True)):
                    out = [v.cpu().numpy() for v in tap((x - mean) / std)]
                    if not pooled[s]:
                        pooled[s] = [np.zeros((len(used), v.shape[1]), np.float32) for v in out]
                    for store, v in zip(pooled[s], out, strict=True):
                        store[rows] = v
                    vecs += out
                filled[rows] = True
                if len(rows) == batch_size or len(order) < batch_size:
                    acc.update(vecs)
                else:  # a last, smaller minibatch: equal-size minibatches only (Nguyen et al.)
                    acc.skipped_batches += 1
    finally:
        for t in taps:
            t.__exit__(None, None, None)
    if not filled.any():
        raise DataError(f"none of the {len(used)} images could be decoded")
    keep = np.flatnonzero(filled)
    if len(keep) < len(used):
        pooled = [[p[keep] for p in side] for side in pooled]
    ids = [src.ids[i] for i in used[keep]]
    return Streamed(
        ids,
        np.asarray(src.labels)[used[keep]],
        list(src.class_names),
        pooled,
        [dict(t.pooling) for t in taps],
        acc,
        [src.ids[i] for i in sorted(skipped)],
    )


def protocol_resize(hw: tuple[int, int], center_crop: bool | None) -> str:
    """What the transform did to every image, in words (the manifests' ``resize``)."""
    return resize_rule(hw, center_crop)


# ------------------------------------------------------------------ the models
RANDOM = "random"


def parse_source(value: Any) -> tuple[str | None, str | None]:
    """A ``--checkpoint`` value as (checkpoint, random-init architecture).

    ``random`` is a seeded random init of the other model's architecture (``""``), ``random:ARCH``
    one of ``ARCH``; anything else is a checkpoint.
    """
    s = str(value)
    if s == RANDOM:
        return None, ""
    if s.startswith(RANDOM + ":"):
        return None, s[len(RANDOM) + 1 :]
    return s, None


def load_sides(
    checkpoints: Sequence[Any],
    *,
    arch: str | None = None,
    layers: str | Sequence[str] | None = "auto",
    layers_b: str | Sequence[str] | None = None,
    seed: int = 0,
    load_kwargs: dict[str, Any] | None = None,
) -> list[Side]:
    """The one or two models ``featviz compare`` compares, with their layers.

    Args:
        checkpoints: Zero, one or two ``--checkpoint`` values: files, ``random`` (a seeded random
            init of the first model's architecture) or ``random:ARCH``. None/empty: ``arch`` with
            random weights. The first random init has ``seed``, a second one ``seed + 1``.
        arch: The architecture when a checkpoint does not say it, or of the random-init model.
        layers: The first model's layers: ``auto`` (``models.taps.auto_layers``) or names.
        layers_b: The second model's; default: ``auto`` when ``layers`` is, else the same names.
        seed: The random init's seed.
        load_kwargs: ``format``, ``num_heads``, ``checkpoint_key``, ``trust`` for the checkpoints.

    Raises:
        OptionError: a layer list that names no layer (``--layers ,``).
        DataError, ArchitectureError, CheckpointError: bad values, or a model that cannot be loaded.
    """
    from featviz.io.outputs import checkpoint_display_name
    from featviz.models.features import arch_name, resolve_layer
    from featviz.models.loader import load_model
    from featviz.models.taps import auto_layers

    values = list(checkpoints or [])
    if len(values) > 2:
        raise OptionError(f"compare takes one or two --checkpoint, got {len(values)}")
    if not values:
        if not arch:
            from featviz.errors import ArchitectureError

            raise ArchitectureError("give --checkpoint A [--checkpoint B], or --arch for a randomly initialised model")
        values = [f"{RANDOM}:{arch}"]
    wanted_a = parse_layers(layers, option="--layers")  # checked before any model loads
    wanted = [wanted_a, wanted_a if layers_b is None else parse_layers(layers_b, option="--layers-b")]
    load_kwargs = dict(load_kwargs or {})
    sides: list[Side] = []
    first_arch: Any = None  # the first model's ArchSpec: what `random` copies
    for i, value in enumerate(values):
        ckpt, rnd = parse_source(value)
        if ckpt is None:
            spec: Any = rnd or first_arch or arch
            if not spec:
                from featviz.errors import ArchitectureError

                raise ArchitectureError(
                    "--checkpoint random copies the first model's architecture: put it second "
                    "(-c A.pth -c random), or say which: -c random:ARCH or --arch ARCH"
                )
            model_seed = seed + sum(bool(s.description.get("random_init")) for s in sides)  # two random inits differ
            model, desc = load_model(None, arch=spec, seed=model_seed, num_heads=load_kwargs.get("num_heads"))
            name = f"{arch_name(model)} (random init{'' if model_seed == seed else f', seed {model_seed}'})"
            info = {"checkpoint": None, "random_init": True, "seed": model_seed}
        else:
            model, desc = load_model(ckpt, arch=arch, **load_kwargs)
            name = checkpoint_display_name(ckpt)
            info = {"checkpoint": ckpt, "random_init": False}
        if any(s.name == name for s in sides):
            name += " (B)"
        names = wanted[i] or auto_layers(model)  # None: auto
        names = [resolve_layer(model, n)[0] for n in names]  # canonical names; unknown ones fail here
        sides.append(Side(name, model, names, {**info, "arch": arch_name(model)}))
        first_arch = first_arch or desc.arch
    return sides


def common_size(sides: Sequence[Side], image_size: Any = None) -> tuple[int, int]:
    """The one input size of every model: ``image_size``, or the first model's own, checked for each.

    Raises:
        DataError: a model (a ViT) cannot take that size.
    """
    from featviz.models.features import check_image_size, input_size

    hw = input_size(sides[0].model, image_size)
    for s in sides[1:]:
        check_image_size(s.model, hw)
    return hw
