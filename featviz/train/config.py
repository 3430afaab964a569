"""The training run's settings: ``TrainConfig`` and ``resolve_config``.

``resolve_config`` fills every default and records where it came from (saved as
``RUN_DIR/config.json``).

A method comes from one of two registries, the SSL methods' (``featviz.train.methods.SSL_METHODS``)
and the segmentation methods' (``featviz.train.segmentation.registry.SEG_METHODS``);
``registration`` finds it in either, and both kinds of registration answer what
``resolve_config`` asks (``TrainMethod``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from featviz.errors import DataError, UnknownNameError, did_you_mean
from featviz.train.optim import OPTIMIZERS, Optim

if TYPE_CHECKING:
    from featviz.data.augment import Recipe


class TrainMethod(Protocol):
    """What a registered method (SSL or segmentation) contributes to a run's defaults.

    Attributes:
        name: the registered name (``featviz train --method``).
        optim: featviz's default optimiser and schedule.
        recipe: the training views (None: the task makes its own crops, e.g. segmentation).
        local_crops: the default number of multi-crop local crops.
        presets: per built-in dataset, measured defaults (``TrainConfig`` keys).
        sync_bn: convert BatchNorm to SyncBatchNorm under CUDA DDP.
        default_arch: the backbone when ``--arch`` is not given.
        default_image_size: the training crop when neither the user nor a preset gives one
            (None: the architecture's input size).
    """

    name: str
    optim: Optim
    recipe: Recipe | None
    local_crops: int
    presets: Mapping[str, Mapping[str, Any]]
    sync_bn: bool
    default_arch: str
    default_image_size: int | None

    def for_family(self, family: str) -> TrainMethod:
        """The registration for a backbone family (``resnet``, ``vit``, ``timm``)."""
        ...


def method_names() -> list[str]:
    """Every method ``featviz train --method`` takes, SSL and segmentation, sorted."""
    from featviz.train.methods import SSL_METHODS
    from featviz.train.segmentation.registry import SEG_METHODS

    return sorted([*SSL_METHODS, *SEG_METHODS])


def registration(method: str) -> TrainMethod:
    """The registration of ``method``, from the SSL or the segmentation registry.

    Raises:
        UnknownNameError: neither registry has it (the message lists both registries' names).
    """
    from featviz.train.methods import SSL_METHODS
    from featviz.train.segmentation.registry import SEG_METHODS

    for methods in (SSL_METHODS, SEG_METHODS):
        if method in methods:
            return methods.get(method)
    names = method_names()
    raise UnknownNameError(f"unknown method {method!r}{did_you_mean(method, names)}; "
                           f"expected one of: {', '.join(names)}")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved, resolved, as ``RUN_DIR/config.json``).

    ``None`` means "the default": a built-in dataset's measured preset for the method (e.g.
    ``digits``), else the method's registration (``registration``), else featviz's
    own; ``resolve_config`` fills them in and records where each value came from in
    ``defaults``. A value the user sets always wins.

    Attributes:
        method: a registered method (``method_names``: SSL, or ``supervised_seg`` / ``cac``).
        data: an image folder, a labels CSV, ``digits``, or (segmentation) a VOC-layout folder.
        out: the run folder.
        arch: backbone architecture (``featviz.models.architectures`` names); default ``resnet18_w16-cifar``
            (segmentation: ``resnet18_w16-os8``).
        epochs, batch_size: global batch size (split over DDP processes); default 10 / 256.
        lr: peak learning rate; default: the method's lr x batch_size / its reference batch.
        optimizer: ``sgd``, ``adamw``, ``lars`` or ``larc``; default per method.
        weight_decay: default per method.
        weight_decay_end: a cosine schedule of the weight decay from ``weight_decay`` to this value
            (DINO's ``--weight_decay_end``, a separate setting as in ``main_dino.py``); default per
            method (DINO: its official end; others: none, the decay stays constant).
        warmup_epochs: linear warm-up before the cosine decay (per step); default per method
            (DINO: a tenth of the epochs, the official 10 of 100).
        image_size: training crop size; default the architecture's input size (CIFAR stems: 32),
            which is also what ``featviz embed`` uses for the checkpoint.
        stop_grad: SimSiam's stop-gradient (False = the collapse ablation).
        local_crops: multi-crop local crops (SwAV, DINO); default per method.
        min_scale: the global crops' smallest area (overrides the recipe's); hflip: flips.
        rotate, shear: a random affine (degrees) before the crop; none by default (digits preset).
        hparams: method hyperparameters (constructor keywords, e.g. ``queue_size``, ``tau``).
        precise_bn: re-estimate BatchNorm statistics before each evaluation (PreciseBN); the
            checkpoints carry the re-estimated statistics.
        eval_every: epochs between kNN / held-out evaluations (the last epoch is always evaluated).
        tsne_every: a t-SNE snapshot of the held-out features every this many epochs, when that
            epoch is evaluated (``RUN/tsne/epoch_EEEE.png``, ``featviz.maps.snapshot``); 0: none.
        threads: torch CPU threads (None = torch's default; 1 helps on a busy shared CPU).
        val_fraction: held-out share of labelled images for the kNN monitor.
        knn_k: neighbours of the kNN monitor.
        log_every: steps between metrics lines (an epoch line is always written).
        limit: use only the first N images (quick runs and tests).
        workers: DataLoader worker processes.
        amp: bf16 autocast (default: on CUDA only). channels_last: same default.
        selected_num, iou_bound, temp, weight_unsup, pos_thresh: CAC's pixel-contrast settings.
        crop: ``rrc`` (RandomResizedCrop, the recipes') or ``contrastive`` (ContrastiveCrop, Peng et
            al. 2022, ``featviz.data.contrastive_crop``): the global views' crop after a warm-up.
        crop_threshold, crop_alpha, crop_update_every, crop_warmup: ContrastiveCrop's heatmap
            threshold k, Beta alpha, epochs between box updates, warm-up epochs of plain crops;
            default the official code's (``contrastive_crop.OFFICIAL``).
        step_save: CAC: steps whose gathered negatives are kept as extra negatives (CAC's 1).
        epoch_start_unsup: CAC: epochs of supervised-only warm-up before the contrast loss (CAC's 5).
        defaults: where each resolved value came from (filled by ``resolve_config``).
    """

    method: str
    data: str
    out: str
    arch: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    weight_decay_end: float | None = None
    warmup_epochs: float | None = None
    image_size: int | None = None
    device: str = "auto"
    seed: int = 0
    stop_grad: bool = True
    local_crops: int | None = None
    min_scale: float | None = None
    hflip: bool | None = None
    rotate: float | None = None
    shear: float | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    precise_bn: bool = True
    eval_every: int = 1
    tsne_every: int = 0
    threads: int | None = None
    val_fraction: float = 0.2
    knn_k: int = 20
    log_every: int = 10
    limit: int | None = None
    workers: int = 0
    amp: bool | None = None
    channels_last: bool | None = None
    selected_num: int = 6400
    iou_bound: tuple[float, float] = (0.1, 1.0)
    temp: float = 0.1
    weight_unsup: float = 0.1
    pos_thresh: float = 0.75
    crop: str = "rrc"
    crop_threshold: float | None = None
    crop_alpha: float | None = None
    crop_update_every: int | None = None
    crop_warmup: int | None = None
    step_save: int = 1
    epoch_start_unsup: int = 5
    defaults: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values (``config.json``)."""
        d = asdict(self)
        d["iou_bound"] = list(self.iou_bound)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Settings from ``to_dict`` output (keys that are not fields, e.g. a task's record, are ignored)."""
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "iou_bound" in d:
            d["iou_bound"] = tuple(d["iou_bound"])
        return cls(**d)


RESOLVED = ("arch", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "weight_decay_end", "warmup_epochs",
            "image_size",
            "local_crops", "min_scale", "hflip", "rotate", "shear")
FEATVIZ_DEFAULTS = {"epochs": 10, "batch_size": 256}


def dataset_key(data: str) -> str | None:
    """The preset name of a built-in dataset (``digits``), else None."""
    from featviz.data.images import is_builtin

    return str(data) if is_builtin(data) else None


def input_size(arch: str) -> int:
    """The input side an architecture expects, by the models' one rule.

    That is its ``ModelDescription``'s ``input_size`` (``featviz.models.architectures.default_input_size``),
    which is what ``featviz embed`` uses by default. The architecture is built on the meta device:
    no weights are made.

    Raises:
        UnknownNameError: an architecture name ``featviz.models.architectures.parse_arch`` does not know.
    """
    import torch

    from featviz.models.architectures import build_backbone
    from featviz.models.description import describe

    with torch.device("meta"):
        height, _ = describe(build_backbone(arch)).input_size
    return int(height)


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` default of ``cfg`` and record where it came from (``cfg.defaults``).

    Order: the user's value; the method's preset for a built-in dataset (``TrainMethod.presets``,
    measured); the method's registration (its ``Optim``, local crops); featviz's defaults
    (10 epochs, batch 256, the architecture's input size). Idempotent.

    Raises:
        UnknownNameError: unknown method or optimiser.
    """
    from featviz.models import architectures as models

    spec = registration(cfg.method)
    d = cfg.to_dict()
    d["hparams"] = dict(d["hparams"])
    src: dict[str, str] = dict(cfg.defaults)
    for k in RESOLVED:
        if d[k] is not None and k not in src:
            src[k] = "user"
    for k in d["hparams"]:
        src.setdefault(f"hparams.{k}", "user")
    if d["arch"] is None:
        d["arch"] = spec.default_arch
        src["arch"] = "featviz"
    spec = spec.for_family(models.parse_arch(d["arch"]).family)
    key = dataset_key(cfg.data)
    preset = dict(spec.presets.get(key, {}) if key else {})
    if d["optimizer"] is not None and d["optimizer"] != preset.get("optimizer", spec.optim.name):
        preset.pop("lr", None)  # a preset's lr belongs to its optimiser: another one takes the method's rule
    for k, v in preset.items():
        if k == "hparams":
            for hk, hv in v.items():
                if hk not in d["hparams"]:
                    d["hparams"][hk], src[f"hparams.{hk}"] = hv, f"preset:{key}"
        elif d.get(k) is None:
            d[k], src[k] = v, f"preset:{key}"
    for k, v in FEATVIZ_DEFAULTS.items():
        if d[k] is None:
            d[k], src[k] = v, "featviz"
    optim = spec.optim
    if d["optimizer"] is None:
        d["optimizer"], src["optimizer"] = optim.name, "method"
    if d["optimizer"] not in OPTIMIZERS:
        raise UnknownNameError(f"unknown optimizer {d['optimizer']!r}; expected one of: {', '.join(OPTIMIZERS)}")
    if d["lr"] is None:
        d["lr"] = optim.lr * d["batch_size"] / optim.ref_batch
        src["lr"] = f"method ({optim.lr:g} x batch / {optim.ref_batch})"
    if d["weight_decay"] is None:
        d["weight_decay"], src["weight_decay"] = optim.weight_decay, "method"
    if d["weight_decay_end"] is None and optim.weight_decay_end is not None:
        d["weight_decay_end"], src["weight_decay_end"] = optim.weight_decay_end, "method"
    if d["warmup_epochs"] is None:
        if optim.warmup_share:
            d["warmup_epochs"] = optim.warmup_share * d["epochs"]
            src["warmup_epochs"] = f"method ({optim.warmup_share:g} x epochs)"
        else:
            d["warmup_epochs"], src["warmup_epochs"] = optim.warmup_epochs, "method"
    if d["image_size"] is None:
        d["image_size"] = spec.default_image_size or input_size(d["arch"])
        src["image_size"] = "architecture"
    if d["local_crops"] is None:
        d["local_crops"], src["local_crops"] = spec.local_crops, "method"
    if d["hflip"] is None:
        d["hflip"], src["hflip"] = True, "method"
    if d["crop"] != "rrc" and spec.recipe is None:
        raise DataError(f"--crop {d['crop']} replaces RandomResizedCrop in a method's views; {cfg.method!r} makes "
                        "its own crops (segmentation), so use an SSL method or --crop rrc")
    from featviz.data.contrastive_crop import resolve as resolve_crop

    resolve_crop(d, src)
    d["defaults"] = src
    return TrainConfig.from_dict(d)


# ---------------------------------------------------------------- RUN_DIR/config.json
CONFIG_FILE = "config.json"


def write_config(out: Path, cfg: TrainConfig, method_record: dict[str, Any]) -> dict[str, Any]:
    """Write ``RUN_DIR/config.json``: the resolved ``cfg`` plus what the task adds.

    Args:
        out: the run folder.
        cfg: the resolved settings.
        method_record: ``TrainTask.record()`` (the method's resolved hyperparameters, views,
            optimiser, kNN protocol).

    Returns:
        The record written.
    """
    from featviz.io.outputs import write_json

    record = {**cfg.to_dict(), **method_record}
    write_json(Path(out) / CONFIG_FILE, record)
    return record


def read_config(out: Path) -> TrainConfig:
    """The ``TrainConfig`` a run folder's ``config.json`` holds (what ``--resume`` compares with).

    Raises:
        FeatvizError: the file is missing, unreadable, not a JSON object, or not a run's settings.
    """
    from featviz.errors import FeatvizError

    path = Path(out) / CONFIG_FILE
    redo = "the run folder is damaged; start the run over with --force, or use a new --out"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatvizError(f"--resume: {str(path)!r} is missing; {redo}") from None
    except PermissionError:
        raise FeatvizError(f"--resume: cannot read {str(path)!r}: permission denied; check its permissions") from None
    except (ValueError, RecursionError) as e:
        raise FeatvizError(f"--resume: {str(path)!r} is not valid JSON ({str(e)[:80]}); {redo}") from None
    if not isinstance(data, dict):
        raise FeatvizError(f"--resume: {str(path)!r} must be a JSON object of the run's settings, found "
                           f"{type(data).__name__}; {redo}")
    try:
        cfg = TrainConfig.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise FeatvizError(f"--resume: {str(path)!r} does not hold a run's settings ({str(e)[:100]}); {redo}") from None
    bad = [k for k, t in (("method", str), ("data", str), ("arch", str), ("batch_size", int), ("seed", int),
                          ("epochs", int)) if not isinstance(getattr(cfg, k, None), t)]
    if bad:
        raise FeatvizError(f"--resume: {str(path)!r} has settings of the wrong type ({', '.join(bad)}); {redo}")
    return cfg
