"""Median wall time of `featviz --help` next to `python -c "import torch"` (target: featviz <= 0.3 s).

    python benchmarks/cli_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def median_time(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    py = sys.executable
    rows = [
        ("python -c pass", [py, "-c", "pass"]),
        ("featviz --help", [py, "-m", "featviz", "--help"]),
        ("featviz inspect --help", [py, "-m", "featviz", "inspect", "--help"]),
        ('python -c "import torch"', [py, "-c", "import torch"]),
    ]
    res = {name: median_time(cmd, args.runs) for name, cmd in rows}
    torch_t = res['python -c "import torch"']
    print(f"{'command':28s} {'median s':>9s} {'vs import torch':>16s}")
    for name, t in res.items():
        print(f"{name:28s} {t:9.3f} {t / torch_t:15.2f}x")
    ok = res["featviz --help"] <= 0.3
    print(f"target featviz --help <= 0.300 s: {'met' if ok else 'NOT met'} ({res['featviz --help']:.3f} s)")


if __name__ == "__main__":
    main()
