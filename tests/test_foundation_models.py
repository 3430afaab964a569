"""Foundation-model checkpoints timm builds, detected with no flags (featviz.models.checkpoints.foundation_layouts).

Each test builds the checkpoint with the reference library itself (timm, open_clip; random seeded
weights, the real patch size, the smallest config that keeps the family's shapes), saves it in the
official layout, loads it with ``load_model(path)`` and no flags, and compares featviz's features
with the reference model's own forward on the same pixels: cosine >= 0.999 per patch (the last
block, normed, as a map) and for the pooled embedding, at a non-square size where the model takes one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from featviz.errors import ArchitectureError, CheckpointError  # noqa: E402
from featviz.models.features import feature_map, token_layout  # noqa: E402
from featviz.models.loader import load_model  # noqa: E402

H, W = 64, 96  # non-square; an image already at this size reaches the model as is


def _x(h=H, w=W, n=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, h, w, generator=g)


def _cos_min(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=dim).min())


def _patches(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Reference tokens (N, T, C) as an (N, C, h, w) map: drop the prefix, row-major grid."""
    t = tokens[:, prefix:]
    return t.reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2)


def _check_vit(model, ref, x, prefix, ref_tokens, ref_pooled):
    grid = (x.shape[-2] // 16, x.shape[-1] // 16) if ref_tokens.shape[1] - prefix == (x.shape[-2] // 16) * (
        x.shape[-1] // 16) else None
    assert grid is not None
    layout = token_layout(model, tuple(x.shape[-2:]))
    assert layout.prefix == prefix and layout.grid == grid
    with torch.no_grad():
        fmap = feature_map(model, x, "norm")
        pooled = model(x)
    want = _patches(ref_tokens, prefix, grid)
    assert fmap.shape == want.shape
    assert _cos_min(fmap, want) >= 0.999  # per patch
    assert pooled.shape == ref_pooled.shape
    assert _cos_min(pooled, ref_pooled) >= 0.999


# ------------------------------------------------------------------ DINOv3 ViT
def _dinov3_timm(qkvb=True, **kw):
    torch.manual_seed(0)
    name = "vit_small_patch16_dinov3_qkvb" if qkvb else "vit_small_patch16_dinov3"
    m = timm.create_model(name, pretrained=False, depth=2, global_pool="token", **kw).eval()
    with torch.no_grad():  # non-zero layer scales and biases, so every tensor matters
        for n, p in m.named_parameters():
            if n.endswith(("gamma_1", "gamma_2", "q_bias", "v_bias")):
                p.copy_(torch.randn_like(p) * 0.3)
    return m


def _to_meta(timm_sd: dict, heads: int) -> dict:
    """timm's DINOv3 names back to Meta's raw layout (facebookresearch/dinov3 vision_transformer.py)."""
    out = {}
    for k, v in timm_sd.items():
        if k.endswith("attn.q_bias"):
            k_bias = torch.randn_like(v)  # masked by bias_mask: never used by DINOv3
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, k_bias, timm_sd[k.replace("q_bias", "v_bias")]])
            mask = torch.ones(3 * v.numel())
            mask[v.numel():2 * v.numel()] = 0
            out[k.replace("q_bias", "qkv.bias_mask")] = mask
            continue
        if k.endswith("attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v
    dim = timm_sd["cls_token"].shape[-1]
    n = dim // heads // 4
    out["rope_embed.periods"] = 100.0 ** (2 * torch.arange(n, dtype=torch.float32) / (2 * n))
    out["mask_token"] = torch.zeros(1, dim)
    return out


def _dinov3_ref(m, x):
    with torch.no_grad():
        tokens = m.forward_features(x)
        return tokens, m.forward_head(tokens, pre_logits=True)


def test_dinov3_meta_layout_converts_with_timms_filter_and_matches(tmp_path):
    from timm.models.eva import checkpoint_filter_fn

    ref = _dinov3_timm()
    raw = _to_meta(ref.state_dict(), heads=6)
    assert "storage_tokens" in raw and "blocks.0.attn.qkv.bias_mask" in raw
    # the Meta layout through timm's own filter gives back the same weights
    converted = checkpoint_filter_fn(dict(raw), ref)
    for k, v in ref.state_dict().items():
        assert torch.equal(converted[k], v), k
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(raw, path)
    model, desc = load_model(path)
    src = desc.source
    assert src["format"] == "dinov3" and src["arch"]["name"] == "timm:vit_small_patch16_dinov3_qkvb"
    assert src["arch"]["kwargs"] == {"global_pool": "token", "depth": 2}
    assert desc.library == "timm" and desc.position_embedding == "rope" and desc.pooling == "class token, normed"
    assert desc.method == "dinov3" and tuple(desc.normalization.mean) == (0.485, 0.456, 0.406)
    assert tuple(desc.input_size) == (224, 224)
    assert any("bias_mask" in k for k in src["dropped"]) and "mask_token" in src["dropped"]
    x = _x()
    tokens, pooled = _dinov3_ref(ref, x)
    _check_vit(model, ref, x, 5, tokens, pooled)
    # the test can fail: timm's default pooling (the patch average) is not DINOv3's embedding
    assert _cos_min(model(x).detach(), tokens[:, 5:].mean(1)) < 0.999


def test_dinov3_meta_layout_sat_weights_use_the_satellite_mean_std(tmp_path):
    ref = _dinov3_timm()
    path = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    torch.save(_to_meta(ref.state_dict(), heads=6), path)
    _, desc = load_model(path)
    assert tuple(desc.normalization.mean) == (0.430, 0.411, 0.296)
    assert "sat493m" in desc.normalization.source


def test_dinov3_meta_layout_refuses_what_timm_cannot_build(tmp_path):
    ref = _dinov3_timm()
    raw = _to_meta(ref.state_dict(), heads=6)
    torch.save({**raw, "cls_norm.weight": torch.ones(384), "cls_norm.bias": torch.zeros(384)}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="cls_norm"):
        load_model(tmp_path / "a.pth")
    torch.save({**raw, "rope_embed.periods": raw["rope_embed.periods"] * 2}, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="rope_embed.periods"):
        load_model(tmp_path / "b.pth")


@pytest.mark.parametrize("qkvb", [True, False])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_dinov3_in_timm_names_loads_with_no_flags(tmp_path, qkvb, suffix):
    ref = _dinov3_timm(qkvb)
    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(ref.state_dict(), str(path))
    model, desc = load_model(path)
    assert desc.source["format"] == "timm"
    assert desc.source["arch"]["name"] == f"timm:vit_small_patch16_dinov3{'_qkvb' if qkvb else ''}"
    assert desc.pooling == "class token, normed" and desc.position_embedding == "rope"
    x = _x()
    tokens, pooled = _dinov3_ref(ref, x)
    _check_vit(model, ref, x, 5, tokens, pooled)


# ------------------------------------------------------------------ ConvNeXt
def _convnext_ref(name="convnext_atto", **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=0, **kw).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("gamma"):
                p.copy_(torch.randn_like(p) * 0.3)
    return m


def _check_cnn(model, ref, x):
    with torch.no_grad():
        want_map = ref.forward_features(x)
        want = ref(x)
        got_map = feature_map(model, x)
        got = model(x)
    assert got_map.shape == want_map.shape
    assert _cos_min(got_map, want_map) >= 0.999
    assert _cos_min(got, want) >= 0.999


def test_timm_convnext_state_dict_is_named_from_its_shapes(tmp_path):
    ref = _convnext_ref()
    torch.save(ref.state_dict(), tmp_path / "convnext.pth")
    model, desc = load_model(tmp_path / "convnext.pth")
    assert desc.source["arch"]["name"] == "timm:convnext_atto"
    assert desc.library == "timm" and desc.pooling == "global average pool, then norm"
    _check_cnn(model, ref, _x())


def _convnext_to_meta(sd: dict) -> dict:
    """timm ConvNeXt names back to DINOv3's (dinov3/models/convnext.py)."""
    import re

    out = {}
    for k, v in sd.items():
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm", "norm")
        out[k] = v
    return out


def test_dinov3_convnext_meta_layout(tmp_path):
    from timm.models.convnext import checkpoint_filter_fn

    ref = _convnext_ref("convnext_tiny", depths=(1, 1, 2, 1), dims=(32, 64, 128, 256))
    raw = _convnext_to_meta(ref.state_dict())
    assert "stages.0.0.dwconv.weight" in raw and "downsample_layers.1.1.weight" in raw
    converted = checkpoint_filter_fn(dict(raw), ref)
    assert set(converted) == set(ref.state_dict())
    path = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"
    torch.save(raw, path)
    model, desc = load_model(path)
    assert desc.source["format"] == "dinov3_convnext" and desc.method == "dinov3"
    assert desc.source["arch"]["kwargs"] == {"depths": [1, 1, 2, 1], "dims": [32, 64, 128, 256]}
    assert desc.pooling == "global average pool, then norm"
    _check_cnn(model, ref, _x())


# ------------------------------------------------------------------ SigLIP (timm)
def test_timm_siglip_map_head_vit(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, depth=2, img_size=64,
                            num_classes=0).eval()
    torch.save(ref.state_dict(), tmp_path / "siglip.pth")
    model, desc = load_model(tmp_path / "siglip.pth")
    assert desc.source["arch"]["name"] == "timm:vit_base_patch16_siglip_224"
    assert desc.pooling == "attention pool (MAP head)"
    assert tuple(desc.normalization.mean) == (0.5, 0.5, 0.5)
    # the reference ViT has a fixed size: compare at its own 64x64 (featviz's model takes any multiple of 16)
    x = _x(64, 64)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        pooled = ref.forward_head(tokens, pre_logits=True)
    _check_vit(model, ref, x, 0, tokens, pooled)
    assert feature_map(model, _x()).shape[-2:] == (4, 6)


def _eva_ref(name, **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, dynamic_img_size=True, num_classes=0, **kw).eval()
    with torch.no_grad():  # non-zero layer scales, so every tensor matters
        for n, p in m.named_parameters():
            if n.endswith(("gamma_1", "gamma_2")):
                p.copy_(torch.randn_like(p) * 0.3)
    return m


def _save(sd, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name,prefix,pooling", [
    ("vit_pe_core_tiny_patch16_384", 1, "attention pool (MAP head)"),
    ("vit_pe_spatial_tiny_patch16_512", 1, "average of patch tokens"),
])
def test_perception_encoder_in_timm_names_loads_with_no_flags(tmp_path, suffix, name, prefix, pooling):
    """timm PE core/spatial (RoPE + learned positions, norm_pre) at 64x96: timm's own forward, dynamic_img_size."""
    ref = _eva_ref(name, depth=2)
    path = tmp_path / f"pe{suffix}"
    _save(ref.state_dict(), path)
    model, desc = load_model(path)
    assert desc.source["arch"]["name"] == f"timm:{name}" and desc.source["arch"]["kwargs"] == {"depth": 2}
    assert desc.library == "timm" and desc.pooling == pooling and desc.position_embedding == "learned + rope"
    x = _x()
    with torch.no_grad():
        tokens = ref.forward_features(x)
        pooled = ref.forward_head(tokens, pre_logits=True)
    if name.startswith("vit_pe_core"):
        _check_vit(model, ref, x, prefix, tokens, pooled)
    else:  # no final norm: the last block's tokens are the features
        with torch.no_grad():
            fmap = feature_map(model, x, "blocks.1")
            got = model(x)
        assert _cos_min(fmap, _patches(tokens, prefix, (4, 6))) >= 0.999
        assert _cos_min(got, pooled) >= 0.999


