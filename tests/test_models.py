"""Architecture names, inference from weights, and layer lookup."""

from __future__ import annotations

import pytest
import torch

from featviz.errors import ArchitectureError, UnknownNameError
from featviz.models import architectures as models


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
    from featviz.models.features import get_layer

    m = models.build_backbone("resnet18_w8")
    assert get_layer(m, "layer4[-1]") is m.layer4[1]
    assert get_layer(m, "layer4.-1.conv2") is m.layer4[1].conv2
    with pytest.raises(UnknownNameError, match="layer4"):
        get_layer(m, "layer5")


def test_infer_rejects_unknown_keys():
    with pytest.raises(ArchitectureError, match="pass --arch"):
        models.infer_arch({"net.0.weight": torch.zeros(1)})


def test_vits_are_built_for_any_multiple_of_the_patch():
    spec = models.ArchSpec("vit", "v", {"embed_dim": 64, "depth": 1, "patch_size": 8, "img_size": 32, "num_heads": 2})
    m = models.build_backbone(spec, seed=0)
    for hw in ((32, 32), (24, 40), (64, 16)):
        assert m(torch.zeros(1, 3, *hw)).shape == (1, 64)
    assert models.build_backbone("timm:test_vit")(torch.zeros(1, 3, 32, 48)).ndim == 2  # timm ViTs: dynamic too


@pytest.mark.parametrize("dim,heads", [(192, 3), (384, 6), (768, 12), (1024, 16), (1280, 16), (1536, 24), (128, 2),
                                       (96, None)])
def test_standard_num_heads(dim, heads):
    assert models.standard_num_heads(dim) == heads


def test_normalisation_and_input_size_by_family():
    from featviz.models.description import describe

    with torch.device("meta"):  # facts only
        timm_vit, ssl_vit, lite = (models.build_backbone(a) for a in (
            "timm:vit_tiny_patch16_224", "vit_tiny_patch16_224", "timm:efficientnet_lite0"))
    assert describe(timm_vit).normalization.mean == (0.5, 0.5, 0.5)  # timm's pretrained_cfg for its own weights
    assert "pretrained_cfg of vit_tiny_patch16_224" in describe(timm_vit).normalization.source
    assert describe(ssl_vit).normalization.mean == (0.485, 0.456, 0.406)
    assert describe(lite).input_size == (224, 224) and describe(lite).normalization.mean == (0.485, 0.456, 0.406)
    assert describe(models.build_backbone("resnet18_w8-cifar")).input_size == (32, 32)
    assert describe(models.build_backbone("resnet18_w8")).input_size == (224, 224)


@pytest.mark.parametrize("arch,head", [("resnet18_w8", "fc"), ("timm:test_efficientnet", "classifier"),
                                       ("timm:test_convnext", "head.fc"), (models.ArchSpec("vit", "v", {
                                           "embed_dim": 64, "depth": 1, "patch_size": 8, "img_size": 32,
                                           "num_heads": 2}), "head")])
def test_build_with_a_classifier(arch, head):
    from featviz.models.description import describe

    m = models.build_backbone(arch, num_classes=6, seed=0)
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 6)
    assert describe(m).kind == "classifier" and describe(m).head == head == models.classifier_name(m)


def test_infer_vit_with_layerscale_no_class_token_and_swiglu():
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=1, class_token=False,
                          global_pool="avg", fc_norm=False, init_values=1e-5, num_classes=0)
    kw = models.infer_arch(m.state_dict()).spec.kwargs
    assert kw["class_token"] is False and kw["fc_norm"] is False and kw["init_values"] == 1.0
    sd = {k.replace("mlp.fc1", "mlp.w12"): v for k, v in VisionTransformer(
        img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=1, mlp_layer=SwiGLUPacked,
        mlp_ratio=4.0, num_classes=0).state_dict().items()}
    assert models.infer_arch(sd).spec.kwargs["mlp"] == "swiglu"
