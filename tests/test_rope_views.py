"""Views on a RoPE ViT (timm's DINOv3): attention with the rotary embedding applied, cam, pca, crops at 224x320.

The model is timm's own ``vit_small_patch16_dinov3`` (Eva: patch 16, 1 class + 4 storage tokens, RoPE,
LayerScale), shrunk to embed_dim 64, depth 2, 2 heads, random seeded weights. The reference attention is
written out here from the block's own weights: its input (``norm1`` output), ``qkv`` with DINOv3's
q/v biases, q/k norms, timm's ``apply_rot_embed_cat`` with the model's ``rope`` embedding of the 14x20
grid on the patch tokens, ``softmax(q·scale @ kᵀ)``. Dropping the rotary embedding (from the reference,
or from the model featviz reads) fails the check, so the check can fail.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featviz.errors import ArchitectureError
from featviz.views.attention import class_attention

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
H, W = 224, 320
GRID = (14, 20)
PREFIX = 5  # 1 class + 4 storage tokens
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2, "global_pool": "token"}


@pytest.fixture(scope="module")
def dinov3():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, dynamic_img_size=True,
                          **KWARGS).eval()
    with torch.no_grad():  # away from the init (zero q/v biases), like a trained model
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert type(m).__name__ == "Eva" and m.rope is not None and m.num_prefix_tokens == PREFIX
    assert m.reg_token.shape[1] == 4 and getattr(m, "pos_embed", None) is None
    return m


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A photo already at 224x320 (so `--image-size 224x320` feeds its pixels unchanged)."""
    src = Image.open(SAMPLE / "photos" / "astronaut" / "astronaut_1.jpg").convert("RGB")
    path = tmp_path_factory.mktemp("img") / "astronaut_224x320.png"
    src.resize((W, H), Image.BICUBIC).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(dinov3, tmp_path_factory):
    """The model as featviz's own file (arch and normalisation in its metadata): loads with no flags."""
    from featviz.models.checkpoints import save_featviz

    path = tmp_path_factory.mktemp("ck") / "dinov3_tiny.safetensors"
    save_featviz(path, {f"backbone.{k}": v for k, v in dinov3.state_dict().items()},
                 {"arch": {"family": "timm", "name": "timm:vit_small_patch16_dinov3", "kwargs": KWARGS},
                  "normalization": {"mean": list(MEAN), "std": list(STD)}})
    return path


def pixels(path) -> torch.Tensor:
    """The image's own pixels, normalised: what the model must see for `--image-size 224x320`."""
    a = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((a - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])[None]