def test_pe_core_projection_head_is_split_off(tmp_path):
    """PE core's head (its CLIP projection) is the file's classifier: features are the attention pool's."""
    torch.manual_seed(0)
    full = timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, depth=1).eval()
    torch.save(full.state_dict(), tmp_path / "pe.pth")
    model, desc = load_model(tmp_path / "pe.pth")
    assert desc.source["classifier"]["num_classes"] == full.head.out_features
    assert model(_x(64, 64)).shape == (2, 192)


def test_eva02_clip_in_timm_names_loads_with_no_flags(tmp_path):
    """EVA-02 CLIP (q/k/v projections, SwiGLU with its norm, attn inner norm, RoPE) at 64x96 (patch 16)."""
    ref = _eva_ref("eva02_base_patch16_clip_224", depth=1)
    _save(ref.state_dict(), tmp_path / "eva02.safetensors")
    model, desc = load_model(tmp_path / "eva02.safetensors")
    assert desc.source["arch"]["name"] == "timm:eva02_base_patch16_clip_224"
    assert desc.pooling == "class token, normed" and desc.position_embedding == "learned + rope"
    x = _x()
    with torch.no_grad():
        tokens = ref.forward_features(x)
        pooled = ref.forward_head(tokens, pre_logits=True)
    _check_vit(model, ref, x, 1, tokens, pooled)


