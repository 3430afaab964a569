"""`featviz pca`: DINOv2's "PCA of patch features" images for any layer of any model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from featviz.cli._app import _echo_json, _progress, _user_errors, app, out
from featviz.cli.options import (
    ArchOpt,
    BatchSizeOpt,
    CheckpointKeyOpt,
    CheckpointOpt,
    DeviceOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    NumHeadsOpt,
    SeedOpt,
    SheetImagesOpt,
    TrustOpt,
    command_arguments,
    image_size_value,
    load_view_model,
    sheet_note,
)


@app.command()
def pca(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (sheet, RGB images, pca.npz, manifest).")],
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    layer: Annotated[
        str | None,
        typer.Option("--layer", "-l", help="Layer name (default: ViT final norm, ResNet layer4; `featviz layers`)."),
    ] = None,
    image_size: Annotated[
        str | None, typer.Option("--image-size", callback=image_size_value, help="N or HxW (default: the model's).")
    ] = None,
    components: Annotated[
        int, typer.Option("--components", min=1, help="Principal components kept; the first three are R, G, B.")
    ] = 3,
    foreground: Annotated[
        Literal["auto", "none"],
        typer.Option(
            "--foreground", help="auto: threshold the first component to drop the background; none: keep all."
        ),
    ] = "auto",
    threshold: Annotated[
        float, typer.Option("--threshold", help="Foreground = first-component score above this (DINOv2: 0).")
    ] = 0.0,
    recipe: Annotated[
        Literal["dinov2", "dinov3"],
        typer.Option(
            "--recipe",
            help="dinov2: min-max colours of a PCA of the foreground; dinov3: DINOv3's notebook (median-filtered "
            "foreground, whitened PCA, sigmoid colours).",
        ),
    ] = "dinov2",
    mask_dir: Annotated[
        Path | None,
        typer.Option(
            "--mask-dir", help="--recipe dinov3: foreground masks named like the images (white = foreground)."
        ),
    ] = None,
    sheet_images: SheetImagesOpt = 40,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 8,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """PCA of patch (or pixel) features of all images jointly, foreground first, shown as RGB (DINOv2's figure)."""
    from featviz.views.pca import run_pca

    with _user_errors():
        model, description = load_view_model(out_dir, force=force)  # reads back the MODEL_SOURCE options
        s = run_pca(
            images,
            out_dir,
            model=model,
            layer=layer,
            image_size=image_size,
            components=components,
            foreground=foreground,
            threshold=threshold,
            recipe=recipe,
            mask_dir=mask_dir,
            batch_size=batch_size,
            device=device,
            seed=seed,
            force=force,
            sheet_images=sheet_images,
            description=description.to_dict(),
            # the default recipe's manifest reads as before the option existed
            arguments=command_arguments(
                leave_out=("recipe", "mask_dir") if recipe == "dinov2" and mask_dir is None else ()
            ),
            progress=_progress("pca"),
        )
    if as_json:
        _echo_json(dict(s))
        return
    evr = ", ".join(f"{100 * v:.1f} %" for v in s["explained_variance_ratio"][:3])
    out.print(
        f"[bold]{s['images']}[/] images · {s['arch']} {s['layer']} · {s['image_size'][0]}x{s['image_size'][1]} "
        f"→ {s['grid'][0]}x{s['grid'][1]} × {s['feature_dim']} features, one PCA for all",
        highlight=False,
    )
    if s.get("recipe") == "dinov3":
        out.print("recipe: DINOv3's notebook (median-filtered foreground, whitened PCA, sigmoid colours)")
    if s["foreground"] == "masks":
        out.print(f"foreground: the masks: {100 * s['foreground_share']:.0f} % of the patches", highlight=False)
    if s["foreground"] == "auto":
        out.print(
            f"foreground: first component > {s['threshold']:g}: {100 * s['foreground_share']:.0f} % of the "
            f"patches (the first component explains "
            f"{100 * s['first_component_explained_variance_ratio']:.1f} %)",
            highlight=False,
        )
    fitted = "the foreground patches" if s["foreground"] != "none" else "all patches (no background removal)"
    out.print(f"RGB = components 1-3 of {fitted} ({evr} of their variance)", highlight=False)
    out.print(f"sheet: {s['files']['sheet']}{sheet_note(s)}", highlight=False)
