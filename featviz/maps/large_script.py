"""The script and style of the large interactive page (``featviz.maps.large_page``), as text.

A small hand-written canvas page: no library, no network, no server. It reads the points from
``<page>_files/points.js`` (binary arrays as base64: a ``file://`` page may load a script beside it
but may not ``fetch`` a file), draws them on a 2-D canvas as a density raster at the current zoom
(each screen pixel gets the mean colour of the classes of its points, more opaque the more points
share it), and finds the point under the mouse with a grid index (a counting sort of the points
into about N/8 cells: a hover looks at the cells within 12 screen pixels only). File names are
loaded when first needed, in chunks (``names/NNNNN.js``); thumbnails are ``<img>`` files of the
folder (``thumbs/DDD/NNNNNN.webp``).
"""

STYLE = """
body { font-family: sans-serif; margin: 6px 10px; color: #222; }
#featviz-head h2 { margin: 4px 0; }
#featviz-head div { font-size: 12px; color: #555; }
#featviz-main { display: flex; align-items: flex-start; gap: 10px; margin-top: 6px; }
.featviz-panel { position: relative; flex-shrink: 0; }
.featviz-panel .ptitle { font-size: 13px; font-weight: bold; margin: 2px 0; }
.featviz-panel canvas { position: absolute; left: 0; border: 1px solid #ddd; }
.featviz-panel canvas.overlay { pointer-events: none; border-color: transparent; }
#featviz-legend { font-size: 12px; max-height: 820px; overflow-y: auto; min-width: 150px; }
#featviz-legend .item { cursor: pointer; padding: 1px 2px; white-space: nowrap; }
#featviz-legend .item.off { opacity: 0.35; text-decoration: line-through; }
.sw { display: inline-block; width: 10px; height: 10px; margin-right: 5px; border-radius: 2px; }
#featviz-card { position: fixed; display: none; background: #fff; border: 1px solid #aaa;
  box-shadow: 1px 1px 4px rgba(0,0,0,.25); padding: 5px; font-size: 12px; max-width: 260px;
  pointer-events: none; z-index: 10; }
#featviz-card img { display: block; margin: 0 0 4px 0; width: 128px; image-rendering: auto; }
#featviz-card .note { font-size: 10px; color: #888; margin-bottom: 3px; }
#featviz-card .file { word-break: break-all; font-size: 11px; }
#featviz-card .near { border-top: 1px dashed #bbb; margin-top: 4px; padding-top: 3px; color: #555; }
#featviz-card img.near { width: 64px; }
#featviz-error { color: #b00; font-weight: bold; margin: 20px; }
#featviz-selection { display: none; font-size: 12px; margin-top: 4px; padding: 3px 6px; background: #eef3fb;
  border: 1px solid #c5d5ee; border-radius: 3px; }
#featviz-selection button { font-size: 11px; margin-left: 4px; }
"""

