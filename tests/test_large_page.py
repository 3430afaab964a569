"""The large interactive page: a million points in headless Chromium, hover, the data folder beside the page.

The map is built from synthetic coordinates (a ``TsneMap`` made directly, no t-SNE): five blobs of
pixel embeddings of the sample photos, plus a few points placed alone on a ring around them so that
hovering one can only find it. The browser is driven as in ``test_interactive.py``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featviz.data import thumbnails
from featviz.errors import OutputError, OutputExistsError
from featviz.io.artifacts import Embeddings
from featviz.maps import interactive, large_page
from featviz.maps import projection as tsne

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
N = 1_000_000
N_THUMBS = 200
SEED = 0


def _pixel_map(n: int, n_lonely: int = 6, *, root: Path | None = SAMPLE / "photos"):
    """A pixel map of ``n`` points over the sample photos; the rows placed alone on a ring, first with a thumbnail."""
    rng = np.random.default_rng(0)
    files = sorted((SAMPLE / "photos").rglob("*.jpg"))
    classes = sorted({f.parent.name for f in files})
    fi = rng.integers(0, len(files), n)
    lab = np.array([classes.index(f.parent.name) for f in files])[fi]
    centres = np.array([[0, 12], [-12, 2], [12, 0], [-6, -12], [8, -12]], np.float64)
    coords = (centres[lab] + rng.normal(size=(n, 2)) * (1.5 + 0.3 * lab[:, None])).astype(np.float32)
    picked = large_page.pick_thumbnails(n, N_THUMBS, SEED)
    others = np.setdiff1d(np.arange(n), picked)
    lonely = np.r_[picked[: n_lonely - 1], others[len(others) // 2]]
    angles = np.linspace(0, 2 * np.pi, n_lonely, endpoint=False)
    coords[lonely] = np.c_[40 * np.cos(angles), 40 * np.sin(angles)]
    ids = np.array([str(f.relative_to(SAMPLE / "photos")) for f in files])[fi]
    flat = rng.choice(128 * 128, n)  # one (y, x) per point; distinct for the sampled rows
    yx = np.c_[flat // 128, flat % 128]
    man = {
        "command": "embed",
        "arguments": {"images": str(root), "pixels": True},
        "image_root": None if root is None else str(root),
    }
    emb = Embeddings(np.zeros((n, 1), np.float32), lab, classes, ids, fi, yx, man)
    m = tsne.TsneMap(coords, lab, classes, np.zeros(n, np.int64), ["pixels"], np.arange(n), {"method": "umap"})
    return m, emb, lonely


@pytest.fixture(scope="module")
def million(tmp_path_factory):
    """The 1M-point page, written once for the module."""
    out = tmp_path_factory.mktemp("large") / "map.html"
    m, emb, lonely = _pixel_map(N)
    t = time.perf_counter()
    interactive.map_page(m, [emb], out, title="a million pixels", max_thumbnails=N_THUMBS, seed=SEED)
    print(f"1M page written in {time.perf_counter() - t:.1f} s")
    return out, m, emb, lonely


def test_mode_threshold_and_the_folder_name():
    assert large_page.page_mode(200_000) == "inline" and large_page.page_mode(200_001) == "large"
    assert large_page.page_mode(10, "large") == "large" and large_page.page_mode(10**7, "inline") == "inline"
    with pytest.raises(interactive.DataError, match="--html-mode"):
        large_page.page_mode(10, "webgl")
    assert large_page.folder_for(Path("out/map.html")) == Path("out/map_files")


def test_html_mode_names_match_the_library():
    from featviz.cli import choices

    assert choices.HtmlMode.__args__ == large_page.HTML_MODES


def test_cli_html_mode_large_writes_the_page_and_its_folder(cli, tmp_path):
    rng = np.random.default_rng(0)
    emb = Embeddings(
        rng.normal(size=(300, 6)) + np.repeat(np.eye(3, 6) * 5, 100, 0), np.repeat([0, 1, 2], 100), ["a", "b", "c"]
    )
    emb.save(tmp_path / "e.npz")
    args = ("tsne", tmp_path / "e.npz", "--method", "pca", "--out", tmp_path / "m.png", "--html", tmp_path / "m.html")
    r = cli(*args, "--html-mode", "large", "--html-thumbnails", "0", "--json")
    assert r.exit_code == 0, r.output
    outputs = json.loads(r.stdout)["outputs"]
    assert outputs["html_files"] == str(tmp_path / "m_files") and (tmp_path / "m_files" / "points.js").is_file()
    assert "thumbs" not in {p.name for p in (tmp_path / "m_files").iterdir()}
    again = cli(*args, "--html-mode", "large")
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output
    bad = cli("tsne", tmp_path / "e.npz", "--out", tmp_path / "n.png", "--html-mode", "large")
    assert bad.exit_code == 2 and "add --html" in bad.output


def test_million_point_page_files_and_size(million):
    out, m, emb, lonely = million
    folder = large_page.folder_for(out)
    html = out.read_text()
    assert out.stat().st_size < 100_000, out.stat().st_size  # the page itself: the script and the settings
    assert "<script src='map_files/points.js'>" in html and not re.search(r"src=['\"]?(https?:)?//", html)
    points = folder / "points.js"
    size = points.stat().st_size
    # 1M points: x, y float32, class uint8, file uint8, (y, x) uint8, as base64: 4/3 x 12 MB
    assert 15e6 < size < 17e6, size
    data = json.loads(points.read_text()[len("window.FEATVIZ_POINTS = ") : -2])
    assert set(data) == {"x", "y", "label", "name", "py", "px", "thumb_point", "thumb_id"}  # no "row": rows are 0..N-1
    assert [data[k][0] for k in ("x", "label", "name", "py")] == ["float32", "uint8", "uint8", "uint8"]
    thumbs = sorted((folder / "thumbs").rglob("*.webp"))
    assert len(thumbs) == N_THUMBS  # the sampled points' (image, y, x) are distinct
    marker = json.loads((folder / ".featviz-output.json").read_text())
    assert "points.js" in json.dumps(marker) and "thumbs/000/000000.webp" in json.dumps(marker)
    names = (folder / "names" / "00000.js").read_text()
    assert names.startswith("featviz_names(0, [") and "cat/cat_0.jpg" in names
    print(
        f"1M page: {out.stat().st_size / 1e3:.0f} kB page + {size / 1e6:.1f} MB points.js + "
        f"{sum(t.stat().st_size for t in thumbs) / 1e3:.0f} kB of {len(thumbs)} thumbnails"
    )


def test_page_and_folder_are_never_overwritten_without_force(tmp_path):
    m, emb, _ = _pixel_map(2_000, root=None)
    out = tmp_path / "p.html"
    interactive.map_page(m, [emb], out, mode="large")
    assert (tmp_path / "p_files" / "points.js").is_file()
    with pytest.raises(OutputExistsError):
        interactive.map_page(m, [emb], out, mode="large")
    out.unlink()
    with pytest.raises(OutputExistsError, match="p_files"):  # the folder alone is enough to refuse
        interactive.map_page(m, [emb], out, mode="large")
    (tmp_path / "p_files" / "mine.txt").write_text("the user's")
    interactive.map_page(m, [emb], out, mode="large", force=True)
    assert (tmp_path / "p_files" / "mine.txt").read_text() == "the user's"  # --force replaces featviz's only
    other = tmp_path / "q.html"
    (tmp_path / "q_files").mkdir()
    (tmp_path / "q_files" / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="not written by featviz"):
        interactive.map_page(m, [emb], other, mode="large", force=True)
    assert not other.exists()


# ----------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def browser():
    from test_interactive import Chromium, require_chromium

    c = Chromium(require_chromium(), width=1200, height=950)
    yield c
    c.close()


CARD = """(() => { const c = document.getElementById('featviz-card');
  if (c.style.display !== 'block') return null;
  const img = c.querySelector('img.own'), near = c.querySelector('div.near');
  return {text: c.textContent, src: img ? img.src : null, w: img ? img.naturalWidth : 0,
          complete: img ? img.complete : false, near: near ? near.textContent : null,
          near_src: near ? near.querySelector('img').src : null}; })()"""


def _hover_card(browser, x: float, y: float, want: str = "") -> dict:
    browser.hover(x, y)
    browser.wait_for(
        f"(() => {{ const c = {CARD}; return c !== null && !c.text.includes('…')"
        f" && c.text.includes({json.dumps(want)}) && (c.src === null || c.w > 0); }})()",
        timeout=20,
    )
    return browser.eval(CARD)


def test_million_point_page_hover_shows_the_point_and_its_thumbnail(million, browser):
    out, m, emb, lonely = million
    t = time.perf_counter()
    browser.open(out.resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready && featviz.ready()", timeout=60)
    opened = time.perf_counter() - t
    shot = browser.screenshot()
    a = np.asarray(shot, np.float32)
    assert float(a.std()) > 5 and len(np.unique(a.reshape(-1, 3)[::7], axis=0)) > 50  # drawn, not blank
    print(
        f"1M page: ready {opened:.1f} s after opening; grid {browser.eval('featviz.gridMs()'):.0f} ms, "
        f"one redraw {browser.eval('featviz.drawMs()'):.0f} ms"
    )
    # a point alone on the ring that has a thumbnail: the card names it and shows its thumbnail file
    row = int(lonely[0])
    x, y = browser.eval(f"featviz.locate(0, {row})")
    card = _hover_card(browser, x + 3, y - 2, want=f"row {row}(y")
    name = emb.class_names[emb.labels[row]]
    assert name in card["text"] and emb.ids[row] in card["text"]
    assert f"(y, x) = ({emb.yx[row][0]}, {emb.yx[row][1]})" in card["text"]
    assert re.search(r"/map_files/thumbs/\d{3}/\d{6}\.webp$", card["src"]), card["src"]
    assert card["complete"] and card["w"] == large_page.THUMB_SIDE
    shown = Image.open(Path(out.parent, *card["src"].split("/")[-4:])).convert("RGB")
    want = thumbnails.pixel_thumbnail(
        Image.open(SAMPLE / "photos" / emb.ids[row]).convert("RGB"),
        int(emb.yx[row][0]),
        int(emb.yx[row][1]),
        large_page.THUMB_SIDE,
    )
    assert np.abs(np.asarray(shown, np.float32) - np.asarray(want, np.float32)).mean() < 8  # WebP, lossy
    hovered_shot = browser.screenshot()
    # the lonely point without a thumbnail: its own row, and the page says it has none
    row = int(lonely[-1])
    x, y = browser.eval(f"featviz.locate(0, {row})")
    card = _hover_card(browser, x - 4, y + 3, want=f"row {row}(y")
    assert card["src"] is None and f"no thumbnail: {N_THUMBS} of 1,000,000 points have one" in card["text"]
    # inside a blob: the card's point is the nearest point to the mouse (brute force over 1M in numpy)
    v = browser.eval("featviz.view()")
    p = v["panels"][0]
    coords = m.coords.astype(np.float32).astype(np.float64)
    picked, n_near = large_page.pick_thumbnails(N, N_THUMBS, SEED), 0
    spots = [(round(p["left"] + fx * p["W"]), round(p["top"] + fy * p["H"])) for fx, fy in ((0.5, 0.33), (0.37, 0.52))]
    for r in picked[10:13]:  # 6 px beside a point with a thumbnail, in a blob: the nearest point mostly has none
        x, y = browser.eval(f"featviz.locate(0, {int(r)})")
        spots.append((round(x) + 6, round(y)))
    for px, py in spots:  # a mouse event's clientX is whole
        dx = v["cx"] + (px - p["left"] - p["W"] / 2) / v["s"]
        dy = v["cy"] - (py - p["top"] - p["H"] / 2) / v["s"]
        d2 = (coords[:, 0] - dx) ** 2 + (coords[:, 1] - dy) ** 2
        want = int(np.argmin(d2))
        card = _hover_card(browser, px, py, want=f"row {want}(y")
        assert emb.ids[want] in card["text"] and emb.class_names[emb.labels[want]] in card["text"]
        # no thumbnail of its own: the card shows the nearest point within 12 px that has one, if any
        assert (card["src"] is not None) == (want in set(picked.tolist()))
        reach = picked[d2[picked] <= (12 / v["s"]) ** 2]
        if card["src"] is None and len(reach):
            near = int(reach[np.argmin(d2[reach])])
            assert card["near"] is not None and card["near"].endswith(f"row {near}"), (card["near"], near)
            assert emb.ids[near] in card["near"] and "/map_files/thumbs/" in card["near_src"]
            n_near += 1
        else:
            assert card["near"] is None
        print(f"1M page: a hover inside a blob searched the grid in {browser.eval('featviz.hoverMs()'):.2f} ms")
    assert n_near >= 1  # the nearest point with a thumbnail was shown at least once
    # shift-drag over the upper blob selects its points: as many as numpy counts in the rectangle
    (u0, v0), (u1, v1) = [(round(p["left"] + fx * p["W"]), round(p["top"] + fy * p["H"])) for fx, fy in
                          ((0.4, 0.2), (0.6, 0.4))]
    t = time.perf_counter()
    for kind, x, y in (("mousePressed", u0, v0), ("mouseMoved", u1, v1), ("mouseReleased", u1, v1)):
        browser.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=1, clickCount=1,
                     modifiers=8)
    browser.wait_for("document.getElementById('featviz-selection').textContent.includes('selected')", timeout=20)
    took = time.perf_counter() - t
    x0, x1 = sorted(v["cx"] + (u - p["left"] - p["W"] / 2) / v["s"] for u in (u0, u1))
    y0, y1 = sorted(v["cy"] - (w - p["top"] - p["H"] / 2) / v["s"] for w in (v0, v1))
    inside = int(np.sum((coords[:, 0] >= x0) & (coords[:, 0] <= x1) & (coords[:, 1] >= y0) & (coords[:, 1] <= y1)))
    assert inside > 10_000
    assert browser.eval("document.getElementById('featviz-selection').textContent").startswith(f"{inside:,} points")
    print(f"1M page: a box selection of {inside:,} points shown in {took:.2f} s")
    browser.send("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
    if os.environ.get("FEATVIZ_SCREENSHOTS"):
        d = Path(os.environ["FEATVIZ_SCREENSHOTS"])
        d.mkdir(parents=True, exist_ok=True)
        shot.save(d / "large_map.png")
        hovered_shot.save(d / "large_map_hover.png")


def test_large_page_without_images_shows_class_file_and_row(tmp_path, browser, caplog):
    m, emb, lonely = _pixel_map(5_000, root=None)
    emb.manifest = {"arguments": {"images": str(tmp_path / "gone")}}
    out = interactive.map_page(m, [emb], tmp_path / "noimg.html", mode="large", title="no images")
    assert not (tmp_path / "noimg_files" / "thumbs").exists()
    browser.open(out.resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready && featviz.ready()", timeout=30)
    row = int(lonely[0])
    x, y = browser.eval(f"featviz.locate(0, {row})")
    card = _hover_card(browser, x, y, want=f"row {row}(y")
    assert card["src"] is None and emb.ids[row] in card["text"] and emb.class_names[emb.labels[row]] in card["text"]
    assert "no thumbnail" not in card["text"]  # no image at all: the page says so once, in its notes
    assert "no thumbnails (images not found)" in out.read_text()
    assert browser.eval("featviz.hovered()") == {"panel": 0, "row": row}
    # a click on a legend entry hides that class: its lonely point is no longer found
    browser.eval(
        f"[...document.querySelectorAll('#featviz-legend .item')]"
        f".find(e => e.dataset.cls === '{emb.labels[row]}').click()"
    )
    time.sleep(0.2)
    browser.hover(x + 1, y)
    time.sleep(0.2)
    assert browser.eval("featviz.hovered()") is None
    if os.environ.get("FEATVIZ_SCREENSHOTS"):
        browser.screenshot().save(Path(os.environ["FEATVIZ_SCREENSHOTS"]) / "large_small.png")
    # wheel zooms around the mouse (the point under it stays put), a drag pans, a double-click resets
    v0 = browser.eval("featviz.view()")
    other = int(lonely[1])
    x, y = browser.eval(f"featviz.locate(0, {other})")
    browser.send("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=-100)
    time.sleep(0.3)
    v1 = browser.eval("featviz.view()")
    assert v1["s"] == pytest.approx(v0["s"] * 1.2)
    assert np.allclose(browser.eval(f"featviz.locate(0, {other})"), (x, y), atol=1)
    for kind, dx in (("mousePressed", 0), ("mouseMoved", 40), ("mouseReleased", 40)):
        browser.send("Input.dispatchMouseEvent", type=kind, x=x + dx, y=y, button="left", buttons=1, clickCount=1)
    time.sleep(0.3)
    assert np.allclose(browser.eval(f"featviz.locate(0, {other})"), (x + 40, y), atol=1)
    for kind in ("mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=2)
    time.sleep(0.3)
    assert browser.eval("featviz.view()")["s"] == pytest.approx(v0["s"])
    # the page without its folder says what is missing
    (tmp_path / "noimg_files").rename(tmp_path / "elsewhere")
    browser.open(out.resolve().as_uri())
    browser.wait_for("document.getElementById('featviz-error') !== null", timeout=30)
    assert "noimg_files/ was not found beside this page" in browser.eval(
        "document.getElementById('featviz-error').textContent"
    )


def test_large_page_of_a_shared_map_names_the_panel(tmp_path, browser):
    m, emb, _ = _pixel_map(4_000, root=None)
    half = 2_000
    coords = m.coords.copy()
    coords[-1] = (0, 60)  # the last row of the second input, alone above everything
    shared = tsne.TsneMap(
        coords,
        m.labels,
        m.class_names,
        (np.arange(4_000) >= half).astype(np.int64),
        ["first", "second"],
        np.arange(4_000) % half,
        {},
    )
    embs = [emb.subset(np.arange(half)), emb.subset(np.arange(half, 4_000))]
    out = interactive.map_page(shared, embs, tmp_path / "shared.html", mode="large", max_thumbnails=0)
    browser.open(out.resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready && featviz.ready()", timeout=30)
    assert browser.eval("featviz.panels()") == ["first", "second"]
    x, y = browser.eval(f"featviz.locate(1, {half - 1})")
    card = _hover_card(browser, x, y, want=f"row {half - 1} of second")
    assert embs[1].ids[half - 1] in card["text"] and browser.eval("featviz.hovered()") == {"panel": 1, "row": half - 1}
    if os.environ.get("FEATVIZ_SCREENSHOTS"):
        browser.screenshot().save(Path(os.environ["FEATVIZ_SCREENSHOTS"]) / "large_shared.png")


def test_large_page_box_selection_links_panels_counts_and_downloads_csv(tmp_path, browser):
    """Shift-drag selects the points in a rectangle; the other panel's points of the same pixels come with them.

    The rows are checked against numpy (the rectangle mapped back to map coordinates), the CSV against the
    embeddings, and the Download button's file against the CSV; a shift-click and Esc clear the selection.
    """
    import csv
    import io

    m, emb, _ = _pixel_map(3_000, root=None)
    n = 1_500
    sub = emb.subset(np.arange(n))
    coords = np.concatenate([m.coords[:n], m.coords[:n][np.random.default_rng(3).permutation(n)]])
    shared = tsne.TsneMap(coords, np.tile(m.labels[:n], 2), m.class_names, (np.arange(2 * n) >= n).astype(np.int64),
                          ["left", "right, shuffled"], np.arange(2 * n) % n, {})
    out = interactive.map_page(shared, [sub, sub], tmp_path / "sel.html", mode="large", max_thumbnails=0)
    browser.send("Browser.setDownloadBehavior", browser=True, behavior="allow", downloadPath=str(tmp_path / "dl"))
    browser.open(out.resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready && featviz.ready()", timeout=30)
    v = browser.eval("featviz.view()")
    p = v["panels"][0]
    (u0, v0), (u1, v1) = [(round(p["left"] + fx * p["W"]), round(p["top"] + fy * p["H"])) for fx, fy in
                          ((0.25, 0.2), (0.55, 0.5))]

    def shift_drag(a, b, c, d):
        for kind, x, y in (("mousePressed", a, b), ("mouseMoved", (a + c) / 2, (b + d) / 2), ("mouseMoved", c, d),
                           ("mouseReleased", c, d)):
            browser.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=1, clickCount=1,
                         modifiers=8)
        time.sleep(0.3)

    shift_drag(u0, v0, u1, v1)
    x0, x1 = sorted(v["cx"] + (u - p["left"] - p["W"] / 2) / v["s"] for u in (u0, u1))
    y0, y1 = sorted(v["cy"] - (w - p["top"] - p["H"] / 2) / v["s"] for w in (v0, v1))
    c = coords[:n].astype(np.float64)
    inside = np.flatnonzero((c[:, 0] >= x0) & (c[:, 0] <= x1) & (c[:, 1] >= y0) & (c[:, 1] <= y1))
    assert 50 < len(inside) < n // 2
    keys = {(sub.ids[r], int(sub.yx[r][0]), int(sub.yx[r][1])) for r in inside}
    linked = [r for r in range(n) if (sub.ids[r], int(sub.yx[r][0]), int(sub.yx[r][1])) in keys]
    got = browser.eval("featviz.selected()")
    assert [g["row"] for g in got if g["panel"] == 0] == inside.tolist()
    assert [g["row"] for g in got if g["panel"] == 1] == linked
    bar = browser.eval("document.getElementById('featviz-selection').textContent")
    assert f"{len(inside):,} points selected in left (+ {len(linked):,} the same rows" in bar
    top = np.bincount(np.r_[m.labels[inside], m.labels[linked]]).argmax()
    assert f"{m.class_names[top]} {int(np.sum(m.labels[inside] == top) * 2):,}" in bar
    text = browser.eval("featviz.selectionCsv()")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["panel", "row", "class", "file", "y", "x"]
    want = [["left", str(r), m.class_names[m.labels[r]], sub.ids[r], str(sub.yx[r][0]), str(sub.yx[r][1])]
            for r in inside] + [["right, shuffled", str(r), m.class_names[m.labels[r]], sub.ids[r],
                                 str(sub.yx[r][0]), str(sub.yx[r][1])] for r in linked]
    assert rows[1:] == want
    shot = browser.screenshot()
    browser.eval("document.getElementById('featviz-csv').click()")
    saved = tmp_path / "dl" / "sel_selection.csv"
    end = time.monotonic() + 20
    while not saved.exists() and time.monotonic() < end:
        time.sleep(0.1)
    assert saved.read_text(encoding="utf-8") == text
    # a shift-click clears it; a new selection, then Esc, too
    shift_drag(u0, v0, u0, v0)
    assert browser.eval("featviz.selected()") == [] and not browser.eval(
        "document.getElementById('featviz-selection').textContent")
    shift_drag(u0, v0, u1, v1)
    assert len(browser.eval("featviz.selected()")) == len(inside) + len(linked)
    browser.send("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
    time.sleep(0.3)
    assert browser.eval("featviz.selected()") == []
    if os.environ.get("FEATVIZ_SCREENSHOTS"):
        Path(os.environ["FEATVIZ_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shot.save(Path(os.environ["FEATVIZ_SCREENSHOTS"]) / "large_selection.png")
