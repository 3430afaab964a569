"""``featviz compare``: the measures between layers of one model, of two models, or of embeddings files.

Two ways in:

- ``run_compare``: one or two models on the same images (``featviz.compare.stream``), every chosen
  layer pooled per image; linear CKA by minibatches (Nguyen et al. 2021) of every pair of layers,
  then mutual k-NN, CKNNA and SVCCA on the pooled vectors, and, when the images have labels, the
  k-NN accuracy of each layer (DINO's weighted k-NN, 5 folds);
- ``run_compare_files``: two or more ``.npz`` embeddings of the same images (rows matched by their
  ids); CKA there is computed on all rows at once (Kornblith et al.'s ``feature_space_linear_cka``).

Both write one folder: ``compare.png`` (a heatmap per measure with the layer names and a colour
bar; the k-NN curve beside), ``compare.json`` (every number and the protocol), ``compare.npz`` (the
matrices and the pooled vectors, with the manifest inside), ``manifest.json`` and, on request,
``compare.html`` (values on hover).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featviz.compare import measures as M
from featviz.errors import DataError, OptionError, UnknownNameError
from featviz.registry import parse_names

MEASURES = ("cka", "mknn", "cknna", "svcca")
DEFAULT_MEASURES = ("cka", "mknn", "cknna")
FOLDS = 5
KNN_K = 20
KNN_T = 0.07
SVCCA_VARIANCE = 0.99


def parse_measures(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"cka,mknn"`` (or spaces between, or ``all``) as a tuple of known measure names, in the order given.

    The one rule for name lists (``registry.parse_names``); a wrong name is a usage error here.

    Raises:
        OptionError: an unknown name (with suggestions), or none.
    """
    items = re.split(r"[,\s]+", value) if isinstance(value, str) else value
    try:
        return tuple(parse_names(items, MEASURES, option="--measure", kind="measure"))
    except UnknownNameError as e:
        raise OptionError(str(e)) from None


@dataclass
class CompareResult:
    """What ``featviz compare`` found: the matrices, the k-NN curves, the protocol and the files.

    ``rows``/``cols`` name the layers (or files) of the matrices' rows and columns; ``within`` is True
    when both are one model's layers (the matrices are symmetric).
    """

    models: list[dict[str, Any]]
    rows: list[str]
    cols: list[str]
    within: bool
    matrices: dict[str, np.ndarray]
    knn: list[dict[str, Any]] | None
    n_images: int
    protocol: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The summary (``compare.json`` and ``--json``)."""
        return {
            "models": self.models,
            "mode": "within" if self.within else "between",
            "rows": self.rows,
            "cols": self.cols,
            "n_images": self.n_images,
            "measures": {k: np.round(v, 6).tolist() for k, v in self.matrices.items()},
            "knn": self.knn,
            "protocol": self.protocol,
            "files": self.files,
            "seconds": round(self.seconds, 2),
        }


# ------------------------------------------------------------------ measures of pooled vectors
def _knn_pairs(
    measures: Sequence[str],
    rows: list[np.ndarray],
    cols: list[np.ndarray] | None,
    k: int,
    progress: Callable[..., Iterable] | None,
) -> dict[str, np.ndarray]:
    """Mutual k-NN and/or CKNNA of every pair; each layer's neighbour lists are found once (rows L2-normalised)."""
    sides = rows if cols is None else rows + cols
    idx = range(len(sides))
    it = idx if progress is None else progress(idx, total=len(sides), description="neighbours")
    nb = [M.Neighbours(sides[i], k, normalize=True) for i in it]
    rn, cn = nb[: len(rows)], nb[len(rows) :] if cols is not None else nb
    out = {}
    if "mknn" in measures:
        out["mknn"] = np.array([[M.mutual_knn_of(a, b) for b in cn] for a in rn])
    if "cknna" in measures:
        selfs = {id(n): M.cknna_self(n) for n in nb}
        out["cknna"] = np.array([[M.cknna_of(a, b, self_a=selfs[id(a)], self_b=selfs[id(b)]) for b in cn] for a in rn])
    return out


