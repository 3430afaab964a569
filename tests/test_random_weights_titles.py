"""Every sheet made from featviz's random initialisation says so in its title; one from a checkpoint does not."""

from __future__ import annotations

import pytest

from featviz.errors import CheckpointError
from featviz.models.description import RANDOM_WEIGHTS, ModelDescription, describe, weights_caution


@pytest.fixture
def titles(monkeypatch):
    """The titles handed to the sheets (grid_sheet: pca and attention; matplotlib's suptitle: crops)."""
    from matplotlib.figure import Figure

    from featviz.views import sheets

    seen = []
    real_grid, real_suptitle = sheets.grid_sheet, Figure.suptitle

    def grid(path, cells, **kw):
        seen.append(kw.get("title", ""))
        return real_grid(path, cells, **kw)

    def suptitle(self, t, **kw):
        seen.append(t)
        return real_suptitle(self, t, **kw)

    monkeypatch.setattr(sheets, "grid_sheet", grid)
    monkeypatch.setattr(Figure, "suptitle", suptitle)
    return seen


def test_the_description_knows_random_weights(tmp_path):
    from featviz.models.checkpoints import save_featviz
    from featviz.models.loader import load_model

    random, desc = load_model(arch="vit_tiny_patch16_224", seed=0)
    assert desc.random_init and weights_caution(random) == RANDOM_WEIGHTS
    assert ModelDescription.from_dict(desc.to_dict()).random_init
    tensors = {f"backbone.{k}": v for k, v in random.state_dict().items()}
    save_featviz(tmp_path / "m.safetensors", tensors, {"arch": desc.arch.to_dict()})
    loaded, desc2 = load_model(tmp_path / "m.safetensors")  # the same numbers, read from a file
    assert not desc2.random_init and weights_caution(loaded) is None
    assert not ModelDescription(source={"format": "x"}, random_init=True).random_init  # a source wins
    assert weights_caution(object()) is None  # a foreign module: featviz does not know


def test_pca_attention_crops_and_cam_sheets_say_random_weights(tmp_path, sample_dir, titles):
    from featviz.models.loader import load_model
    from featviz.views.attention import run_attention
    from featviz.views.cam import run_cam
    from featviz.views.crops import run_crops
    from featviz.views.pca import run_pca

    img = [sample_dir / "photos" / "cat" / "cat_0.jpg"]
    model, _ = load_model(arch="vit_tiny_patch16_224", seed=0)
    run_pca(img, tmp_path / "pca", model=model, image_size=64)
    run_attention(img, tmp_path / "att", model=model, image_size=64)
    run_crops(img, tmp_path / "crops", model=model, image_size=64, pairs=1, samples=4)
    run_cam(img, tmp_path / "cam", model=model, image_size=64, methods=["gradcam"], target="self")
    assert len(titles) >= 3 and all(t.startswith(RANDOM_WEIGHTS + " · ") for t in titles), titles
    with open(tmp_path / "cam" / "manifest.json") as f:
        assert f.read()  # the cam sheet was written (its title is checked below through _sheet_title)


def test_a_trained_checkpoint_sheet_has_no_caution(tmp_path, sample_dir, titles):
    from featviz.models.loader import load_model
    from featviz.views.pca import run_pca

    model, desc = load_model(sample_dir / "checkpoints" / "vit_photos.safetensors")
    assert not describe(model).random_init
    run_pca([sample_dir / "photos" / "cat" / "cat_0.jpg"], tmp_path / "pca", model=model)
    assert titles and not any(RANDOM_WEIGHTS in t for t in titles)


def test_cam_title_leads_with_the_caution_and_keeps_the_seed():
    from featviz.models.architectures import build_backbone
    from featviz.views.cam.run import _sheet_title

    class Run:
        layers, target = ["layer4"], "self"

    title = _sheet_title(build_backbone("resnet18", seed=3), Run(), "random weights, seed 3")
    assert title.startswith(RANDOM_WEIGHTS + " · resnet18 (seed 3)"), title


def test_compare_sheet_and_page_say_random_weights(tmp_path, titles):
    """`featviz compare` titles go through the one caution rule: any model with random weights leads with it."""
    import numpy as np

    from featviz.compare import plots
    from featviz.compare.run import run_compare_files
    from featviz.io.artifacts import Embeddings

    x = np.random.default_rng(0).normal(size=(24, 6)).astype(np.float32)
    ids = [f"img{i}.png" for i in range(24)]

    def emb(name, random_init):  # as `featviz embed` records the model in the manifest
        Embeddings(x, None, ids=ids, manifest={"model": {"random_init": random_init}}).save(tmp_path / name)
        return tmp_path / name

    trained, random = emb("trained.npz", False), emb("random.npz", True)
    kw = {"names": ["trained", "random"], "measures": ["cka"], "k": 5}
    result = run_compare_files([trained, random], tmp_path / "mixed", html=True, **kw)
    assert [m["random_init"] for m in result.models] == [False, True]
    assert titles == [RANDOM_WEIGHTS + " · 2 embeddings files · 24 images"], titles
    assert RANDOM_WEIGHTS in (tmp_path / "mixed" / "compare.html").read_text(encoding="utf-8")
    titles.clear()
    run_compare_files([trained, emb("trained2.npz", False)], tmp_path / "plain", **kw)
    assert titles == ["2 embeddings files · 24 images"], titles

    class Result:  # from models: each side's description as `compare.stream.load_sides` records it
        models = [{"name": "resnet18 (random init)", "random_init": True}]
        within, n_images = True, 8

    assert plots._title(Result()) == RANDOM_WEIGHTS + " · resnet18 (random init): layer × layer · 8 images"


def test_the_moco_sample_says_its_weights_are_random_and_convert_keeps_it(tmp_path, sample_dir):
    """The bundled moco_v2_tiny holds seeded random weights; the file says so, and so does every title of it."""
    import json

    from featviz.models.checkpoints import convert_checkpoint
    from featviz.models.checkpoints.backbone import RANDOM_WEIGHTS_KEY
    from featviz.models.checkpoints.reader import parse_featviz_meta
    from featviz.models.loader import load_model
    from featviz.views.cam.run import _sheet_title

    class Run:
        layers, target = ["layer4"], "self"

    moco = sample_dir / "checkpoints" / "moco_v2_tiny.pth.tar"
    model, desc = load_model(moco)
    assert not desc.random_init and desc.random_weights and desc.source["random_weights"]  # read from a file
    assert weights_caution(model) == weights_caution(desc.to_dict()) == RANDOM_WEIGHTS
    assert _sheet_title(model, Run(), "moco_v2_tiny.pth.tar").startswith(RANDOM_WEIGHTS + " · resnet18_w8-cifar")
    converted, _ = load_model(convert_checkpoint(moco, tmp_path / "moco.safetensors"))
    assert weights_caution(converted) == RANDOM_WEIGHTS  # featviz convert keeps what the file says
    trained, _ = load_model(sample_dir / "checkpoints" / "simsiam_digits.safetensors")
    assert weights_caution(trained) is None and not describe(trained).source["random_weights"]
    with pytest.raises(CheckpointError, match=f"field '{RANDOM_WEIGHTS_KEY}' is str 'yes'; expected bool"):
        parse_featviz_meta(json.dumps({RANDOM_WEIGHTS_KEY: "yes"}), "x.safetensors")
