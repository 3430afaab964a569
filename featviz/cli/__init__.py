"""The featviz command line: a thin Typer view over the library, one module per command.

``featviz.cli._app`` holds the app, the consoles and the error funnel; ``featviz.cli.options`` the
shared options; every other module registers its command(s). Nothing here imports torch: each
command imports the library it needs inside its body (tests/test_import_cost.py proves it).
"""

from __future__ import annotations

from featviz.cli import (  # noqa: F401 - registers the commands
    attention,
    cam,
    checkpoint,
    collapse,
    crops,
    demo,
    embed,
    knn,
    pca,
    probe,
    train,
    tsne,
)
from featviz.cli._app import app, main

__all__ = ["app", "main"]
