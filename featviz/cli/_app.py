"""The Typer app, its consoles and the error funnel that every command module shares.

Module-level imports stay torch-free (typer, rich, stdlib, featviz's light modules), so
``featviz --help`` is fast; each command imports the library module it needs inside its body.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn

import typer
import typer.rich_utils
from rich.console import Console
from typer.core import TyperGroup

from featviz.errors import FeatvizError
from featviz.version import __version__

PIPE_WIDTH = 160
"""Console width when output goes to a pipe or a file: rich's default there is 80 columns, which cuts
table cells (``std_…``) and option names in ``--help``; a terminal keeps its own width, and
``COLUMNS`` always wins."""


def _width(stream: IO[str]) -> int | None:
    if os.environ.get("COLUMNS"):
        return None  # rich reads it
    try:
        if stream.isatty():
            return None
    except (AttributeError, ValueError):  # a closed or unusual stream
        pass
    return PIPE_WIDTH


# ------------------------------------------------------------------ Typer internals (the only place)
# Typer has no public setting for the two ways featviz's --help differs from Typer's own, so these two
# functions adjust Typer's internals; nothing else in featviz changes Typer (``_Group.main`` and
# ``usage_error`` only import click's exception classes and current context from ``typer._click``, which
# Typer does not re-export). What they rely on (Typer 0.29, which vendors click as ``typer._click``;
# tests/test_house.py checks that no flag shows a value type):
#
# * width: Typer draws --help on a console of its own whose width is the module global
#   ``typer.rich_utils.MAX_WIDTH`` (public only as the TERMINAL_WIDTH environment variable, read once
#   when Typer is imported). Piped help gets PIPE_WIDTH like featviz's own consoles, instead of rich's
#   80 columns that cut option names.
# * flags: Typer labels a boolean flag's value ``<bool>`` though a flag takes none (and ``--json true``
#   fails). An option's ``metavar``, when not None, replaces that label (``TyperOption.display_type_rich``);
#   ``typer.Option(metavar="")`` could set it for featviz's own flags, but not for ``-h/--help``, which
#   click makes on demand in ``Command.get_help_option(ctx)``: that method is wrapped to blank it too.


def _typer_help_width() -> None:
    """Piped ``--help`` is ``PIPE_WIDTH`` wide (a terminal keeps its width; ``COLUMNS`` wins): see above."""
    if typer.rich_utils.MAX_WIDTH is None and _width(sys.stdout):
        typer.rich_utils.MAX_WIDTH = PIPE_WIDTH


def _typer_flags_as_flags(cmd: Any) -> None:
    """``cmd``'s boolean flags, ``--help`` included, show no value type in ``--help``: see above."""

    def blank(params: list[Any]) -> None:
        for p in params:
            if getattr(p, "param_type_name", "") == "option" and getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""

    blank(cmd.params)
    make = cmd.get_help_option

    def get_help_option(ctx: Any) -> Any:
        opt = make(ctx)
        if opt is not None:
            blank([opt])
        return opt

    cmd.get_help_option = get_help_option


def _typer_finite_floats(cmd: Any) -> None:
    """``cmd`` refuses NaN and ±Inf in its float options (and float pairs) as a usage error (exit 2).

    Typer's float conversion accepts ``nan`` and ``inf``, and a range check (``min=``) passes NaN (every
    comparison with it is false), so ``--threshold nan`` would run. ``cmd.invoke`` is wrapped to check
    the parsed values first, for every command, present and future.
    """
    invoke = cmd.invoke

    def checked_invoke(ctx: Any) -> Any:
        from typer._click.exceptions import UsageError

        for p in getattr(ctx.command, "params", ()):
            v = ctx.params.get(p.name)
            values = v if isinstance(v, (list, tuple)) else (v,)
            bad = next((x for x in values if isinstance(x, float) and not math.isfinite(x)), None)
            if bad is not None:
                opt = max(getattr(p, "opts", None) or [p.name], key=len)
                raise UsageError(f"{opt} {bad}: expected a finite number", ctx)
        return invoke(ctx)

    if not getattr(invoke, "_featviz_finite", False):
        checked_invoke._featviz_finite = True  # type: ignore[attr-defined]
        cmd.invoke = checked_invoke


_typer_help_width()


class _Group(TyperGroup):
    """featviz's command group: Typer's, with flags shown as flags in every command's --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for cmd in (self, *self.commands.values()):
            _typer_flags_as_flags(cmd)
            _typer_finite_floats(cmd)

    def add_command(self, cmd: Any, name: str | None = None) -> None:
        _typer_flags_as_flags(cmd)
        _typer_finite_floats(cmd)
        super().add_command(cmd, name)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Typer's main, with every usage error said in one red line, exit code 2.

        A missing option, a bad value or an extra argument reads like featviz's own errors (Typer
        draws a box of several lines).
        """
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
        from typer.exceptions import Abort

        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as e:  # `featviz` alone: the help, as Typer shows it
            from typer import rich_utils

            rich_utils.rich_format_error(e)
            sys.exit(e.exit_code)
        except ClickException as e:
            where = getattr(getattr(e, "ctx", None), "command_path", None)
            hint = f" ({where} -h for help)" if isinstance(e, UsageError) and where else ""
            err.print("[bold red]error:[/] " + (e.format_message() + hint).replace("[", r"\["), highlight=False,
                      soft_wrap=True)
            sys.exit(e.exit_code)
        except Abort:
            err.print("Aborted!")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="featviz",
    help="Visualize and diagnose the features that self-supervised vision models learn.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
