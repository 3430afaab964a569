"""`featviz similarity`: a patch's cosine similarity to every patch of every image; matches; a clickable page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featviz.cli._app import _echo_json, _progress, _user_errors, app, out, usage_error
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

_MATCH = "Correspondences"


def _pairs(values: list[str] | None, what: str) -> list[tuple[int, int]]:
    """``--point``/``--patch`` values as integer pairs; a malformed one is a usage error (exit 2)."""
    from featviz.errors import DataError
    from featviz.views.similarity import parse_pair

    try:
        return [parse_pair(v, what) for v in values or []]
    except DataError as e:
        usage_error(str(e))


@app.command()
def similarity(
    images: Annotated[
        list[Path],
        typer.Argument(help="Image files and/or folders (searched recursively); queries come from the first."),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (sheet, overlays, similarity.json/.npz, manifest).")
    ],
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    point: Annotated[
        list[str] | None,
        typer.Option(
            "--point", "-p", metavar="X,Y", help="Query pixel X,Y of the first image (x = column); repeatable."
        ),
    ] = None,
    patch: Annotated[
        list[str] | None,
        typer.Option(
            "--patch",
            metavar="I,J",
            help="Query patch I,J (row, column) of the first image's feature grid; repeatable.",
        ),
    ] = None,
    layer: Annotated[
        str | None,
        typer.Option("--layer", "-l", help="Layer name (default: ViT final norm, ResNet layer4; `featviz layers`)."),
    ] = None,
    image_size: Annotated[
        str | None, typer.Option("--image-size", callback=image_size_value, help="N or HxW (default: the model's).")
    ] = None,
    html: Annotated[
        bool,
        typer.Option("--html", help="Also write similarity.html: click any patch of any image to redraw all maps."),
    ] = False,
    matches: Annotated[
        int | None,
        typer.Option(
            "--matches",
            min=1,
            metavar="N",
            help="Draw at most N mutual nearest-neighbour matches between two images.",
            rich_help_panel=_MATCH,
        ),
    ] = None,
    pair: Annotated[
        str | None,
        typer.Option(
            "--pair",
            metavar="A,B",
            help="The two images to match, A,B (ids or 0-based positions), when more than two are given.",
            rich_help_panel=_MATCH,
        ),
    ] = None,
    foreground_only: Annotated[
        bool,
        typer.Option(
            "--foreground-only",
            help="Match foreground patches only (featviz pca's first-component rule).",
            rich_help_panel=_MATCH,
        ),
    ] = False,
    limit: LimitOpt = None,
    sheet_images: SheetImagesOpt = 20,
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
    """Cosine similarity of query patches to every patch of every image; mutual-NN matches; a clickable page."""
    from featviz.views.similarity import run_similarity

    points, patches = _pairs(point, "--point"), _pairs(patch, "--patch")
    with _user_errors():
        style = plot_style(only=("cmap",))
        model, description = load_view_model(out_dir, force=force)  # reads back the MODEL_SOURCE options
        s = run_similarity(
            images,
            out_dir,
            model=model,
            points=points,
            patches=patches,
            layer=layer,
            image_size=image_size,
            html=html,
            matches=matches,
            pair=pair,
            foreground_only=foreground_only,
            batch_size=batch_size,
            device=device,
            force=force,
            limit=limit,
            sheet_images=sheet_images,
            style=style,
            description=description.to_dict(),
            arguments=command_arguments(),
            progress=_progress("similarity"),
        )
    if as_json:
        _echo_json(dict(s))
        return
    out.print(
        f"[bold]{s['images']}[/] images · {s['arch']} {s['layer']} · {s['image_size'][0]}x{s['image_size'][1]} "
        f"→ {s['grid'][0]}x{s['grid'][1]} × {s['feature_dim']} features",
        highlight=False,
    )
    for k, q in enumerate(s["queries"]):
        named = f"pixel {q['point'][0]:g},{q['point'][1]:g} → " if q["point"] is not None else ""
        out.print(f"q{k + 1}: {named}patch {q['patch'][0]},{q['patch'][1]} of {q['image']}", highlight=False)
    m = s["matches"]
    if m is not None:
        mean = f", mean similarity {m['mean_similarity']:.3f}" if m["count"] else ""
        out.print(
            f"matches {m['images'][0]} ↔ {m['images'][1]}: {m['count']} drawn of {m['mutual_nearest_neighbours']} "
            f"mutual nearest neighbours{mean}",
            highlight=False,
        )
    if s["html"] is not None:
        h = s["html"]
        kept = f"{h['dims']} of {h['feature_dim']} dims" + (
            f" (SVD, {100 * h['retained_energy']:.1f} % of the energy)" if h["reduction"] else ""
        )
        out.print(f"page: {s['files']['html']} ({h['bytes'] / 1e6:.1f} MB, float16, {kept})", highlight=False)
    if "sheet" in s["files"]:
        out.print(f"sheet: {s['files']['sheet']}{sheet_note(s)}", highlight=False)
    if "matches" in s["files"]:
        out.print(f"matches: {s['files']['matches']}", highlight=False)
