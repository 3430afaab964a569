"""The CLI: version/help, the one-line error funnel, inspect/convert/layers end to end, and for every command
the one library call it delegates to (mocked), with the arguments it passes."""

from __future__ import annotations

import json

import pytest
import torch

from featviz.models.architectures import build_backbone
from featviz.style import PlotStyle


@pytest.fixture
def moco_ckpt(tmp_path):
    sd = build_backbone("resnet18_w8", seed=0).state_dict()
    p = tmp_path / "moco.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}}, p)
    return p


def _one_error_line(result):
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("error:"), text
    assert "Traceback" not in text
    return text


def test_version_and_help(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.output.startswith("featviz ")
    r = cli("-h")
    assert r.exit_code == 0 and "inspect" in r.output


def test_usage_error_exits_2(cli):
    assert cli("inspect").exit_code == 2
    assert cli("inspect", "x.pth", "--format", "nope").exit_code == 2


def test_inspect_json_contract(cli, moco_ckpt):
    r = cli("inspect", moco_ckpt, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["format"] == "moco" and d["arch"]["name"] == "resnet18_w8"
    assert d["loaded"] == len(build_backbone("resnet18_w8").state_dict())
    assert d["missing"] == [] and d["unexpected"] == []
    for key in ("dropped", "warnings", "normalization", "prefix", "container_key"):
        assert key in d


def test_inspect_table(cli, moco_ckpt):
    r = cli("inspect", moco_ckpt)
    assert r.exit_code == 0 and "module.encoder_q." in r.output and "resnet18_w8" in r.output


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    (b"", "empty"),
    (b"just some text\n", "text file"),
    (b"<html><head></head></html>", "web page"),
])
def test_inspect_bad_files_one_line(cli, tmp_path, content, match):
    p = tmp_path / "model.pth"
    if content is not None:
        p.write_bytes(content)
    text = _one_error_line(cli("inspect", p))
    assert match in text


