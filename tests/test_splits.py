"""featviz.eval.splits and run_knn inputs: npz files, folders through a model, one stratified set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featviz.errors import DataError, FeatvizError, OutputExistsError
from featviz.eval.knn import run_knn, weighted_knn
from featviz.eval.splits import load_splits
from featviz.io.artifacts import Embeddings


@pytest.fixture(scope="module")
def photo_split(tmp_path_factory):
    """sample_data/photos as train (images 0-2 of each class) and val (image 3) folders of links."""
    from pathlib import Path

    photos = Path(__file__).resolve().parents[1] / "sample_data" / "photos"
    root = tmp_path_factory.mktemp("photo_split")
    for cls in sorted(p.name for p in photos.iterdir()):
        for f in sorted((photos / cls).iterdir()):
            side = "val" if f.stem.endswith("_3") else "train"
            (root / side / cls).mkdir(parents=True, exist_ok=True)
            (root / side / cls / f.name).symlink_to(f)
    return root


def test_checkpoint_and_folders_embed_in_eval_mode(photo_split, sample_dir):
    ckpt = sample_dir / "checkpoints" / "moco_v2_tiny.pth.tar"
    a = run_knn(
        checkpoint=ckpt,
        train_images=photo_split / "train",
        val_images=photo_split / "val",
        ks="1,3",
        batch_size=4,
    )
    b = run_knn(
        checkpoint=ckpt,
        train_images=photo_split / "train",
        val_images=photo_split / "val",
        ks="1,3",
        batch_size=1,
    )
    assert a["knn"] == b["knn"]  # eval-mode BatchNorm: a feature does not depend on its batch
    assert a["n_train"] == 15 and a["n_val"] == 5 and a["num_classes"] == 5
    assert "eval mode" in a["protocol"]["batchnorm"] and a["protocol"]["mode"] == "eval"
    assert a["model"]["source"]["format"] and a["protocol"]["checkpoint"].endswith(
        "moco_v2_tiny.pth.tar"
    )

    from featviz.data.images import labelled_images
    from featviz.eval.embed import embed_images
    from featviz.models.loader import load_model

    model, _ = load_model(ckpt)
    tr, va = labelled_images(photo_split / "train"), labelled_images(photo_split / "val")
    ftr, fva = embed_images(model, tr.items).features, embed_images(model, va.items).features
    want = weighted_knn(ftr, tr.labels, fva, va.labels, ks=(1, 3))
    assert [r["top1"] for r in a["knn"]] == [s.top1 for s in want]


def test_val_classes_are_matched_by_name(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 5
    ytr = np.repeat([0, 1, 2], 20)
    xtr = centres[ytr] + rng.standard_normal((60, 8))
    Embeddings(xtr, ytr, ["a", "b", "c"]).save(tmp_path / "tr" / "e.npz")
    yva = np.repeat([0, 1], 10)  # the val folder had only classes a and c: numbered 0 and 1
    xva = centres[[0, 2]][yva] + rng.standard_normal((20, 8))
    Embeddings(xva, yva, ["a", "c"]).save(tmp_path / "va" / "e.npz")
    s = load_splits(train=tmp_path / "tr" / "e.npz", val=tmp_path / "va" / "e.npz")
    assert s.class_names == ["a", "b", "c"] and list(np.unique(s.val.labels)) == [0, 2]
    assert (
        run_knn(train=tmp_path / "tr" / "e.npz", val=tmp_path / "va" / "e.npz", ks=[5])["knn"][0][
            "top1"
        ]
        == 1.0
    )


def test_out_json_is_written_once(tmp_path):
    out = tmp_path / "knn.json"
    r = run_knn(images="digits", ks=[20], out=out)
    saved = json.loads(out.read_text())
    assert saved["knn"] == r["knn"] and saved["manifest"]["command"] == "knn"
    with pytest.raises(OutputExistsError):
        run_knn(images="digits", ks=[20], out=out)
    with pytest.raises(DataError, match=r"\.json"):
        run_knn(images="digits", out=tmp_path / "knn.txt")


def test_digits_split_is_fixed_and_stratified():
    a, b = load_splits(images="digits"), load_splits(images="digits")
    assert a.train.ids == b.train.ids and len(a.val) == 360 and a.dim == 64
    counts = np.bincount(a.val.labels)
    assert counts.min() >= 35 and counts.max() <= 37  # every class ~20 %
    assert not set(a.train.ids) & set(a.val.ids)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "none was given"),
        ({"train": "a.npz"}, "--val is missing"),
        ({"train": "a.npz", "val": "b.npz", "images": "digits"}, "got --train/--val and --images"),
        ({"train_images": "x"}, "--val-images is missing"),
        ({"train_images": "x", "val_images": "y"}, "need a model"),
        ({"images": "sample_data/photos"}, "needs a model"),
        ({"train": "missing.npz", "val": "missing.npz"}, "does not exist"),
    ],
)
def test_bad_inputs_are_one_line_errors(kwargs, match):
    with pytest.raises(FeatvizError, match=match) as e:
        load_splits(**kwargs)
    assert "\n" not in str(e.value)


def test_npz_path_imports_no_torch(tmp_path):
    import subprocess
    import sys

    for side in ("tr", "va"):
        Embeddings(np.random.default_rng(0).standard_normal((30, 4)), np.arange(30) % 3).save(tmp_path / side / "e.npz")
    script = (
        "import sys\n"
        "from featviz.eval.knn import run_knn\n"
        f"r = run_knn(train={str(tmp_path / 'tr' / 'e.npz')!r}, val={str(tmp_path / 'va' / 'e.npz')!r}, ks=[3])\n"
        "heavy = [m for m in ('torch', 'torchvision', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(r['knn'][0]['top1'])\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) == 1.0  # every val row is also a train row
