"""Hugging Face folders (transformers' save_pretrained, timm's save_for_hf) load with no flags and match the reference.

Every model is built with the reference library itself (smallest config, seeded random weights, the real
patch size) and compared, on the same pixels at a non-square size, with its own forward: cosine >= 0.999
per patch and for the pooled embedding.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import transformers  # noqa: E402

from featviz.errors import CheckpointError, MissingDependencyError  # noqa: E402
from featviz.models.features import FeatureExtractor, get_layer, input_size, token_layout  # noqa: E402
from featviz.models.loader import inspect_checkpoint, load_model  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)

# class name -> (config class, config kwargs, non-square H x W, prefix tokens, how the family pools)
CASES = {
    "Dinov2Model": ("Dinov2Config", dict(patch_size=14, image_size=56), (56, 84), 1, "pooler"),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", dict(patch_size=14, image_size=56,
                                                                   num_register_tokens=4), (56, 84), 5, "pooler"),
    "DINOv3ViTModel": ("DINOv3ViTConfig", dict(patch_size=16, image_size=64, num_register_tokens=4), (64, 96), 5,
                       "pooler"),
    "ViTMAEModel": ("ViTMAEConfig", dict(patch_size=16, image_size=64), (64, 96), 1, "cls"),
    "IJepaModel": ("IJepaConfig", dict(patch_size=14, image_size=56), (56, 84), 0, "mean"),
    "ViTModel": ("ViTConfig", dict(patch_size=16, image_size=64), (64, 96), 1, "cls"),
    "SiglipVisionModel": ("SiglipVisionConfig", dict(patch_size=16, image_size=64), (64, 96), 0, "pooler"),
    "Siglip2VisionModel": ("Siglip2VisionConfig", dict(patch_size=16, num_patches=16), (64, 96), 0, "pooler"),
    "CLIPVisionModel": ("CLIPVisionConfig", dict(patch_size=16, image_size=64), (64, 96), 1, "pooler"),
}


def _build(name: str):
    cfg_name, kw, hw, prefix, pool = CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_name)(**TINY, **kw)
    return getattr(transformers, name)(config).eval(), hw, prefix, pool


def _reference(ref, name: str, x: torch.Tensor):
    """The reference model's own outputs on ``x``: (last block's patch tokens (N, P, C), normed tokens, pooled)."""
    kw = {}
    if name == "Siglip2VisionModel":  # NaFlex: transformers' own patchify (image_processing_siglip2)
        p = ref.config.patch_size
        n, c, h, w = x.shape
        patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)
        kw = dict(pixel_values=patches,
                  pixel_attention_mask=torch.ones(n, (h // p) * (w // p), dtype=torch.long),
                  spatial_shapes=torch.tensor([[h // p, w // p]] * n))
    else:
        kw = dict(pixel_values=x)
        if name not in ("Dinov2Model", "Dinov2WithRegistersModel", "DINOv3ViTModel"):
            kw["interpolate_pos_encoding"] = True
    with torch.no_grad():
        out = ref(**kw, output_hidden_states=True)
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1)


@pytest.mark.parametrize("name", [n for n in CASES if n != "ViTMAEModel"])
def test_a_transformers_folder_loads_with_no_flags_and_matches_the_reference(tmp_path, name):
    ref, hw, prefix, pool = _build(name)
    ref.save_pretrained(tmp_path / name)
    x = torch.rand(2, 3, *hw)
    out = _reference(ref, name, x)
    gh, gw = hw[0] // ref.config.patch_size, hw[1] // ref.config.patch_size
    block = out.hidden_states[-1][:, prefix:]  # the last layer's output, before the final norm
    assert block.shape[1] == gh * gw
    pooled = {"pooler": out.pooler_output, "cls": out.last_hidden_state[:, 0],
              "mean": out.last_hidden_state.mean(1)}[pool]
    for path in (tmp_path / name, tmp_path / name / "model.safetensors"):
        model, desc = load_model(path)
        assert desc.library == "transformers" and desc.arch.name == f"hf:{name}"
        assert desc.pooling and desc.position_embedding
        assert input_size(model, f"{hw[0]}x{hw[1]}") == hw  # an image already at H x W is taken whole
        layout = token_layout(model, hw)
        assert layout.grid == (gh, gw) and layout.prefix == prefix
        names = [n for n, _ in model.named_modules()]
        assert "blocks.0" in names and "blocks.1" in names and "norm" in names
        get_layer(model, "blocks.1.norm1")  # CAM's default layer under the name every ViT family has
        with torch.no_grad(), FeatureExtractor(model, "blocks.1") as fx:
            fmap = fx(x)
        assert fmap.shape == (2, 64, gh, gw)
        assert _cos(fmap.flatten(2).transpose(1, 2), block).min() >= 0.999
        with torch.no_grad():
            emb = model(x)
        assert emb.shape == pooled.shape and _cos(emb, pooled).min() >= 0.999
        if name != "CLIPVisionModel":  # the default layer is the final norm over every token
            with torch.no_grad(), FeatureExtractor(model) as fx:
                normed = fx(x)
            assert _cos(normed.flatten(2).transpose(1, 2), out.last_hidden_state[:, prefix:]).min() >= 0.999


def test_vitmae_takes_every_patch_in_order(tmp_path):
    """ViTMAE's mask_ratio defaults to 0.75: featviz turns masking off and keeps the patch order (identity)."""
    ref, hw, _, _ = _build("ViTMAEModel")
    assert ref.config.mask_ratio == 0.75
    ref.save_pretrained(tmp_path / "mae")
    x = torch.rand(2, 3, *hw)
    gh, gw = hw[0] // 16, hw[1] // 16
    with torch.no_grad():
        masked = ref(pixel_values=x, interpolate_pos_encoding=True)
    assert masked.last_hidden_state.shape[1] == 1 + int(gh * gw * 0.25)  # the reference masks by default
    ref.config.mask_ratio = 0.0
    with torch.no_grad():  # every patch, in a random order that ids_restore undoes
        out = ref(pixel_values=x, interpolate_pos_encoding=True)
    shuffled = out.last_hidden_state[:, 1:]
    restored = torch.gather(shuffled, 1, out.ids_restore.unsqueeze(-1).expand(-1, -1, shuffled.shape[-1]))
    assert not torch.equal(out.ids_restore[0], torch.arange(gh * gw))  # the reference did shuffle
    model, desc = load_model(tmp_path / "mae")
    assert any("mask_ratio" in w for w in desc.warnings) and "no masking" in desc.pooling
    with torch.no_grad():
        run = model.run(x)
        emb = model(x)
        with FeatureExtractor(model) as fx:
            fmap = fx(x)
    assert torch.equal(run.ids_restore, torch.arange(gh * gw).expand(2, -1))  # identity: no shuffle
    assert _cos(fmap.flatten(2).transpose(1, 2), restored).min() >= 0.999
    assert _cos(emb, out.last_hidden_state[:, 0]).min() >= 0.999


