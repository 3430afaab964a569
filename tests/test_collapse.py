"""Collapse metrics: known answers, reference formulas, streaming, bad input, CollapseMonitor."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featviz import collapse as C
from featviz.errors import DataError

N, D = 4096, 64


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _rank_k(rng, n, d, k):
    basis = np.linalg.qr(rng.standard_normal((d, k)))[0]
    return (rng.standard_normal((n, k)) @ basis.T).astype(np.float32)


# ------------------------------------------------------------------ known answers
def test_isotropic_gaussian_std_is_ideal_and_rankme_is_d(rng):
    z = rng.standard_normal((N, D)).astype(np.float32)
    r = C.collapse_report(z)
    assert r.std_l2_ideal == pytest.approx(1 / math.sqrt(D))
    assert r.std_l2 == pytest.approx(1 / math.sqrt(D), rel=0.02)
    assert r.rankme > 0.97 * D and r.rankme <= D + 1e-6
    assert r.effective_rank > 0.95 * D
    assert r.collapse_level < 0.02
    assert r.flags() == []


def test_constant_output_has_zero_std_and_rank_one(rng):
    z = np.tile(rng.standard_normal((1, D)), (N, 1)).astype(np.float32)
    r = C.collapse_report(z)
    assert r.std_l2 == pytest.approx(0.0, abs=1e-9)
    assert r.collapse_level == pytest.approx(1.0)
    assert r.rankme == pytest.approx(1.0, abs=1e-3)
    assert r.effective_rank == 0.0  # no variance at all
    assert r.uniformity == pytest.approx(0.0, abs=1e-6)  # every pair at distance 0
    assert any("std_l2" in f for f in r.flags()) and any("dimensional" in f for f in r.flags())


@pytest.mark.parametrize("k", [1, 3, 10])
def test_rank_k_data_has_effective_rank_k(rng, k):
    r = C.collapse_report(_rank_k(rng, N, D, k))
    assert r.effective_rank == pytest.approx(k, rel=0.05)
    assert r.rankme == pytest.approx(k, rel=0.05)
    assert r.singular_values[k] < 1e-4 * r.singular_values[0]  # spectrum drops after rank k


def test_sign_symmetric_rank1_is_flagged_by_ranks_not_by_std(rng):
    z = (rng.standard_normal((N, 1)) * rng.standard_normal((1, D))).astype(np.float32)
    r = C.collapse_report(z)
    assert r.std_l2 > 0.7 * r.std_l2_ideal  # std_l2 alone looks healthy ...
    assert not any("std_l2" in f for f in r.flags())
    assert r.rankme < 1.5 and r.effective_rank < 1.01  # ... the rank metrics are not fooled
    assert any("dimensional collapse" in f for f in r.flags())


def test_reference_table_numbers(rng):
    """The §4 check: power law and mean offset move the metrics in documented directions."""
    iso = rng.standard_normal((8192, 128)).astype(np.float32)
    power = (iso * np.arange(1, 129) ** -1.0).astype(np.float32)  # λ_i ∝ i^-2
    r_iso, r_pow, r_off = (C.collapse_report(z, uniformity_exact_max=0, uniformity_pairs=1000)
                           for z in (iso, power, iso + 3))
    assert r_pow.alpha_req == pytest.approx(2.0, abs=0.1) and r_pow.alpha_req_r2 > 0.99
    assert r_pow.effective_rank == pytest.approx(4.87, abs=0.2)
    assert r_pow.rankme == pytest.approx(46.8, abs=1.0)
    assert r_off.effective_rank == pytest.approx(r_iso.effective_rank, rel=1e-4)  # centred: offset-blind
    assert r_off.rankme == pytest.approx(76.3, abs=1.0)  # uncentred: sees the offset
    assert r_off.std_l2 == pytest.approx(0.0279, abs=0.001)


# ------------------------------------------------------------------ reference formulas
def _ref_align(x, y, alpha=2):  # Wang & Isola 2020, align_uniform/__init__.py
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def _ref_uniform(x, t=2):
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


@pytest.mark.parametrize("n,d", [(2, 3), (37, 8), (300, 16)])
def test_alignment_and_uniformity_match_wang_isola_reference(n, d):
    x = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.3 * torch.randn_like(x), dim=1)
    assert C.alignment(x, y) == pytest.approx(_ref_align(x, y).item(), abs=1e-6)
    assert C.uniformity_exact(x) == pytest.approx(_ref_uniform(x).item(), abs=1e-6)
    assert C.uniformity_exact(x, block=7) == pytest.approx(_ref_uniform(x).item(), abs=1e-6)  # ragged blocks
    rep = C.collapse_report(x, y)
    assert rep.uniformity_exact and rep.alignment == pytest.approx(_ref_align(x, y).item(), abs=1e-6)


def test_float32_tensor_input_is_accepted_and_normalised():
    x = torch.randn(200, 12) * 5  # not normalised: the metric normalises first
    ref = _ref_uniform(F.normalize(x.double(), dim=1)).item()
    assert C.uniformity_exact(x) == pytest.approx(ref, abs=1e-5)


def test_sampled_uniformity_ci_covers_exact_at_50k(rng):
    z = rng.standard_normal((50_000, 8)).astype(np.float32)
    z[:, :2] *= 3  # anisotropic, so the value is not trivially the same everywhere
    exact = C.uniformity_exact(z)
    est = C.uniformity_sampled(z, pairs=200_000, seed=1)
    lo, hi = est.ci95
    assert lo <= exact <= hi and not est.exact
    assert hi - lo < 0.02  # and the interval is informative
    auto = C.uniformity(z, exact_max=10_000, pairs=10_000)
    assert not auto.exact and auto.pairs == 10_000


def test_rankme_matches_svd_and_streaming_matches_one_shot(rng, monkeypatch):
    z = (rng.standard_normal((3000, 40)) * np.linspace(3, 0.1, 40) + 0.5).astype(np.float32)
    sv = torch.linalg.svdvals(torch.from_numpy(z).double()).numpy()
    p = sv / sv.sum() + 1e-7
    assert C.rankme(z) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), abs=1e-4)
    whole = C.collapse_report(z, z[::-1].copy()).to_dict()
    monkeypatch.setattr(C.metrics, "_CHUNK_ELEMS", 40 * 7)  # 7-row chunks
    chunked = C.collapse_report(z, z[::-1].copy()).to_dict()
    for k in ("std_l2", "rankme", "effective_rank", "alignment", "uniformity", "alpha_req"):
        assert chunked[k] == pytest.approx(whole[k], rel=1e-9, abs=1e-12), k
    ref = torch.std(F.normalize(torch.from_numpy(z).double(), dim=1), dim=0).mean().item()
    assert C.std_l2(z) == pytest.approx(ref, abs=1e-9)


def test_memmap_input(tmp_path, rng):
    arr = rng.standard_normal((5000, 32)).astype(np.float32)
    np.save(tmp_path / "z.npy", arr)
    mm = np.load(tmp_path / "z.npy", mmap_mode="r")
    a = C.collapse_report(mm, uniformity_exact_max=1000, uniformity_pairs=5000).to_dict()
    b = C.collapse_report(arr, uniformity_exact_max=1000, uniformity_pairs=5000).to_dict()
    assert a == b


# ------------------------------------------------------------------ bad input
def test_nonfinite_rows_counted_then_refused_or_dropped(rng):
    z = rng.standard_normal((100, 8)).astype(np.float32)
    z[[3, 50]] = np.nan
    z[7, 2] = np.inf
    with pytest.raises(DataError, match="3 of 100 rows"):
        C.collapse_report(z)
    r = C.collapse_report(z, drop_nonfinite=True)
    assert r.n == 97 and r.n_nonfinite == 3
    clean = np.delete(z, [3, 7, 50], axis=0)
    assert r.uniformity == pytest.approx(C.collapse_report(clean).uniformity, abs=1e-12)
    z2 = z.copy()
    z2[9] = np.nan  # a NaN positive drops its pair
    assert C.collapse_report(z, z2, drop_nonfinite=True).n_nonfinite == 4


@pytest.mark.parametrize("shape,msg", [((10, 1), "D ≥ 2"), ((1, 8), "at least 2 rows"), ((10,), "2-D")])
def test_bad_shapes(shape, msg):
    with pytest.raises(DataError, match=msg):
        C.collapse_report(np.ones(shape, np.float32))


def test_positives_count_mismatch():
    with pytest.raises(DataError, match="positives have shape"):
        C.collapse_report(np.ones((10, 4), np.float32), np.ones((9, 4), np.float32))


def test_all_nonfinite_refused_even_when_dropping():
    with pytest.raises(DataError, match="only 0 of 5 rows are finite"):
        C.collapse_report(np.full((5, 4), np.nan, np.float32), drop_nonfinite=True)


# ------------------------------------------------------------------ monitor
def test_monitor_writes_jsonl_lines_every_n(tmp_path):
    mon = C.CollapseMonitor(tmp_path / "run", every=2)
    out = [mon.update(torch.randn(64, 16), torch.randn(64, 16), step=s, loss=torch.tensor(1.5 - s / 10), lr=0.1)
           for s in range(5)]
    assert [o is None for o in out] == [False, True, False, True, False]
    mon.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["step"] for r in recs[:-1]] == [0, 2, 4] and recs[-1]["event"] == "done"
    for key in ("std_l2", "std_l2_ideal", "collapse_level", "alignment", "uniformity", "rankme",
                "effective_rank", "n", "d", "alpha_req", "loss", "lr", "time"):
        assert key in recs[0], key
    assert recs[1]["loss"] == pytest.approx(1.3)


def test_monitor_survives_nan_batches(tmp_path):
    mon = C.CollapseMonitor(tmp_path)
    z = torch.randn(32, 8)
    z[:4] = float("nan")
    assert mon.update(z, step=0)["n_nonfinite"] == 4
    rec = mon.update(torch.full((8, 8), float("nan")), step=1, loss=float("nan"))
    assert "error" in rec and rec["loss"] is None
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x) for x in lines)  # strict JSON: no NaN tokens


def test_monitor_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "m.jsonl"

    def writer(k):
        for i in range(50):
            C.append_jsonl(path, {"writer": k, "i": i, "pad": "x" * 2000})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(recs) == 200


def test_collapse_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import featviz.collapse as C, numpy as np\n"
            "print(C.collapse_report(np.random.randn(50, 4)).n)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "50"


def test_the_old_lightning_callback_name_points_to_its_successor():
    with pytest.raises(AttributeError, match="featviz.integrations.lightning.FeatvizMonitor"):
        C.CollapseCallback  # noqa: B018
