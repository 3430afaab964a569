"""2-D maps of embeddings (t-SNE with openTSNE, UMAP, PCA): one map, or one shared map for several files.

No torch here (TorchDR, ``featviz.maps.backends``, imports it when asked for): this reads
``Embeddings`` files and writes coordinates, plots and each map's quality (``featviz.maps.quality``).

What featviz adds around openTSNE (``shared/reference/features-and-apis.md`` §2.2):

- the neighbours behind the affinities are each point's true nearest neighbours in the features as
  given (``NeighborSearch``): for wide features, candidates from an exact search in 50 PCA
  dimensions (a FAISS IVF index above 150k points), re-ranked by the full-dimensional distance
  (99.6 % of the exact 90 neighbours on the benchmark's 256-d features, at about the CPU cost of a
  brute-force search at 20k; see ``NeighborSearch``). featviz used to search the 50 PCs alone (77 % of the
  true neighbours), which is why its maps were worse than scikit-learn's on overlapping classes
  (10-NN class accuracy 0.579 vs 0.625 at 20k; with the true neighbours 0.623). openTSNE's default
  Annoy index finds 75 % of them at 100k x 256 (class accuracy 0.814 vs 0.856 with exact
  neighbours);
- otherwise openTSNE's defaults (250 early-exaggeration + 500 iterations, learning rate N/12 then
  N, PCA initialisation): more iterations, scikit-learn's learning rate or a coarser FFT grid did
  not close the gap or cost accuracy (docs/tsne.md has the measurements);
- threads: one below 20k points, above that the cores idle right now (``backends.idle_cores``);
- ``--backend``: openTSNE / umap-learn on CPU, or TorchDR on CPU or GPU (``featviz.maps.backends``);
- the perplexity is clamped, with a warning, when N is too small for it;
- ``seed`` fixes PCA, the neighbour search and the optimisation, so coordinates repeat;
- ``stratified_sample`` keeps class proportions when ``--sample`` thins a file;
- several files share one map: fitted on their union, or fitted on a reference and the others
  placed into it with openTSNE's (UMAP's, PCA's) ``transform``;
- coordinates are saved (``TsneMap.save``) so a plot can be redrawn without refitting.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import DataError
from featviz.io.artifacts import Embeddings, check_finite
from featviz.io.progress import Progress
from featviz.maps import backends, quality
from featviz.maps.neighbors import PCA_DIM, describe
from featviz.style import PlotStyle

log = logging.getLogger(__name__)

MIN_POINTS = 4


MAP_METHODS = ("tsne", "umap", "pca")
"""The 2-D map methods (``featviz tsne --method``; ``featviz.cli.choices.MapMethod`` names them too)."""


@dataclass
class TsneParams:
    """Map settings: the method and its options (``n_jobs=None`` picks, see ``backends.auto_jobs``).

    ``method`` is ``tsne`` (openTSNE), ``umap`` (umap-learn, ``n_neighbors``/``min_dist``) or
    ``pca`` (scikit-learn, the first two principal components). The t-SNE fields are openTSNE's
    options; ``pca_dim`` is the space featviz's neighbour search draws candidates from before
    re-ranking them by the full-dimensional distance (None: an exact search in all dimensions;
    see ``NeighborSearch``). ``neighbors="auto"`` is that search; another value is openTSNE's.
    ``backend`` and ``device`` say which library fits t-SNE/UMAP where (``featviz.maps.backends.choose``:
    ``auto``, ``opentsne`` on CPU, ``torchdr`` on ``device``).
    """

    perplexity: float = 30.0
    seed: int = 0
    n_iter: int = 500
    early_exaggeration_iter: int = 250
    pca_dim: int | None = PCA_DIM
    metric: str = "euclidean"
    neighbors: str = "auto"
    negative_gradient_method: str = "auto"
    n_jobs: int | None = None
    method: str = "tsne"
    n_neighbors: int = 15
    min_dist: float = 0.1
    backend: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        """Refuse an unknown ``method`` (with a did-you-mean)."""
        if self.method not in MAP_METHODS:
            from featviz.errors import UnknownNameError, did_you_mean

            raise UnknownNameError(f"unknown map method {self.method!r}; expected one of {', '.join(MAP_METHODS)}"
                                   f"{did_you_mean(self.method, MAP_METHODS)}")

    def to_dict(self) -> dict[str, Any]:
        """Every setting, for the map's ``info`` and the coordinates file."""
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
           for c, t, cnt in zip(classes, take, counts, strict=True) if t > 0]
    return np.sort(np.concatenate(idx))



