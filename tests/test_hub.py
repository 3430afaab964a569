"""``hf:ORG/NAME[@REV]`` names resolve from the local Hugging Face cache only, and never open a socket."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("huggingface_hub")

from featviz.errors import CheckpointError  # noqa: E402
from featviz.models import hub  # noqa: E402

SHA = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test."""
    def refuse(*a, **k):
        raise AssertionError("featviz opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _cache(root, repo="acme/tiny-vit", files=None, rev=SHA, ref="main"):
    """A Hugging Face cache as huggingface_hub lays it out: models--ORG--NAME/{refs/<ref>, snapshots/<sha>/...}."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(rev)
    snap = repo_dir / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {"config.json": "{}"}).items():
        (snap / name).write_text(text)
    return snap


def test_parse():
    assert hub.parse("hf:facebook/dinov2-small") == hub.HubName("facebook/dinov2-small")
    assert hub.parse("hf:facebook/dinov2-small@v1.0") == hub.HubName("facebook/dinov2-small", "v1.0")
    timm_name = "timm/vit_small_patch16_dinov3.lvd1689m"
    assert hub.parse(f"hf-hub:{timm_name}").repo_id == timm_name
    assert hub.is_hub_name("hf:a/b") and not hub.is_hub_name("weights/hf.pth")
    with pytest.raises(CheckpointError, match="expected hf:ORG/NAME"):
        hub.parse("hf:a/b c")


def test_resolves_from_hf_hub_cache_and_revisions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    snap = _cache(tmp_path / "cache")
    old = _cache(tmp_path / "cache", rev=OLD, ref="v0")
    assert hub.resolve("hf:acme/tiny-vit") == snap
    assert hub.resolve(f"hf:acme/tiny-vit@{SHA}") == snap
    assert hub.resolve("hf:acme/tiny-vit@v0") == old
    assert hub.resolve(f"hf-hub:acme/tiny-vit@{OLD}") == old
    import os

    assert "HF_HUB_OFFLINE" not in os.environ  # restored after the call


def test_hf_home_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snap = _cache(tmp_path / "home" / "hub")
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    assert hub.resolve("hf:acme/tiny-vit") == snap


def test_not_cached_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError) as e:
        hub.resolve("hf:facebook/dinov3-vits16-pretrain-lvd1689m")
    msg = str(e.value)
    assert "\n" not in msg and "`hf download facebook/dinov3-vits16-pretrain-lvd1689m`" in msg
    _cache(tmp_path / "empty", repo="acme/tiny-vit")
    with pytest.raises(CheckpointError, match="hf download acme/tiny-vit --revision v9"):
        hub.resolve("hf:acme/tiny-vit@v9")


def test_load_model_reads_an_hf_name_from_the_cache(tmp_path, monkeypatch, cli):
    """The whole path: an hf: name through load_model and the CLI (a checkpoint is typed Path) to the folder."""
    transformers = pytest.importorskip("transformers")
    import torch

    from featviz.models.loader import load_model

    torch.manual_seed(0)
    ref = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=14,
        image_size=56)).eval()
    snap = _cache(tmp_path / "cache", repo="acme/tiny-dinov2", files={})
    ref.save_pretrained(snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    model, desc = load_model("hf:acme/tiny-dinov2")
    assert desc.arch.name == "hf:Dinov2Model" and desc.source["path"] == "hf:acme/tiny-dinov2"
    x = torch.rand(1, 3, 56, 84)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(pixel_values=x).pooler_output, atol=1e-5)
    result = cli("inspect", "hf:acme/tiny-dinov2")
    assert result.exit_code == 0, result.output
    assert "Dinov2Model" in result.output
    result = cli("inspect", "hf:acme/not-cached")
    assert result.exit_code == 1 and "hf download acme/not-cached" in result.output
