"""Hostile input: a corpus of bad or hostile inputs over every command, each refused (or handled) cleanly.

Every case runs one command line in process, in an empty working folder, and asserts the README's promise:

* the documented exit code (2 for a usage error, 1 for featviz's own checks, 0 where the input is handled);
* a refusal is exactly one line on stderr, never a traceback;
* nothing is created outside the command's output, and nothing of the user's (or the shared assets) changes.

The shared assets (a tiny featviz checkpoint, a torch.save checkpoint, embeddings, images, a run folder) are
built once per module; each case's ``setup`` makes its hostile file from them in the case's own folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE

# ------------------------------------------------------------------ the shared assets (once per module)
FEATVIZ_CKPT = SAMPLE / "checkpoints" / "simsiam_digits.safetensors"  # resnet18_w16-cifar, input 16
MOCO_CKPT = SAMPLE / "checkpoints" / "moco_v2_tiny.pth.tar"
RUN = SAMPLE / "runs" / "simsiam_digits"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    a = tmp_path_factory.mktemp("assets")
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (a / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(a / "imgs" / cls / f"{i}.png")
    feats = rng.normal(size=(24, 8)).astype(np.float32)
    _save_npz(a / "emb.npz", features=feats, labels=np.arange(24) % 2, class_names=np.array(["cat", "dog"]),
              ids=np.array([f"img{i}.png" for i in range(24)]), manifest=np.array("{}"))
    shutil.copy(a / "emb.npz", a / "val.npz")  # knn/probe's val: a file of its own (one file for both is warned about)
    shutil.copy(FEATVIZ_CKPT, a / "fv.safetensors")
    return a


def _save_npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _npy_bytes(header: dict, body: bytes = b"") -> bytes:
    """A .npy file with a hand-written header (so it can lie about its shape)."""
    text = repr(header).encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + body


def _zip(path: Path, members: dict[str, bytes], *, compress: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _fv_tensors():
    from safetensors.torch import load_file

    return load_file(str(FEATVIZ_CKPT))


def _fv_meta() -> dict:
    from featviz.models.checkpoints.featviz_format import featviz_metadata

    return featviz_metadata(FEATVIZ_CKPT)


def _fv_with(path: Path, raw_meta: str | None = None, tensors=None, **meta_changes) -> Path:
    """The tiny featviz checkpoint with its metadata replaced (raw text) or changed (keys)."""
    from safetensors.torch import save_file

    tensors = _fv_tensors() if tensors is None else tensors
    if raw_meta is None:
        meta = {**_fv_meta(), **meta_changes}
        raw_meta = json.dumps({k: v for k, v in meta.items() if v is not _DROP})
    save_file(tensors, str(path), metadata={"featviz": raw_meta})
    return path


_DROP = object()


# ------------------------------------------------------------------ the case table
@dataclass
class Case:
    id: str
    argv: list[str]
    setup: Callable[[Path, Path], None] | None = None  # (case folder, assets)
    code: int = 1
    match: str | None = None  # a regex the stderr line must contain (error cases) or stderr must contain
    creates: tuple[str, ...] = ()  # top-level names in the case folder the command may create
    patch: Callable | None = None  # (monkeypatch, case folder) -> None, for faults (disk full, ...)
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[Path, object], None] | None = None  # extra assertions (case folder, result)
    not_in_stderr: tuple[str, ...] = ()
    progress: str | None = None  # a regex of progress lines (not the error) an error case may print first


CASES: list[Case] = []


def case(id: str, argv: str | list[str], setup=None, **kw) -> None:
    CASES.append(Case(id, argv.split() if isinstance(argv, str) else argv, setup, **kw))


# ------------------------------------------------------------------ hostile checkpoints (built once, in assets/ck)
def _build_checkpoints(a: Path) -> None:
    import datetime

    import torch

    ck = a / "ck"
    ck.mkdir()
    _fv_with(ck / "meta_not_json.safetensors", raw_meta="{not json")
    _fv_with(ck / "meta_list.safetensors", raw_meta="[1, 2]")
    _fv_with(ck / "meta_string.safetensors", raw_meta='"just text"')
    _fv_with(ck / "arch_unknown.safetensors", arch={"family": "resnet", "name": "resnet9999_w0", "kwargs": {}})
    _fv_with(ck / "arch_not_object.safetensors", arch=["resnet18"])
    _fv_with(ck / "input_size_huge.safetensors", input_size=10**9)
    _fv_with(ck / "input_size_negative.safetensors", input_size=-3)
    _fv_with(ck / "input_size_text.safetensors", input_size="big")
    _fv_with(ck / "normalization_bad.safetensors", normalization={"mean": "x", "std": [0]})
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in _fv_tensors().items()}
    _fv_with(ck / "nan_weights.safetensors", tensors=nan)
    data = FEATVIZ_CKPT.read_bytes()
    (ck / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    header_lie = bytearray(data)
    header_lie[:8] = struct.pack("<Q", len(data) - 9)  # header length past its end
    (ck / "header_lie.safetensors").write_bytes(bytes(header_lie))
    moco = MOCO_CKPT.read_bytes()
    (ck / "truncated.pth").write_bytes(moco[: len(moco) // 3])
    (ck / "empty.pth").write_bytes(b"")
    (ck / "text.pth").write_text("these are not weights\n")
    (ck / "page.pth").write_text("<!DOCTYPE html><html><body>404</body></html>")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "when": datetime.date(2020, 1, 1)}, ck / "unsafe.pth")
    torch.save({"epoch": 3}, ck / "no_weights.pth")
    (ck / "folder.pth").mkdir()


CK_VARIANTS = {  # name -> (file, exit code, what the one line must say)
    "meta_not_json": ("meta_not_json.safetensors", 1, r"featviz.*metadata.*not valid JSON"),
    "meta_list": ("meta_list.safetensors", 1, r"featviz.*metadata.*JSON object"),
    "meta_string": ("meta_string.safetensors", 1, r"featviz.*metadata.*JSON object"),
    "arch_unknown": ("arch_unknown.safetensors", 1, r"resnet9999_w0"),
    "arch_not_object": ("arch_not_object.safetensors", 1, r"metadata.*arch"),
    "input_size_huge": ("input_size_huge.safetensors", 1, r"checkpoint.*input_size"),
    "input_size_negative": ("input_size_negative.safetensors", 1, r"checkpoint.*input_size"),
    "input_size_text": ("input_size_text.safetensors", 1, r"checkpoint.*input_size"),
    "normalization_bad": ("normalization_bad.safetensors", 1, r"normali[sz]ation"),
}
CK_FILE_VARIANTS = {
    "truncated_st": ("truncated.safetensors", 1, r"damaged|truncated|corrupt"),
    "header_lie": ("header_lie.safetensors", 1, r"damaged|truncated|corrupt|not a recognised"),
    "truncated_pth": ("truncated.pth", 1, r"truncated|corrupt"),
    "empty": ("empty.pth", 1, r"empty"),
    "text": ("text.pth", 1, r"text file"),
    "page": ("page.pth", 1, r"web page"),
    "unsafe_pickle": ("unsafe.pth", 1, r"allow-list.*datetime"),
    "folder": ("folder.pth", 1, r"folder"),
}
IMGS = "{a}/imgs"
CK_COMMANDS = {  # command -> argv with {ck}; outputs go to the case folder (the working folder)
    "inspect": "inspect {ck}",
    "layers": "layers -c {ck}",
    "convert": "convert {ck} out.safetensors",
    "embed": f"embed -c {{ck}} -i {IMGS} -o e.npz",
    "pca": f"pca {IMGS} -c {{ck}} -o out",
    "cam": f"cam {IMGS} -c {{ck}} -o out",
    "crops": f"crops {IMGS} -c {{ck}} -o out",
    "attention": f"attention {IMGS} -c {{ck}} -o out",
    "collapse": f"collapse -c {{ck}} -i {IMGS} -o out",
    "knn": f"knn -c {{ck}} -i {IMGS}",
    "probe": f"probe -c {{ck}} -i {IMGS}",
    "tsne": f"tsne -c {{ck}} -i {IMGS} -o map.png",
    "tsne_cac": "tsne --figure cac -c {ck} --image {s}/seg/JPEGImages/scene_000.jpg "
                "--mask {s}/seg/SegmentationClass/scene_000.png -o fig.png",
}
ALL_COMMANDS = ("meta_not_json", "meta_list", "arch_unknown", "input_size_huge")  # every command reads these
for _i, (_v, (_f, _code, _m)) in enumerate(CK_VARIANTS.items()):
    for _j, (_c, _argv) in enumerate(CK_COMMANDS.items()):
        if _v in ALL_COMMANDS or (_i + _j) % 3 == 0:  # the others on a rotating third of the commands
            case(f"ck-{_v}-{_c}", _argv.replace("{ck}", "{a}/ck/" + _f), code=_code, match=_m)
for _i, (_v, (_f, _code, _m)) in enumerate(CK_FILE_VARIANTS.items()):
    for _c in ("inspect", "layers", "convert", "embed", "cam")[_i % 2::2]:
        case(f"ckfile-{_v}-{_c}", CK_COMMANDS[_c].replace("{ck}", "{a}/ck/" + _f), code=_code, match=_m)
case("ck-nan-inspect-warns", "inspect {a}/ck/nan_weights.safetensors", code=0, match=r"warning:.*NaN")
case("ck-nan-embed-refused", f"embed -c {{a}}/ck/nan_weights.safetensors -i {IMGS} -o e.npz", code=1,
     match=r"NaN|Inf|non-finite")
case("ck-no-weights", "inspect {a}/ck/no_weights.pth", code=1, match=r"weights|tensors|state")


# ------------------------------------------------------------------ hostile embeddings (built once, in assets/npz)
def _good_arrays(n: int = 24, d: int = 8) -> dict:
    rng = np.random.default_rng(1)
    return {"features": rng.normal(size=(n, d)).astype(np.float32), "labels": np.arange(n) % 2,
            "class_names": np.array(["cat", "dog"])}


def _build_npz(a: Path) -> None:
    z = a / "npz"
    z.mkdir()
    g = _good_arrays()
    _save_npz(z / "complex.npz", **{**g, "features": g["features"] * (1 + 1j)})
    _save_npz(z / "str_labels.npz", features=g["features"], labels=np.array(["cat", "dog"] * 12))
    _save_npz(z / "object.npz", features=np.array([[1.0, 2.0]] * 3, dtype=object), labels=np.zeros(3))
    _save_npz(z / "str_features.npz", features=np.array([["a", "b"]] * 4), labels=np.zeros(4))
    _save_npz(z / "features_1d.npz", features=np.zeros(10, np.float32), labels=np.zeros(10))
    _save_npz(z / "features_3d.npz", features=np.zeros((4, 2, 2), np.float32), labels=np.zeros(4))
    _save_npz(z / "labels_length.npz", features=g["features"], labels=np.zeros(3))
    _save_npz(z / "labels_float_nan.npz", features=g["features"], labels=np.full(24, np.nan))
    _save_npz(z / "no_features.npz", labels=np.zeros(3))
    _save_npz(z / "zero_rows.npz", features=np.zeros((0, 8), np.float32), labels=np.zeros(0, np.int64))
    _save_npz(z / "nan_features.npz", **{**g, "features": np.full((24, 8), np.nan, np.float32)})
    _save_npz(z / "bad_manifest.npz", **g, manifest=np.array("{not json"))
    bomb = _npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    _zip(z / "header_bomb.npz", {"features.npy": bomb, "labels.npy": _npy_bytes(
        {"descr": "<i8", "fortran_order": False, "shape": (0,)})})
    (z / "header_bomb.npy").write_bytes(bomb)
    (z / "header_garbage.npz").write_bytes(b"")
    _zip(z / "header_garbage.npz", {"features.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': oops}\n"})
    _zip(z / "not_npy_member.npz", {"features.npy": b"hello world"})
    # a zip bomb: 64 MB of zeros in ~64 KB, above the 16 MB budget the cases set with FEATVIZ_MAX_ARRAY_MB
    n = 4096
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (n, n)})
    with zipfile.ZipFile(z / "zip_bomb.npz", "w", zipfile.ZIP_DEFLATED) as zz:
        with zz.open("features.npy", "w", force_zip64=True) as f:
            f.write(buf.getvalue())
            zero = bytes(1 << 20)
            for _ in range(n * n * 4 >> 20):
                f.write(zero)
    np.save(z / "complex.npy", g["features"] * 1j)
    np.save(z / "good.npy", g["features"])
    (z / "text.npz").write_text("features,labels\n1,2\n")
    good = (a / "emb.npz").read_bytes()
    (z / "truncated.npz").write_bytes(good[: len(good) // 2])
    (z / "npy_named_npz.npz").write_bytes((z / "good.npy").read_bytes())


BUDGET = {"FEATVIZ_MAX_ARRAY_MB": "16"}
NPZ_VARIANTS = {  # name -> (file, exit code per command or one code, match, env)
    "complex": ("complex.npz", 1, r"complex", {}),
    "object": ("object.npz", 1, r"object|pickle", {}),
    "str_features": ("str_features.npz", 1, r"features.*(dtype|number|text)", {}),
    "features_1d": ("features_1d.npz", 1, r"\(N, D\)", {}),
    "features_3d": ("features_3d.npz", 1, r"\(N, D\)", {}),
    "labels_length": ("labels_length.npz", 1, r"labels", {}),
    "labels_float_nan": ("labels_float_nan.npz", 1, r"labels", {}),
    "no_features": ("no_features.npz", 1, r"no 'features'", {}),
    "zero_rows": ("zero_rows.npz", 1, r"no rows|empty|0 rows|at least", {}),
    "header_bomb": ("header_bomb.npz", 1, r"memory budget", {}),
    "header_garbage": ("header_garbage.npz", 1, r"not a readable|header|corrupt|damaged", {}),
    "not_npy_member": ("not_npy_member.npz", 1, r"not a readable|header|corrupt|damaged|\.npy", {}),
    "zip_bomb": ("zip_bomb.npz", 1, r"memory budget", BUDGET),
    "text": ("text.npz", 1, r"not a NumPy", {}),
    "truncated": ("truncated.npz", 1, r"truncated|corrupt|not a readable|damaged", {}),
    "npy_named_npz": ("npy_named_npz.npz", 1, r"\.npy array", {}),
    "missing": ("missing.npz", 1, r"does not exist", {}),
    "folder": ("", 1, r"folder|does not exist|not a file", {}),
}
NPZ_COMMANDS = {
    "knn": "knn --train {x} --val {a}/val.npz",
    "knn_val": "knn --train {a}/emb.npz --val {x}",
    "probe": "probe --train {x} --val {a}/val.npz",
    "tsne": "tsne {x} -o map.png --method pca",
    "collapse": "collapse {x} -o out",
}
ALL_READERS = ("complex", "header_bomb", "zip_bomb")  # the issue's root causes: through every reader
for _i, (_v, (_f, _code, _m, _env)) in enumerate(NPZ_VARIANTS.items()):
    for _j, (_c, _argv) in enumerate(NPZ_COMMANDS.items()):
        if _v not in ALL_READERS and (_i + _j) % 2:
            continue  # the others through every second reader
        if _v == "labels_float_nan" and _c in ("tsne", "collapse"):
            continue  # labels are not read there
        if _v in ("labels_length",) and _c == "collapse":
            continue
        case(f"npz-{_v}-{_c}", _argv.replace("{x}", "{a}/npz/" + _f), code=_code, match=_m, env=_env)
case("npz-str-labels-knn", "knn --train {a}/npz/str_labels.npz --val {a}/npz/str_labels.npz --k 3", code=0)
case("npz-str-labels-probe", "probe --train {a}/npz/str_labels.npz --val {a}/npz/str_labels.npz", code=0)
case("npz-str-labels-tsne-html", "tsne {a}/npz/str_labels.npz -o map.png --method pca --html map.html", code=0,
     creates=("map.png", "map.html"))
case("npz-bad-manifest-tsne", "tsne {a}/npz/bad_manifest.npz -o map.png --method pca", code=0, creates=("map.png",))
case("npz-nan-features-knn", "knn --train {a}/npz/nan_features.npz --val {a}/val.npz --k 3", code=1, match=r"NaN")
case("npz-nan-features-tsne", "tsne {a}/npz/nan_features.npz -o map.png --method pca", code=1, match=r"NaN")
case("npy-header-bomb-collapse", "collapse {a}/npz/header_bomb.npy -o out", code=1, match=r"memory budget")
case("npy-complex-collapse", "collapse {a}/npz/complex.npy -o out", code=1, match=r"complex")
case("npy-positives-bomb", "collapse {a}/emb.npz --positives {a}/npz/header_bomb.npy -o out", code=1,
     match=r"memory budget")
case("npz-positives-complex", "collapse {a}/emb.npz --positives {a}/npz/complex.npz -o out", code=1, match=r"complex")
case("npz-tsne-reference-bomb", "tsne {a}/emb.npz {a}/npz/header_bomb.npz --reference {a}/emb.npz -o map.png",
     code=1, match=r"memory budget")


# ------------------------------------------------------------------ option values: usage errors, exit 2
TINY = "-a resnet18_w8"
for _cmd, _argv in {
    "embed": f"embed {TINY} -i {IMGS} -o e.npz",
    "layers": f"layers {TINY}",
    "pca": f"pca {IMGS} {TINY} -o out",
    "cam": f"cam {IMGS} {TINY} -o out",
    "crops": f"crops {IMGS} {TINY} -o out",
    "attention": f"attention {IMGS} -a vit_tiny_patch16_224 -o out",
    "collapse": f"collapse {TINY} -i {IMGS} -o out",
    "knn": f"knn {TINY} -i {IMGS}",
    "tsne": f"tsne {TINY} -i {IMGS} -o map.png",
}.items():
    for _size, _m in (("100000", r"at most"), ("99999999999999999999", r"at most"), ("224x100000", r"at most"),
                      ("abc", r"expected N or HxW"), ("0", r"at least"))[:2 if _cmd not in ("embed", "pca") else 5]:
        case(f"opt-image-size-{_size[:12]}-{_cmd}", f"{_argv} --image-size {_size}", code=2, match=_m)
for _v in ("nan", "inf", "-inf", "NaN"):
    case(f"opt-pca-threshold-{_v}", f"pca {IMGS} {TINY} -o out --threshold {_v}", code=2, match=r"finite")
for _cmd, _argv in {
    "crops-threshold": f"crops {IMGS} {TINY} -o out --threshold nan",
    "knn-temperature": "knn --train {a}/emb.npz --val {a}/val.npz -T nan",
    "knn-val-fraction": "knn -i digits --val-fraction nan",
    "tsne-perplexity": "tsne {a}/emb.npz -o map.png --perplexity nan",
    "tsne-min-dist": "tsne {a}/emb.npz -o map.png --method umap --min-dist inf",
    "collapse-interval": "collapse --watch {t}/run --interval nan",
    "collapse-max-wait": "collapse --watch {t}/run --max-wait nan",
    "train-lr": "train -m simsiam -d digits -o run --lr nan",
    "train-iou": "tsne --figure cac --arch resnet18_w8 --iou-bound nan 1 -o fig.png",
    "probe-selection": "probe --train {a}/emb.npz --val {a}/val.npz --selection-fraction nan",
}.items():
    case(f"opt-nonfinite-{_cmd}", _argv, code=2, match=r"finite|greater than")
for _k in ("a,b", "0", "-3", "1e3", "", "10;20", "99999999999999999999999"):
    case(f"opt-knn-k-{_k or 'empty'}", ["knn", "--train", "{a}/emb.npz", "--val", "{a}/val.npz", "--k", _k], code=2,
         match=r"--k")
for _f in ("1.5", "0", "-0.2", "1"):
    case(f"opt-probe-selection-{_f}", f"probe --train {{a}}/emb.npz --val {{a}}/val.npz --selection-fraction {_f}",
         code=2, match=r"--selection-fraction", not_in_stderr=("test_size", "train_size", "should be"))
case("opt-probe-c-grid", "probe --train {a}/emb.npz --val {a}/val.npz --c-grid x,y", code=2, match=r"--c-grid")
for _h in ("noequals", "=3", "lr=NaN", "x=Infinity"):
    case(f"opt-hparam-{_h}", f"train -m simsiam -d digits -o run --hparam {_h}", code=2, match=r"--hparam")
for _r in ("10", "a,b", "100,10", "0,5"):
    case(f"opt-alpha-range-{_r}", f"collapse {{a}}/emb.npz -o out --alpha-range {_r}", code=2, match=r"--alpha-range")

# ------------------------------------------------------------------ sample-data: nothing outside the sample data
for _p in ("../../etc/passwd", "/etc/passwd", "photos/../../README.md", "..", "photos/../../../../etc"):
    case(f"sample-data-escape-{_p}", ["sample-data", *_p.split(" ")], code=1, match=r"inside the sample data")
case("sample-data-missing", "sample-data nothing-here", code=1, match=r"has no 'nothing-here'")
case("sample-data-ok", "sample-data photos", code=0)


# ------------------------------------------------------------------ collapse --watch
def _file(name: str, text: str = "hello\n"):
    def setup(t: Path, a: Path) -> None:
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_text(text)
    return setup


def _metrics(lines: list[str]):
    return _file("run/metrics.jsonl", "".join(f"{x}\n" for x in lines) + '{"event": "done"}\n')


case("watch-regular-file", "collapse --watch {t}/notes.txt -o out", _file("notes.txt"), code=1,
     match=r"is a file, not a run folder")
case("watch-metrics-file", "collapse --watch {t}/run/metrics.jsonl -o out", _metrics([]), code=1,
     match=r"is a file, not a run folder")
case("watch-missing-waits", "collapse --watch {t}/later --max-wait 0.2 --interval 0.05 -o out", code=1,
     match=r"no metrics appeared", progress=r"waiting for")
_HOSTILE_LINES = {
    "nonfinite-text": '{"step": 1, "n_nonfinite": "abc"}',
    "d-negative": '{"step": 1, "std_l2": 0.1, "d": -4}',
    "d-text": '{"step": 1, "std_l2": 0.1, "d": "x"}',
    "d-zero": '{"step": 1, "std_l2": 0.1, "d": 0}',
    "std-text": '{"step": 1, "std_l2": "low", "d": 8}',
    "rankme-text": '{"step": 1, "rankme": "high"}',
    "rankme-nan": '{"step": 1, "rankme": NaN}',
    "step-text": '{"step": "one", "rankme": 3}',
    "huge-number": '{"step": 1, "std_l2": 1e999, "d": 1e400}',
    "list-line": '[1, 2, 3]',
    "error-number": '{"step": 1, "error": 5}',
    "binary": '\x00\x01garbage',
    "deep": '[' * 5000 + ']' * 5000,
}
for _n, _line in _HOSTILE_LINES.items():
    case(f"watch-metrics-{_n}", "collapse --watch {t}/run -o out --json",
         _metrics(['{"step": 0, "std_l2": 0.3, "d": 8, "rankme": 5}', _line]), code=0, creates=("out",),
         not_in_stderr=("Traceback",))


# ------------------------------------------------------------------ train --resume on damaged run folders
RESUME = "train -m simsiam -d digits -a resnet18_w8-cifar --image-size 16 -b 16 -e 2 --limit 32 --threads 1 " \
         "-o {t}/run --resume"


def _damaged_run(damage: Callable[[Path], None]):
    def setup(t: Path, a: Path) -> None:
        shutil.copytree(a / "run", t / "run")
        damage(t / "run")
    return setup


def _truncate(name: str):
    def damage(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])
    return damage


def _write(name: str, data: bytes):
    return lambda run: (run / name).write_bytes(data)


def _foreign_state(run: Path) -> None:
    import torch

    torch.save({"hello": torch.zeros(1)}, run / "state.pt")


for _n, _dmg, _m in (
    ("config-truncated", _truncate("config.json"), r"config\.json.*(not valid JSON|damaged)"),
    ("config-list", _write("config.json", b"[1, 2]"), r"config\.json.*JSON object"),
    ("config-missing", lambda run: (run / "config.json").unlink(), r"config\.json"),
    ("config-wrong-types", _write("config.json", b'{"method": 5, "epochs": "ten"}'), r"config\.json"),
    ("state-truncated", _truncate("state.pt"), r"state\.pt.*(truncated|corrupt|damaged)"),
    ("state-foreign", _foreign_state, r"state\.pt"),
    ("state-text", _write("state.pt", b"not a state\n"), r"state\.pt"),
    ("state-empty", _write("state.pt", b""), r"state\.pt"),
):
    case(f"resume-{_n}", RESUME, _damaged_run(_dmg), code=1, match=_m)


# ------------------------------------------------------------------ --force replaces only featviz's own files
def _marked_folder(files: list[str], extra: Callable[[Path], None] | None = None, name: str = "out"):
    """A folder whose (hostile) marker lists ``files``; ``outside/precious.txt`` sits beside it."""
    def setup(t: Path, a: Path) -> None:
        out = t / name
        out.mkdir()
        (t / "outside").mkdir()
        (t / "outside" / "precious.txt").write_text("the user's thesis\n")
        (out / ".featviz-output.json").write_text(json.dumps({"featviz": "0", "command": "pca", "files": files}))
        if extra:
            extra(out)
    return setup


def _link(name: str, to: str):
    def make(out: Path) -> None:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).symlink_to(to)
    return make


PCA_WARNINGS = r"^warning: the first component"  # what pca says of a random tiny model: its own, not the error
PCA_FORCE = f"pca {IMGS} {TINY} --image-size 32 -o out --force"
case("force-marker-symlinked-folder", PCA_FORCE, _marked_folder(["link/precious.txt"], _link("link", "../outside")),
     code=0, creates=("out",))
case("force-marker-symlinked-file", PCA_FORCE, _marked_folder(["sheet.png"], _link("sheet.png",
     "../outside/precious.txt")), code=1, match=r"not written by featviz|symlink")
case("force-marker-dotdot", PCA_FORCE, _marked_folder(["../outside/precious.txt"]), code=0, creates=("out",))
case("force-marker-absolute", PCA_FORCE, _marked_folder(["{t}/outside/precious.txt"]), code=0, creates=("out",))
case("force-marker-garbage", PCA_FORCE, _file("out/.featviz-output.json", "{oops"), code=0, creates=("out",))
case("force-marker-files-not-list", PCA_FORCE, _marked_folder({"a": 1}), code=0, creates=("out",))  # type: ignore
def _changed_since(out: Path) -> None:
    """featviz wrote manifest.json (the marker has its hash); the user has edited it since."""
    (out / "manifest.json").write_text("the user's edits\n")
    marker = json.loads((out / ".featviz-output.json").read_text())
    marker["sha256"] = {"manifest.json": hashlib.sha256(b"what featviz wrote\n").hexdigest()}
    (out / ".featviz-output.json").write_text(json.dumps(marker))


case("force-marker-changed-file", PCA_FORCE, _marked_folder(["manifest.json"], _changed_since), code=1,
     match=r"changed since featviz wrote it")
case("force-marker-whole-folder-link", PCA_FORCE, lambda t, a: (
    (t / "outside").mkdir(), (t / "outside" / "precious.txt").write_text("x"),
    (t / "outside" / ".featviz-output.json").write_text('{"files": ["precious.txt"]}'),
    (t / "out").symlink_to("outside")), code=1, match=r"symlink|link")
case("force-no-marker-foreign", PCA_FORCE, _file("out/thesis.tex"), code=1, match=r"not written by featviz")
case("noforce-existing", PCA_FORCE.replace(" --force", ""), _marked_folder([]), code=1, match=r"--force")
case("embed-force-user-manifest", f"embed {TINY} -i {IMGS} -o e.npz --force", lambda t, a: (
    shutil.copy(a / "emb.npz", t / "e.npz"), (t / "e.manifest.json").write_text('{"my": "notes"}')), code=1,
    match=r"e\.manifest\.json.*not written by featviz")
case("embed-force-manifest-symlink", f"embed {TINY} -i {IMGS} -o e.npz --force", lambda t, a: (
    (t / "outside").mkdir(), (t / "outside" / "m.json").write_text('{"output": "e.npz"}'),
    (t / "e.manifest.json").symlink_to("outside/m.json")), code=1, match=r"e\.manifest\.json.*(symlink|link)")
case("embed-force-own-manifest", f"embed {TINY} -i {IMGS} --image-size 16 -o e.npz --force", lambda t, a: (
    shutil.copy(a / "emb.npz", t / "e.npz"),
    (t / "e.manifest.json").write_text('{"schema_version": 1, "command": "embed", "output": "e.npz"}')),
    code=0, creates=("e.npz", "e.manifest.json"))
case("embed-out-is-folder", f"embed {TINY} -i {IMGS} -o e.npz", _file("e.npz/x"), code=1, match=r"folder")
case("embed-out-parent-file", f"embed {TINY} -i {IMGS} -o notes.txt/e.npz", _file("notes.txt"), code=1,
     match=r"is a file")
case("embed-out-not-npz", f"embed {TINY} -i {IMGS} -o e.txt", code=1, match=r"\.npz")
case("tsne-out-exists", "tsne {a}/emb.npz -o map.png --method pca", _file("map.png"), code=1, match=r"--force")
case("tsne-coords-user-file", "tsne {a}/emb.npz -o map.png --method pca --coords c.npz", _file("c.npz"), code=1,
     match=r"--force")
case("knn-out-user-file", "knn --train {a}/emb.npz --val {a}/val.npz -o r.json", _file("r.json"), code=1,
     match=r"--force")
case("convert-out-exists", "convert {a}/fv.safetensors out.safetensors", _file("out.safetensors"), code=1,
     match=r"--force")
case("convert-out-folder", "convert {a}/fv.safetensors out.safetensors", _file("out.safetensors/x"), code=1,
     match=r"folder")
case("demo-out-file", "demo -o notes.txt", _file("notes.txt"), code=1, match=r"file")
case("demo-out-foreign", "demo -o mine --force", _file("mine/thesis.tex"), code=1, match=r"not written by featviz")
case("collapse-out-foreign", "collapse {a}/emb.npz -o mine --force", _file("mine/thesis.tex"), code=1,
     match=r"not written by featviz")
case("train-out-foreign", "train -m simsiam -d digits -o mine --force", _file("mine/thesis.tex"), code=1,
     match=r"not empty")
case("train-out-file", "train -m simsiam -d digits -o notes.txt", _file("notes.txt"), code=1, match=r"is a file")


# ------------------------------------------------------------------ images: odd files, names, skips
def _images(files: dict[str, bytes | None]):
    """A folder ``imgs`` (one class ``c``) with good PNGs (None) and the given bytes."""
    def setup(t: Path, a: Path) -> None:
        folder = t / "imgs" / "c"
        folder.mkdir(parents=True)
        good = (a / "imgs" / "cat" / "0.png").read_bytes()
        for name, data in files.items():
            (folder / name).write_bytes(good if data is None else data)
    return setup


def _png_bomb() -> bytes:
    import zlib

    w = h = 30000
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(
        b"IEND", b"")


_SKIPS = {"good1.png": None, "good2.png": None, "bad_a.png": b"not an image", "bad_b.jpg": b"\xff\xd8\xff\xe0junk",
          "bad_c.png": b""}
case("images-skipped-named", f"embed {TINY} -i {{t}}/imgs --image-size 16 -o e.npz", _images(_SKIPS), code=0,
     match=r"skipped 3.*bad_a\.png", creates=("e.npz", "e.manifest.json"), check=lambda t, r: _skips_in_manifest(t))
case("images-strict", f"embed {TINY} -i {{t}}/imgs --image-size 16 -o e.npz --strict", _images(_SKIPS), code=1,
     match=r"bad_")
case("images-all-bad", f"embed {TINY} -i {{t}}/imgs -o e.npz", _images({"a.png": b"x", "b.png": b"y"}), code=1,
     match=r"could be decoded \(a\.png, b\.png\)")
case("images-bomb", f"pca {{t}}/imgs {TINY} -o out", _images({"bomb.png": _png_bomb()}), code=1,
     match=r"decompression|pixels")
case("images-empty-folder", f"pca {{t}}/imgs {TINY} -o out", lambda t, a: (t / "imgs").mkdir(), code=1,
     match=r"no images|empty|found no")
case("images-cjk-pca", f"pca {{t}}/imgs {TINY} --image-size 64 -o out", _images({"猫の写真.png": None,
     "图像.png": None, "사진.png": None}), code=0, creates=("out",), not_in_stderr=("Glyph", "missing from", "font"))
case("images-cjk-cam", f"cam {{t}}/imgs {TINY} --image-size 64 -o out", _images({"猫.png": None}), code=0,
     creates=("out",), not_in_stderr=("Glyph", "missing from", "font"))
case("images-missing-path", f"pca {{t}}/nothere.png {TINY} -o out", code=1, match=r"does not exist|not found|no such")
case("images-labels-csv-garbage", f"embed {TINY} -i {{t}}/l.csv -o e.npz", _file("l.csv", "\x00\x01\x02,\n,,,\n"),
     code=1)
case("images-masks-missing", f"embed {TINY} -i {IMGS} --pixels --masks {{t}}/none -o e.npz", code=1,
     match=r"masks|does not exist")


def _skips_in_manifest(t: Path) -> None:
    m = json.loads((t / "e.manifest.json").read_text())
    text = json.dumps(m)
    for name in ("bad_a.png", "bad_b.jpg", "bad_c.png"):
        assert name in text, m


# ------------------------------------------------------------------ faults: a full disk, no permission, a race
def _enospc(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _disk_full_numpy(mp, t):
    mp.setattr(np, "savez", _enospc)


def _disk_full_safetensors(mp, t):
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*a, **k):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    mp.setattr(safetensors.torch, "save_file", save_file)


def _disk_full_png(mp, t):
    import matplotlib.figure
    from PIL import Image

    mp.setattr(matplotlib.figure.Figure, "savefig", _enospc)
    mp.setattr(Image.Image, "save", _enospc)


def _disk_full_json(mp, t):
    mp.setattr(Path, "write_text", _enospc)


def _no_permission(mp, t):
    import torch

    def load(f, *a, **k):
        raise PermissionError(13, "Permission denied", str(f))

    mp.setattr(torch, "load", load)


def _no_permission_open(mp, t):
    import builtins

    real = builtins.open

    def guarded(file, *a, **k):
        if str(file).endswith(("moco_v2_tiny.pth.tar", "fv.safetensors", "emb.npz", "val.npz")):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *a, **k)

    mp.setattr(builtins, "open", guarded)


def _race(mp, t):
    """Another run installs the same output folder just before this one does."""
    real = os.replace

    def replace(src, dst, *a, **k):
        s = Path(src)
        if s.name.startswith(".out.") and s.name.endswith(".tmp") and s.is_dir():
            Path(dst).mkdir(exist_ok=True)
            (Path(dst) / "winner.txt").write_text("the other run's file\n")
        return real(src, dst, *a, **k)

    mp.setattr(os, "replace", replace)


case("disk-full-embed", f"embed {TINY} -i {IMGS} --image-size 16 -o e.npz", code=1, patch=_disk_full_numpy,
     match=r"no space left|disk is full", not_in_stderr=(".tmp",))
case("disk-full-convert", "convert {a}/fv.safetensors out.safetensors", code=1, patch=_disk_full_safetensors,
     match=r"no space left|disk is full", not_in_stderr=(".tmp", "SafetensorError"))
case("disk-full-pca", f"pca {IMGS} {TINY} --image-size 32 -o out", code=1, patch=_disk_full_png,
     match=r"no space left|disk is full", not_in_stderr=(".tmp",), progress=r"^warning: the first component")
case("disk-full-knn-json", "knn --train {a}/emb.npz --val {a}/val.npz --k 3 -o r.json", code=1,
     patch=_disk_full_json, match=r"no space left|disk is full", not_in_stderr=(".tmp",))
case("permission-checkpoint", "inspect {s}/checkpoints/moco_v2_tiny.pth.tar", code=1, patch=_no_permission,
     match=r"permission denied", not_in_stderr=("corrupt", "truncated"))
case("permission-checkpoint-open", "inspect {a}/fv.safetensors", code=1, patch=_no_permission_open,
     match=r"permission denied", not_in_stderr=("corrupt", "truncated"))
case("permission-embeddings", "knn --train {a}/emb.npz --val {a}/val.npz", code=1, patch=_no_permission_open,
     match=r"permission denied", not_in_stderr=("corrupt", "not a readable"))
case("race-losing-writer", f"pca {IMGS} {TINY} --image-size 32 -o out", code=1, patch=_race,
     progress=r"^warning: the first component",
     match=r"'out'.*(at the same time|another)", not_in_stderr=(".tmp", ".out."), creates=("out",))


# ------------------------------------------------------------------ similarity, norms, compare; new cam, collapse flags
def _option_cases(prefix: str, base: str, rows) -> None:
    """One case per (name, options, exit code, match) row: ``base`` with the options appended."""
    for name, opt, code, m in rows:
        case(f"{prefix}-{name}", f"{base} {opt}", code=code, match=m, creates=("out",) if code == 0 else ())


SIM = f"similarity {IMGS} {TINY} --image-size 32 -o out"
SIMQ = f"{SIM} --patch 0,0"
_option_cases("sim", SIM, (
    ("point-nan", "--point nan,3", 2, r"--point"),
    ("point-inf", "--point inf,inf", 2, r"--point"),
    ("point-text", "--point a,b", 2, r"--point"),
    ("point-one", "--point 5", 2, r"--point"),
    ("point-huge", "--point 99999999999999999999,5", 1, r"--point.*outside the first image"),
    ("point-negative", "--point -5,3", 1, r"--point.*outside the first image"),
    ("patch-outside", "--patch 500,500", 1, r"--patch"),
    ("patch-negative", "--patch -1,0", 1, r"--patch"),
    ("patch-huge", "--patch 0,99999999999999999999", 1, r"--patch"),
    ("matches-zero", "--matches 0", 2, r"--matches"),
    ("matches-text", "--matches many", 2, r"--matches"),
    ("pair-unknown", "--matches 3 --pair x.png,y.png", 1, r"--pair.*neither an image id"),
    ("pair-same", "--matches 3 --pair 0,0", 1, r"--pair.*same image twice"),
    ("pair-out-of-range", "--matches 3 --pair 0,99", 1, r"--pair.*neither an image id"),
    ("pair-one", "--matches 3 --pair 0", 2, r"--pair"),
    ("pair-without-matches", "--patch 0,0 --pair 0,1", 2, r"--pair.*--matches"),
    ("layer-unknown", "--patch 0,0 --layer nope", 1, r"nope"),
    ("image-size-huge", "--patch 0,0 --image-size 100000", 2, r"at most"),
))
case("sim-one-image-matches", f"similarity {{a}}/imgs/cat/0.png {TINY} --image-size 32 -o out --matches 3", code=1,
     match=r"--matches.*two images")
for _v in ("meta_not_json", "arch_unknown", "input_size_huge"):
    _f, _code, _m = CK_VARIANTS[_v]
    case(f"sim-ck-{_v}", f"similarity {IMGS} -c {{a}}/ck/{_f} -o out --patch 0,0", code=_code, match=_m)
for _v in ("truncated_st", "unsafe_pickle"):
    _f, _code, _m = CK_FILE_VARIANTS[_v]
    case(f"sim-ckfile-{_v}", f"similarity {IMGS} -c {{a}}/ck/{_f} -o out --patch 0,0", code=_code, match=_m)
case("sim-ck-nan", f"similarity {IMGS} -c {{a}}/ck/nan_weights.safetensors -o out --patch 0,0", code=1,
     match=r"NaN|non-finite")
case("sim-images-all-bad", f"similarity {{t}}/imgs {TINY} -o out --patch 0,0", _images({"a.png": b"x", "b.png": b"y"}),
     code=1,
     match=r"a\.png' is not a readable image")
case("sim-images-missing", f"similarity {{t}}/nothere.png {TINY} -o out --patch 0,0", code=1, match=r"does not exist")
case("sim-out-foreign", f"{SIMQ} --force", _file("out/thesis.tex"), code=1, match=r"not written by featviz")
case("sim-out-file", SIMQ, _file("out"), code=1, match=r"file")
case("sim-force-marker-link", f"{SIMQ} --force", _marked_folder(["link/precious.txt"], _link("link", "../outside")),
     code=0, creates=("out",))
case("sim-force-marker-dotdot-html", f"{SIMQ} --force --html", _marked_folder(["../outside/precious.txt"]), code=0,
     creates=("out",))

NORMS = f"norms {IMGS} {TINY} --image-size 32 -o out"
_option_cases("norms", NORMS, (
    ("layers-unknown", "--layers nope", 1, r"nope"),
    ("layers-empty", "--layers ,", 2, r"--layers"),
    ("map-layer-unknown", "--map-layer nope", 1, r"no layer 'nope'"),
    ("threshold-nan", "--threshold nan", 2, r"finite"),
    ("threshold-inf", "--threshold inf", 2, r"finite"),
    ("threshold-negative", "--threshold -1", 2, r"--threshold"),
    ("image-size-huge", "--image-size 100000", 2, r"at most"),
    ("batch-size-zero", "--batch-size 0", 2, r"--batch-size"),
))
for _v in ("meta_list", "arch_unknown", "input_size_huge", "normalization_bad"):
    _f, _code, _m = CK_VARIANTS[_v]
    case(f"norms-ck-{_v}", f"norms {IMGS} -c {{a}}/ck/{_f} -o out", code=_code, match=_m)
for _v in ("header_lie", "page"):
    _f, _code, _m = CK_FILE_VARIANTS[_v]
    case(f"norms-ckfile-{_v}", f"norms {IMGS} -c {{a}}/fv.safetensors -c {{a}}/ck/{_f} -o out", code=_code, match=_m)
case("norms-ck-nan", f"norms {IMGS} -c {{a}}/ck/nan_weights.safetensors -o out", code=1, match=r"NaN|not finite")
case("norms-images-all-bad", f"norms {{t}}/imgs {TINY} -o out", _images({"a.png": b"x"}), code=1,
     match=r"a\.png' is not a readable image")
case("norms-images-bomb", f"norms {{t}}/imgs {TINY} -o out", _images({"bomb.png": _png_bomb()}), code=1,
     match=r"decompression|pixels")
case("norms-out-foreign", f"{NORMS} --force", _file("out/thesis.tex"), code=1, match=r"not written by featviz")
case("norms-force-marker-link", f"{NORMS} --force", _marked_folder(["link/precious.txt"], _link("link",
     "../outside")), code=0, creates=("out",))
case("norms-force-changed-file", f"{NORMS} --force", _marked_folder(["manifest.json"], _changed_since), code=1,
     match=r"changed since featviz wrote it")


def _emb_pair(**b_changes):
    """``a.npz`` (the shared embeddings) and ``b.npz``, the same with ``b_changes``."""
    def setup(t: Path, a: Path) -> None:
        shutil.copy(a / "emb.npz", t / "a.npz")
        with np.load(a / "emb.npz") as z:
            arrays = {k: z[k] for k in z.files}
        arrays.update(b_changes)
        _save_npz(t / "b.npz", **{k: v for k, v in arrays.items() if v is not _DROP})
    return setup


_F = np.random.default_rng(2).normal(size=(24, 8)).astype(np.float32)
CMP = "compare {t}/a.npz {t}/b.npz -o out"
for _n, _changes, _code, _m in (
    ("complex", {"features": _F * (1 + 1j)}, 1, r"complex"),
    ("nan", {"features": np.full((24, 8), np.nan, np.float32)}, 1, r"NaN|non-finite"),
    ("inf", {"features": np.where(np.eye(24, 8) > 0, np.inf, _F).astype(np.float32)}, 1, r"Inf|non-finite"),
    ("huge", {"features": np.full((24, 8), 3e38, np.float32)}, 0, None),
    ("str-class-names-order", {"labels": (np.arange(24) + 1) % 2, "class_names": np.array(["dog", "cat"])}, 0, None),
    ("rows-differ", {"features": _F[:20], "labels": np.arange(20) % 2,
                     "ids": np.array([f"img{i}.png" for i in range(20)])}, 1, r"same images|rows|ids"),
    ("ids-mismatch", {"ids": np.array([f"other{i}.png" for i in range(24)])}, 1, r"ids|same images"),
    ("ids-repeated", {"ids": np.array([f"img{i}.png" for i in range(23)] + ["img0.png"])}, 1, r"different images"),
    ("str-labels", {"labels": np.array(["cat", "dog"] * 12)}, 0, None),
    ("labels-differ", {"labels": (np.arange(24) + 1) % 2}, 1, r"label the same images differently"),
    ("object", {"features": np.array([[1.0, 2.0]] * 24, dtype=object)}, 1, r"object|pickle"),
    ("features-1d", {"features": np.zeros(24, np.float32)}, 1, r"\(N, D\)"),
    ("constant", {"features": np.zeros((24, 8), np.float32)}, 0, None),
):
    case(f"cmp-npz-{_n}", CMP, _emb_pair(**_changes), code=_code, match=_m, creates=("out",) if _code == 0 else (),
         env={"MPLBACKEND": "Agg"})
_REV = np.arange(23, -1, -1)


def _same_as_a(t: Path, r) -> None:
    """b.npz is a.npz with its rows reversed (ids too): matched by ids, the two are the same features."""
    assert re.search(r"cka: mean \(off-diagonal\) 1\.000", r.stdout), r.stdout


def _reversed_b(t: Path, a: Path) -> None:
    with np.load(a / "emb.npz") as z:
        arr = {k: z[k] for k in z.files}
    _emb_pair(**{k: arr[k][_REV] for k in ("features", "labels", "ids")})(t, a)


case("cmp-npz-rows-reordered", CMP, _reversed_b, code=0, creates=("out",), check=_same_as_a)
for _v in ("header_bomb", "zip_bomb", "text", "truncated", "npy_named_npz", "missing", "no_features"):
    _f, _code, _m, _env = NPZ_VARIANTS[_v]
    case(f"cmp-npz-file-{_v}", f"compare {{a}}/emb.npz {{a}}/npz/{_f} -o out", code=_code, match=_m, env=_env)
_option_cases("cmp-opt", "compare {a}/emb.npz {a}/emb.npz -o out", (
    ("measure-unknown", "--measure nope", 2, r"--measure.*nope"),
    ("measure-empty", "--measure ,", 2, r"--measure"),
    ("k-one", "--k 1", 2, r"--k"),
    ("k-huge", "--k 99999999999", 1, r"--k.*rows compared"),
    ("k-text", "--k a", 2, r"--k"),
))
case("cmp-files-and-checkpoint", "compare {a}/emb.npz {a}/emb.npz -c {a}/fv.safetensors -o out", code=2,
     match=r"not both")
CMP_CK = "compare --images {a}/imgs --image-size 16 --k 3 -o out"
for _v in ("meta_not_json", "arch_unknown", "input_size_negative"):
    _f, _code, _m = CK_VARIANTS[_v]
    case(f"cmp-ck-{_v}", f"{CMP_CK} -c {{a}}/fv.safetensors -c {{a}}/ck/{_f}", code=_code, match=_m)
for _v in ("truncated_st", "empty", "unsafe_pickle"):
    _f, _code, _m = CK_FILE_VARIANTS[_v]
    case(f"cmp-ckfile-{_v}", f"{CMP_CK} -c {{a}}/ck/{_f}", code=_code, match=_m)
case("cmp-ck-nan", f"{CMP_CK} -c {{a}}/ck/nan_weights.safetensors", code=1, match=r"NaN|non-finite")
case("cmp-random-arch-unknown", f"{CMP_CK} -c {{a}}/fv.safetensors -c random:resnet9999", code=1,
     match=r"resnet9999")
case("cmp-layers-unknown", f"{CMP_CK} {TINY} --layers nope", code=1, match=r"nope")
case("cmp-image-size-huge", f"compare --images {{a}}/imgs {TINY} --image-size 100000 -o out", code=2,
     match=r"at most")
case("cmp-images-missing", f"compare --images {{t}}/none {TINY} -o out", code=1, match=r"does not exist")
case("cmp-three-checkpoints", f"{CMP_CK} -c random -c random -c random {TINY}", code=2, match=r"--checkpoint")
case("cmp-out-foreign", "compare {a}/emb.npz {a}/emb.npz -o out --force", _file("out/thesis.tex"), code=1,
     match=r"not written by featviz")
case("cmp-out-file", "compare {a}/emb.npz {a}/emb.npz -o out", _file("out"), code=1, match=r"file")
case("cmp-force-marker-link", "compare {a}/emb.npz {a}/emb.npz -o out --force", _marked_folder(
     ["link/precious.txt"], _link("link", "../outside")), code=0, creates=("out",))

CAM = f"cam {IMGS} {TINY} --image-size 32 -o out"
_option_cases("camx", CAM, (
    ("legrad-cnn", "--method legrad", 1, r"legrad.*transformer.*use a CNN method"),
    ("gae-cnn", "--method gae", 1, r"gae.*transformer.*use a CNN method"),
    ("method-unknown", "--method nope", 1, r"unknown CAM method 'nope'"),
    ("score-unknown", "--score nope", 1, r"--score.*nope"),
    ("score-empty", "--score ,", 2, r"--score"),
    ("score-steps-zero", "--score deletion --score-steps 0", 2, r"--score-steps"),
    ("score-steps-huge", "--score deletion --score-steps 99999999999", 0, None),
    ("score-steps-text", "--score deletion --score-steps many", 2, r"--score-steps"),
))
case("camx-legrad-vit-bad-layer", f"cam {IMGS} -a vit_tiny_patch16_224 --image-size 32 -o out --method legrad "
     "--layer nope", code=1, match=r"nope")

COLL = f"collapse {TINY} -i {IMGS} --image-size 16 -o out"
_option_cases("collx", COLL, (
    ("views-one", "--views 1", 2, r"--views"),
    ("views-huge", "--views 99999999999", 2, r"--views"),
    ("views-text", "--views two", 2, r"--views"),
    ("rank-fraction-nan", "--rank-fraction nan", 2, r"--rank-fraction|finite"),
    ("rank-fraction-big", "--rank-fraction 1.5", 2, r"--rank-fraction"),
    ("rank-fraction-negative", "--rank-fraction -0.1", 2, r"--rank-fraction"),
))
case("collx-views-without-images", "collapse {a}/emb.npz -o out --views 3", code=2, match=r"--views")


# ------------------------------------------------------------------ the corpus, run
def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (links not followed) with what it is and its content's hash."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir",)
            else:
                snap[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


@pytest.fixture(scope="module")
def corpus_assets(assets, tmp_path_factory):
    _build_checkpoints(assets)
    _build_npz(assets)
    run = tmp_path_factory.mktemp("train")
    from typer.testing import CliRunner

    from featviz.cli import app

    args = RESUME.replace("{t}/run", str(run / "run")).replace(" --resume", "").replace("-e 2", "-e 1").split()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    shutil.copytree(run / "run", assets / "run")
    return assets


def _expand(arg: str, t: Path, a: Path) -> str:
    return arg.replace("{t}", str(t)).replace("{a}", str(a)).replace("{s}", str(SAMPLE))


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile(c: Case, corpus_assets, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from featviz.cli import app

    a = corpus_assets
    t = tmp_path / "case"
    t.mkdir()
    if c.setup:
        c.setup(t, a)
    if c.id.startswith("force-marker-absolute"):
        m = t / "out" / ".featviz-output.json"
        m.write_text(_expand(m.read_text(), t, a))
    before, assets_before = _snapshot(tmp_path), _snapshot(a)
    monkeypatch.chdir(t)
    for k, v in c.env.items():
        monkeypatch.setenv(k, v)
    if c.patch:
        c.patch(monkeypatch, t)
    r = CliRunner().invoke(app, [_expand(x, t, a) for x in c.argv])
    monkeypatch.undo()
    stderr = r.stderr
    assert r.exit_code == c.code, f"exit {r.exit_code}, expected {c.code}\nstderr: {stderr}\nstdout: {r.stdout[-2000:]}"
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in stderr + r.stdout
    for bad in c.not_in_stderr:
        assert bad not in stderr, stderr
    progress = c.progress or (PCA_WARNINGS if c.argv[0] == "pca" else None)
    lines = [x for x in stderr.splitlines() if x.strip() and not (progress and re.search(progress, x))]
    if c.code != 0:
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
        assert lines[0].startswith("error:"), stderr
    if c.match:
        assert re.search(c.match, stderr, re.IGNORECASE | re.DOTALL), stderr
    after = _snapshot(tmp_path)
    allowed = {f"case/{x}" for x in c.creates}

    def exempt(rel: str) -> bool:
        return any(rel == x or rel.startswith(x + "/") for x in allowed)

    new = sorted(p for p in after if p not in before and not exempt(p))
    assert not new, f"created outside the output: {new}"
    changed = sorted(p for p in before if not exempt(p) and after.get(p) != before[p])
    assert not changed, f"changed or removed: {changed}"
    assert _snapshot(a) == assets_before, "the shared assets changed"
    if c.check:
        c.check(t, r)


def test_corpus_size():
    """The issue asks for at least 150 cases over every command."""
    from featviz.cli import app

    assert len(CASES) >= 150
    commands = {(i.name or i.callback.__name__).replace("_", "-") for i in app.registered_commands}
    covered = {c.argv[0] for c in CASES}
    assert commands <= covered, commands - covered


# ------------------------------------------------------------------ the rules, one by one
def test_force_cannot_delete_outside_its_folder(tmp_path):
    """A hostile marker lists files through a link, with '..', absolute: only featviz's own file is replaced."""
    from featviz.io.outputs import atomic_dir

    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("precious.txt", "b.txt", "c.txt"):
        (outside / name).write_text("the user's\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside)
    (out / "file-link.png").symlink_to(outside / "b.txt")
    (out / "old.png").write_text("featviz's earlier output\n")
    (out / ".featviz-output.json").write_text(json.dumps({"files": [
        "link/precious.txt", "file-link.png", "../outside/b.txt", str(outside / "c.txt"), "old.png"]}))
    with atomic_dir(out, force=True, command="test") as tmp:
        (tmp / "new.png").write_text("new\n")
    assert sorted(p.name for p in outside.iterdir()) == ["b.txt", "c.txt", "precious.txt"]
    assert all((outside / n).read_text() == "the user's\n" for n in ("precious.txt", "b.txt", "c.txt"))
    assert (out / "link").is_symlink() and (out / "file-link.png").is_symlink()  # the user's links stay too
    assert not (out / "old.png").exists() and (out / "new.png").read_text() == "new\n"  # featviz's own: replaced
    marker = json.loads((out / ".featviz-output.json").read_text())
    assert marker["files"] == ["new.png"] and marker["sha256"]["new.png"] == hashlib.sha256(b"new\n").hexdigest()


def test_force_keeps_a_file_changed_since_featviz_wrote_it(tmp_path):
    from featviz.errors import OutputError
    from featviz.io.outputs import atomic_dir

    out = tmp_path / "out"
    with atomic_dir(out, command="test") as tmp:
        (tmp / "sheet.png").write_text("featviz's\n")
        (tmp / "notes.txt").write_text("featviz's\n")
    (out / "notes.txt").write_text("the user edited this\n")
    with atomic_dir(out, force=True, command="test") as tmp:  # sheet.png is featviz's and unchanged: replaced
        (tmp / "sheet.png").write_text("new\n")
    assert (out / "sheet.png").read_text() == "new\n" and (out / "notes.txt").read_text() == "the user edited this\n"
    (out / "sheet.png").write_text("the user's now\n")
    with pytest.raises(OutputError, match="changed since featviz wrote it"), atomic_dir(out, force=True) as tmp:
        (tmp / "sheet.png").write_text("newer\n")
    assert (out / "sheet.png").read_text() == "the user's now\n"


@pytest.mark.parametrize("trust", [False, True])
def test_checkpoint_is_unpickled_once(cli, assets, monkeypatch, trust):
    import torch

    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    path = MOCO_CKPT
    if trust:
        import datetime

        path = assets / "unsafe_moco.pth"
        obj = torch.load(MOCO_CKPT, weights_only=True)
        obj["when"] = datetime.date(2020, 1, 1)
        torch.save(obj, path)
        calls.clear()
    r = cli("inspect", path, *(["--trust-checkpoint"] if trust else []))
    assert r.exit_code == 0, r.output
    assert len(calls) == 1, calls
