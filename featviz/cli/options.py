"""What several commands share, defined once: their options and the glue that reads them back.

The options' names and help read the same in every command.

- the options themselves (``CheckpointOpt`` … ``JsonOpt``; the eval inputs of ``knn`` and ``probe``);
- ``command_arguments``: the running command's parameters as its manifest records them, read from
  the command itself (click's context), never a hand-built copy of its signature;
- ``load_view_model``: a view command's output check and the model its model-source options name;
- ``sources`` and ``print_protocol``: the eval inputs as ``featviz.eval.splits`` takes them, and the
  protocol line ``knn`` and ``probe`` print.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from featviz.cli._app import out
from featviz.cli.choices import CheckpointKey, FormatName, PrecisionName

CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", "-c", help="Checkpoint file (.pth, .pth.tar, .ckpt, .safetensors).")
]
CheckpointsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--checkpoint",
        "-c",
        help="Checkpoint file (.pth, .pth.tar, .ckpt, .safetensors); repeat it to compare several side by side.",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        "-a",
        help="Architecture: resnet18…152[-cifar], wide_resnet50_2, vit_small_patch16_224, timm:<name>. "
        "Inferred from the checkpoint when omitted.",
    ),
]
FormatOpt = Annotated[FormatName, typer.Option("--format", help="Checkpoint layout; 'auto' detects it.")]
NumHeadsOpt = Annotated[
    int | None, typer.Option("--num-heads", min=1, help="ViT attention heads (cannot be inferred from weights).")
]
CheckpointKeyOpt = Annotated[
    CheckpointKey | None,
    typer.Option(
        "--checkpoint-key",
        help="Which network of a multi-network file: DINO/iBOT teacher (default) or student; I-JEPA/MSN "
        "target_encoder (default) or encoder.",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust-checkpoint", help="Allow arbitrary pickles (weights_only=False). Only for files you trust."),
]
DEVICE_RE = r"auto|cpu|cuda|cuda:\d+"
"""What ``--device`` takes: auto, cpu, cuda (this process's GPU) or cuda:N (the N-th GPU)."""


def device_value(value: str) -> str:
    """``--device`` checked for its form (auto, cpu, cuda, cuda:N); a usage error (exit 2) otherwise.

    Whether the device exists is checked where it is used (``featviz.distributed.resolve_device``).
    """
    import re

    v = value.strip().lower()
    if not re.fullmatch(DEVICE_RE, v):
        from featviz.cli._app import usage_error

        usage_error(f"--device {value!r}: expected auto, cpu, cuda or cuda:N (a GPU index, e.g. cuda:1)")
    return v


DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
DeviceOpt = Annotated[str, typer.Option("--device", callback=device_value, help=DEVICE_HELP)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout.")]


def _load_kwargs(arch, fmt, num_heads, checkpoint_key, trust) -> dict[str, Any]:
    return dict(arch=arch, format=fmt, num_heads=num_heads, checkpoint_key=checkpoint_key, trust=trust)


# ------------------------------------------------------------------ reading a command's options back
MODEL_SOURCE = ("checkpoint", "arch", "fmt", "num_heads", "checkpoint_key", "trust_checkpoint", "seed")
"""The parameters that say which model a command reads: a checkpoint and how to read it, or an
architecture with seeded random weights."""

NOT_RECORDED = ("fmt", "num_heads", "checkpoint_key", "trust_checkpoint", "force", "as_json")
"""Parameters a manifest's ``arguments`` leave out: how the checkpoint is read (the manifest's model
description says what was read) and what only steers the output (``--force``, ``--json``)."""

RECORDED_AS = {"out_dir": "out", "out_path": "out"}
"""Parameters a manifest records under their option's name."""


def command_params() -> dict[str, Any]:
    """The running command's parameters (after their callbacks), in the order of its signature.

    Raises:
        RuntimeError: no command is running (called outside a CLI command).
    """
    from typer._click.globals import get_current_context  # Typer's own click (its contexts)

    ctx = get_current_context()
    return {p.name: _as_passed(p, ctx.params[p.name]) for p in ctx.command.params if p.name in ctx.params}


def _as_passed(param: Any, value: Any) -> Any:
    """A parameter's value as Typer passes it to the command.

    A repeated option or a variadic argument is a list, and None when it was not given and defaults to
    None (click holds an empty tuple).
    """
    if value is not None and (getattr(param, "multiple", False) or getattr(param, "nargs", 1) == -1):
        return None if param.default is None and len(value) == 0 else list(value)
    return value


def command_arguments(*, leave_out: Iterable[str] = ()) -> dict[str, Any]:
    """The running command's arguments as its manifest records them.

    Every parameter, in the order of its signature, but ``NOT_RECORDED`` and ``leave_out``;
    ``out_dir``/``out_path`` under the name ``out``.
    """
    skip = {*NOT_RECORDED, *leave_out}
    return {RECORDED_AS.get(k, k): v for k, v in command_params().items() if k not in skip}


def load_view_model(out_dir: Path, *, force: bool, head: bool = False) -> tuple[Any, Any]:
    """A view command's first steps: the output folder is checked, then the model is loaded.

    The check comes before the load, so a bad output fails at once. The model is the one the
    command's ``MODEL_SOURCE`` options name (``featviz.models.loader.load_model``; the load's
    warnings go to stderr).

    Returns:
        The model and its ``ModelDescription``.

    Raises:
        OutputError, OutputExistsError: the output folder cannot be written, or exists without ``force``.
        CheckpointError, ArchitectureError: the model cannot be loaded.
    """
    from featviz.models import loader

    p, kw = _checked_source(out_dir, force=force)
    model, description = loader.load_model(p["checkpoint"], seed=p["seed"], head=head, **kw)
    return model, description


def _checked_source(out_dir: Path, *, force: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The output folder checked, then the command's parameters and its ``load_model`` keywords."""
    from featviz.io.outputs import check_output

    check_output(out_dir, force=force, folder=True)
    p = command_params()
    return p, _load_kwargs(p["arch"], p["fmt"], p["num_heads"], p["checkpoint_key"], p["trust_checkpoint"])


def load_view_models(out_dir: Path, *, force: bool) -> list[tuple[Any, Any, str]]:
    """``load_view_model`` for a command whose ``--checkpoint`` repeats: every model, in the order given.

    Each comes with its ``ModelDescription`` and a name (the checkpoint's file name; the architecture
    for random weights). The other model-source options apply to each.

    Raises:
        OutputError, OutputExistsError: the output folder cannot be written, or exists without ``force``.
        CheckpointError, ArchitectureError: a model cannot be loaded.
    """
    from featviz.models import loader

    p, kw = _checked_source(out_dir, force=force)
    models = []
    for ckpt in p["checkpoint"] or [None]:
        model, description = loader.load_model(ckpt, seed=p["seed"], **kw)
        models.append((model, description, Path(ckpt).name if ckpt is not None else str(p["arch"])))
    return models


# ------------------------------------------------------------------ how many images, and how they are drawn
LimitOpt = Annotated[
    int | None,
    typer.Option("--limit", min=1, help="Only the first N images, in the listing order (sorted paths); the manifest "
                 "says how many of how many."),
]
SheetImagesOpt = Annotated[
    int,
    typer.Option("--sheet-images", min=1, help="Images shown on the contact sheet, spread evenly over all of them "
                 "(every output file is still written); the run says 'showing N of M' when it cuts."),
]


def sheet_note(summary: Any) -> str:
    """`` (showing 24 of 40 images; --sheet-images)`` after a sheet's path when it cuts, else ``''``."""
    sheet = summary.get("sheet") or {}
    if sheet and sheet["shown"] < sheet["of"]:
        return f" (showing {sheet['shown']} of {sheet['of']} images; --sheet-images {sheet['of']} shows all)"
    return ""


_STYLE = "Style"
PaletteOpt = Annotated[
    str | None,
    typer.Option("--palette", help="Class colours: a matplotlib colour map, e.g. tab10, Set2, viridis (default: "
                 "tab10, tab20 beyond 10 classes).", rich_help_panel=_STYLE),
]
PointSizeOpt = Annotated[
    float | None,
    typer.Option("--point-size", help="Marker size in pt² (default: by the number of points).",
                 rich_help_panel=_STYLE),
]
PointAlphaOpt = Annotated[
    float | None,
    typer.Option("--alpha", help="Marker opacity in (0, 1] (default: by the number of points).",
                 rich_help_panel=_STYLE),
]
CmapOpt = Annotated[
    str | None,
    typer.Option("--cmap", help="Heatmap colour map: a matplotlib name, e.g. inferno, jet, viridis (default: the "
                 "view's own).", rich_help_panel=_STYLE),
]
STYLE_OPTIONS = ("palette", "point_size", "alpha", "cmap")
"""The one option set of a figure's style (``--palette --point-size --alpha`` on maps, ``--cmap`` on
heatmaps), read back by ``plot_style``."""


def plot_style(only: Iterable[str] = STYLE_OPTIONS) -> Any:
    """The running command's style options as one ``featviz.style.PlotStyle`` (absent ones: None).

    ``only``: the style options the command takes (``crops``' ``--alpha`` is its Beta's, not a style).

    Raises:
        DataError: an unknown colour map, a size ≤ 0 or an opacity outside (0, 1].
    """
    from featviz.style import PlotStyle

    p = command_params()
    return PlotStyle(**{k: p.get(k) for k in only})


_IMAGES_HELP = "Folder (class subfolders = labels), CSV of path,label, or 'digits'."
ImagesOpt = Annotated[str | None, typer.Option("--images", "-i", help=_IMAGES_HELP)]
RequiredImagesOpt = Annotated[str, typer.Option("--images", "-i", help=_IMAGES_HELP, show_default=False)]
PixelsOpt = Annotated[bool, typer.Option("--pixels", help="Dense pixel features labelled from --masks.")]
MasksOpt = Annotated[
    Path | None, typer.Option("--masks", help="Folder of class-index masks named like the images (255 = ignore).")
]
LayerOpt = Annotated[str | None, typer.Option("--layer", help="Layer for --pixels (default: ResNet layer4, ViT norm).")]
MaxPixOpt = Annotated[
    int | None, typer.Option("--max-pixels-per-class", min=1, help="Class-balanced pixel sample (seeded).")
]


def image_size_value(value: str | None) -> int | str | None:
    """``--image-size`` N or HxW, checked by the feature core's parser.

    A malformed size is a usage error (exit 2) before any model is loaded, said in one line
    (``error: --image-size '0': ...``); N comes back as an int, HxW as ``"HxW"``.
    """
    if value is None:
        return None
    from featviz.errors import DataError
    from featviz.models.features import parse_image_size

    try:
        h, w = parse_image_size(value)
    except DataError as e:
        from featviz.cli._app import usage_error

        usage_error(str(e))
    return h if value.strip().isdigit() else f"{h}x{w}"


ImageSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--image-size",
        callback=image_size_value,
        help="Input size, N or HxW (default: the model's; --pixels: each image's own). A ViT takes any multiple "
        "of its patch size, e.g. 224x320.",
    ),
]
_CENTER_CROP_HELP = (
    "Classification-style center crop (resize, then crop the center) instead of the whole image resized to "
    "exactly the input size. Default: on for a square N, off for HxW; the manifest's 'resize' says which."
)
CenterCropOpt = Annotated[bool | None, typer.Option("--center-crop/--no-center-crop", help=_CENTER_CROP_HELP)]
PrecisionOpt = Annotated[
    PrecisionName, typer.Option("--precision", help="auto = bf16/fp16 autocast on CUDA, float32 on CPU.")
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=0, help="DataLoader workers (default: 8 on CUDA, 0 on CPU).")
]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="Stop at the first undecodable image instead of skipping it.")
]
MaxImagePixelsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-image-pixels",
        min=0,
        help="Lift Pillow's decompression-bomb limit (89,478,485 pixels) for large images you trust; 0 = no limit.",
    ),
]
DropNonfiniteOpt = Annotated[
    bool, typer.Option("--drop-nonfinite", help="Drop NaN/Inf feature rows instead of failing.")
]


