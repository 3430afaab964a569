"""featviz.maps.infotsne: InfoTSNE's gradient in closed form equals TorchDR's autograd of its own loss."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchdr")
pytest.importorskip("faiss")

from featviz.maps.infotsne import FastInfoTSNE  # noqa: E402


def _autograd_gradient(model) -> torch.Tensor:
    """TorchDR's gradient: ``InfoTSNE._compute_loss`` differentiated by autograd, at the model's current state."""
    emb = model.embedding_
    kept, emb.grad = emb.grad, None
    with torch.enable_grad():
        model._compute_loss().backward()
    grad, emb.grad = emb.grad.clone(), kept
    return grad


def _fit_and_compare(n: int = 400, at=(5, 25)) -> list[tuple[int, float, float, torch.Tensor, torch.Tensor]]:
    """Fit random data; at iterations ``at``: iteration, exaggeration, max |difference|, gradient scale, negatives."""
    x = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    model = FastInfoTSNE(perplexity=10, max_iter=30, early_exaggeration_iter=10, n_negatives=50, device="cpu",
                         backend="faiss", random_state=0, verbose=False)
    seen = []
    end = model.on_training_step_end

    def compare():
        end()
        if int(model.n_iter_) in at:
            ours, theirs = model._compute_gradients(), _autograd_gradient(model)
            seen.append((int(model.n_iter_), model.early_exaggeration_coeff_, (ours - theirs).abs().max().item(),
                         theirs.abs().max().item(), model.neg_indices_.clone()))

    model.on_training_step_end = compare
    model.fit_transform(x)
    return seen


def test_closed_form_gradient_equals_autograd_of_torchdrs_loss():
    """In early exaggeration (x12) and after it, on every point, with both ends of each pair moved."""
    seen = _fit_and_compare()
    assert [s[:2] for s in seen] == [(5, 12), (25, 1)]
    for _, _, diff, scale, _ in seen:
        assert scale > 1e-4 and diff <= 1e-5 * scale, (diff, scale)


def test_negatives_are_uniform_over_the_other_points():
    """TorchDR's sampling with only the point itself excluded: never i, every other point equally likely."""
    model = FastInfoTSNE(n_negatives=20_000, device="cpu", random_state=0)
    model.chunk_indices_ = torch.arange(5)
    model.n_samples_in_ = 5
    model.on_training_step_start()
    neg = model.neg_indices_
    assert neg.shape == (5, 20_000)
    for i in range(5):
        counts = torch.bincount(neg[i].long(), minlength=5)
        assert counts[i] == 0
        others = counts[torch.arange(5) != i].double() / 20_000
        assert torch.allclose(others, torch.full((4,), 0.25, dtype=torch.float64), atol=0.015), others


def test_placing_moves_only_the_new_points():
    """TorchDR's transform with the closed form: new points land among their class, the map stays put."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 8)) * 6
    labels = rng.integers(0, 3, 360)
    x = (centres[labels] + rng.normal(size=(360, 8))).astype(np.float32)
    model = FastInfoTSNE(perplexity=10, max_iter=200, early_exaggeration_iter=50, device="cpu", random_state=0)
    coords = np.array(model.fit_transform(x[:300]))
    placed = np.asarray(model.transform(x[300:], X_train=x[:300]))
    np.testing.assert_array_equal(model.embedding_.detach().numpy(), coords)
    centroids = np.stack([coords[labels[:300] == c].mean(0) for c in range(3)])
    nearest = np.linalg.norm(placed[:, None] - centroids[None], axis=2).argmin(1)
    assert (nearest == labels[300:]).mean() >= 0.95