def clamp_neighbors(n_neighbors: int, n: int) -> int:
    """UMAP's ``n_neighbors`` for ``n`` points: at most n - 1 (with a warning)."""
    if n < MIN_POINTS:
        raise DataError(f"a map needs at least {MIN_POINTS} points, got {n}; embed more images or pixels")
    if n_neighbors >= n:
        log.warning("n_neighbors %d is too large for %d points; using %d", n_neighbors, n, n - 1)
        return n - 1
    return n_neighbors


class Projection:
    """One 2-D method behind one interface: ``fit(x)``, then ``place(x_new)``.

    ``fit`` maps the map's points; ``place`` puts other points into the fitted map (openTSNE
    ``transform``, UMAP ``transform``, PCA ``transform``). ``info`` records what was used
    (perplexity/n_neighbors after clamping, PCA).
    """

    def __init__(self, params: TsneParams, progress: Progress | None = None, *, will_place: bool = False):
        """Use ``params``; ``will_place``: other points will be placed (UMAP then keeps its own index)."""
        self.params, self.progress, self.will_place = params, progress, will_place
        self.model: Any = None
        self.info: dict[str, Any] = {"method": params.method}

    def fit(self, features: np.ndarray) -> np.ndarray:
        """(N, 2) float32 coordinates of ``features``.

        Raises:
            DataError: fewer than 4 points.
        """
        p = self.params
        n = len(features)
        x = np.ascontiguousarray(features, np.float32)
        backend, device = backends.choose(p.method, p.backend, p.device)
        self.info.update(backend=backend, device=device)
        if p.method == "tsne":
            perp = clamp_perplexity(p.perplexity, n)
            if backend == "torchdr":
                self.model, coords, used = backends.torchdr_fit(replace(p, perplexity=perp), x, device, self.progress)
                self.info.update(used)
            else:
                self.model = backends.opentsne_fit(replace(p, perplexity=perp), x, self.progress)
                coords = self.model
                self.info["library"] = "openTSNE"
            self.info["perplexity_used"] = perp
        elif p.method == "umap":
            k = clamp_neighbors(p.n_neighbors, n)
            if backend == "torchdr":
                self.model, coords, used = backends.torchdr_fit(replace(p, n_neighbors=k), x, device, self.progress)
            else:
                self.model, coords, used = backends.umap_fit(x, k, p, own_index=self.will_place)
            self.info.update(used, n_neighbors_used=k)
        else:
            if n < MIN_POINTS:
                raise DataError(f"a map needs at least {MIN_POINTS} points, got {n}")
            from sklearn.decomposition import PCA

            self.model = PCA(n_components=2, random_state=p.seed)
            coords = self.model.fit_transform(x)
            self.info["explained_variance_ratio"] = [float(v) for v in self.model.explained_variance_ratio_]
            self.info["library"] = "scikit-learn"
        if p.method != "pca" and backend != "torchdr":
            if p.method == "tsne" and p.neighbors != "auto":
                self.info["neighbor_search"] = f"openTSNE's {p.neighbors!r} search in all {x.shape[1]} dims"
            elif p.method == "umap" and self.info.get("neighbors") != "featviz":
                self.info["neighbor_search"] = f"umap-learn's NNDescent in all {x.shape[1]} dims"
            else:
                self.info["neighbor_search"] = describe(n, x.shape[1], p.pca_dim)
        return np.asarray(coords, np.float32)

    def place(self, features: np.ndarray) -> np.ndarray:
        """(M, 2) coordinates of new rows in the fitted map (the map itself does not move)."""
        x = np.ascontiguousarray(features, np.float32)
        if self.params.method != "tsne" or self.info.get("backend") == "torchdr":
            return np.asarray(self.model.transform(x), np.float32)
        # openTSNE's transform centres the frozen map in place first ((max + min) / 2): undo it for map and points
        centre = (np.max(self.model, axis=0) + np.min(self.model, axis=0)) / 2
        placed = np.asarray(self.model.transform(x)) + centre
        self.model += centre
        return placed.astype(np.float32)


