"""``run_cam``: the whole ``featviz cam`` run, from image files to the output folder and its manifest."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featviz.errors import DataError
from featviz.io.progress import Progress
from featviz.models.description import describe
from featviz.models.features import arch_name, parse_image_size
from featviz.registry import names_all
from featviz.style import DEFAULT_STYLE, PlotStyle
from featviz.views.cam.layers import ModelInfo, layer_shapes, probe_model
from featviz.views.cam.methods import NOISE_RATIO, MapStats, explain, not_applicable, parse_methods
from featviz.views.cam.metrics import METRIC_DEFINITIONS, faithfulness
from featviz.views.cam.render import CAM_CMAP, CamRun, contact_sheet, overlay_png
from featviz.views.cam.scores import (
    BLUR_KLEN,
    BLUR_NSIG,
    DEFAULT_STEPS,
    HIGHER_IS_BETTER,
    ROAD_PERCENTILES,
    SCORE_DEFINITIONS,
    parse_scores,
    ranking,
    score_maps,
    step_pixels,
)
from featviz.views.cam.targets import (
    TargetContext,
    TargetSpec,
    check_target,
    class_index,
    default_target,
    make_targets,
    parse_target,
)
from featviz.views.runner import ViewResult, ViewRunner, safe_stem
from featviz.views.sheets import SheetCut, sheet_cut

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000
"""A classifier with this many outputs and no class names of its own takes ImageNet-1k's for ``class:NAME``."""


def read_class_names(spec: str | Path | Sequence[str] | None) -> list[str]:
    """Class names from ``"imagenet"``, a text file or a list.

    ``"imagenet"`` gives timm's ImageNet-1k descriptions; a text file holds one name per line;
    None gives ``[]``.

    Raises:
        DataError: the file does not exist or is empty.
    """
    if spec is None:
        return []
    if isinstance(spec, (str, Path)) and str(spec).lower() in ("imagenet", "imagenet-1k", "imagenet1k"):
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(info.num_classes())]
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"--class-names {str(spec)!r}: expected 'imagenet' or a text file with one class name "
                            "per line, and there is no such file")
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not names:
            raise DataError(f"--class-names {str(spec)!r} holds no names; expected one class name per line")
        return names
    return [str(n) for n in spec]