SCRIPT = r"""
(function () {
'use strict';
const META = JSON.parse(document.getElementById('featviz-meta').textContent);
const DIR = META.folder;
const state = { ready: false, hover: null, drawMs: 0, hidden: new Uint8Array(META.classes.length + 1) };
window.featviz = state.api = {};
function fail(msg) {
  const d = document.createElement('div'); d.id = 'featviz-error'; d.textContent = msg;
  document.body.appendChild(d);
}
const RAW = window.FEATVIZ_POINTS;
if (!RAW) { fail('The page\'s data folder ' + DIR + '/ was not found beside this page: keep the page and ' +
                 'its folder together (copy or move both).'); return; }
const TYPES = { float32: Float32Array, uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array,
                int32: Int32Array };
function decode(entry) {
  if (!entry) return null;
  const bin = atob(entry[1]), u8 = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
  return new TYPES[entry[0]](u8.buffer);
}
const X = decode(RAW.x), Y = decode(RAW.y), LAB = decode(RAW.label), ROW = decode(RAW.row),
  NAME = decode(RAW.name), PY = decode(RAW.py), PX = decode(RAW.px), TPT = decode(RAW.thumb_point),
  TID = decode(RAW.thumb_id);
delete window.FEATVIZ_POINTS;
const N = X.length, UNK = META.classes.length;  // unknown labels are stored as UNK
const RGB = META.colors.concat([META.unknown_color]).map(h => [1, 3, 5].map(k => parseInt(h.substr(k, 2), 16)));

// ---------------------------------------------------------------- the view (shared by all panels)
const b = META.bounds;  // [x0, x1, y0, y1]
const home = { cx: (b[0] + b[1]) / 2, cy: (b[2] + b[3]) / 2 };
const view = { cx: home.cx, cy: home.cy, s: 1 };
const panels = META.panels.map((p, k) => Object.assign({ k: k, end: p.start + p.n }, p));
function resetView() {
  const W = panels[0].W, H = panels[0].H;
  view.cx = home.cx; view.cy = home.cy;
  view.s = Math.min(W / (b[1] - b[0]), H / (b[3] - b[2]));
}

// ---------------------------------------------------------------- layout
const main = document.getElementById('featviz-main'), legend = document.getElementById('featviz-legend');
// square panels side by side that fit the window beside the legend (at least 300 px, at most 820)
const size = Math.max(300, Math.min(820, Math.floor((window.innerWidth - 220) / panels.length) - 14));
for (const p of panels) {
  p.W = p.H = size;
  const div = document.createElement('div'); div.className = 'featviz-panel';
  div.style.width = (size + 2) + 'px'; div.style.height = (size + 24) + 'px';
  const t = document.createElement('div'); t.className = 'ptitle';
  t.textContent = p.title + '  (n=' + p.n.toLocaleString('en-US') + ')';
  div.appendChild(t);
  p.canvas = document.createElement('canvas'); p.overlay = document.createElement('canvas');
  p.overlay.className = 'overlay';
  for (const c of [p.canvas, p.overlay]) { c.width = size; c.height = size; c.style.top = '22px'; div.appendChild(c); }
  p.ctx = p.canvas.getContext('2d'); p.octx = p.overlay.getContext('2d');
  p.image = p.ctx.createImageData(size, size);
  p.acc = new Float32Array(size * size * 4);
  p.ghost = new Uint8Array(size * size);  // while a selection is shown: pixels with unselected points only
  main.insertBefore(div, legend);
}
resetView();

// ---------------------------------------------------------------- drawing: a density raster of the points
function draw(p) {
  const W = p.W, H = p.H, acc = p.acc, hid = state.hidden, s = view.s, sel = state.sel ? SEL : null;
  const ox = W / 2 - view.cx * s, oy = H / 2 + view.cy * s, ghost = p.ghost;
  acc.fill(0); ghost.fill(0);
  let nv = 0;
  for (let i = p.start; i < p.end; i++) {
    if (hid[LAB[i]]) continue;
    const u = X[i] * s + ox, v = oy - Y[i] * s;
    if (u >= 0 && u < W && v >= 0 && v < H) nv++;
  }
  // a dot of d x d screen pixels: 1 when the view is full, up to 5 when few points are in it
  const d = Math.max(1, Math.min(5, Math.round(Math.sqrt(W * H / Math.max(nv, 1)) / 4)));
  const h0 = Math.floor((d - 1) / 2);
  for (let i = p.start; i < p.end; i++) {
    const c = LAB[i];
    if (hid[c]) continue;
    const u = Math.floor(X[i] * s + ox) - h0, v = Math.floor(oy - Y[i] * s) - h0;
    if (u + d <= 0 || u >= W || v + d <= 0 || v >= H) continue;
    if (sel && !sel[i]) {  // not selected: a faint grey where no selected point is
      for (let yy = Math.max(v, 0); yy < Math.min(v + d, H); yy++) {
        for (let xx = Math.max(u, 0); xx < Math.min(u + d, W); xx++) ghost[yy * W + xx] = 1;
      }
      continue;
    }
    const col = RGB[c];
    for (let yy = Math.max(v, 0); yy < Math.min(v + d, H); yy++) {
      for (let xx = Math.max(u, 0); xx < Math.min(u + d, W); xx++) {
        const o = (yy * W + xx) * 4;
        acc[o] += col[0]; acc[o + 1] += col[1]; acc[o + 2] += col[2]; acc[o + 3] += 1;
      }
    }
  }
  let mx = 1;
  for (let o = 3; o < acc.length; o += 4) if (acc[o] > mx) mx = acc[o];
  const L = Math.log1p(mx), px = p.image.data;
  for (let o = 0; o < acc.length; o += 4) {
    const n = acc[o + 3];
    if (n === 0) { px[o] = px[o + 1] = px[o + 2] = ghost[o >> 2] ? 226 : 255; px[o + 3] = 255; continue; }
    const a = mx <= 1 ? 1 : 0.45 + 0.55 * Math.log1p(n) / L;
    px[o] = 255 * (1 - a) + a * acc[o] / n;
    px[o + 1] = 255 * (1 - a) + a * acc[o + 1] / n;
    px[o + 2] = 255 * (1 - a) + a * acc[o + 2] / n;
    px[o + 3] = 255;
  }
  if (d === 1) spread(p, acc, px);
  p.ctx.putImageData(p.image, 0, 0);
  p.visible = nv;
}
// like datashader's spread: an empty pixel next to a drawn one takes its colour, so a lone point is
// 3 x 3 pixels rather than a speck when the view is full (d = 1)
function spread(p, acc, px) {
  const W = p.W, H = p.H, taken = new Uint8Array(W * H);
  for (let v = 0; v < H; v++) {
    for (let u = 0; u < W; u++) {
      const o = v * W + u;
      if (acc[o * 4 + 3] === 0) continue;
      for (let vv = Math.max(v - 1, 0); vv <= Math.min(v + 1, H - 1); vv++) {
        for (let uu = Math.max(u - 1, 0); uu <= Math.min(u + 1, W - 1); uu++) {
          const q = vv * W + uu;
          if (acc[q * 4 + 3] > 0 || taken[q]) continue;
          taken[q] = 1;
          px[q * 4] = px[o * 4]; px[q * 4 + 1] = px[o * 4 + 1]; px[q * 4 + 2] = px[o * 4 + 2];
        }
      }
    }
  }
}
let pending = false;
function redraw() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    const t0 = performance.now();
    for (const p of panels) draw(p);
    state.drawMs = performance.now() - t0;
    mark();
  });
}

// ---------------------------------------------------------------- the grid index behind hover
function buildGrid(p) {
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (let i = p.start; i < p.end; i++) {
    if (X[i] < x0) x0 = X[i]; if (X[i] > x1) x1 = X[i]; if (Y[i] < y0) y0 = Y[i]; if (Y[i] > y1) y1 = Y[i];
  }
  const G = Math.max(1, Math.ceil(Math.sqrt(p.n / 8)));
  const w = Math.max(x1 - x0, 1e-12) / G, h = Math.max(y1 - y0, 1e-12) / G;
  const cell = new Uint32Array(p.n), start = new Uint32Array(G * G + 1);
  for (let i = 0; i < p.n; i++) {
    const cx = Math.min(G - 1, Math.floor((X[p.start + i] - x0) / w));
    const cy = Math.min(G - 1, Math.floor((Y[p.start + i] - y0) / h));
    cell[i] = cy * G + cx; start[cell[i] + 1]++;
  }
  for (let c = 0; c < G * G; c++) start[c + 1] += start[c];
  const fill = start.slice(0, G * G), order = new Uint32Array(p.n);
  for (let i = 0; i < p.n; i++) order[fill[cell[i]]++] = p.start + i;
  p.grid = { x0: x0, y0: y0, w: w, h: h, G: G, start: start, order: order };
}
function nearest(p, x, y, r, only) {  // only(i): a condition on the point, or none
  const g = p.grid, hid = state.hidden;
  const ca = Math.max(0, Math.floor((x - r - g.x0) / g.w)), cb = Math.min(g.G - 1, Math.floor((x + r - g.x0) / g.w));
  const ra = Math.max(0, Math.floor((y - r - g.y0) / g.h)), rb = Math.min(g.G - 1, Math.floor((y + r - g.y0) / g.h));
  let best = -1, bd = r * r;
  for (let cy = ra; cy <= rb; cy++) {
    for (let cx = ca; cx <= cb; cx++) {
      const c = cy * g.G + cx;
      for (let k = g.start[c]; k < g.start[c + 1]; k++) {
        const i = g.order[k];
        if (hid[LAB[i]] || (only && !only(i))) continue;
        const dx = X[i] - x, dy = Y[i] - y, dd = dx * dx + dy * dy;
        if (dd < bd || (dd === bd && i < best)) { bd = dd; best = i; }
      }
    }
  }
  return best;
}

// ---------------------------------------------------------------- names (loaded in chunks) and thumbnails
const names = {}, loading = {};
window.featviz_names = function (chunk, list) { names[chunk] = list; delete loading[chunk]; card(); };
function nameOf(i) {
  const j = NAME ? NAME[i] : i, c = Math.floor(j / META.names_chunk);
  if (names[c]) return names[c][j - c * META.names_chunk];
  if (!loading[c] && META.n_names > 0) {
    loading[c] = true;
    const s = document.createElement('script');
    s.src = DIR + '/names/' + String(c).padStart(5, '0') + '.js';
    s.onerror = () => { loading[c] = 'failed'; };
    document.head.appendChild(s);
  }
  return null;
}
function thumbOf(i) {
  if (!TPT) return -1;
  let lo = 0, hi = TPT.length - 1;
  while (lo <= hi) {
    const m = (lo + hi) >> 1;
    if (TPT[m] === i) return TID[m];
    if (TPT[m] < i) lo = m + 1; else hi = m - 1;
  }
  return -1;
}
function thumbUrl(t) {
  return DIR + '/thumbs/' + String(Math.floor(t / 1000)).padStart(3, '0') + '/' + String(t).padStart(6, '0') + '.webp';
}
function panelOf(i) { for (const p of panels) if (i < p.end) return p; return panels[panels.length - 1]; }
function rowOf(i) { const p = panelOf(i); return ROW ? ROW[i] : i - p.start; }

// ---------------------------------------------------------------- the hover card
const cardEl = document.getElementById('featviz-card');
const esc = s => String(s).replace(/[&<>"]/g, c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]);
function card() {
  const h = state.hover;
  if (!h) { cardEl.style.display = 'none'; return; }
  const i = h.i, p = panelOf(i), c = LAB[i], t = thumbOf(i), f = nameOf(i);
  let html = '';
  if (t >= 0) html += '<img class="own" src="' + esc(thumbUrl(t)) + '" alt="thumbnail">';
  else if (META.note_no_thumb) html += '<div class="note">' + esc(META.note_no_thumb) + '</div>';
  html += '<div><span class="sw" style="background:' + (c < UNK ? META.colors[c] : META.unknown_color) +
    '"></span><b>' + esc(c < UNK ? META.classes[c] : 'unknown') + '</b></div>';
  html += '<div class="file">' + (f === null ? '…' : esc(f)) + '</div>';
  html += '<div>row ' + rowOf(i) + (panels.length > 1 ? ' of ' + esc(p.title) : '') + '</div>';
  if (PY) html += '<div>(y, x) = (' + PY[i] + ', ' + PX[i] + ')</div>';
  if (h.near >= 0) {
    const j = h.near, q = panelOf(j), [u0, v0] = screenOf(p, i), [u1, v1] = screenOf(q, j), g = nameOf(j);
    html += '<div class="near"><div class="note">the nearest point with a thumbnail, ' +
      Math.round(Math.hypot(u1 - u0, v1 - v0)) + ' px away:</div><img class="near" src="' +
      esc(thumbUrl(thumbOf(j))) + '" alt="thumbnail"><div>' + esc(LAB[j] < UNK ? META.classes[LAB[j]] : 'unknown') +
      '</div><div class="file">' + (g === null ? '…' : esc(g)) + '</div><div>row ' + rowOf(j) + '</div></div>';
  }
  cardEl.innerHTML = html;
  cardEl.style.display = 'block';
  const w = cardEl.offsetWidth, hh = cardEl.offsetHeight;
  cardEl.style.left = Math.min(h.cx + 16, window.innerWidth - w - 4) + 'px';
  cardEl.style.top = Math.min(h.cy + 16, window.innerHeight - hh - 4) + 'px';
}
function screenOf(p, i) {
  return [X[i] * view.s + p.W / 2 - view.cx * view.s, p.H / 2 + view.cy * view.s - Y[i] * view.s];
}
function mark() {
  for (const p of panels) p.octx.clearRect(0, 0, p.W, p.H);
  if (box) {
    const c = box.p.octx, s = view.s, ox = box.p.W / 2 - view.cx * s, oy = box.p.H / 2 + view.cy * s;
    const u0 = box.x0 * s + ox, v0 = oy - box.y0 * s, u1 = box.x1 * s + ox, v1 = oy - box.y1 * s;
    const l = Math.min(u0, u1), t = Math.min(v0, v1), w = Math.abs(u1 - u0), h = Math.abs(v1 - v0);
    c.fillStyle = 'rgba(30, 90, 200, 0.12)'; c.fillRect(l, t, w, h);
    c.strokeStyle = '#1e5ac8'; c.lineWidth = 1; c.setLineDash([4, 3]); c.strokeRect(l + 0.5, t + 0.5, w, h);
    c.setLineDash([]);
  }
  const h = state.hover;
  if (!h) return;
  const p = panelOf(h.i), [u, v] = screenOf(p, h.i);
  for (const [col, wd] of [['#fff', 4], ['#000', 2]]) {
    p.octx.strokeStyle = col; p.octx.lineWidth = wd;
    p.octx.beginPath(); p.octx.arc(u, v, 6, 0, 2 * Math.PI); p.octx.stroke();
  }
}

// ---------------------------------------------------------------- mouse: hover, pan, zoom, reset
const HOVER_PX = 12;
let drag = null, box = null;  // box: the selection rectangle being drawn (shift-drag), in map coordinates
for (const p of panels) {
  const el = p.canvas;
  el.addEventListener('mousemove', e => {
    const r = el.getBoundingClientRect(), mx = e.clientX - r.left, my = e.clientY - r.top;
    if (box) {
      if (box.p === p) { box.x1 = view.cx + (mx - p.W / 2) / view.s; box.y1 = view.cy - (my - p.H / 2) / view.s; }
      state.hover = null; card(); mark(); return;
    }
    if (drag) {
      view.cx -= (e.clientX - drag.x) / view.s; view.cy += (e.clientY - drag.y) / view.s;
      drag.x = e.clientX; drag.y = e.clientY; state.hover = null; card(); redraw(); return;
    }
    const x = view.cx + (mx - p.W / 2) / view.s, y = view.cy - (my - p.H / 2) / view.s;
    const t0 = performance.now();
    const i = nearest(p, x, y, HOVER_PX / view.s);
    state.hoverMs = performance.now() - t0;
    state.hover = i < 0 ? null : { i: i, cx: e.clientX, cy: e.clientY, near: -1 };
    // a point without a thumbnail: the card also shows the nearest point within reach that has one
    if (i >= 0 && TPT && thumbOf(i) < 0) {
      state.hover.near = nearest(p, x, y, HOVER_PX / view.s, j => thumbOf(j) >= 0);
    }
    card(); mark();
  });
  el.addEventListener('mouseleave', () => { state.hover = null; card(); mark(); });
  el.addEventListener('mousedown', e => {
    e.preventDefault();
    if (!e.shiftKey) { drag = { x: e.clientX, y: e.clientY }; return; }
    const r = el.getBoundingClientRect(), mx = e.clientX - r.left, my = e.clientY - r.top;
    const x = view.cx + (mx - p.W / 2) / view.s, y = view.cy - (my - p.H / 2) / view.s;
    box = { p: p, x0: x, y0: y, x1: x, y1: y, u: e.clientX, v: e.clientY };
  });
  el.addEventListener('wheel', e => {
    e.preventDefault();
    const r = el.getBoundingClientRect(), mx = e.clientX - r.left, my = e.clientY - r.top;
    const x = view.cx + (mx - p.W / 2) / view.s, y = view.cy - (my - p.H / 2) / view.s;
    const f = Math.pow(1.2, -e.deltaY / 100);
    view.s *= f; view.cx = x - (mx - p.W / 2) / view.s; view.cy = y + (my - p.H / 2) / view.s;
    state.hover = null; card(); redraw();
  }, { passive: false });
  el.addEventListener('dblclick', () => { resetView(); redraw(); });
}
window.addEventListener('mouseup', e => {
  drag = null;
  if (!box) return;
  const b = box;
  box = null;
  // a shift-click (no drag) clears the selection
  if (Math.abs(e.clientX - b.u) < 3 && Math.abs(e.clientY - b.v) < 3) clearSelection();
  else select(b.p, Math.min(b.x0, b.x1), Math.max(b.x0, b.x1), Math.min(b.y0, b.y1), Math.max(b.y0, b.y1));
  mark();
});
window.addEventListener('keydown', e => { if (e.key === 'Escape') clearSelection(); });

// ---------------------------------------------------------------- box selection, linked across panels
// Shift-drag selects the shown points in a rectangle of one panel; in the other panels the points of the
// same file (and, for pixels, the same (y, x)) are selected with them. The bar above the map counts them
// by class and downloads them as CSV (panel, row, class, file[, y, x]); Esc or a shift-click clears it.
const SEL = new Uint8Array(N);
const selBar = document.createElement('div');
selBar.id = 'featviz-selection';
document.getElementById('featviz-head').appendChild(selBar);
// a point's file (and pixel) as one number while that is exact in a double, else as a string
const BIGKEY = Math.max(N, META.n_names) >= 2097152;
function keyOf(i) {
  const f = NAME ? NAME[i] : i, px = PY ? PY[i] * 65536 + PX[i] : 0;
  return BIGKEY ? f + ':' + px : f * 4294967296 + px;
}
function select(p, x0, x1, y0, y1) {
  SEL.fill(0);
  const hid = state.hidden, keys = new Set(), by = new Array(UNK + 1).fill(0);
  let n = 0, linked = 0;
  for (let i = p.start; i < p.end; i++) {
    if (hid[LAB[i]] || X[i] < x0 || X[i] > x1 || Y[i] < y0 || Y[i] > y1) continue;
    SEL[i] = 1; n++; by[LAB[i]]++;
    if (panels.length > 1) keys.add(keyOf(i));
  }
  for (const q of panels) {
    if (q === p || !keys.size) continue;
    for (let i = q.start; i < q.end; i++) {
      if (!hid[LAB[i]] && keys.has(keyOf(i))) { SEL[i] = 1; linked++; by[LAB[i]]++; }
    }
  }
  state.sel = n ? { panel: p.k, n: n, linked: linked, by: by } : null;
  showSelection(); redraw();
}
function clearSelection() { if (!state.sel) return; SEL.fill(0); state.sel = null; showSelection(); redraw(); }
function selectedPoints() { const out = []; for (let i = 0; i < N; i++) if (SEL[i]) out.push(i); return out; }
function showSelection() {
  const s = state.sel;
  if (!s) { selBar.style.display = 'none'; selBar.innerHTML = ''; return; }
  const top = s.by.map((n, c) => [n, c]).filter(a => a[0]).sort((a, b) => b[0] - a[0]);
  const classes = top.slice(0, 5).map(([n, c]) => esc(c < UNK ? META.classes[c] : 'unknown') + ' ' +
    n.toLocaleString('en-US')).join(', ') + (top.length > 5 ? ', … (' + top.length + ' classes)' : '');
  selBar.innerHTML = '<b>' + s.n.toLocaleString('en-US') + ' points selected</b>' +
    (panels.length > 1 ? ' in ' + esc(panels[s.panel].title) + ' (+ ' + s.linked.toLocaleString('en-US') +
      ' the same rows in the other panels)' : '') + ': ' + classes +
    ' <button id="featviz-csv">Download CSV</button> <button id="featviz-clear">Clear (Esc)</button>';
  selBar.style.display = 'block';
  document.getElementById('featviz-clear').onclick = clearSelection;
  document.getElementById('featviz-csv').onclick = () => selectionCsv().then(text => {
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([text], { type: 'text/csv' }));
    a.download = decodeURIComponent(DIR).replace(/_files$/, '') + '_selection.csv';
    document.body.appendChild(a); a.click(); a.remove();
  }, err => { selBar.appendChild(document.createTextNode(' ' + err.message)); });
}
function csvField(v) { v = String(v); return /[",\n\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
function selectionCsv() {  // a Promise of the CSV text, once every file name it needs is loaded
  const pts = selectedPoints();
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    (function attempt() {
      const missing = pts.find(i => nameOf(i) === null);
      const failed = Object.keys(loading).filter(c => loading[c] === 'failed');
      if (failed.length) { reject(new Error('file names not found: ' + DIR + '/names/ is incomplete')); return; }
      if (missing !== undefined && META.n_names > 0) {
        if (performance.now() - t0 > 60000) { reject(new Error('file names did not load within 60 s')); return; }
        setTimeout(attempt, 20); return;
      }
      const lines = ['panel,row,class,file' + (PY ? ',y,x' : '')];
      for (const i of pts) {
        const c = LAB[i], f = nameOf(i);
        lines.push([panelOf(i).title, rowOf(i), c < UNK ? META.classes[c] : '', f === null ? '' : f]
          .concat(PY ? [PY[i], PX[i]] : []).map(csvField).join(','));
      }
      resolve(lines.join('\n') + '\n');
    })();
  });
}

// ---------------------------------------------------------------- the legend: click to hide a class
const counts = new Array(UNK + 1).fill(0);
for (let i = 0; i < N; i++) counts[LAB[i]]++;
legend.innerHTML = '<div><b>class (click to hide)</b></div>';
for (let c = 0; c <= UNK; c++) {
  if (!counts[c]) continue;
  const it = document.createElement('div'); it.className = 'item'; it.dataset.cls = c;
  it.innerHTML = '<span class="sw" style="background:' + (c < UNK ? META.colors[c] : META.unknown_color) +
    '"></span>' + esc(c < UNK ? META.classes[c] : 'unknown') + ' <span style="color:#888">' +
    counts[c].toLocaleString('en-US') + '</span>';
  it.addEventListener('click', () => {
    state.hidden[c] ^= 1; it.classList.toggle('off', !!state.hidden[c]); state.hover = null; card(); redraw();
  });
  legend.appendChild(it);
}

// ---------------------------------------------------------------- the page's helper (tests, console)
Object.assign(state.api, {
  ready: () => state.ready,
  panels: () => panels.map(p => p.title),
  drawMs: () => state.drawMs,
  hoverMs: () => state.hoverMs,  // the last hover's nearest-point search
  view: () => ({ cx: view.cx, cy: view.cy, s: view.s, panels: panels.map(p => {
    const r = p.canvas.getBoundingClientRect(); return { left: r.left, top: r.top, W: p.W, H: p.H }; }) }),
  locate(panel, row) {  // page (x, y) of the point of ``panel`` at ``row``
    const p = panels[panel];
    for (let i = p.start; i < p.end; i++) {
      if (rowOf(i) === row) {
        const r = p.canvas.getBoundingClientRect(), [u, v] = screenOf(p, i);
        return [r.left + u, r.top + v];
      }
    }
    return null;
  },
  hovered: () => state.hover ? { panel: panelOf(state.hover.i).k, row: rowOf(state.hover.i) } : null,
  selected: () => selectedPoints().map(i => ({ panel: panelOf(i).k, row: rowOf(i) })),
  selectionCsv: selectionCsv,
});
setTimeout(() => {
  const t0 = performance.now();
  for (const p of panels) buildGrid(p);
  state.gridMs = performance.now() - t0;
  state.api.gridMs = () => state.gridMs;
  const t1 = performance.now();
  for (const p of panels) draw(p);
  state.drawMs = performance.now() - t1;
  state.ready = true;
}, 0);
})();
"""