def test_eva_weights_that_do_not_say_their_model_arch_candidates(tmp_path):
    """EVA-01-style keys (q_bias/v_bias, plain MLP) are also EVA-02-CLIP-E's: refused, naming --arch candidates."""
    torch.manual_seed(0)
    ref = timm.create_model("eva02_enormous_patch14_clip_224", pretrained=False, depth=1, embed_dim=64,
                            num_heads=2)
    torch.save(ref.state_dict(), tmp_path / "eva.pth")
    with pytest.raises(ArchitectureError, match="--arch timm:"):
        load_model(tmp_path / "eva.pth")


def test_dinov3_meta_layout_small_plus_swiglu(tmp_path):
    """DINOv3 S+ (SwiGLU mlp.w1/w2/w3) in Meta's layout, through timm's filter, no flags, at 64x96."""
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_plus_patch16_dinov3", pretrained=False, depth=2, global_pool="token").eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith(("gamma_1", "gamma_2")):
                p.copy_(torch.randn_like(p) * 0.3)
    raw = {k.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2").replace("mlp.fc2", "mlp.w3"): v
           for k, v in _to_meta(ref.state_dict(), heads=6).items()}
    assert "blocks.0.mlp.w1.weight" in raw
    torch.save(raw, tmp_path / "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth")
    model, desc = load_model(tmp_path / "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth")
    assert desc.source["arch"]["name"] == "timm:vit_small_plus_patch16_dinov3"
    x = _x()
    tokens, pooled = _dinov3_ref(ref, x)
    _check_vit(model, ref, x, 5, tokens, pooled)


