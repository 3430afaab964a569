"""The interactive map pages side by side: the inline Bokeh page against the large canvas page, in headless Chromium.

    PYTHONPATH=. python benchmarks/page_bench.py [--n 200000] [--large-n 1000000]

Both pages show the same synthetic image map (``--n`` points, distinct ids, five classes, no
thumbnails: only the points are compared); the large page is also written at ``--large-n``. For
each: the time to write it, its size on disk, the time from opening it in headless Chromium until it
has drawn its points and can be hovered, and the time from a mouse move onto a point until the hover
shows that point's file (the first hover, which loads the large page's chunk of file names, and the
next one). Times come through the DevTools protocol, polled every 0.1 s. Chromium runs with
``--disable-gpu`` (software rendering), as on a machine without a GPU. Prints one table and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the small DevTools client of the browser tests


def _map(n: int):
    from featviz.io.artifacts import Embeddings
    from featviz.maps import projection as tsne

    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5, n)
    centres = np.array([[0, 12], [-12, 2], [12, 0], [-6, -12], [8, -12]], np.float64)
    coords = (centres[lab] + rng.normal(size=(n, 2)) * 2).astype(np.float32)
    coords[0], coords[1] = (40, 40), (-40, -40)  # alone: the points the benchmark hovers
    ids = np.array([f"img/{i:07d}.jpg" for i in range(n)])
    emb = Embeddings(np.zeros((n, 1), np.float32), lab, list("abcde"), ids, manifest={"image_root": "/nowhere"})
    return tsne.TsneMap(coords, lab, list("abcde"), np.zeros(n, np.int64), ["map"], np.arange(n), {}), emb


def _size(out: Path) -> int:
    folder = out.with_name(out.stem + "_files")
    return out.stat().st_size + sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _one(browser, mode: str, n: int, d: Path) -> dict:
    from featviz.maps import interactive

    m, emb = _map(n)
    out = d / f"{mode}_{n}.html"
    t = time.perf_counter()
    interactive.map_page(m, [emb], out, mode=mode, max_thumbnails=0)
    wrote = time.perf_counter() - t
    t = time.perf_counter()
    browser.open(out.resolve().as_uri())
    browser.wait_for("window.featviz !== undefined && featviz.ready()", timeout=600)
    if mode == "inline":  # Bokeh draws after it says it is ready: wait for the WebGL frame to be painted
        browser.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))", timeout=600)
    ready = time.perf_counter() - t
    src = "featviz._view('featviz-panel-0').model.renderers[0].data_source"

    def shown(row: int) -> float:
        """Seconds from a mouse move onto ``row`` until the page shows its file."""
        at = row if mode == "large" else browser.eval(f"Array.from({src}.data.row).indexOf({row})")  # Bokeh shuffles
        x, y = browser.eval(f"featviz.locate(0, {at})")
        name = f"img/{row:07d}.jpg"
        seen = (  # any element, shadow roots included, that shows the file's name
            "(() => { let hit = false; const w = (n) => { if (!n || hit) return; if (n.shadowRoot) w(n.shadowRoot);"
            " const kids = n.children || []; if (!kids.length && (n.textContent || '').includes('" + name + "'))"
            " hit = true; for (const c of kids) w(c); }; w(document.body); return hit; })()"
        )
        t = time.perf_counter()
        browser.hover(x, y)
        browser.wait_for(seen, timeout=120)
        return time.perf_counter() - t

    hover = shown(0)  # the first: the large page loads its chunk of file names
    again = shown(1)  # the next: the hover alone
    return {
        "mode": mode,
        "n": n,
        "write_s": wrote,
        "mb": _size(out) / 1e6,
        "ready_s": ready,
        "hover_s": hover,
        "again_s": again,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="points of the side-by-side comparison")
    ap.add_argument("--large-n", type=int, default=1_000_000, help="points of the large page alone (0: skip)")
    a = ap.parse_args()
    from test_interactive import Chromium, chromium_binary

    binary = chromium_binary()
    if binary is None:
        sys.exit("no chromium on PATH: apt-get install chromium")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, n in (("inline", a.n), ("large", a.n)) + ((("large", a.large_n),) if a.large_n else ()):
            browser = Chromium(binary, width=1200, height=950)  # a fresh browser each: nothing left running
            try:
                rows.append(_one(browser, mode, n, Path(tmp)))
            finally:
                browser.close()
            print(rows[-1], flush=True)
    print(f"\n{'page':<8}{'points':>11}{'write s':>9}{'MB':>8}{'ready s':>9}{'1st hover s':>13}{'hover s':>9}")
    for r in rows:
        print(
            f"{r['mode']:<8}{r['n']:>11,}{r['write_s']:>9.1f}{r['mb']:>8.1f}{r['ready_s']:>9.1f}"
            f"{r['hover_s']:>13.2f}{r['again_s']:>9.2f}"
        )
    inl, lg = rows[0], rows[1]
    print(
        f"\nat {a.n:,} points the large page against the inline one: written {inl['write_s'] / lg['write_s']:.1f}x "
        f"faster, {inl['mb'] / lg['mb']:.1f}x smaller, ready {inl['ready_s'] / lg['ready_s']:.1f}x sooner, "
        f"first hover {inl['hover_s'] / lg['hover_s']:.1f}x and the next "
        f"{inl['again_s'] / max(lg['again_s'], 1e-3):.0f}x quicker"
    )


if __name__ == "__main__":
    main()
