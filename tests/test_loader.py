"""One load_model for every command: the description is attached, every warning reaches stderr."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from featviz.errors import ArchitectureError
from featviz.models import loader
from featviz.models.architectures import build_backbone
from featviz.models.description import IMAGENET_MEAN, ArchSpec, ModelDescription, attach, describe

VIT = ArchSpec("vit", "vit_d128_patch16_32", {"embed_dim": 128, "depth": 1, "patch_size": 16, "img_size": 32,
                                              "num_heads": 2})


def test_random_init_has_its_description():
    model, desc = loader.load_model(arch="resnet18_w8-cifar", seed=3)
    assert describe(model) is desc and not model.training
    assert desc.kind == "backbone" and desc.name == "resnet18_w8-cifar" and desc.input_size == (32, 32)
    assert desc.source is None and desc.warnings == () and desc.normalization.mean == IMAGENET_MEAN
    again, _ = loader.load_model(arch="resnet18_w8-cifar", seed=3)
    assert torch.equal(model.conv1.weight, again.conv1.weight)


def test_needs_a_checkpoint_or_an_arch():
    with pytest.raises(ArchitectureError, match="--arch"):
        loader.load_model()


def test_checkpoint_warnings_are_logged_at_warning_and_kept(tmp_path, caplog):
    ref = build_backbone(VIT, seed=0)
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(ref.state_dict(), path)
    with caplog.at_level(logging.DEBUG, logger="featviz"):
        model, desc = loader.load_model(path)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert desc.warnings and len(warned) == len(desc.warnings)
    assert all("\n" not in r.getMessage() and path.name in r.getMessage() for r in warned)
    assert any("--num-heads" in w for w in desc.warnings)  # the assumed head count names the flag
    assert any("normalisation not recorded" in w for w in desc.warnings)
    assert desc.format == "timm" and desc.source["path"] == str(path) and describe(model) is desc
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 48)
        assert torch.allclose(model(x), ref(x), atol=1e-6)


def test_head_keeps_a_classifier(tmp_path):
    src = build_backbone("resnet18_w8", seed=0, num_classes=5)
    path = tmp_path / "resnet.pth"
    torch.save(src.state_dict(), path)
    model, desc = loader.load_model(path, head=True)
    assert desc.kind == "classifier" and desc.head == "fc" and desc.num_classes == 5 and desc.has_classifier
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    model, desc = loader.load_model(path)
    assert desc.kind == "backbone" and desc.source["classifier"]["loaded"] is False


def test_head_loads_a_featviz_segmenter_whole(sample_dir):
    path = sample_dir / "checkpoints" / "seg_supervised.safetensors"
    model, desc = loader.load_model(path, head=True)
    assert desc.kind == "segmenter" and desc.num_classes == 4 and desc.class_names[1] == "disc"
    assert desc.method == "supervised_seg" and desc.name == "resnet18_w16-os8"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)
    encoder, desc = loader.load_model(path)  # without head: the encoder only
    assert desc.kind == "backbone" and encoder(torch.randn(1, 3, 32, 32)).ndim == 2


def test_description_round_trips_through_json():
    _, desc = loader.load_model(arch="resnet18_w8", seed=0)
    d = json.loads(json.dumps(desc.to_dict()))
    assert ModelDescription.from_dict(d) == desc
    for key in ("arch", "kind", "head", "num_classes", "normalization", "input_size", "method", "source", "warnings"):
        assert key in d


def test_foreign_modules_get_a_derived_description():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=1)
    desc = describe(vit)
    assert desc.kind == "backbone" and desc.input_size == (32, 32)
    assert desc.normalization.mean == (0.5, 0.5, 0.5) and "pretrained_cfg" in desc.normalization.source
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    assert describe(net).kind == "backbone" and "assumed" in describe(net).normalization.source
    cls = timm.create_model("test_efficientnet", pretrained=False, num_classes=7)
    assert describe(cls).kind == "classifier" and describe(cls).head == "classifier" and describe(cls).num_classes == 7
    attach(net, describe(net).with_changes(kind="classifier"))
    assert describe(net).has_classifier
