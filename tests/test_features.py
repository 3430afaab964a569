"""The feature core: one rule turns any layer into an (N, C, H, W) map, at any input size."""

from __future__ import annotations

import pytest
import torch

from featviz.errors import ArchitectureError, DataError, FeatvizError, UnknownNameError
from featviz.models import features as F
from featviz.models.architectures import ArchSpec, build_backbone

VIT = ArchSpec("vit", "vit_d64_patch8_32", {"embed_dim": 64, "depth": 2, "patch_size": 8, "img_size": 32,
                                            "num_heads": 2})


def _timm(name: str, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


def _hooked(model, layer, x):
    """The raw output of ``layer`` (no reshaping), for manual reference reshapes."""
    out = {}
    h = F.get_layer(model, layer).register_forward_hook(lambda _m, _i, o: out.setdefault("o", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return out["o"]


# ------------------------------------------------------------------ maps at any size
@pytest.fixture(scope="module")
def resnet():
    return build_backbone("resnet18_w8", seed=0)


@pytest.mark.parametrize("layer,grid", [("layer4", (2, 3)), ("layer3", (4, 6)), ("layer1", (16, 24))])
def test_resnet_maps_at_a_non_square_size(resnet, layer, grid):
    model = resnet
    x = torch.randn(2, 3, 64, 96)
    with F.FeatureExtractor(model, layer) as fx, torch.no_grad():
        fmap = fx(x)
    assert fmap.shape[0] == 2 and tuple(fmap.shape[-2:]) == grid
    assert torch.equal(fmap, _hooked(model, layer, x))


def test_vit_block_map_is_the_manual_reshape_at_a_non_square_size():
    model = build_backbone(VIT, seed=0)
    x = torch.randn(2, 3, 32, 56)  # a 4x7 patch grid
    with F.FeatureExtractor(model, "blocks[-1]") as fx, torch.no_grad():
        assert fx._block == (1, False)  # read through timm's forward_intermediates
        fmap = fx(x)
    tokens = _hooked(model, "blocks.1", x)
    manual = tokens[:, 1:].reshape(2, 4, 7, 64).permute(0, 3, 1, 2)
    assert fmap.shape == (2, 64, 4, 7)
    assert torch.allclose(fmap, manual, atol=1e-6)
    with F.FeatureExtractor(model, "norm") as fx, torch.no_grad():  # final norm: forward_intermediates(norm=True)
        normed = fx(x)
    assert torch.allclose(normed, _hooked(model, "norm", x)[:, 1:].reshape(2, 4, 7, 64).permute(0, 3, 1, 2), atol=1e-6)
    with F.FeatureExtractor(model, "blocks.0.mlp.fc1") as fx, torch.no_grad():  # any token layer, by hook
        assert fx(x).shape == (2, 256, 4, 7)


def test_class_and_register_tokens_are_dropped():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, reg_tokens=4,
                              no_embed_class=True, num_classes=0, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 24, 40)
    assert F.token_layout(model, (24, 40)) == F.TokenLayout((3, 5), 5, (8, 8))
    for layer in ("blocks.1", "blocks.1.norm1"):
        with F.FeatureExtractor(model, layer) as fx, torch.no_grad():
            fmap = fx(x)
        manual = _hooked(model, layer, x)[:, 5:].reshape(1, 3, 5, 64).permute(0, 3, 1, 2)
        assert torch.allclose(fmap, manual, atol=1e-6), layer


def test_token_layout_splits_the_prefix_into_class_register_and_other_tokens():
    """The one TokenLayout: what attention reports (class, register, other) comes from the feature core."""
    from timm.models.vision_transformer import VisionTransformer

    reg = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, reg_tokens=4,
                            no_embed_class=True, num_classes=0, dynamic_img_size=True)
    lay = F.token_layout(reg, (24, 40))
    assert (lay.class_tokens, lay.register_tokens, lay.other_prefix) == (1, 4, 0)
    assert lay.to_dict() == {"grid": [3, 5], "class": 1, "register": 4, "other": 0, "excluded_from_maps": 5}
    deit = _timm("deit_tiny_distilled_patch16_224", img_size=32, depth=1, num_classes=0, dynamic_img_size=True)
    lay = F.token_layout(deit, (32, 48))
    assert (lay.prefix, lay.class_tokens, lay.register_tokens, lay.other_prefix) == (2, 1, 0, 1)


def test_arch_name_is_the_description_s_or_the_class_name():
    assert F.arch_name(build_backbone("resnet18", seed=0)) == "resnet18"
    assert F.arch_name(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))) == "Sequential"


