"""ContrastiveCrop vs RandomResizedCrop: held-out kNN and view statistics, same budget, several seeds.

For each dataset (``digits``, the bundled ``photos``), method (SimSiam, MoCo v2) and seed, trains
twice with ``featviz train``, identical but for ``--crop rrc`` / ``--crop contrastive`` (the
official defaults: k 0.10, alpha 0.1 for <= 96 px crops, warm-up and update interval a fifth of
the run), and reports:

- the held-out kNN accuracy of the last epoch (featviz's monitor: weighted kNN, k 20, t 0.07, on
  the run's held-out split), mean over seeds with a 95% Student-t interval, and the paired gain
  (contrastive - rrc, same seed) with its interval and the number of seeds where it is positive;
- a random-init encoder's kNN under the same protocol (what the data gives for free);
- the boxes at the last update (mean box area, share of whole-image boxes) and the view
  statistics on the training images with those boxes (``featviz.views.crops``): mean IoU of
  the two views and the share of each view inside the box, ContrastiveCrop beside
  RandomResizedCrop.

Both crops use the official ContrastiveCrop scale (0.2, 1) (``--min-scale 0.2``), also on digits,
whose measured preset is 0.8 (at 0.8 the centre has almost no room to move). ``photos`` are 20
crops of 6 scikit-image photos in 5 classes: 16 train, 4 held out, so its kNN accuracy moves in
steps of 25 % and mostly measures whether crops of the same photo land together; read it as a
smoke test, not as evidence.

    nice -n 10 python benchmarks/contrastive_crop.py [--seeds 3] [--datasets digits photos]
        [--methods simsiam moco_v2] [--threshold K] [--json [FILE]]

Defaults are a CPU budget (a few minutes per dataset on 2 shared cores); ``--digits-limit 0
--digits-epochs 30`` is closer to a real comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("simsiam", "moco_v2")


def t_interval(values: list[float]) -> dict[str, float]:
    """mean and a 95% Student-t interval (NaN bounds for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan")}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def dataset_config(name: str, args) -> dict:
    if name == "digits":
        return dict(data="digits", arch="resnet18_w16-cifar", image_size=32, batch_size=64, epochs=args.digits_epochs,
                    limit=args.digits_limit or None, min_scale=0.2)
    if name == "photos":
        return dict(data=str(ROOT / "sample_data" / "photos"), arch="resnet18_w16-cifar", image_size=64, batch_size=8,
                    epochs=args.photos_epochs, min_scale=0.2, hflip=True)
    raise SystemExit(f"unknown dataset {name!r}: expected digits or photos")


def random_init_knn(cfg) -> float:
    """kNN of the untrained encoder (plain random init), the runs' split and protocol."""
    import torch

    from featviz.distributed import DistInfo
    from featviz.models.architectures import build_backbone
    from featviz.train.ssl_task import SSLTask

    task = SSLTask(cfg, DistInfo())
    task.model.backbone.load_state_dict(build_backbone(cfg.arch, seed=cfg.seed).state_dict())
    return task.evaluate(torch.device("cpu"))["knn_acc"]


def view_stats(run: Path, cfg, samples: int = 16) -> dict:
    """IoU of the two views and share inside the box, ContrastiveCrop vs RandomResizedCrop, on the
    run's training images with its last boxes (boxes.npz)."""
    import numpy as np
    from torchvision.transforms import v2

    from featviz.data.contrastive_crop import ContrastiveCrop
    from featviz.data.images import load_image
    from featviz.distributed import DistInfo
    from featviz.train.ssl_task import SSLTask
    from featviz.views.crops import box_pixels, inside_share, pair_iou, sample_views

    z = np.load(run / "boxes.npz")
    task = SSLTask(cfg, DistInfo())
    view = task.recipe.globals_[0]
    crops = {"contrastive": ContrastiveCrop(8, scale=view.scale, ratio=view.ratio, alpha=cfg_alpha(run)),
             "rrc": v2.RandomResizedCrop(8, scale=view.scale, ratio=view.ratio)}
    grid = (int(z["image_size"]), int(z["image_size"]))
    out = {m: {"iou": [], "inside_box": []} for m in crops}
    for i, item in enumerate(task.items):
        img = item if not isinstance(item, (str, Path)) else load_image(item)
        size = (img.size[1], img.size[0])
        box = z["boxes"][i]
        for m, c in crops.items():
            v = sample_views(c, size, box, samples, 1000 + i)
            out[m]["iou"].append(float(pair_iou(v).mean()))
            out[m]["inside_box"].append(float(inside_share(v, box_pixels(box, size, grid)).mean()))
    return {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in out.items()}


def cfg_alpha(run: Path) -> float:
    return float(json.loads((run / "config.json").read_text())["crop_alpha"])


def measure(args) -> dict:
    import torch

    from featviz.train.config import TrainConfig, resolve_config
    from featviz.train.loop import train

    torch.set_num_threads(args.threads)
    res: dict = {"seeds": args.seeds, "threads": args.threads, "threshold": args.threshold or 0.10, "datasets": {}}
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ccrop_bench_"))
    t_all = time.perf_counter()
    for ds in args.datasets:
        base = dataset_config(ds, args)
        res["datasets"][ds] = {"config": base, "methods": {}}
        for method in args.methods:
            runs: dict[str, list] = {"rrc": [], "contrastive": []}
            stats, boxes, seconds = [], [], {"rrc": 0.0, "contrastive": 0.0}
            for seed in range(args.seeds):
                for crop in ("rrc", "contrastive"):
                    out = tmp / ds / method / f"{crop}_s{seed}"
                    kw = {"crop_threshold": args.threshold} if crop == "contrastive" and args.threshold else {}
                    cfg = TrainConfig(method=method, out=str(out), seed=seed, crop=crop, eval_every=base["epochs"],
                                      log_every=1000, threads=args.threads, **kw,
                                      **{k: v for k, v in base.items() if k != "epochs"}, epochs=base["epochs"])
                    t0 = time.perf_counter()
                    r = train(cfg, force=True)
                    seconds[crop] += time.perf_counter() - t0
                    runs[crop].append(float(r.history[-1]["knn_acc"]))
                    if crop == "contrastive":
                        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                        last = [x for x in lines if x.get("event") == "boxes"][-1]
                        boxes.append({"mean_box_area": last["mean_box_area"], "whole_image_share":
                                      last["whole_image_share"], "after_epoch": last["epoch"]})
                        stats.append(view_stats(out, resolve_config(cfg)))
                    print(f"  {ds} {method} seed {seed} {crop:11s}: kNN {100 * runs[crop][-1]:.1f} % "
                          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            gain = [b - a for a, b in zip(runs["rrc"], runs["contrastive"], strict=True)]
            rnd = random_init_knn(resolve_config(TrainConfig(method=method, out=str(tmp / "rnd"), seed=0,
                                                             **base)))
            res["datasets"][ds]["methods"][method] = {
                "knn": {c: {**t_interval(v), "values": v} for c, v in runs.items()},
                "gain": {**t_interval(gain), "positive": sum(g > 0 for g in gain), "ties": sum(g == 0 for g in gain)},
                "random_init_knn": rnd,
                "boxes": {k: sum(b[k] for b in boxes) / len(boxes) for k in ("mean_box_area", "whole_image_share")},
                "box_update_after_epoch": boxes[-1]["after_epoch"],
                "views": {c: {k: sum(s[c][k] for s in stats) / len(stats) for k in ("iou", "inside_box")}
                          for c in ("rrc", "contrastive")},
                "seconds": {k: round(v, 1) for k, v in seconds.items()},
            }
    res["seconds"] = round(time.perf_counter() - t_all, 1)
    res["runs"] = str(tmp)
    return res


def table(res: dict) -> str:
    def iv(d, pct=True, sign=False):
        f = (lambda v: f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
        lo = "-" if math.isnan(d["ci_low"]) else f(d["ci_low"])
        hi = "-" if math.isnan(d["ci_high"]) else f(d["ci_high"])
        return f"{f(d['mean'])} [{lo}, {hi}]"

    lines = [f"ContrastiveCrop vs RandomResizedCrop, {res['seeds']} seeds each, same budget "
             f"({res['seconds']:.0f} s, {res['threads']} thread(s)), k {res.get('threshold', 0.1):g}; kNN % on the "
             "held-out split, mean [95% CI]"]
    head = (f"{'data':7s} {'method':8s} {'kNN rrc':>19s} {'kNN contrastive':>19s} {'gain (pts)':>19s} {'+':>4s} "
            f"{'rand':>5s} | {'box area':>8s} {'whole':>6s} | {'IoU rrc':>7s} {'IoU cc':>7s} {'in-box rrc':>10s} "
            f"{'in-box cc':>9s}")
    lines += [head, "-" * len(head)]
    for ds, d in res["datasets"].items():
        for m, r in d["methods"].items():
            k = r["knn"]
            lines.append(
                f"{ds:7s} {m:8s} {iv(k['rrc']):>19s} {iv(k['contrastive']):>19s} {iv(r['gain'], sign=True):>19s} "
                f"{r['gain']['positive']:>2d}/{len(k['rrc']['values'])} {100 * r['random_init_knn']:5.1f} | "
                f"{100 * r['boxes']['mean_box_area']:7.1f}% {100 * r['boxes']['whole_image_share']:5.1f}% | "
                f"{r['views']['rrc']['iou']:7.3f} {r['views']['contrastive']['iou']:7.3f} "
                f"{100 * r['views']['rrc']['inside_box']:9.1f}% {100 * r['views']['contrastive']['inside_box']:8.1f}%")
    for ds, d in res["datasets"].items():
        c = d["config"]
        lines.append(f"{ds}: {c['arch']} {c['image_size']} px, batch {c['batch_size']}, {c['epochs']} epochs"
                     f"{', first ' + str(c['limit']) + ' images' if c.get('limit') else ''}, crop scale "
                     f"{c['min_scale']}-1; boxes at the last update (after epoch "
                     f"{next(iter(d['methods'].values()))['box_update_after_epoch']}); + = seeds where contrastive "
                     "beat rrc; rand = random-init encoder")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "photos"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--digits-epochs", type=int, default=8)
    ap.add_argument("--digits-limit", type=int, default=600, help="first N digits (0: all 1797)")
    ap.add_argument("--photos-epochs", type=int, default=40)
    ap.add_argument("--threshold", type=float, default=None,
                    help="ContrastiveCrop's k (default: the official 0.10); the digits' and photos' boxes are "
                         "almost whole images at 0.10")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: a temp folder)")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="print JSON (or write it to FILE)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    res = measure(args)
    if args.json == "-":
        print(json.dumps(res, indent=2))
    else:
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