def run_cam(inputs: Sequence[str | Path], out_dir: str | Path, *, model: nn.Module,
            methods: str | Sequence[str] = "gradcam", layers: Sequence[str] | None = None,
            target: str | None = None, image_size: int | str | Sequence[int] | None = None,
            batch_size: int = 16, aug_smooth: bool = False, eigen_smooth: bool = False,
            metrics: bool = False, device: str = "auto", seed: int = 0, force: bool = False, strict: bool = False,
            class_names: Sequence[str] = (), arguments: dict[str, Any] | None = None, progress: Progress | None = None,
            sheet_images: int = 24, weights: str | None = None, note: str | None = None, limit: int | None = None,
            style: PlotStyle = DEFAULT_STYLE, scores: str | Sequence[str] | None = None,
            score_steps: int = DEFAULT_STEPS) -> CamResult:
    """Explain every image under ``inputs`` with every method; write the results to ``out_dir``.

    Writes (atomically, as one folder): ``overlays/<image>.<method>.png``, ``maps.npz`` (per method
    a float32 array (N, H, W) of the normalised maps, plus ``ids`` and ``<method>.raw_max``),
    ``contact_sheet.png`` (rows = images, columns = methods) and ``manifest.json``.

    Args:
        inputs: Image files and/or folders (searched recursively).
        out_dir: Output folder; must not exist unless ``force``.
        model: The model to explain (``featviz.models.loader.load_model(head=True)``); its description
            (``featviz.models.description.describe``) goes into the manifest, load warnings included.
        methods: Method names, comma-separated names, or ``all``.
        layers: Layer names (default per architecture); several layers are averaged.
        target: A ``--target`` string (default: ``top1`` with a classifier, else ``self``).
        image_size: N or (H, W) / ``"HxW"`` (default: the model's size); a ViT takes any multiple of
            its patch size, non-square included.
        batch_size: Images per batch (and, on CUDA, the ScoreCAM/AblationCAM inner batch, at least 32;
            16 on CPU, as in pytorch-grad-cam).
        aug_smooth: Test-time augmentation smoothing.
        eigen_smooth: First-principal-component smoothing.
        metrics: Add ROAD and confidence-change scores per map.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: Seed for ``pair`` views and ROAD's imputation noise.
        force: Replace featviz's files in an existing ``out_dir`` (other files are kept).
        strict: Stop at the first undecodable image instead of skipping it (with a warning).
        class_names: The model's class names (``seg:NAME`` targets; class labels on the contact
            sheet), as a list, a text file (one per line) or ``"imagenet"`` (see ``read_class_names``);
            default: the model's own (a segmenter's).
        arguments: The command's arguments, for the manifest.
        progress: Wraps the batch loop (a progress bar).
        sheet_images: Images shown on the contact sheet, spread over all of them, the cut said
            (``featviz.views.sheets.sheet_cut``; all maps are still saved).
        weights: What the weights are, for the sheet's title (a checkpoint name, ``random weights``).
        note: A line under the sheet's title.
        limit: Only the first N images (in the listing order); the manifest's ``limit`` says so.
        style: ``style.cmap``: the maps' colour map (default ``jet``).
        scores: Faithfulness scores per map: ``road``, ``deletion``, ``insertion`` (comma-separated, a
            list or ``all``; ``featviz.views.cam.scores``); they go to ``cam.json`` and the sheet's
            ranking panel.
        score_steps: Deletion/insertion steps (RISE's ``step`` is ``ceil(H·W / score_steps)`` pixels).

    Returns:
        The result; its ``to_dict()`` is the summary that ``--json`` prints.
    """
    runner = ViewRunner("cam", out_dir, force=force, arguments=arguments, progress=progress)
    score_names = parse_scores(scores)
    if score_names and int(score_steps) < 1:
        raise DataError(f"--score-steps {score_steps}: expected a number of steps ≥ 1 (RISE's curve has steps + 1 "
                        "points)")
    hw = parse_image_size(image_size)  # the feature core's rule (sides >= 8), before any work
    class_names = read_class_names(class_names) if isinstance(class_names, (str, Path)) else list(class_names)
    setup = _prepare(runner, inputs, model, methods=methods, layers=layers, target=target, image_size=hw,
                     batch_size=batch_size, aug_smooth=aug_smooth, device=device, seed=seed, class_names=class_names,
                     strict=strict, limit=limit)
    cut = sheet_cut(len(setup.files), sheet_images)
    cmap = style.heat_cmap(CAM_CMAP)
    with runner.output() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # ROAD's imputation noise; the caller's RNG state is left alone
        run, sheet_imgs, kept = _explain_all(runner, setup, tmp / "overlays", aug_smooth=aug_smooth,
                                             eigen_smooth=eigen_smooth, metrics=metrics, shown=set(cut.indices),
                                             cmap=cmap, keep=bool(score_names))
        if score_names:
            _score_all(runner, setup, run, kept, score_names, int(score_steps))
        return _write_outputs(runner, tmp, setup, run, sheet_imgs, metrics=metrics, weights=weights, note=note,
                              cut=cut, cmap=cmap)


@dataclass
class _Setup:
    """Everything ``run_cam`` decides before the first map: model, inputs, layers, target, methods."""

    model: nn.Module
    info: ModelInfo
    files: list[Path]  # the images explained (the undecodable ones leave when skipped)
    ids: list[str]
    loader: Any
    hw: tuple[int, int]
    layer_names: list[str]
    layer_mods: list[nn.Module]
    shapes: list[tuple[int, ...]]
    token: bool
    reshape: Any
    spec: TargetSpec
    ctx: TargetContext
    methods: list[str]
    skipped: dict[str, str]
    inner_batch: int
    undecodable: list[str]


