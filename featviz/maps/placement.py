"""New points into a map already drawn: ``featviz tsne new.npz --reference map.npz``, with no refit.

The map is the file a previous ``featviz tsne --coords`` wrote (``featviz.maps.mapfile``): its
coordinates, which points it was fitted on, their features and the method's settings. Placing
rebuilds what each method's own ``transform`` needs from that file and leaves the map's
coordinates exactly as saved:

- **t-SNE**: openTSNE's ``TSNEEmbedding.transform`` on an embedding rebuilt from the saved
  coordinates, with the neighbour search of the map's features that its fit used (featviz's
  ``NeighborSearch``, same metric, PCA space and seed) and the map's perplexity. ``transform``
  only asks the affinities for each new point's neighbours among the map's points
  (``Affinities.to_new``), so the map's own affinity matrix is not recomputed. openTSNE's own
  settings for placing apply (perplexity 5, 250 iterations at learning rate 0.1, median
  initialisation); it centres the map at (max + min) / 2 before placing, and the points are
  given back in the saved frame.
- **UMAP**: umap-learn's ``UMAP.transform``, transcribed step by step with umap-learn's own
  functions (``smooth_knn_dist``, ``compute_membership_strengths``, ``init_graph_transform``,
  ``make_epochs_per_sample``, ``optimize_layout_euclidean``), on the saved embedding and the
  map's features, with its ``a``, ``b`` (from ``min_dist``) and ``transform_seed``. No pickled model is
  read. One named deviation: the new points' neighbours come from featviz's search (the true
  nearest neighbours; umap-learn's own is exact below 4,096 map points and NNDescent's
  approximate query above). Given the same neighbours the result equals umap-learn's
  ``transform`` bit for bit (``tests/test_placement.py``).
- **PCA**: scikit-learn's ``PCA(2)`` refitted on the map's features (it is deterministic; the
  refit must reproduce the saved coordinates, or the file is refused), then its ``transform``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import ArtifactError, DataError
from featviz.io.artifacts import Embeddings, check_finite
from featviz.io.progress import Progress
from featviz.maps.backends import auto_jobs, callbacks
from featviz.maps.neighbors import NeighborSearch, _knn_index_class
from featviz.maps.projection import TsneMap, TsneParams, _merge_class_names, stratified_sample
from featviz.style import PlotStyle

TRANSFORMS = {
    "tsne": "openTSNE TSNEEmbedding.transform (perplexity 5, 250 iterations) on the saved map",
    "umap": "umap-learn UMAP.transform, rebuilt from the saved map (featviz's exact neighbour search)",
    "pca": "scikit-learn PCA(2).transform, refitted on the map's features",
}
"""How each method places points into a saved map (the JSON's ``placement.transform``)."""

TSNE_PLACE_ITER = 250  # openTSNE's transform: 0 early-exaggeration + 250 iterations


def load_placeable(path: str | os.PathLike) -> TsneMap:
    """The map in ``path`` (``featviz tsne --coords`` output), checked to carry what placing needs.

    Raises:
        ArtifactError: missing, not a map file, written before placement existed, or inconsistent.
    """
    path = Path(path)
    m = TsneMap.load(path)
    if m.map_features is None or m.fitted is None or "params" not in m.info:
        raise ArtifactError(
            f"{str(path)!r} is a map written by an older featviz: it lacks the map's features, so new points "
            "cannot be placed into it. Make it again with the command that made it plus --coords (e.g. `featviz "
            f"tsne a.npz --coords {path.name} --out map.png`, same --method, --seed and settings: the same seed "
            "gives the same map), then pass that file to --reference")
    if m.fitted.shape != (len(m.coords),) or len(m.map_features) != int(m.fitted.sum()):
        raise ArtifactError(f"{str(path)!r}: {len(m.map_features)} map features for {int(m.fitted.sum())} fitted "
                            "points; the file is damaged: make it again with `featviz tsne --coords`")
    return m


def map_params(m: TsneMap) -> TsneParams:
    """The method and settings the map was made with (unknown keys from other versions are ignored)."""
    known = {f.name for f in dataclasses.fields(TsneParams)}
    return TsneParams(**{k: v for k, v in m.info["params"].items() if k in known})


def place(m: TsneMap, features: np.ndarray, *, what: str = "the new embeddings",
          progress: Progress | None = None) -> np.ndarray:
    """(M, 2) float32 coordinates of ``features`` placed into map ``m`` (``m`` does not change).

    Raises:
        DataError: a feature width other than the map's, or NaN/Inf features.
    """
    x = np.ascontiguousarray(features, np.float32)
    width = m.map_features.shape[1]
    if x.ndim != 2 or x.shape[1] != width:
        raise DataError(f"{what} are {x.shape[-1]}-d but the map was made from {width}-d features; place "
                        "embeddings of the same model and layer (`featviz embed` with the map's --checkpoint/--layer)")
    check_finite(x, what=what)
    p = map_params(m)
    ref = m.coords[m.fitted]
    if p.method == "tsne":
        perp = float(m.info.get("perplexity_used", p.perplexity))
        return tsne_place(m.map_features, ref, x, p, perplexity=perp, progress=progress)
    if p.method == "umap":
        k = int(m.info.get("n_neighbors_used", p.n_neighbors))
        return umap_place(m.map_features, ref, x, n_neighbors=k, min_dist=p.min_dist, seed=p.seed,
                          metric=p.metric, pca_dim=p.pca_dim)
    return pca_place(m.map_features, ref, x, seed=p.seed)


def _query_affinities(index: Any, perplexity: float, n_jobs: int):
    """The openTSNE ``PerplexityBasedNN`` affinities that answer ``to_new`` only (what ``transform`` asks).

    Its constructor would also compute the map's own affinity matrix, which placing never reads; the
    matrix is left empty (openTSNE checks only its shape).
    """
    import scipy.sparse
    from openTSNE import affinity

    class QueryAffinities(affinity.PerplexityBasedNN):
        def __init__(self):  # noqa: D107 - deliberately not the parent's: no affinity matrix of the map
            self.knn_index, self.perplexity, self.n_jobs, self.verbose = index, perplexity, n_jobs, False
            self.P = scipy.sparse.csr_matrix((index.n_samples, index.n_samples))

    return QueryAffinities()


def tsne_place(map_features: np.ndarray, map_coords: np.ndarray, x: np.ndarray, params: TsneParams, *,
               perplexity: float, progress: Progress | None = None) -> np.ndarray:
    """The openTSNE ``transform`` of ``x`` into the t-SNE map ``map_coords`` of ``map_features``."""
    from openTSNE import TSNE, affinity

    n = len(map_features)
    n_jobs = params.n_jobs if params.n_jobs is not None else auto_jobs(n)
    cb, finish = callbacks(progress, TSNE_PLACE_ITER)
    tsne = TSNE(perplexity=perplexity, metric=params.metric, negative_gradient_method=params.negative_gradient_method,
                n_jobs=n_jobs, random_state=params.seed, callbacks=cb, callbacks_every_iters=50)
    if params.neighbors == "auto":  # the search the map's fit used (``projection._tsne_fit``)
        search = NeighborSearch(map_features, metric=params.metric, pca_dim=params.pca_dim, seed=params.seed,
                                n_jobs=n_jobs)
        aff = _query_affinities(_knn_index_class()(search, min(n - 1, int(3 * perplexity))), perplexity, n_jobs)
    else:
        aff = affinity.PerplexityBasedNN(map_features, perplexity=perplexity, method=params.neighbors,
                                         metric=params.metric, n_jobs=n_jobs, random_state=params.seed)
    ref = np.asarray(map_coords, np.float64)
    quiet = logging.getLogger("openTSNE.tsne")  # it warns that an initialisation this wide fits poorly: not a fit
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)
    try:
        embedding = tsne.prepare_initial(affinities=aff, initialization=ref)
    finally:
        quiet.setLevel(level)
    centre = (ref.max(axis=0) + ref.min(axis=0)) / 2  # transform centres the map there first
    placed = np.asarray(embedding.transform(x)) + centre
    finish()
    return placed.astype(np.float32)


