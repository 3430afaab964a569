"""`featviz crops`: ContrastiveCrop's heatmap boxes and view pairs beside RandomResizedCrop's, for any checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featviz.cli._app import _echo_json, _progress, _user_errors, app, out
from featviz.cli.options import (
    ArchOpt,
    BatchSizeOpt,
    CheckpointKeyOpt,
    CheckpointOpt,
    CmapOpt,
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
    plot_style,
    sheet_note,
)


@app.command()
def crops(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (sheet.png, crops.npz, manifest).")],
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    threshold: Annotated[
        float,
        typer.Option("--threshold", "-k", help="Heatmap threshold k of the box (official 0.10; paper: 0.05-0.20)."),
    ] = 0.10,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha", help="Beta(alpha, alpha) of the crop centres (default: official, 0.1 up to 96 px, else 0.6)."
        ),
    ] = None,
    pairs: Annotated[int, typer.Option("--pairs", "-n", min=1, max=10, help="View pairs drawn per image.")] = 4,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="View pairs per image and method for the statistics.")
    ] = 256,
    masks: Annotated[
        Path | None,
        typer.Option(
            "--masks", help="Class-index masks named like the images (0 background, 255 ignore): object share per view."
        ),
    ] = None,
    scale: Annotated[
        tuple[float, float], typer.Option("--scale", help="Crop area range of both crops (official 0.2 1.0).")
    ] = (0.2, 1.0),
    image_size: Annotated[
        str | None,
        typer.Option("--image-size", callback=image_size_value, help="Heatmap input N or HxW (default: the model's)."),
    ] = None,
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer", "-l", help="Feature map (default: ResNet layer4, a timm CNN's last stage, a ViT's last block)."
        ),
    ] = None,
    sheet_images: SheetImagesOpt = 12,
    cmap: CmapOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 16,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """ContrastiveCrop (Peng et al. 2022) for any checkpoint: per image the heatmap, its box, view pairs beside
    RandomResizedCrop's, and the numbers (IoU of the views, share inside the box, object share with --masks)."""
    from featviz.views.crops import run_crops

    with _user_errors():
        style = plot_style(only=("cmap",))  # --alpha here is the Beta's, not a style
        model, description = load_view_model(out_dir, force=force)  # reads back the MODEL_SOURCE options
        s = run_crops(
            images,
            out_dir,
            model=model,
            threshold=threshold,
            alpha=alpha,
            pairs=pairs,
            samples=max(samples, pairs),
            masks=masks,
            image_size=image_size,
            scale=tuple(scale),
            layer=layer,
            batch_size=batch_size,
            device=device,
            seed=seed,
            force=force,
            sheet_images=sheet_images,
            style=style,
            description=description.to_dict(),
            arguments=command_arguments(leave_out=("batch_size", "sheet_images")),
            progress=_progress("heatmaps"),
        )
    if as_json:
        _echo_json(dict(s))
        return
    out.print(
        f"[bold]{s['images']}[/] images · {s['arch']} {s['layer']} · heatmap {s['heatmap_size'][0]}x"
        f"{s['heatmap_size'][1]} · k {s['threshold']:g} · α {s['alpha']:g} · boxes: mean "
        f"{100 * s['mean_box_area']:.0f} % of the map, {100 * s['whole_image_share']:.0f} % whole images",
        highlight=False,
    )
    keys = [("iou", "IoU of the two views"), ("inside_box", "view inside the box")]
    if s["masks"]:
        keys += [("object_share", "object pixels per view"), ("views_without_object", "views with no object")]
    out.print(f"{'':24}{'ContrastiveCrop':>17}{'RandomResizedCrop':>19}", highlight=False)
    for k, label in keys:
        a, b = s["contrastive"].get(k), s["rrc"].get(k)
        fmt_v = (lambda v: "-" if v is None else f"{v:.3f}") if k == "iou" else \
            (lambda v: "-" if v is None else f"{100 * v:.1f} %")
        out.print(f"{label:24}{fmt_v(a):>17}{fmt_v(b):>19}", highlight=False)
    if s["masks"]:
        out.print(
            f"objects: {100 * (s['image_object_share'] or 0):.1f} % of the labelled pixels; the boxes hold "
            f"{100 * (s['object_in_box'] or 0):.0f} % of them ({s['masks']} images with masks)",
            highlight=False,
        )
    out.print(f"sheet: {s['files']['sheet']}{sheet_note(s)}", highlight=False)
