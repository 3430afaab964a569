"""`featviz compare`: peak RSS on 50k images × 12 ViT-S layers (CPU), and minibatch CKA against full Gram CKA.

1. Memory. ``--n`` synthetic 32-px PNGs (``--classes`` class folders, so the per-layer k-NN accuracy
   runs too) go through the real CLI in a fresh process, ``featviz compare --arch
   vit_small_patch16_224 --image-size 32 --layers auto`` (12 blocks, class token, 384-d each, patch
   16: a 2×2 patch grid plus the class token, what two shared CPU cores can push through 50k
   images); its peak resident memory is read from ``getrusage`` when it exits. Target: < 3 GB.
   The pooled vectors alone are n × 12 × 384 × 4 bytes (0.92 GB at 50k).
2. Speed. On ``--gram-n`` rows of 12 correlated 384-d layers, the 12 × 12 CKA matrix by featviz's
   ``MinibatchCKA`` (minibatches of 256, every pair from one stack of Gram matrices) against the
   full-Gram CKA of Kornblith et al.'s colab (``gram_linear``, ``center_gram``, ``cka``, each Gram
   matrix centred once); both in this process, one after the other; the ratio is printed, with the
   largest difference of the two estimates (they are different estimators: the minibatch one is
   unbiased per minibatch, the colab's biased on all rows).

    python benchmarks/compare_bench.py [--n 50000] [--classes 10] [--measure cka,mknn,cknna] [--gram-n 4096]
        [--images DIR] [--unlabelled] [--skip-memory] [--skip-speed]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNNER = """
import atexit, resource, sys
atexit.register(lambda: print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))
from featviz.cli import app
app(sys.argv[1:], standalone_mode=True)
"""


def write_images(folder: Path, n: int, classes: int, size: int = 32, seed: int = 0) -> None:
    """``n`` PNGs of coloured blobs, one colour family per class folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    for c in range(max(classes, 1)):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    base = rng.uniform(0, 255, size=(max(classes, 1), 3))
    for i in range(n):
        c = i % max(classes, 1)
        cy, cx = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)[..., None]
        img = (base[c] * blob + rng.uniform(0, 60, size=(size, size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"c{c}" / f"{i:06d}.png")


def peak_rss(args: list[str]) -> tuple[float, float, str]:
    t = time.perf_counter()
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COLUMNS": "120"}
    res = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"failed: featviz {' '.join(args)}\n{res.stderr[-3000:]}")
    kb = next(int(ln.split()[1]) for ln in res.stderr.splitlines() if ln.startswith("MAXRSS_KB"))
    return kb / 1024**2, wall, res.stdout


# ------------------------------------------------------------------ the peer: Kornblith et al.'s colab
def gram_linear(x):
    return x.dot(x.T)


def center_gram(gram):
    gram = gram.copy()
    means = np.mean(gram, 0, dtype=np.float64)
    means -= np.mean(means) / 2
    gram -= means[:, None]
    gram -= means[None, :]
    return gram


def full_gram_matrix(layers: list[np.ndarray]) -> np.ndarray:
    grams = [center_gram(gram_linear(x.astype(np.float64))) for x in layers]
    norms = [np.linalg.norm(g) for g in grams]
    out = np.eye(len(layers))
    for i in range(len(layers)):
        for j in range(i + 1, len(layers)):
            out[i, j] = out[j, i] = grams[i].ravel().dot(grams[j].ravel()) / (norms[i] * norms[j])
    return out


def minibatch_matrix(layers: list[np.ndarray], batch: int = 256) -> np.ndarray:
    from featviz.compare.measures import MinibatchCKA

    acc = MinibatchCKA()
    for i in range(0, len(layers[0]) - batch + 1, batch):
        acc.update([x[i : i + batch] for x in layers])
    return acc.matrix()


def speed(n: int, layers: int = 12, dim: int = 384, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    feats = []
    for _ in range(layers):  # a residual stream: each layer a noisy rotation of the last
        x = (x + 0.5 * np.tanh(x @ rng.normal(size=(dim, dim)).astype(np.float32) / np.sqrt(dim))).astype(np.float32)
        feats.append(x.copy())
    t = time.perf_counter()
    mb = minibatch_matrix(feats)
    t_mb = time.perf_counter() - t
    t = time.perf_counter()
    full = full_gram_matrix(feats)
    t_full = time.perf_counter() - t
    return {
        "n": n,
        "minibatch_s": t_mb,
        "full_gram_s": t_full,
        "ratio": t_full / t_mb,
        "max_abs_diff": float(np.abs(mb - full).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="images for the memory run")
    ap.add_argument("--classes", type=int, default=10, help="class folders (0: unlabelled, no k-NN curve)")
    ap.add_argument("--measure", default="cka,mknn,cknna")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--gram-n", type=int, default=4096, help="rows for the minibatch-vs-full-Gram timing")
    ap.add_argument("--images", type=Path, help="reuse this folder of class subfolders instead of writing --n PNGs")
    ap.add_argument("--unlabelled", action="store_true", help="pass the images as a CSV without labels (no k-NN curve)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    out: dict[str, object] = {}
    if not args.skip_memory:
        with tempfile.TemporaryDirectory() as tmp:
            images = args.images or Path(tmp) / "img"
            if args.images is None:
                t = time.perf_counter()
                write_images(images, args.n, args.classes)
                print(f"wrote {args.n:,} 32-px PNGs in {time.perf_counter() - t:.0f} s", flush=True)
            files = sorted(images.rglob("*.png"))[: args.n]
            if args.unlabelled or args.images is not None:  # exactly --n images; labels only when asked
                csv = Path(tmp) / "images.csv"
                csv.write_text("".join(f"{f},{'' if args.unlabelled else f.parent.name}\n" for f in files))
                images = csv
            gb, wall, _ = peak_rss(
                [
                    "compare",
                    "--arch",
                    "vit_small_patch16_224",
                    "--image-size",
                    "32",
                    "--images",
                    str(images),
                    "--layers",
                    "auto",
                    "--measure",
                    args.measure,
                    "-b",
                    str(args.batch_size),
                    "--device",
                    "cpu",
                    "-o",
                    str(Path(tmp) / "cmp"),
                ]
            )
            with open(Path(tmp) / "cmp" / "compare.json") as f:
                summary = json.load(f)
        out["memory"] = {
            "n": summary["n_images"],
            "layers": len(summary["rows"]),
            "peak_gb": gb,
            "seconds": wall,
            "pooled_gb": summary["n_images"] * sum(summary["models"][0]["dims"]) * 4 / 1024**3,
            "measures": sorted(summary["measures"]),
            "knn_curve": bool(summary["knn"]),
        }
        print(
            f"featviz compare, {summary['n_images']:,} images x {len(summary['rows'])} ViT-S layers "
            f"({args.measure}{', k-NN curve' if summary['knn'] else ''}): peak RSS {gb:.2f} GB "
            f"(pooled vectors {out['memory']['pooled_gb']:.2f} GB), {wall:.0f} s; target < 3 GB: "
            f"{'met' if gb < 3 else 'NOT met'}",
            flush=True,
        )
    if not args.skip_speed:
        sp = speed(args.gram_n)
        out["speed"] = sp
        print(
            f"12 x 12 CKA on {sp['n']:,} rows x 384: minibatch (256) {sp['minibatch_s']:.2f} s, full Gram "
            f"(Kornblith colab) {sp['full_gram_s']:.2f} s: minibatch {sp['ratio']:.1f}x faster; "
            f"largest difference of the estimates {sp['max_abs_diff']:.3f}"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