def test_inspect_truncated(cli, moco_ckpt):
    data = moco_ckpt.read_bytes()
    moco_ckpt.write_bytes(data[: len(data) // 3])
    assert "truncated" in _one_error_line(cli("inspect", moco_ckpt))


def test_inspect_wrong_arch_shows_shapes(cli, moco_ckpt):
    text = _one_error_line(cli("inspect", moco_ckpt, "--arch", "resnet50"))
    assert "resnet18_w8" in text and "checkpoint (" in text


def test_convert_then_inspect_without_flags(cli, moco_ckpt, tmp_path):
    out = tmp_path / "enc.safetensors"
    r = cli("convert", moco_ckpt, out)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    d = json.loads(cli("inspect", out, "--json").stdout)
    assert d["format"] == "featviz" and d["arch"]["name"] == "resnet18_w8"
    # no overwrite without --force, and the file is untouched
    before = out.read_bytes()
    _one_error_line(cli("convert", moco_ckpt, out))
    assert out.read_bytes() == before
    assert cli("convert", moco_ckpt, out, "--force").exit_code == 0


def test_convert_failure_writes_nothing(cli, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"<!DOCTYPE html>")
    out = tmp_path / "o.safetensors"
    _one_error_line(cli("convert", bad, out))
    assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_layers_lists_names_cam_accepts(cli, moco_ckpt):
    r = cli("layers", "--checkpoint", moco_ckpt, "--json", "--image-size", "64")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    rows = {row["name"]: row for row in d["layers"]}
    assert rows["layer4"]["shape"] == [64, 2, 2] and rows["layer4.1.conv2"]["type"] == "Conv2d"
    assert rows["layer4"]["map"] == [64, 2, 2] and rows["avgpool"]["map"] == [64, 1, 1] and rows["fc"]["map"] is None
    assert d["image_size"] == [64, 64] and d["model"]["source"]["format"] == "moco"
    assert d["warnings"] == d["model"]["warnings"]


def test_layers_needs_arch_or_checkpoint(cli):
    assert "--arch" in _one_error_line(cli("layers"))


def test_unknown_arch_suggests(cli):
    assert "resnet18" in _one_error_line(cli("layers", "--arch", "resnet19"))


# ------------------------------------------------------------------ each command delegates to one library call
class _Spy:
    """Stands in for a library function: records its arguments and returns ``result``."""

    def __init__(self, result=None):
        self.result, self.calls = result, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result(*args, **kwargs) if callable(self.result) else self.result

    @property
    def kwargs(self):
        assert len(self.calls) == 1, self.calls
        return self.calls[0][1]

    @property
    def args(self):
        return self.calls[0][0]


class _Desc:
    """Stands in for a ``ModelDescription``."""

    def __init__(self, source=None):
        self.source, self.warnings, self.name = source, [], "resnet18"

    def to_dict(self):
        return {"name": self.name}


def _report(**kw):
    return dict(path="c.pth", format="moco", format_title="MoCo", container_key=None, prefix="", dropped={},
                arch={}, arch_details={}, arch_source="shapes", not_inferable=[], normalization={}, loaded=1,
                missing=[], unexpected=[], tensors_in_file=1, warnings=[], **kw)


def test_inspect_delegates_to_inspect_checkpoint(cli, monkeypatch, tmp_path):
    from featviz.models import loader

    spy = _Spy(_report())
    monkeypatch.setattr(loader, "inspect_checkpoint", spy)
    r = cli("inspect", tmp_path / "c.pth", "--format", "moco", "--num-heads", "6", "--checkpoint-key", "student",
            "--trust-checkpoint", "--json")
    assert r.exit_code == 0, r.output
    assert spy.args == (tmp_path / "c.pth",)
    assert spy.kwargs == dict(arch=None, format="moco", num_heads=6, checkpoint_key="student", trust=True)
    assert json.loads(r.stdout)["format"] == "moco"


def test_inspect_describes_a_segmenter_as_a_segmenter(cli, sample_dir):
    path = sample_dir / "checkpoints" / "seg_cac.safetensors"
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["kind"], d["layout"], d["method"], d["num_classes"], d["projector_dim"]) == (
        "segmenter", "featviz", "cac", 4, 64)
    r = cli("inspect", path)
    assert r.exit_code == 0 and "whole segmenter" in r.stdout and "dropped" not in r.stdout, r.stdout
    assert "ASPP" in r.stdout and "triangle" in r.stdout
    r = cli("inspect", path, "--format", "featviz", "--json")  # a forced layout: the encoder alone
    assert r.exit_code == 0 and "head." in json.loads(r.stdout)["dropped"]


def test_convert_delegates_to_convert_checkpoint(cli, monkeypatch, tmp_path):
    from featviz.models import checkpoints

    spy = _Spy(tmp_path / "o.safetensors")
    monkeypatch.setattr(checkpoints, "convert_checkpoint", spy)
    r = cli("convert", tmp_path / "c.pth", tmp_path / "o.safetensors", "--arch", "resnet50", "--force")
    assert r.exit_code == 0, r.output
    assert spy.args == (tmp_path / "c.pth", tmp_path / "o.safetensors")
    assert spy.kwargs == dict(force=True, arch="resnet50", format="auto", num_heads=None, checkpoint_key=None,
                              trust=False)


def test_layers_delegates_to_load_model_and_list_layers(cli, monkeypatch):
    from featviz.models import features, loader

    load, rows, size = _Spy(("MODEL", _Desc())), _Spy([]), _Spy((96, 96))
    monkeypatch.setattr(loader, "load_model", load)
    monkeypatch.setattr(features, "list_layers", rows)
    monkeypatch.setattr(features, "input_size", size)
    r = cli("layers", "--arch", "vit_small_patch16_224", "--num-heads", "6", "--image-size", "96", "--json")
    assert r.exit_code == 0, r.output
    assert load.args == (None,) and load.kwargs == dict(arch="vit_small_patch16_224", format="auto", num_heads=6,
                                                         checkpoint_key=None, trust=False)
    assert size.args == ("MODEL", 96)
    assert rows.args == ("MODEL",) and rows.kwargs == dict(image_size=(96, 96))
    assert json.loads(r.stdout) == {"model": {"name": "resnet18"}, "image_size": [96, 96], "warnings": [], "layers": []}


def test_embed_delegates_to_run_embed(cli, monkeypatch, tmp_path):
    from featviz.eval import embed

    spy = _Spy(None)  # None: a non-zero torchrun rank, which prints nothing
    monkeypatch.setattr(embed, "run_embed", spy)
    out = tmp_path / "e.npz"
    r = cli("embed", "--images", "digits", "--arch", "resnet18", "--out", out, "--pixels", "--masks", tmp_path,
            "--layer", "layer3", "--max-pixels-per-class", "5", "--image-size", "64", "-b", "8", "--device", "cpu",
            "--precision", "fp32", "--workers", "2", "--seed", "3", "--strict", "--drop-nonfinite", "--force",
            "--tensorboard", tmp_path / "tb")
    assert r.exit_code == 0, r.output
    kw = dict(spy.kwargs)
    assert callable(kw.pop("progress"))
    assert kw == dict(out=out, checkpoint=None, arch="resnet18", force=True,
                      load_kwargs=dict(format="auto", num_heads=None, checkpoint_key=None, trust=False),
                      images="digits", labels_csv=None, pixels=True, masks=tmp_path, layer="layer3",
                      max_pixels_per_class=5, image_size=64, batch_size=8, device="cpu", precision="fp32", workers=2,
                      seed=3, strict=True, drop_nonfinite=True, tensorboard=tmp_path / "tb", center_crop=None,
                      limit=None)


def test_cam_delegates_to_load_model_and_run_cam(cli, monkeypatch, tmp_path):
    from featviz.models import loader
    from featviz.views import cam

    load, run = _Spy(("MODEL", _Desc())), _Spy({"images": 1, "methods": ["gradcam"], "layers": ["layer4"],
                                                          "target": "self", "files": {"contact_sheet": "x.png"},
                                                          "metrics": None})
    monkeypatch.setattr(loader, "load_model", load)
    monkeypatch.setattr(cam, "run_cam", run)
    ck = tmp_path / "c.pth"
    r = cli("cam", tmp_path / "a.jpg", tmp_path / "b", "--out", tmp_path / "o", "--checkpoint", ck, "--layer", "layer3",
            "--method", "gradcam,eigencam", "--target", "class:3", "--image-size", "64x96", "--class-names", "imagenet",
            "--note", "trained", "--aug-smooth", "--eigen-smooth", "--metrics", "--seed", "2", "-b", "4", "--strict")
    assert r.exit_code == 0, r.output
    assert load.args == (ck,)
    assert load.kwargs == dict(seed=2, head=True, arch=None, format="auto", num_heads=None, checkpoint_key=None,
                               trust=False)
    assert run.args == ([tmp_path / "a.jpg", tmp_path / "b"], tmp_path / "o")
    kw = dict(run.kwargs)
    assert callable(kw.pop("progress")) and kw.pop("arguments")["method"] == ["gradcam,eigencam"]
    assert kw == dict(model="MODEL", methods=["gradcam,eigencam"], layers=["layer3"], target="class:3",
                      image_size="64x96", batch_size=4, aug_smooth=True, eigen_smooth=True, metrics=True, device="auto",
                      seed=2, force=False, strict=True, class_names="imagenet", weights="c.pth", note="trained",
                      limit=None, sheet_images=24, style=PlotStyle(), scores=None, score_steps=20)


def _reports():
    import numpy as np

    from featviz.collapse import collapse_report

    return {"embeddings": collapse_report(np.random.default_rng(0).normal(size=(50, 8)))}


def test_collapse_file_mode_delegates_to_file_reports_and_write_report(cli, monkeypatch, tmp_path):
    from featviz import collapse

    reports, write = _Spy(_reports()), _Spy(tmp_path / "o")
    monkeypatch.setattr(collapse, "file_reports", reports)
    monkeypatch.setattr(collapse, "write_report", write)
    r = cli("collapse", tmp_path / "e.npz", "--positives", tmp_path / "p.npz", "--out", tmp_path / "o", "--seed", "4",
            "--drop-nonfinite", "--uniformity-exact-max", "100", "--uniformity-pairs", "500", "--alpha-range", "2,20",
            "--json")
    assert r.exit_code == 0, r.output
    kw = dict(reports.kwargs)
    assert callable(kw.pop("progress"))
    assert reports.args == (tmp_path / "e.npz", tmp_path / "p.npz")
    assert kw == dict(seed=4, drop_nonfinite=True, uniformity_exact_max=100, uniformity_pairs=500, alpha_range=(2, 20))
    assert write.args[0] == tmp_path / "o" and write.args[2] == str(tmp_path / "e.npz")
    assert write.kwargs == dict(force=False, model=None)


def test_collapse_checkpoint_mode_delegates_to_checkpoint_reports(cli, monkeypatch, tmp_path):
    from featviz.collapse import twoview

    spy = _Spy(twoview.CheckpointReports(_reports(), "c.pth", [], None))
    monkeypatch.setattr(twoview, "checkpoint_reports", spy)
    r = cli("collapse", "--checkpoint", tmp_path / "c.pth", "--images", tmp_path, "--pixels", "--pixels-per-image",
            "9", "--image-size", "32", "-b", "8", "--json")
    assert r.exit_code == 0, r.output
    kw = dict(spy.kwargs)
    assert callable(kw.pop("progress"))
    assert spy.args == (tmp_path / "c.pth", tmp_path)
    assert kw == dict(load_kwargs=dict(arch=None, format="auto", num_heads=None, checkpoint_key=None, trust=False),
                      image_size=32, batch_size=8, seed=0, pixels=True, pixels_per_image=9, layer=None, device="auto",
                      drop_nonfinite=False, uniformity_exact_max=20_000, uniformity_pairs=1_000_000,
                      alpha_range=(10, 100), views=2)


def test_collapse_watch_delegates_to_follow_run(cli, monkeypatch, tmp_path):
    from featviz import collapse

    spy = _Spy(collapse.monitor.FollowResult("done", 3, [], {"step": 2}, tmp_path / "w"))
    monkeypatch.setattr(collapse, "follow_run", spy)
    r = cli("collapse", "--watch", tmp_path / "run", "--out", tmp_path / "w", "--interval", "0.5", "--max-wait", "7",
            "--until-step", "90", "--rankme-drop", "0.25", "--std-fraction", "0.2", "--fail-on-collapse", "--json")
    assert r.exit_code == 0, r.output
    kw = dict(spy.kwargs)
    watcher, on_event = kw.pop("watcher"), kw.pop("on_event")
    assert (watcher.std_fraction, watcher.rankme_drop) == (0.2, 0.25) and callable(on_event)
    assert spy.args == (tmp_path / "run",)
    assert kw == dict(out_dir=tmp_path / "w", force=False, interval=0.5, max_wait=7.0, until_step=90,
                      stop_on_alarm=True, checkpoint_metrics=None, title=f"collapse watch: {tmp_path / 'run'}")
    assert json.loads(r.stdout)["reason"] == "done"


def test_train_delegates_to_train(cli, monkeypatch, tmp_path):
    from featviz.train import loop as train

    spy = _Spy(None)  # None: a non-zero DDP rank
    monkeypatch.setattr(train, "train", spy)
    r = cli("train", "-m", "byol", "-d", "digits", "-o", tmp_path / "run", "-a", "resnet18", "-e", "3", "-b", "32",
            "--lr", "0.2", "--optimizer", "adamw", "--weight-decay", "0.01", "--warmup-epochs", "1",
            "--image-size", "24", "--seed", "5", "--resume", "--no-stop-grad", "--local-crops", "2",
            "--min-scale", "0.5", "--no-hflip", "--threads", "1", "--log-every", "4", "--limit", "100",
            "--workers", "1", "--no-amp")
    assert r.exit_code == 0, r.output
    (cfg,), kw = spy.calls[0]
    assert (kw["resume"], kw["force"]) == (True, False) and callable(kw["progress"]) and callable(kw["on_log"])
    assert (cfg.method, cfg.data, cfg.out, cfg.arch, cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer) == (
        "byol", "digits", str(tmp_path / "run"), "resnet18", 3, 32, 0.2, "adamw")
    assert (cfg.weight_decay, cfg.warmup_epochs, cfg.image_size, cfg.seed, cfg.stop_grad, cfg.local_crops) == (
        0.01, 1.0, 24, 5, False, 2)
    assert (cfg.min_scale, cfg.hflip, cfg.threads, cfg.log_every, cfg.limit, cfg.workers, cfg.amp) == (
        0.5, False, 1, 4, 100, 1, False)


def test_demo_delegates_to_run_demo(cli, monkeypatch, tmp_path):
    from featviz import demo

    spy = _Spy([demo.Step("t", ["f"], "featviz x", "featviz y")])
    monkeypatch.setattr(demo, "run_demo", spy)
    r = cli("demo", "--out", tmp_path / "d", "--force")
    assert r.exit_code == 0, r.output
    assert spy.args == (tmp_path / "d",)
    kw = dict(spy.kwargs)
    assert callable(kw.pop("progress")) and kw == dict(force=True, retrain_first=False)
    assert "on your data: featviz y" in r.stdout


def test_sample_data_delegates_to_sample_data(cli, monkeypatch, tmp_path):
    from featviz.io import samples

    spy = _Spy(tmp_path / "photos")
    monkeypatch.setattr(samples, "sample_data", spy)
    r = cli("sample-data", "photos", "cat")
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "photos")
    assert spy.args == ("photos", "cat") and spy.kwargs == {}