def fit(features: np.ndarray, params: TsneParams | None = None, *, progress: Progress | None = None) -> np.ndarray:
    """Fit a 2-D map of ``features`` (t-SNE by default; ``params.method`` picks UMAP or PCA).

    Returns:
        (N, 2) float32 coordinates.

    Raises:
        DataError: fewer than 4 points, or NaN/Inf features.
    """
    params = params or TsneParams()
    x = np.asarray(features, dtype=np.float32)
    check_finite(x)
    check_width(x)
    return Projection(params, progress).fit(x)


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
        fitted, map_features: which points the map was fitted on, and their features (``maps.placement``).
    """

    coords: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    groups: np.ndarray
    group_names: list[str]
    rows: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    fitted: np.ndarray | None = None
    map_features: np.ndarray | None = None

    def panel(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates and labels of input ``g``."""
        m = self.groups == g
        return self.coords[m], self.labels[m]

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write ``coords.npz`` (allow_pickle=False) atomically, with what placing into the map needs.

        Raises:
            DataError: not a .npz name; OutputExistsError: it exists and ``force`` is False.
        """
        from featviz.maps.mapfile import write_map_file

        return write_map_file(path, self, force=force)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TsneMap:
        """Read a coordinates file written by ``save`` (``featviz.maps.mapfile``).

        Raises:
            ArtifactError: missing, unreadable or not a coordinates file.
        """
        from featviz.maps.mapfile import read_map_file

        return cls(**read_map_file(path))


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
    labels = np.concatenate([e.labels[r] for e, r in zip(embs, rows, strict=True)])
    all_rows = np.concatenate(rows)
    info: dict[str, Any] = {"params": params.to_dict(), "sample": sample, "inputs": names,
                            "n_per_input": [len(r) for r in rows]}
    proj = Projection(params, progress, will_place=reference is not None)
    if reference is None:
        coords = proj.fit(fitted_x := np.concatenate([e.features[r] for e, r in zip(embs, rows, strict=True)]))
        info.update(mode="union")
    else:
        coords = np.zeros((len(labels), 2), np.float32)
        coords[groups == reference] = proj.fit(fitted_x := embs[reference].features[rows[reference]])
        for i, (e, r) in enumerate(zip(embs, rows, strict=True)):
            if i != reference:
                coords[groups == i] = proj.place(e.features[r])
        info.update(mode="reference", reference=names[reference])
    info.update(proj.info)
    fitted = groups == reference if reference is not None else np.ones(len(groups), bool)
    return TsneMap(coords, labels, class_names, groups, names, all_rows, info, fitted, np.asarray(fitted_x, np.float32))


def check_map_outputs(out: str | os.PathLike, *, coords: str | os.PathLike | None = None,
                      html: str | os.PathLike | None = None, force: bool = False) -> None:
    """Refuse bad output names and existing outputs (without ``force``) before any work.

    Raises:
        DataError: a wrong extension; OutputExistsError: an output exists and ``force`` is False.
    """
    from featviz.io.outputs import check_writable
    from featviz.maps import large_page, plotting

    plotting.check_format(out)
    if html is not None and Path(html).suffix.lower() not in (".html", ".htm"):
        raise DataError(f"--html must end in .html, got {Path(html).name!r}")
    if coords is not None and Path(coords).suffix != ".npz":
        raise DataError(f"--coords must end in .npz, got {Path(coords).name!r}")
    for p in (out, coords, html):
        if p is not None:
            check_writable(p, force=force)
    if html is not None:  # and the data folder beside a large page
        large_page.check_data_folder(html, force=force)


def run_map(out: str | os.PathLike, *, files: Sequence[str | os.PathLike] = (),
            embeddings: Sequence[Embeddings] | None = None, names: Sequence[str] | None = None,
            reference: int | None = None, sample: int | None = None, params: TsneParams | None = None,
            coords: str | os.PathLike | None = None, html: str | os.PathLike | None = None,
            image_root: str | os.PathLike | None = None, title: str | None = None,
            drop_nonfinite: bool = False, force: bool = False, progress: Progress | None = None,
            style: PlotStyle | None = None, page: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``featviz tsne`` does once its inputs are known: map, plot, coordinates, HTML page.

    Args:
        out: the plot (.png, .pdf, .svg).
        files: embeddings files (one panel each; several share one map).
        embeddings: already-loaded inputs instead of ``files`` (e.g. embedded end to end).
        names: one panel name per input (default: file stems).
        reference: index of the input to fit on; the others are placed into its map.
        sample: at most this many rows per input, stratified by class.
        params: the method and its settings.
        coords: also save the coordinates here (.npz).
        html: also write the interactive page here (.html, thumbnails from the inputs' images).
        image_root: the folder the inputs' image ids are relative to (for the thumbnails).
        title: figure/page title; the method's name (t-SNE, UMAP, PCA) is always in it
            (``featviz.maps.plotting.map_title``).
        drop_nonfinite: drop NaN/Inf rows instead of failing.
        force: overwrite outputs.
        progress: wraps the fit's iterations (a progress bar).
        style: the plot's palette, point size and opacity (``featviz.style.PlotStyle``).
        page: more settings of the HTML page (``interactive.map_page``'s mode, max_thumbnails, seed, progress).

    Returns:
        What was written and how: paths, method, backend and device, the map's quality
        (``featviz.maps.quality.map_quality``), points per input, the map's info.

    Raises:
        DataError / ArtifactError: bad inputs (see ``shared_map``); OutputExistsError: an output
        exists and ``force`` is False. Every output is checked before any work.
    """
    from featviz.maps import plotting

    params = params or TsneParams()
    style = style or PlotStyle()
    check_map_outputs(out, coords=coords, html=html, force=force)
    if embeddings is None:
        embeddings = [Embeddings.load(f) for f in files]
    embs = list(embeddings)
    if not embs:
        raise DataError("give at least one embeddings file")
    names = list(names or [Path(f).stem for f in files] or [f"input {i}" for i in range(len(embs))])
    if drop_nonfinite:
        embs = [e.subset(np.flatnonzero(check_finite(e.features, drop=True))) for e in embs]
    m = shared_map(embs, names, reference=reference, sample=sample, params=params, progress=progress)
    m.info["quality"] = quality.map_quality(_map_features(m, embs), m.coords, m.labels, seed=params.seed)
    title = plotting.map_title(params, title)
    plotting.scatter_panels([m.panel(g) for g in range(len(embs))], m.class_names, out, titles=names,
                            suptitle=title, force=force, style=style)
    written = {"plot": str(out)}
    if coords is not None:
        m.save(coords, force=force)
        written["coords"] = str(coords)
    if html is not None:
        from featviz.maps import interactive, large_page

        paths = [str(f) for f in files] if files else None
        interactive.map_page(m, embs, html, npz_paths=paths, image_root=image_root, title=title, force=force,
                             palette=style.palette, **(page or {}))
        written.update(html=str(html), **large_page.page_outputs(html, len(m.coords), (page or {}).get("mode")))
    return {"outputs": written, "method": params.method, "backend": m.info.get("backend"),
            "device": m.info.get("device"), "quality": m.info["quality"], "n_per_input": m.info["n_per_input"],
            "inputs": names, "info": m.info, "title": title, "style": style.to_dict()}


def _map_features(m: TsneMap, embs: Sequence[Embeddings]) -> np.ndarray:
    """The input rows of every point of ``m``, in the map's order.

    A map fitted on all its points already holds them (``map_features``, in the map's order); only
    points placed into a reference map are gathered again.
    """
    if m.fitted.all():
        return m.map_features
    return np.concatenate([embs[g].features[m.rows[m.groups == g]] for g in range(len(embs))])

