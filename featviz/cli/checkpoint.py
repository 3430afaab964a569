"""`featviz inspect`, `convert` and `layers`: what a checkpoint holds and what its layers are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featviz.cli._app import _echo_json, _user_errors, app, out
from featviz.cli.options import (
    ArchOpt,
    CheckpointKeyOpt,
    CheckpointOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    NumHeadsOpt,
    TrustOpt,
    _load_kwargs,
    image_size_value,
)


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file to inspect.")],
    arch: ArchOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Detect a checkpoint's layout and architecture, and verify that its encoder loads."""
    from featviz.checkpoints import LoadReport
    from featviz.loader import load_model

    with _user_errors():
        _, desc = load_model(checkpoint, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint))
    report = LoadReport(**desc.source)  # the load report, as the description records it
    if as_json:
        _echo_json(report.to_dict())
    else:
        out.print(report.to_rich())


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to convert.")],
    output: Annotated[Path, typer.Argument(help="Output .safetensors file.")],
    arch: ArchOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    force: ForceOpt = False,
) -> None:
    """Write the encoder plus metadata to a pickle-free .safetensors file."""
    from featviz import checkpoints

    with _user_errors():
        path = checkpoints.convert_checkpoint(
            checkpoint, output, force=force, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint)
        )
    typer.echo(str(path))


@app.command()
def layers(
    arch: ArchOpt = None,
    checkpoint: CheckpointOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size", callback=image_size_value, help="Dummy input size, N or HxW (default: the model's)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List named modules with their output shapes and (C×H×W) maps: the names that cam and embed accept.

    The map column is what `embed --pixels`, `cam` and `collapse --pixels` get from a layer ("-": it has no
    spatial map); ViT tokens become the patch grid of --image-size.
    """
    from featviz.features import input_size, list_layers
    from featviz.loader import load_model

    with _user_errors():
        model, desc = load_model(checkpoint, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint))
        hw = input_size(model, image_size)
        rows = list_layers(model, image_size=hw)
    if as_json:
        _echo_json(
            {
                "model": desc.to_dict(),
                "image_size": list(hw),
                "warnings": list(desc.warnings),
                "layers": [r._asdict() for r in rows],
            }
        )
        return
    from rich.table import Table

    table = Table("layer", "type", "output shape", "map", "params", box=None, title=f"{desc.name} at {hw[0]}x{hw[1]}")
    for r in rows:
        table.add_row(
            r.name,
            r.type,
            "×".join(map(str, r.shape)) if r.shape else "-",
            "×".join(map(str, r.map)) if r.map else "-",
            f"{r.params:,}",
        )
    out.print(table)
