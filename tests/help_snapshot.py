"""The CLI's surface as data: every command's options, their types, defaults and help (torch-free).

``python tests/help_snapshot.py > tests/snapshots/cli_help.json`` writes the snapshot that
tests/test_cli_surface.py compares with; it was first taken before the packages-by-concern move.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any


def _type_name(p: Any) -> str:
    """The option's annotation as text (typer keeps it on ``type_descriptor``), object addresses removed."""
    desc = getattr(p, "type_descriptor", None)
    text = str(getattr(desc, "annotation", None) if desc is not None else getattr(p, "type", None))
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def _param(p: Any) -> dict[str, Any]:
    kind = p.param_type_name
    entry: dict[str, Any] = {
        "kind": kind,
        "name": p.name,
        "opts": list(p.opts) + list(getattr(p, "secondary_opts", [])),
        "type": _type_name(p),
        "required": bool(p.required),
        "multiple": bool(getattr(p, "multiple", False)),
        "nargs": p.nargs,
        "is_flag": bool(getattr(p, "is_flag", False)),
        "default": repr(p.default) if not callable(p.default) else "<callable>",
        "help": getattr(p, "help", None),
        "hidden": bool(getattr(p, "hidden", False)),
    }
    return entry


def surface() -> dict[str, Any]:
    """Every command of ``featviz`` (and the group itself) as a JSON-able dict."""
    import typer

    from featviz.cli import app

    group = typer.main.get_command(app)
    out: dict[str, Any] = {"": {"help": group.help, "params": [_param(p) for p in group.params],
                                "order": list(group.list_commands(None))}}
    for name, cmd in sorted(group.commands.items()):
        out[name] = {
            "help": cmd.help,
            "short_help": cmd.short_help,
            "hidden": bool(cmd.hidden),
            "params": [_param(p) for p in cmd.params],
        }
    return out


if __name__ == "__main__":
    json.dump(surface(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
