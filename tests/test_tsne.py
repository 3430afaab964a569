"""featviz tsne: map quality vs scikit-learn, seeds, perplexity clamp, sampling, shared maps, plots."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from featviz.errors import DataError
from featviz.io.artifacts import Embeddings
from featviz.maps import plotting, quality
from featviz.maps import projection as tsne
from featviz.maps.neighbors import NeighborSearch

FAST = tsne.TsneParams(n_iter=150, early_exaggeration_iter=100, seed=0)


def _blobs(n_per: int, d: int, k: int = 4, seed: int = 0, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n_per, d)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


def test_digits_map_is_as_good_as_sklearn():
    """Raw-pixel digits: 10-NN class accuracy in the 2-D map >= scikit-learn TSNE's - 0.01."""
    from sklearn.datasets import load_digits
    from sklearn.manifold import TSNE

    d = load_digits()
    idx = tsne.stratified_sample(d.target, 700, seed=0)
    x, y = d.data[idx].astype(np.float32), d.target[idx]
    ours = quality.leave_one_out_knn_accuracy(tsne.fit(x, tsne.TsneParams(seed=0)), y)
    ref = quality.leave_one_out_knn_accuracy(TSNE(random_state=0, n_jobs=1).fit_transform(x), y)
    assert ours >= ref - 0.01, (ours, ref)
    assert ours > 0.9


