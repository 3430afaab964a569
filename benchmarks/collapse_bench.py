"""Benchmark: featviz collapse metrics vs the reference implementations, side by side.

A. All metrics on 1M × 512 float32 read from an ``.npy`` memmap:
   featviz ``collapse_report`` (one streamed pass + sampled uniformity with CI) against the
   references: lightly's ``std_of_l2_normalized`` formula and RankMe from ``torch.linalg.svdvals``
   on the whole matrix loaded into memory. Targets: featviz ≤ 60 s, peak RSS ≤ 2 GB above the
   mapped file; RankMe within 1e-4 of the SVD.
B. Exact uniformity at 50k × 512: featviz's blocked GEMM against Wang & Isola's
   ``torch.pdist(x).pow(2).mul(-t).exp().mean().log()``. Target ≥ 2× faster at lower peak memory.

Every measurement runs in its own subprocess so that its peak RSS (``os.wait4``) is its own.

    PYTHONPATH=$PWD python benchmarks/collapse_bench.py [--n 1000000] [--d 512] [--n-exact 50000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1024**3
_ARGS: argparse.Namespace


# ------------------------------------------------------------------ workers (run in subprocesses)
def _worker(name: str, path: str, n_exact) -> dict:
    """One measurement; imports happen before the clock starts, and only what the side needs."""
    import numpy as np

    if name == "make":
        make_data(Path(path), *n_exact)
        return {}
    if name.startswith("featviz"):  # featviz's side never imports torch
        from featviz.collapse import collapse_report, uniformity_exact

        t0 = time.perf_counter()
        if name == "featviz_all":
            r = collapse_report(np.load(path, mmap_mode="r"))
            return {"seconds": time.perf_counter() - t0, "std_l2": r.std_l2, "rankme": r.rankme,
                    "effective_rank": r.effective_rank, "alpha_req": r.alpha_req, "uniformity": r.uniformity,
                    "uniformity_ci95": r.uniformity_ci95, "uniformity_pairs": r.uniformity_pairs}
        value = uniformity_exact(np.ascontiguousarray(np.load(path, mmap_mode="r")[:n_exact]))
        return {"seconds": time.perf_counter() - t0, "uniformity": value}
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    if name == "torch_reference_all":
        z = torch.from_numpy(np.load(path))  # the reference needs the matrix in memory
        std = torch.std(F.normalize(z, dim=1), dim=0).mean().item()  # lightly std_of_l2_normalized
        sv = torch.linalg.svdvals(z).double()
        p = sv / sv.sum() + 1e-7
        return {"seconds": time.perf_counter() - t0, "std_l2": std, "rankme": math.exp(-(p * p.log()).sum().item())}
    x = np.ascontiguousarray(np.load(path, mmap_mode="r")[:n_exact])
    if name == "rankme_accuracy":  # float64 SVD is the exact answer; float32 SVD has its own error
        from featviz.collapse import rankme

        sv = torch.linalg.svdvals(torch.from_numpy(x).double())
        p = sv / sv.sum() + 1e-7
        return {"seconds": time.perf_counter() - t0, "featviz": rankme(x),
                "svd_f64": math.exp(-(p * p.log()).sum().item())}
    if name == "pdist_uniformity":
        xt = F.normalize(torch.from_numpy(x), dim=1)
        value = torch.pdist(xt, p=2).pow(2).mul(-2).exp().mean().log().item()  # Wang & Isola, verbatim
        return {"seconds": time.perf_counter() - t0, "uniformity": value}
    raise ValueError(name)


def _run_wait4(name: str, path: Path, n_exact: int, timeout: float) -> dict:
    """Run one worker in a fresh interpreter (its result carries its own peak RSS)."""
    cmd = [sys.executable, __file__, "--worker", name, "--data", str(path), "--n-exact", str(n_exact),
           "--n", str(_ARGS.n), "--d", str(_ARGS.d)]
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, text=True)
        start = time.monotonic()
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                return {"error": f"timed out after {timeout:.0f} s"}
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    if proc.returncode:
        tail = err.strip().splitlines()[-1] if err.strip() else ""
        return {"error": f"exit {proc.returncode} {tail}"}
    return json.loads(out.strip().splitlines()[-1])  # peak_rss_gb: the worker's own VmHWM


# ------------------------------------------------------------------ data
def make_data(path: Path, n: int, d: int, seed: int = 0) -> None:
    """(n, d) float32 with a power-law spectrum and a mean offset, written chunk by chunk."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scales = (np.arange(1, d + 1, dtype=np.float32) ** -0.5)
    offset = rng.standard_normal(d).astype(np.float32) * 0.3
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    step = 65536
    for s in range(0, n, step):
        m = min(step, n - s)
        arr[s:s + m] = rng.standard_normal((m, d), dtype=np.float32) * scales + offset
    arr.flush()
    del arr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--n-exact", type=int, default=50_000)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the .npy (default: a temp dir)")
    ap.add_argument("--skip-reference-all", action="store_true", help="skip the in-memory torch SVD reference")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--only", choices=["A", "B"], help="run one part only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global _ARGS
    _ARGS = args
    if args.worker:
        res = _worker(args.worker, args.data, (args.n, args.d) if args.worker == "make" else args.n_exact)
        res["peak_rss_gb"] = _vm_hwm_gb()
        print(json.dumps(res))
        return

    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    path = Path(tmp.name) / "emb.npy"
    t = time.perf_counter()
    made = _run_wait4("make", path, 0, args.timeout)  # in a subprocess: this process stays small
    if "error" in made:
        sys.exit(f"could not write the data: {made['error']}")
    file_gb = path.stat().st_size / GB
    print(f"data: {args.n:,} × {args.d} float32 memmap, {file_gb:.2f} GB, written in {time.perf_counter() - t:.1f} s")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other processes share "
          f"the cores; compare ratios, not absolute times); python {sys.version.split()[0]}\n", flush=True)

    def show(label: str, r: dict, extra: str = "") -> None:
        if "error" in r:
            print(f"  {label:<34} {r['error']}", flush=True)
        else:
            print(f"  {label:<34} {r['seconds']:8.2f} s   peak RSS {r['peak_rss_gb']:6.2f} GB   "
                  f"(load avg {os.getloadavg()[0]:.1f})   {extra}", flush=True)

    if args.only != "B":
        part_a(args, path, file_gb, show)
    if args.only != "A":
        part_b(args, path, show)
    tmp.cleanup()


