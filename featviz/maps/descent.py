"""t-SNE's gradient descent as a torch optimizer, for TorchDR's negative-sampling t-SNE (``--backend torchdr``).

TorchDR fits a map with any torch optimizer (plain ``SGD`` with momentum by default); neither torch nor
TorchDR has the descent t-SNE codes use, so featviz writes it here (about 60 lines). It is openTSNE's
(``openTSNE.tsne.gradient_descent``), with one change for a gradient that is a random estimate:

- early exaggeration: momentum 0.5 and openTSNE's per-coordinate gains (+0.2 while a coordinate keeps
  its direction, x 0.8 when it turns, at least ``min_gain``);
- after it: momentum 0.8 and a fixed gain ``late_gain`` instead of adaptive gains, the learning rate
  falling linearly to 0 over the last ``anneal_iter`` iterations (by default the last half of them);
- every point's step clipped to ``max_step_norm`` (openTSNE's 5); momentum and gains carry over
  from one phase to the next, as in openTSNE.

Why the change: InfoTSNE's repulsion is estimated from a few hundred random points per point, so near
convergence the gradient's sign flips at random and openTSNE's gains shrink to about 1 instead of the
13-26 they reach with the exact gradient (measured at 2k points). The map then stays half as wide as
openTSNE's and its 10-NN class accuracy falls behind (benchmark data, 20k points: 0.413 against openTSNE's
0.622 with TorchDR's SGD, 0.555 with this descent).
A fixed larger gain widens it, and annealing the rate removes the jitter the noise leaves (5k points:
gain 4 without annealing 0.404, with it 0.482; openTSNE 0.480). docs/tsne.md has the measurements.

The learning rate is TorchDR's ``lr="auto"`` (max(N / exaggeration / 4, 50): openTSNE's N / exaggeration
for a loss whose gradient is 4 x openTSNE's). TorchDR builds a new optimizer when early exaggeration ends;
``Schedule`` is shared between the two, so the step count, momentum and gains carry over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Schedule:
    """The iterations of one fit, shared by the optimizers TorchDR builds for its two phases."""

    early_iter: int
    total_iter: int
    late_gain: float = 4.0
    anneal_iter: int | None = None
    early_momentum: float = 0.5
    late_momentum: float = 0.8
    min_gain: float = 0.01
    max_step_norm: float | None = 5.0
    step: int = 0
    buffers: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # id(parameter): (update, gains)

    def rate_factor(self) -> float:
        """1, then falling linearly to 0 over the last ``anneal_iter`` iterations (None: half the late ones)."""
        late = self.total_iter - self.early_iter
        span = late // 2 if self.anneal_iter is None else min(self.anneal_iter, late)
        left = self.total_iter - self.step
        return 1.0 if span <= 0 or left >= span else max(0.0, left / span)


class TsneDescent(torch.optim.Optimizer):
    """Momentum, gains and a clipped step (see the module docstring) on the embedding TorchDR optimises.

    Args:
        params: what TorchDR passes (the embedding).
        lr: the learning rate TorchDR computes for the current phase.
        schedule: the fit's ``Schedule`` (``optimizer_kwargs={"schedule": ...}``).
    """

    def __init__(self, params, lr, *, schedule: Schedule):
        super().__init__(params, {"lr": float(lr)})
        # TorchDR passes the same param-group dicts to the optimizer of each phase, and torch writes an
        # optimizer's defaults into them: the second optimizer would keep the first one's rate (N / 48
        # instead of N / 4). TorchDR's own SGD has this too: its momentum and rate never change phase.
        for group in self.param_groups:
            group["lr"] = float(lr)
        self.schedule = schedule

    @torch.no_grad()
    def step(self, closure=None):
        """One descent step on every parameter with a gradient."""
        s = self.schedule
        early = s.step < s.early_iter
        momentum = s.early_momentum if early else s.late_momentum
        factor = s.rate_factor()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if id(p) not in s.buffers:  # the same tensor in both phases' optimizers
                    s.buffers[id(p)] = (torch.zeros_like(p), torch.ones_like(p))
                update, gains = s.buffers[id(p)]
                if early:
                    same = torch.sign(update) == torch.sign(p.grad)
                    gains.copy_(torch.where(same, gains * 0.8 + s.min_gain, gains + 0.2))
                    gain = gains
                else:
                    gain = s.late_gain
                update.mul_(momentum).sub_(factor * group["lr"] * gain * p.grad)
                if s.max_step_norm is not None and update.dim() == 2:
                    norm = update.norm(dim=1, keepdim=True)
                    update.mul_(torch.clamp(s.max_step_norm / norm.clamp_min(1e-12), max=1.0))
                p.add_(update)
        s.step += 1