def test_dinov3_attention_maps_are_the_models_own_with_rope(tmp_path):
    ref, hw, prefix, _ = _build("DINOv3ViTModel")
    ref.save_pretrained(tmp_path / "d3")
    x = torch.rand(1, 3, *hw)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        want = ref(pixel_values=x, output_attentions=True).attentions[1]
    model, desc = load_model(tmp_path / "d3")
    assert desc.position_embedding == "rope"
    before = model.hf.config._attn_implementation
    with torch.no_grad():
        got = model.attention_maps(x, 1)
    tokens = prefix + (hw[0] // 16) * (hw[1] // 16)
    assert got.shape == (1, 2, tokens, tokens)
    assert torch.allclose(got, want, atol=1e-5)
    assert model.hf.config._attn_implementation == before  # the fused kernel is back for the other views
    ref.rope_embeddings.forward = lambda *a, **k: (torch.ones(1, 1, 32), torch.zeros(1, 1, 32))  # RoPE dropped
    with torch.no_grad():
        no_rope = ref(pixel_values=x, output_attentions=True).attentions[1]
    assert not torch.allclose(got, no_rope, atol=1e-3)  # the check above would see a map without RoPE


def test_preprocessor_config_gives_the_normalisation(tmp_path):
    ref, _, _, _ = _build("CLIPVisionModel")
    ref.save_pretrained(tmp_path / "clip")
    _, desc = load_model(tmp_path / "clip")
    assert desc.normalization.mean[0] == pytest.approx(0.48145466) and "default" in desc.normalization.source
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    _, desc = load_model(tmp_path / "clip")
    assert desc.normalization.mean == (0.1, 0.2, 0.3) and desc.normalization.source == "preprocessor_config.json"
    report = inspect_checkpoint(tmp_path / "clip")
    assert report["format"] == "transformers" and report["arch_details"]["pooling"] == desc.pooling


def test_a_whole_model_file_gives_its_vision_encoder(tmp_path):
    """A CLIPModel folder (text tower too) loads its vision tower; the rest is reported, not silently kept."""
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(vision_config=dict(**TINY, patch_size=16, image_size=64),
                                  text_config=dict(**TINY, vocab_size=100, max_position_embeddings=16))
    whole = transformers.CLIPModel(cfg).eval()
    whole.save_pretrained(tmp_path / "clip")
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        want = whole.vision_model(pixel_values=x, interpolate_pos_encoding=True).pooler_output
    model, desc = load_model(tmp_path / "clip")
    assert desc.arch.name == "hf:CLIPVisionModel" and any("outside the vision encoder" in w for w in desc.warnings)
    with torch.no_grad():
        assert _cos(model(x), want).min() >= 0.999


def test_custom_code_is_refused_in_one_line(tmp_path):
    ref, _, _, _ = _build("ViTModel")
    ref.save_pretrained(tmp_path / "vit")
    cfg = json.loads((tmp_path / "vit" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (tmp_path / "vit" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="auto_map") as e:
        load_model(tmp_path / "vit")
    assert "\n" not in str(e.value)


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    ref, _, _, _ = _build("ViTModel")
    ref.save_pretrained(tmp_path / "vit")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"featviz\[hf\]"):
        load_model(tmp_path / "vit")


def test_missing_weights_are_an_error(tmp_path):
    ref, _, _, _ = _build("ViTModel")
    ref.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path / "vit")


# ------------------------------------------------------------------ timm folders
@pytest.mark.parametrize("arch, kw", [
    ("vit_small_patch16_224", dict(embed_dim=64, depth=2, num_heads=2, dynamic_img_size=True)),
    ("vit_small_patch16_dinov3", dict(embed_dim=64, depth=2, num_heads=2)),
    ("convnext_atto", {}),
])
def test_a_timm_hf_folder_loads_with_its_pretrained_cfg(tmp_path, caplog, arch, kw):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, num_classes=0, **kw).eval()
    save_for_hf(ref, tmp_path / "timm", safe_serialization=True)
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert cfg["architecture"] == arch
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        pooled = ref(x)
    if tokens.ndim == 3:  # ViT tokens: the patches, after the prefix tokens, as the reference's own grid
        tokens = tokens[:, ref.num_prefix_tokens:]
    else:
        tokens = tokens.flatten(2).transpose(1, 2)
    for path in (tmp_path / "timm", tmp_path / "timm" / "model.safetensors"):
        caplog.clear()
        model, desc = load_model(path)
        assert desc.library == "timm" and desc.normalization.source == "config.json pretrained_cfg"
        assert not any("normalisation not recorded" in r.getMessage() for r in caplog.records)
        assert list(desc.normalization.mean) == pytest.approx(cfg["pretrained_cfg"]["mean"])
        assert desc.input_size == tuple(cfg["pretrained_cfg"]["input_size"][-2:])
        with torch.no_grad(), FeatureExtractor(model) as fx:
            fmap = fx(x)
        with torch.no_grad():
            emb = model(x)
        assert _cos(fmap.flatten(2).transpose(1, 2), tokens).min() >= 0.999
        assert _cos(emb, pooled).min() >= 0.999


