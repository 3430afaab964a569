"""Property-based tests: every parser of outside data gives a result or a FeatvizError, never another exception.

Hypothesis drives the parsers of checkpoint metadata, ``.npz``/``.npy`` headers, ``metrics.jsonl`` lines and the
``--image-size`` / ``--k`` / ``--hparam`` strings with generated (and hostile) inputs. Runs are derandomized, so CI
sees the same examples every time.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featviz.errors import FeatvizError

FAST = settings(max_examples=60, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

json_scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _result_or_featviz_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except FeatvizError as e:
        assert str(e) and "\n" not in str(e), repr(e)
        return e


# ------------------------------------------------------------------ checkpoint metadata
META_KEYS = ["version", "arch", "normalization", "input_size", "method", "heads", "class_names", "source_format"]
meta_objects = st.dictionaries(st.sampled_from(META_KEYS) | st.text(max_size=6), json_values, max_size=6)
arch_objects = st.fixed_dictionaries({
    "family": st.sampled_from(["resnet", "vit", "timm", "x"]) | st.text(max_size=5),
    "name": st.sampled_from(["resnet18", "resnet9999_w0", "resnet18_w0", "vit_tiny_patch16_224", "resnet50-cifar",
                             "wide_resnet50_2", ""]) | st.text(max_size=12),
})


@FAST
@given(raw=st.text(max_size=60) | meta_objects.map(json.dumps) | json_values.map(json.dumps)
       | st.builds(lambda a, s: json.dumps({"arch": a, "input_size": s}), arch_objects, json_values))
def test_checkpoint_metadata_parses_or_refuses(raw):
    from featviz.models.checkpoints.featviz_format import _meta_arch, _meta_input_size
    from featviz.models.checkpoints.reader import parse_featviz_meta

    meta = _result_or_featviz_error(parse_featviz_meta, raw, "x.safetensors")
    if isinstance(meta, dict):
        _result_or_featviz_error(_meta_arch, meta, Path("x.safetensors"))
        size = _result_or_featviz_error(_meta_input_size, meta, Path("x.safetensors"))
        if isinstance(size, tuple):
            assert all(8 <= v <= 8192 for v in size)
    else:
        assert meta is None or isinstance(meta, FeatvizError)


# ------------------------------------------------------------------ .npz / .npy headers
def _npy(header_text: bytes, body: bytes) -> bytes:
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header_text)) + header_text + body


shapes = st.lists(st.integers(-3, 10**7), max_size=3).map(tuple)
descrs = st.sampled_from(["<f4", "<f8", "<i8", "<c8", "|O", "<U3", "|b1", "V8", "<f2", "bogus", "|S2"])
headers = st.builds(lambda d, f, s: repr({"descr": d, "fortran_order": f, "shape": s}).encode(), descrs,
                    st.booleans(), shapes) | st.binary(max_size=40)


@FAST
@given(members=st.dictionaries(st.sampled_from(["features.npy", "labels.npy", "class_names.npy", "x.npy", "y.txt"]),
                               st.tuples(headers, st.binary(max_size=64)), min_size=1, max_size=3))
def test_npz_headers_parse_or_refuse(members):
    from featviz.io.artifacts import Embeddings

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "e.npz"
        with zipfile.ZipFile(path, "w") as z:
            for name, (head, body) in members.items():
                z.writestr(name, _npy(head.ljust(60) + b"\n", body))
        r = _result_or_featviz_error(Embeddings.load, path)
        if isinstance(r, Embeddings):
            assert r.features.ndim == 2 and r.features.dtype == np.float32 and len(r.labels) == r.n


@FAST
@given(head=headers, body=st.binary(max_size=64))
def test_npy_headers_parse_or_refuse(head, body):
    from featviz.collapse.metrics import load_matrix

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "e.npy"
        path.write_bytes(_npy(head.ljust(60) + b"\n", body))
        _result_or_featviz_error(load_matrix, path)


def test_npz_declared_size_is_checked_before_reading(tmp_path, monkeypatch):
    """A header of 10⁶×10⁶ float32 (4 TB) is refused from its header; NumPy never allocates it."""
    from featviz.io import artifacts

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:
        z.writestr("features.npy", buf.getvalue())
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load ran on a refused file"))
    with pytest.raises(FeatvizError, match="memory budget"):
        artifacts.read_npz(tmp_path / "bomb.npz")


# ------------------------------------------------------------------ metrics.jsonl lines
record_fields = st.sampled_from(["step", "d", "n", "n_nonfinite", "std_l2", "std_l2_ideal", "rankme", "split",
                                 "error", "event", "epoch", "knn_acc", "loss"])
records = st.dictionaries(record_fields, json_values, max_size=6)
lines = (records.map(lambda r: json.dumps(r)) | json_values.map(json.dumps) | st.text(max_size=30)
         | st.just('{"step": 1, "d": 1e400}') | st.just("[" * 3000 + "]" * 3000))


@FAST
@given(batch=st.lists(lines, max_size=6))
def test_metrics_lines_parse_or_are_skipped(batch):
    from featviz.collapse.monitor import CollapseWatcher, JsonlTail

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "metrics.jsonl"
        path.write_text("".join(line.replace("\n", " ") + "\n" for line in batch), encoding="utf-8")
        watcher = CollapseWatcher()
        for rec in JsonlTail(path).read():
            watcher.add(rec)
        for i in range(len(watcher.records)):
            watcher.trend("rankme", i)
            watcher.trend("std_l2", i)


# ------------------------------------------------------------------ option strings
@FAST
@given(value=st.text(max_size=20) | st.from_regex(r"\s*\d{1,12}\s*([x×X,]\s*\d{1,12})?\s*", fullmatch=True))
def test_image_size_parses_or_refuses(value):
    from featviz.models.features import parse_image_size

    hw = _result_or_featviz_error(parse_image_size, value)
    if isinstance(hw, tuple):
        assert all(8 <= v <= 8192 for v in hw)


@FAST
@given(value=st.text(max_size=20) | st.from_regex(r"-?\d{1,25}(,-?\d{1,25}){0,3}", fullmatch=True))
def test_k_parses_or_refuses(value):
    from featviz.errors import OptionError
    from featviz.eval.knn import parse_ks

    try:
        ks = parse_ks(value)
    except OptionError:  # a usage error: exit 2
        return
    assert ks and all(isinstance(k, int) and 1 <= k <= 1_000_000 for k in ks)


@FAST
@given(items=st.lists(st.text(max_size=16) | st.builds(lambda k, v: f"{k}={v}", st.text(max_size=6),
                                                         json_values.map(json.dumps)), max_size=4))
def test_hparam_parses_or_refuses(items):
    from featviz.cli.train import _parse_hparams
    from featviz.errors import OptionError

    try:
        out = _parse_hparams(items)
    except OptionError:
        return
    assert isinstance(out, dict) and len(out) <= len(items)
