"""LiDAR (Thilak et al., ICLR 2024) against two transcriptions, on fixed arrays.

1. the paper's definition, written directly with torch (per-image loops, matrix powers);
2. stable-pretraining's ``stable_pretraining/callbacks/lidar.py`` (``LiDAR._compute_lidar``, read
   from galilai-group/stable-pretraining), transcribed: unbiased Σ_b / Σ_w, δ·I, Σ_w^{-1/2} by eigh,
   p = (λ + ε)/Σ(λ + ε).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import featviz.collapse as C
from featviz.errors import DataError


def _views(n=40, q=4, d=12, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n, 1, d)) * np.linspace(2.0, 0.05, d)  # an anisotropic spread of images
    return centres + 0.3 * rng.normal(size=(n, q, d)) + offset


def _paper(x: np.ndarray, delta: float, eps: float) -> float:
    """The paper's §3 definition, expectation by expectation, in torch float64."""
    x = torch.from_numpy(x).double()
    n, q, d = x.shape
    mu_x = [x[i].mean(0) for i in range(n)]
    mu = sum(mu_x) / n
    sb = sum(torch.outer(m - mu, m - mu) for m in mu_x) / n
    sw = sum(torch.outer(x[i, j] - mu_x[i], x[i, j] - mu_x[i]) for i in range(n) for j in range(q)) / (n * q)
    sw = sw + delta * torch.eye(d, dtype=torch.float64)
    # the symmetric inverse square root Σ_w^{-1/2}, as the paper writes it
    w, v = torch.linalg.eigh(sw)
    inv_sqrt = v @ torch.diag(w.rsqrt()) @ v.T
    lam = torch.linalg.eigvalsh(inv_sqrt @ sb @ inv_sqrt).clamp_min(0)
    p = lam / lam.abs().sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def _stable_pretraining(x: np.ndarray, delta: float = 1e-4, epsilon: float = 1e-8) -> float:
    """stable-pretraining's LiDAR._compute_lidar, transcribed (embeddings grouped (classes, views, d))."""
    emb = torch.from_numpy(x).double()
    n_cls, spc, d = emb.shape
    class_means = emb.mean(dim=1)
    grand_mean = class_means.mean(dim=0)
    centered_means = class_means - grand_mean.unsqueeze(0)
    sb = (centered_means.T @ centered_means) / (n_cls - 1)
    centered = (emb - class_means.unsqueeze(1).expand_as(emb)).reshape(-1, d)
    sw = (centered.T @ centered) / (n_cls * (spc - 1)) + delta * torch.eye(d, dtype=torch.float64)
    eigvals_w, eigvecs_w = torch.linalg.eigh(sw)
    eigvals_w = torch.clamp(eigvals_w, min=epsilon)
    sw_invsqrt = (eigvecs_w * (1.0 / torch.sqrt(eigvals_w)).unsqueeze(0)) @ eigvecs_w.T
    sig = sw_invsqrt @ sb @ sw_invsqrt
    sig = 0.5 * (sig + sig.T)
    ev = torch.clamp(torch.linalg.eigvalsh(sig), min=0.0) + epsilon
    p = ev / ev.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


@pytest.mark.parametrize("q", [2, 5])
def test_lidar_equals_the_papers_definition(q):
    x = _views(q=q)
    for delta, eps in ((1e-4, 1e-8), (1e-2, 1e-7)):
        assert C.lidar(x, delta=delta, eps=eps) == pytest.approx(_paper(x, delta, eps), rel=1e-9)


@pytest.mark.parametrize("q", [2, 10])
def test_lidar_equals_stable_pretrainings_implementation(q):
    x = _views(n=30, q=q, d=20, seed=1)
    ours = C.lidar(x, estimator="stable-pretraining")
    assert ours == pytest.approx(_stable_pretraining(x), rel=1e-10)
    # the paper's estimator differs from it (sample means vs N − 1, N(Q − 1)): the option is not a no-op
    assert abs(C.lidar(x) - ours) > 1e-6


def test_lidar_inputs_agree_and_resist_a_large_offset():
    x = _views(n=50, q=3, d=8, seed=2)
    as_list = [x[:, j] for j in range(3)]
    assert C.lidar(as_list) == pytest.approx(C.lidar(x), rel=1e-12)
    assert C.lidar(torch.from_numpy(x).float()) == pytest.approx(C.lidar(x), rel=1e-4)
    assert C.lidar(x + 1e4) == pytest.approx(C.lidar(x), rel=1e-6)  # a common offset changes no covariance
    rows = np.arange(0, 50, 2)
    assert C.lidar(x, rows=rows) == pytest.approx(C.lidar(x[rows]), rel=1e-12)


def test_lidar_falls_when_images_collapse_onto_few_directions():
    rng = np.random.default_rng(3)
    healthy = _views(n=200, q=4, d=16, seed=3)
    centres = rng.normal(size=(200, 1, 2)) @ rng.normal(size=(2, 16))  # images spread on 2 directions only
    collapsed = centres + 0.3 * rng.normal(size=(200, 4, 16))
    assert C.lidar(healthy) > 5 * C.lidar(collapsed)
    assert C.lidar(collapsed) < 3.0


def test_lidar_in_the_report_uses_the_two_views():
    x = _views(n=64, q=2, d=10, seed=4)
    rep = C.collapse_report(x[:, 0], x[:, 1])
    assert rep.lidar == pytest.approx(C.lidar(x), rel=1e-12) and rep.lidar_views == 2
    assert C.collapse_report(x[:, 0]).lidar is None
    bad = x[:, 1].copy()
    bad[3] = np.nan
    dropped = C.collapse_report(x[:, 0], bad, drop_nonfinite=True)
    keep = np.setdiff1d(np.arange(64), [3])
    assert dropped.lidar == pytest.approx(C.lidar(x, rows=keep), rel=1e-12)


def test_lidar_refuses_bad_input():
    with pytest.raises(DataError, match="Q ≥ 2"):
        C.lidar(np.zeros((5, 1, 3)))
    with pytest.raises(DataError, match="estimator"):
        C.lidar(_views(), estimator="biased")
    x = _views()
    x[0, 0, 0] = np.inf
    with pytest.raises(DataError, match="NaN or Inf"):
        C.lidar(x)


def test_collapse_views_q_measures_lidar_of_q_views_per_image(cli, sample_dir, one_thread):
    from featviz.collapse import twoview
    from featviz.data.images import labelled_images
    from featviz.models.architectures import build_backbone

    args = ("collapse", "--arch", "resnet18_w16-cifar", "--images", sample_dir / "photos", "--image-size", "32",
            "--device", "cpu", "--batch-size", "8", "--json")
    res = cli(*args, "--views", "4")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["lidar_views"] == 4 and data["n"] == 20
    model = build_backbone("resnet18_w16-cifar", seed=0)
    feats, _ = twoview.two_view_features(model, labelled_images(sample_dir / "photos").items, image_size=32,
                                         batch_size=8, views=4)
    assert len(feats["backbone"]) == 4
    assert data["lidar"] == pytest.approx(C.lidar(list(feats["backbone"])), rel=1e-6)
    two = json.loads(cli(*args).stdout)
    assert two["lidar_views"] == 2 and two["lidar"] != data["lidar"]
    assert cli("collapse", "--watch", sample_dir, "--views", "3").exit_code == 2  # no --images: nothing to view
