"""CAC's claim measured: does model B keep a pixel's features under a change of context better than A?

For every scene of a VOC-layout folder's split (default: the held-out ``val`` list) and several
crop seeds, draws CAC Figure 3's three views (featviz.maps.cac_figure: CAC's crop pair, the overlap on each
view's own feature grid, the low-level augmentation) and measures, for both checkpoints, what the
figure shows: the same-pixel cosine I vs II (contextual augmentation) and I vs III (low-level
augmentation), and the cross-view kNN class agreement II->I and III->I in the row's t-SNE map.
Seeds are averaged within a scene; the table gives the mean over scenes with a 95% t-interval
per checkpoint, and the paired gain B - A (mean, 95% CI, scenes where B wins).

    python benchmarks/cac_effect.py --a sample_data/checkpoints/seg_supervised.safetensors \\
        --b sample_data/checkpoints/seg_cac.safetensors --data sample_data/seg [--json out.json]

Any two checkpoints featviz loads work: whole segmenters (featviz's, or CAC's official
DeepLabv3+ ``.pth``; default features ``decoder``) or encoders (``--features backbone`` or a
layer name). ``--json`` alone prints the JSON on stdout; ``--json FILE`` writes it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

METRICS = (("cos_I_II", "same-pixel cosine I vs II (context)"),
           ("cos_I_III", "same-pixel cosine I vs III (low-level)"),
           ("knn_II_I", "kNN class agreement II->I (map)"),
           ("knn_III_I", "kNN class agreement III->I (map)"))


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% Student-t interval (the mean alone for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def measure(args) -> dict:
    import numpy as np
    import torch

    from featviz.data.masks import read_mask
    from featviz.errors import DataError
    from featviz.maps import cac_figure as figure
    from featviz.train.segmentation.dataset import VOCFolder

    torch.set_num_threads(args.threads)
    voc = VOCFolder(args.data)
    ids = voc.ids(args.split)
    if not ids:
        raise DataError(f"{str(args.data)!r} has no {args.split!r} list (ImageSets/Segmentation/{args.split}.txt)")
    rows = figure.load_figure_models([args.a, args.b], names=["A", "B"],  # the figure's own rule: whole segmenters
                                     load_kwargs={"trust": args.trust_checkpoint})
    features = figure.resolve_features(rows, args.features)
    crop, base, crop_from = figure.working_crop(rows, args.crop_size, args.base_size)
    names = voc.class_names or []
    per_scene: dict[str, dict[str, dict[str, list[float]]]] = {}
    t0 = time.perf_counter()
    for k, i in enumerate(ids):
        img, mask = voc.image(i), read_mask(voc.mask_path(i)).astype(np.uint8)
        scene = per_scene.setdefault(i, {"A": {m: [] for m, _ in METRICS}, "B": {m: [] for m, _ in METRICS}})
        for seed in range(args.seeds):
            try:
                fr = figure.figure_rows(rows, img, mask, features=features, crop_size=crop, base_size=base,
                                        max_pixels=args.max_pixels, seed=seed, n_iter=args.iterations,
                                        class_names=names)
            except DataError as e:  # e.g. an overlap without a labelled pixel: that seed is skipped
                print(f"  {i} seed {seed}: skipped ({e})", file=sys.stderr)
                continue
            for label, row in zip(("A", "B"), fr.rows, strict=True):
                m = row["metrics"]
                for key, v in (("cos_I_II", m["cosine_same_pixel"]["I_vs_II"]),
                               ("cos_I_III", m["cosine_same_pixel"]["I_vs_III"]),
                               ("knn_II_I", m["knn_class_agreement"]["II_to_I"]),
                               ("knn_III_I", m["knn_class_agreement"]["III_to_I"])):
                    scene[label][key].append(float(v))
        print(f"  [{k + 1}/{len(ids)}] {i}: {len(scene['A']['cos_I_II'])} seeds "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    scenes = [i for i, s in per_scene.items() if s["A"]["cos_I_II"]]
    if len(scenes) < 2:
        raise DataError(f"only {len(scenes)} scene(s) gave a measurement; a confidence interval needs 2 or more")
    mean_of = {lab: {key: [float(np.mean(per_scene[i][lab][key])) for i in scenes] for key, _ in METRICS}
               for lab in ("A", "B")}
    summary = {}
    for key, title in METRICS:
        a, b = mean_of["A"][key], mean_of["B"][key]
        gain = [y - x for x, y in zip(a, b, strict=True)]
        summary[key] = {"title": title, "A": dict(zip(("mean", "ci_low", "ci_high"), t_interval(a), strict=True)),
                        "B": dict(zip(("mean", "ci_low", "ci_high"), t_interval(b), strict=True)),
                        "gain_B_minus_A": dict(zip(("mean", "ci_low", "ci_high"), t_interval(gain), strict=True)),
                        "scenes_B_higher": int(sum(g > 0 for g in gain)), "n_scenes": len(scenes)}
    return {"a": str(args.a), "b": str(args.b), "data": str(args.data), "split": args.split, "features": features,
            "crop_size": crop, "base_size": base, "crop_from": crop_from, "seeds": args.seeds,
            "max_pixels": args.max_pixels, "tsne_iterations": args.iterations, "scenes": scenes,
            "per_scene": {i: {lab: {key: float(np.mean(v)) for key, v in per_scene[i][lab].items()}
                              for lab in ("A", "B")} for i in scenes},
            "summary": summary, "seconds": round(time.perf_counter() - t0, 1),
            "note": "mean over scenes of the per-scene mean over seeds; 95% Student-t intervals over scenes; "
                    "gain = B - A paired by scene"}


def table(res: dict) -> str:
    def iv(d):
        return f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"

    def ab(d):
        return f"{d['mean']:.4f} [{d['ci_low']:.4f}, {d['ci_high']:.4f}]"

    head = (f"A = {res['a']}\nB = {res['b']}\n{res['data']} ({res['split']}: {len(res['scenes'])} scenes x "
            f"{res['seeds']} crop seeds), features {res['features']}, crop {res['crop_size']} / base "
            f"{res['base_size']} ({res['crop_from']})\n")
    lines = [f"{'metric':40s} {'A: mean [95% CI]':>27s} {'B: mean [95% CI]':>27s} {'gain B-A [95% CI]':>30s} "
             f"{'B higher':>9s}"]
    for key, _ in METRICS:
        s = res["summary"][key]
        lines.append(f"{s['title']:40s} {ab(s['A']):>27s} {ab(s['B']):>27s} {iv(s['gain_B_minus_A']):>30s} "
                     f"{s['scenes_B_higher']:>4d}/{s['n_scenes']:<4d}")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="the baseline checkpoint (e.g. supervised only)")
    ap.add_argument("--b", type=Path, required=True, help="the checkpoint compared with it (e.g. CAC)")
    ap.add_argument("--data", type=Path, required=True, help="a VOC-layout folder")
    ap.add_argument("--split", default="val", help="image list to measure on (default: val, the held-out scenes)")
    ap.add_argument("--seeds", type=int, default=5, help="crop seeds per scene (default 5)")
    ap.add_argument("--features", default=None, help="decoder | projector | backbone | LAYER (default: decoder "
                    "for segmenters, backbone for encoders)")
    ap.add_argument("--crop-size", type=int, default=None, help="default: the checkpoints' training crop, else 320")
    ap.add_argument("--base-size", type=int, default=None, help="default: the checkpoints' training base, else 400")
    ap.add_argument("--max-pixels", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=500, help="t-SNE iterations (the kNN agreement is in the map)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trust-checkpoint", action="store_true", help="read pickles with weights_only=False")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                    help="JSON on stdout, or into FILE")
    args = ap.parse_args(argv)
    from featviz.errors import FeatvizError

    try:
        res = measure(args)
    except FeatvizError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json == "-":
        print(json.dumps(res, indent=2))
        return 0
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
