"""featviz cam vs a direct pytorch-grad-cam loop, side by side in one run (ResNet-50, random weights).

    PYTHONPATH=. python benchmarks/cam_bench.py [--images 64] [--size 224] [--score-images 1]
        [--deletion-maps 4] [--deletion-steps 20]

Prints seconds per image and ratios for GradCAM (direct one image per call, featviz one image per
call, featviz batched) and the same for ScoreCAM on ``--score-images`` images, plus the largest
difference between featviz's maps and pytorch-grad-cam's; then ``--score deletion`` (RISE's
deletion AUC, ``--deletion-steps`` steps: steps + 1 forwards per map) on ``--deletion-maps`` Grad-CAM
maps: featviz (every perturbed image of one map in one batched forward) against the same perturbed
images forwarded one at a time, with the ratio (target ≤ 0.5×) and the largest AUC difference.
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
    ap.add_argument("--deletion-maps", type=int, default=4, help="maps scored by --score deletion (0: skip)")
    ap.add_argument("--deletion-steps", type=int, default=20)
    ap.add_argument("--only-deletion", action="store_true", help="time --score deletion only")
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

    if args.only_deletion:
        _deletion(C, info, model, x[:args.deletion_maps], featviz("gradcam", x[:args.deletion_maps], 16),
                  args.deletion_steps)
        return
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

    if args.deletion_maps:
        _deletion(C, info, model, x[:args.deletion_maps], featviz("gradcam", x[:args.deletion_maps], 16),
                  args.deletion_steps)


def _deletion(C, info, model, xs: torch.Tensor, maps: np.ndarray, steps: int) -> None:
    """featviz's batched deletion scoring vs the same perturbed images forwarded one at a time."""
    from featviz.views.cam import scores as S

    targets = C.make_targets(_ctx(C, info), xs)
    C.bind_targets(info, xs, targets)
    step = S.step_pixels(tuple(maps.shape[-2:]), steps)

    def unbatched() -> np.ndarray:  # the same n + 1 images per map, one forward each
        out = []
        for i in range(len(xs)):
            st = S.ScoreTarget(targets[i])
            one = lambda imgs, st=st: torch.cat([model(imgs[k:k + 1]) for k in range(len(imgs))])  # noqa: E731
            out.append(S.auc(S.causal_curve(one, xs[i:i + 1], maps[i], st, "deletion", step, batch_size=1)))
        return np.asarray(out)

    with torch.no_grad():
        model(xs[:1])  # warm-up
        t = time.perf_counter()
        ref = unbatched()
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        ours, forwards = S.score_maps(model, xs, maps, targets, ["deletion"], steps=steps)
        t_batch = time.perf_counter() - t
    n = forwards[0]
    print(f"\n--score deletion, {steps} steps ({n} forwards per map), {len(xs)} maps")
    print(f"  {'unbatched: one forward per perturbed image':48s} {t_one / len(xs):7.3f} s/map")
    print(f"  {'featviz: one batched forward per map':48s} {t_batch / len(xs):7.3f} s/map   "
          f"time vs unbatched {t_batch / t_one:5.2f}x (target <= 0.5x)   "
          f"max |AUC diff| {float(np.abs(ours['deletion'] - ref).max()):.1e}")


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
