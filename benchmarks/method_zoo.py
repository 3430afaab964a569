"""Every SSL method on digits with featviz's defaults: the table and figure of docs/train.md.

For each method this runs exactly what a new user types (issue 16's done-when):

    python -m featviz train --method M --data digits --epochs 10 --seed 0 --out RUN/M
    python -m featviz embed --checkpoint RUN/M/last.safetensors --images digits --out RUN/M/e.npz

and scores the embedding with ``benchmarks/digits_knn.py`` (cosine 20-NN, l2-normalised, 5-fold)
against the same architecture at random init embedded alike (``embed --arch resnet18_w16-cifar``).
It also reports the held-out kNN accuracy `featviz train` logged (and the same number recomputed
from the checkpoint with ``featviz.train.knn.checkpoint_knn``), the last epoch's std_l2 and RankMe of
the monitored output, training steps/s and the wall time of the train command.

With CUDA it adds steps/s of each method under bf16 AMP against a bare AMP loop of the same model
(``train_bench.py --device cuda``); without CUDA that part is skipped (said in the output).

    python benchmarks/method_zoo.py [--methods simclr,byol] [--epochs 10] [--runs RUN_DIR] [--reuse]
                                    [--figure docs/img/method_zoo.png] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
METHODS = ("simclr", "moco_v2", "moco_v3", "byol", "simsiam", "barlow_twins", "swav", "dino")
ARCH = "resnet18_w16-cifar"
MARGIN = 0.02


def _featviz(*args: str, env: dict[str, str]) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "featviz", *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"featviz {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def run_method(method: str, runs: Path, *, epochs: int, reuse: bool, env: dict[str, str]) -> dict:
    from digits_knn import npz_accuracy

    run = runs / method
    wall = None
    if not (reuse and (run / "last.safetensors").exists()):
        wall = _featviz("train", "--method", method, "--data", "digits", "--epochs", str(epochs), "--seed", "0",
                        "--out", str(run), "--force", env=env)
        (run / "wall.json").write_text(json.dumps({"seconds": wall}))
    elif (run / "wall.json").exists():
        wall = json.loads((run / "wall.json").read_text())["seconds"]
    npz = run / "e.npz"
    if not (reuse and npz.exists()):
        _featviz("embed", "--checkpoint", str(run / "last.safetensors"), "--images", "digits", "--out", str(npz),
                 "--force", env=env)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epochs_ = [r for r in lines if r.get("kind") == "epoch"]
    last = epochs_[-1]
    t_steps = sum(r.get("train_seconds", 0.0) for r in epochs_)
    from featviz.train.knn import checkpoint_knn

    return {"method": method, "knn_5fold": npz_accuracy(npz), "knn_logged": last.get("knn_acc"),
            "knn_from_checkpoint": checkpoint_knn(run / "last.safetensors")["knn_acc"],
            "std_l2_x_sqrt_d": last["std_l2"] * math.sqrt(last["d"]), "rankme": last["rankme"], "d": last["d"],
            "steps": last["step"], "steps_per_s": last["step"] / t_steps if t_steps else None, "wall_s": wall,
            "history": [r.get("knn_acc") for r in epochs_]}


def random_baseline(runs: Path, image_size: int, *, env: dict[str, str]) -> float:
    """The same architecture at random init, embedded alike: at the size the runs trained at."""
    from digits_knn import npz_accuracy

    npz = runs / f"random_init_{image_size}px.npz"
    if not npz.exists():
        _featviz("embed", "--arch", ARCH, "--images", "digits", "--seed", "0", "--image-size", str(image_size),
                 "--out", str(npz), "--force", env=env)
    return npz_accuracy(npz)


def plot(rows: list[dict], rnd: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    x = range(len(rows))
    acc = [r["knn_5fold"] for r in rows]
    colours = ["#2a9d8f" if a >= rnd + MARGIN else "#e76f51" for a in acc]
    ax.bar(x, acc, color=colours, width=0.6, label="featviz defaults, 10 epochs")
    ax.axhline(rnd, color="k", lw=1.2, label=f"random init, same arch ({rnd:.3f})")
    ax.axhline(rnd + MARGIN, color="k", lw=0.8, ls=":", label=f"random init + {MARGIN}")
    for i, a in enumerate(acc):
        ax.text(i, a + 0.003, f"{a:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    lo = min(acc + [rnd]) - 0.05
    ax.set_ylim(max(0.0, lo), min(1.0, max(acc + [rnd]) + 0.04) + 0.03)  # headroom: the legend sits above the bars
    ax.set_ylabel("cosine 20-NN accuracy (5-fold)")
    ax.set_title("digits: `featviz embed` features of last.safetensors", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    axes[1].bar(x, [r["std_l2_x_sqrt_d"] for r in rows], color="#457b9d", width=0.6)
    axes[1].axhline(1.0, color="k", lw=0.8, ls=":")
    axes[1].set_xticks(list(x), names, rotation=30, ha="right")
    axes[1].set_title("std_l2 x sqrt(d) (1 = spread out)", fontsize=10)
    axes[2].bar(x, [r["rankme"] for r in rows], color="#8d99ae", width=0.6)
    axes[2].set_xticks(list(x), names, rotation=30, ha="right")
    axes[2].set_title("RankMe of the monitored output", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--runs", type=Path, default=Path("runs/method_zoo"))
    ap.add_argument("--reuse", action="store_true", help="keep runs and embeddings that exist")
    ap.add_argument("--figure", type=Path, default=Path("docs/img/method_zoo.png"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for m in args.methods.split(","):
        rows.append(run_method(m, args.runs, epochs=args.epochs, reuse=args.reuse, env=env))
        r = rows[-1]
        size = json.loads((args.runs / m / "config.json").read_text())["image_size"]
        r["image_size"] = size
        r["random_init"] = rnd = random_baseline(args.runs, size, env=env)  # embedded alike: the trained size
        print(f"  {m:13s} 5-fold {r['knn_5fold']:.4f} (random {rnd:.4f}, {r['knn_5fold'] - rnd:+.4f})  "
              f"logged {r['knn_logged']:.4f} = checkpoint {r['knn_from_checkpoint']:.4f}", file=sys.stderr, flush=True)
    rnd = rows[0]["random_init"]
    if any(r["random_init"] != rnd for r in rows):
        print("note: the methods trained at different sizes; each row is compared with its own random init",
              file=sys.stderr)
    plot(rows, rnd, args.figure)
    import torch

    gpu = "CUDA present: run `python benchmarks/train_bench.py --device cuda` for AMP steps/s" \
        if torch.cuda.is_available() else "no CUDA: the GPU (AMP, DDP) part is skipped"
    if args.json:
        print(json.dumps({"random_init": rnd, "margin": MARGIN, "rows": rows, "gpu": gpu}, indent=2))
        return
    print(f"digits, `featviz train --method M --data digits --epochs {args.epochs} --seed 0` then `featviz embed`; "
          f"cosine 20-NN, l2-normalised, 5-fold; random init ({ARCH}, {rows[0]['image_size']} px) {rnd:.4f}\n")
    print("| method | 5-fold 20-NN | vs random init | held-out kNN (logged) | from checkpoint | std_l2 × √d | "
          "RankMe | steps/s | train wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sps = f"{r['steps_per_s']:.2f}" if r["steps_per_s"] else "-"
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] else "-"
        gain = r["knn_5fold"] - r["random_init"]
        print(f"| {r['method']} | {r['knn_5fold']:.4f} | {gain:+.4f} | {r['knn_logged']:.4f} | "
              f"{r['knn_from_checkpoint']:.4f} | {r['std_l2_x_sqrt_d']:.2f} | {r['rankme']:.1f} | {sps} | {wall} |")
    ok = all(r["knn_5fold"] >= r["random_init"] + MARGIN for r in rows)
    print(f"\nevery method beats random init by >= {MARGIN}: {ok}\n{gpu}\nwrote {args.figure}")


if __name__ == "__main__":
    main()
