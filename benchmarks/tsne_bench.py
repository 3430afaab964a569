"""featviz t-SNE next to scikit-learn's TSNE and openTSNE's defaults, side by side, in one run.

Data: pixel-like embeddings with known labels, N x ``--dim``: ``--classes`` class centres
(``--separation``: their scale; the default 0.03 makes the classes overlap: 10-NN class accuracy
about 0.89 in the 256-d input, so class accuracy in the map can tell methods apart) plus
within-class variation whose eigenspectrum decays as a power law (variance ~ i^-1.5, the kind
of spectrum trained network features show), in a random rotation; ReLU'd and L2-normalised
like pooled/projected features.

For each size in ``--sizes`` it fits featviz (``featviz.maps.projection.fit`` with its defaults), and
scikit-learn's ``TSNE()`` (sizes up to ``--sklearn-max``) and openTSNE's ``TSNE()`` defaults
(sizes from ``--opentsne-min``), all on the same raw features, and prints one table: wall time,
10-NN class accuracy and 10-NN recall (Kobak & Berens' KNN, 5,000 query points) of each map, and
featviz's time ratio and accuracy difference against each peer, with the targets:

- vs scikit-learn (10k, 20k): accuracy >= scikit-learn's - 0.01 and time <= 0.5x;
- vs openTSNE's defaults (100k): time <= 0.8x at equal quality (accuracy within 0.01).

    python benchmarks/tsne_bench.py                      # 10k, 20k (+ scikit-learn), 100k (+ openTSNE)
    python benchmarks/tsne_bench.py --sizes 10000 --json out.json
    python benchmarks/tsne_bench.py --sizes 20000 --opentsne-min 0   # openTSNE at every size too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def pixel_like(
    n: int, dim: int, classes: int, seed: int = 0, separation: float = 0.03
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * separation
    labels = rng.integers(0, classes, n)
    scale = np.arange(1, dim + 1) ** -0.75  # std per principal direction: variance ~ i^-1.5
    rot, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    x = centres[labels] + (rng.normal(size=(n, dim)) * scale) @ rot.T
    x = np.maximum(x + 0.5 / np.sqrt(dim), 0)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x.astype(np.float32), labels.astype(np.int64)


def input_accuracy(x: np.ndarray, y: np.ndarray, k: int = 10, n_eval: int = 5000, seed: int = 0) -> float:
    """10-NN class accuracy in the input space (leave-one-out, on ``n_eval`` query points)."""
    from sklearn.neighbors import NearestNeighbors

    q = np.random.default_rng(seed).choice(len(x), min(n_eval, len(x)), replace=False)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x[q], return_distance=False)[:, 1:]
    pred = np.array([np.bincount(v).argmax() for v in y[idx]])
    return float((pred == y[q]).mean())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return np.asarray(out, np.float32), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=str, default="10000,20000,100000", help="comma-separated N")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--sklearn-max", type=int, default=20_000, help="scikit-learn at sizes up to this")
    ap.add_argument("--opentsne-min", type=int, default=100_000, help="openTSNE's defaults at sizes from this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--separation", type=float, default=0.03, help="scale of the class centres (0.06: separable)")
    ap.add_argument("--featviz-first", action="store_true", help="time featviz before its peers (default: after)")
    ap.add_argument("--json", type=str, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    from openTSNE import TSNE as OpenTSNE
    from sklearn.manifold import TSNE as SkTSNE

    from featviz.maps import projection as tsne

    sizes = [int(s) for s in args.sizes.split(",") if s]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"{os.cpu_count()} CPU cores, load average {load:.1f} at start; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}; {platform.python_version()}; data {args.dim}-d, "
          f"{args.classes} classes, separation {args.separation}", flush=True)
    runs = {
        "featviz": lambda x: tsne.fit(x, tsne.TsneParams(seed=args.seed)),
        "scikit-learn": lambda x: SkTSNE(random_state=args.seed).fit_transform(x),
        "openTSNE": lambda x: OpenTSNE(random_state=args.seed).fit(x),
    }
    results = []
    for n in sizes:
        x, y = pixel_like(n, args.dim, args.classes, args.seed, args.separation)
        acc_in = input_accuracy(x, y, seed=args.seed)
        peers = ([] if n > args.sklearn_max else ["scikit-learn"]) + (
            [] if n < args.opentsne_min else ["openTSNE"])
        order = ["featviz", *peers] if args.featviz_first else [*peers, "featviz"]
        row = {"n": n, "input_knn_accuracy@10": acc_in, "order": order}
        print(f"\nN = {n:,}: 10-NN class accuracy in the {args.dim}-d input {acc_in:.3f}; order {order}",
              flush=True)
        for name in order:
            c, t = timed(lambda name=name, x=x: runs[name](x))
            row[name] = {"s": t, "knn_accuracy@10": tsne.leave_one_out_knn_accuracy(c, y),
                         "knn_recall@10": tsne.knn_recall(x, c, 10, n_eval=5000, seed=args.seed)}
            print(f"  {name:13s} {t:8.1f} s   10-NN accuracy {row[name]['knn_accuracy@10']:.3f}   "
                  f"10-NN recall {row[name]['knn_recall@10']:.3f}", flush=True)
        results.append(row)

    print("\n| N | peer | featviz s | peer s | time ratio | featviz acc | peer acc | acc diff "
          "| featviz recall | peer recall | target | met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for row in results:
        f = row["featviz"]
        for peer in ("scikit-learn", "openTSNE"):
            if peer not in row:
                continue
            p = row[peer]
            ratio, dacc = f["s"] / p["s"], f["knn_accuracy@10"] - p["knn_accuracy@10"]
            if peer == "scikit-learn":
                target, met = "acc >= peer - 0.01, time <= 0.5x", dacc >= -0.01 and ratio <= 0.5
            else:
                target, met = "time <= 0.8x, acc >= peer - 0.01", ratio <= 0.8 and dacc >= -0.01
            row.setdefault("vs", {})[peer] = {"time_ratio": ratio, "accuracy_diff": dacc, "met": met}
            verdicts.append(met)
            print(f"| {row['n']:,} | {peer} | {f['s']:.1f} | {p['s']:.1f} | {ratio:.2f}x | "
                  f"{f['knn_accuracy@10']:.3f} | {p['knn_accuracy@10']:.3f} | {dacc:+.3f} | "
                  f"{f['knn_recall@10']:.3f} | {p['knn_recall@10']:.3f} | {target} | "
                  f"{'yes' if met else 'NO'} |")
    print()
    for row in results:
        for peer, v in row.get("vs", {}).items():
            print(f"N={row['n']:,} featviz vs {peer}: time ratio {v['time_ratio']:.2f}x, 10-NN accuracy "
                  f"{v['accuracy_diff']:+.3f} (target: "
                  f"{'>= -0.01 and <= 0.5x' if peer == 'scikit-learn' else '>= -0.01 and <= 0.8x'}): "
                  f"{'met' if v['met'] else 'NOT met'}")
    print(f"all targets met: {all(verdicts)}" if verdicts else "", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "load_at_start": load, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
