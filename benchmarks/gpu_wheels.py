"""Wheels for running benchmarks/gpu_suite.py on a GPU machine with no internet (this workplace's lent H200).

That machine's Python 3.12 image already holds torch, torchvision, timm, typer, rich, scikit-learn, numba,
matplotlib, opencv and safetensors; what the suite needs beyond them (pytorch-grad-cam, openTSNE, umap-learn and
the ``gpu`` extra's packages, e.g. torchdr) travels as wheels. Run here, from the repository root:

    python benchmarks/gpu_wheels.py          # writes .whl/ (git-ignored), about 22 MB

It pins each package to the version installed here, downloads its manylinux cp312 wheel (or builds a pure-Python
wheel from the sdist), and prints the command to run there (see benchmarks/README.md, "GPU suite").
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ["grad-cam", "ttach", "openTSNE", "umap-learn", "pynndescent"]  # not in the lent machine's image
ON_DEVICE = {"torch", "torchvision", "timm", "numpy", "scikit-learn", "scipy", "numba", "typer", "rich"}
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", *[
    a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]]


def gpu_extra() -> list[str]:
    """The names in pyproject's ``gpu`` extra (empty until the TorchDR backend adds it)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    return [re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0] for req in extras.get("gpu", [])]


def main() -> None:
    out = ROOT / ".whl"
    out.mkdir(exist_ok=True)
    names = [n for n in dict.fromkeys(NEEDED + gpu_extra()) if n.lower() not in ON_DEVICE]
    for name in names:
        try:
            pin = f"{name}=={version(name)}"
        except PackageNotFoundError:
            print(f"{name}: not installed here; install it first (pip install -e .[gpu,test])", file=sys.stderr)
            continue
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              *PLATFORM, "-d", str(out), pin], capture_output=True, text=True)
        if got.returncode:  # an sdist only (pure Python, e.g. grad-cam): build its wheel here
            got = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), pin],
                                 capture_output=True, text=True)
        print(f"{pin}: {'ok' if got.returncode == 0 else 'FAILED ' + got.stderr.strip()[-300:]}")
    size = sum(f.stat().st_size for f in out.glob("*.whl"))
    print(f"{out}: {len(list(out.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB (a device run carries at most 64 MiB)")
    print("there: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && "
          "PYTHONPATH=$PWD:/tmp/site timeout 540 python3 benchmarks/gpu_suite.py --json $OUT/gpu_suite.json")


if __name__ == "__main__":
    main()