_EVAL = {"knn": [{"k": 10, "temperature": 0.07, "top1": 0.5, "top5": 0.9}], "n_train": 8, "n_val": 4, "dim": 3,
         "num_classes": 2, "protocol": {"features": "given"}, "C": 1.0, "top1": 0.5, "top5": 1.0,
         "selection": {"n_held_out": 2}, "grid": [{"C": 1.0, "selection_top1": 0.5}]}


def test_knn_delegates_to_run_knn(cli, monkeypatch, tmp_path):
    from featviz.eval import knn

    spy = _Spy(_EVAL)
    monkeypatch.setattr(knn, "run_knn", spy)
    r = cli("knn", "--train", tmp_path / "a.npz", "--val", tmp_path / "b.npz", "--k", "5,10", "-T", "0.1",
            "--out", tmp_path / "k.json", "--force", "--json")
    assert r.exit_code == 0, r.output
    kw = dict(spy.kwargs)
    assert callable(kw.pop("progress")) and kw.pop("arguments")["k"] == "5,10"
    assert kw == dict(ks="5,10", temperature=0.1, out=tmp_path / "k.json", force=True, train=tmp_path / "a.npz",
                      val=tmp_path / "b.npz", checkpoint=None, arch=None, train_images=None, val_images=None,
                      images=None, image_size=None, center_crop=None, val_fraction=0.2, seed=0, batch_size=64,
                      device="auto",
                      load_kwargs=dict(format="auto", num_heads=None, checkpoint_key=None, trust=False))
    assert json.loads(r.stdout) == _EVAL


