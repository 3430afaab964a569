"""featviz.views.attention: class-token attention from q/k, DINO's masks, rollout, the command's files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featviz.errors import ArchitectureError, DataError, OutputExistsError
from featviz.views.attention import class_attention, rollout, run_attention, threshold_masks


def vit(**kw):
    import timm

    kw = {"pretrained": False, "num_classes": 0, "dynamic_img_size": True, **kw}
    name = kw.pop("name", "vit_small_patch16_224")
    torch.manual_seed(0)
    m = timm.create_model(name, **kw).eval()
    with torch.no_grad():  # move the weights away from their init, like a trained model
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def transcribed_cls_attention(model, x):
    """Block by block, written out: timm's ViT forward with the attention computed by hand."""
    attn_maps = []
    full = []
    with torch.no_grad():
        t = model.patch_embed(x)
        t = model._pos_embed(t)
        t = model.norm_pre(t)
        for blk in model.blocks:
            h = blk.norm1(t)
            b, n, c = h.shape
            nh = blk.attn.num_heads
            qkv = torch.nn.functional.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias)
            q, k, v = qkv.reshape(b, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
            q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
            a = ((q @ k.transpose(-2, -1)) * (c // nh) ** -0.5).softmax(-1)
            attn_maps.append(a[:, :, 0])
            full.append(a)
            o = (a @ v).transpose(1, 2).reshape(b, n, c)
            t = t + blk.ls1(blk.attn.proj(o))
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return attn_maps, full


@pytest.fixture(scope="module")
def vit_s16():
    return vit()


def test_dino_vit_s16_at_224x320_equals_a_transcription(vit_s16):
    model = vit_s16
    assert all(
        blk.attn.fused_attn for blk in model.blocks
    )  # timm's F.scaled_dot_product_attention path
    x = torch.randn(1, 3, 224, 320)
    out = class_attention(model, x)
    assert out.heads.shape == (1, 6, 14, 20)
    ref, _ = transcribed_cls_attention(model, x)
    want = ref[-1][:, :, 1:].reshape(1, 6, 14, 20).numpy()
    np.testing.assert_allclose(out.heads, want, rtol=1e-4, atol=1e-7)
    for j in range(6):
        assert np.corrcoef(out.heads[0, j].ravel(), want[0, j].ravel())[0, 1] >= 0.99
    np.testing.assert_allclose(out.prefix_share, ref[-1][:, :, :1].sum(-1).numpy(), rtol=1e-4)
    mid = class_attention(model, x, layer=3)
    np.testing.assert_allclose(
        mid.heads, ref[3][:, :, 1:].reshape(1, 6, 14, 20).numpy(), rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("fused", [True, False])
def test_fused_and_unfused_paths_agree(fused):
    model = vit(name="vit_tiny_patch16_224", depth=3, qk_norm=True)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    x = torch.randn(2, 3, 64, 112)
    ref, _ = transcribed_cls_attention(model, x)
    np.testing.assert_allclose(
        class_attention(model, x).heads,
        ref[-1][:, :, 1:].reshape(2, 3, 4, 7).numpy(),
        rtol=1e-4,
        atol=1e-7,
    )


def test_unfused_softmax_hook_agrees():
    """The vit-explain way (hook the softmax of the unfused path) gives the same maps."""
    model = vit(name="vit_tiny_patch16_224", depth=3)
    seen = []
    blk = model.blocks[-1]
    blk.attn.fused_attn = False
    h = blk.attn.attn_drop.register_forward_hook(lambda _m, _i, o: seen.append(o))
    x = torch.randn(1, 3, 160, 96)
    with torch.no_grad():
        model(x)
    h.remove()
    ours = class_attention(model, x).heads
    np.testing.assert_allclose(
        ours, seen[0][:, :, 0, 1:].reshape(1, 3, 10, 6).numpy(), rtol=1e-4, atol=1e-7
    )


def test_register_tokens_are_excluded_but_stated():
    model = vit(name="vit_small_patch16_224", depth=3, reg_tokens=4, class_token=True)
    assert model.num_prefix_tokens == 5
    x = torch.randn(1, 3, 96, 128)
    out = class_attention(model, x)
    assert out.heads.shape == (1, 6, 6, 8)
    ref, _ = transcribed_cls_attention(model, x)
    np.testing.assert_allclose(
        out.heads, ref[-1][:, :, 5:].reshape(1, 6, 6, 8).numpy(), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(out.heads.sum((-1, -2)) + out.prefix_share, 1.0, rtol=1e-5)
    assert (out.prefix_share > 0).all()


def test_threshold_masks_equal_dino_visualize_attention():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 14, 20)).astype(np.float32) ** 4
    t = torch.from_numpy(maps.reshape(6, -1).copy())
    val, idx = torch.sort(t)  # DINO visualize_attention.py, --threshold 0.6
    val /= torch.sum(val, dim=1, keepdim=True)
    th = torch.cumsum(val, dim=1) > (1 - 0.6)
    idx2 = torch.argsort(idx)
    for head in range(6):
        th[head] = th[head][idx2[head]]
    np.testing.assert_array_equal(threshold_masks(maps, 0.6), th.reshape(6, 14, 20).numpy())
    kept = threshold_masks(maps, 0.6)
    assert all(maps[j][kept[j]].sum() / maps[j].sum() >= 0.6 for j in range(6))


def test_rollout_equals_abnar_compute_joint_attention():
    model = vit(name="vit_tiny_patch16_224", depth=4)
    x = torch.randn(1, 3, 64, 96)
    _, full = transcribed_cls_attention(model, x)
    # Abnar & Zuidema's compute_joint_attention on head-averaged attention, add_residual=True
    att = np.stack([a[0].mean(0).numpy() for a in full]).astype(np.float64)
    aug = att + np.eye(att.shape[1])[None]
    aug = aug / aug.sum(axis=-1)[..., None]
    joint = aug[0]
    for i in range(1, len(aug)):
        joint = aug[i] @ joint
    out = class_attention(model, x, rollout_maps=True)
    np.testing.assert_allclose(out.rollout[0], joint[0, 1:].reshape(4, 6), rtol=1e-4)
    r = rollout(full, head_fusion="max").numpy()
    np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-5)  # rows stay distributions
    r9 = rollout(full, head_fusion="min", discard_ratio=0.9).numpy()
    assert np.isfinite(r9).all() and not np.allclose(r9, rollout(full, head_fusion="min").numpy())


def test_a_cnn_is_pointed_to_cam():
    from featviz.models.architectures import build_backbone

    with pytest.raises(ArchitectureError, match="featviz cam"):
        class_attention(build_backbone("resnet18"), torch.randn(1, 3, 64, 64))


def test_run_attention_files(tmp_path, sample_dir, vit_s16):
    model = vit_s16
    imgs = [
        sample_dir / "photos" / "cat" / "cat_0.jpg",
        sample_dir / "photos" / "rocket" / "rocket_1.jpg",
    ]
    out = tmp_path / "att"
    s = run_attention(imgs, out, model=model, image_size="224x320", rollout_maps=True)
    assert s["images"] == 2 and s["heads"] == 6 and s["grid"] == [14, 20] and s["layer"] == 11
    with np.load(out / "maps.npz") as z:
        assert z["attention"].shape == (2, 6, 14, 20) and z["attention"][0].shape == (6, 14, 20)
        assert z["masks"].dtype == bool and z["rollout"].shape == (2, 14, 20)
        assert list(z["ids"])[0] == "cat_0.jpg"
        ref, _ = transcribed_cls_attention(model, _input(imgs[0], model, (224, 320)))
        want = ref[-1][0, :, 1:].reshape(6, 14, 20).numpy()
        for j in range(6):
            assert np.corrcoef(z["attention"][0, j].ravel(), want[j].ravel())[0, 1] >= 0.99
    m = json.loads((out / "manifest.json").read_text())
    assert (
        m["command"] == "attention" and m["tokens"]["class"] == 1 and m["image_size"] == [224, 320]
    )
    assert (out / "contact_sheet.png").stat().st_size > 10_000
    assert len(list((out / "overlays").glob("cat_0.*.png"))) == 6 + 3
    with pytest.raises(OutputExistsError):
        run_attention(imgs, out, model=model)
    with pytest.raises(
        DataError,
        match="not a multiple of this ViT.s 16x16 patches; nearest valid sizes: 224x320 or 224x336",
    ):
        run_attention(imgs, tmp_path / "bad", model=model, image_size="224x330")
    assert not (tmp_path / "bad").exists()


def _input(path, model, hw):
    from featviz.data.images import eval_transform, load_image, normalization_of

    return eval_transform(hw, *normalization_of(model))(load_image(path))[None]


def test_dino_vit_s16_checkpoint_loads_with_no_flags_and_matches(cli, tmp_path, sample_dir, vit_s16):
    """Done-when of issue 13: the official DINO backbone layout (bare timm key names), random weights,
    `featviz attention --image-size 224x320`: maps.npz holds (6, 14, 20) per image, equal to a
    transcription of the reference model's last-block class-token attention."""
    ckpt = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vit_s16.state_dict(), ckpt)  # what DINO publishes: the backbone state dict, no wrapper
    img = sample_dir / "photos" / "astronaut" / "astronaut_1.jpg"
    r = cli("attention", img, "--checkpoint", ckpt, "--image-size", "224x320", "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["grid"] == [14, 20]
    with np.load(tmp_path / "a" / "maps.npz") as z:
        maps = z["attention"][0]
    assert maps.shape == (6, 14, 20)
    from featviz.data.images import IMAGENET_MEAN, IMAGENET_STD, eval_transform, load_image

    x = eval_transform((224, 320), IMAGENET_MEAN, IMAGENET_STD)(load_image(img))[None]  # DINO's normalisation
    ref, _ = transcribed_cls_attention(vit_s16, x)
    want = ref[-1][0, :, 1:].reshape(6, 14, 20).numpy()
    for j in range(6):
        assert np.corrcoef(maps[j].ravel(), want[j].ravel())[0, 1] >= 0.99
    np.testing.assert_allclose(maps, want, rtol=1e-3, atol=1e-6)
