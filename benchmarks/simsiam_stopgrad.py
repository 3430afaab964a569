"""SimSiam's Figure 2 on digits: std of the l2-normalised output with and without stop-gradient.

Reads two `featviz train` run folders (made by the commands in docs/train.md), prints the final
numbers against 1/sqrt(d), the kNN accuracy of both runs and of a random-init encoder of the
same architecture, and draws docs/img/simsiam_stopgrad.png.

    python benchmarks/simsiam_stopgrad.py RUN_STOPGRAD RUN_NO_STOPGRAD [--out docs/img/simsiam_stopgrad.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def random_init_knn(run: Path) -> float:
    """kNN accuracy of an untrained encoder, same arch/data/split/eval as the run."""
    import torch

    from featviz.distributed import DistInfo
    from featviz.train import SSLTask, TrainConfig

    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    torch.set_num_threads(1)
    task = SSLTask(cfg, DistInfo())  # builds the backbone with the run's seed, untrained
    return task.evaluate(torch.device("cpu"))["knn_acc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stopgrad", type=Path)
    ap.add_argument("no_stopgrad", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/img/simsiam_stopgrad.png"))
    args = ap.parse_args()

    from matplotlib.figure import Figure

    runs = {"SimSiam (stop-gradient)": args.stopgrad, "without stop-gradient": args.no_stopgrad}
    colors = {"SimSiam (stop-gradient)": "#1f77b4", "without stop-gradient": "#d62728"}
    rnd = random_init_knn(args.stopgrad)
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    ax1, ax3, ax2 = fig.subplots(1, 3)
    d = None
    for label, run in runs.items():
        lines = _lines(run)
        steps = [r for r in lines if r.get("kind") == "step" and "std_l2" in r]
        epochs = [r for r in lines if r.get("kind") == "epoch"]
        d = steps[0]["d"]
        ax1.plot([r["step"] for r in steps], [r["std_l2"] for r in steps], color=colors[label], label=label, lw=1.8)
        ax3.plot([r["step"] for r in steps], [r["rankme"] for r in steps], color=colors[label], label=label, lw=1.8)
        ax2.plot([r["epoch"] for r in epochs], [100 * r["knn_acc"] for r in epochs], "o-", color=colors[label],
                 label=label, ms=4)
        last = epochs[-1]
        wall = json.loads((run.parent / f"{run.name}.json").read_text())["seconds"] \
            if (run.parent / f"{run.name}.json").exists() else float("nan")
        print(f"{label:26s} std_l2 {last['std_l2']:.4f} = {last['std_l2'] * math.sqrt(d):.2f} x 1/sqrt(d) "
              f"(d={d}); RankMe {last['rankme']:.1f}, effective rank {last['effective_rank']:.1f}; kNN {100 * last['knn_acc']:.1f}%; {last['step']} steps, train loop {wall:.0f} s")
    print(f"{'random-init encoder':26s} kNN {100 * rnd:.1f}%")
    ideal = 1 / math.sqrt(d)
    ax1.axhline(ideal, color="gray", ls="--", lw=1, label=r"$1/\sqrt{d}$ (isotropic)")
    ax1.axhline(0.5 * ideal, color="gray", ls=":", lw=1, label=r"$0.5/\sqrt{d}$")
    ax1.axhline(0.1 * ideal, color="black", ls=":", lw=1, label=r"$0.1/\sqrt{d}$")
    ax1.set(xlabel="training step", ylabel="std of l2-normalised output z", ylim=(0, ideal * 1.25),
            title=f"Collapse monitor (d = {d})")
    ax1.legend(fontsize=8, loc="center right")
    ax3.set(xlabel="training step", ylabel="RankMe of z", yscale="log", title="Rank of the output (RankMe)")
    ax3.legend(fontsize=8, loc="lower left")
    ax2.axhline(100 * rnd, color="gray", ls="--", lw=1, label=f"random-init encoder ({100 * rnd:.1f}%)")
    ax2.set(xlabel="epoch", ylabel="kNN accuracy on held-out digits (%)", title="kNN monitor (k=20)")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle("SimSiam on digits (resnet18_w16-cifar, 16 px): stop-gradient prevents collapse", fontsize=11)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