def _prepare(runner: ViewRunner, inputs, model: nn.Module, *, methods, layers, target, image_size, batch_size: int,
             aug_smooth: bool, device: str, seed: int, class_names: Sequence[str], strict: bool = False,
             limit: int | None = None) -> _Setup:
    from featviz.data.images import load_image
    from featviz.models.features import default_cam_layer, get_layer, input_size, reshape_transform

    names = parse_methods(methods)
    spec = parse_target(target) if target else None
    files, ids = runner.images(inputs, limit=limit)
    model = runner.place(model, device)
    dev, mean, std = runner.device, runner.mean, runner.std
    hw = input_size(model, image_size)  # the model's default, or the size asked for (ViT patch multiples)
    layer_names = list(layers) if layers else [default_cam_layer(model)]
    layer_mods = [get_layer(model, n) for n in layer_names]
    loader = runner.loader(hw=hw, batch_size=batch_size, strict=strict)  # the eval transform; sets `resize`
    first = _first_decodable(loader.dataset, files)[None].to(dev)
    info = probe_model(model, first)
    shapes = layer_shapes(info.forward, layer_mods, first)
    token = any(len(s) == 3 for s in shapes)
    spec = spec or default_target(info)
    class_names = list(class_names) or list(describe(model).class_names)  # a segmenter knows its own
    if (not class_names and info.kind == "logits" and info.num_classes == IMAGENET_CLASSES and spec.kind == "class"
            and not (spec.arg or "").isdigit()):
        log.info("--target %s: a 1000-class classifier without its own class names; looking the name up in "
                 "ImageNet-1k's (--class-names to give others)", spec)
        class_names = read_class_names("imagenet")
    if spec.kind == "class":
        idx = class_index(spec.arg or "", class_names)
        if str(idx) != spec.arg:
            log.info("--target %s is class %d (%s)", spec, idx, class_names[idx])
            spec = TargetSpec("class", str(idx))
    check_target(spec, info, class_names)
    if class_names and info.kind == "logits" and len(class_names) != info.num_classes:
        raise DataError(f"--class-names has {len(class_names)} names but the classifier has {info.num_classes} "
                        "classes; give one name per class")
    reference = None
    if spec.kind == "similarity":
        ref = loader.dataset.transform(load_image(spec.arg or ""))[None].to(dev)
        with torch.no_grad():
            reference = info.forward(ref)[0]
    run_methods, skipped = _applicable(names, methods, info, token=token, aug_smooth=aug_smooth, hw=hw)
    # masked copies per forward for ScoreCAM/AblationCAM/SESS: larger batches pay on a GPU, but on a
    # CPU pytorch-grad-cam's own 16 is faster (ResNet-50 ScoreCAM at 112 px: 16 → 27-29 s, 64 → 33-36 s)
    inner = max(32, batch_size) if dev.type == "cuda" else 16
    return _Setup(model, info, list(files), list(ids), loader, hw, layer_names, layer_mods, shapes,
                  token, reshape_transform(model, hw, layer_mods), spec,
                  TargetContext(spec, info, mean, std, reference, list(class_names), seed), run_methods, skipped,
                  inner, [])


def _first_decodable(dataset, files: list[Path]) -> torch.Tensor:
    """The first image that decodes (the model is probed with it); one clear line when none does."""
    from featviz.data.images import check_pixels, load_image

    for i in range(len(dataset)):
        x = dataset[i][0]
        if x is not None:
            return x
        check_pixels(files[i])  # too large is not undecodable: say how to lift the limit
    load_image(files[0])  # raises the DataError that names the first file and what is wrong with it
    raise DataError(f"none of the {len(files)} images could be decoded")


def _applicable(names: list[str], requested, info: ModelInfo, *, token: bool, aug_smooth: bool,
                hw: tuple[int, int]) -> tuple[list[str], dict[str, str]]:
    """The methods that apply to this model and layer.

    An explicitly named one that does not is an error; with ``all`` the others are skipped with a
    warning.
    """
    skipped = {m: why for m in names if (why := not_applicable(m, info, token_layer=token, aug_smooth=aug_smooth,
                                                              input_hw=hw))}
    if skipped and not names_all(requested):
        m, why = next(iter(skipped.items()))
        raise DataError(f"--method {m} does not apply to this model: {why}")
    for m, why in skipped.items():
        log.warning("skipping %s: %s", m, why)
    run_methods = [m for m in names if m not in skipped]
    if not run_methods:
        raise DataError("none of the requested methods applies to this model: " + "; ".join(skipped.values()))
    return run_methods, skipped


