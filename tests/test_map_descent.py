"""featviz.maps.descent: openTSNE's gradient descent, transcribed, and what featviz changes after early exaggeration."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from featviz.maps.descent import Schedule, TsneDescent  # noqa: E402


def _opentsne_step(y, update, gains, grad, lr, momentum, min_gain=0.01, max_step_norm=5.0):
    """openTSNE's ``gradient_descent.__call__`` update (openTSNE/tsne.py), transcribed line by line."""
    grad_direction_flipped = np.sign(update) != np.sign(grad)
    grad_direction_same = np.invert(grad_direction_flipped)
    gains[grad_direction_flipped] += 0.2
    gains[grad_direction_same] = gains[grad_direction_same] * 0.8 + min_gain
    update = momentum * update - lr * gains * grad
    norms = np.linalg.norm(update, axis=1, keepdims=True)
    mask = norms.squeeze() > max_step_norm
    update[mask] /= norms[mask]
    update[mask] *= max_step_norm
    return y + update, update, gains


def _grads(steps: int, n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, 2)) * (3.0 if i % 3 == 0 else 0.01) for i in range(steps)]


def test_early_exaggeration_is_opentsnes_descent():
    """Momentum 0.5, gains and the step clip equal openTSNE's formula on fixed gradients (some steps clipped)."""
    grads = _grads(12)
    y0 = np.random.default_rng(1).normal(size=(40, 2))
    emb = torch.nn.Parameter(torch.tensor(y0))
    opt = TsneDescent([emb], lr=2.0, schedule=Schedule(early_iter=100, total_iter=200))
    y, update, gains = y0.copy(), np.zeros_like(y0), np.ones_like(y0)
    clipped = 0
    for g in grads:
        emb.grad = torch.tensor(g)
        opt.step()
        y, update, gains = _opentsne_step(y, update, gains, g, lr=2.0, momentum=0.5)
        clipped += int((np.linalg.norm(update, axis=1) >= 5.0 - 1e-9).sum())
        np.testing.assert_allclose(emb.detach().numpy(), y, rtol=1e-12, atol=1e-12)
    assert clipped > 0 and not np.allclose(gains, 1.0)  # both the clip and the gains were exercised


def test_after_early_exaggeration_fixed_gain_annealed_rate_and_state_carried_over():
    """A second optimizer (TorchDR builds one per phase) continues the first's step, momentum and gains.

    After early exaggeration: momentum 0.8, the gain fixed at ``late_gain`` and the rate falling
    linearly to 0, so the last step moves nothing but momentum.
    """
    schedule = Schedule(early_iter=3, total_iter=8, late_gain=4.0, max_step_norm=None, anneal_iter=5)
    emb = torch.nn.Parameter(torch.zeros(5, 2, dtype=torch.float64))
    groups = [{"params": emb}]  # as TorchDR passes them: the same dicts to both phases' optimizers
    grads = _grads(8, n=5)
    opt = TsneDescent(groups, lr=1.0, schedule=schedule)
    y, update, gains = np.zeros((5, 2)), np.zeros((5, 2)), np.ones((5, 2))
    for i, g in enumerate(grads):
        if i == 3:
            opt = TsneDescent(groups, lr=0.5, schedule=schedule)  # the late phase's rate, not the first one's
        emb.grad = torch.tensor(g)
        opt.step()
        if i < 3:
            y, update, gains = _opentsne_step(y, update, gains, g, lr=1.0, momentum=0.5, max_step_norm=np.inf)
        else:
            factor = (8 - i) / 5  # 5 late iterations: 1, 0.8, ..., 0.2
            update = 0.8 * update - factor * 0.5 * 4.0 * g
            y = y + update
        np.testing.assert_allclose(emb.detach().numpy(), y, rtol=1e-12, atol=1e-12)
    assert schedule.step == 8
    assert schedule.rate_factor() == 0.0
    np.testing.assert_allclose(schedule.buffers[id(emb)][1].numpy(), gains)  # gains kept from the early phase


def test_rate_factor():
    s = Schedule(early_iter=250, total_iter=750)  # annealed over the last half of the 500 late iterations
    assert [s.rate_factor() for s.step in (0, 249, 250, 500)] == [1.0, 1.0, 1.0, 1.0]
    assert [s.rate_factor() for s.step in (625, 725, 750)] == [0.5, 0.1, 0.0]
    s = Schedule(early_iter=250, total_iter=750, anneal_iter=100)
    assert [s.rate_factor() for s.step in (600, 650, 700)] == [1.0, 1.0, 0.5]
    s = Schedule(early_iter=10, total_iter=10)  # no late phase: never annealed
    assert s.rate_factor() == 1.0
