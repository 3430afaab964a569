"""featviz similarity: known similarity maps and matches, the point -> patch rule, the CLI, the page in Chromium.

The known answers come from ``ColourPatches``, a model whose feature at a patch is the mean of the
normalised input over that patch: on images made of uniformly coloured 8x8 patches, already at the
input size (so the eval transform passes the pixels unchanged), every patch feature is
``(colour / 255 - mean) / std`` exactly, so the cosine similarity of any two patches and the mutual
nearest neighbours of two images follow from the colours alone.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_house import _one_line
from test_random_weights_titles import titles  # noqa: F401  (a fixture)
from torch import nn

from featviz.errors import DataError
from featviz.views.matches import mutual_nearest_neighbours
from featviz.views.similarity import point_query, run_similarity, similarity_maps
from featviz.views.similarity_page import (
    colour_index,
    colour_table,
    joint_scale,
    page_features,
    page_maps,
    write_page,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
TINY = ("--arch", "resnet18_w8-cifar", "--image-size", "32")
IMGS = [SAMPLE / "photos" / "cat" / "cat_0.jpg", SAMPLE / "photos" / "cat" / "cat_1.jpg",
        SAMPLE / "photos" / "coffee" / "coffee_0.jpg"]
P = 8  # patch side of ColourPatches
GRID = (4, 6)
HW = (GRID[0] * P, GRID[1] * P)


class ColourPatches(nn.Module):
    """Feature map = the normalised input averaged over each 8x8 patch (3 channels)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(P)

    def forward(self, x):
        return self.pool(x).flatten(1)


def palette(n: int, seed: int) -> np.ndarray:
    """``n`` distinct colours (uint8), no two of whose normalised vectors are parallel."""
    rng = np.random.default_rng(seed)
    return rng.choice(256, size=(n, 3), replace=True).astype(np.uint8)


def patch_image(colours: np.ndarray, path: Path) -> Path:
    """An image of GRID uniformly coloured PxP patches, colours (h*w, 3) in row-major order."""
    a = colours.reshape(*GRID, 3).repeat(P, axis=0).repeat(P, axis=1)
    Image.fromarray(a).save(path)  # PNG: lossless
    return path


def expected_unit(colours: np.ndarray) -> np.ndarray:
    """(h, w, 3) unit feature vectors of an image of these patch colours, from the colours alone."""
    from featviz.data.images import normalization_of

    mean, std = (np.asarray(v, np.float64) for v in normalization_of(ColourPatches()))
    f = (colours.astype(np.float64) / 255 - mean) / std
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).reshape(*GRID, 3)


@pytest.fixture
def pair(tmp_path):
    """Image A (24 colours) and B: A's patches shuffled, 5 of them replaced by colours A has not."""
    rng = np.random.default_rng(1)
    ca = palette(24, 0)
    perm = rng.permutation(24)  # B's patch p shows A's patch perm[p]
    cb = ca[perm].copy()
    new = rng.choice(24, 5, replace=False)
    cb[new] = palette(5, 7)
    a = patch_image(ca, tmp_path / "a.png")
    b = patch_image(cb, tmp_path / "b.png")
    return a, b, ca, cb, perm, new


def test_similarity_maps_are_the_cosines_of_the_colours(pair, tmp_path):
    a, b, ca, cb, _, _ = pair
    ua, ub = expected_unit(ca), expected_unit(cb)
    s = run_similarity(
        [a, b],
        tmp_path / "o",
        model=ColourPatches(),
        layer="pool",
        image_size=f"{HW[0]}x{HW[1]}",
        patches=[(1, 2), (3, 5)],
        points=[(13, 30)],
    )
    assert s.grid == GRID and s.feature_dim == 3 and s.tokens is None
    with np.load(tmp_path / "o" / "similarity.npz") as z:
        maps, queries = z["maps"], z["queries"]
    # --point 13,30 is pixel column 13, row 30: patch row 30 // 8 = 3, column 13 // 8 = 1
    assert queries.tolist() == [[0, 3, 1], [0, 1, 2], [0, 3, 5]]
    for q, (i, j) in enumerate([(3, 1), (1, 2), (3, 5)]):
        np.testing.assert_allclose(maps[q, 0], ua @ ua[i, j], atol=1e-5)
        np.testing.assert_allclose(maps[q, 1], ub @ ua[i, j], atol=1e-5)
        assert maps[q, 0, i, j] == pytest.approx(1.0, abs=1e-6)
    js = json.loads((tmp_path / "o" / "similarity.json").read_text())
    assert js["protocol"]["grid"] == list(GRID) and js["protocol"]["layer"] == "pool"
    assert js["queries"][0] == {"image": "a.png", "patch": [3, 1], "point": [13.0, 30.0], "input_point": [13.5, 30.5]}
    stats = js["images"][1]["queries"][1]
    assert stats["max"] == pytest.approx(float((ub @ ua[1, 2]).max()), abs=1e-5)
    assert stats["argmax"] == list(np.unravel_index(int((ub @ ua[1, 2]).argmax()), GRID))
    assert len(list((tmp_path / "o" / "overlays").glob("*.png"))) == 6
    assert (tmp_path / "o" / "sheet.png").stat().st_size > 5_000


