"""`featviz demo`: the end-to-end tour on the bundled data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featviz.cli._app import _progress, _user_errors, app, out
from featviz.cli.options import (
    ForceOpt,
)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (an earlier demo's is replaced).")] = Path(
        "featviz-demo"
    ),
    retrain: Annotated[
        bool, typer.Option("--retrain", help="First remake the bundled checkpoints with featviz train (minutes).")
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Run featviz end to end on the bundled sample data (offline, CPU) and write an HTML report."""
    from featviz import demo as demo_lib

    with _user_errors():
        steps = demo_lib.run_demo(out_dir, force=force, retrain_first=retrain, progress=_progress)
    for step in steps:
        out.print(
            f"\n[bold]{step.title}[/]" + (f"  [dim]({step.seconds:.0f} s)[/]" if step.seconds else ""), highlight=False
        )
        for f in step.files:
            out.print(f"  {f}", highlight=False)
        out.print(f"  [dim]on your data:[/] {step.yours}", highlight=False)
