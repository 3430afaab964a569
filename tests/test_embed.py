"""featviz embed: image and pixel embeddings, exact features, labels from masks, sampling, torchrun."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featviz.data.images import eval_transform, load_image
from featviz.eval import embed
from featviz.io.artifacts import Embeddings
from featviz.models.architectures import build_backbone
from featviz.models.features import FeatureExtractor

ARCH = "resnet18_w16-cifar"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def seg_small(tmp_path, sample_dir) -> Path:
    """A 6-image VOC-layout copy of sample_data/seg."""
    root = tmp_path / "seg"
    for sub in ("JPEGImages", "SegmentationClass"):
        (root / sub).mkdir(parents=True)
    for i in range(6):
        shutil.copy(sample_dir / "seg/JPEGImages" / f"scene_{i:03d}.jpg", root / "JPEGImages")
        shutil.copy(sample_dir / "seg/SegmentationClass" / f"scene_{i:03d}.png", root / "SegmentationClass")
    shutil.copy(sample_dir / "seg/classes.txt", root)
    return root


def test_image_embeddings_equal_a_plain_forward(tmp_path, sample_dir):
    out = tmp_path / "emb.npz"
    emb = embed.run_embed(out=out, images=sample_dir / "photos", arch=ARCH, image_size=32, batch_size=7, seed=3)
    with np.load(out, allow_pickle=False) as z:
        assert {"features", "labels", "class_names", "ids"} <= set(z.files)
        assert z["features"].dtype == np.float32 and z["labels"].dtype == np.int64
    assert (tmp_path / "emb.manifest.json").is_file()  # named after its output
    assert emb.class_names == ["astronaut", "cat", "cells", "coffee", "rocket"]
    assert list(emb.labels) == [i // 4 for i in range(20)]
    assert emb.ids[0] == "astronaut/astronaut_0.jpg"
    assert emb.manifest["seed"] == 3 and emb.manifest["checkpoint_report"] is None
    # the same numbers as a bare loop with the same seeded random weights
    model = build_backbone(ARCH, seed=3)
    tf = eval_transform(32)
    files = sorted((sample_dir / "photos").rglob("*.jpg"))
    with torch.no_grad():
        ref = model(torch.stack([tf(load_image(f)) for f in files])).numpy()
    np.testing.assert_allclose(Embeddings.load(out).features, ref, rtol=1e-4, atol=1e-5)


def test_random_init_is_seeded():
    items = [Image.new("RGB", (16, 16), (i * 40, 100, 200 - i * 30)) for i in range(3)]
    a = embed.embed_images(build_backbone(ARCH, seed=0), items, image_size=16).features
    b = embed.embed_images(build_backbone(ARCH, seed=0), items, image_size=16).features
    c = embed.embed_images(build_backbone(ARCH, seed=1), items, image_size=16).features
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_pixel_labels_come_from_the_mask(tmp_path, seg_small):
    emb = embed.run_embed(out=tmp_path / "pix.npz", images=seg_small, arch=ARCH, pixels=True, layer="layer3",
                          batch_size=4)
    assert emb.class_names == ["background", "disc", "square", "triangle"]
    assert emb.is_pixels and emb.yx.shape == (emb.n, 2)
    grid = emb.manifest["feature_grid"]
    assert grid == [45, 60]  # 240x180 px scenes, cifar stem, layer3 = stride 4
    names = sorted(p.name for p in (seg_small / "JPEGImages").iterdir())
    for i, name in enumerate(names):
        mask = np.asarray(Image.open(seg_small / "SegmentationClass" / name.replace(".jpg", ".png")))
        rows = emb.image_index == i
        y, x = emb.yx[rows].T
        np.testing.assert_array_equal(emb.labels[rows], mask[y, x])  # nearest-downsampled labels
        assert (y % 4 == 0).all() and (x % 4 == 0).all()
        kept = (mask[::4, ::4] != 255).sum()
        assert rows.sum() == kept  # every labelled cell, no ignore cell
    # the features are the layer's map at those cells
    model = build_backbone(ARCH, seed=0)
    from torchvision import transforms as T

    tf = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    img = load_image(seg_small / "JPEGImages" / names[2])
    with FeatureExtractor(model, "layer3") as dense, torch.no_grad():
        fmap = dense(tf(img)[None])[0].numpy()
    rows = np.flatnonzero(emb.image_index == 2)[:10]
    ref = fmap[:, emb.yx[rows, 0] // 4, emb.yx[rows, 1] // 4].T
    np.testing.assert_allclose(emb.features[rows], ref, rtol=1e-4, atol=1e-5)


def test_class_balanced_sampling_is_seeded_and_batch_independent(seg_small):
    kw = dict(out=None, images=seg_small, arch=ARCH, pixels=True, layer="layer4", max_pixels_per_class=12, seed=5,
              image_size=48)
    a = embed.run_embed(batch_size=1, **kw)
    b = embed.run_embed(batch_size=6, **kw)
    c = embed.run_embed(batch_size=6, **{**kw, "seed": 6})
    counts = np.bincount(a.labels, minlength=4)
    assert counts.max() == 12 and (counts <= 12).all()
    np.testing.assert_array_equal(a.yx, b.yx)
    np.testing.assert_array_equal(a.image_index, b.image_index)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(a.yx, c.yx)


def test_unknown_layer_suggests_names(seg_small):
    from featviz.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="did you mean.*layer4"):
        embed.run_embed(out=None, images=seg_small, arch=ARCH, pixels=True, layer="layr4")


def test_vit_tokens_become_a_grid():
    model = build_backbone("vit_tiny_patch16_224", seed=0)
    with FeatureExtractor(model) as dense, torch.no_grad():
        fmap = dense(torch.zeros(1, 3, 224, 224))
    assert fmap.shape == (1, 192, 14, 14)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_write_the_same_file(tmp_path, seg_small):
    """2 CPU processes on gloo shard the images; rank 0's merged file equals the single-process one."""
    args = ["embed", "--arch", ARCH, "--images", str(seg_small), "--pixels", "--layer", "layer4",
            "--max-pixels-per-class", "15", "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "featviz", *args, "--out", str(tmp_path / "dist.npz")],
        capture_output=True, text=True, env=env, timeout=180)
    assert dist.returncode == 0, dist.stderr[-3000:]
    single = embed.run_embed(out=None, images=seg_small, arch=ARCH, pixels=True, layer="layer4",
                             max_pixels_per_class=15, batch_size=2, device="cpu")
    merged = Embeddings.load(tmp_path / "dist.npz")
    assert merged.manifest["world_size"] == 2
    np.testing.assert_array_equal(merged.labels, single.labels)
    np.testing.assert_array_equal(merged.image_index, single.image_index)
    np.testing.assert_array_equal(merged.yx, single.yx)
    np.testing.assert_array_equal(merged.ids, single.ids)
    np.testing.assert_allclose(merged.features, single.features, rtol=1e-5, atol=1e-5)
    assert len(set(merged.image_index)) == 6  # both shards made it into the file


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_matches_cpu_float32(sample_dir):
    """The GPU path (autocast bf16/fp16, channels_last, pinned memory, workers) gives the CPU features."""
    kw = dict(out=None, images=sample_dir / "photos", arch=ARCH, image_size=32, batch_size=8)
    cpu = embed.run_embed(device="cpu", **kw)
    gpu = embed.run_embed(device="cuda", **kw)
    assert gpu.manifest["autocast"] in ("bfloat16", "float16") and gpu.features.dtype == np.float32
    np.testing.assert_array_equal(gpu.ids, cpu.ids)
    norms = np.linalg.norm(gpu.features, axis=1) * np.linalg.norm(cpu.features, axis=1)
    cos = (gpu.features * cpu.features).sum(1) / norms
    assert cos.min() > 0.99