def umap_place(map_features: np.ndarray, map_coords: np.ndarray, x: np.ndarray, *, n_neighbors: int,
               min_dist: float, seed: int, metric: str = "euclidean", pca_dim: int | None = None,
               knn: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """umap-learn's ``UMAP.transform`` of ``x`` into the UMAP map ``map_coords`` of ``map_features``.

    The steps of umap-learn 0.5's ``transform`` for a map made with featviz's settings (spread 1,
    local connectivity 1, learning rate 1, repulsion 1, 5 negative samples, ``transform_seed=seed``,
    euclidean output). ``knn``: each new row's (indices, distances) among the map's rows, nearest
    first; default featviz's neighbour search.
    """
    import scipy.sparse

    try:
        from umap.layouts import optimize_layout_euclidean
        from umap.umap_ import (
            INT32_MAX,
            INT32_MIN,
            compute_membership_strengths,
            find_ab_params,
            init_graph_transform,
            make_epochs_per_sample,
            smooth_knn_dist,
        )
    except ImportError:
        from featviz.errors import MissingDependencyError

        raise MissingDependencyError("placing into a UMAP map needs umap-learn: pip install 'featviz[umap]'") from None
    if knn is None:
        knn = NeighborSearch(map_features, metric=metric, pca_dim=pca_dim, seed=seed).query(x, n_neighbors)
    indices, dists = knn
    dists = np.asarray(dists, dtype=np.float32, order="C")
    sigmas, rhos = smooth_knn_dist(dists, float(n_neighbors), local_connectivity=0.0)
    rows, cols, vals, _ = compute_membership_strengths(indices, dists, sigmas, rhos, bipartite=True)
    graph = scipy.sparse.coo_matrix((vals, (rows, cols)), shape=(len(x), len(map_features)))
    csr = graph.tocsr()
    csr.eliminate_zeros()
    ref = np.asarray(map_coords, np.float32)
    embedding = init_graph_transform(csr, ref)
    n_epochs = 100 if graph.shape[0] <= 10000 else 30
    graph.data[graph.data < (graph.data.max() / float(n_epochs))] = 0.0
    graph.eliminate_zeros()
    a, b = find_ab_params(1.0, min_dist)
    rng_state = np.random.RandomState(seed).randint(INT32_MIN, INT32_MAX, 3).astype(np.int64)
    placed = optimize_layout_euclidean(embedding, ref.copy(), graph.row, graph.col, n_epochs, graph.shape[1],
                                       make_epochs_per_sample(graph.data, n_epochs), a, b, rng_state, 1.0, 0.25,
                                       5, False)
    return np.asarray(placed, np.float32)


def pca_place(map_features: np.ndarray, map_coords: np.ndarray, x: np.ndarray, *, seed: int) -> np.ndarray:
    """scikit-learn's ``PCA(2)`` refitted on ``map_features`` (it must give ``map_coords``), then ``transform``.

    Raises:
        ArtifactError: the refit does not reproduce the saved coordinates.
    """
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed).fit(map_features)
    again = pca.transform(map_features)
    scale = max(float(np.abs(map_coords).max()), 1e-12)
    if not np.allclose(again, map_coords, rtol=0, atol=1e-4 * scale):
        raise ArtifactError("the map's features do not give its saved PCA coordinates; the map file is damaged: "
                            "make it again with `featviz tsne --method pca --coords`")
    return np.asarray(pca.transform(x), np.float32)


