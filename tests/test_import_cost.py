"""`featviz --help` and every `featviz <cmd> --help` import no heavy library (fresh process)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ["torch", "torchvision", "timm", "cv2", "matplotlib", "sklearn", "openTSNE",
         "pytorch_grad_cam", "safetensors", "scipy", "torchdr", "faiss"]

SCRIPT = f"""
import sys
from typer.testing import CliRunner
from featviz.cli import app
import typer.main
runner = CliRunner()
r = runner.invoke(app, ["--help"])
assert r.exit_code == 0, r.output
cmds = sorted(c.name for c in typer.main.get_command(app).commands.values())
assert cmds, "no commands registered"
for c in cmds:
    r = runner.invoke(app, [c, "--help"])
    assert r.exit_code == 0, (c, r.output)
loaded = [m for m in {HEAVY!r} if m in sys.modules]
assert not loaded, f"heavy modules imported at --help: {{loaded}}"
print(" ".join(cmds))
"""


def test_help_imports_nothing_heavy():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "inspect" in res.stdout


def test_python_dash_m_featviz_version():
    res = subprocess.run([sys.executable, "-m", "featviz", "--version"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("featviz ")