def _explain_all(runner: ViewRunner, s: _Setup, overlays: Path, *, aug_smooth: bool, eigen_smooth: bool,
                 metrics: bool, shown: set[int], cmap: str = CAM_CMAP, keep: bool = False,
                 ) -> tuple[CamRun, dict[int, np.ndarray], list]:
    """Every method on every batch; overlays are written as they come, the maps kept for maps.npz.

    Returns the run and the pictures of the images the sheet shows (``shown``), by their row in the run;
    with ``keep``, also each batch (on the CPU) and its bound targets, for the scoring pass.
    """
    overlays.mkdir()
    maps: dict[str, list[np.ndarray]] = {m: [] for m in s.methods}
    stats: dict[str, list[MapStats]] = {m: [] for m in s.methods}
    mets: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in s.methods}
    labels: list[str] = []
    scores: list[float | None] = []
    sheet_imgs: dict[int, np.ndarray] = {}  # image index -> its picture, for the sheet's images only
    bad: list[int] = []
    kept: list[tuple[torch.Tensor, list]] = []
    with runner.batches(s.loader) as batches:  # a progress bar ends with the loop, error or not
        for x, _, idx, skipped in batches:
            bad += _skipped(s, skipped)
            if x is None:
                continue
            x = x.to(runner.device)
            rgb = runner.rgb(x)
            targets = make_targets(s.ctx, x)
            for m in s.methods:
                kw = {"target_idx": int(s.spec.arg)} if m == "finercam" and s.spec.kind == "class" else None
                batch_maps, batch_stats = explain(s.info, x, m, s.layer_mods, targets, reshape_transform=s.reshape,
                                                  aug_smooth=aug_smooth, eigen_smooth=eigen_smooth,
                                                  batch_size=s.inner_batch, token_layer=s.token, method_kwargs=kw)
                maps[m].append(batch_maps)
                stats[m] += batch_stats
                if metrics:
                    for k, v in faithfulness(s.info, x, batch_maps, targets).items():
                        mets[m].setdefault(k, []).append(v)
                for j, i in enumerate(idx.tolist()):
                    overlay_png(rgb[j], batch_maps[j], overlays / f"{safe_stem(s.ids[i])}.{m}.png", cmap=cmap)
            labels += [t.label for t in targets]
            scores += [t.score for t in targets]
            if keep:
                kept.append((x.cpu(), targets))
            sheet_imgs.update({i: rgb[j] for j, i in enumerate(idx.tolist()) if i in shown})
    gone = set(bad)
    row = {i: r for r, i in enumerate(i for i in range(len(s.ids)) if i not in gone)}  # image -> row of the run
    sheet_imgs = {row[i]: img for i, img in sorted(sheet_imgs.items()) if i in row}
    if bad:  # the outputs hold the images that were explained, in order
        s.undecodable = [s.ids[i] for i in sorted(gone)]
        s.files = [f for i, f in enumerate(s.files) if i not in gone]
        s.ids = [f for i, f in enumerate(s.ids) if i not in gone]
    run = CamRun(s.ids, s.methods, s.skipped, {m: np.concatenate(v) for m, v in maps.items()}, stats, labels, scores,
                 {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in mets.items()}, s.layer_names,
                 str(s.spec), s.hw, s.info.kind)
    return run, sheet_imgs, kept


def _score_all(runner: ViewRunner, s: _Setup, run: CamRun, kept: list, names: list[str], steps: int) -> None:
    """Every score of every map, one (image, method) at a time under its own progress bar."""
    units = [(b, j, m) for b, (x, _) in enumerate(kept) for j in range(len(x)) for m in run.methods]
    it = units if runner.progress is None else runner.progress(units, total=len(units), description="scoring maps")
    values: dict[str, dict[str, list[float]]] = {m: {k: [] for k in names} for m in run.methods}
    forwards: dict[str, list[int]] = {m: [] for m in run.methods}
    offset, row = 0, {}
    for b, (x, _) in enumerate(kept):
        row[b] = offset
        offset += len(x)
    try:
        for b, j, m in it:
            x, targets = kept[b]
            i = row[b] + j
            vals, fw = score_maps(s.info.forward, x[j:j + 1].to(runner.device), run.maps[m][i:i + 1],
                                  [targets[j]], names, steps=steps)
            for k in names:
                values[m][k].append(float(vals[k][0]))
            forwards[m].append(fw[0])
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    run.score_values = {m: {k: np.asarray(v) for k, v in d.items()} for m, d in values.items()}
    run.score_forwards = forwards
    px = step_pixels(s.hw, steps)
    run.score_settings = {
        "scores": names, "steps": (s.hw[0] * s.hw[1] + px - 1) // px, "step_pixels": px,
        "deletion_baseline": "0 in the normalised input (the dataset mean colour), as RISE's torch.zeros_like",
        "insertion_baseline": f"the image blurred by RISE's gkern({BLUR_KLEN}, {BLUR_NSIG}) (conv2d, padding "
                              f"{BLUR_KLEN // 2}) on the normalised input",
        "road_percentiles": list(ROAD_PERCENTILES), "definitions": SCORE_DEFINITIONS,
        "higher_is_better": {k: HIGHER_IS_BETTER[k] for k in names},
    }


