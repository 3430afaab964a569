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


def random_init_knn(run: Path, *, precise_bn: bool = True) -> float:
    """kNN accuracy of an untrained encoder, same arch/data/split/eval as the run.

    ``precise_bn=True`` is the run's own protocol (BatchNorm statistics re-estimated on the
    training images before each evaluation); False keeps the initial statistics (mean 0,
    variance 1), which on digits makes the random network a much stronger baseline.
    """
    import torch

    from featviz.distributed import DistInfo
    from featviz.models.architectures import build_backbone
    from featviz.train.config import TrainConfig
    from featviz.train.ssl_task import SSLTask

    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    torch.set_num_threads(1)
    task = SSLTask(cfg, DistInfo())  # the run's split, data and evaluation, untrained
    # plain random init (torchvision's, as `featviz embed --arch` builds it), not SimSiam's zero-init residual
    task.model.backbone.load_state_dict(build_backbone(cfg.arch, seed=cfg.seed).state_dict())
    if not precise_bn:
        task._precise_bn = lambda *args, **kwargs: None
    return task.evaluate(torch.device("cpu"))["knn_acc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stopgrad", type=Path)
    ap.add_argument("no_stopgrad", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/img/simsiam_stopgrad.png"))
    args = ap.parse_args()

    from featviz.collapse import plot_run_comparison

    runs = {"SimSiam (stop-gradient)": args.stopgrad, "without stop-gradient": args.no_stopgrad}
    cfg = json.loads((args.stopgrad / "config.json").read_text())
    rnd = random_init_knn(args.stopgrad)
    rnd_init_bn = random_init_knn(args.stopgrad, precise_bn=False)
    for label, run in runs.items():
        lines = _lines(run)
        epochs = [r for r in lines if r.get("kind") == "epoch"]
        d = next(r["d"] for r in lines if "d" in r)
        last = epochs[-1]
        wall = json.loads((run.parent / f"{run.name}.json").read_text())["seconds"] \
            if (run.parent / f"{run.name}.json").exists() else float("nan")
        pred = (f"; predictor output std_l2 {last['std_l2_predictor'] * math.sqrt(d):.3f} x 1/sqrt(d), RankMe "
                f"{last['rankme_predictor']:.2f}") if "std_l2_predictor" in last else ""
        print(f"{label:26s} held-out z: std_l2 {last['std_l2']:.4f} = {last['std_l2'] * math.sqrt(d):.2f} x 1/sqrt(d) "
              f"(d={d}), RankMe {last['rankme']:.1f}, effective rank {last['effective_rank']:.1f}{pred}; "
              f"kNN {100 * last['knn_acc']:.1f}%; {last['step']} steps, train loop {wall:.0f} s")
    print(f"{'random-init encoder':26s} kNN {100 * rnd:.1f}% (evaluated like the runs: BatchNorm statistics "
          f"re-estimated on the training images); {100 * rnd_init_bn:.1f}% with its initial BatchNorm statistics")
    plot_run_comparison({label: _lines(run) for label, run in runs.items()}, args.out,
                        baseline_knn={"random init, BN statistics re-estimated (as the runs)": rnd,
                                      "random init, initial BN statistics": rnd_init_bn},
                        title=f"SimSiam on digits ({cfg['arch']}, {cfg['image_size']} px, {cfg['epochs']} epochs): "
                              "stop-gradient prevents collapse")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