def _embed_kwargs(
    images,
    labels,
    pixels,
    masks,
    layer,
    max_pixels_per_class,
    image_size,
    batch_size,
    device,
    precision,
    workers,
    seed,
    strict,
    drop_nonfinite,
    center_crop=None,
) -> dict[str, Any]:
    return dict(
        images=images,
        labels_csv=labels,
        pixels=pixels,
        masks=masks,
        layer=layer,
        max_pixels_per_class=max_pixels_per_class,
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        precision=precision,
        workers=workers,
        seed=seed,
        strict=strict,
        drop_nonfinite=drop_nonfinite,
        center_crop=center_crop,
    )


# ------------------------------------------------------------------ the eval inputs of knn and probe
_NPZ = "Features already computed"
_IMG = "Images through a model"

TrainOpt = Annotated[
    Path | None,
    typer.Option(
        "--train", help="Training features: an .npz or shard folder from `featviz embed`.", rich_help_panel=_NPZ
    ),
]
ValOpt = Annotated[Path | None, typer.Option("--val", help="Validation features (.npz, shards).", rich_help_panel=_NPZ)]
TrainImagesOpt = Annotated[
    Path | None,
    typer.Option("--train-images", help="Training images, one subfolder per class.", rich_help_panel=_IMG),
]
ValImagesOpt = Annotated[
    Path | None,
    typer.Option("--val-images", help="Validation images, one subfolder per class.", rich_help_panel=_IMG),
]
SetOpt = Annotated[
    str | None,
    typer.Option(
        "--images",
        "-i",
        help="One labelled set, split by a fixed stratified split: 'digits' (its raw 8x8 pixels "
        "without a model) or DIR/<class>/*.",
        rich_help_panel=_IMG,
    ),
]
ValFractionOpt = Annotated[
    float, typer.Option("--val-fraction", help="Val share of the --images split.", rich_help_panel=_IMG)
]
EvalSizeOpt = Annotated[
    str | None,
    typer.Option("--image-size", callback=image_size_value, rich_help_panel=_IMG,
                 help="Input size, N or HxW (default: the model's; a ViT takes any multiple of its patch size)."),
]
EvalCenterCropOpt = Annotated[
    bool | None,
    typer.Option("--center-crop/--no-center-crop", help=_CENTER_CROP_HELP, rich_help_panel=_IMG),
]
OutJsonOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Also write the result and its provenance to this .json file.")
]