# ------------------------------------------------------------------ open_clip
def _clip(quick_gelu=False):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32, quick_gelu=quick_gelu,
        vision_cfg=CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=16, image_size=64),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)).eval()
    with torch.no_grad():  # the default init leaves class/position embeddings tiny: make every tensor count
        model.visual.class_embedding.normal_()
        model.visual.positional_embedding.normal_(std=0.5)
    return model


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors",
                                  "ViT-B-16-quickgelu-openai.pt"])
def test_open_clip_checkpoint_gives_the_image_tower(tmp_path, name):
    quick = "quickgelu" in name
    ref = _clip(quick)
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save(ref.state_dict(), path)
    model, desc = load_model(path)
    src = desc.source
    assert src["format"] == "open_clip"
    assert src["arch"]["name"] == ("timm:vit_base_patch16_clip_quickgelu_224" if quick else
                                   "timm:vit_base_patch16_clip_224")
    assert any("text tower" in k for k in src["dropped"])
    assert tuple(desc.normalization.mean) == (0.48145466, 0.4578275, 0.40821073)
    assert desc.pooling == "class token, normed, projected (head)"
    # open_clip's tower has a fixed grid: compared at its own 64x64 size
    x = _x(64, 64)
    with torch.no_grad():
        emb = ref.encode_image(x)  # open_clip's image embedding: ln_post(class token) @ proj
        ref.visual.output_tokens = True
        _, tokens = ref.visual(x)  # patch tokens after ln_post
        got = model(x)
        fmap = feature_map(model, x, "norm")
    assert got.shape == emb.shape == (2, 32)
    assert _cos_min(got, emb) >= 0.999
    want = tokens.reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    assert _cos_min(fmap, want) >= 0.999
    assert feature_map(model, _x()).shape[-2:] == (4, 6)  # featviz interpolates positions for other sizes


def test_open_clip_timm_tower_with_its_projection(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    ref = open_clip.model.CLIP(
        embed_dim=32, vision_cfg=CLIPVisionCfg(timm_model_name="convnext_atto", timm_model_pretrained=False,
                                               timm_pool="avg", timm_proj="linear", image_size=64),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)).eval()
    torch.save({"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}},
               tmp_path / "epoch_1.pt")
    model, desc = load_model(tmp_path / "epoch_1.pt")
    assert desc.source["format"] == "open_clip" and desc.source["arch"]["name"] == "timm:convnext_atto"
    x = _x()
    with torch.no_grad():
        want, got = ref.encode_image(x), model(x)
        want_map, got_map = ref.visual.trunk.forward_features(x), feature_map(model, x)
    assert got.shape == want.shape == (2, 32)
    assert _cos_min(got, want) >= 0.999
    assert _cos_min(got_map, want_map) >= 0.999


# ------------------------------------------------------------------ Franca
def test_franca_teacher_with_chunked_blocks(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=4, img_size=56,
                            num_classes=0).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("gamma"):
                p.copy_(torch.randn_like(p) * 0.3)
    sd = ref.state_dict()
    # DINOv2 hub names, blocks in 2 chunks (DINOv2's BlockChunk: global indices), Franca's heads beside
    teacher = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{k.split('.', 1)[1]}"
        teacher[f"backbone.{k}"] = v
    teacher["backbone.mask_token"] = torch.zeros(1, 384)
    teacher["dino_head.mlp.0.weight"] = torch.randn(8, 384)
    teacher["ibot_head.mlp.0.weight"] = torch.randn(8, 384)
    path = tmp_path / "franca_vits14.pth"
    torch.save({"teacher": teacher}, path)
    model, desc = load_model(path)
    assert desc.source["format"] == "franca" and desc.method == "franca"
    x = _x(56, 56)  # the reference keeps its learned grid: compared at its own size (featviz interpolates)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        pooled = ref.forward_head(tokens, pre_logits=True)
        fmap = feature_map(model, x, "norm")
    want = _patches(tokens, 1, (4, 4))
    assert _cos_min(fmap, want) >= 0.999
    assert _cos_min(model(x).detach(), pooled) >= 0.999
    assert feature_map(model, _x(56, 84)).shape[-2:] == (4, 6)
