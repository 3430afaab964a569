"""Architecture names, inference from weights, and layer lookup."""

from __future__ import annotations

import pytest
import torch

from featviz import models
from featviz.errors import ArchitectureError, UnknownNameError


@pytest.mark.parametrize("name,dim", [
    ("resnet18_w8", 64), ("resnet18_w16-cifar", 128), ("resnet50_w16", 512), ("wide_resnet50_2", 2048),
    ("resnet18-os8", 512),
])
def test_resnet_names_build_and_reinfer(name, dim):
    m = models.build_backbone(name, seed=0)
    size = 32 if "cifar" in name else 64
    assert m(torch.zeros(2, 3, size, size)).shape == (2, dim)
    inferred = models.infer_arch(m.state_dict())
    assert inferred.spec.name == name.replace("-os8", "")  # dilation changes no shape


def test_seeded_random_init_is_reproducible():
    a = models.build_backbone("resnet18_w8", seed=3).state_dict()
    b = models.build_backbone("resnet18_w8", seed=3).state_dict()
    c = models.build_backbone("resnet18_w8", seed=4).state_dict()
    assert torch.equal(a["conv1.weight"], b["conv1.weight"])
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_vit_inference_lists_num_heads_as_unknowable():
    spec = models.ArchSpec("vit", "v", {"embed_dim": 64, "depth": 2, "patch_size": 8, "img_size": 32, "num_heads": 4})
    m = models.build_backbone(spec)
    inf = models.infer_arch(m.state_dict())
    assert inf.spec.kwargs["embed_dim"] == 64 and inf.spec.kwargs["img_size"] == 32
    assert "num_heads" in inf.not_inferable and "num_heads" not in inf.spec.kwargs


def test_timm_any_model_random_weights():
    m = models.build_backbone("timm:resnet10t")
    assert m(torch.zeros(1, 3, 32, 32)).ndim == 2


def test_unknown_timm_model_suggests():
    with pytest.raises(UnknownNameError, match="timm has no model"):
        models.build_backbone("timm:resnet10tt")


def test_get_layer_forms():
    m = models.build_backbone("resnet18_w8")
    assert models.get_layer(m, "layer4[-1]") is m.layer4[1]
    assert models.get_layer(m, "layer4.-1.conv2") is m.layer4[1].conv2
    with pytest.raises(UnknownNameError, match="layer4"):
        models.get_layer(m, "layer5")


def test_infer_rejects_unknown_keys():
    with pytest.raises(ArchitectureError, match="pass --arch"):
        models.infer_arch({"net.0.weight": torch.zeros(1)})
