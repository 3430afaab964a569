"""featviz knn next to scikit-learn's KNeighborsClassifier with DINO's weighting, in one run.

Data: ``--n-train`` x ``--dim`` training and ``--n-val`` query features from ``--classes``
overlapping Gaussian classes (20-NN top-1 about 0.65 at 200k, so accuracy can tell sides apart).

Sides (each in a fresh process, so that its peak resident memory can be read):

- ``featviz``: ``featviz.eval.knn.weighted_knn`` with every ``--ks`` value in one pass (what
  ``featviz knn`` runs);
- ``sklearn-cosine``: ``KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
  weights=lambda d: exp((1 - d) / T), n_jobs=-1)``, one fit/predict_proba per k: how a user writes
  DINO's rule in scikit-learn;
- ``sklearn-euclidean``: the same on L2-normalised features with ``metric="euclidean"`` and
  ``weights=lambda d: exp((1 - d²/2) / T)`` (same neighbours, same weights): scikit-learn's
  fastest exact path (its Cython ArgKmin reduction).

Printed: seconds per side for the whole protocol (every k) and for ``--single-k`` alone, ratios
scikit-learn / featviz (target: >= 2), top-1/top-5 per k and per side (target: equal, every k),
and peak resident memory per side next to that of a process that only holds the data.

    python benchmarks/knn_bench.py               # full: 200k x 256, 20k val, k 10,20,100,200
    python benchmarks/knn_bench.py --n-val 2000  # reduced (scikit-learn cosine is slow)
    python benchmarks/knn_bench.py --json knn_bench.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time

import numpy as np

T = 0.07


def make_data(n_train: int, n_val: int, dim: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n_train + n_val)
    x = np.empty((n_train + n_val, dim), np.float32)
    for i in range(0, len(y), 50_000):
        part = slice(i, i + 50_000)
        x[part] = 0.25 * centres[y[part]] + rng.standard_normal(
            (len(y[part]), dim), dtype=np.float32
        )
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _hits(proba: np.ndarray, classes: np.ndarray, targets: np.ndarray, k: int) -> tuple[int, int]:
    ranked = classes[np.argsort(-proba, axis=1, kind="stable")[:, : min(5, k, proba.shape[1])]]
    hit = ranked == targets[:, None]
    return int(hit[:, 0].sum()), int(hit.any(axis=1).sum())


def side(name: str, args: dict, queue) -> None:
    """Run one side in this fresh process; put its times, accuracies and peak RSS on ``queue``."""
    xtr, ytr, xva, yva = make_data(
        args["n_train"], args["n_val"], args["dim"], args["classes"], args["seed"]
    )
    ks = args["ks"]
    out: dict = {"side": name, "per_k": {}}
    t0 = time.perf_counter()
    if name == "featviz":
        from featviz.eval.knn import weighted_knn

        for s in weighted_knn(
            xtr, ytr, xva, yva, ks=ks, temperature=T, copy=False
        ):  # as `featviz knn` does
            out["per_k"][s.k] = {"top1": s.top1, "top5": s.top5}
    elif name.startswith("sklearn"):
        from sklearn.neighbors import KNeighborsClassifier

        from featviz.eval.knn import l2_normalize

        if name == "sklearn-cosine":
            metric, weights = "cosine", (lambda d: np.exp((1.0 - d) / T))
        else:
            xtr, xva = l2_normalize(xtr, inplace=True), l2_normalize(xva, inplace=True)
            metric, weights = "euclidean", (lambda d: np.exp((1.0 - d * d / 2.0) / T))
        for k in ks:
            t = time.perf_counter()
            clf = KNeighborsClassifier(
                n_neighbors=k, weights=weights, metric=metric, algorithm="brute", n_jobs=-1
            )
            proba = clf.fit(xtr, ytr).predict_proba(xva)
            h1, h5 = _hits(proba, clf.classes_, yva, k)
            out["per_k"][k] = {
                "top1": h1 / len(yva),
                "top5": h5 / len(yva),
                "seconds": time.perf_counter() - t,
            }
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(out)


def run_side(name: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=side, args=(name, args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=200_000)
    ap.add_argument("--n-val", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--ks", type=str, default="10,20,100,200")
    ap.add_argument("--sides", type=str, default="featviz,sklearn-euclidean,sklearn-cosine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--single-k", type=int, default=20, help="also time featviz with this k alone")
    ap.add_argument(
        "--json", type=str, default=None, help="also write the figures to this JSON file"
    )
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    cfg = {
        "n_train": args.n_train,
        "n_val": args.n_val,
        "dim": args.dim,
        "classes": args.classes,
        "seed": args.seed,
        "ks": ks,
    }
    print(
        f"data: {args.n_train:,} x {args.dim} train, {args.n_val:,} val, {args.classes} classes; "
        f"k {args.ks}, T {T}; {os.cpu_count()} CPU cores; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        flush=True,
    )
    base = run_side("data-only", cfg)
    print(f"data-only process: peak RSS {base['peak_rss_mb']:.0f} MB", flush=True)
    results = {}
    for name in args.sides.split(","):
        r = run_side(name, cfg)
        results[name] = r
        print(f"{name:18s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)

    fv = results.get("featviz")
    single = None
    if fv and args.single_k in ks:
        single = run_side("featviz", {**cfg, "ks": [args.single_k]})
        print(f"featviz, k={args.single_k} alone {single['seconds']:8.1f} s", flush=True)
    k1 = args.single_k
    print(
        f"\n| side | all {len(ks)} k: seconds | vs featviz | k={k1} alone: seconds | vs featviz | "
        f"peak RSS MB (data alone {base['peak_rss_mb']:.0f}) | "
        + " | ".join(f"top-1 / top-5 @ k={k}" for k in ks)
        + " |"
    )
    print("|---|---|---|---|---|---|" + "---|" * len(ks))
    for name, r in results.items():
        ratio = f"{r['seconds'] / fv['seconds']:.2f}x" if fv else "-"
        t1 = (
            single["seconds"]
            if name == "featviz" and single
            else r["per_k"].get(k1, {}).get("seconds")
        )
        r1 = f"{t1 / single['seconds']:.2f}x" if single and t1 else "-"
        accs = " | ".join(f"{r['per_k'][k]['top1']:.4f} / {r['per_k'][k]['top5']:.4f}" for k in ks)
        t1s = f"{t1:.1f}" if t1 else "-"
        rss = f"{r['peak_rss_mb']:.0f}"
        print(f"| {name} | {r['seconds']:.1f} | {ratio} | {t1s} | {r1} | {rss} | {accs} |")
    if fv:
        for name, r in results.items():
            if name == "featviz":
                continue
            same = all(
                abs(r["per_k"][k][m] - fv["per_k"][k][m]) * args.n_val < 0.5
                for k in ks
                for m in ("top1", "top5")
            )
            verdict = "equal to" if same else "DIFFER from"
            print(f"{name}: top-1/top-5 counts {verdict} featviz's at every k")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": cfg,
                    "data_only_peak_rss_mb": base["peak_rss_mb"],
                    "results": results,
                    "featviz_single_k": single,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    sys.exit(main())