def _svcca_pairs(rows: list[np.ndarray], cols: list[np.ndarray] | None) -> np.ndarray:
    """SVCCA of every pair (``measures.svcca``), each side reduced and orthonormalised once."""

    def basis(x: np.ndarray) -> np.ndarray:
        r = M.sv_reduce(x, variance=SVCCA_VARIANCE)
        if r.shape[1] >= len(r):
            raise DataError(
                f"SVCCA keeps {r.shape[1]} directions of {len(r)} images; it needs more images than "
                "directions (compare more images, or leave svcca out of --measure)"
            )
        return np.linalg.qr(r - r.mean(0))[0]

    rq = [basis(x) for x in rows]
    cq = rq if cols is None else [basis(x) for x in cols]
    return np.array([[float(np.clip(np.linalg.svd(a.T @ b, compute_uv=False), 0, 1).mean()) for b in cq] for a in rq])


def pair_matrices(
    measures: Sequence[str],
    rows: list[np.ndarray],
    cols: list[np.ndarray] | None,
    *,
    k: int,
    cka: np.ndarray | None = None,
    progress: Callable[..., Iterable] | None = None,
) -> dict[str, np.ndarray]:
    """Every measure of every (row, column) pair of pooled feature arrays.

    Args:
        measures: Names from ``MEASURES``.
        rows: The row side's (N, D_l) arrays.
        cols: The column side's, or None for rows × rows.
        k: Neighbours for mutual k-NN and CKNNA.
        cka: A CKA matrix already known (the stream's minibatch CKA); else CKA on all rows.
        progress: Wraps the longer loops.
    """
    knn = _knn_pairs(measures, rows, cols, k, progress) if {"mknn", "cknna"} & set(measures) else {}
    out: dict[str, np.ndarray] = {}
    for m in measures:
        if m == "cka":
            out[m] = cka if cka is not None else M.pairwise(M.cka, rows, cols)
        elif m in knn:
            out[m] = knn[m]
        elif m == "svcca":
            out[m] = _svcca_pairs(rows, cols)
    return out


def fold_knn(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    k: int = KNN_K,
    temperature: float = KNN_T,
    folds: int = FOLDS,
    seed: int = 0,
) -> dict[str, float] | None:
    """DINO's weighted k-NN accuracy of ``features`` by ``folds``-fold cross-validation (seeded folds).

    Each fold is the query set once, the other folds its bank (``featviz.eval.knn.weighted_knn``);
    the accuracy is the share of all labelled rows classified right. None when fewer than two
    classes or too few labelled rows.
    """
    from featviz.eval.knn import weighted_knn

    lab = np.flatnonzero(labels >= 0)
    if len(np.unique(labels[lab])) < 2 or len(lab) < folds * 2:
        return None
    parts = np.array_split(np.random.default_rng(seed).permutation(lab), folds)
    k = min(k, len(lab) - max(len(p) for p in parts))
    hits1 = hits5 = 0
    n_cls = int(labels.max()) + 1
    for f, val in enumerate(parts):
        train = np.concatenate([p for g, p in enumerate(parts) if g != f])
        (score,) = weighted_knn(
            features[train],
            labels[train],
            features[val],
            labels[val],
            ks=(k,),
            temperature=temperature,
            num_classes=n_cls,
        )
        hits1 += score.correct_top1
        hits5 += score.correct_top5
    return {"top1": hits1 / len(lab), "top5": hits5 / len(lab), "k": k}


def knn_curve(
    name: str, layers: Sequence[str], pooled: Sequence[np.ndarray], labels: np.ndarray, *, seed: int
) -> dict[str, Any] | None:
    """One model's k-NN accuracy per layer: ``{"model", "layers", "top1", "top5"}``; None without labels."""
    scores = [fold_knn(p, labels, seed=seed) for p in pooled]
    if any(s is None for s in scores):
        return None
    return {
        "model": name,
        "layers": list(layers),
        "top1": [s["top1"] for s in scores],
        "top5": [s["top5"] for s in scores],
        "k": scores[0]["k"],
    }


def knn_protocol() -> dict[str, Any]:
    """How the per-layer k-NN accuracy is measured, for the JSON."""
    return {
        "rule": "DINO eval_knn.knn_classifier (featviz.eval.knn)",
        "k": KNN_K,
        "temperature": KNN_T,
        "folds": FOLDS,
        "similarity": "cosine (L2-normalised features)",
    }


