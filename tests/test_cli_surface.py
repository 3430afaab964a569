"""`featviz --help` and every `featviz CMD -h` offer exactly the options they offered before the move."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from help_snapshot import surface  # noqa: E402

SNAPSHOT = json.loads((HERE / "snapshots" / "cli_help.json").read_text())


def test_the_commands_are_the_same():
    now = surface()
    assert sorted(now) == sorted(SNAPSHOT)
    assert now[""] == SNAPSHOT[""]


@pytest.mark.parametrize("command", sorted(k for k in SNAPSHOT if k))
def test_each_command_offers_the_same_options(command):
    now = json.loads(json.dumps(surface()[command], sort_keys=True))
    assert now == SNAPSHOT[command], (
        f"featviz {command} -h changed; if on purpose, regenerate: "
        "python tests/help_snapshot.py > tests/snapshots/cli_help.json"
    )
