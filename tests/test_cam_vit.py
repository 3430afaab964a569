"""featviz cam --method legrad,gae: equal to transcriptions of the official code on tiny seeded ViTs.

The references below are written from the official code, not from featviz:

- GAE: hila-chefer/Transformer-MM-Explainability, ``Transformer_MM_explainability_ViT.ipynb``
  (``avg_heads``, ``apply_self_attention_rules``, ``generate_relevance``: one image, ``R = I``,
  ``R += avg_heads(cam, grad) @ R`` over ``model.blocks``, ``R[0, 1:]``; then
  ``interpolate(scale_factor=16, mode='bilinear')`` and min-max).
- LeGrad: WalBouss/LeGrad ``legrad/wrapper.py::compute_legrad_clip`` (blocks from ``layer_index=-2``;
  ``ln_post(feat.mean over tokens) @ proj``; ``F.normalize``; ``sim = text @ feat.T``; ``grad`` of the
  summed one-hot score w.r.t. that block's ``attention_map``; ``clamp(min=0)``; mean over heads then
  queries; ``[:, 1:]``; ``interpolate(scale_factor=patch, 'bilinear')``; summed; ``min_max``).

Their attention is recorded by a hand-written copy of the official hooked attention forward
(``hooked_attention_forward``: ``q·scale @ kᵀ``, softmax, kept), not by featviz's recorder. The
official code has one class token (``[:, 1:]``, ``R[0, 1:]``); here every prefix token (class +
4 registers) is dropped, the generalisation docs/cam.md names.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featviz.errors import DataError
from featviz.models.description import attach, describe
from featviz.views import cam as C

MEAN = STD = (0.5, 0.5, 0.5)


def _vit(num_classes=5, img_size=(32, 48), reg_tokens=4, depth=3, **kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=depth, num_heads=2,
                          num_classes=num_classes, reg_tokens=reg_tokens, **kw).eval()
    if num_classes:
        attach(m, describe(m).with_changes(kind="classifier"))
    return m


class _Hooked:
    """The official hooked attention forward on timm's Attention: keeps ``attention_map``."""

    def __init__(self, model):
        self.model, self.saved = model, {}

    def __enter__(self):
        def make(attn, i):
            def forward(x, attn_mask=None, **_):
                b, n, c = x.shape
                qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)
                q, k = attn.q_norm(q), attn.k_norm(k)
                a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
                self.saved[i] = a  # "self.attention_map = attn"
                x = (a @ v).transpose(1, 2).reshape(b, n, c)
                return attn.proj(attn.norm(x))

            return forward

        for i, blk in enumerate(self.model.blocks):
            blk.attn.forward = make(blk.attn, i)
        return self

    def __exit__(self, *exc):
        for blk in self.model.blocks:
            del blk.attn.forward


def _minmax(t):
    return (t - t.min()) / (t.max() - t.min())


def _gae_reference(model, image, index, prefix, grid, patch=8):
    """generate_relevance (Transformer_MM_explainability_ViT.ipynb) for one image, then its visualisation."""
    with _Hooked(model) as hk:
        inp = image.clone().requires_grad_(True)
        output = model(inp)
        grads = {}
        for i, a in hk.saved.items():
            a.register_hook(lambda g, i=i: grads.__setitem__(i, g))  # "save_attn_gradients"
        one_hot = np.zeros((1, output.size()[-1]), dtype=np.float32)
        one_hot[0, index] = 1
        one_hot = torch.sum(torch.from_numpy(one_hot).requires_grad_(True) * output)
        model.zero_grad()
        one_hot.backward(retain_graph=True)
        num_tokens = hk.saved[0].shape[-1]
        r = torch.eye(num_tokens, num_tokens)
        for i in range(len(model.blocks)):
            cam, grad = hk.saved[i].detach(), grads[i]
            cam = cam.reshape(-1, cam.shape[-2], cam.shape[-1])  # avg_heads
            grad = grad.reshape(-1, grad.shape[-2], grad.shape[-1])
            cam = (grad * cam).clamp(min=0).mean(dim=0)
            r += torch.matmul(cam, r)  # apply_self_attention_rules
    rel = r[0, prefix:].reshape(1, 1, *grid)
    rel = F.interpolate(rel, scale_factor=patch, mode="bilinear").reshape(grid[0] * patch, grid[1] * patch)
    return _minmax(rel).numpy()


