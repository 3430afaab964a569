"""The featviz command line: a thin Typer view over the library, one module per command.

``featviz.cli._app`` holds the app, the consoles and the error funnel; ``featviz.cli.options`` the
shared options; every other module registers its command(s). Nothing here imports torch: each
command imports the library it needs inside its body (tests/test_import_cost.py proves it).

``PANELS`` is the table of contents of ``featviz --help``: the commands grouped by what a user is
doing, in the order of a typical session. A new command must be placed there (a test checks it).
"""

from __future__ import annotations

from featviz.cli import (  # noqa: F401 - registers the commands
    attention,
    cam,
    checkpoint,
    collapse,
    compare,
    crops,
    demo,
    embed,
    knn,
    norms,
    pca,
    probe,
    similarity,
    train,
    tsne,
)
from featviz.cli._app import app, main

PANELS: dict[str, tuple[str, ...]] = {
    "Start here": ("demo", "sample-data"),
    "Checkpoints": ("inspect", "layers", "convert", "train"),
    "Features and maps": ("embed", "tsne", "pca", "similarity", "knn", "probe", "compare"),
    "Where the model looks": ("cam", "attention", "norms", "crops"),
    "Collapse": ("collapse",),
}


def _command_name(info) -> str:
    return info.name or info.callback.__name__.replace("_", "-")


def _arrange() -> None:
    """Give every registered command its panel and sort the commands into the ``PANELS`` order."""
    order = [name for names in PANELS.values() for name in names]
    panel_of = {name: panel for panel, names in PANELS.items() for name in names}
    for info in app.registered_commands:
        info.rich_help_panel = panel_of.get(_command_name(info), "Other")
    app.registered_commands.sort(key=lambda i: order.index(n) if (n := _command_name(i)) in order else len(order))


_arrange()

__all__ = ["PANELS", "app", "main"]
