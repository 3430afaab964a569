"""`featviz cam`: class activation maps of any layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featviz.cli._app import _echo_json, _image_limit, _progress, _user_errors, app, out
from featviz.cli.choices import CAM_METHOD_NAMES
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
    LimitOpt,
    MaxImagePixelsOpt,
    NumHeadsOpt,
    SeedOpt,
    SheetImagesOpt,
    StrictOpt,
    TrustOpt,
    command_arguments,
    image_size_value,
    load_view_model,
    plot_style,
    sheet_note,
)


@app.command()
def cam(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (overlays, maps.npz, contact sheet, manifest).")
    ],
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    layer: Annotated[
        list[str] | None,
        typer.Option(
            "--layer",
            "-l",
            help="Layer name, e.g. layer4, 'layer4[-1]', blocks.11.norm1 (repeat to average "
            "layers; default per architecture; `featviz layers` lists them).",
        ),
    ] = None,
    method: Annotated[
        list[str],
        typer.Option(
            "--method",
            "-m",
            help="Method(s), comma-separated or repeated, or 'all': " + ", ".join(CAM_METHOD_NAMES) + ".",
        ),
    ] = ["gradcam"],  # noqa: B006 - typer needs a list default
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            help="top1 | class:N | class:NAME (e.g. class:tabby; a 1000-class model without names of its own "
            "looks it up in ImageNet's) | seg:CLASS | similarity:REF_IMAGE | self | pair "
            "(default: top1 with a classifier, else self).",
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            callback=image_size_value,
            help="N or HxW (default: the model's; a ViT takes any multiple of its patch size, e.g. 224x320).",
        ),
    ] = None,
    class_names: Annotated[
        str | None,
        typer.Option(
            "--class-names",
            help="Class names for the labels: 'imagenet' (ImageNet-1k, from timm) or a text file, one per line.",
        ),
    ] = None,
    note: Annotated[str | None, typer.Option("--note", help="A line under the contact sheet's title.")] = None,
    aug_smooth: Annotated[
        bool, typer.Option("--aug-smooth", help="Average over flips and scalings (6× slower).")
    ] = False,
    eigen_smooth: Annotated[
        bool, typer.Option("--eigen-smooth", help="First principal component of the weighted maps.")
    ] = False,
    metrics: Annotated[bool, typer.Option("--metrics", help="Add ROAD and confidence drop/increase per map.")] = False,
    score: Annotated[
        str | None,
        typer.Option(
            "--score",
            help="Faithfulness of every map: road, deletion, insertion (comma-separated, or all); written to "
            "cam.json, ranked on the contact sheet. '--method all --score deletion': which method to trust.",
        ),
    ] = None,
    score_steps: Annotated[
        int,
        typer.Option("--score-steps", min=1, help="Deletion/insertion steps (pixels per step: H·W / steps, as RISE)."),
    ] = 20,
    limit: LimitOpt = None,
    sheet_images: SheetImagesOpt = 24,
    cmap: CmapOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 16,
    seed: SeedOpt = 0,
    strict: StrictOpt = False,
    max_image_pixels: MaxImagePixelsOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Heatmaps of where a classifier, segmenter or SSL encoder looks, with any pytorch-grad-cam method."""
    from featviz.views import cam as cam_lib

    with _user_errors():
        _image_limit(max_image_pixels)
        style = plot_style(only=("cmap",))
        model, _ = load_view_model(out_dir, force=force, head=True)  # reads back the MODEL_SOURCE options
        summary = cam_lib.run_cam(
            images,
            out_dir,
            model=model,
            methods=method,
            layers=layer,
            target=target,
            image_size=image_size,
            batch_size=batch_size,
            aug_smooth=aug_smooth,
            eigen_smooth=eigen_smooth,
            metrics=metrics,
            scores=score,
            score_steps=score_steps,
            device=device,
            seed=seed,
            force=force,
            strict=strict,
            class_names=class_names or (),
            weights=checkpoint.name if checkpoint else f"random weights, seed {seed}",
            note=note,
            limit=limit,
            sheet_images=sheet_images,
            style=style,
            arguments=command_arguments(leave_out=("note", "max_image_pixels")),
            progress=_progress("cam"),
        )
    if as_json:
        _echo_json(dict(summary))
        return
    out.print(
        f"[bold]{summary['images']}[/] images × {len(summary['methods'])} methods "
        f"({', '.join(summary['methods'])}) · layer {', '.join(summary['layers'])} · target {summary['target']}"
    )
    out.print(f"contact sheet: {summary['files']['contact_sheet']}{sheet_note(summary)}", highlight=False)
    for name, values in (summary["metrics"] or {}).items():
        out.print(f"  {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in values.items()), highlight=False)
    scored = summary.get("scores")
    if scored:
        out.print(f"scores: {summary['files']['scores']} ({scored['forwards']} forwards)", highlight=False)
        for name, order in scored["ranking"].items():
            out.print(
                f"  {name}, best first: " + ", ".join(f"{m} {scored['means'][m][name]:.3f}" for m in order),
                highlight=False,
            )