# ------------------------------------------------------------------ the views, through the CLI
@pytest.mark.parametrize("name", ["DINOv3ViTModel", "SiglipVisionModel"])
def test_views_run_on_a_transformers_folder_at_a_non_square_size(tmp_path, cli, name):
    """pca, cam, embed and attention read the folder with no flags, an image already 64x96 given as --image-size."""
    import numpy as np
    from PIL import Image

    ref, hw, _, _ = _build(name)
    ref.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    (images / "cls").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(images / "cls" / f"im{i}.png")
    size = f"{hw[0]}x{hw[1]}"
    common = ["--checkpoint", tmp_path / "model", "--image-size", size, "--device", "cpu"]
    for command in ("pca", "cam", "attention"):
        result = cli(command, images, "--out", tmp_path / command, *common)
        if command == "attention" and name.startswith("Siglip"):  # no class token: refused, never another map
            assert result.exit_code == 1 and "no class token" in result.output
            continue
        assert result.exit_code == 0, f"{command}: {result.output}"
        manifest = json.loads((tmp_path / command / "manifest.json").read_text())
        assert manifest["model"]["description"]["arch"]["name"] == f"hf:{name}"
    result = cli("embed", "--images", images, "--out", tmp_path / "emb.npz", *common)
    assert result.exit_code == 0, result.output
    emb = np.load(tmp_path / "emb.npz")
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(images / "cls" / f"im{i}.png"), dtype=np.float32) / 255)
                     .permute(2, 0, 1) for i in range(2)])
    mean, std = torch.tensor([0.485, 0.456, 0.406] if name.startswith("DINO") else [0.5] * 3), \
        torch.tensor([0.229, 0.224, 0.225] if name.startswith("DINO") else [0.5] * 3)
    out = _reference(ref, name, (x - mean[:, None, None]) / std[:, None, None])
    key = next(k for k in emb.files if emb[k].ndim == 2 and emb[k].shape[1] == 64)
    assert _cos(torch.from_numpy(emb[key]).float(), out.pooler_output).min() >= 0.999


def test_a_dinov3_convnext_folder_gives_its_stages_and_pooled_embedding(tmp_path):
    torch.manual_seed(0)
    ref = transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])).eval()
    ref.save_pretrained(tmp_path / "cnx")
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
    model, desc = load_model(tmp_path / "cnx")
    assert desc.arch.name == "hf:DINOv3ConvNextModel" and desc.position_embedding is None
    with torch.no_grad(), FeatureExtractor(model) as fx:  # default: the last stage
        fmap = fx(x)
    assert fx.layer == "stages.3" and fmap.shape == out.hidden_states[-1].shape == (2, 128, 2, 3)
    assert _cos(fmap.flatten(2).transpose(1, 2), out.hidden_states[-1].flatten(2).transpose(1, 2)).min() >= 0.999
    with torch.no_grad():
        assert _cos(model(x), out.pooler_output).min() >= 0.999
