"""featviz train: the loop, defaults, the kNN protocol, resume, DDP, segmentation, errors (methods: test_methods.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featviz.models.architectures import build_backbone
from featviz.models.segmenter import load_segmenter
from featviz.train import methods
from featviz.train.config import TrainConfig
from featviz.train.loop import TrainingDivergedError, train
from featviz.train.segmentation.cac import directional_contrast

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(arch="resnet18_w16-cifar", image_size=16, batch_size=16, limit=40, log_every=1, seed=0)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_cac_directional_contrast_hand_case():
    f1 = torch.tensor([[1.0, 0.0]])
    f2 = torch.tensor([[1.0, 0.0]])
    negs = torch.tensor([[0.0, 1.0]])
    kw = dict(temp=1.0, pos_thresh=0.5)
    # counterpart more confident: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    got = directional_contrast(f1, f2, torch.tensor([0.6]), torch.tensor([0.9]), torch.tensor([1]),
                               negs, torch.tensor([2]), **kw)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    # the other direction is masked out: the more confident feature does not move
    assert directional_contrast(f1, f2, torch.tensor([0.9]), torch.tensor([0.6]), torch.tensor([1]),
                                negs, torch.tensor([2]), **kw).item() == 0.0
    # a negative with the anchor's pseudo label is filtered: only the positive remains -> 0
    assert directional_contrast(f1, f2, torch.tensor([0.6]), torch.tensor([0.9]), torch.tensor([1]),
                                negs, torch.tensor([1]), **kw).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- the loop
def test_both_tasks_implement_the_whole_contract_and_the_loop_probes_for_nothing():
    """Every member of TrainTask is the task's own (none falls back to the protocol's empty body),
    and the loop asks the task directly: no getattr/hasattr on it."""
    import ast
    import inspect

    from featviz.train import loop
    from featviz.train.segmentation.task import SegTask
    from featviz.train.ssl_task import SSLTask
    from featviz.train.task import TrainTask

    members = {n for n in vars(TrainTask) if not n.startswith("_")}  # its methods and properties
    assert {"loss", "export", "evaluate", "embeddings", "n", "set_epoch"} <= members
    for cls in (SSLTask, SegTask):
        assert TrainTask in cls.__mro__
        missing = [m for m in sorted(members) if m not in vars(cls)]
        assert not missing, (cls.__name__, missing)
    probes = [n for n in ast.walk(ast.parse(inspect.getsource(loop)))
              if isinstance(n, ast.Call) and getattr(n.func, "id", None) in ("getattr", "hasattr")
              and isinstance(n.args[0], ast.Name) and n.args[0].id in ("task", "model", "spec")]
    assert probes == []


def test_held_out_evaluation_sees_a_constant_predictor_and_keeps_training_state(tmp_path):
    from featviz.collapse import alignment
    from featviz.distributed import DistInfo
    from featviz.train.ssl_task import SSLTask

    cfg = TrainConfig(method="simsiam", data="digits", out=str(tmp_path / "run"), epochs=1, **TINY)
    task = SSLTask(cfg, DistInfo())
    task.model.train()
    ev = task.evaluate(torch.device("cpu"))
    d = task.held_out_z[0].shape[1]
    assert task.model.training  # evaluate restores train mode
    assert task.held_out_z[0].shape == (8, d)  # the 8 held-out images as they are
    # alignment is Wang & Isola's: between two augmented views of each held-out image
    v1, v2 = task._held_out_views()
    assert v1.shape == v2.shape == (8, 3, 16, 16) and not torch.equal(v1, v2)
    task.model.eval()
    assert task.held_out_alignment == pytest.approx(
        alignment(task.model.monitored(v1).numpy(), task.model.monitored(v2).numpy()), rel=1e-5)
    task.model.train()
    assert ev["std_l2_predictor"] > 0.3 / d ** 0.5  # random init: spread out
    with torch.no_grad():
        task.model.predictor[-1].weight.zero_()  # p = bias: every image gets the same output
    ev = task.evaluate(torch.device("cpu"))
    assert ev["std_l2_predictor"] < 1e-6 and ev["rankme_predictor"] < 1.01
    # PreciseBN: the running statistics are exact averages over the training images, the
    # momentum is restored, and BatchNorm layers outside the exported/monitored path are untouched
    bn = task.model.projector[-1]
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 2  # 32 training images in batches of 16
    assert int(task.model.predictor[1].num_batches_tracked) == 0


def test_logged_knn_is_reproduced_from_the_checkpoint(tmp_path):
    """The kNN accuracy `featviz train` logs comes back from last.safetensors alone, through
    the public API: load_model, embed_images, the documented split, knn_accuracy."""
    from featviz.data import images as data
    from featviz.eval.embed import embed_images
    from featviz.models.checkpoints import read_featviz
    from featviz.models.loader import load_model
    from featviz.train.knn import checkpoint_knn, held_out_split, knn_accuracy

    cfg = TrainConfig(method="byol", data="digits", out=str(tmp_path / "run"), epochs=1,
                      **{**TINY, "limit": 100, "batch_size": 20})
    res = train(cfg)
    logged = res.history[-1]["knn_acc"]
    assert checkpoint_knn(res.last)["knn_acc"] == logged
    # the same by hand, as a user would
    _, meta = read_featviz(res.last)
    proto = meta["training"]["knn"]
    assert (proto["k"], proto["t"], proto["image_size"]) == (20, 0.07, 16)
    imgs = data.labelled_images("digits", image_size=16)
    labels = np.asarray(imgs.labels[:100])
    tr, va = held_out_split(labels, 0.2, 0)
    model = load_model(res.last).model
    assert not model.training  # eval mode: the checkpoint's BatchNorm statistics
    f = embed_images(model, [imgs.items[i] for i in np.concatenate([tr, va])], image_size=16, batch_size=256)
    x = torch.from_numpy(f.features)
    assert knn_accuracy(x[:len(tr)], labels[tr], x[len(tr):], labels[va], k=20, t=0.07) == logged
    # an embedding the model was not trained for gives another number (the protocol matters)
    f32 = embed_images(model, [imgs.items[i] for i in np.concatenate([tr, va])], image_size=32, batch_size=256)
    assert not np.allclose(f32.features, f.features)


def test_train_digits_writes_checkpoints_and_metrics(tmp_path):
    from featviz.models.checkpoints import load_backbone, read_featviz

    cfg = TrainConfig(method="simsiam", data="digits", out=str(tmp_path / "run"), epochs=2, **TINY)
    logs = []
    res = train(cfg, on_log=logs.append)
    run = tmp_path / "run"
    for f in ("last.safetensors", "best.safetensors", "state.pt", "config.json", "metrics.jsonl"):
        assert (run / f).exists(), f
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r.get("kind") == "epoch"]
    assert len(epochs) == 2 and lines[-1]["event"] == "done"
    for key in ("loss", "lr", "std_l2", "rankme", "alignment", "uniformity", "knn_acc", "lidar"):
        assert key in epochs[-1], key
    assert 0.0 <= epochs[-1]["knn_acc"] <= 1.0
    # LiDAR of the two views of each image, on both kinds of line (the monitors' one rule)
    assert all(r["lidar"] >= 1.0 and r["lidar_views"] == 2 for r in lines if r.get("kind") in ("step", "epoch"))
    # step lines measure training batches; epoch lines the 8 held-out images in eval mode
    assert {r["split"] for r in epochs} == {"held_out"} and epochs[-1]["n"] == 8
    assert {r["split"] for r in lines if r.get("kind") == "step"} == {"train_batch"}
    assert {r["epoch"] for r in lines if r.get("kind") == "step"} == {1, 2}  # numbered like epoch lines
    assert 0.0 <= epochs[-1]["std_l2_predictor"] <= 1.0 and epochs[-1]["rankme_predictor"] >= 1.0
    tensors, meta = read_featviz(run / "last.safetensors")
    assert meta["method"] == "simsiam" and set(meta["heads"]) == {"projector", "predictor"}
    assert {k.split(".")[0] for k in tensors} == {"backbone", "projector", "predictor"}
    model, report = load_backbone(run / "last.safetensors")  # no --arch / --format
    assert report.to_dict()["format"] == "featviz" and not report.to_dict()["missing"]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], tensors[f"backbone.{k}"]) for k in sd)
    assert res.steps == 2 * (32 // 16)  # 40 images, 8 held out for kNN, batch 16
    # the checkpoint knows the size it was trained at (16 px, not the CIFAR stem's 32): embed uses it
    from featviz.models.checkpoints import convert_checkpoint
    from featviz.models.loader import load_model

    assert load_model(run / "last.safetensors").description.input_size == (16, 16)
    convert_checkpoint(run / "last.safetensors", tmp_path / "converted.safetensors")
    assert load_model(tmp_path / "converted.safetensors").description.input_size == (16, 16)
    # config.json: the resolved settings, where each default came from, the method's own
    saved = json.loads((run / "config.json").read_text())
    assert saved["batch_size"] == 16 and saved["defaults"]["batch_size"] == "user"
    assert saved["defaults"]["optimizer"] == "method" and saved["optimizer"] == "sgd"
    assert saved["hparams_resolved"]["stop_grad"] is True and saved["knn"]["k"] == 20
    assert saved["recipe"]["globals"][0]["hflip"] == 0.0 and saved["defaults"]["hflip"] == "preset:digits"


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    base = dict(method="byol", data="digits", epochs=3, **TINY)  # momentum encoder + RNG-driven views
    train(TrainConfig(out=str(tmp_path / "full"), **base))

    calls = {"n": 0}

    def killer(it, total=None):
        calls["n"] += 1
        for i, x in enumerate(it):
            if calls["n"] == 2 and i == 1:  # mid-way through epoch 2
                raise KeyboardInterrupt
            yield x

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "cut"), **base), progress=killer)
    state = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert int(state["epoch"]) == 1  # the last good checkpoint is epoch 1
    train(TrainConfig(out=str(tmp_path / "cut"), **base), resume=True)
    a, b = _tensors(tmp_path / "full" / "last.safetensors"), _tensors(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("kind") == "step"]
    assert steps == sorted(set(steps))  # no duplicated lines after the resume


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig(method="simsiam", data="digits", out=str(tmp_path / "run"), epochs=3, **TINY)
    real = methods.SimSiam.forward
    count = {"n": 0}

    def flaky(self, views):
        count["n"] += 1
        loss = real(self, views)
        return loss * float("nan") if count["n"] > 4 else loss  # 2 steps per epoch: epoch 3 diverges

    monkeypatch.setattr(methods.SimSiam, "forward", flaky)
    with pytest.raises(TrainingDivergedError, match="last good checkpoint"):
        train(cfg)
    _, meta = __import__("featviz.models.checkpoints", fromlist=["read_featviz"]).read_featviz(
        tmp_path / "run" / "last.safetensors")
    assert meta["training"]["epoch"] == 2
    assert '"diverged"' in (tmp_path / "run" / "metrics.jsonl").read_text()


# ---------------------------------------------------------------- segmentation
@pytest.mark.parametrize("method", ["supervised_seg", "cac"])
def test_segmentation_trains_and_loads(tmp_path, sample_dir, method):
    cfg = TrainConfig(method=method, data=str(sample_dir / "seg"), out=str(tmp_path / method), epochs=1,
                      batch_size=2, image_size=32, limit=4, selected_num=64, log_every=1)
    res = train(cfg)
    assert "miou" in res.history[-1] and math.isfinite(res.history[-1]["loss"])
    if method == "cac":
        assert res.history[-1]["loss_unsup"] >= 0
    seg = load_segmenter(res.last)
    out = seg(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 4, 48, 48)
    assert seg.class_names == ["background", "disc", "square", "triangle"]
    assert (seg.projector is not None) == (method == "cac")
    from featviz.models.checkpoints import load_backbone

    load_backbone(res.last)  # the backbone alone loads with no flags


# ---------------------------------------------------------------- CLI errors: one line, non-zero
def _one_error_line(r):
    assert r.exit_code != 0
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert "Traceback" not in r.output
    return lines


def test_cli_errors(cli, tmp_path, sample_dir):
    r = cli("train", "-m", "simsiam", "-d", str(sample_dir / "photos"), "-o", tmp_path / "a", "-b", "64")
    lines = _one_error_line(r)
    assert len(lines) == 1 and "fewer than one batch of 64" in lines[0]

    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    shutil.copy(sample_dir / "seg" / "JPEGImages" / "scene_000.jpg", voc / "JPEGImages")
    r = cli("train", "-m", "cac", "-d", voc, "-o", tmp_path / "b", "-b", "2")
    lines = _one_error_line(r)
    assert len(lines) == 1 and "no mask" in lines[0]

    r = cli("train", "-m", "simsiam", "-d", "digits", "-o", tmp_path / "c", "-a", "resnet19")
    lines = _one_error_line(r)
    assert len(lines) == 1 and "unknown architecture" in lines[0]

    r = cli("train", "-m", "simsaim", "-d", "digits", "-o", tmp_path / "d")
    assert r.exit_code == 2 and "simsaim" in r.output  # typer's usage error lists the choices

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    for force in ((), ("--force",)):  # a folder featviz did not write: refused either way (issue 15), kept whole
        r = cli("train", "-m", "simsiam", "-d", "digits", "-o", tmp_path / "e", *force)
        lines = _one_error_line(r)
        assert len(lines) == 1 and "holds no featviz run" in lines[0] and "new or empty folder" in lines[0]
    assert (tmp_path / "e" / "notes.txt").read_text() == "mine"


def test_cli_train_runs_and_resumes(cli, tmp_path):
    args = ["train", "-m", "simsiam", "-d", "digits", "-o", tmp_path / "run", "-a", "resnet18_w16-cifar",
            "--image-size", "16", "-b", "16", "--limit", "40", "-e", "1", "--json"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["steps"] == 2
    r = cli(*args[:-3], "-e", "2", "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["steps"] == 4


def test_tsne_every_writes_held_out_snapshots_that_the_watch_names(cli, tmp_path):
    """--tsne-every 1: a t-SNE of the kNN queries' features after each evaluated epoch, RUN/tsne/epoch_EEEE.png,
    and a snapshot line in metrics.jsonl that `featviz collapse --watch` names."""
    run = tmp_path / "run"
    r = cli("train", "-m", "simsiam", "-d", "digits", "-o", run, "-a", "resnet18_w16-cifar", "--image-size", "16",
            "-b", "16", "--limit", "60", "-e", "2", "--tsne-every", "1")
    assert r.exit_code == 0, r.output
    assert "t-SNE snapshot after epoch 2: tsne/epoch_0002.png" in r.stderr
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    snaps = [x for x in lines if x.get("event") == "snapshot"]
    epochs = [x for x in lines if x.get("kind") == "epoch"]
    assert [(x["epoch"], x["step"], x["path"]) for x in snaps] == [(1, 3, "tsne/epoch_0001.png"),
                                                                      (2, 6, "tsne/epoch_0002.png")]
    assert all(x["n"] == e["n"] == 12 for x, e in zip(snaps, epochs, strict=True))  # the held-out split
    assert lines.index(snaps[0]) == lines.index(epochs[0]) + 1  # right after its epoch's line
    assert all((run / x["path"]).stat().st_size > 10_000 for x in snaps)
    assert json.loads((run / "config.json").read_text())["tsne_every"] == 1
    w = cli("collapse", "--watch", run, "--interval", "0.01", "--max-wait", "30", "--json", "--out", tmp_path / "w")
    assert w.exit_code == 0, w.output
    assert json.loads(w.stdout)["snapshots"] == [str(run / x["path"]) for x in snaps]
    assert f"t-SNE of the held-out split at epoch 1 (step 3): {run / 'tsne' / 'epoch_0001.png'}" in w.stderr


# ---------------------------------------------------------------- DDP (gloo, 2 CPU processes)
def test_ddp_two_processes_match_one(tmp_path):
    """2 gloo processes at global batch 8 end with the 1-process weights (DINO on a ViT: no BatchNorm)."""
    common = ["-m", "dino", "-d", "digits", "-a", "vit_tiny_patch8_32", "--image-size", "32", "-b", "8",
              "--limit", "20", "-e", "1", "--device", "cpu", "--log-every", "1", "--optimizer", "sgd", "--lr", "0.5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "featviz", "train", *common, "-o", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=150)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "featviz", "train", *common, "-o", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=150)
    assert two.returncode == 0, two.stderr[-2000:]
    # SGD, not AdamW: Adam's first steps are ~lr*sign(grad), which turns float-order noise in
    # near-zero gradients into visible weight differences. Compare the full method state: the
    # student (trained by gradients) and the EMA teacher.
    a, b = (torch.load(tmp_path / d / "state.pt", weights_only=True)["model"] for d in ("one", "two"))
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    init = build_backbone("vit_tiny_patch8_32", seed=0).state_dict()
    moved = max((a[f"backbone.{k}"].float() - v.float()).abs().max().item() for k, v in init.items())
    assert moved > 100 * worst and worst < 1e-4, (worst, moved)  # the runs trained, and agree


# ---------------------------------------------------------------- GPU path
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last(tmp_path):
    cfg = TrainConfig(method="simclr", data="digits", out=str(tmp_path / "run"), epochs=1, device="cuda",
                      **{**TINY, "batch_size": 16})
    res = train(cfg)
    t = _tensors(res.last)
    assert all(v.dtype in (torch.float32, torch.int64) for v in t.values())
    assert math.isfinite(res.history[-1]["loss"])
    assert np.isfinite(res.history[-1]["knn_acc"])


def test_cli_cac_step_save_and_epoch_start_unsup_reach_the_trainer(cli, tmp_path, sample_dir, monkeypatch):
    """--step-save / --epoch-start-unsup (like --temp / --weight-unsup) land in the TrainConfig and in
    the settings SegTask reads; without them CAC's defaults (1, 5) apply."""
    import featviz.train.loop as train_lib
    from featviz.train.segmentation.cac import CAC_EPOCH_START_UNSUP, CAC_STEP_SAVE, CACSettings

    seen = []
    monkeypatch.setattr(train_lib, "train", lambda cfg, **kw: seen.append(cfg))
    base = ["train", "-m", "cac", "-d", sample_dir / "seg", "-o", tmp_path / "run"]
    assert cli(*base, "--step-save", "3", "--epoch-start-unsup", "0").exit_code == 0
    assert cli(*base).exit_code == 0
    s = CACSettings.from_config(seen[0])
    assert (seen[0].step_save, seen[0].epoch_start_unsup, s.step_save, s.epoch_start_unsup) == (3, 0, 3, 0)
    assert (seen[1].step_save, seen[1].epoch_start_unsup) == (CAC_STEP_SAVE, CAC_EPOCH_START_UNSUP) == (1, 5)
    assert TrainConfig.from_dict(seen[0].to_dict()).step_save == 3  # config.json round trip
    r = cli(*base, "--step-save", "-1")
    assert r.exit_code == 2 and "--step-save" in r.output