def _legrad_reference(model, image, score, prefix, grid, patch=8, layer_index=-2):
    """compute_legrad_clip on a timm ViT; ``score(feat)`` is the official ``sim`` of a pooled feature."""
    with _Hooked(model) as hk:
        feats = {}
        hs = [blk.register_forward_hook(lambda _m, _a, o, i=i: feats.__setitem__(i, o))  # feat_post_mlp
              for i, blk in enumerate(model.blocks)]
        model(image.clone().requires_grad_(True))
        for h in hs:
            h.remove()
        depth = len(model.blocks)
        start = depth + layer_index
        accum = 0
        for layer in range(start, depth):
            pooled = model.norm(feats[layer].mean(dim=1))  # ln_post(feat.mean(dim=tokens))
            one_hot = torch.sum(score(pooled))
            grad = torch.autograd.grad(one_hot, [hk.saved[layer]], retain_graph=True, create_graph=True)[0]
            grad = torch.clamp(grad, min=0.0)
            rel = grad.mean(dim=1).mean(dim=1)[:, prefix:]  # heads, then [CLS] + patch queries
            expl = rel.reshape(1, 1, *grid)
            accum = accum + F.interpolate(expl, scale_factor=patch, mode="bilinear")
    return _minmax(accum[0, 0]).detach().numpy()


def _explain(model, x, method, kind="top1", arg=None, reference=None):
    info = C.probe_model(model, x)
    ctx = C.TargetContext(C.TargetSpec(kind, arg), info, MEAN, STD, reference)
    targets = C.make_targets(ctx, x)
    return C.explain(info, x, method, [], targets), targets


@pytest.mark.parametrize("img_size", [(32, 48), (40, 40)])
def test_gae_equals_transformer_mm_explainability(img_size):
    model = _vit(img_size=img_size)
    x = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(3))
    (maps, stats), targets = _explain(model, x, "gae")
    grid = (img_size[0] // 8, img_size[1] // 8)
    for i in range(2):
        ref = _gae_reference(model, x[i:i + 1], targets[i].category, 5, grid)
        np.testing.assert_allclose(maps[i], ref, atol=1e-5)
    assert maps.shape == (2, *img_size) and all(s.status == "ok" for s in stats)
    assert maps.std() > 0.05 and not np.allclose(maps[0], maps[1])  # real, per-image maps


@pytest.mark.parametrize("img_size", [(32, 48), (40, 40)])
def test_legrad_equals_the_papers_code_for_a_class(img_size):
    model = _vit(img_size=img_size)
    x = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(4))
    (maps, _), _ = _explain(model, x, "legrad", "class", "2")
    grid = (img_size[0] // 8, img_size[1] // 8)
    for i in range(2):
        ref = _legrad_reference(model, x[i:i + 1], lambda f: model.head(model.fc_norm(f))[:, 2], 5, grid)
        np.testing.assert_allclose(maps[i], ref, atol=1e-5)
    assert maps.std() > 0.05


def test_legrad_similarity_target_is_the_official_clip_similarity():
    """An SSL encoder (no head) explained by similarity to a reference: the official text·image cosine."""
    model = _vit(num_classes=0)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    ref_emb = model(torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(6)))[0].detach()
    (maps, _), _ = _explain(model, x, "legrad", "similarity", "ref.png", reference=ref_emb)
    text = F.normalize(ref_emb[None], dim=-1)
    for i in range(2):
        ref = _legrad_reference(model, x[i:i + 1], lambda f: text @ F.normalize(f, dim=-1).transpose(-1, -2),
                                5, (4, 6))
        np.testing.assert_allclose(maps[i], ref, atol=1e-5)


def test_gae_and_legrad_with_ssl_targets_and_no_class_token():
    """self and pair on an encoder; an average-pooled ViT without a class token reads GAE's patch rows."""
    model = _vit(num_classes=0)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(7))
    for method in ("gae", "legrad"):
        for kind in ("self", "pair"):
            (maps, stats), _ = _explain(model, x, method, kind)
            assert maps.shape == (2, 32, 48) and np.isfinite(maps).all() and maps.max() == pytest.approx(1)
            assert stats[0].status == "ok", (method, kind, stats[0])
    avg = _vit(num_classes=0, class_token=False, global_pool="avg", reg_tokens=0)
    (maps, stats), _ = _explain(avg, x, "gae", "self")
    assert maps.shape == (2, 32, 48) and stats[0].status == "ok"