def test_mutual_nearest_neighbours_are_exactly_the_shared_colours(pair, tmp_path):
    a, b, ca, cb, perm, new = pair
    s = run_similarity(
        [a, b], tmp_path / "o", model=ColourPatches(), layer="pool", image_size=f"{HW[0]}x{HW[1]}", matches=100
    )
    m = s.matches
    got = [
        (pa[0] * GRID[1] + pa[1], pb[0] * GRID[1] + pb[1], d["similarity"])
        for pa, pb, d in ((d["a"], d["b"], d) for d in m["pairs"])
    ]
    # from the colours: the 19 colours B shares with A match their copies (cosine 1), strongest first ...
    shared = {(int(perm[p]), p) for p in range(24) if p not in set(new.tolist())}
    assert {g[:2] for g in got[:19]} == shared and all(g[2] == pytest.approx(1.0, abs=1e-5) for g in got[:19])
    # ... and B's 5 new colours match A's 5 colours B lost exactly when the colours say they are mutual nearest
    ua, ub = expected_unit(ca).reshape(24, 3), expected_unit(cb).reshape(24, 3)
    c = ua @ ub.T
    rest = {(i, j) for i in range(24) for j in range(24) if c[i].argmax() == j and c[:, j].argmax() == i} - shared
    assert {g[:2] for g in got[19:]} == rest and all(g[2] < 0.9999 for g in got[19:])
    assert m["count"] == m["mutual_nearest_neighbours"] == 19 + len(rest)
    assert m["mean_similarity"] == pytest.approx(np.mean([g[2] for g in got]), abs=1e-6)
    assert m["images"] == ["a.png", "b.png"]
    assert (tmp_path / "o" / "matches.png").stat().st_size > 5_000
    assert not (tmp_path / "o" / "sheet.png").exists()  # no query: no sheet


def test_mutual_nearest_neighbours_rank_limit_and_mask():
    rng = np.random.default_rng(0)
    fa = rng.standard_normal((3, 4, 8))
    fa /= np.linalg.norm(fa, axis=-1, keepdims=True)
    noise = 0.05 * np.arange(12)[:, None] * rng.standard_normal((12, 8))  # patch p of B: A's patch p, p-th noisiest
    fb = fa.reshape(12, 8) + noise
    fb = (fb / np.linalg.norm(fb, axis=1, keepdims=True)).reshape(3, 4, 8)
    # the brute-force definition, written out
    s = fa.reshape(12, 8) @ fb.reshape(12, 8).T
    ref = sorted(
        ((s[i, j], i, j) for i in range(12) for j in range(12) if s[i].argmax() == j and s[:, j].argmax() == i),
        reverse=True,
    )
    m = mutual_nearest_neighbours(fa, fb)
    assert m.total == len(ref) and [(int(p[0]) * 4 + int(p[1])) for p in m.a] == [r[1] for r in ref]
    np.testing.assert_allclose(m.similarity, [r[0] for r in ref], rtol=1e-6)
    assert np.all(np.diff(m.similarity) <= 0)
    top = mutual_nearest_neighbours(fa, fb, limit=3)
    assert len(top.similarity) == 3 and top.total == m.total and np.array_equal(top.a, m.a[:3])
    mask = np.zeros((3, 4), bool)
    mask[0] = True  # only A's first row may match
    sub = mutual_nearest_neighbours(fa, fb, mask_a=mask)
    assert len(sub.a) and (sub.a[:, 0] == 0).all()


