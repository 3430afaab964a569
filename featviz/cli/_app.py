"""The Typer app, its consoles and the error funnel that every command module shares.

Module-level imports stay torch-free (typer, rich, stdlib, featviz's light modules), so
``featviz --help`` is fast; each command imports the library module it needs inside its body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from featviz import __version__
from featviz.errors import FeatvizError

app = typer.Typer(
    name="featviz",
    help="Visualize and diagnose the features that self-supervised vision models learn.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
out = Console()  # results
err = Console(stderr=True)  # progress, logs, errors


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a FeatvizError into one red line on stderr and exit code 1."""
    try:
        yield
    except FeatvizError as e:
        msg = str(e).replace("[", r"\[")
        err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None


def _echo_json(obj: Any) -> None:
    from featviz.outputs import to_jsonable

    typer.echo(json.dumps(to_jsonable(obj), indent=2))


def _progress(description: str):
    """A rich progress wrapper for library loops (the library itself has no rich dependency)."""

    def wrap(iterable, total: int | None = None):
        from rich.progress import track

        return track(iterable, description=description, total=total, console=err, transient=True)

    return wrap


class _LineHandler(logging.Handler):
    """Each log record as one line on stderr (``warning: ...``), never wrapped, so that every warning
    of a load or a run reads as one line however narrow the terminal; ``-v`` adds the logger name."""

    _STYLE = {"WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red", "INFO": "dim", "DEBUG": "dim"}

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = " ".join(self.format(record).split())  # one line: no embedded newlines
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
            return
        where = f" [dim]({record.name})[/]" if self.verbose else ""
        style = self._STYLE.get(record.levelname, "")
        err.print(f"[{style}]{record.levelname.lower()}:[/]{where} " + msg.replace("[", r"\["),
                  soft_wrap=True, highlight=False)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"featviz {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log details to stderr.")] = False,
) -> None:
    """Visualize and diagnose the features that self-supervised vision models learn."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[_LineHandler(verbose)],
        force=True,
    )
    # featviz's warnings (fallbacks, assumptions) always reach stderr; its info/debug notes need -v


def _usage(message: str) -> typer.BadParameter:
    """A usage mistake: typer prints it with the usage line and exits 2."""
    return typer.BadParameter(message)


def _checkpoint_name(path: Path) -> str:
    """A checkpoint's display name: its file name without checkpoint suffixes (``x.pth.tar`` -> ``x``)."""
    name = path.name
    while True:
        stem, dot, ext = name.rpartition(".")
        if not dot or ext.lower() not in ("tar", "pth", "pt", "ckpt", "safetensors", "bin", "pkl"):
            return name
        name = stem


def main() -> None:
    """Console-script entry point (also ``python -m featviz`` and ``torchrun -m featviz``)."""
    app(prog_name="featviz")