def part_a(args, path: Path, file_gb: float, show) -> None:
    """All metrics on the memmap: featviz vs the in-memory torch references."""
    print(f"A. all metrics on {args.n:,} × {args.d} (.npy memmap)")
    fv = _run_wait4("featviz_all", path, args.n_exact, args.timeout)
    show("featviz collapse_report", fv, "" if "error" in fv else
         f"RankMe {fv['rankme']:.4f}  std_l2 {fv['std_l2']:.5f}  uniformity {fv['uniformity']:.4f} "
         + (f"CI95 [{fv['uniformity_ci95'][0]:.4f}, {fv['uniformity_ci95'][1]:.4f}] ({fv['uniformity_pairs']:,} pairs)"
            if fv["uniformity_ci95"] else "(exact)"))
    ref = {"error": "skipped"} if args.skip_reference_all else \
        _run_wait4("torch_reference_all", path, args.n_exact, args.timeout)
    show("torch std + svdvals (in memory)", ref, "" if "error" in ref else
         f"RankMe {ref['rankme']:.4f}  std_l2 {ref['std_l2']:.5f}  "
          f"(no uniformity: pdist needs {args.n**2 * 2 / GB:,.0f} GB)")
    acc = _run_wait4("rankme_accuracy", path, min(args.n, 100_000), args.timeout)
    if "error" not in acc:
        print(f"  RankMe on the first {min(args.n, 100_000):,} rows: featviz {acc['featviz']:.6f}, "
              "float64 torch.linalg.svdvals "
              f"{acc['svd_f64']:.6f}, |Δ| {abs(acc['featviz'] - acc['svd_f64']):.1e} (target ≤ 1e-4)")
    if "error" not in fv:
        above = fv["peak_rss_gb"] - file_gb
        print(f"  featviz: {fv['seconds']:.1f} s (target ≤ 60 s: {'PASS' if fv['seconds'] <= 60 else 'FAIL'}), "
              f"peak RSS {above:.2f} GB above the {file_gb:.2f} GB file "
              f"(target ≤ 2 GB: {'PASS' if above <= 2 else 'FAIL'})")
        if "error" not in ref:
            print(f"  ratios featviz/reference: time {fv['seconds'] / ref['seconds']:.2f}×, "
                  f"peak RSS {fv['peak_rss_gb'] / ref['peak_rss_gb']:.2f}×; "
                  f"|ΔRankMe| vs float32 SVD {abs(fv['rankme'] - ref['rankme']):.2e}, "
                  f"|Δstd_l2| {abs(fv['std_l2'] - ref['std_l2']):.2e}")



def part_b(args, path: Path, show) -> None:
    """Exact uniformity: featviz's blocked GEMM vs torch.pdist."""
    print(f"\nB. exact uniformity on {args.n_exact:,} × {args.d} ({args.n_exact * (args.n_exact - 1) // 2:,} pairs)")
    fu = _run_wait4("featviz_uniformity", path, args.n_exact, args.timeout)
    show("featviz uniformity_exact", fu, "" if "error" in fu else f"value {fu['uniformity']:.7f}")
    need = args.n_exact**2 / 2 * 4 * 2 / GB  # pdist output plus one temporary, float32
    avail = _mem_available_gb()
    if avail < need * 1.3:  # leave room for everything else on the machine
        pu = {"error": f"skipped: torch.pdist needs ≈{need:.1f} GB, only {avail:.1f} GB available"}
    else:
        pu = _run_wait4("pdist_uniformity", path, args.n_exact, args.timeout)
    show("torch.pdist reference", pu, "" if "error" in pu else f"value {pu['uniformity']:.7f}")
    if "error" not in fu and "error" not in pu:
        speed = pu["seconds"] / fu["seconds"]
        print(f"  speed-up {speed:.2f}× (target ≥ 2×: {'PASS' if speed >= 2 else 'FAIL'}), "
              f"peak RSS {fu['peak_rss_gb']:.2f} vs {pu['peak_rss_gb']:.2f} GB "
              f"({fu['peak_rss_gb'] / pu['peak_rss_gb']:.3f}×; lower: "
              f"{'PASS' if fu['peak_rss_gb'] < pu['peak_rss_gb'] else 'FAIL'}), "
              f"|Δ| {abs(fu['uniformity'] - pu['uniformity']):.2e}")


def _vm_hwm_gb() -> float:
    """This process's peak resident set (VmHWM): its own, unlike ru_maxrss, which exec inherits."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


def _mem_available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return float("inf")


if __name__ == "__main__":
    main()