def run_placement(out: str | os.PathLike, map_path: str | os.PathLike, *,
                  files: Sequence[str | os.PathLike] = (), embeddings: Sequence[Embeddings] | None = None,
                  names: Sequence[str] | None = None, sample: int | None = None,
                  coords: str | os.PathLike | None = None, title: str | None = None, drop_nonfinite: bool = False,
                  force: bool = False, progress: Progress | None = None, style: PlotStyle | None = None
                  ) -> dict[str, Any]:
    """Place embeddings into the saved map ``map_path`` and draw them over it (``featviz tsne --reference MAP``).

    Args:
        out: the plot (.png, .pdf, .svg): the map's points in grey, the placed points coloured by class.
        map_path: a map file from ``featviz tsne --coords``.
        files: embeddings files to place (one panel each).
        embeddings: already-loaded inputs instead of ``files``.
        names: one panel name per input (default: file stems).
        sample: at most this many rows per input, stratified by class (with the map's seed).
        coords: also save the map with the placed points added (.npz; itself a map to place into).
        title: figure title (default: the map's method and settings, and the map's file name).
        drop_nonfinite: drop NaN/Inf rows instead of failing.
        force: overwrite outputs.
        progress: wraps the placement's iterations (t-SNE).
        style: the plot's palette, point size and opacity.

    Returns:
        What was written and how: ``outputs``, ``method``, ``quality`` (of the placed points against
        their input, ``quality.map_quality``), ``n_per_input``, ``inputs``, ``placement``
        (the map file and its SHA-256, the transform, the number of map points), ``info``, ``title``, ``style``.

    Raises:
        ArtifactError: the map file is missing, old or damaged; DataError: bad inputs (feature width,
        class names, NaN/Inf); OutputExistsError: an output exists and ``force`` is False.
    """
    from featviz.io.ownership import sha256
    from featviz.maps import plotting
    from featviz.maps.projection import check_map_outputs

    style = style or PlotStyle()
    check_map_outputs(out, coords=coords, force=force)
    m = load_placeable(map_path)
    params = map_params(m)
    embs = list(embeddings) if embeddings is not None else [Embeddings.load(f) for f in files]
    if not embs:
        raise DataError("give at least one embeddings file to place into the map")
    names = list(names or [Path(f).stem for f in files] or [f"input {i}" for i in range(len(embs))])
    if drop_nonfinite:
        embs = [e.subset(np.flatnonzero(check_finite(e.features, drop=True))) for e in embs]
    rows = [stratified_sample(e.labels, sample, params.seed) if sample else np.arange(e.n) for e in embs]
    placed = [place(m, e.features[r], what=f"the embeddings of {n}", progress=progress)
              for e, r, n in zip(embs, rows, names, strict=True)]
    from featviz.maps.quality import map_quality

    new_x = np.concatenate([e.features[r] for e, r in zip(embs, rows, strict=True)])
    new_y = np.concatenate([e.labels[r] for e, r in zip(embs, rows, strict=True)])
    # the placed points' own quality: their layout against their input, as for any map
    placed_quality = map_quality(new_x, np.concatenate(placed), new_y, seed=params.seed)
    record = {"map": str(map_path), "map_sha256": sha256(Path(map_path)), "method": params.method,
              "transform": TRANSFORMS[params.method], "refit": False, "n_map_points": len(m.coords),
              "n_fitted": int(m.fitted.sum()), "inputs": names, "n_per_input": [len(r) for r in rows]}
    k = len(m.group_names)
    new = TsneMap(np.concatenate([m.coords, *placed]).astype(np.float32),
                  np.concatenate([m.labels, *[e.labels[r] for e, r in zip(embs, rows, strict=True)]]),
                  _merge_class_names([Embeddings(np.zeros((0, 2)), None, m.class_names), *embs]),
                  np.concatenate([m.groups, *[np.full(len(r), k + i, np.int64) for i, r in enumerate(rows)]]),
                  [*m.group_names, *names], np.concatenate([m.rows, *rows]),
                  {**m.info, "placements": [*m.info.get("placements", []), record]},
                  np.concatenate([m.fitted, np.zeros(sum(len(r) for r in rows), bool)]), m.map_features)
    title = plotting.map_title(params, title) if title else \
        f"{plotting.map_title(params)} · placed into {Path(map_path).name}"
    plotting.placement_panels((m.coords, m.labels), [new.panel(k + i) for i in range(len(embs))], new.class_names,
                              out, map_name=Path(map_path).name, titles=names, suptitle=title, force=force,
                              style=style)
    written = {"plot": str(out)}
    if coords is not None:
        new.save(coords, force=force)
        written["coords"] = str(coords)
    return {"outputs": written, "method": params.method, "quality": placed_quality,
            "n_per_input": record["n_per_input"], "inputs": names, "placement": record,
            "info": m.info, "title": title, "style": style.to_dict()}
