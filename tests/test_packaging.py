"""A plain `pip install .` carries everything featviz needs at run time: every package and the sample data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_featviz_package_is_listed():
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "featviz").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    listed = set(_setuptools()["packages"])
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


def test_sample_data_is_found_from_any_folder(tmp_path, monkeypatch):
    import featviz

    monkeypatch.chdir(tmp_path)
    root = featviz.sample_data()
    assert root.is_absolute() and (root / "photos" / "cat" / "cat_0.jpg").is_file()
    assert featviz.sample_data("checkpoints", "moco_v2_tiny.pth.tar").is_file()


def test_sample_data_cli_prints_the_path(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("sample-data", "photos")
    assert r.exit_code == 0 and Path(r.stdout.strip()).is_dir() and Path(r.stdout.strip()).name == "photos"
    r = cli("sample-data", "nope")
    assert r.exit_code == 1 and "holds:" in r.output and "photos" in r.output


@pytest.mark.slow
def test_the_wheel_carries_the_sample_data(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "No module named pip" in res.stderr:
        pytest.skip("no pip in this environment")
    assert res.returncode == 0, res.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("featviz-*.whl"))).namelist()
    for f in (ROOT / "sample_data").rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts:
            assert f"featviz/_sample_data/{f.relative_to(ROOT / 'sample_data').as_posix()}" in names, f
    assert "featviz/py.typed" in names and "featviz/cli/_app.py" in names
