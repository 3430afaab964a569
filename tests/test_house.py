"""Issue 15 as a user meets it: outputs that never destroy data, one clear line for every bad path,
a newcomer's path that works from any folder. Each test is one reported case."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
TINY = ("--arch", "resnet18_w8-cifar", "--image-size", "32")


def _one_line(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def emb_npz(tmp_path):
    from featviz.artifacts import Embeddings

    rng = np.random.default_rng(0)
    p = tmp_path / "emb.npz"
    Embeddings(rng.normal(size=(60, 8)), np.repeat(np.arange(3), 20), ["a", "b", "c"]).save(p)
    return p


@pytest.fixture
def cats(tmp_path):
    d = tmp_path / "cats"
    d.mkdir()
    for name in ("cat_0.jpg", "cat_1.jpg"):
        shutil.copy(SAMPLE / "photos" / "cat" / name, d / name)
    return d


def _users_files(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("my thesis")
    (folder / "sub" / "data.csv").write_text("1,2")


def _still_there(folder: Path) -> None:
    assert (folder / "thesis.tex").read_text() == "my thesis"
    assert (folder / "sub" / "data.csv").read_text() == "1,2"


# ------------------------------------------------------------------ data loss and output safety
def test_collapse_force_keeps_files_featviz_did_not_write(cli, emb_npz, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    _users_files(out)
    for force in ((), ("--force",)):  # a folder featviz did not make: refused either way
        assert "not written by featviz" in _one_line(cli("collapse", emb_npz, "--out", out, *force))
    _still_there(out)
    shutil.rmtree(out)
    assert cli("collapse", emb_npz, "--out", out).exit_code == 0
    _users_files(out)  # the user adds files to featviz's folder
    r = cli("collapse", emb_npz, "--out", out, "--force")
    assert r.exit_code == 0, r.output
    _still_there(out)
    assert (out / "report.json").is_file() and (out / "spectrum.png").is_file()


def test_cam_force_keeps_files_featviz_did_not_write(cli, cats, tmp_path):
    out = tmp_path / "cam"
    out.mkdir()
    _users_files(out)
    assert "not written by featviz" in _one_line(cli("cam", cats, *TINY, "--out", out, "--force"))
    _still_there(out)
    shutil.rmtree(out)
    assert cli("cam", cats, *TINY, "--out", out).exit_code == 0
    _users_files(out)
    (out / "overlays" / "notes.txt").write_text("mine")
    r = cli("cam", cats, *TINY, "--out", out, "--force", "--method", "eigencam")
    assert r.exit_code == 0, r.output
    _still_there(out)
    assert (out / "overlays" / "notes.txt").read_text() == "mine"
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["cat_0.eigencam.png", "cat_1.eigencam.png", "notes.txt"]  # the gradcam ones were featviz's


def test_two_embeds_in_one_folder_keep_their_own_manifests(cli, tmp_path, sample_dir):
    for name, size in (("a", "16"), ("b", "24")):
        r = cli("embed", "--arch", "resnet18_w8-cifar", "--images", sample_dir / "photos" / "cat", "--image-size", size,
                "--out", tmp_path / f"{name}.npz")
        assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "a.manifest.json").read_text())
    b = json.loads((tmp_path / "b.manifest.json").read_text())
    assert (a["output"], a["image_size"], b["output"], b["image_size"]) == ("a.npz", 16, "b.npz", 24)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder that cannot be written (os.access says so, as it does for a non-root user)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    from featviz import outputs

    real = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    return ro


def _refuses_to_compute(monkeypatch):
    """Any model load means work started before the output was checked."""
    from featviz import checkpoints, models

    def boom(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(models, "resolve_model", boom)
    monkeypatch.setattr(checkpoints, "load_backbone", boom)


@pytest.mark.parametrize("command", ["embed", "tsne", "tsne-end-to-end", "cam", "collapse", "convert", "demo",
                                     "train"])
def test_read_only_output_folder_is_one_line_before_any_work(cli, read_only, emb_npz, cats, command, monkeypatch):
    ckpt = SAMPLE / "checkpoints" / "moco_v2_tiny.pth.tar"
    if command != "train":
        _refuses_to_compute(monkeypatch)
    args = {
        "embed": ["embed", *TINY, "--images", cats, "--out", read_only / "e.npz"],
        "tsne": ["tsne", emb_npz, "--out", read_only / "map.png"],
        "tsne-end-to-end": ["tsne", *TINY, "--images", cats, "--out", read_only / "map.png"],
        "cam": ["cam", cats, *TINY, "--out", read_only / "cam"],
        "collapse": ["collapse", emb_npz, "--out", read_only / "c"],
        "convert": ["convert", ckpt, read_only / "e.safetensors"],
        "demo": ["demo", "--out", read_only / "demo"],
        "train": ["train", "-m", "simsiam", "-d", "digits", "-a", "resnet18_w8-cifar", "--image-size", "16",
                  "-o", read_only / "run"],
    }[command]
    assert "is not writable" in _one_line(cli(*args))
    assert list(read_only.iterdir()) == []


def test_read_only_folder_for_a_real_unprivileged_user(emb_npz):
    """The same without a mock: a folder the user cannot write (as root: run as nobody)."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        emb = base / "emb.npz"
        shutil.copy(emb_npz, emb)
        os.chmod(emb, 0o644)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        os.chmod(ro, 0o555)
        cmd = [sys.executable, "-m", "featviz", "collapse", str(emb), "--out", str(ro / "c")]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: cannot drop privileges")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(base), "MPLCONFIGDIR": str(base)}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=base, timeout=120)
        err = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(err) == 1 and "is not writable" in err[0], res.stderr
        assert list(ro.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_out_dot_works_for_cam_and_collapse(cli, emb_npz, cats, tmp_path, monkeypatch):
    for name, args in (("c", ["collapse", emb_npz]), ("m", ["cam", cats, *TINY, "--method", "eigencam"])):
        here = tmp_path / name
        here.mkdir()
        monkeypatch.chdir(here)
        r = cli(*args, "--out", ".")
        assert r.exit_code == 0, r.output
        assert len(list(here.iterdir())) >= 3
        assert cli(*args, "--out", ".", "--force").exit_code == 0


def test_stale_partial_files_are_removed_by_the_next_good_run(cli, emb_npz, tmp_path):
    from featviz.artifacts import Embeddings

    stale = tmp_path / ".e.el1i4bzu.tmp.npz"  # what a kill during the save left (earlier versions' name)
    stale.write_bytes(b"partial")
    Embeddings.load(emb_npz).save(tmp_path / "e.npz")
    assert not stale.exists()


# ------------------------------------------------------------------ train: killed before its first epoch
def test_train_killed_before_first_epoch_gives_advice_that_works(cli, tmp_path):
    run = tmp_path / "R"
    run.mkdir()
    (run / "config.json").write_text("{}")  # what a kill before the first epoch leaves
    args = ["train", "-m", "simsiam", "-d", "digits", "-a", "resnet18_w8-cifar", "--image-size", "16", "-b", "16",
            "--limit", "40", "-e", "1", "-o", run]
    for extra in (["--resume"], []):
        line = _one_line(cli(*args, *extra))
        assert "--force" in line and "pass --resume" not in line and "without --resume" not in line
    assert cli(*args, "--force").exit_code == 0