def sources(
    *, batch_size, device, fmt, num_heads, checkpoint_key, trust, **shared: Any
) -> dict[str, Any]:
    """The ``featviz.eval.splits.load_splits`` arguments of the shared input options.

    ``shared`` is the inputs as a command records them in its provenance (``train``, ``val``,
    ``checkpoint``, ``arch``, ``train_images``, ``val_images``, ``images``, ``image_size``,
    ``center_crop``, ``val_fraction``, ``seed``).
    """
    load = _load_kwargs(None, fmt, num_heads, checkpoint_key, trust)
    load.pop("arch")
    return dict(**shared, batch_size=batch_size, device=device, load_kwargs=load)


def print_protocol(result: dict[str, Any]) -> None:
    """What the features are and how they were split (stdout, before the numbers)."""
    p = result["protocol"]
    out.print(f"features: {p['features']}", highlight=False)
    if p.get("model"):
        src = f" from {p['checkpoint']}" if p.get("checkpoint") else " (random weights)"
        size = "x".join(str(v) for v in p.get("image_size") or [])
        out.print(f"model: {p['model']}{src} · input {size} px · {p['batchnorm']}", highlight=False)
        if p.get("resize"):
            out.print(f"images: {p['resize']}", highlight=False)
    sizes = f"{result['n_train']:,} train, {result['n_val']:,} val, {result['dim']}-d, {result['num_classes']} classes"
    split = p.get("split")
    if split:
        out.print(
            f"split: {split['kind']}, val fraction {split['val_fraction']:g}, seed {split['seed']} · {sizes}",
            highlight=False,
        )
    else:
        out.print(f"data: {sizes}", highlight=False)