def test_a_point_maps_to_the_patch_under_it_after_the_eval_transform():
    from featviz.data.images import eval_transform, input_point

    # 128x128 image, --image-size 64: resized to 64 (no crop at <= 64 px), 8 px patches
    q = point_query((100, 20), (128, 128), (64, 64), (8, 8), "x.jpg")
    assert q.input_point == (50.25, 10.25) and q.patch == (1, 6)
    # 224: short side to 256, center 224 cropped (16 px off each side at the resized scale)
    q = point_query((64, 64), (128, 128), (224, 224), (14, 14), "x.jpg")
    assert q.input_point == (113.0, 113.0) and q.patch == (7, 7)
    with pytest.raises(DataError, match="cut away by the center crop"):
        point_query((3, 60), (128, 128), (224, 224), (14, 14), "x.jpg")
    with pytest.raises(DataError, match=r"outside the first image x.jpg \(128x128 pixels"):
        point_query((128, 5), (128, 128), (224, 224), (14, 14), "x.jpg")
    # the rule agrees with the transform itself: a bright dot lands where input_point says
    rng = np.random.default_rng(0)
    for wh, size in [((200, 130), 224), ((130, 200), (96, 160)), ((333, 517), (160, 96))]:
        t = eval_transform(size, (0, 0, 0), (1, 1, 1))
        for _ in range(4):
            x, y = int(rng.integers(40, wh[0] - 40)), int(rng.integers(40, wh[1] - 40))
            a = np.zeros((wh[1], wh[0], 3), np.uint8)
            a[y - 1 : y + 2, x - 1 : x + 2] = 255
            out = t(Image.fromarray(a)).numpy()[0]
            p = input_point((x, y), wh, size)
            ys, xs = np.nonzero(out > 0.5 * out.max())
            wgt = out[ys, xs]
            cx, cy = (xs * wgt).sum() / wgt.sum() + 0.5, (ys * wgt).sum() / wgt.sum() + 0.5
            assert p is not None and abs(p[0] - cx) < 0.75 and abs(p[1] - cy) < 0.75, (wh, size, x, y, p, cx, cy)


