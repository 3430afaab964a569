"""Peak memory (max RSS) of `featviz embed --pixels` then `featviz tsne` on ~200k pixels x 256 dims.

Each command runs in its own process through the real CLI; its peak resident memory is read from
``getrusage`` when it exits. Data: copies of sample_data/seg's 96-px scenes (VOC layout), embedded
with ``resnet18_w32-cifar`` at layer4 (256 channels, stride 8) at ``--image-size`` so that every
image gives (size/8)^2 pixels. Target: <= 4 GB for each step.

    python benchmarks/memory_bench.py [--pixels 200000] [--image-size 192] [--iterations 50]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = """
import atexit, resource, sys
atexit.register(lambda: print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))
from featviz.cli import app
app(sys.argv[1:], standalone_mode=True)
"""


def run(args: list[str]) -> tuple[float, float]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"failed: featviz {' '.join(args)}\n{res.stderr[-3000:]}")
    kb = next(int(ln.split()[1]) for ln in res.stderr.splitlines() if ln.startswith("MAXRSS_KB"))
    return kb / 1024**2, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", type=int, default=200_000)
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--iterations", type=int, default=50, help="t-SNE iterations after early exaggeration")
    args = ap.parse_args()
    per_image = (args.image_size // 8) ** 2
    n_images = math.ceil(args.pixels / per_image)
    src = ROOT / "sample_data" / "seg"
    with tempfile.TemporaryDirectory() as tmp:
        img, msk = Path(tmp) / "img", Path(tmp) / "masks"
        img.mkdir()
        msk.mkdir()
        scenes = sorted((src / "JPEGImages").glob("*.jpg"))
        for i in range(n_images):
            s = scenes[i % len(scenes)]
            shutil.copy(s, img / f"{s.stem}_{i:05d}.jpg")
            shutil.copy(src / "SegmentationClass" / f"{s.stem}.png", msk / f"{s.stem}_{i:05d}.png")
        shutil.copy(src / "classes.txt", msk)
        emb = Path(tmp) / "pix.npz"
        gb_e, t_e = run(["embed", "--arch", "resnet18_w32-cifar", "--images", str(img), "--masks", str(msk),
                         "--pixels", "--layer", "layer4", "--image-size", str(args.image_size), "--batch-size", "32",
                         "--out", str(emb)])
        with __import__("numpy").load(emb, allow_pickle=False) as z:
            n, d = z["features"].shape
        gb_t, t_t = run(["tsne", str(emb), "--out", str(Path(tmp) / "map.png"), "--iterations", str(args.iterations)])
    print(f"{n_images} images -> {n:,} pixels x {d} dims")
    print(f"featviz embed --pixels : peak {gb_e:5.2f} GB, {t_e:6.1f} s")
    print(f"featviz tsne           : peak {gb_t:5.2f} GB, {t_t:6.1f} s  ({args.iterations} iterations after 250 EE)")
    print(f"max peak {max(gb_e, gb_t):.2f} GB (target <= 4 GB)")
    print(json.dumps({"pixels": int(n), "dims": int(d), "embed_peak_gb": gb_e, "tsne_peak_gb": gb_t}))


if __name__ == "__main__":
    main()