def reference_attention(model, x, *, rope: bool = True) -> list[torch.Tensor]:
    """Each block's (B, heads, T, T) attention, written out from its weights (RoPE on the patch tokens)."""
    from timm.layers import apply_rot_embed_cat

    inputs = {}
    hooks = [b.attn.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    emb = model.rope.get_embed(shape=[x.shape[-2] // 16, x.shape[-1] // 16])
    out = []
    for i, blk in enumerate(model.blocks):
        a, t = blk.attn, inputs[i]
        b, n, _ = t.shape
        bias = None if a.q_bias is None else torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias))
        qkv = torch.nn.functional.linear(t, a.qkv.weight, bias).reshape(b, n, 3, a.num_heads, -1)
        q, k = (z.transpose(1, 2) for z in qkv.unbind(2)[:2])
        q, k = a.q_norm(q), a.k_norm(k)
        if rope:
            p = a.num_prefix_tokens
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], emb, half=a.rotate_half)], 2)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], emb, half=a.rotate_half)], 2)
        with torch.no_grad():
            out.append(((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1))
    return out


def class_maps(attn: torch.Tensor) -> np.ndarray:
    """The class token's row over the patches, (B, heads, 14, 20)."""
    return attn[:, :, 0, PREFIX:].reshape(attn.shape[0], attn.shape[1], *GRID).numpy()


def assert_matches(maps: np.ndarray, want: np.ndarray) -> None:
    """Correlation ≥ 0.99 per head (the issue's bar), and equal values."""
    for i in range(want.shape[0]):
        for j in range(want.shape[1]):
            r = np.corrcoef(maps[i, j].ravel(), want[i, j].ravel())[0, 1]
            assert r >= 0.99, f"image {i} head {j}: correlation {r:.4f}"
    np.testing.assert_allclose(maps, want, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------ tokens
def test_the_token_layout_counts_dinov3s_storage_tokens(dinov3):
    from featviz.models.features import reshape_transform, token_layout

    lay = token_layout(dinov3, (H, W))
    assert lay.grid == GRID and lay.prefix == PREFIX and lay.patch == (16, 16)
    assert lay.to_dict() == {"grid": list(GRID), "class": 1, "register": 4, "other": 0, "excluded_from_maps": 5}
    # cam's reshape drops exactly the 5 prefix tokens: marked prefix tokens never reach the map
    t = torch.randn(2, PREFIX + GRID[0] * GRID[1], 64)
    t[:, :PREFIX] = 1e6
    fmap = reshape_transform(dinov3, (H, W))(t)
    assert fmap.shape == (2, 64, *GRID) and fmap.abs().max() < 1e3
    torch.testing.assert_close(fmap, t[:, PREFIX:].reshape(2, *GRID, 64).permute(0, 3, 1, 2))


def test_the_feature_core_gives_dinov3s_patch_grid_at_224x320(dinov3):
    from featviz.models.features import feature_map

    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        tokens = dinov3.forward_features(x)  # timm's own forward: normed tokens, RoPE applied
        fmap = feature_map(dinov3, x)  # the default layer: the final norm
    assert fmap.shape == (2, 64, *GRID)
    ref = tokens[:, PREFIX:].reshape(2, *GRID, 64).permute(0, 3, 1, 2)
    cos = torch.nn.functional.cosine_similarity(fmap, ref, dim=1)
    assert cos.min() >= 0.999


# ------------------------------------------------------------------ attention
def test_attention_applies_rope_at_224x320(dinov3):
    x = torch.randn(2, 3, H, W)
    fused = [b.attn.fused_attn for b in dinov3.blocks]
    ref = reference_attention(dinov3, x)
    out = class_attention(dinov3, x)
    assert out.heads.shape == (2, 2, *GRID)
    assert_matches(out.heads, class_maps(ref[-1]))
    np.testing.assert_allclose(out.prefix_share, ref[-1][:, :, 0, :PREFIX].sum(-1).numpy(), rtol=1e-4)
    assert_matches(class_attention(dinov3, x, layer=0).heads, class_maps(ref[0]))
    # rollout is built from the same (RoPE) matrices
    from featviz.views.attention import rollout

    roll = class_attention(dinov3, x, rollout_maps=True).rollout
    want = rollout(ref)[:, 0, PREFIX:].reshape(2, *GRID).numpy()
    np.testing.assert_allclose(roll, want, rtol=1e-4, atol=1e-7)
    assert [b.attn.fused_attn for b in dinov3.blocks] == fused  # the model is left as it was


def test_dropping_rope_fails_the_check(dinov3, image):
    """A map without the rotary embedding is plausible-looking and wrong: the check above catches it."""
    x = pixels(image)
    want = class_maps(reference_attention(dinov3, x)[-1])
    without = class_maps(reference_attention(dinov3, x, rope=False)[-1])
    with pytest.raises(AssertionError, match="correlation"):
        assert_matches(without, want)
    no_rope = copy.deepcopy(dinov3)
    no_rope.rope = None  # Eva then runs its blocks with rope=None: q·kᵀ without the rotation
    with pytest.raises(AssertionError, match="correlation"):
        assert_matches(class_attention(no_rope, x).heads, want)
    assert_matches(class_attention(dinov3, x).heads, want)


def test_featviz_attention_cli_on_an_image_already_224x320(cli, dinov3, checkpoint, image, tmp_path):
    r = cli("attention", image, "--checkpoint", checkpoint, "--image-size", f"{H}x{W}", "--rollout",
            "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["grid"] == list(GRID) and summary["heads"] == 2
    assert summary["prefix_tokens"] == {"grid": list(GRID), "class": 1, "register": 4, "other": 0,
                                        "excluded_from_maps": 5}
    with np.load(tmp_path / "a" / "maps.npz") as z:
        maps, roll = z["attention"], z["rollout"]
    ref = reference_attention(dinov3, pixels(image))
    assert_matches(maps, class_maps(ref[-1]))
    from featviz.views.attention import rollout

    np.testing.assert_allclose(roll, rollout(ref)[:, 0, PREFIX:].reshape(1, *GRID).numpy(), rtol=1e-3, atol=1e-6)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "rotary" in man["definitions"]["attention"]
    assert man["resize"] == f"whole image resized to {H}x{W}"
    assert man["model"]["description"]["position_embedding"] in ("rope", None)


def test_an_attention_featviz_cannot_read_is_refused_in_one_line():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2,
                              dynamic_img_size=True).eval()

    class MyAttention(torch.nn.Module):  # a subclass may compute anything: it is not trusted
        def __init__(self, inner):
            super().__init__()
            self.inner, self.qkv, self.num_heads = inner, inner.qkv, inner.num_heads

        def forward(self, x, **kw):
            return self.inner(x, **kw)

    model.blocks[-1].attn = MyAttention(model.blocks[-1].attn)
    with pytest.raises(ArchitectureError) as e:
        class_attention(model, torch.randn(1, 3, 64, 96))
    msg = str(e.value)
    assert "\n" not in msg and "MyAttention" in msg and "featviz cam" in msg


def test_a_model_with_attention_maps_is_asked_for_them():
    """The Hugging Face adapter's way: `attention_maps(x, block)` gives the model's own probabilities."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2,
                              dynamic_img_size=True).eval()
    gh, gw = 4, 6
    t = 1 + gh * gw
    asked = []

    def attention_maps(x, block):
        asked.append(block)
        g = torch.Generator().manual_seed(block)
        return torch.rand(len(x), 3, t, t, generator=g).softmax(-1)

    model.attention_maps = attention_maps
    out = class_attention(model, torch.randn(2, 3, 64, 96), rollout_maps=True)
    want = attention_maps(torch.zeros(2), 1)[:, :, 0, 1:].reshape(2, 3, gh, gw).numpy()
    np.testing.assert_allclose(out.heads, want, rtol=1e-6)
    assert asked[:2] == [0, 1]
    model.attention_maps = lambda x, block: torch.rand(len(x), 3, t, t)  # not probabilities: refused
    with pytest.raises(ArchitectureError, match="not softmax probabilities"):
        class_attention(model, torch.randn(1, 3, 64, 96))


# ------------------------------------------------------------------ cam, pca, crops
def test_cam_pca_and_crops_on_dinov3_at_224x320(cli, dinov3, checkpoint, image, tmp_path):
    size = f"{H}x{W}"
    r = cli("cam", image, "-c", checkpoint, "--image-size", size, "--method", "gradcam", "--target", "self",
            "--out", tmp_path / "cam", "--json")
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "cam" / "maps.npz") as z:
        assert z["gradcam"].shape == (1, H, W)
        assert np.isfinite(z["gradcam"]).all() and z["gradcam"].max() > 0
    man = json.loads((tmp_path / "cam" / "manifest.json").read_text())
    assert man["reshape_transform"] == {"grid": list(GRID), "prefix_tokens": PREFIX, "channels_last": False}
    assert man["resize"] == f"whole image resized to {H}x{W}"

    r = cli("pca", image, "-c", checkpoint, "--image-size", size, "--out", tmp_path / "pca", "--json")
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "pca" / "pca.npz") as z:
        assert list(z["grid"]) == list(GRID) and list(z["image_size"]) == [H, W]
        assert z["projections"].shape[-2:] == GRID or z["projections"].shape[1:3] == GRID

    # crops: the heatmap is the channel mean of the last block's patch tokens (5 prefix tokens dropped)
    r = cli("crops", image, "-c", checkpoint, "--image-size", size, "--samples", "4", "--pairs", "2",
            "--out", tmp_path / "crops", "--json")
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "crops" / "crops.npz") as z:
        heat = z["heatmaps"].astype(np.float32)
    assert heat.shape == (1, H, W)
    seen = []
    hook = dinov3.blocks[-1].register_forward_hook(lambda _m, _i, o: seen.append(o))
    with torch.no_grad():
        dinov3(pixels(image))
    hook.remove()
    fmap = seen[0][:, PREFIX:].reshape(1, *GRID, 64).permute(0, 3, 1, 2)
    assert fmap.shape == (1, 64, *GRID)
    m = fmap.mean(1, keepdim=True)
    m = (m - m.amin()) / (m.amax() - m.amin())
    want = torch.nn.functional.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)[:, 0].numpy()
    assert np.corrcoef(heat.ravel(), want.ravel())[0, 1] >= 0.99