def test_a_vit_with_registers_and_rope_maps_only_its_patch_tokens(tmp_path):
    """timm's DINOv3 (RoPE, 4 storage tokens), shrunk: the maps are the cosines of its own patch tokens."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch16_dinov3",
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        embed_dim=64,
        depth=2,
        num_heads=2,
    ).eval()
    img = SAMPLE / "photos" / "cat" / "cat_0.jpg"
    other = SAMPLE / "photos" / "cat" / "cat_2.jpg"
    s = run_similarity([img, other], tmp_path / "o", model=vit, image_size="64x96", patches=[(2, 3)], matches=5)
    assert s.grid == (4, 6) and s.tokens == {
        "grid": [4, 6],
        "class": 1,
        "register": 4,
        "other": 0,
        "excluded_from_maps": 5,
    }
    from featviz.data.images import eval_transform, load_image, normalization_of

    mean, std = normalization_of(vit)
    t = eval_transform((64, 96), mean, std)
    x = torch.stack([t(load_image(img)), t(load_image(other))])
    with torch.no_grad():
        tokens = vit.forward_features(x)[:, 5:]  # the reference drops 1 class + 4 storage tokens by hand
    u = torch.nn.functional.normalize(tokens, dim=-1).numpy().reshape(2, 4, 6, 64)
    with np.load(tmp_path / "o" / "similarity.npz") as z:
        np.testing.assert_allclose(z["maps"][0], u @ u[0, 2, 3], atol=1e-4)
    assert 1 <= s.matches["count"] <= 5


def test_cli_end_to_end_on_a_tiny_cnn(cli, tmp_path):
    out = tmp_path / "o"
    r = cli("similarity", *IMGS, *TINY, "--point", "64,64", "--patch", "0,1", "--matches", "4", "--pair", "cat_1.jpg,0",
            "--foreground-only", "--html", "--out", out, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output[r.output.index("{") :])
    assert s["images"] == 3 and s["grid"] == [4, 4] and [q["patch"] for q in s["queries"]] == [[2, 2], [0, 1]]
    assert s["matches"]["images"] == ["cat_1.jpg", "cat_0.jpg"] and s["matches"]["count"] <= 4
    assert len(s["matches"]["foreground_share"]) == 2 and s["html"]["dims"] == s["feature_dim"]
    for f in ("sheet.png", "matches.png", "similarity.html", "similarity.json", "similarity.npz", "manifest.json"):
        assert (out / f).is_file(), f
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "similarity" and man["arguments"]["point"] == ["64,64"]
    r = cli("similarity", *IMGS[:1], *TINY, "--patch", "0,0", "--out", tmp_path / "p", "--device", "cpu")
    assert r.exit_code == 0 and "q1: patch 0,0 of cat_0.jpg" in r.output, r.output


@pytest.mark.parametrize(
    ("extra", "code", "says"),
    [
        (["--point", "500,3"], 1, "--point 500,3 is outside the first image cat_0.jpg (128x128 pixels"),
        (["--point", "3,a"], 2, "--point '3,a': expected two integers"),
        (["--patch", "9,0"], 1, "--patch 9,0 is outside the 4x4 feature grid"),
        (["--patch", "0,0", "--layer", "layer9"], 1, "model has no layer 'layer9'"),
        ([], 1, "nothing to show: give a query with --point X,Y or --patch I,J"),
        (["--matches", "5"], 1, "--matches compares two images and 3 were given; name them with --pair A,B"),
        (["--matches", "5", "--pair", "cat_0.jpg,dog.jpg"], 1, "'dog.jpg' is neither an image id nor a position"),
        (["--patch", "0,0", "--foreground-only"], 2, "--foreground-only and --pair apply to --matches N"),
        (["--matches", "0"], 2, "--matches"),
    ],
)
def test_bad_input_is_one_line(cli, tmp_path, extra, code, says):
    r = cli("similarity", *IMGS, *TINY, *extra, "--out", tmp_path / "o")
    assert says in _one_line(r, code)
    assert not (tmp_path / "o").exists()


def test_one_image_for_matches_is_one_line(cli, tmp_path):
    r = cli("similarity", IMGS[0], *TINY, "--matches", "5", "--out", tmp_path / "o")
    assert "--matches needs two images, got 1" in _one_line(r)


def test_page_features_reduce_to_the_budget_and_keep_the_dot_products():
    rng = np.random.default_rng(0)
    low = rng.standard_normal((2, 5, 6, 10)) @ rng.standard_normal((10, 40))  # rank 10 in 40 dims
    unit = low / np.linalg.norm(low, axis=-1, keepdims=True)
    full = page_features(unit, 10**9)
    assert full.k == 40 and full.retained == 1.0 and full.stored.dtype == np.float16
    small = page_features(unit, 4 * 60 * 2 * 12 // 3)  # room for 12 float16 dims per patch, as base64
    assert small.k == 12 and small.retained == pytest.approx(1.0, abs=1e-6)  # rank 10: nothing lost
    exact = similarity_maps(unit.astype(np.float32), 1, (2, 3))
    assert np.abs(page_maps(small.stored, 1, (2, 3)) - exact).max() < 3e-3  # float16 rounding only


def test_a_page_that_loses_energy_says_so(tmp_path, caplog):
    imgs = [SAMPLE / "photos" / "cat" / "cat_0.jpg", SAMPLE / "photos" / "cells" / "cells_0.jpg"]
    vit = _tiny_vit()
    s = run_similarity(imgs, tmp_path / "o", model=vit, image_size=64, html=True, page_budget=12_000)
    h = s.html
    assert h["reduction"] and h["dims"] < 64 and h["retained_energy"] < 0.9 and h["max_abs_difference"] > 0.01
    assert len(s.warnings) == 1 and f"keeps {h['dims']} of 64 feature dimensions" in s.warnings[0]
    assert s.warnings[0] in caplog.text


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                             embed_dim=64, depth=1, num_heads=2, reg_tokens=4).eval()


def test_twenty_images_at_448_stay_under_15_mb(tmp_path):
    """ViT-S/16 at 448 px: 28x28 patches x 384 dims x 20 images do not fit as float16; the SVD makes them fit."""
    rng = np.random.default_rng(0)
    unit = rng.standard_normal((20, 28, 28, 384)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    yy, xx = np.mgrid[0:448, 0:448] / 448
    rgbs = [np.stack([xx, yy, np.full_like(xx, i / 20)], -1) for i in range(20)]
    feats = write_page(tmp_path / "p.html", rgbs, unit, [f"img_{i}.jpg" for i in range(20)], query=(0, 3, 4), title="t")
    size = (tmp_path / "p.html").stat().st_size
    assert size < 15_000_000 and 200 < feats.k < 384, (size, feats.k)


# ----------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def browser():
    from test_interactive import Chromium, require_chromium

    c = Chromium(require_chromium())
    yield c
    c.close()


def _stored(page: Path) -> tuple[np.ndarray, dict]:
    text = page.read_text()
    blob = json.loads(re.search(r'<script type="application/json" id="fv-data">(.*?)</script>', text, re.S)[1])
    h, w = blob["grid"]
    stored = np.frombuffer(base64.b64decode(blob["features"]), "<f2").reshape(blob["n"], h, w, blob["k"])
    return stored, blob


def _click(browser, m: int, i: int, j: int) -> None:
    x, y = browser.eval(f"featviz.centre({m}, {i}, {j})")
    for kind in ("mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
    browser.wait_for(f"document.title === 'similarity {m} {i} {j}'", timeout=10)


def _check_drawn(
    browser, stored: np.ndarray, m: int, i: int, j: int, exact: np.ndarray | None, cmap: str = "inferno"
) -> None:
    """Every image's canvas shows the Python map of the clicked patch, in the PNGs' colours."""
    py = page_maps(stored, m, (i, j))
    lut = colour_table(cmap)
    n, h, w, _ = stored.shape
    for im in range(n):
        js = np.array(browser.eval(f"featviz.map({im})")).reshape(h, w)
        np.testing.assert_allclose(js, py[im], atol=1e-9)  # the same float16 numbers, summed in float64
        px = np.array(browser.eval(f"featviz.pixels({im})"), np.uint8).reshape(h, w, 4)
        want = lut[colour_index(joint_scale(py)[im])]
        assert (px[..., 3] == 255).all()
        np.testing.assert_array_equal(px[..., :3], want)  # the same colour, pixel for pixel
        if exact is not None:  # and the page's numbers are the full-precision cosines, to float16's rounding
            assert np.abs(py[im] - exact[im]).max() < 2e-3


def test_clicking_a_patch_redraws_every_map_as_python_computes_it(tmp_path, browser, pair):
    a, b, ca, cb, _, _ = pair
    s = run_similarity(
        [a, b, a], tmp_path / "o", model=ColourPatches(), layer="pool", image_size=f"{HW[0]}x{HW[1]}", html=True
    )
    page = tmp_path / "o" / "similarity.html"
    assert s.html["dims"] == 3 and s.html["reduction"] is None and "http" not in page.read_text().split("<script>")[1]
    stored, _ = _stored(page)
    unit = np.stack([expected_unit(ca), expected_unit(cb), expected_unit(ca)])
    browser.open(page.resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready")
    assert browser.eval("featviz.current()") == [0, GRID[0] // 2, GRID[1] // 2]  # no query given: the centre
    for m, i, j in [(1, 2, 5), (0, 0, 0), (2, 3, 1)]:
        _click(browser, m, i, j)
        assert browser.eval("featviz.current()") == [m, i, j]
        _check_drawn(browser, stored, m, i, j, similarity_maps(unit, m, (i, j)))


def test_a_reduced_page_draws_the_reduced_maps(tmp_path, browser):
    rng = np.random.default_rng(3)
    unit = rng.standard_normal((3, 5, 7, 48)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    rgbs = [np.full((40, 56, 3), v) for v in (0.2, 0.5, 0.8)]
    feats = write_page(tmp_path / "p.html", rgbs, unit, ["x", "y", "z"], query=(0, 1, 1), title="t", budget=30_000)
    assert feats.k < 48
    stored, _ = _stored(tmp_path / "p.html")
    np.testing.assert_array_equal(stored, feats.stored)
    browser.open((tmp_path / "p.html").resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready")
    time.sleep(0.1)
    _click(browser, 2, 4, 6)
    _check_drawn(browser, stored, 2, 4, 6, None)


def test_the_page_draws_with_the_chosen_cmap_as_the_pngs(tmp_path, browser, pair):
    from featviz.style import PlotStyle

    a, b, ca, cb, _, _ = pair
    run_similarity([a, b], tmp_path / "o", model=ColourPatches(), layer="pool", image_size=f"{HW[0]}x{HW[1]}",
                   html=True, patches=[(1, 2)], style=PlotStyle(cmap="viridis"))
    page = tmp_path / "o" / "similarity.html"
    stored, blob = _stored(page)
    assert blob["lut"] == colour_table("viridis").reshape(-1).tolist() != colour_table("inferno").reshape(-1).tolist()
    browser.open(page.resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready")
    _click(browser, 1, 3, 4)
    unit = np.stack([expected_unit(ca), expected_unit(cb)])
    _check_drawn(browser, stored, 1, 3, 4, similarity_maps(unit, 1, (3, 4)), cmap="viridis")
    # and the PNG overlay of the query image is viridis's colours blended over the image, as the page's
    from featviz.views.similarity import ALPHA

    png = np.asarray(Image.open(tmp_path / "o" / "overlays" / "b.q1.png").convert("RGB"), np.float64)
    exact = similarity_maps(unit, 0, (1, 2))
    heat = colour_table("viridis")[colour_index(joint_scale(exact)[1])].astype(np.float64)
    rgb = np.asarray(Image.open(b).convert("RGB"), np.float64)
    want = ALPHA * heat.repeat(P, 0).repeat(P, 1) + (1 - ALPHA) * rgb
    got = np.asarray(Image.fromarray(png.astype(np.uint8)).resize((HW[1], HW[0]), Image.NEAREST), np.float64)
    assert np.abs(got - want).mean() < 3, np.abs(got - want).mean()
    assert "viridis" in json.loads((tmp_path / "o" / "similarity.json").read_text())["protocol"]["colour_scale"]


def test_cli_limit_sheet_images_and_cmap_follow_the_shared_rules(cli, tmp_path):
    photos = SAMPLE / "photos"
    common = [*TINY, "--patch", "1,1", "--device", "cpu"]
    r = cli("similarity", photos, *common, "--limit", "5", "--sheet-images", "2", "--cmap", "viridis", "--json",
            "--out", tmp_path / "v")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["images"] == 5 and s["sheet"] == {"shown": 2, "of": 5}
    assert len(list((tmp_path / "v" / "overlays").iterdir())) == 5  # every image's own files are written
    man = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert man["limit"] == {"first": 5, "of": 20} and len(man["images"]) == 5
    assert man["arguments"]["cmap"] == "viridis" and man["arguments"]["sheet_images"] == 2
    r = cli("similarity", photos, *common, "--limit", "5", "--sheet-images", "2", "--out", tmp_path / "d")
    assert r.exit_code == 0 and "showing 2 of 5 images" in " ".join(r.output.split()), r.output
    v = np.asarray(Image.open(tmp_path / "v" / "overlays" / "cat__cat_0.q1.png"), np.int64)
    d = np.asarray(Image.open(tmp_path / "d" / "overlays" / "cat__cat_0.q1.png"), np.int64)
    assert v.shape == d.shape and np.abs(v - d).mean() > 5  # another colour map, other pixels
    r = cli("similarity", photos, *common, "--cmap", "viridiss", "--out", tmp_path / "x")
    assert "did you mean: viridis" in _one_line(r)


def test_sheets_of_random_weights_say_so(tmp_path, titles):  # noqa: F811  (the fixture)
    from featviz.models.description import RANDOM_WEIGHTS
    from featviz.models.loader import load_model

    model, _ = load_model(arch="vit_tiny_patch16_224", seed=0)
    run_similarity(IMGS[:2], tmp_path / "o", model=model, image_size=32, patches=[(0, 0)], matches=3)
    assert all(t.startswith(RANDOM_WEIGHTS + " · ") for t in titles), titles
    assert any("cosine similarity" in t for t in titles) and any("mutual nearest" in t for t in titles)
    assert not any("random weights" in t for t in titles)  # the one caution, not a second wording
