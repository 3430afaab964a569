"""`featviz demo`: the end-to-end tour on the bundled data; `featviz sample-data`: where that data is."""

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
    out.print('[dim]the commands below use S=$(featviz sample-data), the bundled sample data[/]', highlight=False)
    for step in steps:
        out.print(
            f"\n[bold]{step.title}[/]" + (f"  [dim]({step.seconds:.0f} s)[/]" if step.seconds else ""), highlight=False
        )
        for f in step.files:
            out.print(f"  {f}", highlight=False)
        out.print(f"  [dim]on your data:[/] {step.yours}", highlight=False)


@app.command("sample-data")
def sample_data(
    parts: Annotated[
        list[str] | None, typer.Argument(help="A file or folder inside it, e.g. photos or checkpoints/x.pth.")
    ] = None,
) -> None:
    """Print the path of the bundled sample data (works from any folder: S=$(featviz sample-data))."""
    from featviz.io.samples import sample_data as find

    with _user_errors():
        path = find(*(parts or []))
    typer.echo(str(path))