def test_distilled_deit_drops_class_and_distillation_tokens():
    model = _timm("deit_tiny_distilled_patch16_224", img_size=32, depth=1, num_classes=0, dynamic_img_size=True)
    x = torch.randn(1, 3, 32, 48)
    assert F.prefix_tokens(model) == 2
    with F.FeatureExtractor(model, "blocks.0.norm1") as fx, torch.no_grad():
        fmap = fx(x)
    manual = _hooked(model, "blocks.0.norm1", x)[:, 2:].reshape(1, 2, 3, 192).permute(0, 3, 1, 2)
    assert torch.allclose(fmap, manual, atol=1e-6)


def test_feature_map_one_call_and_default_layers(resnet):
    vit = build_backbone(VIT, seed=0)
    assert F.default_layer(vit) == "norm" and F.default_cam_layer(vit) == "blocks.1.norm1"
    assert F.feature_map(vit, torch.randn(1, 3, 16, 24)).shape == (1, 64, 2, 3)
    assert F.default_layer(resnet) == F.default_cam_layer(resnet) == "layer4"


@pytest.mark.parametrize("name,layer", [("mobilenetv3_small_050", "blocks.5"), ("efficientnet_lite0", "blocks.6")])
def test_default_cam_layer_from_timm_feature_info(name, layer):
    model = _timm(name, num_classes=10)
    assert F.default_cam_layer(model) == layer
    with F.FeatureExtractor(model, layer) as fx, torch.no_grad():
        fmap = fx(torch.randn(1, 3, 64, 96))
    assert tuple(fmap.shape[-2:]) == (2, 3)  # stride 32


def test_swin_channels_last_maps_and_cam_reshape():
    model = _timm("swin_tiny_patch4_window7_224", img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 1),
                  num_classes=0)
    layer = F.default_cam_layer(model)
    assert layer == "layers.1.blocks.0.norm1"
    x = torch.randn(1, 3, 56, 56)
    out = _hooked(model, layer, x)
    assert out.shape == (1, 7, 7, 48)  # timm Swin is channels-last
    with F.FeatureExtractor(model, layer) as fx, torch.no_grad():
        assert torch.equal(fx(x), out.permute(0, 3, 1, 2))
    rt = F.reshape_transform(model, (56, 56))
    assert torch.equal(rt(out), out.permute(0, 3, 1, 2))


def test_cam_reshape_transform_for_vit_tokens():
    model = build_backbone(VIT, seed=0)
    rt = F.reshape_transform(model, (32, 48))
    assert rt.to_dict() == {"grid": [4, 6], "prefix_tokens": 1, "channels_last": False}
    assert rt(torch.randn(2, 1 + 24, 64)).shape == (2, 64, 4, 6)
    assert F.reshape_transform(build_backbone("resnet18_w8", seed=0), (32, 48)) is None


class _Adapter(torch.nn.Module):
    """A wrapped model as featviz's Hugging Face adapter exposes it: counts as attributes, no timm class."""

    def __init__(self, patch, prefix, *, class_tokens=None, registers=None, cls_param=True):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.patch_size = patch
        self.num_prefix_tokens = prefix
        if class_tokens is not None:
            self.num_class_tokens = class_tokens
        if registers is not None:
            self.num_reg_tokens = registers
        if cls_param:
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 8))
        self.blocks = torch.nn.ModuleList([torch.nn.Identity()])

    def forward(self, x):
        h, w = x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1]
        return self.blocks[0](torch.arange(self.num_prefix_tokens + h * w, dtype=torch.float32)
                              .expand(len(x), 8, -1).transpose(1, 2))


