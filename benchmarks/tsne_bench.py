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

``--n N`` is another comparison, at one size: featviz's two CPU backends, openTSNE
(``--backend opentsne``) against TorchDR on CPU (``--backend torchdr --device cpu``: InfoTSNE, featviz's
neighbours), each in its own process stopped after ``--time-cap`` seconds ("did not finish in X s",
with how far it got), and one table: time, the map's quality (``featviz.maps.quality.map_quality``:
10-NN class accuracy, 10-NN recall, trustworthiness on 5,000 points) and TorchDR's ratios to openTSNE.

    nice python benchmarks/tsne_bench.py --n 20000
    nice python benchmarks/tsne_bench.py --n 1000000 --time-cap 600
    python benchmarks/tsne_bench.py --n 20000 --torchdr-iterations 1000 --torchdr-negatives 1000

A method stopped by the cap reports how far it got and a projected total at its pace so far (for
openTSNE a lower bound: its iterations slow down as the map grows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import numpy as np


def pixel_like(
    n: int, dim: int, classes: int, seed: int = 0, separation: float = 0.03, block: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """The data, made ``block`` rows at a time (the same numbers as in one go; 1M x 256 fits in 1 GB)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * separation
    labels = rng.integers(0, classes, n)
    scale = np.arange(1, dim + 1) ** -0.75  # std per principal direction: variance ~ i^-1.5
    rot, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        x = centres[labels[s:e]] + (rng.normal(size=(e - s, dim)) * scale) @ rot.T
        x = np.maximum(x + 0.5 / np.sqrt(dim), 0)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
        out[s:e] = x
    return out, labels.astype(np.int64)


def input_accuracy(x: np.ndarray, y: np.ndarray, k: int = 10, n_eval: int = 5000, seed: int = 0) -> float:
    """10-NN class accuracy in the input space (leave-one-out, on ``n_eval`` query points)."""
    from sklearn.neighbors import NearestNeighbors

    q = np.random.default_rng(seed).choice(len(x), min(n_eval, len(x)), replace=False)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x[q], return_distance=False)[:, 1:]
    pred = np.array([np.bincount(v).argmax() for v in y[idx]])
    return float((pred == y[q]).mean())


def _load() -> float:
    """The 1-minute load average (NaN where there is none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return np.asarray(out, np.float32), time.perf_counter() - t


def _fit_child(name: str, x: np.ndarray, seed: int, out: str, done, torchdr_iterations: int | None = None,
               torchdr_negatives: int | None = None) -> None:
    """In a child process: fit one backend, report progress in ``done`` (iterations), save the coordinates.

    ``torchdr_iterations`` / ``torchdr_negatives``: TorchDR's iterations after early exaggeration
    (``--iterations``) and negatives per point (``backends.INFO_TSNE_NEGATIVES``), if not featviz's defaults.
    """
    from featviz.io.artifacts import Embeddings
    from featviz.maps import backends
    from featviz.maps import projection as tsne

    params = tsne.TsneParams(seed=seed, backend="opentsne" if name == "openTSNE" else "torchdr", device="cpu")
    if name != "openTSNE":
        if torchdr_iterations is not None:
            params = dataclasses.replace(params, n_iter=torchdr_iterations)
        if torchdr_negatives is not None:
            backends.INFO_TSNE_NEGATIVES = torchdr_negatives

    def progress(iterable, total=None, description=""):
        for item in iterable:
            yield item
            done.value += 1

    m = tsne.shared_map([Embeddings(x, None)], params=params, progress=progress)
    np.save(out, m.coords)
    with open(out + ".json", "w") as fh:
        json.dump({k: v for k, v in m.info.items() if k in ("library", "estimator", "neighbor_search", "threads")},
                  fh)


def compare_backends(args, x: np.ndarray, y: np.ndarray, load: float) -> dict:
    """openTSNE against TorchDR on CPU at one size, each capped at ``args.time_cap`` seconds."""
    import multiprocessing as mp
    import tempfile

    from featviz.maps import quality

    n = len(x)
    from featviz.maps import projection

    d = projection.TsneParams()
    iterations = {"openTSNE": d.early_exaggeration_iter + d.n_iter,  # with early exaggeration
                  "TorchDR-CPU": d.early_exaggeration_iter + (args.torchdr_iterations or d.n_iter)}
    row: dict = {"n": n, "time_cap_s": args.time_cap, "torchdr_iterations": args.torchdr_iterations,
                 "torchdr_negatives": args.torchdr_negatives}
    ctx = mp.get_context("fork")  # the child shares x without a copy
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("openTSNE", "TorchDR-CPU"):
            out = f"{tmp}/{name}.npy"
            done = ctx.Value("i", 0)
            t = time.perf_counter()
            total = iterations[name]
            proc = ctx.Process(target=_fit_child, args=(name, x, args.seed, out, done, args.torchdr_iterations,
                                                        args.torchdr_negatives))
            proc.start()
            seen = []  # (seconds, iterations) at each change of the count: the pace for a projection
            while proc.is_alive() and time.perf_counter() - t < args.time_cap:
                proc.join(min(1.0, max(0.0, args.time_cap - (time.perf_counter() - t))))
                if done.value and (not seen or seen[-1][1] != done.value):
                    seen.append((time.perf_counter() - t, done.value))
            s = time.perf_counter() - t
            if proc.is_alive():
                proc.terminate()
                proc.join()
                row[name] = {"finished": False, "s": s, "iterations_done": done.value}
                if done.value == 0:
                    where = "still finding neighbours / affinities"
                else:
                    where = f"at iteration {done.value} of {total}; first progress after {seen[0][0]:.0f} s"
                    if len(seen) > 1 and seen[-1][1] > seen[0][1]:
                        pace = (seen[-1][0] - seen[0][0]) / (seen[-1][1] - seen[0][1])
                        row[name]["projected_s"] = seen[-1][0] + pace * (total - seen[-1][1])
                        where += (f"; {pace:.2f} s per iteration, projected total "
                                  f"{row[name]['projected_s']:.0f} s")
                print(f"  {name:12s} did not finish in {args.time_cap:.0f} s ({where})", flush=True)
                continue
            if proc.exitcode != 0:
                row[name] = {"finished": False, "s": s, "error": f"exit code {proc.exitcode}"}
                print(f"  {name:12s} failed (exit code {proc.exitcode}) after {s:.1f} s", flush=True)
                continue
            row[name] = {"finished": True, "s": s}
            print(f"  {name:12s} {s:8.1f} s", flush=True)
        # The quality is measured once both children are done: scikit-learn's OpenMP pool, started in this
        # process, would deadlock the next forked child's own scikit-learn search (featviz's NeighborSearch).
        for name in ("openTSNE", "TorchDR-CPU"):
            if not row[name]["finished"]:
                continue
            out = f"{tmp}/{name}.npy"
            with open(out + ".json") as fh:
                used = json.load(fh)
            q = quality.map_quality(x, np.load(out), y, seed=args.seed)
            row[name].update({k: q[k] for k in ("knn_accuracy@10", "knn_recall@10", "trustworthiness@10")},
                             sample=q["sample"], **used)
            print(f"  {name:12s} 10-NN accuracy {q['knn_accuracy@10']:.3f}   10-NN recall "
                  f"{q['knn_recall@10']:.3f}   trustworthiness {q['trustworthiness@10']:.3f}   "
                  f"({used.get('neighbor_search')})", flush=True)
    row["load_at_end"] = _load()
    a, b = row["openTSNE"], row["TorchDR-CPU"]
    print("\n| N | backend | s | 10-NN class accuracy | 10-NN recall | trustworthiness (5k sample) |")
    print("|---|---|---|---|---|---|")
    for name, r in (("openTSNE", a), ("TorchDR-CPU", b)):
        if r["finished"]:
            print(f"| {n:,} | {name} | {r['s']:.1f} | {r['knn_accuracy@10']:.3f} | {r['knn_recall@10']:.3f} | "
                  f"{r['trustworthiness@10']:.3f} |")
        else:
            projected = f" (projected {r['projected_s']:.0f} s)" if "projected_s" in r else ""
            print(f"| {n:,} | {name} | did not finish in {args.time_cap:.0f} s{projected} | – | – | – |")
    if a["finished"] and b["finished"]:
        row["ratios"] = {"time": b["s"] / a["s"], "accuracy_diff": b["knn_accuracy@10"] - a["knn_accuracy@10"],
                         "recall_diff": b["knn_recall@10"] - a["knn_recall@10"],
                         "trustworthiness_diff": b["trustworthiness@10"] - a["trustworthiness@10"]}
        r = row["ratios"]
        print(f"\nTorchDR-CPU / openTSNE: time {r['time']:.2f}x, 10-NN class accuracy {r['accuracy_diff']:+.3f}, "
              f"10-NN recall {r['recall_diff']:+.3f}, trustworthiness {r['trustworthiness_diff']:+.3f} "
              f"(issue 27: accuracy within 0.02: {'met' if r['accuracy_diff'] >= -0.02 else 'NOT met'})")
    else:
        print("\nno ratio: " + ", ".join(f"{k} did not finish in {args.time_cap:.0f} s" for k, r in
                                        (("openTSNE", a), ("TorchDR-CPU", b)) if not r["finished"]))
    print(f"load average {load:.1f} at start, {row.get('load_at_end', float('nan')):.1f} at end", flush=True)
    return row


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
    ap.add_argument("--n", type=int, default=None,
                    help="one size: featviz's openTSNE backend against TorchDR on CPU (instead of --sizes' peers)")
    ap.add_argument("--time-cap", type=float, default=1800.0,
                    help="--n: stop a method after this many seconds and report it as not finished")
    ap.add_argument("--torchdr-iterations", type=int, default=None,
                    help="--n: TorchDR's iterations after early exaggeration (featviz's default: 500)")
    ap.add_argument("--torchdr-negatives", type=int, default=None,
                    help="--n: TorchDR's negatives per point (featviz's default: 300)")
    args = ap.parse_args()
    if args.n is not None:
        from featviz.maps.backends import INFO_TSNE_NEGATIVES
        from featviz.maps.projection import TsneParams

        load = _load()
        print(f"{os.cpu_count()} CPU cores, load average {load:.1f} at start; {platform.python_version()}; data "
              f"{args.n:,} x {args.dim}, {args.classes} classes, separation {args.separation}; time cap "
              f"{args.time_cap:.0f} s per method; TorchDR {args.torchdr_iterations or TsneParams().n_iter} iterations "
              f"after early exaggeration, {args.torchdr_negatives or INFO_TSNE_NEGATIVES} negatives", flush=True)
        t = time.perf_counter()
        x, y = pixel_like(args.n, args.dim, args.classes, args.seed, args.separation)
        print(f"data made in {time.perf_counter() - t:.1f} s", flush=True)
        row = compare_backends(args, x, y, load)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "load_at_start": load, "results": [row]}, fh, indent=2)
        return

    from openTSNE import TSNE as OpenTSNE
    from sklearn.manifold import TSNE as SkTSNE

    from featviz.maps import projection as tsne
    from featviz.maps import quality

    sizes = [int(s) for s in args.sizes.split(",") if s]
    load = _load()
    print(f"{os.cpu_count()} CPU cores, load average {load:.1f} at start; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}; {platform.python_version()}; data {args.dim}-d, "
          f"{args.classes} classes, separation {args.separation}", flush=True)
    runs = {
        "featviz": lambda x: tsne.fit(x, tsne.TsneParams(seed=args.seed, backend="opentsne")),
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
            row[name] = {"s": t, "knn_accuracy@10": quality.leave_one_out_knn_accuracy(c, y),
                         "knn_recall@10": quality.knn_recall(x, c, 10, n_eval=5000, seed=args.seed)}
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
