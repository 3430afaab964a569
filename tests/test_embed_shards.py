"""featviz embed --shard-size: shards equal the single file, a killed run resumes bit-exactly, damaged shards are
redone, other settings are refused, torchrun ranks write their own shards, and tsne/knn/collapse read them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featviz.errors import ArtifactError, OutputExistsError
from featviz.eval import embed, stream
from featviz.io.artifacts import Embeddings
from featviz.io.shards import ShardedArray, read_manifest

ARCH = "resnet18_w16-cifar"
ROOT = Path(__file__).resolve().parents[1]
PHOTOS = dict(arch=ARCH, image_size=32, batch_size=3, device="cpu")  # 20 photos; shards of 6 = 2 whole batches
DIGITS = dict(images="digits", arch=ARCH, image_size=16, batch_size=25, limit=300, shard_size=50, device="cpu")


def _same(a: Embeddings, b: Embeddings) -> None:
    np.testing.assert_array_equal(np.asarray(a.features), np.asarray(b.features))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.class_names == b.class_names


def test_shards_equal_the_single_file_and_are_memory_mapped(tmp_path, sample_dir, one_thread):
    single = embed.run_embed(out=tmp_path / "one.npz", images=sample_dir / "photos", **PHOTOS)
    sharded = stream.run_embed_sharded(out=tmp_path / "E", images=sample_dir / "photos", shard_size=6, **PHOTOS)
    m = read_manifest(tmp_path / "E")
    assert m["complete"] and m["n_shards"] == 4 and m["n"] == 20 and m["d"] == single.d
    assert [r["rows"] for r in m["shards"]] == [6, 6, 6, 2]
    assert [r["inputs"] for r in m["shards"]] == [[0, 6], [6, 12], [12, 18], [18, 20]]
    assert m["command"] == "embed" and m["arguments"]["shard_size"] == 6 and len(m["settings_sha256"]) == 64
    loaded = Embeddings.load(tmp_path / "E")
    assert isinstance(loaded.features, ShardedArray)
    assert all(isinstance(p, np.memmap) for p in loaded.features.parts)  # mapped, not read
    _same(loaded, Embeddings.load(tmp_path / "one.npz"))
    _same(sharded, single)
    marker = json.loads((tmp_path / "E" / ".featviz-output.json").read_text())
    assert "shard-00003.features.npy" in marker["files"] and "manifest.json" in marker["sha256"]
    with pytest.raises(OutputExistsError, match="--force"):  # a finished run is not resumed: it is replaced
        stream.run_embed_sharded(out=tmp_path / "E", images=sample_dir / "photos", shard_size=6, **PHOTOS)


def test_sharded_array_reads_like_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 3)).astype(np.float32) for n in (4, 1, 6, 3)]
    ref = np.concatenate(parts)
    a = ShardedArray(parts)
    assert a.shape == (14, 3) and len(a) == 14 and a.ndim == 2 and a.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a), ref)
    idx = np.array([13, 0, 4, 5, 5, 10, 2, -1])
    for key in (3, -2, slice(None), slice(2, 11, 3), slice(None, None, -1), idx, ref[:, 0] > 0,
                (idx, 1), (slice(3, 9), slice(0, 2))):
        np.testing.assert_array_equal(a[key], ref[key], err_msg=str(key))
    with pytest.raises(IndexError):
        a[14]
    with pytest.raises(IndexError):
        a[np.array([0, 99])]


class _Interrupt(BaseException):
    """Stands for a kill (Ctrl-C, SIGTERM): nothing catches it."""


def _interrupt_after(monkeypatch, shards: int) -> None:
    """Make the embedding loop stop after ``shards`` shards (an injected failure)."""
    calls = {"n": 0}
    real = stream.embed_images

    def flaky(*args, **kw):
        if calls["n"] == shards:
            raise _Interrupt
        calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(stream, "embed_images", flaky)


def test_damaged_shards_are_redone_and_other_settings_refused(tmp_path, monkeypatch, one_thread, caplog):
    ref = stream.run_embed_sharded(out=tmp_path / "ref", **DIGITS)
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(_Interrupt):
        stream.run_embed_sharded(out=tmp_path / "E", **DIGITS)
    monkeypatch.undo()
    e = tmp_path / "E"
    m = read_manifest(e)
    assert not m["complete"] and [r["shard"] for r in m["shards"]] == [0, 1, 2, 3]
    with pytest.raises(ArtifactError, match="unfinished.*4 of 6 shards.*again"):
        Embeddings.load(e)
    with pytest.raises(OutputExistsError, match=r"other settings \(image_size \[16, 16\] → \[24, 24\]\).*--force"):
        stream.run_embed_sharded(out=e, **{**DIGITS, "image_size": 24})
    # damage three finished shards: a flipped byte, a truncated file, a lost record
    f0 = e / "shard-00000.features.npy"
    raw = bytearray(f0.read_bytes())
    raw[-1] ^= 0xFF
    f0.write_bytes(bytes(raw))
    (e / "shard-00001.labels.npy").write_bytes((e / "shard-00001.labels.npy").read_bytes()[:-40])
    (e / "shard-00002.json").unlink()
    kept = (e / "shard-00003.features.npy").stat().st_mtime_ns
    caplog.set_level("WARNING")
    out = stream.run_embed_sharded(out=e, **DIGITS)  # the same command again: no --force needed
    text = caplog.text
    assert "shard 0" in text and "damaged or partial" in text and "shard 1" in text and "shard 2" in text
    assert "resuming" in text and "1 of 6 shards already written, 5 left" in text
    assert (e / "shard-00003.features.npy").stat().st_mtime_ns == kept  # the intact shard was not redone
    _same(out, ref)
    _same(Embeddings.load(e), ref)
    # a damaged file in a finished folder is said when it is read
    (e / "shard-00004.features.npy").write_bytes((e / "shard-00004.features.npy").read_bytes()[:500])
    with pytest.raises(ArtifactError, match="shard-00004.features.npy is damaged or partial"):
        Embeddings.load(e)


def test_a_killed_embed_resumes_bit_exactly(tmp_path, cli, one_thread):
    """SIGKILL the real command after two shards; running it again finishes it, equal to an uninterrupted run."""
    e = tmp_path / "E"
    args = ["embed", "--images", "digits", "--arch", ARCH, "--image-size", "32", "--batch-size", "25", "--limit",
            "300", "--shard-size", "25", "--device", "cpu", "--out", str(e)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "featviz", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 150
    while len((read_manifest(e) or {}).get("shards", [])) < 2:  # the manifest lists two finished shards
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    m = read_manifest(e)
    done = [r["shard"] for r in m["shards"]]
    assert not m["complete"] and 2 <= len(done) < 12, done
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert f"resuming {e}: " in res.output and "12 shards" in res.output
    ref = stream.run_embed_sharded(out=tmp_path / "ref", images="digits", arch=ARCH, image_size=32, batch_size=25,
                                   limit=300, shard_size=25, device="cpu")
    _same(Embeddings.load(e), ref)
    assert read_manifest(e)["complete"]


def test_tsne_knn_collapse_read_the_shards(tmp_path, cli, sample_dir, one_thread, monkeypatch):
    single = tmp_path / "one.npz"
    embed.run_embed(out=single, images=sample_dir / "photos", **PHOTOS)
    stream.run_embed_sharded(out=tmp_path / "E", images=sample_dir / "photos", shard_size=6, **PHOTOS)
    scores = []
    for src in (single, tmp_path / "E"):
        res = cli("knn", "--train", src, "--val", src, "--k", "3", "--json")
        assert res.exit_code == 0, res.output
        scores.append(json.loads(res.stdout[res.stdout.index("{"):])["knn"])
    assert scores[0] == scores[1]
    reports = []
    for src in (single, tmp_path / "E"):
        res = cli("collapse", src, "--json")
        assert res.exit_code == 0, res.output
        reports.append(json.loads(res.stdout[res.stdout.index("{"):]))
    keys = ("n", "d", "std_l2", "uniformity", "rankme", "effective_rank", "alpha_req")
    assert [reports[0][k] for k in keys] == [reports[1][k] for k in keys]
    # t-SNE on a sample reads only the sampled rows of the shards: materialising them all would fail here
    monkeypatch.setattr(ShardedArray, "__array__", lambda *a, **k: pytest.fail("read every row"))
    coords = []
    for i, src in enumerate((single, tmp_path / "E")):
        res = cli("tsne", src, "--out", tmp_path / f"m{i}.png", "--coords", tmp_path / f"c{i}.npz", "--sample", "12",
                  "--iterations", "30")
        assert res.exit_code == 0, res.output
        with np.load(tmp_path / f"c{i}.npz") as z:
            coords.append(z["coords"])
    np.testing.assert_allclose(coords[0], coords[1], rtol=1e-5, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_write_their_shards(tmp_path, sample_dir, one_thread):
    """2 CPU processes on gloo: each writes its shards, rank 0's manifest merges them; equal to one process."""
    args = ["embed", "--arch", ARCH, "--images", str(sample_dir / "photos"), "--image-size", "32", "--batch-size", "2",
            "--shard-size", "4", "--device", "cpu", "--out", str(tmp_path / "E")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "featviz", *args], capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_manifest(tmp_path / "E")
    assert m["complete"] and m["world_size"] == 2 and m["n_shards"] == 5
    assert [r["rank"] for r in m["shards"]] == [0, 0, 0, 1, 1]  # rank 1's shards are in rank 0's manifest
    single = stream.run_embed_sharded(out=tmp_path / "one", images=sample_dir / "photos", arch=ARCH, image_size=32,
                                      batch_size=2, shard_size=4, device="cpu")
    merged = Embeddings.load(tmp_path / "E")
    np.testing.assert_array_equal(merged.ids, single.ids)
    np.testing.assert_array_equal(merged.labels, single.labels)
    np.testing.assert_allclose(np.asarray(merged.features), np.asarray(single.features), rtol=1e-5, atol=1e-5)


def test_refusals_are_one_line_before_any_work(tmp_path, cli, sample_dir):
    from featviz.errors import DataError, OutputError

    with pytest.raises(DataError, match=r"folder of shards; give --out a folder name \(e.g. .*/e/\)"):
        stream.run_embed_sharded(out=tmp_path / "e.npz", images=sample_dir / "photos", shard_size=4, arch=ARCH)
    with pytest.raises(DataError, match="pixel embeddings .* one .npz: drop --shard-size"):
        stream.run_embed_sharded(out=tmp_path / "E", images=sample_dir / "seg", shard_size=4, arch=ARCH, pixels=True)
    res = cli("embed", "--arch", ARCH, "--images", sample_dir / "photos", "--shard-size", "4", "--tensorboard",
              tmp_path / "tb", "--out", tmp_path / "E")
    assert res.exit_code == 1 and "--tensorboard needs every row at once" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "E").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by featviz"):  # a user's folder is never written into
        stream.run_embed_sharded(out=tmp_path / "mine", images=sample_dir / "photos", shard_size=4, arch=ARCH)
