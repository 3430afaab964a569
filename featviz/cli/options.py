"""Options shared by several commands, defined once (their names and help read the same everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from featviz.cli.choices import CheckpointKey, DeviceName, FormatName, PrecisionName

CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", "-c", help="Checkpoint file (.pth, .pth.tar, .ckpt, .safetensors).")
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
DeviceOpt = Annotated[DeviceName, typer.Option("--device", help="auto = CUDA when available, else CPU.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout.")]


def _load_kwargs(arch, fmt, num_heads, checkpoint_key, trust) -> dict[str, Any]:
    return dict(arch=arch, format=fmt, num_heads=num_heads, checkpoint_key=checkpoint_key, trust=trust)


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
    """``--image-size`` N or HxW, checked by the feature core's parser: a malformed size is a usage
    error (exit 2) before any model is loaded, said in one line (``error: --image-size '0': ...``);
    N comes back as an int, HxW as ``"HxW"``."""
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
    )