@pytest.mark.parametrize(("adapter", "kinds"), [
    (_Adapter((14, 14), 5, registers=4), (1, 4, 0)),  # DINOv2 with registers / DINOv3 (storage tokens)
    (_Adapter((16, 16), 0, class_tokens=0, cls_param=False), (0, 0, 0)),  # SigLIP: no class token
    (_Adapter((16, 16), 1, cls_param=False, class_tokens=1), (1, 0, 0)),  # a class token it does not hold
])
def test_prefix_tokens_of_any_kind_are_counted_from_the_model(adapter, kinds):
    """cam's reshape and every map drop exactly the model's own prefix tokens, whatever wraps it."""
    p = adapter.patch_embed.patch_size[0]
    hw = (4 * p, 6 * p)
    lay = F.token_layout(adapter, hw)
    assert lay.grid == (4, 6) and lay.prefix == adapter.num_prefix_tokens
    assert (lay.class_tokens, lay.register_tokens, lay.other_prefix) == kinds
    rt = F.reshape_transform(adapter, hw)
    assert rt.to_dict() == {"grid": [4, 6], "prefix_tokens": lay.prefix, "channels_last": False}
    x = torch.zeros(2, 3, *hw)
    fmap = rt(adapter(x))  # token t holds the value t: the map starts at the first patch token
    assert fmap.shape == (2, 8, 4, 6) and fmap[0, 0, 0, 0] == lay.prefix and fmap[0, 0, -1, -1] == lay.prefix + 23
    with F.FeatureExtractor(adapter, "blocks.0") as fx:
        torch.testing.assert_close(fx(x), fmap)


# ------------------------------------------------------------------ one-line errors
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, FeatvizError)
    return msg


def test_vit_size_not_a_multiple_of_the_patch_says_the_nearest_sizes():
    model = build_backbone(VIT, seed=0)
    with pytest.raises(DataError) as e:
        F.input_size(model, "32x44")
    assert "8x8 patches" in _one_line(e) and "32x40 or 32x48" in _one_line(e)
    with pytest.raises(DataError), F.FeatureExtractor(model, "blocks.1") as fx:
        fx(torch.randn(1, 3, 30, 32))


def test_non_dynamic_vit_names_its_one_size():
    model = _timm("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0)
    with pytest.raises(DataError) as e:
        F.input_size(model, 48)
    assert "only takes 32x32" in _one_line(e)


@pytest.mark.parametrize("layer", ["fc", "head"])
def test_layer_without_a_spatial_map(layer):
    model = build_backbone("resnet18_w8") if layer == "fc" else build_backbone(VIT, num_classes=5)
    with pytest.raises(F.NoSpatialMapError) as e, F.FeatureExtractor(model, layer) as fx, torch.no_grad():
        fx(torch.randn(1, 3, 32, 32))
    assert "no spatial map" in _one_line(e)


def test_unknown_layer_suggests_names():
    with pytest.raises(UnknownNameError, match="layer4"):
        F.FeatureExtractor(build_backbone("resnet18_w8"), "layer5")


def test_no_default_layer_for_an_unknown_module():
    with pytest.raises(ArchitectureError, match="--layer"):
        F.default_cam_layer(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


@pytest.mark.parametrize("value,hw", [(224, (224, 224)), ("224", (224, 224)), ("224x320", (224, 320)),
                                      ("224×308", (224, 308)), ((32, 48), (32, 48)), (None, None)])
def test_parse_image_size(value, hw):
    assert F.parse_image_size(value) == hw


@pytest.mark.parametrize("value", [0, -3, "0x224", "abc", "224x", 4, "7x100", True])
def test_parse_image_size_rejects_bad_sizes(value):
    with pytest.raises(DataError) as e:
        F.parse_image_size(value)
    _one_line(e)


# ------------------------------------------------------------------ listing layers
def test_list_layers_reports_maps():
    rows = {r.name: r for r in F.list_layers(build_backbone(VIT, seed=0), image_size="32x48")}
    assert rows["blocks.1"].shape == (25, 64) and rows["blocks.1"].map == (64, 4, 6)
    assert rows["patch_embed"].map == (64, 4, 6)  # dynamic-size ViTs embed patches channels-last
    assert rows["fc_norm"].map is None or rows["fc_norm"].shape is None
    resnet = {r.name: r for r in F.list_layers(build_backbone("resnet18_w8"), image_size=64)}
    assert resnet["layer4"].map == (64, 2, 2) and resnet["fc"].map is None