out = Console(width=_width(sys.stdout))  # results
err = Console(stderr=True, width=_width(sys.stderr))  # progress, logs, errors


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a FeatvizError into one red line on stderr and exit code 1 (2 for an ``OptionError``)."""
    from featviz.errors import OptionError

    try:
        yield
    except OptionError as e:
        usage_error(str(e))
    except FeatvizError as e:
        _error_line(str(e))
    except OSError as e:  # the last net: a full disk or a missing permission the library did not expect
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        from featviz.io.outputs import os_error_words

        _error_line(f"{e.filename or 'a file'}: {os_error_words(e)}")
    except MemoryError:
        _error_line("out of memory: the input is larger than this machine can hold; use a smaller input "
                    "(--batch-size, --image-size, fewer images) or a machine with more memory")


def _error_line(message: str) -> NoReturn:
    """One red line on stderr, exit code 1."""
    err.print("[bold red]error:[/] " + message.replace("[", r"\["), highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def usage_error(message: str) -> NoReturn:
    """A malformed option value, in one red line on stderr; exit code 2 (click's usage errors).

    The line ends with the same ``(featviz CMD -h for help)`` hint as click's own usage errors.
    """
    from typer._click.globals import get_current_context  # Typer's own click (its contexts)

    ctx = get_current_context(silent=True)
    hint = f" ({ctx.command_path} -h for help)" if ctx is not None and ctx.command_path else ""
    err.print("[bold red]error:[/] " + (message + hint).replace("[", r"\["), highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _echo_json(obj: Any) -> None:
    from featviz.io.outputs import to_jsonable

    typer.echo(json.dumps(to_jsonable(obj), indent=2))


def _progress(description: str):
    """A rich progress wrapper for library loops (the library itself has no rich dependency).

    The bar is redrawn by the loop itself (``auto_refresh=False``): no refresh or tracking threads,
    so a loop that stops with an error, and leaves its generator to the garbage collector, cannot
    deadlock with another bar's refresh thread (``rich.progress.track`` can). A library loop may name
    its own stage: ``progress(it, total=n, description="embedding train")``.
    """

    def wrap(iterable, total: int | None = None, description: str = description):
        from rich.progress import Progress

        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        bar = Progress(*Progress.get_default_columns(), console=err, transient=True, auto_refresh=False)
        with bar:
            task = bar.add_task(description, total=total)
            bar.refresh()
            for item in iterable:
                yield item
                bar.advance(task)
                bar.refresh()

    return wrap


def _image_limit(max_image_pixels: int | None) -> None:
    """Apply ``--max-image-pixels`` (Pillow's decompression-bomb limit) for this process."""
    if max_image_pixels is not None:
        from featviz.data.images import set_max_image_pixels

        set_max_image_pixels(max_image_pixels)


class _LineHandler(logging.Handler):
    """Each log record as one line on stderr (``warning: ...``), never wrapped.

    So every warning of a load or a run reads as one line however narrow the terminal; ``-v`` adds
    the logger name.
    """

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
    import warnings

    # a file name in a script the plot font lacks (猫.png) is drawn with placeholder boxes: matplotlib's
    # raw "Glyph 29483 missing from font(s) DejaVu Sans" warning, once per character and figure, says nothing
    # the user can act on
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")


def _usage(message: str) -> typer.BadParameter:
    """A usage mistake: typer prints it with the usage line and exits 2."""
    return typer.BadParameter(message)


def split_names(names: str | None, n: int, default: list[str]) -> list[str]:
    """``--names`` / ``--row-names``: one name per panel or row, comma-separated; ``default`` when not given.

    Raises:
        typer.BadParameter: not exactly ``n`` names.
    """
    if not names:
        return default
    parts = [p.strip() for p in names.split(",")]
    if len(parts) != n:
        raise _usage(
            f"--names/--row-names has {len(parts)} names for {n} panels/rows; give one per panel, comma-separated"
        )
    return parts


def _checkpoint_name(path: Path) -> str:
    """A checkpoint's display name (``featviz.io.outputs.checkpoint_display_name``)."""
    from featviz.io.outputs import checkpoint_display_name

    return checkpoint_display_name(path)


def main() -> None:
    """Console-script entry point (also ``python -m featviz`` and ``torchrun -m featviz``)."""
    app(prog_name="featviz")
