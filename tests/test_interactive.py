"""The interactive HTML map: self-contained, thumbnails, and (in headless Chromium) render + hover.

The browser tests drive Debian's ``chromium`` through the Chrome DevTools protocol over
``--remote-debugging-pipe`` (no websocket library needed). They skip when no Chromium is
installed, except when ``FEATVIZ_REQUIRE_CHROMIUM=1`` (set by ``.ci/run``): then a missing
browser fails the test, so CI can never pass by skipping them.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featviz.data import thumbnails
from featviz.io.artifacts import Embeddings
from featviz.maps import interactive
from featviz.maps import projection as tsne

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
FAST = tsne.TsneParams(n_iter=150, early_exaggeration_iter=100, seed=0)


# ----------------------------------------------------------------- a tiny DevTools client
def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def require_chromium() -> str:
    """The browser, or a skip; a failure instead when FEATVIZ_REQUIRE_CHROMIUM=1 (CI)."""
    binary = chromium_binary()
    if binary is None:
        msg = "no chromium/google-chrome on PATH (apt-get install chromium)"
        if os.environ.get("FEATVIZ_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"FEATVIZ_REQUIRE_CHROMIUM=1 but {msg}: the browser test must run in CI")
        pytest.skip(msg)
    return binary


class Chromium:
    """Headless Chromium driven through the DevTools protocol on fds 3/4 (NUL-separated JSON)."""

    def __init__(self, binary: str, width: int = 1200, height: int = 900):
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="featviz-chromium-")
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()

        def child() -> None:  # the browser reads commands on fd 3 and answers on fd 4
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                "--disable-background-networking",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=child,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(cmd_r)
        os.close(out_w)
        self.w, self.r = cmd_w, out_r
        self.buf, self.next_id, self.events, self.session = b"", 0, [], None

    def _read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited: " + self.proc.stderr.read().decode(errors="replace")[-2000:])
            self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method: str, timeout: float = 30, browser: bool = False, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not browser:
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, name: str, timeout: float = 60) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == name:
                return self.events.pop(i)
        while True:
            m = self._read(timeout)
            if m.get("method") == name:
                return m
            self.events.append(m)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", browser=True, url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", browser=True, targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def eval(self, expr: str, timeout: float = 30):
        r = self.send(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expr,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"].get("exception", {}).get("description", str(r)))
        return r["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while not self.eval(expr):
            if time.monotonic() > end:
                raise TimeoutError(f"page never satisfied {expr!r}")
            time.sleep(0.1)

    def screenshot(self) -> Image.Image:
        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        return Image.open(io.BytesIO(data)).convert("RGB")

    def hover(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def close(self) -> None:
        try:
            self.send("Browser.close", browser=True, timeout=5)
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.w)
        os.close(self.r)
        self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


# the tooltip lives in Bokeh's shadow DOM: walk it to find the visible thumbnail <img>
TOOLTIP_IMG = """(() => {
  const found = [];
  const walk = (n) => { if (!n) return;
    if (n.tagName === 'IMG' && n.src.startsWith('data:image/')) found.push(n);
    if (n.shadowRoot) walk(n.shadowRoot); for (const c of (n.children || [])) walk(c); };
  walk(document.body);
  return found.map(i => { const r = i.getBoundingClientRect();
    return {src: i.src, w: i.naturalWidth, complete: i.complete, x: r.left, y: r.top,
            rw: r.width, rh: r.height, text: i.parentElement.textContent}; })
    .filter(i => i.rw > 1 && i.rh > 1);
})()"""


def _not_blank(img: Image.Image) -> bool:
    a = np.asarray(img, np.float32)
    return float(a.std()) > 5 and len(np.unique(a.reshape(-1, 3)[::7], axis=0)) > 50


# ----------------------------------------------------------------- data
def _photo_embeddings(tmp_path: Path, n_per: int = 4) -> tuple[Embeddings, Path]:
    """Embeddings-like rows for sample_data/photos (features: colour statistics; no torch)."""
    files = sorted((SAMPLE / "photos").rglob("*.jpg"))
    classes = sorted({f.parent.name for f in files})
    feats, labels, ids = [], [], []
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB").resize((8, 8)), np.float32) / 255
        feats.append(a.ravel())
        labels.append(classes.index(f.parent.name))
        ids.append(str(f.relative_to(SAMPLE / "photos")))
    man = {
        "command": "embed",
        "arguments": {"images": str(SAMPLE / "photos")},
        "image_root": thumbnails.image_root(files, ids),
    }
    return Embeddings(np.array(feats), np.array(labels), classes, np.array(ids), manifest=man), SAMPLE / "photos"


def _pixel_embeddings(n_per_image: int, images: list[Path], root: Path) -> Embeddings:
    rng = np.random.default_rng(0)
    feats, labels, ids, idx, yx = [], [], [], [], []
    for i, f in enumerate(images):
        with Image.open(f) as im:
            w, h = im.size
        flat = rng.choice(h * w, n_per_image, replace=False)  # distinct pixels
        ys, xs = flat // w, flat % w
        lab = (ys > h // 2).astype(int) + 2 * (xs > w // 2)
        feats.append(np.c_[lab[:, None] + rng.normal(scale=0.3, size=(n_per_image, 5))])
        labels.append(lab)
        ids += [str(f.relative_to(root))] * n_per_image
        idx.append(np.full(n_per_image, i))
        yx.append(np.c_[ys, xs])
    man = {
        "command": "embed",
        "arguments": {"images": str(root), "pixels": True},
        "image_root": str(root),
    }
    return Embeddings(
        np.concatenate(feats),
        np.concatenate(labels),
        ["tl", "tr", "bl", "br"],
        np.array(ids),
        np.concatenate(idx),
        np.concatenate(yx),
        man,
    )


def _data_uris(html: str) -> list[str]:
    return re.findall(r"data:image/webp;base64,[A-Za-z0-9+/=]+", html)


# ----------------------------------------------------------------- tests without a browser
def test_page_is_self_contained_with_one_thumbnail_per_image(tmp_path):
    emb, _ = _photo_embeddings(tmp_path)
    m = tsne.shared_map([emb], ["photos"], params=FAST)
    out = interactive.map_page(m, [emb], tmp_path / "map.html", title="photos")
    html = out.read_text()
    assert not re.search(r"<script[^>]+src=", html), "an external script"
    assert not re.search(r"<link[^>]+href=", html), "an external stylesheet"
    assert "cdn.bokeh.org" not in html and "<iframe" not in html
    uris = _data_uris(html)
    assert len(uris) == len(set(uris)) == emb.n  # one per image, none twice
    assert "astronaut/astronaut_0.jpg" in html
    with pytest.raises(interactive.DataError, match="must end in .html"):
        interactive.map_page(m, [emb], tmp_path / "map.png")
    from featviz.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        interactive.map_page(m, [emb], tmp_path / "map.html")


def test_missing_images_warn_and_the_map_is_still_written(tmp_path, caplog):
    emb, _ = _photo_embeddings(tmp_path)
    emb.manifest = {"arguments": {"images": str(tmp_path / "moved-away")}}
    m = tsne.shared_map([emb], ["photos"], params=FAST)
    with caplog.at_level(logging.WARNING, logger="featviz.maps.interactive"):
        out = interactive.map_page(m, [emb], tmp_path / "map.html")
    assert out.is_file() and not _data_uris(out.read_text())
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "20 images of photos could not be found" in msg and "--image-root" in msg
    # an explicit root finds them again
    out2 = interactive.map_page(m, [emb], tmp_path / "map2.html", image_root=SAMPLE / "photos")
    assert len(_data_uris(out2.read_text())) == 20


def test_thumbnail_subsample_is_stated(tmp_path, caplog):
    emb, _ = _photo_embeddings(tmp_path)
    m = tsne.shared_map([emb], ["photos"], params=FAST)
    with caplog.at_level(logging.WARNING, logger="featviz.maps.interactive"):
        out = interactive.map_page(m, [emb], tmp_path / "map.html", max_thumbnails=7)
    html = out.read_text()
    assert len(_data_uris(html)) == 7
    assert "thumbnails for 7 of 20 points (a random subsample" in html
    assert any("thumbnails for 7 of 20 points" in r.getMessage() for r in caplog.records)


def test_image_root_is_recovered_from_paths_and_ids(tmp_path):
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "y.png"]
    assert thumbnails.image_root(files, ["a/x.png", "b/y.png"]) == str(tmp_path)
    assert thumbnails.image_root(files, ["x.png", "y.png"]) is None  # two folders: no single root
    assert thumbnails.image_root([Image.new("RGB", (2, 2))], ["digits/0"]) is None


def test_pixel_thumbnail_marks_the_pixel_and_stays_inside_near_borders():
    img = Image.new("RGB", (200, 100), (0, 128, 0))
    t = np.asarray(thumbnails.pixel_thumbnail(img, 50, 100, 64, window=32), np.int16)
    assert t.shape == (64, 64, 3)
    red = (t[..., 0] > 200) & (t[..., 1] < 100)
    ys, xs = np.nonzero(red)
    assert abs(ys.mean() - 32) < 2 and abs(xs.mean() - 32) < 2  # the mark is centred on the pixel
    assert (t[32, 32] == [0, 128, 0]).all()  # the pixel itself stays visible inside the ring
    corner = np.asarray(thumbnails.pixel_thumbnail(img, 0, 0, 64, window=32), np.int16)
    ys, xs = np.nonzero((corner[..., 0] > 200) & (corner[..., 1] < 100))
    assert ys.mean() < 16 and xs.mean() < 16  # the crop shifted inward; the mark is at the corner


def test_shared_map_panels_are_linked_by_row(tmp_path):
    emb, _ = _photo_embeddings(tmp_path)
    other = emb.subset(np.arange(0, 20, 2))
    m = tsne.shared_map([emb, other], ["all", "even"], params=FAST)
    keys = interactive._correspondence_keys([(emb, m.rows[m.groups == 0]), (other, m.rows[m.groups == 1])])
    assert keys is not None and set(keys[1]) <= set(keys[0]) and len(set(keys[0])) == 20
    html = interactive.map_page(m, [emb, other], tmp_path / "m.html").read_text()
    assert len(_data_uris(html)) == 20  # the same images in two panels: thumbnails stored once


def test_twenty_thousand_pixel_thumbnails_stay_under_30_mb(tmp_path):
    """The size promise: 20k points with thumbnails (pixel crops of real photos) < 30 MB."""
    root = SAMPLE / "photos"
    emb = _pixel_embeddings(1000, sorted(root.rglob("*.jpg")), root)
    coords = np.random.default_rng(0).normal(size=(emb.n, 2)).astype(np.float32)
    m = tsne.TsneMap(
        coords,
        emb.labels,
        emb.class_names,
        np.zeros(emb.n, np.int64),
        ["pixels"],
        np.arange(emb.n),
        {},
    )
    t = time.perf_counter()
    out = interactive.map_page(m, [emb], tmp_path / "big.html")
    took = time.perf_counter() - t
    size = out.stat().st_size
    assert size < 30e6, size
    assert len(_data_uris(out.read_text())) == 20_000
    print(f"20k pixel thumbnails: {size / 1e6:.1f} MB in {took:.1f} s")


# ----------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def browser():
    binary = require_chromium()
    c = Chromium(binary)
    yield c
    c.close()


def test_page_renders_and_hover_shows_the_thumbnail(tmp_path, browser):
    emb, _ = _photo_embeddings(tmp_path)
    m = tsne.shared_map([emb], ["photos"], params=FAST)
    out = interactive.map_page(m, [emb], tmp_path / "map.html", title="photos")
    browser.open(out.resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready()")
    time.sleep(0.5)  # the first WebGL frame
    before = browser.screenshot()
    assert _not_blank(before)
    assert browser.eval(TOOLTIP_IMG) == []
    src = "featviz._view('featviz-panel-0').model.renderers[0].data_source"
    xs = np.array(browser.eval(f"Array.from({src}.data.x)"))
    ys = np.array(browser.eval(f"Array.from({src}.data.y)"))
    gap = np.hypot(xs[:, None] - xs, ys[:, None] - ys) + np.eye(len(xs)) * 1e9
    row = int(gap.min(1).argmax())  # the most isolated point: the tooltip can only be its own
    x, y = browser.eval(f"featviz.locate(0, {row})")
    browser.hover(x, y)
    browser.wait_for(f"({TOOLTIP_IMG}).length > 0", timeout=10)
    tips = browser.eval(TOOLTIP_IMG)
    after = browser.screenshot()
    assert len(tips) == 1 and tips[0]["complete"] and tips[0]["w"] == thumbnails.side_for(20)
    # the thumbnail shown is the hovered point's image: compare the pixels on screen with it
    src = browser.eval(f"featviz._view('featviz-panel-0').model.renderers[0].data_source.data.file[{row}]")
    want = thumbnails.image_thumbnail(Image.open(SAMPLE / "photos" / src).convert("RGB"), tips[0]["w"])
    t = tips[0]
    shown = after.crop((round(t["x"]), round(t["y"]), round(t["x"]) + want.width, round(t["y"]) + want.height))
    diff = np.abs(np.asarray(shown, np.float32) - np.asarray(want, np.float32)).mean()
    assert diff < 20, diff
    assert _not_blank(shown)
    assert src in t["text"] and src.split("/")[0] in t["text"]  # its file and its class
    before.save(tmp_path / "screenshot.png")
    after.save(tmp_path / "hover.png")
    if os.environ.get("FEATVIZ_SCREENSHOTS"):
        d = Path(os.environ["FEATVIZ_SCREENSHOTS"])
        d.mkdir(parents=True, exist_ok=True)
        before.save(d / "map.png")
        after.save(d / "map_hover.png")


def test_selection_in_one_panel_selects_the_same_rows_in_the_other(tmp_path, browser):
    emb, _ = _photo_embeddings(tmp_path)
    other = emb.subset(np.arange(0, 20, 2))
    m = tsne.shared_map([emb, other], ["all", "even"], params=FAST)
    out = interactive.map_page(m, [emb, other], tmp_path / "linked.html")
    browser.open(out.resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready()")
    src = "featviz._view('featviz-panel-{}').model.renderers[0].data_source"
    files = browser.eval(f"{src.format(0)}.data.file")
    pick = [i for i, f in enumerate(files) if f.startswith(("cat/", "rocket/"))]
    browser.eval(f"{src.format(0)}.selected.indices = {json.dumps(pick)}")
    sel = browser.eval(
        f"(() => {{ const s = {src.format(1)}; return s.selected.indices.map(i => s.data.file[i]); }})()"
    )
    want = sorted(f for f in other.ids if f.startswith(("cat/", "rocket/")))
    assert sorted(sel) == want and len(want) == 4
    # each legend entry holds its class's renderers in both panels, so one click hides the class in both
    legends = browser.eval("""(() => {
      const models = [...Bokeh.documents[0].all_models].filter(m => m.type === 'Legend');
      return models.map(l => l.items.map(it => [it.label.value,
        new Set(it.renderers.map(r => r.data_source.name)).size]));
    })()""")
    assert legends and all(len(entry) == 5 and all(n == 2 for _, n in entry) for entry in legends), legends
    # and a real click on the legend hides that class in both panels; a second click shows it again
    box = browser.eval("""(() => { const pv = featviz._view('featviz-panel-1');
      const leg = [...Bokeh.documents[0].all_models].find(m => m.type === 'Legend');
      const b = pv.views.find_one(leg).bbox, r = pv.canvas_view.el.getBoundingClientRect();
      return [r.left + b.left, r.top + b.top, b.height]; })()""")
    hidden = """[...Bokeh.documents[0].all_models].filter(m => m.type === 'GlyphRenderer' && !m.visible)
      .map(m => m.data_source.name + ':' + m.view.filter.group)"""

    def click(y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            browser.send("Input.dispatchMouseEvent", type=kind, x=box[0] + 20, y=y, button="left", clickCount=1)

    for y in np.arange(box[1], box[1] + box[2], 3.0):
        click(y)
        gone = browser.eval(hidden)
        if gone:
            break
    assert len(gone) == 2 and len({g.split(":")[1] for g in gone}) == 1, gone  # one class, both panels
    click(y)
    assert browser.eval(hidden) == []
    if os.environ.get("FEATVIZ_SCREENSHOTS"):
        browser.screenshot().save(Path(os.environ["FEATVIZ_SCREENSHOTS"]) / "linked.png")


def _views_page(tmp_path: Path) -> tuple[Path, int]:
    rng = np.random.default_rng(0)
    img = np.asarray(Image.open(SAMPLE / "photos" / "cat" / "cat_0.jpg").convert("RGB").resize((96, 96)))
    views = [img, img[:, ::-1], (img * 0.5).astype(np.uint8)]
    p = 30
    yx = rng.integers(0, 96, size=(p, 2))
    view_yx = [yx, np.c_[yx[:, 0], 95 - yx[:, 1]], yx]
    labels = rng.integers(0, 3, p)
    rows = [(f"model {r}", [rng.normal(size=(p, 2)) for _ in range(3)]) for r in range(2)]
    out = interactive.views_page(
        tmp_path / "views.html",
        views,
        view_yx,
        rows,
        labels,
        ["a", "b", "c"],
        view_names=["I", "II", "III"],
        title="views",
    )
    return out, p


def test_views_page_has_a_thumbnail_per_view_and_pixel(tmp_path):
    out, p = _views_page(tmp_path)
    html = out.read_text()
    assert len(set(_data_uris(html))) == 3 * p  # each view's crop around each pixel, shared by both rows
    assert html.count("featviz-panel-") >= 6
    with pytest.raises(interactive.DataError, match="one a view"):
        interactive.views_page(
            tmp_path / "bad.html",
            [np.zeros((8, 8, 3))] * 3,
            [np.zeros((2, 2))] * 3,
            [("m", [np.zeros((2, 2))])],
            [0, 1],
            ["a", "b"],
            view_names=["I", "II", "III"],
        )


def test_views_page_links_every_panel(tmp_path, browser):
    out, p = _views_page(tmp_path)
    browser.open(out.resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready()")
    src = "featviz._view('featviz-panel-{}').model.renderers[0].data_source"
    keys0 = browser.eval(f"Array.from({src.format(0)}.data.key)")
    pick = [i for i, k in enumerate(keys0) if k % 3 == 0]
    browser.eval(f"{src.format(0)}.selected.indices = {json.dumps(pick)}")
    for k in range(1, 6):
        sel = browser.eval(
            f"(() => {{ const s = {src.format(k)}; return Array.from(s.selected.indices).map(i => s.data.key[i]); }})()"
        )
        assert sorted(sel) == sorted(keys0[i] for i in pick), k
    if os.environ.get("FEATVIZ_SCREENSHOTS"):
        browser.screenshot().save(Path(os.environ["FEATVIZ_SCREENSHOTS"]) / "views_linked.png")


def test_builtin_digits_thumbnails_are_the_images_embed_saw():
    from featviz.data.images import digits

    want = digits(16)
    res = thumbnails.ImageResolver(want.ids, {"arguments": {"images": "digits"}, "image_size": [16, 16]})
    for i in (0, 7, 1796):
        np.testing.assert_array_equal(np.asarray(res.image(i)), np.asarray(want.items[i]))
    assert res.key(7) != res.key(8)