def cam_scores(run: CamRun) -> dict[str, Any]:
    """``cam.json``: each image's and each method's scores, their means, the ranking and the forwards."""
    names = run.score_settings.get("scores", [])
    means = {m: {k: float(np.nanmean(v)) for k, v in d.items()} for m, d in run.score_values.items()}
    return {
        **run.score_settings,
        "target": run.target,
        "images": [{"id": run.ids[i], "target": run.target_labels[i],
                    "methods": {m: {**{k: float(run.score_values[m][k][i]) for k in names},
                                    "forwards": run.score_forwards[m][i]} for m in run.methods}}
                   for i in range(len(run.ids))],
        "methods": {m: {"mean": means[m], "forwards": int(sum(run.score_forwards[m]))} for m in run.methods},
        "ranking": {k: ranking(means, k) for k in names},
        "forwards": int(sum(sum(v) for v in run.score_forwards.values())),
    }


def _skipped(s: _Setup, skipped: list[int]) -> list[int]:
    """Undecodable images of a batch: warned about and left out.

    Images above the decompression-bomb limit stop the run, with the way to lift it.
    """
    from featviz.data.images import check_pixels

    for i in skipped:
        check_pixels(s.files[i])
        log.warning("skipping %s: it could not be decoded (pass --strict to stop instead)", s.ids[i])
    return list(skipped)


