"""featviz.eval.probe: the logistic-regression probe, its C selection, and the digits baseline."""

from __future__ import annotations

import numpy as np
import pytest

from featviz.errors import DataError
from featviz.eval.probe import linear_probe, run_probe


@pytest.fixture(scope="module")
def digits_result():
    return run_probe(images="digits")


def test_raw_digits_pixels_reach_094(digits_result):
    r = digits_result
    assert r["top1"] >= 0.94, r
    assert r["top5"] >= r["top1"]
    assert r["n_train"] + r["n_val"] == 1797 and r["n_val"] == 360 and r["dim"] == 64
    assert {"top1", "top5", "C"} <= set(r)
    assert r["C"] in [g["C"] for g in r["grid"]]
    assert "raw pixels" in r["protocol"]["features"]


def test_c_selection_equals_a_plain_sklearn_reproduction(digits_result):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target
    tr, va = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    tr, va = np.sort(tr), np.sort(va)
    fit, sel = train_test_split(np.arange(len(tr)), test_size=0.2, stratify=y[tr], random_state=0)
    scores = []
    for c in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0, 10000.0):
        m = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(
            x[tr][fit], y[tr][fit]
        )
        scores.append((m.score(x[tr][sel], y[tr][sel]), -c))
    best = -max(scores)[1]
    final = make_pipeline(StandardScaler(), LogisticRegression(C=best, max_iter=1000)).fit(
        x[tr], y[tr]
    )
    assert digits_result["C"] == best
    assert digits_result["top1"] == pytest.approx(final.score(x[va], y[va]), abs=1e-12)


def test_val_labels_never_choose_c():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.standard_normal(400) > 0).astype(np.int64)
    a = linear_probe(x[:300], y[:300], x[300:], y[300:], cs=(0.01, 1.0, 100.0))
    b = linear_probe(x[:300], y[:300], x[300:], 1 - y[300:], cs=(0.01, 1.0, 100.0))
    assert a.C == b.C and a.grid == b.grid
    assert a.top1 == pytest.approx(1 - b.top1) and a.top1 > 0.75


def test_bad_inputs():
    x = np.ones((20, 4), np.float32)
    y = np.arange(20) % 2
    with pytest.raises(DataError, match="4-d but val features are 2-d"):
        linear_probe(x, y, x[:, :2], y)
    with pytest.raises(DataError, match="at least 2 classes"):
        linear_probe(x, np.zeros(20, np.int64), x, y)
    with pytest.raises(DataError, match="single training row"):
        linear_probe(x, np.r_[np.zeros(19, np.int64), 1], x, y)
    with pytest.raises(DataError, match="positive"):
        linear_probe(x, y, x, y, cs=[0])
