"""t-SNE maps of embeddings with openTSNE: one map, or one shared map for several files.

No torch here: this reads ``Embeddings`` files and writes coordinates and plots.

What featviz adds around openTSNE (``shared/reference/features-and-apis.md`` §2.2):

- PCA to 50 dimensions first when D > 50 (the kNN search is the cost for wide features);
- exact neighbours up to ``EXACT_KNN_MAX`` points: scikit-learn's multithreaded brute-force search
  on the 50 PCA dimensions beats openTSNE's default Annoy index there (measured on 2 cores: 1.4 s
  vs 8.2 s at 20k, 32 s vs 46 s at 100k) and is exact rather than ~96 % recall;
- the perplexity is clamped, with a warning, when N is too small for it;
- ``seed`` fixes PCA, the neighbour index and the optimisation, so coordinates repeat;
- ``stratified_sample`` keeps class proportions when ``--sample`` thins a file;
- several files share one map: fitted on their union, or fitted on a reference and the others
  placed into it with openTSNE's ``transform``;
- coordinates are saved (``TsneMap.save``) so a plot can be redrawn without refitting.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from featviz.artifacts import Embeddings, check_finite
from featviz.errors import ArtifactError, DataError
from featviz.progress import Progress

log = logging.getLogger(__name__)

MIN_POINTS = 4
PCA_DIM = 50
EXACT_KNN_MAX = 150_000  # above this Annoy's N log N wins over brute force's N^2
THREADS_FROM = 20_000


@dataclass
class TsneParams:
    """openTSNE settings featviz exposes (openTSNE's defaults; ``n_jobs=None`` picks, see ``auto_jobs``)."""

    perplexity: float = 30.0
    seed: int = 0
    n_iter: int = 500
    early_exaggeration_iter: int = 250
    pca_dim: int | None = PCA_DIM
    metric: str = "euclidean"
    neighbors: str = "auto"
    negative_gradient_method: str = "auto"
    n_jobs: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_width(features: np.ndarray, *, what: str = "the features") -> None:
    """A 2-D map needs at least 2 feature dimensions (scikit-learn's PCA initialisation does too).

    Raises:
        DataError: (N, 0) or (N, 1) features.
    """
    if features.ndim != 2 or features.shape[1] < 2:
        raise DataError(f"{what} are {tuple(features.shape)}: a 2-D map needs features of at least 2 dimensions; "
                        "check the embeddings (a score or label column instead of features?)")


def clamp_perplexity(perplexity: float, n: int) -> float:
    """The largest usable perplexity for ``n`` points: below (n - 1) / 3, as openTSNE needs.

    Raises:
        DataError: fewer than ``MIN_POINTS`` points.
    """
    if n < MIN_POINTS:
        raise DataError(f"t-SNE needs at least {MIN_POINTS} points, got {n}; embed more images or pixels")
    limit = (n - 1) / 3.0
    if perplexity >= limit:
        new = max(1.0, np.floor((limit - 1e-6) * 100) / 100)
        log.warning("perplexity %g is too large for %d points; using %g instead (must be < (N-1)/3)",
                    perplexity, n, new)
        return float(new)
    return float(perplexity)


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` row indices keeping each label's share (largest remainder), sorted.

    Every label present keeps at least one row when ``n`` allows it.
    """
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / counts.sum()
    take = np.floor(quota).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    rest = n - take.sum()
    if rest > 0:
        order = np.argsort(-(quota - np.floor(quota)), kind="stable")
        for i in order:
            if rest == 0:
                break
            if take[i] < counts[i]:
                take[i] += 1
                rest -= 1
    while take.sum() > n:  # the at-least-one rule can overshoot: trim the largest classes
        take[np.argmax(take)] -= 1
    idx = [rng.choice(np.flatnonzero(labels == c), size=min(t, cnt), replace=False)
           for c, t, cnt in zip(classes, take, counts) if t > 0]
    return np.sort(np.concatenate(idx))


class _Pca:
    """PCA to ``dim`` components when the data are wider, fitted once and reusable on new rows."""

    def __init__(self, dim: int | None, seed: int):
        self.dim, self.seed, self.model = dim, seed, None

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        if self.dim is None or x.shape[1] <= self.dim or len(x) <= self.dim:
            return np.ascontiguousarray(x, dtype=np.float32)
        from sklearn.decomposition import PCA

        self.model = PCA(n_components=self.dim, random_state=self.seed)
        return self.model.fit_transform(x).astype(np.float32)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return x if self.model is None else self.model.transform(x).astype(np.float32)


def _callbacks(progress: Progress | None, total: int):
    """openTSNE calls back every 50 iterations; advance a progress bar by as many steps."""
    if progress is None:
        return None, lambda: None
    it = iter(progress(range(total)))

    def step(*_args) -> bool:
        for _ in range(50):
            if next(it, None) is None:
                break
        return False

    def finish() -> None:
        for _ in it:
            pass

    return step, finish


def auto_jobs(n: int) -> int:
    """openTSNE threads for ``n`` points: one below ``THREADS_FROM``, else the cores that are idle.

    Below 20k points thread start-up costs more than it saves; above, extra threads only help when
    cores are free: on a busy machine they fight for the same cores (measured on a shared 2-core
    machine: 20k points, 75 s with 2 threads vs 60 s with 1; digits, 3x slower with 2).
    """
    if n < THREADS_FROM:
        return 1
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        busy = 0.0
    jobs = max(1, min(cores, int(cores - busy + 0.5)))
    log.debug("openTSNE threads: %d (%d cores, load %.1f)", jobs, cores, busy)
    return jobs


def _tsne(params: TsneParams, n: int, progress: Progress | None):
    """An openTSNE ``TSNE`` for ``n`` points (``params.perplexity`` already clamped)."""
    from openTSNE import TSNE

    perplexity = params.perplexity
    cb, finish = _callbacks(progress, params.n_iter + params.early_exaggeration_iter)
    neighbors = params.neighbors
    if neighbors == "auto" and n <= EXACT_KNN_MAX:
        neighbors = "exact"
    n_jobs = params.n_jobs if params.n_jobs is not None else auto_jobs(n)
    tsne = TSNE(perplexity=perplexity, n_iter=params.n_iter, early_exaggeration_iter=params.early_exaggeration_iter,
                metric=params.metric, neighbors=neighbors, negative_gradient_method=params.negative_gradient_method,
                n_jobs=n_jobs, random_state=params.seed, callbacks=cb, callbacks_every_iters=50)
    return tsne, perplexity, finish


def fit(features: np.ndarray, params: TsneParams | None = None, *, progress: Progress | None = None) -> np.ndarray:
    """Fit a 2-D openTSNE map of ``features`` (PCA first when wider than ``params.pca_dim``).

    Returns:
        (N, 2) float32 coordinates.

    Raises:
        DataError: fewer than 4 points, or NaN/Inf features.
    """
    params = params or TsneParams()
    x = np.asarray(features, dtype=np.float32)
    check_finite(x)
    check_width(x)
    params = replace(params, perplexity=clamp_perplexity(params.perplexity, len(x)))
    x = _Pca(params.pca_dim, params.seed).fit_transform(x)
    tsne, _, finish = _tsne(params, len(x), progress)
    emb = tsne.fit(x)
    finish()
    return np.asarray(emb, dtype=np.float32)


@dataclass
class TsneMap:
    """A fitted map: coordinates of every point with its label, source file and row.

    Attributes:
        coords: (N, 2) float32.
        labels: (N,) int64, -1 = unknown.
        class_names: label value -> name.
        groups: (N,) int64: which input (panel) each point came from.
        group_names: one name per input.
        rows: (N,) int64: the point's row in its input file.
        info: settings and provenance (perplexity used, PCA, mode, seed, ...).
    """

    coords: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    groups: np.ndarray
    group_names: list[str]
    rows: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def panel(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates and labels of input ``g``."""
        m = self.groups == g
        return self.coords[m], self.labels[m]

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write ``coords.npz`` (allow_pickle=False) atomically."""
        from featviz.outputs import atomic_path, check_writable, to_jsonable

        path = Path(path)
        if path.suffix != ".npz":
            raise DataError(f"--coords must end in .npz, got {path.name!r}")
        check_writable(path, force=force)
        with atomic_path(path, force=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, coords=self.coords, labels=self.labels, class_names=np.array(self.class_names, dtype=str),
                     groups=self.groups, group_names=np.array(self.group_names, dtype=str), rows=self.rows,
                     info=np.array(json.dumps(to_jsonable(self.info))))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TsneMap:
        """Read a coordinates file written by ``save``.

        Raises:
            ArtifactError: missing, unreadable or not a coordinates file.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{str(path)!r} is not a readable coordinates .npz ({e})") from None
        if "coords" not in d or "groups" not in d:
            raise ArtifactError(f"{str(path)!r} has no 'coords'/'groups' arrays; expected `featviz tsne --coords` output")
        return cls(d["coords"], d["labels"], list(d["class_names"]), d["groups"], list(d["group_names"]), d["rows"],
                   json.loads(str(d["info"])) if "info" in d else {})


def _merge_class_names(embs: Sequence[Embeddings]) -> list[str]:
    """One class-name list for several files; they must agree where they overlap."""
    names: list[str] = []
    for e in embs:
        for i, n in enumerate(e.class_names):
            if i < len(names) and names[i] != n:
                raise DataError(f"the inputs disagree on class {i}: {names[i]!r} vs {n!r}; "
                                "embed them with the same labels/classes")
            if i >= len(names):
                names.append(n)
    return names


def shared_map(embs: Sequence[Embeddings], names: Sequence[str] | None = None, *, reference: int | None = None,
               sample: int | None = None, params: TsneParams | None = None,
               progress: Progress | None = None) -> TsneMap:
    """One map for one or several embeddings files.

    Without ``reference`` the map is fitted on the union of all inputs (the symmetric choice:
    every input shapes the map). With ``reference=i`` it is fitted on input ``i`` alone and the
    others are placed into it with openTSNE's ``transform`` (the reference map does not move).

    Args:
        embs: the inputs, all with the same feature width.
        names: a panel name per input.
        reference: index of the input to fit on, or None for the union.
        sample: keep at most this many rows per input, stratified by class (seeded).
        params: openTSNE settings.
        progress: progress bar wrapper.

    Raises:
        DataError: widths differ, too few points, NaN/Inf features.
    """
    params = params or TsneParams()
    names = list(names or [f"input {i}" for i in range(len(embs))])
    if not embs:
        raise DataError("give at least one embeddings file")
    widths = {e.d for e in embs}
    if len(widths) > 1:
        raise DataError(f"the inputs have different feature widths {sorted(widths)}; a shared map needs "
                        "embeddings from the same layer/model width")
    check_width(embs[0].features, what=f"the features of {names[0]}")
    rows = []
    for i, e in enumerate(embs):
        r = stratified_sample(e.labels, sample, params.seed) if sample else np.arange(e.n)
        check_finite(e.features[r], what=f"features of {names[i]}")
        rows.append(r)
    class_names = _merge_class_names(embs)
    groups = np.concatenate([np.full(len(r), i, np.int64) for i, r in enumerate(rows)])
    labels = np.concatenate([e.labels[r] for e, r in zip(embs, rows)])
    all_rows = np.concatenate(rows)
    info: dict[str, Any] = {"params": params.to_dict(), "sample": sample, "inputs": names,
                            "n_per_input": [len(r) for r in rows]}
    pca = _Pca(params.pca_dim, params.seed)
    if reference is None:
        x = np.concatenate([e.features[r] for e, r in zip(embs, rows)])
        params = replace(params, perplexity=clamp_perplexity(params.perplexity, len(x)))
        x = pca.fit_transform(x)
        tsne, perp, finish = _tsne(params, len(x), progress)
        coords = np.asarray(tsne.fit(x), np.float32)
        finish()
        info.update(mode="union", perplexity_used=perp)
    else:
        ref = embs[reference].features[rows[reference]]
        params = replace(params, perplexity=clamp_perplexity(params.perplexity, len(ref)))
        xr = pca.fit_transform(ref)
        tsne, perp, finish = _tsne(params, len(xr), progress)
        emb = tsne.fit(xr)
        finish()
        coords = np.zeros((len(labels), 2), np.float32)
        coords[groups == reference] = np.asarray(emb)
        for i, (e, r) in enumerate(zip(embs, rows)):
            if i == reference:
                continue
            # transform places each new point against the frozen reference map only
            coords[groups == i] = np.asarray(emb.transform(pca.transform(e.features[r])))
        info.update(mode="reference", reference=names[reference], perplexity_used=perp)
    info["pca_dim"] = None if pca.model is None else params.pca_dim
    return TsneMap(coords, labels, class_names, groups, names, all_rows, info)


def leave_one_out_knn_accuracy(coords: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Leave-one-out k-NN class accuracy in a space (majority vote of the k nearest others)."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(coords)
    idx = nn.kneighbors(coords, return_distance=False)[:, 1:]
    votes = labels[idx]
    pred = np.array([np.bincount(v - v.min()).argmax() + v.min() for v in votes])
    return float((pred == labels).mean())


def knn_recall(high: np.ndarray, low: np.ndarray, k: int = 10, *, n_eval: int | None = 5000, seed: int = 0) -> float:
    """Fraction of each point's k high-dimensional neighbours kept among its k map neighbours.

    Kobak & Berens' "KNN" quality; evaluated on ``n_eval`` random query points (all when None).
    """
    from sklearn.neighbors import NearestNeighbors

    q = np.arange(len(high)) if n_eval is None or n_eval >= len(high) else \
        np.random.default_rng(seed).choice(len(high), n_eval, replace=False)
    ih = NearestNeighbors(n_neighbors=k + 1).fit(high).kneighbors(high[q], return_distance=False)[:, 1:]
    il = NearestNeighbors(n_neighbors=k + 1).fit(low).kneighbors(low[q], return_distance=False)[:, 1:]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ih, il)]))
