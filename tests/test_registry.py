"""The registry and the one rule for the name lists a user types: split_names, parse_names, parse_layers."""

from __future__ import annotations

import pytest

from featviz.errors import OptionError, UnknownNameError
from featviz.registry import Registry, names_all, parse_layers, parse_names, split_names

CHOICES = ("road", "deletion", "insertion")


def test_split_names_splits_strips_and_keeps_order_case_and_repeats():
    assert split_names(" a, B ,,a ") == ["a", "B", "a"]
    assert split_names(["a,b", "c", " ", "b"]) == ["a", "b", "c", "b"]
    assert split_names(iter(["x,y"])) == ["x", "y"]
    assert split_names(None) == [] and split_names("") == [] and split_names([]) == []


def test_parse_names_order_all_repeats_and_case():
    assert parse_names("Insertion, road", CHOICES, option="--score", kind="score") == ["insertion", "road"]
    # 'all' adds what is not named yet, in the choices' order; a repeat counts once
    assert parse_names(["deletion", "all,road"], CHOICES, option="--score", kind="score") == [
        "deletion",
        "road",
        "insertion",
    ]
    assert parse_names(("road,road",), CHOICES, option="--score", kind="score") == ["road"]
    assert parse_names(iter(["ALL"]), CHOICES, option="--score", kind="score") == list(CHOICES)


def test_parse_names_messages_say_what_was_expected_found_and_what_to_do():
    with pytest.raises(UnknownNameError) as e:
        parse_names("road,deletoin", CHOICES, option="--score", kind="score")
    msg = str(e.value)
    assert msg.startswith("--score: unknown score 'deletoin'")  # where, and what was found
    assert "did you mean: deletion?" in msg  # what to do
    assert "expected one of: road, deletion, insertion or all" in msg  # what was expected
    with pytest.raises(OptionError, match=r"--score ',' names no score; expected one of: road, deletion"):
        parse_names(",", CHOICES, option="--score", kind="score")
    with pytest.raises(OptionError, match=r"--score ', , ' names no score"):
        parse_names(["", " , "], CHOICES, option="--score", kind="score")


def test_parse_names_aliases_and_refused_names():
    kw = {"option": "--method", "kind": "CAM method", "aliases": {"grad_cam": "gradcam"}}
    assert parse_names("Grad_CAM,gradcam", ["gradcam", "scorecam"], **kw) == ["gradcam"]
    assert parse_names("Grad-CAM", ["gradcam"], spelling=lambda n: n.replace("-", "_"), **kw) == ["gradcam"]
    with pytest.raises(UnknownNameError, match="--method 'guided' does not apply: pixel gradients; expected one of"):
        parse_names("gradcam,guided", ["gradcam"], refused={"guided": "pixel gradients"}, **kw)


def test_names_all():
    assert names_all("gradcam, ALL") and names_all(["a", "all"])
    assert not names_all("gradcam,allcam") and not names_all(None)


def test_parse_layers_is_the_one_layer_list_rule():
    assert parse_layers("layer3, layer4[-1]") == ["layer3", "layer4[-1]"]
    assert parse_layers(["blocks.0,blocks.1", "Blocks.1"]) == ["blocks.0", "blocks.1", "Blocks.1"]  # case kept
    assert parse_layers(None) is None and parse_layers([]) is None  # the command's default
    assert parse_layers("auto") is None and parse_layers([" auto "]) is None
    assert parse_layers("auto,layer4") == ["auto", "layer4"]  # 'auto' only alone; else a layer name, checked later
    with pytest.raises(OptionError, match=r"--layers-b ',' names no layer; expected 'auto' or comma-separated"):
        parse_layers(",", option="--layers-b")
    with pytest.raises(OptionError, match=r"--layers ' ,' names no layer"):
        parse_layers([" ", ""])


def test_registry_get_suggests():
    reg: Registry[int] = Registry("thing")
    reg.register("alpha")(1)
    assert reg.get("alpha") == 1 and "alpha" in reg and len(reg) == 1
    with pytest.raises(UnknownNameError, match=r"unknown thing 'alpah' \(did you mean: alpha\?\)"):
        reg.get("alpah")
