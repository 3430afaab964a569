"""Where and with which library a 2-D map is fitted: openTSNE / umap-learn on CPU, or TorchDR on CPU or GPU.

``choose`` turns ``--backend`` and ``--device`` into the pair a map is fitted with; ``opentsne_fit``
and ``umap_fit`` are the CPU libraries (featviz's neighbour search, seeded), ``torchdr_fit`` is
TorchDR (``pip install 'featviz[gpu]'``: torchdr and faiss-cpu, both imported on first use):

- t-SNE is TorchDR's ``InfoTSNE``: the affinities of openTSNE (perplexity-calibrated, on the
  3 x perplexity nearest neighbours) and a Student-t map, with the repulsion estimated from
  ``n_negatives`` random points per point (Damrich et al. 2022) instead of from all N: O(N) per
  iteration on CPU and GPU. Its gradient is computed in closed form (``maps.infotsne.FastInfoTSNE``:
  the same values as TorchDR's autograd, 3-4x faster per iteration on CPU), and it descends with
  ``maps.descent.TsneDescent`` (openTSNE's momentum and gains, a fixed gain and an annealed rate after
  early exaggeration), not TorchDR's SGD. TorchDR's
  ``TSNE`` computes the repulsion from all N^2 pairs (its "exact" path: 2k points x 500 iterations
  took 180 s on a 2-core machine, and 1M points would need a 1M x 1M matrix), so featviz never uses it;
- UMAP is TorchDR's ``UMAP`` (umap-learn's affinities, a, b from ``min_dist``, negative sampling);
- the neighbours: on the GPU, when the installed FAISS build has GPU support, TorchDR's own exact
  FAISS ``Flat`` search in all dimensions; otherwise featviz's ``NeighborSearch``, the one the CPU
  libraries use (``_use_neighbor_search``; at 1M x 256 on 2 cores FAISS's exact search in 256-d had not
  finished after 420 s, nor its IVF index, 1 list in 16 probed, with the affinities after 20 minutes).
  No dense N x N matrix is ever built.

Threads: the CPU libraries and TorchDR on CPU use one thread below ``THREADS_FROM`` points, else
the cores idle right now (``auto_jobs``): on a busy machine extra threads fight for the same cores
(TorchDR on 2k points under a load of 9 on 2 cores: 5.5 s with one torch thread, 62 s with two).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import numpy as np

from featviz.errors import DataError, MissingDependencyError
from featviz.io.progress import Progress
from featviz.maps.neighbors import NeighborSearch, _knn_index_class, _umap_knn

log = logging.getLogger(__name__)

BACKENDS = ("auto", "opentsne", "torchdr")
"""``featviz tsne --backend`` (``featviz.cli.choices.MapBackend`` names them too; a test keeps them in sync)."""

THREADS_FROM = 20_000
INFO_TSNE_NEGATIVES = 300  # TorchDR InfoTSNE's default number of negative samples per point
GPU_INSTALL = "pip install 'featviz[gpu]'"


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            parts = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return parts[3] + (parts[4] if len(parts) > 4 else 0.0), sum(parts[:8])


def idle_cores(window: float = 0.25) -> float:
    """How many of the cores this process may use are idle now (sampled over ``window`` s).

    Measured from /proc/stat while featviz itself sleeps, so its own earlier work does not count
    (the 1-minute load average, the fallback elsewhere, still includes a process that has just
    been busy, e.g. a benchmark that ran another method first).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    a = _cpu_times()
    if a is not None:
        import time

        time.sleep(window)
        b = _cpu_times()
        if b is not None and b[1] > a[1]:
            all_cores = os.cpu_count() or cores
            idle = (b[0] - a[0]) / (b[1] - a[1]) * all_cores
            return float(min(cores, idle))
    try:
        return float(max(0.0, cores - os.getloadavg()[0]))
    except OSError:  # not available on this platform
        return float(cores)


def auto_jobs(n: int) -> int:
    """The CPU threads for ``n`` points: one below ``THREADS_FROM``, else the cores that are idle.

    Below 20k points thread start-up costs more than it saves; above, extra threads only help when
    cores are free: on a busy machine they fight for the same cores (measured on a shared 2-core
    machine: 20k points, 75 s with 2 threads vs 60 s with 1; digits, 3x slower with 2).
    """
    if n < THREADS_FROM:
        return 1
    idle = idle_cores()
    jobs = max(1, int(idle + 0.5))
    log.debug("map threads: %d (%.1f idle cores)", jobs, idle)
    return jobs