def test_rope_eva_reads_the_models_own_attention_in_the_graph():
    """timm's Eva with RoPE and 4 registers, non-square: the recorded probabilities are featviz attention's."""
    from timm.models.eva import Eva

    from featviz.views.attention_probs import model_attention, recording_attention

    torch.manual_seed(0)
    model = Eva(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4,
                use_rot_pos_emb=True, num_reg_tokens=4, dynamic_img_size=True).eval()
    attach(model, describe(model).with_changes(kind="classifier"))
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(8))
    plain = model_attention(model, model.blocks, x, [0, 1], 5 + 24)
    with recording_attention(model, model.blocks, [0, 1]) as rec:
        model(x.clone().requires_grad_(True))
    kept = rec.probabilities(5 + 24, 1)
    for i in (0, 1):
        assert kept[i].requires_grad and kept[i].shape == (1, 2, 29, 29)
        torch.testing.assert_close(kept[i].detach(), plain[i])
    for method in ("gae", "legrad"):
        (maps, stats), _ = _explain(model, x, method)
        assert stats[0].status == "ok" and maps.shape == (1, 32, 48) and maps.max() == pytest.approx(1)


def test_cnn_refused_in_one_line_pointing_to_cnn_methods():
    from featviz.models.architectures import build_backbone

    m = build_backbone("resnet18_w8-cifar", seed=0).eval()
    info = C.probe_model(m, torch.randn(1, 3, 32, 32))
    for method in ("legrad", "gae"):
        why = C.not_applicable(method, info, token_layer=False)
        assert why and "gradcam" in why and "\n" not in why
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(Exception, match="CNN"):
        C.explain(info, x, "gae", [], C.make_targets(C.TargetContext(C.TargetSpec("self"), info, MEAN, STD), x))
    assert DataError  # the CLI path: tests/test_cam_scores.py runs the command


def test_hooks_and_fused_flags_restored():
    model = _vit()
    flags = [b.attn.fused_attn for b in model.blocks]
    x = torch.randn(1, 3, 32, 48)
    _explain(model, x, "gae")
    _explain(model, x, "legrad")
    assert [b.attn.fused_attn for b in model.blocks] == flags
    assert not [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_hf_dinov3_gae_on_transformers_own_attention_with_rope_and_registers(tmp_path):
    """A transformers DINOv3 (RoPE, 4 registers) through featviz's HF adapter: GAE equals the official rule on
    the probabilities transformers returns (``output_attentions``, eager); LeGrad is refused, pointing to gae."""
    transformers = pytest.importorskip("transformers")
    from featviz.models.loader import load_model

    torch.manual_seed(0)
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=128, patch_size=16, image_size=64, num_register_tokens=4)
    ref = transformers.DINOv3ViTModel(cfg).eval()
    ref.save_pretrained(tmp_path / "d3")
    model, _ = load_model(tmp_path / "d3")
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(9))
    (maps, stats), _ = _explain(model, x, "gae", "self")
    ref.set_attn_implementation("eager")
    inp = x.clone().requires_grad_(True)
    out = ref(pixel_values=inp, output_attentions=True)
    emb = out.pooler_output
    value = (emb * F.normalize(emb.detach().flatten(), dim=0).view_as(emb)).sum()
    grads = torch.autograd.grad(value, out.attentions)
    r = torch.eye(out.attentions[0].shape[-1])
    for cam, grad in zip(out.attentions, grads, strict=True):
        cam = (grad[0] * cam[0].detach()).clamp(min=0).mean(dim=0)
        r += torch.matmul(cam, r)
    rel = F.interpolate(r[0, 5:].reshape(1, 1, 4, 6), scale_factor=16, mode="bilinear")[0, 0]
    np.testing.assert_allclose(maps[0], _minmax(rel).numpy(), atol=1e-5)
    assert stats[0].status == "ok"
    info = C.probe_model(model, x)
    why = C.not_applicable("legrad", info, token_layer=False)
    assert why and "gae" in why
