"""New points into a saved map (`featviz tsne new.npz --reference map.npz`): no refit, the map unchanged.

On scikit-learn's digits: the map is fitted on 1,497 digits and saved; 300 held-out digits are
placed into it from the file alone. The map's coordinates must come back bit-exact, the placed
points must land among their class (10-NN accuracy against the map's points >= 0.9 x the map's
own leave-one-out accuracy), and the placement must equal each library's own ``transform`` of
the same fitted map (openTSNE's; umap-learn's, transcribed here from its ``UMAP.transform``).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from featviz.errors import ArtifactError, DataError
from featviz.io.artifacts import Embeddings
from featviz.maps import placement, quality
from featviz.maps import projection as tsne

FAST = dict(n_iter=150, early_exaggeration_iter=100, seed=0)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    held = tsne.stratified_sample(y, 300, seed=1)
    keep = np.setdiff1d(np.arange(len(y)), held)
    names = [str(i) for i in range(10)]
    return Embeddings(x[keep], y[keep], names), Embeddings(x[held], y[held], names)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _placed_accuracy(map_coords, map_labels, placed, labels) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    return float(KNeighborsClassifier(10).fit(map_coords, map_labels).score(placed, labels))


@pytest.fixture(scope="module")
def tsne_map(digits, tmp_path_factory):
    """A t-SNE map of the digits fitted in-process with the held-out digits placed (openTSNE's transform)."""
    fit, held = digits
    m = tsne.shared_map([fit, held], ["map", "held"], reference=0, params=tsne.TsneParams(**FAST))
    path = tmp_path_factory.mktemp("tsne") / "map.npz"
    m.save(path)
    return m, path


def test_tsne_placement_keeps_the_map_and_places_digits_among_their_class(cli, digits, tsne_map, tmp_path):
    fit, held = digits
    m, map_path = tsne_map
    held.save(tmp_path / "held.npz")
    before = _sha(map_path)
    r = cli("tsne", tmp_path / "held.npz", "--reference", map_path, "--out", tmp_path / "placed.png",
            "--coords", tmp_path / "placed.npz", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert _sha(map_path) == before  # the map file is only read
    p = summary["placement"]
    assert p["map_sha256"] == before and p["method"] == "tsne" and p["refit"] is False
    assert "openTSNE" in p["transform"] and p["n_per_input"] == [held.n]
    out = tsne.TsneMap.load(tmp_path / "placed.npz")
    saved = tsne.TsneMap.load(map_path)
    n = len(saved.coords)
    np.testing.assert_array_equal(out.coords[:n], saved.coords)  # bit-exact: the map did not move
    np.testing.assert_array_equal(out.fitted[:n], saved.fitted)
    assert not out.fitted[n:].any() and out.group_names == ["map", "held", "held"]
    placed = out.panel(2)[0]
    in_map = quality.leave_one_out_knn_accuracy(m.panel(0)[0], fit.labels)
    acc = _placed_accuracy(m.panel(0)[0], fit.labels, placed, held.labels)
    assert acc >= 0.9 * in_map, (acc, in_map)
    # the placed points' own quality is stated, as for every map: their layout against their input
    q = quality.map_quality(held.features, placed, held.labels, seed=0)
    assert summary["quality"] == pytest.approx(q) and summary["quality"]["knn_accuracy@10"] > 0.8
    # the same as openTSNE's transform of the map fitted in-process, in the map's own frame
    np.testing.assert_allclose(placed, m.panel(1)[0], atol=1e-3 * np.ptp(m.coords, axis=0).max())
    assert (tmp_path / "placed.png").stat().st_size > 10_000


def _umap_knn_as_umap_learn(ref: np.ndarray, x: np.ndarray, k: int):
    """umap-learn 0.5's ``transform`` neighbours below 4,096 points, transcribed: all distances, then sort.

    The digits' pixels are small integers, so these Euclidean distances are exactly umap-learn's.
    """
    dmat = np.sqrt(((x[:, None, :].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1))
    idx = np.argpartition(dmat, k)[:, :k]
    short = np.take_along_axis(dmat, idx, 1)
    order = np.argsort(short)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(short, order, 1)


def test_umap_placement_is_umap_learns_transform_from_the_saved_map(cli, digits, tmp_path):
    pytest.importorskip("umap")
    fit, held = digits
    params = tsne.TsneParams(method="umap", seed=0)
    proj = tsne.Projection(params, will_place=True)
    coords = proj.fit(fit.features)
    own = proj.place(held.features)  # umap-learn's own transform of the fitted model
    m = tsne.TsneMap(coords, fit.labels, fit.class_names, np.zeros(fit.n, np.int64), ["map"], np.arange(fit.n),
                     {"params": params.to_dict(), **proj.info}, np.ones(fit.n, bool), fit.features)
    m.save(tmp_path / "map.npz")
    saved = placement.load_placeable(tmp_path / "map.npz")
    np.testing.assert_array_equal(saved.coords, coords)
    # given umap-learn's neighbours, the rebuilt transform is umap-learn's, from the file alone
    again = placement.umap_place(saved.map_features, saved.coords, held.features, n_neighbors=15, min_dist=0.1,
                                 seed=0, knn=_umap_knn_as_umap_learn(fit.features, held.features, 15))
    np.testing.assert_array_equal(again, own)  # bit for bit
    # with featviz's neighbour search (the default), through the command
    held.save(tmp_path / "held.npz")
    before = _sha(tmp_path / "map.npz")
    r = cli("tsne", tmp_path / "held.npz", "--reference", tmp_path / "map.npz", "--out", tmp_path / "p.png",
            "--coords", tmp_path / "p.npz", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["placement"]["method"] == "umap" and _sha(tmp_path / "map.npz") == before
    out = tsne.TsneMap.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(out.coords[:fit.n], coords)
    in_map = quality.leave_one_out_knn_accuracy(coords, fit.labels)
    acc = _placed_accuracy(coords, fit.labels, out.panel(1)[0], held.labels)
    assert acc >= 0.9 * in_map, (acc, in_map)


def test_pca_placement_is_pcas_transform_and_a_placed_map_takes_more_points(digits, tmp_path):
    from sklearn.decomposition import PCA

    fit, held = digits
    m = tsne.shared_map([fit], ["map"], params=tsne.TsneParams(method="pca"))
    m.save(tmp_path / "map.npz")
    first = placement.run_placement(tmp_path / "a.png", tmp_path / "map.npz", embeddings=[held.subset(np.arange(150))],
                                    names=["first"], coords=tmp_path / "a.npz")
    ref = PCA(2, random_state=0).fit(fit.features)
    np.testing.assert_allclose(tsne.TsneMap.load(tmp_path / "a.npz").panel(1)[0],
                               ref.transform(held.features[:150]), atol=1e-4)
    # the output is itself a map: placing into it uses the fitted points only, and keeps every saved point
    placement.run_placement(tmp_path / "b.png", tmp_path / "a.npz", embeddings=[held.subset(np.arange(150, 300))],
                            names=["second"], coords=tmp_path / "b.npz")
    b = tsne.TsneMap.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(b.coords[:fit.n + 150], tsne.TsneMap.load(tmp_path / "a.npz").coords)
    np.testing.assert_allclose(b.panel(2)[0], ref.transform(held.features[150:]), atol=1e-4)
    assert [p["inputs"] for p in b.info["placements"]] == [["first"], ["second"]]
    assert first["placement"]["n_fitted"] == fit.n


def test_old_map_files_and_other_widths_are_refused_in_one_line(cli, digits, tmp_path):
    fit, held = digits
    m = tsne.shared_map([fit], ["map"], params=tsne.TsneParams(method="pca"))
    m.save(tmp_path / "map.npz")
    with np.load(tmp_path / "map.npz") as d:  # what featviz wrote before placement: no features
        np.savez(tmp_path / "old.npz", **{k: d[k] for k in d.files if k not in ("fitted", "map_features")})
    held.save(tmp_path / "held.npz")
    r = cli("tsne", tmp_path / "held.npz", "--reference", tmp_path / "old.npz", "--out", tmp_path / "p.png")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "older featviz" in r.output and "--coords" in r.output
    with pytest.raises(ArtifactError, match="older featviz"):
        placement.load_placeable(tmp_path / "old.npz")
    Embeddings(held.features[:, :32], held.labels).save(tmp_path / "narrow.npz")
    r = cli("tsne", tmp_path / "narrow.npz", "--reference", tmp_path / "map.npz", "--out", tmp_path / "p.png")
    assert r.exit_code == 1 and "32-d but the map was made from 64-d" in r.output
    with pytest.raises(DataError, match="same model and layer"):
        placement.place(placement.load_placeable(tmp_path / "map.npz"), held.features[:, :32])
    assert not (tmp_path / "p.png").exists()


def test_options_a_saved_map_cannot_honour_are_named(cli, digits, tmp_path):
    fit, held = digits
    tsne.shared_map([fit], ["map"], params=tsne.TsneParams(method="pca")).save(tmp_path / "map.npz")
    held.save(tmp_path / "held.npz")
    base = ("tsne", tmp_path / "held.npz", "--reference", tmp_path / "map.npz", "--out", tmp_path / "p.png")
    r = cli(*base, "--method", "umap")
    assert r.exit_code == 2 and "is a pca map" in r.output
    r = cli(*base, "--html", tmp_path / "p.html")
    assert r.exit_code == 2 and "--html" in r.output
    r = cli(*base, "--perplexity", "10")
    assert r.exit_code == 0 and "--perplexity 10.0: no effect" in r.output
    r = cli(*base, "--backend", "opentsne", "--force")  # placing runs the map's own CPU transform: named
    assert r.exit_code == 0 and "--backend opentsne: no effect" in r.output


def test_reference_embeddings_file_still_fits_a_map_on_it(cli, digits, tmp_path):
    fit, held = digits
    fit.save(tmp_path / "a.npz")
    held.save(tmp_path / "b.npz")
    r = cli("tsne", tmp_path / "b.npz", "--reference", tmp_path / "a.npz", "--method", "pca", "--out",
            tmp_path / "m.png", "--coords", tmp_path / "m.npz", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["info"]["mode"] == "reference" and s["inputs"] == ["a", "b"] and "placement" not in s
    m = tsne.TsneMap.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(m.fitted, m.groups == 0)  # the new file can take more points
    np.testing.assert_array_equal(m.map_features, fit.features)
