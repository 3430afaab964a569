"""`featviz attention`: a ViT's class-token attention per head, DINO's masks and attention rollout."""

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
    CmapOpt,
    DeviceOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    LimitOpt,
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

_ROLL = "Attention rollout"


@app.command()
def attention(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (maps.npz, contact sheet, overlays, manifest).")
    ],
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            callback=image_size_value,
            help="N or HxW, multiples of the patch size (default: the model's).",
        ),
    ] = None,
    layer: Annotated[
        int | None, typer.Option("--layer", help="Block index (negative counts from the end; default: the last).")
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="DINO's masks keep the patches holding this share of the mass.")
    ] = 0.6,
    rollout: Annotated[
        bool, typer.Option("--rollout", help="Also attention rollout (Abnar & Zuidema 2020).", rich_help_panel=_ROLL)
    ] = False,
    head_fusion: Annotated[
        Literal["mean", "max", "min"],
        typer.Option("--head-fusion", help="How rollout fuses the heads of a block.", rich_help_panel=_ROLL),
    ] = "mean",
    discard_ratio: Annotated[
        float,
        typer.Option(
            "--discard-ratio",
            help="Rollout zeroes this lowest share of each block's fused weights.",
            rich_help_panel=_ROLL,
        ),
    ] = 0.0,
    limit: LimitOpt = None,
    sheet_images: SheetImagesOpt = 24,
    cmap: CmapOpt = None,
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
    """A ViT's class-token self-attention per head (any size, registers excluded), DINO's masks, rollout."""
    from featviz.views.attention import run_attention

    with _user_errors():
        style = plot_style(only=("cmap",))
        model, description = load_view_model(out_dir, force=force)  # reads back the MODEL_SOURCE options
        summary = run_attention(
            images,
            out_dir,
            model=model,
            layer=layer,
            image_size=image_size,
            threshold=threshold,
            rollout_maps=rollout,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            batch_size=batch_size,
            device=device,
            force=force,
            limit=limit,
            sheet_images=sheet_images,
            style=style,
            description=description.to_dict(),
            arguments=command_arguments(),
            progress=_progress("attention"),
        )
    if as_json:
        _echo_json(dict(summary))
        return
    s = summary
    tok = s["prefix_tokens"]
    excluded = f"{tok['excluded_from_maps']} prefix token" + ("s" if tok["excluded_from_maps"] != 1 else "")
    parts = [f"{tok['class']} class"] + ([f"{tok['register']} register"] if tok["register"] else [])
    parts += [f"{tok['other']} other"] if tok["other"] else []
    out.print(
        f"[bold]{s['images']}[/] images · {s['arch']} block {s['layer']} of {s['blocks']} · {s['heads']} heads · "
        f"{s['image_size'][0]}x{s['image_size'][1]} → {s['grid'][0]}x{s['grid'][1]} patches",
        highlight=False,
    )
    out.print(
        f"excluded from the maps: {excluded} ({' + '.join(parts)}); they take "
        f"{100 * s['prefix_attention_share']:.1f} % of the class token's attention",
        highlight=False,
    )
    if s["rollout"]:
        r = s["rollout"]
        out.print(
            f"rollout: blocks {r['blocks']}, heads fused by {r['head_fusion']}, discard ratio {r['discard_ratio']:g}",
            highlight=False,
        )
    out.print(f"contact sheet: {s['files']['contact_sheet']}{sheet_note(s)}", highlight=False)
