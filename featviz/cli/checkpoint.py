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
    from featviz import checkpoints

    with _user_errors():
        _, report = checkpoints.load_backbone(
            checkpoint, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint)
        )
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
        int | None, typer.Option("--image-size", min=8, help="Dummy input size (default: the model's).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List named modules with their output shapes: the names that cam and embed accept."""
    from featviz import models

    with _user_errors():
        model, _ = models.resolve_model(
            checkpoint=checkpoint, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint)
        )
        rows = models.list_layers(model, image_size=image_size)
    if as_json:
        _echo_json([r._asdict() for r in rows])
        return
    from rich.table import Table

    table = Table("layer", "type", "output shape", "params", box=None)
    for r in rows:
        table.add_row(r.name, r.type, "×".join(map(str, r.shape)) if r.shape else "-", f"{r.params:,}")
    out.print(table)
