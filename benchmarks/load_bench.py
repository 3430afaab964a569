"""Time `featviz inspect` on a ResNet-50 checkpoint next to a bare torch.load + load_state_dict.

Both sides run in fresh processes, so each pays its own Python/torch start-up, as a user would.
Target ratio: featviz / bare <= 1.5.

    python benchmarks/load_bench.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = """
import sys, torch, torchvision
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["state_dict"]
sd = {k.removeprefix("module.encoder_q."): v for k, v in sd.items()
      if k.startswith("module.encoder_q.") and ".fc." not in k}
m = torchvision.models.resnet50()
m.fc = torch.nn.Identity()
m.load_state_dict(sd, strict=True)
m.eval()
"""


def make_checkpoint(path: Path) -> None:
    import torch
    import torchvision

    m = torchvision.models.resnet50()
    m.fc = torch.nn.Identity()
    sd = m.state_dict()
    state = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    state.update({"module.encoder_q.fc.0.weight": torch.randn(2048, 2048),
                  "module.encoder_q.fc.0.bias": torch.randn(2048)})
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state}, path)


def timed(cmd: list[str], runs: int) -> float:
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "moco_v2_r50.pth.tar"
        make_checkpoint(ck)
        size = ck.stat().st_size / 2**20
        bare = timed([sys.executable, "-c", BARE, str(ck)], args.runs)
        fv = timed([sys.executable, "-m", "featviz", "inspect", str(ck)], args.runs)
        fvj = timed([sys.executable, "-m", "featviz", "inspect", "--json", str(ck)], args.runs)
    print(f"ResNet-50 MoCo v2-layout checkpoint, {size:.0f} MiB, median of {args.runs} fresh processes")
    print(f"{'bare torch.load + load_state_dict':38s} {bare:7.2f} s  1.00x")
    print(f"{'featviz inspect':38s} {fv:7.2f} s  {fv / bare:.2f}x")
    print(f"{'featviz inspect --json':38s} {fvj:7.2f} s  {fvj / bare:.2f}x")
    print(f"target ratio <= 1.5: {'met' if fv / bare <= 1.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
