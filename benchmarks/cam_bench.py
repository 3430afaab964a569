"""featviz cam vs a direct pytorch-grad-cam loop, side by side in one run (ResNet-50, random weights).

    PYTHONPATH=. python benchmarks/cam_bench.py [--images 64] [--size 224] [--score-images 1]

Prints seconds per image and ratios for GradCAM (direct one image per call, featviz one image per
call, featviz batched) and the same for ScoreCAM on ``--score-images`` images, plus the largest
difference between featviz's maps and pytorch-grad-cam's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--score-images", type=int, default=1, help="ScoreCAM images (2048 forwards each)")
    ap.add_argument("--arch", default="resnet50")
    args = ap.parse_args()

    from pytorch_grad_cam import GradCAM, ScoreCAM

    from featviz.models.architectures import build_backbone
    from featviz.views import cam as C

    model = build_backbone(args.arch, seed=0)
    model.fc = nn.Linear(2048 if "50" in args.arch else 512, 1000)  # a classifier: top1 targets
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, args.size, args.size, generator=g)
    layer = model.layer4
    info = C.probe_model(model, x[:1])
    print(f"{args.arch} @ {args.size}px, {args.images} images, torch threads {torch.get_num_threads()}")

    def featviz(method: str, xs: torch.Tensor, bs: int) -> np.ndarray:
        out = []
        for i in range(0, len(xs), bs):
            xb = xs[i:i + bs]
            maps, _ = C.explain(info, xb, method, [layer], C.make_targets(_ctx(C, info), xb), batch_size=16)
            out.append(maps)
        return np.concatenate(out)

    def direct(cls, xs: torch.Tensor) -> np.ndarray:
        cam = cls(model=model, target_layers=[layer])
        try:
            return np.concatenate([cam(input_tensor=xs[i:i + 1], targets=None) for i in range(len(xs))])
        finally:
            cam.activations_and_grads.release()

    featviz("gradcam", x[:2], 2)  # warm-up
    rows = []
    for label, fn in (("pytorch-grad-cam GradCAM, 1 image per call", lambda: direct(GradCAM, x)),
                      ("featviz gradcam, 1 image per call", lambda: featviz("gradcam", x, 1)),
                      (f"featviz gradcam, batch {args.batch_size}", lambda: featviz("gradcam", x, args.batch_size))):
        t = time.perf_counter()
        maps = fn()
        rows.append((label, (time.perf_counter() - t) / len(x), maps))
    _report("GradCAM", rows)

    if args.score_images:
        xs = x[:args.score_images]
        rows = []
        runs = [("pytorch-grad-cam ScoreCAM, 1 image per call", lambda: direct(ScoreCAM, xs)),
                ("featviz scorecam, 1 image per call", lambda: featviz("scorecam", xs, 1))]
        if len(xs) > 1:  # with one image, batched and one-per-call are the same run
            runs.append((f"featviz scorecam, batch {len(xs)}", lambda: featviz("scorecam", xs, len(xs))))
        for label, fn in runs:
            t = time.perf_counter()
            maps = fn()
            rows.append((label, (time.perf_counter() - t) / len(xs), maps))
        _report(f"ScoreCAM ({len(xs)} image{'s' if len(xs) > 1 else ''})", rows)


def _ctx(C, info):
    return C.TargetContext(C.TargetSpec("top1"), info, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _report(name: str, rows) -> None:
    base = rows[0][1]
    print(f"\n{name}")
    for label, sec, maps in rows:
        diff = float(np.abs(maps - rows[0][2]).max())
        print(f"  {label:48s} {sec:7.3f} s/img   time vs direct {sec / base:5.2f}x   "
              f"speed-up {base / sec:5.2f}x   max |map diff| {diff:.1e}")


if __name__ == "__main__":
    main()
