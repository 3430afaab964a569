"""featviz.io.outputs: checks before work, atomic files and folders, --force that replaces only featviz's files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from featviz.errors import OutputError, OutputExistsError
from featviz.io import outputs


def _write_dir(path, files: dict[str, str], **kw):
    with outputs.atomic_dir(path, **kw) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def test_force_replaces_only_what_featviz_wrote(tmp_path):
    out = tmp_path / "o"
    _write_dir(out, {"report.json": "1", "sub/plot.png": "1", "old.png": "1"}, command="collapse")
    (out / "thesis.tex").write_text("my thesis")
    (out / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(OutputExistsError, match="--force"):
        _write_dir(out, {"report.json": "2"})
    _write_dir(out, {"report.json": "2", "sub/plot.png": "2"}, force=True, command="collapse")
    assert (out / "report.json").read_text() == "2" and (out / "sub" / "plot.png").read_text() == "2"
    assert not (out / "old.png").exists()  # featviz's own earlier file is replaced (gone)
    assert (out / "thesis.tex").read_text() == "my thesis" and (out / "sub" / "data.csv").read_text() == "1,2"
    assert outputs.read_marker(out)["files"] == ["report.json", "sub/plot.png"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != outputs.MARKER] == []


def test_folder_featviz_did_not_write_is_refused_even_with_force(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("my thesis")
    for force in (False, True):
        with pytest.raises(OutputError, match="not written by featviz") as e:
            _write_dir(out, {"report.json": "1"}, force=force)
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_a_new_file_never_lands_on_a_user_file(tmp_path):
    out = tmp_path / "o"
    _write_dir(out, {"a.png": "1"})
    (out / "b.png").write_text("the user's")
    with pytest.raises(OutputError, match="b.png"):
        _write_dir(out, {"a.png": "2", "b.png": "2"}, force=True)
    assert (out / "b.png").read_text() == "the user's" and (out / "a.png").read_text() == "1"


def test_out_dot_in_an_empty_folder(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    _write_dir(".", {"maps.npz": "1"}, command="cam")
    _write_dir(".", {"maps.npz": "2"}, force=True, command="cam")
    assert (here / "maps.npz").read_text() == "2" and outputs.read_marker(here)["command"] == "cam"
    assert sorted(p.name for p in here.iterdir()) == [outputs.MARKER, "maps.npz"]


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        outputs.check_output(tmp_path / "f" / "sub" / "e.npz")


def test_unwritable_folder_is_one_line_before_anything_is_made(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    for folder in (False, True):
        with pytest.raises(OutputError, match="is not writable") as e:
            outputs.check_output(ro / "new" / "e.npz", folder=folder)
        assert "\n" not in str(e.value)
    assert list(ro.iterdir()) == []


def test_a_write_that_fails_is_one_line(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", denied)
    with pytest.raises(OutputError, match="Permission denied"):
        outputs.write_text(tmp_path / "a.txt", "x")


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid += 1


def test_stale_temporary_files_of_the_same_output_are_removed(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".e.npz.{dead}-abc123.tmp.npz", tmp_path / ".e.el1i4bzu.tmp.npz"]  # ours, an older version's
    live = tmp_path / f".e.npz.{os.getpid()}-zzz.tmp.npz"  # a write in progress (this process)
    other = tmp_path / ".f.el1i4bzu.tmp.npz"  # another output's
    for p in [*stale, live, other]:
        p.write_bytes(b"partial")
    outputs.write_text(tmp_path / "e.npz", "x")
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()
    # and a folder output's temporary twin
    twin = tmp_path / f".cam.{dead}-q1w2e3r4.tmp"
    twin.mkdir()
    (twin / "maps.npz").write_text("partial")
    _write_dir(tmp_path / "cam", {"maps.npz": "1"})
    assert not twin.exists()


def test_manifests_are_named_after_their_output(tmp_path):
    from featviz.io.artifacts import Embeddings

    for name, d in (("a", 3), ("b", 5)):
        Embeddings(np.ones((4, d)), np.arange(4)).save(tmp_path / f"{name}.npz")
    assert json.loads((tmp_path / "a.manifest.json").read_text())["d"] == 3
    assert json.loads((tmp_path / "b.manifest.json").read_text())["d"] == 5
    assert not (tmp_path / "manifest.json").exists()
    assert outputs.read_manifest(tmp_path / "b.npz")["d"] == 5
    # the manifest.json of earlier versions is still read, when it names this output
    (tmp_path / "manifest.json").write_text(json.dumps({"output": "old.npz", "n": 7}))
    assert outputs.read_manifest(tmp_path / "old.npz")["n"] == 7
    assert outputs.read_manifest(tmp_path / "other.npz") is None


def test_embeddings_are_not_saved_over_an_existing_manifest_without_force(tmp_path):
    from featviz.io.artifacts import Embeddings

    (tmp_path / "e.manifest.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        Embeddings(np.ones((4, 3)), np.arange(4)).save(tmp_path / "e.npz")
    assert not (tmp_path / "e.npz").exists()
