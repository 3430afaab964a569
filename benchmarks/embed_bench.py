"""Images/s of `featviz embed` next to a bare `torch.inference_mode()` loop over the same image files.

Both sides decode the same JPEGs with the same transform and the same weights; the bare loop decodes
in the main process and runs the model batch by batch. featviz is timed through its library entry
(`featviz.eval.embed.run_embed`, which the CLI calls), including loading the model and writing the .npz.
Cases (``--cases``, default both):

- ``resnet``: featviz's ResNet-18 (width 32, CIFAR stem) at 64 px, the bare loop on the same module
  class; target featviz >= 0.9x;
- ``vit``: a ViT-S/16 at 224 px; featviz builds it (timm, ``dynamic_img_size=True`` so any size
  works), the bare loop a plain ``timm.create_model("vit_small_patch16_224")``; target featviz >= 0.95x.

Two comparisons per case: the whole command (featviz ``run_embed`` builds the seeded model, embeds and
writes the .npz; the bare script builds its model and loops) and the embedding loop alone
(``featviz.eval.embed.embed_images`` on a built model vs the bare loop on its built model). Runs alternate
between the sides; the median of ``--runs`` runs each is reported, after one warm-up of each side; the
largest feature difference between the sides is printed too (same seed, same weights).

    python benchmarks/embed_bench.py [--cases resnet,vit] [--n 256] [--vit-n 64] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = {  # name: (featviz arch, input side, target ratio)
    "resnet": ("resnet18_w32-cifar", 64, 0.9),
    "vit": ("vit_small_patch16_224", 224, 0.95),
}


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        cls = folder / f"c{i % 5}"
        cls.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size * 2, size * 2), Image.BICUBIC).save(cls / f"{i:05d}.jpg", quality=90)


def bare_loop(files, model, tf, batch: int, device) -> np.ndarray:
    import torch

    from featviz.data.images import load_image

    out = []
    with torch.inference_mode():
        for i in range(0, len(files), batch):
            x = torch.stack([tf(load_image(f)) for f in files[i:i + batch]]).to(device)
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy()


def bare_model(case: str, arch: str, device):
    """What a researcher's own script builds: featviz's ResNet variant (torchvision's module, narrower),
    or a plain ``timm.create_model`` ViT; seeded like featviz, so both sides hold the same weights."""
    import torch

    torch.manual_seed(0)
    if case == "vit":
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=0).to(device).eval()
    from featviz.models.architectures import build_backbone

    return build_backbone(arch, seed=0).to(device).eval()


def run_case(case: str, n: int, batch: int, runs: int, device_name: str) -> dict:
    """Two comparisons: the whole command (featviz ``run_embed``: build the model, embed, write the
    .npz; bare: build the model, loop) and the embedding loop alone (``embed_images`` on a built
    model vs the bare loop on its built model)."""
    import torch

    from featviz.data.images import eval_transform, labelled_images
    from featviz.distributed import resolve_device
    from featviz.eval import embed
    from featviz.models.architectures import build_backbone
    from featviz.models.description import describe

    arch, size, target = CASES[case]
    device = resolve_device(device_name)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imgs"
        make_images(root, n, size)
        files = labelled_images(root).items
        ours = build_backbone(arch, seed=0)
        theirs = bare_model(case, arch, device)
        norm = describe(ours).normalization
        tf = eval_transform(size, norm.mean, norm.std)
        sides = {
            "command": {
                "bare": lambda: bare_loop(files, bare_model(case, arch, device), tf, batch, device),
                "featviz": lambda: embed.run_embed(out=Path(tmp) / "e.npz", images=root, arch=arch, image_size=size,
                                                   batch_size=batch, device=device_name, force=True).features},
            "loop": {
                "bare": lambda: bare_loop(files, theirs, tf, batch, device),
                "featviz": lambda: embed.embed_images(ours, files, image_size=size, batch_size=batch,
                                                      device=device).features},
        }
        same = float(np.abs(sides["loop"]["bare"]() - sides["command"]["featviz"]()).max())  # warm-up, same numbers
        sides["command"]["bare"](), sides["loop"]["featviz"]()
        times = {k: {"bare": [], "featviz": []} for k in sides}
        for _ in range(runs):
            for what, pair in sides.items():
                for side, fn in pair.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[what][side].append(time.perf_counter() - t)
    ips = {w: {side: n / statistics.median(v) for side, v in d.items()} for w, d in times.items()}
    return {"case": case, "arch": arch, "image_size": size, "images": n, "batch": batch, "device": str(device),
            "images_per_s": ips, "ratio": {w: d["featviz"] / d["bare"] for w, d in ips.items()}, "target": target,
            "max_abs_feature_difference": same, "seconds": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="resnet,vit")
    ap.add_argument("--n", type=int, default=256, help="images for the ResNet case")
    ap.add_argument("--vit-n", type=int, default=64, help="images for the ViT-S/16 case")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    import torch

    results = [run_case(c, args.vit_n if c == "vit" else args.n, args.batch, args.runs, args.device)
               for c in args.cases.split(",")]
    if args.json:
        print(json.dumps({"torch_threads": torch.get_num_threads(), "cores": os.cpu_count(), "results": results},
                         indent=2))
        return
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores; median of {args.runs} runs; "
          "command = build the model + embed (+ write the .npz for featviz), loop = embed a built model")
    print(f"{'case':<42}{'images':>7}{'bare img/s':>12}{'featviz img/s':>15}{'featviz/bare':>14}{'target':>9}"
          f"{'max |diff|':>12}")
    for r in results:
        for what in ("command", "loop"):
            ips = r["images_per_s"][what]
            print(f"{r['arch'] + ' @ ' + str(r['image_size']) + ' px, ' + what:<42}{r['images']:>7}"
                  f"{ips['bare']:>12.2f}{ips['featviz']:>15.2f}{r['ratio'][what]:>13.2f}x"
                  f"{'>= ' + str(r['target']):>9}{r['max_abs_feature_difference']:>12.2e}")
    for r in results:
        for what in ("command", "loop"):
            met = "met" if r["ratio"][what] >= r["target"] else "NOT met"
            print(f"{r['arch']} {what}: featviz / bare = {r['ratio'][what]:.2f}x (target >= {r['target']}x: {met})")


if __name__ == "__main__":
    main()