def _write_outputs(runner: ViewRunner, tmp: Path, s: _Setup, run: CamRun, sheet_imgs: dict[int, np.ndarray], *,
                   metrics: bool, weights: str | None = None, note: str | None = None, cut: SheetCut,
                   cmap: str = CAM_CMAP) -> CamResult:
    """maps.npz, the contact sheet and manifest.json into the run's temporary folder; the result."""
    arrays: dict[str, np.ndarray] = {"ids": np.array(run.ids)}
    for m in run.methods:
        arrays[m] = run.maps[m]
        arrays[f"{m}.raw_max"] = np.array([np.nan if st.raw_max is None else st.raw_max for st in run.stats[m]])
    np.savez_compressed(tmp / "maps.npz", **arrays)
    scored = cam_scores(run) if run.score_values else None
    if scored is not None:
        (tmp / "cam.json").write_text(json.dumps(scored, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    desc = describe(s.model)
    warnings = [*desc.warnings, *_warn_degenerate(run)]  # the load's (already on stderr), then the maps'
    title = _sheet_title(s.model, run, weights) + (f" · {cut.caption()}" if cut.cut else "")
    contact_sheet(run, list(sheet_imgs.values()), tmp / "contact_sheet.png", title=title, note=note,
                  rows_of=list(sheet_imgs), cmap=cmap)
    runner.write_manifest(
        tmp, model={"arch": arch_name(s.model), "kind": s.info.kind, "output_shape": s.info.out_shape,
                    "output_selected": s.info.selected, "description": desc.to_dict()},
        layers=run.layers, layer_shapes=[list(sh[1:]) for sh in s.shapes],
        reshape_transform=None if s.reshape is None else s.reshape.to_dict(),
        target=run.target, methods=run.methods, skipped_methods=run.skipped, image_size=list(run.image_size),
        undecodable_images=s.undecodable, weights=weights, note=note,
        device=str(runner.device), normalization=runner.normalization,
        metric_definitions=METRIC_DEFINITIONS if metrics else None,
        noise_rule=f"gradient maps are 'noise' when the target's relative slope ‖∂t/∂o‖·‖o‖/|t| < {NOISE_RATIO}, "
                   "'blank' when the raw map is all ≤ 0",
        images=[{"id": run.ids[i], "path": str(s.files[i]), "target": run.target_labels[i], "score": run.scores[i],
                 "maps": {m: {**run.stats[m][i].to_dict(),
                              **{k: float(v[i]) for k, v in run.metrics.get(m, {}).items()},
                              **{k: float(v[i]) for k, v in run.score_values.get(m, {}).items()}}
                          for m in run.methods}} for i in range(len(run.ids))],
        warnings=warnings)
    return _result(run, runner, warnings, s.undecodable, scored, cut)


def _sheet_title(model: nn.Module, run: CamRun, weights: str | None = None) -> str:
    from featviz.models.description import weights_caution
    from featviz.views.sheets import with_caution

    if weights and weights_caution(model):  # the title leads with RANDOM WEIGHTS: keep only the seed
        weights = weights.removeprefix("random weights, ")
    arch = arch_name(model) + (f" ({weights})" if weights else "")
    return with_caution(model, f"{arch} · layer {', '.join(run.layers)} · target {run.target}")


def _warn_degenerate(run: CamRun) -> list[str]:
    lines = []
    for m in run.methods:
        bad = [(run.ids[i], s) for i, s in enumerate(run.stats[m]) if s.status in ("blank", "noise", "nan")]
        if not bad:
            continue
        kinds = sorted({s.status for _, s in bad})
        worst = max((s.raw_max or 0.0) for _, s in bad if s.raw_max is not None and math.isfinite(s.raw_max)) \
            if any(s.raw_max is not None and math.isfinite(s.raw_max) for _, s in bad) else float("nan")
        why = {"blank": "all ≤ 0 before ReLU: the target decreases with every feature at this layer",
               "noise": "the target is flat at the image, so the gradients are float rounding that min-max "
                        "scaling blows up into a convincing heatmap",
               "nan": "the raw map is not finite"}
        line = (f"{m}: {len(bad)} of {len(run.ids)} maps are {'/'.join(kinds)} (raw max ≤ {worst:.3g}, e.g. "
                f"{bad[0][0]}): {'; '.join(why[k] for k in kinds)}. Try another target, layer or method")
        log.warning(line)
        lines.append(line)
    return lines


@dataclass(eq=False)
class CamResult(ViewResult):
    """What ``featviz cam`` reports (``to_dict()``: its ``--json`` summary)."""

    out: str
    images: int  # the images explained (undecodable ones skipped)
    methods: list[str]
    skipped_methods: dict[str, str]  # method -> why it does not apply
    layers: list[str]
    target: str
    model_kind: str  # logits, embedding or segmentation
    image_size: tuple[int, int]
    files: dict[str, Any]
    map_status: dict[str, dict[str, int]]  # method -> maps per status (ok, blank, noise, nan, unchecked)
    metrics: dict[str, dict[str, float]] | None  # method -> mean of each faithfulness score
    warnings: list[str]
    undecodable_images: list[str]
    scores: dict[str, Any] | None = None  # method -> mean score, ranking, forwards (cam.json's summary)
    sheet: dict[str, int] | None = None  # {"shown", "of"}: the contact sheet's rows

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` summary."""
        return {
            "out": self.out, "images": self.images, "methods": self.methods, "skipped_methods": self.skipped_methods,
            "layers": self.layers, "target": self.target, "model_kind": self.model_kind,
            "image_size": list(self.image_size), "files": self.files, "map_status": self.map_status,
            "metrics": self.metrics, "warnings": self.warnings, "undecodable_images": self.undecodable_images,
            "scores": self.scores,
            "sheet": self.sheet,
        }


def _result(run: CamRun, runner: ViewRunner, warnings: list[str], undecodable: list[str],
            scored: dict[str, Any] | None = None, cut: SheetCut | None = None) -> CamResult:
    status = {m: {k: sum(s.status == k for s in run.stats[m]) for k in ("ok", "blank", "noise", "nan", "unchecked")}
              for m in run.methods}
    return CamResult(
        out=str(runner.out_dir), images=len(run.ids), methods=run.methods, skipped_methods=run.skipped,
        layers=run.layers, target=run.target, model_kind=run.model_kind, image_size=run.image_size,
        files={"contact_sheet": runner.path("contact_sheet.png"), "maps": runner.path("maps.npz"),
               **({"scores": runner.path("cam.json")} if scored is not None else {}),
               "manifest": runner.path("manifest.json"), "overlays": len(run.ids) * len(run.methods)},
        map_status=status,
        metrics={m: {k: float(np.nanmean(v)) for k, v in d.items()} for m, d in run.metrics.items() if d} or None,
        warnings=warnings, undecodable_images=undecodable, sheet=None if cut is None else cut.to_dict(),
        scores=None if scored is None else {
            "means": {m: d["mean"] for m, d in scored["methods"].items()}, "ranking": scored["ranking"],
            "forwards": scored["forwards"], "steps": scored["steps"], "step_pixels": scored["step_pixels"]},
    )