# ------------------------------------------------------------------ outputs
def check_outputs(out_dir: str | os.PathLike, *, force: bool) -> Path:
    """The output folder, checked before any work (``io.outputs.check_output``)."""
    from featviz.io.outputs import check_output

    return check_output(out_dir, force=force, folder=True)


def write_outputs(
    result: CompareResult,
    out_dir: str | os.PathLike,
    *,
    pooled: dict[str, np.ndarray],
    ids: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
    html: bool,
    force: bool,
    arguments: dict[str, Any],
    cmap: str | None = None,
) -> CompareResult:
    """Write compare.png/json/npz, manifest.json and (``html``) compare.html into ``out_dir``, atomically.

    ``cmap``: the heatmaps' colour map, PNG and page (default ``compare.plots.CMAP``).
    """
    from featviz.compare.plots import draw_png, write_page
    from featviz.io.outputs import atomic_dir, manifest, to_jsonable, write_json

    out_dir = Path(out_dir)
    names = ["compare.png", "compare.json", "compare.npz", "manifest.json"] + (["compare.html"] if html else [])
    result.files = {n.split(".")[-1] if n.startswith("compare") else "manifest": str(out_dir / n) for n in names}
    man = manifest("compare", arguments, models=result.models, protocol=result.protocol)
    with atomic_dir(out_dir, force=force, command="compare") as tmp:
        draw_png(result, tmp / "compare.png", cmap=cmap)
        if html:
            write_page(result, tmp / "compare.html", cmap=cmap)
        arrays = {f"measure_{k}": v for k, v in result.matrices.items()}
        for i, curve in enumerate(result.knn or []):
            arrays[f"knn_top1/{'ab'[i] if len(result.knn) <= 2 else i}"] = np.asarray(curve["top1"])
        arrays.update({f"pooled/{k}": v for k, v in pooled.items()})
        with open(tmp / "compare.npz", "wb") as f:
            np.savez(
                f,
                ids=np.asarray(list(ids), dtype=str),
                labels=np.asarray(labels, np.int64),
                class_names=np.asarray(list(class_names), dtype=str),
                rows=np.asarray(result.rows, dtype=str),
                cols=np.asarray(result.cols, dtype=str),
                manifest=np.array(json.dumps(to_jsonable(man))),
                **arrays,
            )
        write_json(tmp / "compare.json", result.to_dict())
        write_json(tmp / "manifest.json", {**man, "files": sorted(names)})
    return result


def _random_init(manifest: dict[str, Any]) -> bool:
    """Whether an embeddings file's manifest says its model had random weights (``weights_caution``)."""
    from featviz.models.description import weights_caution

    model = manifest.get("model")
    return isinstance(model, dict) and weights_caution(model) is not None