def test_probe_delegates_to_run_probe(cli, monkeypatch, tmp_path):
    from featviz.eval import probe

    spy = _Spy(_EVAL)
    monkeypatch.setattr(probe, "run_probe", spy)
    r = cli("probe", "--images", "digits", "--seed", "3", "--json")
    assert r.exit_code == 0, r.output
    kw = dict(spy.kwargs)
    assert callable(kw.pop("progress")) and kw.pop("arguments")["images"] == "digits"
    assert kw.pop("images") == "digits" and kw.pop("seed") == 3 and kw.pop("out") is None and "cs" in kw
    assert kw["load_kwargs"] == dict(format="auto", num_heads=None, checkpoint_key=None, trust=False)


def _sheet_summary(**kw):
    return {"images": 1, "arch": "vit", "layer": 0, "blocks": 1, "heads": 2, "image_size": [32, 32], "grid": [2, 2],
            "files": {"contact_sheet": "s.png", "sheet": "s.png"}, **kw}


def test_attention_delegates_to_load_model_and_run_attention(cli, monkeypatch, tmp_path):
    from featviz.models import loader
    from featviz.views import attention

    load = _Spy(("MODEL", _Desc()))
    run = _Spy(_sheet_summary(prefix_tokens={"excluded_from_maps": 1, "class": 1, "register": 0, "other": 0},
                              prefix_attention_share=0.1, rollout=None))
    monkeypatch.setattr(loader, "load_model", load)
    monkeypatch.setattr(attention, "run_attention", run)
    r = cli("attention", tmp_path / "a.jpg", "--out", tmp_path / "o", "--arch", "vit_small_patch16_224",
            "--image-size", "224x320", "--layer", "-2", "--rollout", "--head-fusion", "max", "--discard-ratio", "0.5")
    assert r.exit_code == 0, r.output
    assert load.args == (None,) and load.kwargs["arch"] == "vit_small_patch16_224"
    assert run.args == ([tmp_path / "a.jpg"], tmp_path / "o")
    kw = dict(run.kwargs)
    assert callable(kw.pop("progress")) and kw.pop("arguments")["layer"] == -2
    assert kw == dict(model="MODEL", layer=-2, image_size="224x320", threshold=0.6, rollout_maps=True,
                      head_fusion="max", discard_ratio=0.5, batch_size=8, device="auto", force=False,
                      description={"name": "resnet18"}, limit=None, sheet_images=24, style=PlotStyle())


