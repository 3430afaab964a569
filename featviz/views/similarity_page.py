"""The interactive similarity page: one self-contained HTML file where a click on any patch redraws every map.

The page holds each image (JPEG, base64) and the patch features ONCE: l2-normalised, as float16,
base64, so that the similarity of two patches is the dot product of their stored vectors, which the
page's own script computes (no server, no CDN: the script is inline). Maps are drawn with the
colour map of the PNGs, as a 256-entry table from matplotlib, and scaled as the PNGs are
(``joint_scale``: over all images of one query, the lowest similarity is 0 and the highest 1).

Size: when the float16 features of all patches do not fit ``budget`` bytes (with the images), they
are reduced to the ``k`` dimensions that fit by a truncated SVD of the unit vectors (their top
right-singular vectors; dot products of the reduced vectors are the best rank-``k`` approximation of
the cosine similarities), and the page says so; ``page_maps`` computes the maps the page shows,
the same way, for tests and for the stated difference from the full-precision maps.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PAGE_BUDGET = 14_000_000
"""Bytes the page may take (images, features as base64, script); the reduction keeps it below."""

PAGE_IMAGE_SIDE = 512
"""The images are stored at most this many pixels on their long side (they are shown at ~240 px)."""


@dataclass
class PageFeatures:
    """The features as the page stores them.

    Attributes:
        stored: (N, h, w, k) float16: the unit vectors, or their projection on the top ``k`` right
            singular vectors when ``k`` < ``dims``.
        dims: The feature width C.
        retained: Share of the unit vectors' energy (sum of squared singular values) the ``k``
            dimensions keep (1.0 without reduction).
    """

    stored: np.ndarray
    dims: int
    retained: float

    @property
    def k(self) -> int:
        """Dimensions stored per patch."""
        return int(self.stored.shape[-1])

    def to_dict(self) -> dict[str, Any]:
        """What the page stores, as ``similarity.json`` records it."""
        return {
            "storage": "float16, base64",
            "dims": self.k,
            "feature_dim": self.dims,
            "reduction": None if self.k == self.dims else "truncated SVD of the l2-normalised patch features",
            "retained_energy": self.retained,
        }


def page_features(unit: np.ndarray, budget_bytes: int) -> PageFeatures:
    """The (N, h, w, C) unit vectors as the page stores them: float16, reduced to fit ``budget_bytes``.

    ``budget_bytes`` counts the base64 text (4 characters per 3 bytes).
    """
    n, h, w, c = unit.shape
    x = unit.reshape(-1, c).astype(np.float32)
    k = int(min(c, max(1, (budget_bytes * 3 // 4) // (2 * len(x)))))
    if k == c:
        return PageFeatures(x.astype(np.float16).reshape(n, h, w, c), c, 1.0)
    gram = x.T.astype(np.float64) @ x.astype(np.float64)
    vals, vecs = np.linalg.eigh(gram)  # ascending
    top = vecs[:, ::-1][:, :k]
    retained = float(vals[::-1][:k].sum() / max(vals.sum(), 1e-12))
    stored = (x @ top.astype(np.float32)).astype(np.float16)
    return PageFeatures(stored.reshape(n, h, w, k), c, retained)


def page_maps(stored: np.ndarray, image: int, patch: tuple[int, int]) -> np.ndarray:
    """(N, h, w) the similarities the page computes for a click on ``patch`` of ``image``.

    The stored float16 vectors, widened, and their dot products accumulated in float64 (as the
    page's script does with JavaScript numbers).
    """
    x = stored.astype(np.float64)
    return x @ x[image, patch[0], patch[1]]


def joint_scale(maps: np.ndarray) -> np.ndarray:
    """One query's maps of all images scaled to [0, 1] together: lowest similarity 0, highest 1."""
    m = np.asarray(maps, np.float64)
    lo, hi = float(m.min()), float(m.max())
    return np.zeros_like(m) if hi - lo <= 1e-12 else (m - lo) / (hi - lo)


def colour_table(cmap: str) -> np.ndarray:
    """(256, 3) uint8: the colour map's 256 entries, as the page draws them (matplotlib's lookup)."""
    from matplotlib import colormaps

    return np.uint8(np.round(colormaps[cmap](np.arange(256))[:, :3] * 255))


def colour_index(values: np.ndarray) -> np.ndarray:
    """Scaled values in [0, 1] -> colour-table rows, by matplotlib's rule (``floor(v * 256)``, 1 -> 255)."""
    return np.minimum(255, np.floor(np.clip(values, 0, 1) * 256)).astype(np.int64)


def _jpeg(rgb: np.ndarray) -> str:
    from PIL import Image

    from featviz.views.sheets import to_uint8

    im = Image.fromarray(to_uint8(rgb))
    if max(im.size) > PAGE_IMAGE_SIDE:
        s = PAGE_IMAGE_SIDE / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_page(
    path: str | os.PathLike,
    rgbs: Sequence[np.ndarray],
    unit: np.ndarray,
    ids: Sequence[str],
    *,
    query: tuple[int, int, int],
    title: str,
    cmap: str = "inferno",
    alpha: float = 0.6,
    budget: int = PAGE_BUDGET,
) -> PageFeatures:
    """Write the page for the images ``rgbs`` and their (N, h, w, C) unit features.

    Args:
        path: The .html file.
        rgbs: The images as the model saw them, (H, W, 3) in [0, 1].
        unit: (N, h, w, C) l2-normalised patch features.
        ids: The images' ids (captions).
        query: (image, row, column) shown when the page opens.
        title: The page's heading (model, layer, size).
        cmap: The colour map (the PNGs').
        alpha: The map's weight over the image (the PNGs').
        budget: Bytes the page may take; the features are reduced to fit (see the module).

    Returns:
        The features as stored.
    """
    images = [_jpeg(rgb) for rgb in rgbs]
    room = budget - sum(len(s) for s in images) - 64_000 - sum(len(i) for i in ids)
    feats = page_features(unit, max(room, 0))
    n, h, w, k = feats.stored.shape
    data = {
        "ids": list(ids),
        "grid": [h, w],
        "n": n,
        "k": k,
        "images": images,
        "aspect": rgbs[0].shape[0] / rgbs[0].shape[1],
        "lut": colour_table(cmap).reshape(-1).tolist(),
        "alpha": alpha,
        "query": list(query),
        "features": base64.b64encode(feats.stored.astype("<f2").tobytes()).decode("ascii"),
    }
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    note = (
        f"{k} float16 dimensions per patch"
        if k == feats.dims
        else f"features reduced from {feats.dims} to {k} dimensions (truncated SVD, "
        f"{100 * feats.retained:.1f} % of the energy kept) to keep the page small"
    )
    page = _TEMPLATE.format(
        title=html.escape(title),
        note=html.escape(f"{n} images, {h}x{w} patches, {note}."),
        data=blob,
        script=_SCRIPT,
        alpha=alpha,
    )
    from featviz.io.outputs import write_text

    write_text(path, page)
    return feats


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 15px; margin: 0 0 4px; }}
#fv-status {{ margin: 4px 0 10px; color: #444; }}
#fv-grid {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; }}
.stack {{ position: relative; width: 240px; cursor: crosshair; }}
.stack img, .stack canvas {{ position: absolute; left: 0; top: 0; width: 100%; height: 100%; }}
.stack canvas {{ image-rendering: pixelated; opacity: {alpha}; }}
.mark {{ position: absolute; border: 2px solid #00e5ff; box-sizing: border-box; pointer-events: none; }}
figcaption {{ font-size: 11px; max-width: 240px; overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }}
#fv-bar {{ display: inline-block; width: 160px; height: 10px; vertical-align: middle; }}
</style></head>
<body>
<h1>{title}</h1>
<div>{note} Click any patch of any image: every map shows its cosine similarity to that patch.
Opacity <input id="fv-alpha" type="range" min="0" max="1" step="0.05" value="{alpha}"></div>
<div id="fv-status"></div>
<div id="fv-grid"></div>
<script type="application/json" id="fv-data">{data}</script>
<script>{script}</script>
</body></html>
"""

_SCRIPT = r"""
(() => {
  const D = JSON.parse(document.getElementById('fv-data').textContent);
  const [gh, gw] = D.grid, n = D.n, k = D.k, P = gh * gw;
  const half = new Float32Array(65536);
  for (let b = 0; b < 65536; b++) {
    const s = (b & 0x8000) ? -1 : 1, e = (b >> 10) & 31, f = b & 1023;
    half[b] = e === 0 ? s * Math.pow(2, -14) * (f / 1024)
      : e === 31 ? (f ? NaN : s * Infinity) : s * Math.pow(2, e - 15) * (1 + f / 1024);
  }
  const bytes = Uint8Array.from(atob(D.features), (c) => c.charCodeAt(0));
  const raw = new Uint16Array(bytes.buffer);
  const F = new Float32Array(raw.length);
  for (let t = 0; t < raw.length; t++) F[t] = half[raw[t]];
  const grid = document.getElementById('fv-grid');
  const status = document.getElementById('fv-status');
  const cells = [];
  D.ids.forEach((id, m) => {
    const fig = document.createElement('figure');
    const stack = document.createElement('div');
    stack.className = 'stack';
    stack.style.height = (240 * D.aspect) + 'px';
    const img = document.createElement('img');
    img.src = D.images[m];
    const cv = document.createElement('canvas');
    cv.width = gw; cv.height = gh;
    const mark = document.createElement('div');
    mark.className = 'mark';
    mark.style.display = 'none';
    const cap = document.createElement('figcaption');
    cap.title = id;
    stack.append(img, cv, mark);
    fig.append(stack, cap);
    grid.append(fig);
    stack.addEventListener('click', (ev) => {
      const r = stack.getBoundingClientRect();
      const j = Math.min(gw - 1, Math.floor((ev.clientX - r.left) / r.width * gw));
      const i = Math.min(gh - 1, Math.floor((ev.clientY - r.top) / r.height * gh));
      query(m, i, j);
    });
    cells.push({stack, cv, mark, cap, id});
  });
  const maps = new Float64Array(n * P);
  let range = [0, 0], current = null;
  function query(m, i, j) {
    const q = ((m * gh + i) * gw + j) * k;
    let lo = Infinity, hi = -Infinity;
    for (let p = 0; p < n * P; p++) {
      let s = 0;
      const o = p * k;
      for (let d = 0; d < k; d++) s += F[o + d] * F[q + d];
      maps[p] = s;
      if (s < lo) lo = s;
      if (s > hi) hi = s;
    }
    range = [lo, hi];
    current = [m, i, j];
    cells.forEach((c, im) => {
      const ctx = c.cv.getContext('2d');
      const px = ctx.createImageData(gw, gh);
      let best = -Infinity;
      for (let p = 0; p < P; p++) {
        const s = maps[im * P + p];
        if (s > best) best = s;
        const v = hi - lo <= 1e-12 ? 0 : (s - lo) / (hi - lo);
        const t = Math.min(255, Math.floor(Math.min(1, Math.max(0, v)) * 256));
        px.data.set([D.lut[3 * t], D.lut[3 * t + 1], D.lut[3 * t + 2], 255], 4 * p);
      }
      ctx.putImageData(px, 0, 0);
      c.mark.style.display = im === m ? 'block' : 'none';
      if (im === m) {
        Object.assign(c.mark.style, {left: (100 * j / gw) + '%', top: (100 * i / gh) + '%',
          width: (100 / gw) + '%', height: (100 / gh) + '%'});
      }
      c.cap.textContent = `${c.id} · max ${best.toFixed(2)}`;
    });
    status.textContent = `cosine similarity to patch (${i}, ${j}) of ${D.ids[m]}: ` +
      `from ${lo.toFixed(3)} (dark) to ${hi.toFixed(3)} (bright), one scale for all images`;
    document.title = `similarity ${m} ${i} ${j}`;
  }
  document.getElementById('fv-alpha').addEventListener('input', (ev) => {
    cells.forEach((c) => { c.cv.style.opacity = ev.target.value; });
  });
  query(...D.query);
  window.featviz = {
    ready: true, query, grid: D.grid,
    current: () => current, range: () => range,
    map: (m) => Array.from(maps.slice(m * P, (m + 1) * P)),
    pixels: (m) => Array.from(cells[m].cv.getContext('2d').getImageData(0, 0, gw, gh).data),
    centre: (m, i, j) => { const r = cells[m].stack.getBoundingClientRect();
      return [r.left + (j + 0.5) * r.width / gw, r.top + (i + 0.5) * r.height / gh]; },
  };
})();
"""