def torchdr_installed() -> bool:
    """Whether TorchDR and FAISS can be imported (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torchdr", "faiss"))


def _nvidia_driver() -> bool:
    """Whether an NVIDIA driver is loaded (its /proc entry or a device node), known without torch."""
    import glob

    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


def _cuda_available() -> bool:
    """Whether CUDA is usable.

    Maps read files with no torch: torch is imported only where it already is, or where an NVIDIA
    driver is loaded (without one CUDA cannot be available).
    """
    import sys

    if sys.modules.get("torch") is None and not _nvidia_driver():
        return False
    import torch

    return bool(torch.cuda.is_available())


def require_torchdr() -> None:
    """Refuse, in one line, when TorchDR or FAISS is missing.

    Raises:
        MissingDependencyError: torchdr or faiss cannot be imported.
    """
    missing = [m for m in ("torchdr", "faiss") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"--backend torchdr needs {' and '.join(missing)} (not installed): "
                                     f"{GPU_INSTALL} (or pip install torchdr faiss-cpu), or use --backend opentsne")


def choose(method: str, backend: str = "auto", device: str = "auto") -> tuple[str, str]:
    """The (backend, device) a map of ``method`` is fitted with, from ``--backend`` and ``--device``.

    ``auto`` is TorchDR on the GPU when CUDA is available and TorchDR is installed (with a warning
    that names both choices), else openTSNE (umap-learn for UMAP) on CPU. ``opentsne`` always runs
    on CPU; ``torchdr`` runs on ``device`` (``auto``: CUDA when available, else CPU). PCA is
    scikit-learn's on CPU whatever ``backend`` says, unless it says ``torchdr``.

    Raises:
        DataError: ``torchdr`` with ``method="pca"``, or an unknown backend.
        MissingDependencyError: ``torchdr`` without TorchDR/FAISS installed.
        FeatvizError: ``device`` names a GPU that is not there.
    """
    if backend not in BACKENDS:
        from featviz.errors import UnknownNameError, did_you_mean

        raise UnknownNameError(f"unknown map backend {backend!r}; expected one of {', '.join(BACKENDS)}"
                               f"{did_you_mean(backend, BACKENDS)}")
    if method == "pca":
        if backend == "torchdr":
            raise DataError("--backend torchdr fits t-SNE and UMAP; --method pca is scikit-learn's PCA on CPU "
                            "(drop --backend, or use --method tsne or umap)")
        return "scikit-learn", "cpu"
    cpu_library = "openTSNE" if method == "tsne" else "umap-learn"
    if backend == "auto":
        if device != "cpu" and torchdr_installed() and _cuda_available():
            from featviz.distributed import resolve_device

            where = str(resolve_device(device))
            log.warning("CUDA is available and TorchDR is installed: the %s map is fitted by TorchDR on %s "
                        "(--backend torchdr); --backend opentsne fits it with %s on CPU",
                        "t-SNE" if method == "tsne" else "UMAP", where, cpu_library)
            return "torchdr", where
        if device.startswith("cuda"):
            log.warning("--device %s: the map is fitted by %s on CPU (--backend opentsne), because TorchDR is "
                        "not installed (%s for --backend torchdr on the GPU); --device applies to embedding only",
                        device, cpu_library, GPU_INSTALL)
        return "opentsne", "cpu"
    if backend == "opentsne":
        if device.startswith("cuda"):
            log.warning("--backend opentsne fits the map with %s on CPU; --device %s applies to embedding only "
                        "(--backend torchdr fits the map on the GPU)", cpu_library, device)
        return "opentsne", "cpu"
    require_torchdr()
    from featviz.distributed import resolve_device

    return "torchdr", str(resolve_device(device))


def callbacks(progress: Progress | None, total: int, every: int = 50):
    """(step, finish): ``step`` advances a progress bar by ``every`` iterations per call."""
    if progress is None:
        return None, lambda: None
    it = iter(progress(range(total)))

    def step(*_args) -> bool:
        for _ in range(every):
            if next(it, None) is None:
                break
        return False

    def finish() -> None:
        for _ in it:
            pass

    return step, finish


def opentsne_fit(params: Any, x: np.ndarray, progress: Progress | None):
    """Fit openTSNE on ``x`` (``params.perplexity`` already clamped); returns its ``TSNEEmbedding``.

    With ``neighbors="auto"`` (the default) the affinities come from featviz's ``NeighborSearch``
    through openTSNE's ``PerplexityBasedNN(knn_index=...)``; any other value is openTSNE's own
    method on the features as they are. Everything else is openTSNE's ``TSNE`` with its defaults.
    """
    from openTSNE import TSNE, affinity

    n = len(x)
    cb, finish = callbacks(progress, params.n_iter + params.early_exaggeration_iter)
    n_jobs = params.n_jobs if params.n_jobs is not None else auto_jobs(n)
    tsne = TSNE(perplexity=params.perplexity, n_iter=params.n_iter,
                early_exaggeration_iter=params.early_exaggeration_iter, metric=params.metric,
                neighbors=params.neighbors if params.neighbors != "auto" else "exact",
                negative_gradient_method=params.negative_gradient_method, n_jobs=n_jobs,
                random_state=params.seed, callbacks=cb, callbacks_every_iters=50)
    if params.neighbors == "auto":
        search = NeighborSearch(x, metric=params.metric, pca_dim=params.pca_dim, seed=params.seed, n_jobs=n_jobs)
        index = _knn_index_class()(search, min(n - 1, int(3 * params.perplexity)))
        aff = affinity.PerplexityBasedNN(perplexity=params.perplexity, knn_index=index, n_jobs=n_jobs,
                                         random_state=params.seed)
        emb = tsne.fit(x, affinities=aff)
    else:
        emb = tsne.fit(x)
    finish()
    return emb


def umap_fit(x: np.ndarray, n_neighbors: int, p: Any, *, own_index: bool = False) -> tuple[Any, np.ndarray, dict]:
    """A seeded umap-learn ``UMAP`` fitted on ``x`` (seeding makes umap single-threaded, as it warns).

    featviz's neighbours (as for t-SNE) unless ``own_index`` (new points will be placed: UMAP's
    transform needs its own NNDescent index). They are also faster for small N (no numba
    compilation of UMAP's neighbour search: digits 7 s vs 24 s of CPU).

    Returns:
        (model, (N, 2) coordinates, what was used).
    """
    import warnings

    try:
        import umap
    except ImportError:
        raise MissingDependencyError("--method umap needs umap-learn: pip install 'featviz[umap]' "
                                     "(or pip install umap-learn)") from None
    knn = None
    if not own_index and p.neighbors == "auto" and p.metric in ("euclidean", "cosine"):
        knn = _umap_knn(NeighborSearch(x, metric=p.metric, pca_dim=p.pca_dim, seed=p.seed), n_neighbors)
    model = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=p.min_dist, metric=p.metric,
                      random_state=p.seed, n_jobs=1, transform_seed=p.seed,
                      precomputed_knn=knn if knn is not None else (None, None, None))
    with warnings.catch_warnings():  # both are known and intended: seeded, and no transform without an index
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        coords = model.fit_transform(x)
    return model, coords, {"neighbors": "featviz" if knn is not None else "umap (NNDescent)",
                           "library": "umap-learn"}


class TorchdrModel:
    """A fitted TorchDR estimator with the ``transform(x_new)`` of openTSNE and umap-learn.

    TorchDR's non-parametric ``transform`` needs the training rows; this keeps them (and the
    cosine normalisation) so a caller places new points as with the CPU libraries.
    """

    def __init__(self, model: Any, x_train: np.ndarray, prep):
        """Wrap ``model`` fitted on ``x_train`` (already prepared by ``prep``)."""
        self.model, self.x_train, self.prep = model, x_train, prep

    def transform(self, x_new: np.ndarray) -> np.ndarray:
        """(M, 2) coordinates of new rows in the fitted map (the map does not move)."""
        return np.asarray(self.model.transform(self.prep(x_new), X_train=self.x_train), np.float32)


def torchdr_fit(params: Any, x: np.ndarray, device: str,
                progress: Progress | None = None) -> tuple[TorchdrModel, np.ndarray, dict[str, Any]]:
    """Fit TorchDR's ``InfoTSNE`` (t-SNE) or ``UMAP`` on ``x`` on ``device``; FAISS neighbours.

    ``params.perplexity`` / ``n_neighbors`` are already clamped. The iterations are openTSNE's:
    ``early_exaggeration_iter`` with exaggeration 12, then ``n_iter``, at TorchDR's automatic learning rate
    with featviz's ``maps.descent.TsneDescent`` (openTSNE's descent, made for a sampled gradient); UMAP
    runs ``n_iter`` epochs (umap-learn's count for large N being 200 and TorchDR's default 1000, 500 is in
    between).

    Returns:
        (model, (N, 2) float32 coordinates, what was used: library, estimator, neighbour search).
    """
    require_torchdr()
    import torch
    import torchdr
    from torchdr.distance import FaissConfig
    from torchdr.utils.faiss_runtime import faiss_gpu_available

    n = len(x)
    on_gpu = device.startswith("cuda")
    faiss_gpu = on_gpu and faiss_gpu_available()
    backend: Any = FaissConfig(device=int(device.split(":")[1])) if faiss_gpu and ":" in device else "faiss"

    def prep(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, np.float32)
        if params.metric == "cosine":  # cosine ranking = Euclidean ranking of unit vectors
            a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        return a

    if params.metric not in ("euclidean", "cosine"):
        raise DataError(f"--backend torchdr supports the euclidean and cosine metrics, got {params.metric!r}")
    xp = prep(x)
    common = dict(device=device, backend=backend, random_state=params.seed, verbose=False)
    if params.method == "tsne":
        total = params.early_exaggeration_iter + params.n_iter
        from featviz.maps.descent import Schedule, TsneDescent
        from featviz.maps.infotsne import FastInfoTSNE

        schedule = Schedule(early_iter=params.early_exaggeration_iter, total_iter=total)
        model = FastInfoTSNE(perplexity=params.perplexity, max_iter=total,
                                 early_exaggeration_iter=params.early_exaggeration_iter,
                                 n_negatives=min(INFO_TSNE_NEGATIVES, n - 1), lr="auto", optimizer=TsneDescent,
                                 optimizer_kwargs={"schedule": schedule}, scheduler=None, min_grad_norm=0.0, **common)
        k = min(n - 1, int(3 * params.perplexity))
        info: dict[str, Any] = {"estimator": f"InfoTSNE (negative sampling, {min(INFO_TSNE_NEGATIVES, n - 1)} "
                                             f"negatives per point, drawn once per {model.negative_group} rows; "
                                             "featviz's closed-form gradient)",
                                "optimizer": f"featviz TsneDescent (openTSNE's momentum and gains, gain "
                                             f"{schedule.late_gain:g} after early exaggeration, rate annealed to 0)"}
    else:
        total = params.n_iter
        model = torchdr.UMAP(n_neighbors=params.n_neighbors, min_dist=params.min_dist, max_iter=total,
                             metric="euclidean", **common)
        k = params.n_neighbors
        info = {"estimator": "UMAP (negative sampling)"}
    jobs = params.n_jobs if params.n_jobs is not None else auto_jobs(n)
    if faiss_gpu:
        search = f"FAISS Flat (exact) in all {x.shape[1]} dims on the GPU"
    else:
        search = _use_neighbor_search(model, NeighborSearch(xp, pca_dim=params.pca_dim, seed=params.seed, n_jobs=jobs))
    step, finish = callbacks(progress, total, every=1)
    if step is not None:
        end = model.on_training_step_end

        def on_step_end():
            end()
            step()

        model.on_training_step_end = on_step_end  # an instance attribute: nn.Module keeps plain functions as is
    threads = torch.get_num_threads()
    try:
        if not on_gpu:
            torch.set_num_threads(jobs)
        coords = model.fit_transform(xp)
    finally:
        torch.set_num_threads(threads)
        model.affinity_in.__dict__.pop("_distance_matrix", None)  # the search (its PCA and index) is not kept
    finish()
    coords = np.asarray(coords.detach().cpu().numpy() if hasattr(coords, "detach") else coords, np.float32)
    info.update(library=f"TorchDR {torchdr.__version__}", threads=None if on_gpu else jobs,
                neighbor_search=f"{search}, {k} neighbours")
    return TorchdrModel(model, xp, prep), coords, info


def _use_neighbor_search(model: Any, search: NeighborSearch) -> str:
    """Make TorchDR ``model``'s input affinity take its neighbours from ``search``; returns ``search.describe()``.

    TorchDR's affinities ask ``_distance_matrix(X, k, return_indices=True)`` for each row's k nearest
    other rows (their distances in the affinity's metric, squared Euclidean for t-SNE, Euclidean for
    UMAP) once per fit; this answers from ``search`` (whose rows are X's). Placing new points
    (``transform``) still searches with TorchDR's exact FAISS index.
    """
    import torch

    affinity = model.affinity_in
    squared = affinity.metric == "sqeuclidean"
    if affinity.metric not in ("sqeuclidean", "euclidean"):
        raise DataError(f"featviz's neighbour search gives Euclidean distances, not {affinity.metric!r}")

    def distance_matrix(X, k=None, return_indices=False):
        idx, dist = search.neighbors(int(k))
        dist = torch.as_tensor(dist ** 2 if squared else dist, dtype=X.dtype, device=X.device)
        idx = torch.as_tensor(idx, device=X.device)
        return (dist, idx) if return_indices else dist

    affinity._distance_matrix = distance_matrix  # an instance attribute, removed after the fit
    return search.describe() + " on CPU"