def test_seed_gives_identical_coordinates():
    x, _ = _blobs(40, 20)
    a, b = tsne.fit(x, FAST), tsne.fit(x, FAST)
    c = tsne.fit(x, tsne.TsneParams(n_iter=150, early_exaggeration_iter=100, seed=1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_perplexity_is_clamped_with_a_warning(caplog):
    x, _ = _blobs(3, 5)  # 12 points: perplexity must be < 11/3
    with caplog.at_level(logging.WARNING, logger="featviz.maps.projection"):
        c = tsne.fit(x, FAST)
    assert c.shape == (12, 2) and np.isfinite(c).all()
    assert any("perplexity 30 is too large for 12 points" in r.message for r in caplog.records)


def test_too_few_points_and_nan_are_refused():
    with pytest.raises(DataError, match="at least 4 points"):
        tsne.fit(np.zeros((3, 5), np.float32))
    x, _ = _blobs(10, 5)
    x[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        tsne.fit(x)


def test_stratified_sample_keeps_class_shares():
    labels = np.repeat([0, 1, 2], [700, 250, 50])
    idx = tsne.stratified_sample(labels, 100, seed=0)
    assert len(idx) == 100 and list(np.bincount(labels[idx])) == [70, 25, 5]
    np.testing.assert_array_equal(idx, tsne.stratified_sample(labels, 100, seed=0))
    tiny = tsne.stratified_sample(np.repeat([0, 1, 2], [98, 1, 1]), 5, seed=0)
    assert len(tiny) == 5 and set(np.repeat([0, 1, 2], [98, 1, 1])[tiny]) == {0, 1, 2}


def test_neighbours_are_exact_in_the_full_space():
    """The affinities use each point's true nearest neighbours in the features as given."""
    from sklearn.neighbors import NearestNeighbors

    x, _ = _blobs(100, 20)  # narrow: an exact search
    idx, dist = NeighborSearch(x).neighbors(10)
    ref_d, ref_i = NearestNeighbors(n_neighbors=11).fit(x).kneighbors(x)
    np.testing.assert_array_equal(idx, ref_i[:, 1:])
    np.testing.assert_allclose(dist, ref_d[:, 1:], rtol=1e-4, atol=1e-4)
    # wide, with the long spectrum of network features: PCA-50 candidates, re-ranked in 256-d
    rng = np.random.default_rng(0)
    wide = (rng.normal(size=(2000, 256)) * np.arange(1, 257) ** -0.75).astype(np.float32)
    search = NeighborSearch(wide)
    assert search.refined
    idx, dist = search.neighbors(30)
    ref = NearestNeighbors(n_neighbors=31).fit(wide).kneighbors(wide, return_distance=False)[:, 1:]
    recall = np.mean([len(np.intersect1d(a, b)) / 30 for a, b in zip(idx, ref, strict=True)])
    pca_only = NearestNeighbors(n_neighbors=31).fit(search.z).kneighbors(search.z, return_distance=False)[:, 1:]
    recall_pca = np.mean([len(np.intersect1d(a, b)) / 30 for a, b in zip(pca_only, ref, strict=True)])
    assert recall >= 0.99 and recall_pca < recall - 0.03, (recall, recall_pca)  # the 50 PCs alone lose some
    np.testing.assert_allclose(dist, np.linalg.norm(wide[idx] - wide[:, None], axis=2), rtol=1e-3, atol=1e-4)
    assert (np.diff(dist, axis=1) >= -1e-6).all()  # nearest first
    qi, qd = search.query(wide[:5] + 1e-4, 3)
    assert (qi[:, 0] == np.arange(5)).all()


def test_large_searches_use_a_seeded_faiss_ivf_index_else_annoy_with_a_warning(monkeypatch, caplog):
    """Above ``EXACT_KNN_MAX`` points (lowered here) the candidates come from FAISS IVF: deterministic, never
    the point itself, and re-ranked to nearly the exact neighbours; without FAISS from Annoy, with a warning."""
    from sklearn.neighbors import NearestNeighbors

    from featviz.maps import neighbors

    monkeypatch.setattr(neighbors, "EXACT_KNN_MAX", 1000)
    rng = np.random.default_rng(0)
    wide = (rng.normal(size=(6000, 128)) * np.arange(1, 129) ** -0.75).astype(np.float32)
    search = NeighborSearch(wide, seed=0, n_jobs=2)
    nlist = int(4 * np.sqrt(6000))
    assert search.describe() == (f"candidates from FAISS IVF (approximate: {nlist} lists, {nlist // 16} probed) "
                                 "in 50 PCA dims, re-ranked in all 128")
    idx, dist = search.neighbors(15)
    assert not (idx == np.arange(len(wide))[:, None]).any()
    np.testing.assert_array_equal(idx, NeighborSearch(wide, seed=0, n_jobs=1).neighbors(15)[0])
    ref = NearestNeighbors(n_neighbors=16).fit(wide).kneighbors(wide, return_distance=False)[:, 1:]
    recall = np.mean([len(np.intersect1d(a, b)) / 15 for a, b in zip(idx, ref, strict=True)])
    assert recall > 0.9, recall
    qi, _ = search.query(wide[:5] + 1e-4, 3)
    assert (qi[:, 0] == np.arange(5)).all()
    assert neighbors.describe(6000, 20, 50).startswith("FAISS IVF (approximate")  # narrow: no PCA
    monkeypatch.setattr(neighbors, "_faiss_installed", lambda: False)
    with caplog.at_level(logging.WARNING, logger="featviz.maps.neighbors"):
        annoy = NeighborSearch(wide[:2000], seed=0).neighbors(15)[0]
    assert "Annoy" in caplog.text and "pip install faiss-cpu" in caplog.text
    ref = NearestNeighbors(n_neighbors=16).fit(wide[:2000]).kneighbors(wide[:2000], return_distance=False)[:, 1:]
    assert np.mean([len(np.intersect1d(a, b)) / 15 for a, b in zip(annoy, ref, strict=True)]) > 0.9


def test_ivf_rows_with_too_few_candidates_are_searched_again():
    """A row whose probed lists hold fewer than m points (FAISS's -1) is searched with more lists, never -1."""
    from featviz.maps import neighbors

    z = np.random.default_rng(0).normal(size=(20000, 8)).astype(np.float32)
    index = neighbors._ivf_index(z, seed=0)  # 565 lists of about 35 points, 35 probed
    index.nprobe = 1
    assert (index.search(z[:50], 200)[1] < 0).any()  # one list alone is too small
    idx = neighbors._ivf_search(index, z[:50], 200)
    assert (idx >= 0).all() and all(len(set(row)) == 200 for row in idx) and index.nprobe == 1
    with pytest.raises(DataError, match="20001 neighbours among 20000"):
        neighbors._ivf_search(index, z[:2], 20001)


def test_the_info_names_the_neighbour_search_that_ran():
    x, y = _blobs(30, 80)
    own = tsne.shared_map([Embeddings(x, y)], params=replace(FAST, neighbors="exact"))
    assert own.info["neighbor_search"] == "openTSNE's 'exact' search in all 80 dims"
    umap = tsne.shared_map([Embeddings(x, y), Embeddings(x[:20] + 0.01, y[:20])], reference=0,
                           params=tsne.TsneParams(method="umap", seed=0, n_neighbors=10))
    assert umap.info["neighbors"] == "umap (NNDescent)"  # placing needs umap-learn's own index
    assert umap.info["neighbor_search"] == "umap-learn's NNDescent in all 80 dims"


def test_wide_features_keep_their_map_quality():
    x, y = _blobs(30, 80)
    wide = tsne.shared_map([Embeddings(x, y)], params=FAST)
    assert wide.info["neighbor_search"] == "candidates in 50 PCA dims, re-ranked in all 80"
    assert quality.leave_one_out_knn_accuracy(wide.coords, y) > 0.95


def test_union_map_keeps_groups_and_rows():
    x, y = _blobs(25, 10)
    a, b = Embeddings(x, y, ["a", "b", "c", "d"]), Embeddings(x[::2] + 0.01, y[::2], ["a", "b", "c", "d"])
    m = tsne.shared_map([a, b], ["A", "B"], params=FAST)
    assert m.info["mode"] == "union" and len(m.coords) == 150
    ca, la = m.panel(0)
    cb, lb = m.panel(1)
    np.testing.assert_array_equal(la, y)
    # b's points are a's points nudged: they land beside their twins
    assert np.linalg.norm(cb - ca[::2], axis=1).mean() < 0.1 * np.ptp(m.coords, axis=0).max()


def test_reference_map_does_not_move_and_places_new_points_by_class():
    x, y = _blobs(40, 10, seed=1)
    new, ynew = _blobs(10, 10, seed=1)  # same centres, fresh noise
    new = new + np.random.default_rng(5).normal(scale=0.05, size=new.shape).astype(np.float32)
    m = tsne.shared_map([Embeddings(x, y), Embeddings(new, ynew)], reference=0, params=FAST)
    alone = tsne.fit(x, FAST)
    np.testing.assert_allclose(m.panel(0)[0], alone, rtol=1e-5, atol=1e-4)
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(5).fit(alone, y)
    assert (clf.predict(m.panel(1)[0]) == ynew).mean() > 0.95


def test_mismatched_widths_are_refused():
    with pytest.raises(DataError, match="different feature widths"):
        tsne.shared_map([Embeddings(np.zeros((10, 4)), None), Embeddings(np.zeros((10, 5)), None)])


def test_coords_round_trip(tmp_path):
    x, y = _blobs(10, 6)
    m = tsne.shared_map([Embeddings(x, y, ["w", "x", "y", "z"])], ["only"], params=FAST)
    m.save(tmp_path / "c.npz")
    back = tsne.TsneMap.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.coords, m.coords)
    assert back.class_names == ["w", "x", "y", "z"] and back.info["mode"] == "union"


def test_plots_by_extension_with_shared_axes(tmp_path):
    x, y = _blobs(30, 2)
    panels = [(x, y), (x * 2 + 5, y)]
    for ext, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        p = plotting.scatter_panels(panels, ["a", "b", "c", "d"], tmp_path / f"m{ext}", titles=["one", "two"])
        assert p.read_bytes()[:5].startswith(magic)
    (xl, xh), (yl, yh) = plotting.shared_limits([c for c, _ in panels])
    assert xh - xl == pytest.approx(yh - yl)
    for c, _ in panels:
        assert (c[:, 0] >= xl).all() and (c[:, 0] <= xh).all() and (c[:, 1] >= yl).all() and (c[:, 1] <= yh).all()
    with pytest.raises(DataError, match="must end in"):
        plotting.scatter_panels(panels, [], tmp_path / "m.jpg")


def test_point_style_shrinks_with_n():
    sizes = [plotting.point_style(n) for n in (10, 1_000, 100_000, 10_000_000)]
    assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    assert sizes[0][0] > 20 * sizes[-1][0]


def test_umap_on_digits_keeps_classes_apart():
    """--method umap on digits raw pixels: 10-NN class accuracy of the 2-D map >= 0.95."""
    from sklearn.datasets import load_digits

    d = load_digits()
    c = tsne.fit(d.data.astype(np.float32), tsne.TsneParams(method="umap", seed=0))
    assert c.shape == (len(d.target), 2)
    acc = quality.leave_one_out_knn_accuracy(c, d.target)
    assert acc >= 0.95, acc


def test_umap_is_seeded_and_places_new_points_with_its_transform():
    x, y = _blobs(40, 10, seed=1)
    new, ynew = _blobs(10, 10, seed=1)
    params = tsne.TsneParams(method="umap", seed=0, n_neighbors=10)
    np.testing.assert_array_equal(tsne.fit(x, params), tsne.fit(x, params))  # seeded: the same map twice
    m = tsne.shared_map([Embeddings(x, y), Embeddings(new + 0.01, ynew)], reference=0, params=params)
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(5).fit(m.panel(0)[0], y)
    assert (clf.predict(m.panel(1)[0]) == ynew).mean() > 0.95
    assert m.info["method"] == "umap" and m.info["n_neighbors_used"] == 10


def test_pca_method_is_scikit_learns_pca():
    from sklearn.decomposition import PCA

    x, y = _blobs(30, 80)
    m = tsne.shared_map([Embeddings(x, y)], params=tsne.TsneParams(method="pca", seed=0))
    np.testing.assert_allclose(m.coords, PCA(2, random_state=0).fit_transform(x), rtol=1e-4, atol=1e-4)
    ref = tsne.shared_map([Embeddings(x[:60], y[:60]), Embeddings(x[60:], y[60:])], reference=0,
                          params=tsne.TsneParams(method="pca"))
    p = PCA(2, random_state=0).fit(x[:60])
    np.testing.assert_allclose(ref.panel(1)[0], p.transform(x[60:]), rtol=1e-4, atol=1e-4)
    assert m.info["method"] == "pca" and len(m.info["explained_variance_ratio"]) == 2


def test_unknown_method_is_refused():
    from featviz.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="umap"):
        tsne.TsneParams(method="umpa")


def test_wide_reference_map_places_points_through_the_neighbour_search():
    x, y = _blobs(60, 80, seed=2)
    new, ynew = _blobs(15, 80, seed=2)
    m = tsne.shared_map([Embeddings(x, y), Embeddings(new + 0.01, ynew)], reference=0, params=FAST)
    assert m.info["neighbor_search"].startswith("candidates in 50 PCA dims")
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(5).fit(m.panel(0)[0], y)
    assert (clf.predict(m.panel(1)[0]) == ynew).mean() > 0.95
