"""Every official checkpoint layout, built synthetically, loads into an encoder whose tensors and
features equal the source's; unsafe and broken files are refused with one clear message."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from featviz import checkpoints as C
from featviz.errors import ArchitectureError, CheckpointError, CheckpointFormatError, UnsafeCheckpointError
from featviz.models import ArchSpec, build_backbone

RESNET = "resnet18_w8"  # tiny but real torchvision key names
VIT = ArchSpec("vit", "vit_d96_patch8_32", {"embed_dim": 96, "depth": 2, "patch_size": 8, "img_size": 32,
                                            "num_heads": 12})


def _src(arch=RESNET, seed=1, heads=None):
    spec = arch
    if heads and isinstance(arch, ArchSpec):
        spec = ArchSpec(arch.family, arch.name, {**arch.kwargs, "num_heads": heads})
    return build_backbone(spec, seed=seed)


def _sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _pre(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def _rand(*shape):
    return torch.randn(*shape)


def _mlp(prefix, n=2):
    return {f"{prefix}{i}.weight": _rand(8, 8) for i in range(0, 2 * n, 2)}


def _noisy(sd):
    return {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}


def _save(tmp_path, name, obj):
    p = tmp_path / name
    torch.save(obj, p)
    return p


# layout name -> (builder(tmp_path) -> path, expected format, load kwargs, source-model factory)
def build_moco(tmp, src):
    sd = _sd(src)
    state = {**_pre(sd, "module.encoder_q."), **_mlp("module.encoder_q.fc."), **_pre(_noisy(sd), "module.encoder_k."),
             "module.queue": _rand(8, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    return _save(tmp, "moco_v2_800ep_pretrain.pth.tar", {"epoch": 800, "arch": "resnet50", "state_dict": state,
                                                          "optimizer": {"state": {}, "param_groups": []}})


def build_moco_nodp(tmp, src):
    sd = _sd(src)
    state = {**_pre(sd, "encoder_q."), **_mlp("encoder_q.fc."), **_pre(_noisy(sd), "encoder_k."), "queue": _rand(8, 16)}
    return _save(tmp, "moco_nodp.pth", {"epoch": 1, "state_dict": state})


def build_moco_v3(tmp, src):
    sd = _sd(src)
    head = "head." if "cls_token" in sd else "fc."
    state = {**_pre(sd, "module.base_encoder."), **_mlp(f"module.base_encoder.{head}", 3),
             **_pre(_noisy(sd), "module.momentum_encoder."), **_mlp("module.predictor.")}
    return _save(tmp, "r-50-100ep.pth.tar", {"epoch": 100, "arch": "x", "state_dict": state, "optimizer": {}, "scaler": {}})


def build_simsiam(tmp, src):
    sd = _sd(src)
    state = {**_pre(sd, "module.encoder."), **_mlp("module.encoder.fc.", 3), **_mlp("module.predictor.")}
    return _save(tmp, "checkpoint_0099.pth.tar", {"epoch": 99, "arch": "resnet50", "state_dict": state, "optimizer": {}})


def build_barlow_bare(tmp, src):
    return _save(tmp, "barlow_resnet50.pth", _sd(src))


def build_barlow_full(tmp, src):
    model = {**_pre(_sd(src), "module.backbone."), **_mlp("module.projector."), "module.bn.running_mean": _rand(8)}
    return _save(tmp, "barlow_checkpoint.pth", {"epoch": 3, "model": model, "optimizer": {}})


def build_vicreg_full(tmp, src):
    model = {**_pre(_sd(src), "module.backbone."), **_mlp("module.projector.")}
    return _save(tmp, "resnet50_fullckpt.pth", {"epoch": 3, "model": model, "optimizer": {}})


def build_swav(tmp, src):
    sd = {**_pre(_sd(src), "module."), **_mlp("module.projection_head."), "module.prototypes.weight": _rand(30, 8)}
    return _save(tmp, "swav_800ep_pretrain.pth.tar", sd)


def build_dino_full(tmp, src):
    teacher = {**_pre(_sd(src), "backbone."), **_mlp("head.mlp."), "head.last_layer.weight_g": _rand(1, 8),
               "head.last_layer.weight_v": _rand(4, 8)}
    student = {**_pre(_noisy(_sd(src)), "module.backbone."), **_mlp("module.head.mlp.")}
    return _save(tmp, "dino_vittiny_full_checkpoint.pth", {
        "student": student, "teacher": teacher, "optimizer": {}, "epoch": 5,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8), "dino_loss": {"center": _rand(1, 4)}})


def build_dino_backbone(tmp, src):
    return _save(tmp, "dino_deitsmall8_pretrain.pth", _sd(src))


def build_solo(tmp, src):
    sd = _sd(src)
    state = {**_pre(sd, "backbone."), "classifier.weight": _rand(10, 64), "classifier.bias": _rand(10),
             **_mlp("projector."), **_pre(_noisy(sd), "momentum_backbone.")}
    return _save(tmp, "byol-cifar10.ckpt", {"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.1.0",
                                            "state_dict": state, "loops": {}, "callbacks": {},
                                            "optimizer_states": [], "lr_schedulers": []})


def build_lightly(tmp, src):
    state = {**_pre(_sd(src), "backbone."), **_mlp("projection_head.layers."), "online_classifier.w": _rand(3)}
    return _save(tmp, "lightly_simclr.ckpt", {"epoch": 1, "global_step": 5, "pytorch-lightning_version": "2.0",
                                              "state_dict": state})


def build_lightly_seq(tmp, src):
    names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    state = {}
    for k, v in _sd(src).items():
        head, rest = k.split(".", 1)
        state[f"backbone.{names[head]}.{rest}"] = v
    state.update(_mlp("projection_head.layers."))
    return _save(tmp, "lightly_tutorial.ckpt", {"epoch": 1, "global_step": 5, "state_dict": state})


def build_simclr(tmp, src):
    return _save(tmp, "resnet50-1x.pth", {"state_dict": {**_sd(src), "fc.weight": _rand(10, 64)}})


def build_byol(tmp, src):
    sd = {k: v for k, v in _sd(src).items() if not k.endswith("num_batches_tracked")}
    return _save(tmp, "pretrain_res50x1.pth.tar", {**sd, "fc.weight": _rand(10, 64), "fc.bias": _rand(10)})


def build_cac(tmp, src):
    state = {**_pre(_sd(src), "module.encoder.backbone."), **_mlp("module.encoder.aspp."),
             **_mlp("module.encoder.decoder."), **_mlp("module.classifier."), **_mlp("module.project.")}
    return _save(tmp, "best_model.pth", {"arch": "CAC", "epoch": 80, "state_dict": state,
                                          "monitor_best": np.float64(0.712), "config": {"model": {"layers": 50}}})


def build_timm_safetensors(tmp, src):
    from safetensors.torch import save_file

    p = tmp / "model.safetensors"
    save_file({**_sd(src), "fc.weight": _rand(10, 64), "fc.bias": _rand(10)}, str(p))
    return p


def build_timm_train(tmp, src):
    ema = _sd(src)
    return _save(tmp, "model_best.pth.tar", {
        "epoch": 10, "arch": "resnet18", "state_dict": _pre(_noisy(ema), "module."),
        "state_dict_ema": ema, "optimizer": {}, "version": 2, "args": argparse.Namespace(lr=0.1), "metric": 71.2})


def build_timm_bare_vit(tmp, src):
    return _save(tmp, "pytorch_model.bin", _sd(src))


def build_torchvision(tmp, src):
    return _save(tmp, "resnet50-0676ba61.pth", {**_sd(src), "fc.weight": _rand(10, 64), "fc.bias": _rand(10)})


def build_featviz(tmp, src):
    p = build_torchvision(tmp, src)
    return C.convert_checkpoint(p, tmp / "converted.safetensors")


CASES = {
    # case: (builder, expected format, load kwargs, source factory)
    "moco_v2": (build_moco, "moco", {}, lambda: _src()),
    "moco_no_ddp": (build_moco_nodp, "moco", {}, lambda: _src()),
    "moco_v3_resnet": (build_moco_v3, "moco_v3", {}, lambda: _src()),
    "moco_v3_vit": (build_moco_v3, "moco_v3", {}, lambda: _src(VIT, heads=12)),
    "simsiam": (build_simsiam, "simsiam", {}, lambda: _src()),
    "barlow_twins_bare": (build_barlow_bare, "torchvision", {}, lambda: _src()),
    "barlow_twins_full": (build_barlow_full, "barlow_twins", {}, lambda: _src()),
    "vicreg_bare": (build_barlow_bare, "torchvision", {}, lambda: _src()),
    "vicreg_full": (build_vicreg_full, "vicreg", {}, lambda: _src()),
    "swav": (build_swav, "swav", {}, lambda: _src()),
    "dino_full_vit": (build_dino_full, "dino", {}, lambda: _src(VIT, heads=3)),
    "dino_full_resnet": (build_dino_full, "dino", {}, lambda: _src()),
    "dino_backbone_vit": (build_dino_backbone, "timm", {"num_heads": 6}, lambda: _src(VIT, heads=6)),
    "dino_backbone_resnet": (build_dino_backbone, "torchvision", {}, lambda: _src()),
    "solo_learn_cifar": (build_solo, "solo_learn", {}, lambda: _src("resnet18_w8-cifar")),
    "lightly_benchmark": (build_lightly, "lightly", {}, lambda: _src()),
    "lightly_sequential": (build_lightly_seq, "lightly", {}, lambda: _src()),
    "simclr_v1": (build_simclr, "simclr_v1", {}, lambda: _src()),
    "byol_converted": (build_byol, "torchvision", {}, lambda: _src()),
    "cac": (build_cac, "cac", {}, lambda: _src()),
    "timm_safetensors": (build_timm_safetensors, "timm", {}, lambda: _src()),
    "timm_train_ema": (build_timm_train, "timm", {}, lambda: _src()),
    "timm_bare_vit": (build_timm_bare_vit, "timm", {"num_heads": 4}, lambda: _src(VIT, heads=4)),
    "torchvision": (build_torchvision, "torchvision", {}, lambda: _src()),
    "featviz": (build_featviz, "featviz", {}, lambda: _src()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_loads_equal_tensors_and_features(case, tmp_path):
    builder, fmt, kwargs, factory = CASES[case]
    src = factory()
    path = builder(tmp_path, src)
    model, report = C.load_backbone(path, **kwargs)
    assert report.format == fmt, report
    assert not report.unexpected and all(k.endswith("num_batches_tracked") for k in report.missing)
    want = src.state_dict()
    got = model.state_dict()
    assert set(want) == set(got)
    for k, v in want.items():
        if case == "byol_converted" and k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(got[k], v), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        src.eval()
        assert torch.allclose(model(x), src(x), atol=1e-6)


def test_load_report_json_has_contract_keys(tmp_path):
    path = build_moco(tmp_path, _src())
    _, report = C.load_backbone(path)
    d = json.loads(json.dumps(report.to_dict()))
    for key in ("format", "arch", "loaded", "missing", "unexpected", "dropped", "warnings"):
        assert key in d
    assert d["prefix"] == "module.encoder_q."
    assert d["dropped"]["module.encoder_k."] > 0 and d["dropped"]["module.queue"] == 1
    assert d["arch"]["name"] == RESNET and d["loaded"] == len(_src().state_dict())


def test_dino_student_by_key(tmp_path):
    src = _src()
    path = build_dino_full(tmp_path, src)
    model, report = C.load_backbone(path, checkpoint_key="student")
    noisy = _noisy(src.state_dict())
    assert torch.equal(model.state_dict()["conv1.weight"], noisy["conv1.weight"])
    assert report.container_key == "student"


def test_simclr_normalisation_is_identity(tmp_path):
    _, report = C.load_backbone(build_simclr(tmp_path, _src()))
    assert report.normalization["mean"] == [0, 0, 0] and report.normalization["std"] == [1, 1, 1]


def test_solo_learn_cifar_stem_inferred(tmp_path):
    _, report = C.load_backbone(build_solo(tmp_path, _src("resnet18_w8-cifar")))
    assert report.arch["name"] == "resnet18_w8-cifar" and report.arch_details["stem"] == "3x3"


def test_keep_classifier_returns_logits(tmp_path):
    src = _src()
    path = build_torchvision(tmp_path, src)
    model, _ = C.load_backbone(path, keep_classifier=True)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_featviz_format_reads_without_flags(tmp_path):
    path = build_featviz(tmp_path, _src())
    tensors, meta = C.read_featviz(path)
    assert meta["arch"]["name"] == RESNET and meta["source_format"] == "torchvision"
    assert all(k.startswith("backbone.") for k in tensors)


def test_convert_refuses_to_overwrite(tmp_path):
    p = build_torchvision(tmp_path, _src())
    out = tmp_path / "x.safetensors"
    C.convert_checkpoint(p, out)
    with pytest.raises(Exception, match="--force"):
        C.convert_checkpoint(p, out)
    C.convert_checkpoint(p, out, force=True)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600: others may read it


# ------------------------------------------------------------------ refusals
def test_vit_num_heads_cannot_be_known(tmp_path):
    path = build_timm_bare_vit(tmp_path, _src(VIT, heads=4))
    with pytest.raises(ArchitectureError, match="num_heads cannot be inferred"):
        C.load_backbone(path)


def test_wrong_arch_shows_both_shapes_and_cause(tmp_path):
    path = build_solo(tmp_path, _src("resnet18_w8-cifar"))
    with pytest.raises(ArchitectureError) as e:
        C.load_backbone(path, arch="resnet18_w8")
    msg = str(e.value)
    assert "(8, 3, 3, 3)" in msg and "(8, 3, 7, 7)" in msg and "resnet18_w8-cifar" in msg and "CIFAR" in msg


def test_wrong_depth_names_the_likely_arch(tmp_path):
    path = build_torchvision(tmp_path, _src())
    with pytest.raises(CheckpointError, match="look like resnet18_w8"):
        C.load_backbone(path, arch="resnet34_w8")


def test_unknown_layout_shows_keys_and_suggests_format(tmp_path):
    path = _save(tmp_path, "odd.pth", {"weights": {"net.0.weight": torch.zeros(2)}, "step": 1})
    with pytest.raises(CheckpointFormatError) as e:
        C.load_backbone(path)
    assert "weights" in str(e.value) and "--format" in str(e.value)


def test_unknown_head_keys_are_errors_not_silently_ignored(tmp_path):
    sd = {**_pre(_sd(_src()), "module.encoder_q."), "module.mystery.weight": _rand(2)}
    path = _save(tmp_path, "x.pth", {"state_dict": sd})
    with pytest.raises(CheckpointError, match="module.mystery.weight"):
        C.load_backbone(path)


def test_missing_backbone_keys_are_errors(tmp_path):
    sd = _sd(_src())
    sd.pop("layer4.1.bn2.weight")
    path = _save(tmp_path, "x.pth", sd)
    with pytest.raises(CheckpointError, match="missing"):
        C.load_backbone(path)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "web page"),
    (b"hello, this is not a checkpoint\n", "text file"),
    (pickle.dumps({"a": 1}), "plain"),
])
def test_bad_files_are_named(tmp_path, content, match):
    p = tmp_path / "model.pth"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        C.read_checkpoint(p)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        C.read_checkpoint(tmp_path / "nope.pth")


def test_truncated_checkpoint(tmp_path):
    p = build_torchvision(tmp_path, _src())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        C.read_checkpoint(p)


def test_torchscript_is_refused(tmp_path):
    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p)
    with pytest.raises(CheckpointError, match="TorchScript"):
        C.read_checkpoint(p)


def test_safetensors_sniffed_and_damaged_one_refused(tmp_path):
    p = build_timm_safetensors(tmp_path, _src())
    assert C.sniff(p) == "safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="damaged"):
        C.read_checkpoint(p)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    p = _save(tmp_path, "evil.pth", {"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Evil(marker)})
    with pytest.raises(UnsafeCheckpointError) as e:
        C.load_backbone(p)
    assert not marker.exists()
    assert any("system" in g for g in e.value.blocked), e.value.blocked
    assert "--trust-checkpoint" in str(e.value)


def test_namespace_and_numpy_scalars_are_allowed(tmp_path):
    p = _save(tmp_path, "meta.pth", {"args": argparse.Namespace(a=1), "best": np.float64(0.5),
                                     "state_dict": {"w": torch.zeros(1)}})
    ck = C.read_checkpoint(p)
    assert ck.obj["args"].a == 1 and float(ck.obj["best"]) == 0.5


def test_legacy_format_loads(tmp_path):
    p = tmp_path / "legacy.pth"
    torch.save(_sd(_src()), p, _use_new_zipfile_serialization=False)
    assert C.sniff(p) == "legacy"
    _, report = C.load_backbone(p)
    assert report.format == "torchvision"


def test_registry_names_match_cli_literals():
    from typing import get_args

    from featviz._names import FormatName

    assert set(get_args(FormatName)) - {"auto"} == set(C.FORMATS.names())


def test_zip_sniff_is_not_fooled_by_random_zip(tmp_path):
    p = tmp_path / "a.pth"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "hi")
    p.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError):
        C.load_backbone(p)


def test_load_is_verbatim_for_featviz_convert_roundtrip(tmp_path):
    src = _src(VIT, heads=12)
    p = build_moco_v3(tmp_path, src)
    out = C.convert_checkpoint(p, tmp_path / "v.safetensors")
    model, report = C.load_backbone(out)
    assert report.format == "featviz" and report.arch["kwargs"]["num_heads"] == 12
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())