# ------------------------------------------------------------------ from models
def run_compare(
    sides: Sequence[Any],
    src: Any,
    out_dir: str | os.PathLike,
    *,
    measures: Sequence[str],
    k: int = 10,
    hw: tuple[int, int],
    center_crop: bool | None = None,
    batch_size: int = 256,
    batches: int | None = None,
    seed: int = 0,
    device: Any = "cpu",
    html: bool = False,
    force: bool = False,
    arguments: dict[str, Any] | None = None,
    progress: Callable[..., Iterable] | None = None,
    cmap: str | None = None,
) -> CompareResult:
    """Compare the layers of one model (``sides``: one ``stream.Side``) or of two, on the images ``src``.

    Args:
        sides: One or two ``featviz.compare.stream.Side``.
        src: ``featviz.data.images.LabelledImages``.
        out_dir: The output folder (checked first).
        measures: Names from ``MEASURES``.
        k: Neighbours of mutual k-NN and CKNNA.
        hw: The input size of both models.
        center_crop: The eval transform's choice (None: its default).
        batch_size: The minibatch of the HSIC estimates (and of the forward).
        batches: At most this many minibatches (None: every image once).
        seed: Seeds the minibatches and the k-NN folds.
        device: A torch device.
        html: Also write compare.html.
        force: Replace an earlier output folder.
        arguments: The command's arguments, for the manifest.
        progress: ``progress(iterable, total=…, description=…)``.
        cmap: The heatmaps' colour map (``--cmap``; default ``compare.plots.CMAP``).

    Raises:
        DataError: fewer than ``k + 1`` images, or none decodable.
        OutputExistsError: ``out_dir`` exists and ``force`` is False.
    """
    from featviz.compare.stream import protocol_resize, stream_layers

    t0 = time.perf_counter()
    check_outputs(out_dir, force=force)
    measures = parse_measures(measures)
    n_use = len(src) if batches is None else min(len(src), batches * batch_size)
    if batch_size < 4:
        raise DataError(f"--batch-size {batch_size}: the unbiased HSIC of a minibatch needs at least 4 images")
    if any(m in ("mknn", "cknna") for m in measures) and not 2 <= k < n_use:
        raise DataError(f"--k {k}: mutual k-NN and CKNNA need 2 ≤ k < the {n_use} images compared")
    wrap = None if progress is None else (lambda it, total=None: progress(it, total=total, description="layers"))
    st = stream_layers(
        sides,
        src,
        hw=hw,
        center_crop=center_crop,
        batch_size=batch_size,
        batches=batches,
        seed=seed,
        device=device,
        progress=wrap,
    )
    la = len(sides[0].layers)
    full = st.cka.matrix()
    within = len(sides) == 1
    cka = full[:la, :la] if within else full[:la, la:]
    rows = st.pooled[0]
    cols = None if within else st.pooled[1]
    mats = pair_matrices(measures, rows, cols, k=k, cka=cka, progress=progress)
    knn = [knn_curve(s.name, s.layers, p, st.labels, seed=seed) for s, p in zip(sides, st.pooled, strict=True)]
    models = [
        {
            "name": s.name,
            **s.description,
            "layers": s.layers,
            "pooling": st.pooling[i],
            "dims": [int(p.shape[1]) for p in st.pooled[i]],
        }
        for i, s in enumerate(sides)
    ]
    pools = sorted({r for p in st.pooling for r in p.values()})
    protocol = {
        "features": "pooled per image: " + ", ".join(pools) + " (per layer: models[].pooling)",
        "image_size": list(hw),
        "resize": protocol_resize(hw, center_crop),
        "cka": "linear CKA from minibatches (Nguyen et al. 2021): mean unbiased HSIC (Song et al. 2012) per pair",
        "batch_size": batch_size,
        "batches": st.cka.batches,
        "rows_in_batches": st.cka.rows,
        "skipped_batches": st.cka.skipped_batches,
        "sampling": f"random minibatches without replacement, seed {seed}",
        "k": k,
        "knn_measures": "mutual k-NN and CKNNA of platonic-rep on L2-normalised pooled vectors",
        "svcca_variance": SVCCA_VARIANCE if "svcca" in measures else None,
        "knn_accuracy": knn_protocol() if all(knn) else None,
        "skipped_images": st.skipped,
    }
    result = CompareResult(
        models,
        list(sides[0].layers),
        list(sides[-1].layers),
        within,
        mats,
        [c for c in knn if c] or None,
        len(st.ids),
        protocol,
    )
    pooled = {
        f"{'ab'[i]}/{layer}": p
        for i, (s, side) in enumerate(zip(sides, st.pooled, strict=True))
        for layer, p in zip(s.layers, side, strict=True)
    }
    result.seconds = time.perf_counter() - t0
    return write_outputs(
        result,
        out_dir,
        pooled=pooled,
        ids=st.ids,
        labels=st.labels,
        class_names=st.class_names,
        html=html,
        force=force,
        arguments=arguments or {},
        cmap=cmap,
    )


# ------------------------------------------------------------------ from embeddings files
def align_rows(embs: Sequence[Any], names: Sequence[str]) -> list[Any]:
    """The embeddings with their rows in the first one's order, matched by ids.

    Raises:
        DataError: one line when the files hold different images (or repeated ids).
    """
    ref = embs[0]
    ids0 = list(ref.ids)
    if len(set(ids0)) != len(ids0):
        raise DataError(f"{names[0]} repeats image ids (pixel embeddings?); compare needs one row per image")
    out = [ref]
    for e, name in zip(embs[1:], names[1:], strict=True):
        ids = list(e.ids)
        if ids == ids0:
            out.append(e)
            continue
        if len(ids) != len(ids0) or set(ids) != set(ids0) or len(set(ids)) != len(ids):
            only_a, only_b = len(set(ids0) - set(ids)), len(set(ids) - set(ids0))
            raise DataError(
                f"{names[0]} and {name} hold different images ({len(ids0)} vs {len(ids)} rows; {only_a} "
                f"ids only in the first, {only_b} only in the second): embed the same images for both"
            )
        pos = {v: i for i, v in enumerate(ids)}
        e = e.subset(np.array([pos[v] for v in ids0]))
        out.append(e)
    for e, name in zip(out[1:], names[1:], strict=True):
        _check_same_labels(ref, e, names[0], name)
    return out


