"""The CLI: version/help, the one-line error funnel, inspect/convert/layers end to end."""

from __future__ import annotations

import json

import pytest
import torch

from featviz.models import build_backbone


@pytest.fixture
def moco_ckpt(tmp_path):
    sd = build_backbone("resnet18_w8", seed=0).state_dict()
    p = tmp_path / "moco.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}}, p)
    return p


def _one_error_line(result):
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("error:"), text
    assert "Traceback" not in text
    return text


def test_version_and_help(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.output.startswith("featviz ")
    r = cli("-h")
    assert r.exit_code == 0 and "inspect" in r.output


def test_usage_error_exits_2(cli):
    assert cli("inspect").exit_code == 2
    assert cli("inspect", "x.pth", "--format", "nope").exit_code == 2


def test_inspect_json_contract(cli, moco_ckpt):
    r = cli("inspect", moco_ckpt, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["format"] == "moco" and d["arch"]["name"] == "resnet18_w8"
    assert d["loaded"] == len(build_backbone("resnet18_w8").state_dict())
    assert d["missing"] == [] and d["unexpected"] == []
    for key in ("dropped", "warnings", "normalization", "prefix", "container_key"):
        assert key in d


def test_inspect_table(cli, moco_ckpt):
    r = cli("inspect", moco_ckpt)
    assert r.exit_code == 0 and "module.encoder_q." in r.output and "resnet18_w8" in r.output


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    (b"", "empty"),
    (b"just some text\n", "text file"),
    (b"<html><head></head></html>", "web page"),
])
def test_inspect_bad_files_one_line(cli, tmp_path, content, match):
    p = tmp_path / "model.pth"
    if content is not None:
        p.write_bytes(content)
    text = _one_error_line(cli("inspect", p))
    assert match in text


def test_inspect_truncated(cli, moco_ckpt):
    data = moco_ckpt.read_bytes()
    moco_ckpt.write_bytes(data[: len(data) // 3])
    assert "truncated" in _one_error_line(cli("inspect", moco_ckpt))


def test_inspect_wrong_arch_shows_shapes(cli, moco_ckpt):
    text = _one_error_line(cli("inspect", moco_ckpt, "--arch", "resnet50"))
    assert "resnet18_w8" in text and "checkpoint (" in text


def test_convert_then_inspect_without_flags(cli, moco_ckpt, tmp_path):
    out = tmp_path / "enc.safetensors"
    r = cli("convert", moco_ckpt, out)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    d = json.loads(cli("inspect", out, "--json").stdout)
    assert d["format"] == "featviz" and d["arch"]["name"] == "resnet18_w8"
    # no overwrite without --force, and the file is untouched
    before = out.read_bytes()
    _one_error_line(cli("convert", moco_ckpt, out))
    assert out.read_bytes() == before
    assert cli("convert", moco_ckpt, out, "--force").exit_code == 0


def test_convert_failure_writes_nothing(cli, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"<!DOCTYPE html>")
    out = tmp_path / "o.safetensors"
    _one_error_line(cli("convert", bad, out))
    assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_layers_lists_names_cam_accepts(cli, moco_ckpt):
    r = cli("layers", "--checkpoint", moco_ckpt, "--json", "--image-size", "64")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    rows = {row["name"]: row for row in d["layers"]}
    assert rows["layer4"]["shape"] == [64, 2, 2] and rows["layer4.1.conv2"]["type"] == "Conv2d"
    assert rows["layer4"]["map"] == [64, 2, 2] and rows["avgpool"]["map"] == [64, 1, 1] and rows["fc"]["map"] is None
    assert d["image_size"] == [64, 64] and d["model"]["source"]["format"] == "moco"
    assert d["warnings"] == d["model"]["warnings"]


def test_layers_needs_arch_or_checkpoint(cli):
    assert "--arch" in _one_error_line(cli("layers"))


def test_unknown_arch_suggests(cli):
    assert "resnet18" in _one_error_line(cli("layers", "--arch", "resnet19"))
