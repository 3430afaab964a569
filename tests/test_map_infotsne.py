"""featviz.maps.infotsne: InfoTSNE's gradient in closed form equals TorchDR's autograd of its own loss."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchdr")
pytest.importorskip("faiss")

from featviz.maps.infotsne import NEGATIVE_GROUP, FastInfoTSNE  # noqa: E402


def _reference_loss(model) -> torch.Tensor:
    """InfoTSNE's loss as TorchDR writes it, with each row's negatives its group's draws less the row itself.

    TorchDR's ``_compute_loss`` (early exaggeration x attraction + repulsion_strength x repulsion) with its
    own attraction, and its repulsion ``sum_i logsumexp_j log q_ij / N`` on the rows' (N, m) negatives, a
    row's own index among them masked out (log q = -inf).
    """
    from torchdr.distance import pairwise_distances_indexed
    from torchdr.utils import logsumexp_red

    queries = model.chunk_indices_
    per_row = model.neg_indices_[torch.arange(len(queries)) // model.negative_group]
    d2 = pairwise_distances_indexed(model.embedding_, query_indices=queries, key_indices=per_row,
                                    metric="sqeuclidean")
    log_q = (-(1 + d2).log()).masked_fill(per_row == queries[:, None], float("-inf"))
    repulsion = logsumexp_red(log_q, dim=1).sum() / model.n_samples_in_
    return model.early_exaggeration_coeff_ * model._compute_attractive_loss() + model.repulsion_strength * repulsion


def _autograd_gradient(model) -> torch.Tensor:
    """The reference gradient: ``_reference_loss`` differentiated by autograd, at the model's current state."""
    emb = model.embedding_
    kept, emb.grad = emb.grad, None
    with torch.enable_grad():
        _reference_loss(model).backward()
    grad, emb.grad = emb.grad.clone(), kept
    return grad


def _fit_and_compare(n: int = 700, at=(5, 25), group: int = NEGATIVE_GROUP
                     ) -> list[tuple[int, float, float, torch.Tensor, torch.Tensor]]:
    """Fit random data; at iterations ``at``: iteration, exaggeration, max |difference|, gradient scale, negatives."""
    x = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    model = FastInfoTSNE(perplexity=10, max_iter=30, early_exaggeration_iter=10, n_negatives=50, device="cpu",
                         backend="faiss", random_state=0, verbose=False, negative_group=group)
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


@pytest.mark.parametrize("group, block_pairs, groups", [
    (NEGATIVE_GROUP, None, 3),  # 700 rows: groups of 256, 256 and 188, one block
    (100, 100 * 50, 7),  # a block per group of 100
    (1, None, 700),  # a draw per row, as TorchDR
])
def test_closed_form_gradient_equals_autograd_of_torchdrs_loss(monkeypatch, group, block_pairs, groups):
    """In early exaggeration (x12) and after it, on every point, both ends of each pair moved, self draws left out."""
    import featviz.maps.infotsne as infotsne

    if block_pairs is not None:
        monkeypatch.setattr(infotsne, "BLOCK_PAIRS", (block_pairs, block_pairs))
    seen = _fit_and_compare(group=group)
    assert [s[:2] for s in seen] == [(5, 12), (25, 1)]
    rows = torch.arange(700)
    for _, _, diff, scale, negatives in seen:
        assert scale > 1e-4 and diff <= 1e-5 * scale, (diff, scale)
        assert negatives.shape == (groups, 50)
        assert (negatives[rows // group] == rows[:, None]).any()  # the masking was exercised


def test_negatives_are_drawn_per_group_of_rows_uniformly_and_never_repel_a_row_from_itself():
    """One draw per group of rows, uniform over all points; a row's own draws carry no force on it."""
    model = FastInfoTSNE(n_negatives=20_000, device="cpu", random_state=0)
    model.chunk_indices_ = torch.arange(NEGATIVE_GROUP + 3)
    model.n_samples_in_ = 5
    model.on_training_step_start()
    neg = model.neg_indices_
    assert neg.shape == (2, 20_000)
    for group in neg:
        share = torch.bincount(group.long(), minlength=5).double() / 20_000
        assert torch.allclose(share, torch.full((5,), 0.2, dtype=torch.float64), atol=0.015), share
    # row 0 among two points: all its draws are itself or the other point, and only the other one repels it
    model.n_samples_in_ = 2
    model.chunk_indices_ = torch.arange(2)
    model._placing = False
    model.embedding_ = torch.nn.Parameter(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    model.neg_indices_ = torch.tensor([[0, 0, 1]])
    grad = model._compute_repulsive_gradients()
    q = 0.5  # 1 / (1 + 1): the one real negative of row 0, and the two of row 1 (both point 0)
    on_0 = -2 / 2 * q * q / q * -1.0  # row 0: -2 q^2 (y_0 - y_1) / (N S_0), S_0 = q
    on_1 = -2 / 2 * (2 * q * q) / (2 * q) * 1.0  # row 1: two draws of point 0, S_1 = 2q
    assert torch.allclose(grad, torch.tensor([[on_0 - on_1, 0.0], [on_1 - on_0, 0.0]])), grad


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
