"""`featviz inspect` says what matters for probing a model: family and library, patch, prefix tokens by kind,
positions, pooling, normalisation (named) and native size (``featviz.models.facts``)."""

from __future__ import annotations

import json

import pytest
import torch

from featviz.models.facts import model_facts, normalization_name

REPORT_KEYS = {"path", "format", "format_title", "container_key", "prefix", "dropped", "arch", "arch_details",
               "arch_source", "not_inferable", "normalization", "loaded", "missing", "unexpected", "tensors_in_file",
               "warnings"}


def _inspect(cli, *args) -> dict:
    r = cli("inspect", *map(str, args), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert REPORT_KEYS <= set(info)  # the load report's keys stay; the facts are added under "model"
    return info


def test_a_resnet(cli, tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    f = _inspect(cli, path)["model"]
    assert f["family"] == "resnet" and f["library"] == "torchvision"
    assert f["patch_size"] is None and f["tokens"] is None and f["position_embedding"] is None
    assert f["pooling"] == "global average pool"
    assert f["normalization"]["name"] == "ImageNet" and f["native_size"] == [224, 224]
    r = cli("inspect", path)
    assert r.exit_code == 0, r.output
    for row in ("family / library", "resnet · torchvision", "pooling", "global average pool", "native size",
                "224x224", "ImageNet  mean="):
        assert row in r.stdout


def test_a_vit_with_registers(cli, tmp_path):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, depth=2, img_size=224)
    path = tmp_path / "reg.pth"
    torch.save(vit.state_dict(), path)
    f = _inspect(cli, path)["model"]
    assert f["library"] == "timm" and f["family"].startswith("vit")
    assert f["patch_size"] == [14, 14] and f["native_size"] == [224, 224]
    assert f["tokens"] == {"grid": [16, 16], "class": 1, "register": 4, "other": 0, "excluded_from_maps": 5}
    assert f["position_embedding"] == "learned (interpolated)"
    assert f["pooling"] == "class token, normed"
    r = cli("inspect", path)
    assert "5: 1 class, 4 register/storage" in r.stdout and "learned (interpolated)" in r.stdout


def test_a_random_init_timm_dinov3(cli, tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0)
    path = tmp_path / "dinov3.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    f = _inspect(cli, path, "--arch", "timm:vit_small_patch16_dinov3")["model"]
    assert f["library"] == "timm" and f["patch_size"] == [16, 16]
    assert f["tokens"]["class"] == 1 and f["tokens"]["register"] == 4 and f["tokens"]["excluded_from_maps"] == 5
    assert f["position_embedding"] == "rope"
    assert f["pooling"]  # stated, whichever the loader chose (DINOv3's own: the normed class token)
    assert f["normalization"]["name"] == "ImageNet"


def test_foreign_modules_get_the_facts_derived_from_the_module():
    import timm
    import torchvision

    f = model_facts(torchvision.models.resnet18())
    assert (f["library"], f["pooling"], f["position_embedding"]) == ("torchvision", "global average pool", None)
    f = model_facts(timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=1))
    assert f["library"] == "timm" and f["position_embedding"] == "rope" and f["family"] == "vit (Eva)"
    assert f["pooling"] == "average of patch tokens, normed"  # timm's default for it, read from global_pool
    assert f["tokens"]["register"] == 4
    f = model_facts(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, global_pool="map"))
    assert f["pooling"] == "attention pool (MAP head)" and f["position_embedding"] == "learned (interpolated)"
    f = model_facts(timm.create_model("convnext_atto", pretrained=False))
    assert f["family"] == "cnn (ConvNeXt)" and f["pooling"] == "global average pool, then norm" and f["tokens"] is None


@pytest.mark.parametrize(("mean", "std", "name"), [
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "ImageNet"),
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "SigLIP (0.5/0.5)"),
    ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "CLIP (OpenAI's own)"),
    ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "custom"),
])
def test_normalisations_are_named(mean, std, name):
    assert normalization_name(mean, std) == name
