"""`featviz norms`: high-norm "artifact" tokens per layer, where they sit, and the attention they take."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featviz.cli._app import _echo_json, _progress, _user_errors, app, out
from featviz.cli.options import (
    ArchOpt,
    BatchSizeOpt,
    CheckpointKeyOpt,
    CheckpointsOpt,
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
    load_view_models,
    plot_style,
    sheet_note,
)


@app.command()
def norms(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (norms.json, norms.npz, figures, manifest).")
    ],
    checkpoint: CheckpointsOpt = None,
    arch: ArchOpt = None,
    layers: Annotated[
        list[str] | None,
        typer.Option(
            "--layers",
            "-l",
            help="Layers to read, comma-separated or repeated (default: every block of a ViT; a CNN's last stage).",
        ),
    ] = None,
    map_layer: Annotated[
        str | None,
        typer.Option("--map-layer", help="Layer whose outlier maps are drawn (default: the most outliers)."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Fixed norm cutoff for every layer, as Darcet et al. (default: Otsu's split, where bimodal).",
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option("--image-size", callback=image_size_value, help="N or HxW (default: each model's)."),
    ] = None,
    limit: LimitOpt = None,
    sheet_images: SheetImagesOpt = 40,
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
    """High-norm outlier tokens per layer (Darcet et al. 2024): share, maps, class-token attention, registers."""
    from featviz.views.norms import run_norms

    with _user_errors():
        style = plot_style(only=("cmap",))
        loaded = load_view_models(out_dir, force=force)  # reads back the MODEL_SOURCE options
        s = run_norms(
            images,
            out_dir,
            models=[m for m, _, _ in loaded],
            names=[n for _, _, n in loaded],
            descriptions=[d.to_dict() for _, d, _ in loaded],
            layers=layers,
            map_layer=map_layer,
            threshold=threshold,
            image_size=image_size,
            batch_size=batch_size,
            device=device,
            force=force,
            limit=limit,
            sheet_images=sheet_images,
            style=style,
            arguments=command_arguments(),
            progress=_progress("norms"),
        )
    if as_json:
        _echo_json(dict(s))
        return
    out.print(f"[bold]{s['images']}[/] images · outlier rule: {s['rule']['definition']}", highlight=False)
    for m in s["models"]:
        tok = m["tokens"]
        regs = f" · {tok['register']} registers" if tok else ""
        out.print(
            f"[bold]{m['name']}[/] ({m['arch']}) · {m['image_size'][0]}x{m['image_size'][1]}{regs}", highlight=False
        )
        for ly in m["layers"]:
            att = ly["cls_attention"]
            att_text = (
                "class-token attention n/a"
                if isinstance(att, str)
                else (
                    f"class token's attention on them {100 * att['on_outliers']:.1f} %"
                    + (f", on registers {100 * att['on_registers']:.1f} %" if att["on_registers"] is not None else "")
                )
            )
            thr = "no bimodal split" if ly["threshold"] is None else f"norm > {ly['threshold']:.3g}"
            out.print(
                f"  {ly['layer']:<12} median norm {ly['patch_norm']['median']:.3g} · {thr}: "
                f"{100 * ly['outlier_share']:.2f} % outliers · {att_text}",
                highlight=False,
            )
    for f in s["files"]["figures"]:
        out.print(f"figure: {f}", highlight=False)
    for f in s["files"]["outlier_sheets"]:
        out.print(f"outlier sheet: {f}{sheet_note(s)}", highlight=False)
    if s["files"]["comparison"]:
        out.print(f"comparison: {s['files']['comparison']}", highlight=False)
