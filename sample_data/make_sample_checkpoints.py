"""Make the small official-layout checkpoints bundled for demos and tests (deterministic).

    python sample_data/make_sample_checkpoints.py

checkpoints/moco_v2_tiny.pth.tar  a MoCo v2-layout checkpoint (facebookresearch/moco: 'state_dict' with
                                  module.encoder_q./module.encoder_k., an MLP fc projector, the queue) of a
                                  tiny resnet18_w8-cifar with seeded random weights. It shows layout
                                  detection and safe loading; its features are untrained, and the file says
                                  so (``featviz_random_weights: True``): its sheets' titles lead with
                                  "RANDOM WEIGHTS (untrained)".
"""

from __future__ import annotations

from pathlib import Path

import torch

from featviz.models.architectures import build_backbone
from featviz.models.checkpoints.backbone import RANDOM_WEIGHTS_KEY

HERE = Path(__file__).resolve().parent


def moco_v2_tiny(path: Path) -> None:
    q = build_backbone("resnet18_w8-cifar", seed=0).state_dict()
    k = build_backbone("resnet18_w8-cifar", seed=1).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {f"module.encoder_q.{n}": v for n, v in q.items()}
    state.update({f"module.encoder_k.{n}": v for n, v in k.items()})
    for enc in ("encoder_q", "encoder_k"):
        state[f"module.{enc}.fc.0.weight"] = torch.randn(64, 64, generator=g) * 0.1
        state[f"module.{enc}.fc.0.bias"] = torch.zeros(64)
        state[f"module.{enc}.fc.2.weight"] = torch.randn(32, 64, generator=g) * 0.1
        state[f"module.{enc}.fc.2.bias"] = torch.zeros(32)
    state["module.queue"] = torch.nn.functional.normalize(torch.randn(32, 256, generator=g), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    # RANDOM_WEIGHTS_KEY: the file says its weights are random, so every sheet of it says "RANDOM WEIGHTS"
    torch.save({"epoch": 200, "arch": "resnet18_w8-cifar", "state_dict": state, RANDOM_WEIGHTS_KEY: True}, path)


if __name__ == "__main__":
    out = HERE / "checkpoints"
    out.mkdir(exist_ok=True)
    moco_v2_tiny(out / "moco_v2_tiny.pth.tar")
    print("wrote", out)
