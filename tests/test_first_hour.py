"""Issue 30's rough edges of a first hour: each bug has a test that fails without its fix, and each new
option (``--device cuda:N``, ``--limit``, ``class:NAME``, the style options, ``--sheet-images``) a test."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

PHOTOS = Path(__file__).resolve().parents[1] / "sample_data" / "photos"


# ------------------------------------------------------------------ bug 7: the cam sheet's colour bar fits
def _cam_run(n_images: int, methods: list[str]):
    from featviz.views.cam.methods import MapStats
    from featviz.views.cam.render import CamRun

    rng = np.random.default_rng(0)
    maps = {m: rng.random((n_images, 4, 4)).astype(np.float32) for m in methods}
    stats = {m: [MapStats("ok", 1.0) for _ in range(n_images)] for m in methods}
    return CamRun([f"img_{i}.jpg" for i in range(n_images)], methods, {}, maps, stats,
                  [f"class {i}" for i in range(n_images)], [None] * n_images, {}, ["blocks.6"], "top1", (64, 64),
                  "logits")


@pytest.mark.parametrize("methods", [["gradcam"], ["gradcam", "eigencam"], ["gradcam", "eigencam", "layercam"]])
def test_cam_sheet_text_and_colour_bar_stay_inside_the_sheet(tmp_path, methods):
    from matplotlib.text import Text

    from featviz.views.cam.render import contact_sheet

    run = _cam_run(2, methods)
    images = [np.full((64, 64, 3), 0.5) for _ in range(2)]
    title = "timm:efficientnet_lite1 (efficientnet-lite1-77cc7160.pth) · layer blocks.6 · target top1"
    fig = contact_sheet(run, images, tmp_path / "s.png", title=title, note="a note under the title " * 4)
    renderer = fig._get_renderer()  # the Agg renderer the save used
    w, h = fig.bbox.width, fig.bbox.height
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert any("most important" in " ".join(t.get_text().split()) for t in texts)
    assert any(t.get_text() == "1.0" for t in texts)  # the colour bar's end tick is drawn ...
    for t in texts:  # ... and nothing is cut at the sheet's edges: caption, ticks, title, note
        bb = t.get_window_extent(renderer)
        assert bb.x0 >= -0.5 and bb.x1 <= w + 0.5 and bb.y0 >= -0.5 and bb.y1 <= h + 0.5, (t.get_text(), bb, w, h)