def test_pca_delegates_to_load_model_and_run_pca(cli, monkeypatch, tmp_path):
    from featviz.models import loader
    from featviz.views import pca

    load = _Spy(("MODEL", _Desc()))
    run = _Spy(_sheet_summary(explained_variance_ratio=[0.5, 0.2, 0.1], feature_dim=8, foreground="none",
                              threshold=0.0))
    monkeypatch.setattr(loader, "load_model", load)
    monkeypatch.setattr(pca, "run_pca", run)
    r = cli("pca", tmp_path / "a.jpg", "--out", tmp_path / "o", "--arch", "resnet18", "--layer", "layer3",
            "--components", "4", "--foreground", "none", "--image-size", "64", "--seed", "1")
    assert r.exit_code == 0, r.output
    kw = dict(run.kwargs)
    assert callable(kw.pop("progress")) and kw.pop("arguments")["components"] == 4
    assert kw == dict(model="MODEL", layer="layer3", image_size=64, components=4, foreground="none", threshold=0.0,
                      batch_size=8, device="auto", seed=1, force=False, description={"name": "resnet18"},
                      sheet_images=40, recipe="dinov2", mask_dir=None)


def test_tsne_delegates_to_run_map(cli, monkeypatch, tmp_path):
    from featviz.maps import projection as tsne

    check, run = _Spy(None), _Spy({"outputs": {"plot": "m.png"}})
    monkeypatch.setattr(tsne, "check_map_outputs", check)
    monkeypatch.setattr(tsne, "run_map", run)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    r = cli("tsne", a, b, "--reference", b, "--out", tmp_path / "m.png", "--html", tmp_path / "m.html",
            "--method", "umap", "--sample", "50", "--names", "x,y")
    assert r.exit_code == 0, r.output
    assert check.args == (tmp_path / "m.png",) and check.kwargs["html"] == tmp_path / "m.html"
    kw = dict(run.kwargs)
    assert run.args == (tmp_path / "m.png",) and kw.pop("files") == [a, b] and kw.pop("names") == ["x", "y"]
    assert kw.pop("reference") == 1 and kw.pop("sample") == 50 and kw.pop("params").method == "umap"
    assert kw.pop("html") == tmp_path / "m.html" and kw.pop("progress") is None and kw.pop("style") == PlotStyle()


def test_progress_bar_runs_no_threads_and_closes_with_its_loop():
    """rich's track() runs refresh/track threads; an abandoned one can deadlock with another bar's (seen in cam)."""
    import threading

    from featviz.cli._app import _progress

    before = threading.active_count()
    bar = _progress("x")(range(5))
    assert next(bar) == 0 and threading.active_count() == before
    bar.close()
    assert list(_progress("y")([1, 2])) == [1, 2] and threading.active_count() == before