def _label_names(e: Any) -> np.ndarray:
    """Each row's label as text (its class name where the file names its classes); '' where unknown."""
    names = list(e.class_names)
    return np.array(["" if v < 0 else (names[v] if v < len(names) else str(v)) for v in np.asarray(e.labels).tolist()])


def _check_same_labels(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """The k-NN curves use the first file's labels: a second file that labels the same images otherwise is refused.

    Raises:
        DataError: rows (matched by ids) whose known labels differ.
    """
    la, lb = _label_names(a), _label_names(b)
    differ = (la != lb) & (la != "") & (lb != "")
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        raise DataError(
            f"{name_a} and {name_b} label the same images differently ({int(differ.sum())} of {len(la)} rows, "
            f"e.g. {a.ids[i]!r}: {la[i]!r} vs {lb[i]!r}); embed both with the same labels"
        )


def run_compare_files(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    names: Sequence[str],
    measures: Sequence[str],
    k: int = 10,
    seed: int = 0,
    html: bool = False,
    force: bool = False,
    arguments: dict[str, Any] | None = None,
    progress: Callable[..., Iterable] | None = None,
    cmap: str | None = None,
) -> CompareResult:
    """Compare two or more embeddings ``.npz`` of the same images, file × file (no torch).

    Raises:
        DataError: fewer than two files, different images, or ``k`` out of range.
        ArtifactError: a file is not an embeddings ``.npz``.
    """
    from featviz.io.artifacts import Embeddings

    t0 = time.perf_counter()
    if len(files) < 2:
        raise DataError("compare needs two or more embeddings files (featviz compare a.npz b.npz -o DIR)")
    check_outputs(out_dir, force=force)
    measures = parse_measures(measures)
    embs = align_rows([Embeddings.load(f) for f in files], names)
    n = embs[0].n
    if any(m in ("mknn", "cknna") for m in measures) and not 2 <= k < n:
        raise DataError(f"--k {k}: mutual k-NN and CKNNA need 2 ≤ k < the {n} rows compared")
    feats = [e.features for e in embs]
    mats = pair_matrices(measures, feats, None, k=k, progress=progress)
    curves = [knn_curve(name, [name], [f], embs[0].labels, seed=seed) for name, f in zip(names, feats, strict=True)]
    knn = None
    if all(curves):
        knn = [
            {
                "model": "files",
                "layers": list(names),
                "top1": [c["top1"][0] for c in curves],
                "top5": [c["top5"][0] for c in curves],
                "k": curves[0]["k"],
            }
        ]
    models = [
        {
            "name": name,
            "file": str(f),
            "dim": e.d,
            "manifest_command": e.manifest.get("command"),
            "random_init": _random_init(e.manifest),
        }
        for name, f, e in zip(names, files, embs, strict=True)
    ]
    protocol = {
        "features": "the files' rows, matched by ids",
        "cka": "linear CKA on all rows (Kornblith et al. 2019, feature_space_linear_cka)",
        "k": k,
        "knn_measures": "mutual k-NN and CKNNA of platonic-rep on L2-normalised rows",
        "svcca_variance": SVCCA_VARIANCE if "svcca" in measures else None,
        "knn_accuracy": knn_protocol() if knn else None,
    }
    result = CompareResult(models, list(names), list(names), True, mats, knn, n, protocol)
    result.seconds = time.perf_counter() - t0
    return write_outputs(
        result,
        out_dir,
        pooled={name: f for name, f in zip(names, feats, strict=True)},
        ids=embs[0].ids,
        labels=embs[0].labels,
        class_names=embs[0].class_names,
        html=html,
        force=force,
        arguments=arguments or {},
        cmap=cmap,
    )
