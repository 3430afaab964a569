"""Run every featviz benchmark, each side by side with its peer, and print one table of the results.

    python benchmarks/run_all.py            # moderate sizes: about 15 minutes on 2 CPU cores
    python benchmarks/run_all.py --full     # the sizes the issues name (much longer on a CPU)
    python benchmarks/run_all.py --only cam tsne

Each benchmark is its own script (see benchmarks/README.md); this runner calls them in fresh
processes, keeps their full output in benchmarks/results/<name>.txt, and collects every line that
states a ratio or a target into the summary.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name: (moderate args, full args)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "cli_startup": (["--runs", "9"], ["--runs", "15"]),
    "load_bench": (["--runs", "3"], ["--runs", "5"]),
    "embed_bench": (["--n", "256", "--vit-n", "64"], ["--n", "1024", "--vit-n", "256"]),
    "cam_grid": ([], ["--methods", "gradcam,gradcam++,layercam"]),
    "tsne_bench": (["--sizes", "10000"], []),
    "cam_bench": (["--images", "16"], ["--images", "64", "--score-images", "2"]),
    "cam_faithfulness": (["--photos", "4", "--steps", "10"], ["--photos", "8", "--steps", "20"]),
    "collapse_bench": (["--n", "250000", "--n-exact", "20000"], []),
    "train_bench": (["--repeats", "1"], ["--repeats", "3"]),
    "memory_bench": (["--pixels", "50000"], []),
    "similarity_bench": (["--runs", "1"], ["--runs", "3", "--model", "vits16"]),
    "page_bench": (["--n", "50000", "--large-n", "200000"], []),
}
KEYWORDS = ("target", " x ", "x)", "×", "ratio", "faster", "speed", "peak", "chance")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the sizes named in the issues")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    args = ap.parse_args()
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    summary: list[tuple[str, float, int, list[str]]] = []
    for name, (moderate, full) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(full if args.full else moderate)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
        dt = time.perf_counter() - t
        text = res.stdout + (f"\n[stderr]\n{res.stderr}" if res.returncode else "")
        (results / f"{name}.txt").write_text(f"$ {' '.join(cmd[1:])}\n{text}")
        lines = [ln.strip() for ln in res.stdout.splitlines() if any(k in ln.lower() for k in KEYWORDS)]
        summary.append((name, dt, res.returncode, lines))
        print(res.stdout, flush=True)
        if res.returncode:
            print(f"   failed with exit code {res.returncode}: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    print("\n" + "=" * 100 + "\nSUMMARY (featviz vs its peer; full outputs in benchmarks/results/)\n" + "=" * 100)
    for name, dt, rc, lines in summary:
        print(f"{name}  ({dt:.0f} s{', FAILED' if rc else ''})")
        for ln in lines:
            print(f"    {ln}")


if __name__ == "__main__":
    main()
