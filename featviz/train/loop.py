"""``featviz train``: SSL and segmentation training that is resumable, monitored and DDP-ready.

One loop serves every method. A *task* (``SSLTask`` here, ``segmentation.SegTask``) owns the
model, its data and its loss; the loop owns devices, precision, DDP, the optimiser and its
schedule, checkpoints, resume, metrics and NaN handling.

Run folder (``RUN_DIR``):

- ``last.safetensors`` / ``best.safetensors``: the model in featviz's format (pickle-free;
  ``backbone.*`` + heads, metadata key ``featviz``), written atomically after every epoch.
  ``best`` is the epoch with the highest kNN accuracy (mIoU for segmentation; lowest loss
  without labels).
- ``state.pt``: what only ``--resume`` needs (full method state incl. momentum encoders and
  queues, optimiser, RNG states, epoch/step, ContrastiveCrop's boxes); a plain-tensor file
  loaded with ``weights_only=True``.
- ``boxes.npz`` (``--crop contrastive``): the training images' current boxes
  (``featviz.data.contrastive_crop``), rewritten at each update.
- ``config.json``: the resolved ``TrainConfig`` (every default filled in, ``defaults`` saying
  where each came from) plus the method's resolved hyperparameters, views and kNN protocol;
  ``metrics.jsonl``: one line per logging step and per
  epoch (``featviz.collapse.CollapseMonitor``; ``featviz collapse --watch RUN_DIR`` follows it).

Exact resume: batches come from a permutation seeded by (seed, epoch) and each sample's views
from a seed of (seed, epoch, index), so a run resumed at an epoch boundary replays exactly what
an uninterrupted run does; on CPU the final weights are identical.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from featviz.distributed import DistInfo, barrier, cleanup, init_distributed
from featviz.errors import DataError, FeatvizError, OutputError, OutputExistsError, UnknownNameError, did_you_mean
from featviz.io.outputs import atomic_path, check_place, write_json
from featviz.io.progress import Progress
from featviz.models.description import describe

log = logging.getLogger(__name__)

RUN_FILES = ("last.safetensors", "best.safetensors", "state.pt", "config.json", "metrics.jsonl", "boxes.npz")


class TrainingDivergedError(FeatvizError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved, resolved, as ``RUN_DIR/config.json``).

    ``None`` means "the default": a built-in dataset's measured preset for the method (e.g.
    ``digits``), else the method's registration (``featviz.train.methods.METHODS``), else featviz's
    own; ``resolve_config`` fills them in and records where each value came from in
    ``defaults``. A value the user sets always wins.

    Attributes:
        method: a name in ``methods.METHODS`` (SSL, or ``supervised_seg`` / ``cac``).
        data: an image folder, a labels CSV, ``digits``, or (segmentation) a VOC-layout folder.
        out: the run folder.
        arch: backbone architecture (``featviz.models.architectures`` names); default ``resnet18_w16-cifar``
            (segmentation: ``resnet18_w16-os8``).
        epochs, batch_size: global batch size (split over DDP processes); default 10 / 256.
        lr: peak learning rate; default: the method's lr x batch_size / its reference batch.
        optimizer: ``sgd``, ``adamw``, ``lars`` or ``larc``; default per method.
        weight_decay: default per method (DINO: a cosine schedule to its ``weight_decay_end``).
        warmup_epochs: linear warm-up before the cosine decay (per step).
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
        d = asdict(self)
        d["iou_bound"] = list(self.iou_bound)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "iou_bound" in d:
            d["iou_bound"] = tuple(d["iou_bound"])
        return cls(**d)


RESOLVED = ("arch", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "warmup_epochs", "image_size",
            "local_crops", "min_scale", "hflip", "rotate", "shear")
FEATVIZ_DEFAULTS = {"epochs": 10, "batch_size": 256}
OPTIMIZERS = ("sgd", "adamw", "lars", "larc")


def dataset_key(data: str) -> str | None:
    """The preset name of a built-in dataset (``digits``), else None."""
    from featviz.data.images import BUILTIN

    return str(data) if str(data) in BUILTIN else None


def input_size(arch: str) -> int:
    """The input side an architecture expects (what ``featviz embed`` uses by default)."""
    from featviz.models.architectures import parse_arch

    spec = parse_arch(arch)
    if spec.family == "vit":
        import re

        m = re.search(r"_(\d+)$", spec.name)
        return int(m.group(1)) if m else 224
    return 32 if "-cifar" in spec.name else 224


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` default of ``cfg`` and record where it came from (``cfg.defaults``).

    Order: the user's value; the method's preset for a built-in dataset (``MethodSpec.presets``,
    measured); the method's registration (its ``Optim``, local crops); featviz's defaults
    (10 epochs, batch 256, the architecture's input size). Idempotent.

    Raises:
        UnknownNameError: unknown method or optimiser.
    """
    from featviz.models import architectures as models
    from featviz.train import methods

    if cfg.method not in methods.METHODS:
        names = methods.METHODS.names()
        raise UnknownNameError(f"unknown method {cfg.method!r}{did_you_mean(cfg.method, names)}; "
                               f"expected one of: {', '.join(names)}")
    spec = methods.METHODS.get(cfg.method)
    d = cfg.to_dict()
    d["hparams"] = dict(d["hparams"])
    src: dict[str, str] = dict(cfg.defaults)
    for k in RESOLVED:
        if d[k] is not None and k not in src:
            src[k] = "user"
    for k in d["hparams"]:
        src.setdefault(f"hparams.{k}", "user")
    if d["arch"] is None:
        d["arch"] = "resnet18_w16-os8" if spec.kind == "segmentation" else "resnet18_w16-cifar"
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
    if d["warmup_epochs"] is None:
        d["warmup_epochs"], src["warmup_epochs"] = optim.warmup_epochs, "method"
    if d["image_size"] is None:
        d["image_size"] = 32 if spec.kind == "segmentation" else input_size(d["arch"])
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


@dataclass
class TrainResult:
    """What a run produced: paths, the last epoch's numbers and the timing."""

    out: Path
    last: Path
    best: Path
    epochs: int
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "last": str(self.last), "best": str(self.best), "epochs": self.epochs,
                "steps": self.steps, "seconds": round(self.seconds, 2),
                "final": self.history[-1] if self.history else {}}


# ---------------------------------------------------------------- data order
def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, info: DistInfo) -> list[list[int]]:
    """This rank's share of each global batch of a seeded epoch permutation (drop_last)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per = batch_size // info.world_size
    out = []
    for b in range(n // batch_size):
        chunk = perm[b * batch_size:(b + 1) * batch_size]
        out.append(chunk[info.rank * per:(info.rank + 1) * per])
    return out


# ---------------------------------------------------------------- the kNN monitor (its protocol, public)
KNN_T = 0.07  # DINO eval_knn.py's temperature
KNN_BANK_MAX, KNN_QUERIES_MAX = 5000, 2000
EVAL_BATCH = 256


def held_out_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of the kNN monitor: a seeded permutation, the first
    ``round(n * val_fraction)`` held out; nothing is held out without labels (or one class)."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(len(labels) * val_fraction)) if (labels >= 0).all() and len(set(labels.tolist())) > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def knn_sets(train_idx: np.ndarray, val_idx: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The bank (training images) and queries (held-out images) the monitor embeds: the first
    5000 / 2000 of each, fewer for large images (features cached within ~400 MB)."""
    cap = max(300, int(4e8 // (3 * image_size ** 2 * 4)))
    return train_idx[:min(KNN_BANK_MAX, cap * 2 // 3)], val_idx[:min(KNN_QUERIES_MAX, cap // 3)]


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, t: float = KNN_T) -> float:
    """Weighted kNN on cosine similarity (InstDisc / DINO ``eval_knn``): l2-normalised features,
    the ``k`` most similar bank images vote with weights exp(sim / t); ties go to the lower class."""
    train_f = nn.functional.normalize(torch.as_tensor(train_f).float(), dim=1)
    test_f = nn.functional.normalize(torch.as_tensor(test_f).float(), dim=1)
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), 1024):
        sim = test_f[i:i + 1024] @ train_f.T
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(idx), n_cls).scatter_add_(1, train_y[idx], (w / t).exp())
        correct += int((votes.argmax(1) == test_y[i:i + 1024]).sum())
    return correct / len(test_f)


def knn_protocol(cfg: TrainConfig, n_bank: int, n_queries: int) -> dict[str, Any]:
    """The kNN monitor's protocol, as stored in metrics lines and checkpoints."""
    return {"k": cfg.knn_k, "t": KNN_T, "vote": "weighted exp(cos/t)", "features": "backbone, l2-normalised",
            "split": {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "limit": cfg.limit},
            "n_bank": n_bank, "n_queries": n_queries, "image_size": cfg.image_size,
            "transform": "featviz.data.images.eval_transform", "batchnorm": "eval mode, the checkpoint's statistics "
            + ("(PreciseBN: re-estimated on training images)" if cfg.precise_bn else "(running averages)"),
            "batch_size": EVAL_BATCH}


def checkpoint_knn(checkpoint: str | Path, *, device: str = "cpu") -> dict[str, Any]:
    """Recompute the kNN accuracy a run logged, from its exported checkpoint alone.

    Reads the protocol from the checkpoint's metadata (``training.knn``), loads the backbone
    with ``featviz.models.loader.load_model`` (eval mode, the checkpoint's BatchNorm statistics), embeds
    the bank and the queries with ``featviz.eval.embed.embed_images`` and scores them with
    ``knn_accuracy``.

    Returns:
        ``{"knn_acc": ..., "logged": ..., "protocol": ...}``.

    Raises:
        DataError: the checkpoint was not written by ``featviz train`` with a kNN monitor.
    """
    from featviz.data import images as data
    from featviz.eval.embed import embed_images
    from featviz.models.checkpoints import read_featviz
    from featviz.models.loader import load_model

    _, meta = read_featviz(checkpoint)
    training = meta.get("training") or {}
    proto, cfg = training.get("knn"), training.get("config") or {}
    if not proto or "knn_acc" not in training:
        raise DataError(f"{str(checkpoint)!r} has no kNN protocol in its metadata; expected a checkpoint "
                        "of `featviz train` on labelled images")
    imgs = data.labelled_images(cfg["data"], image_size=proto["image_size"])
    n = proto["split"]["limit"] or len(imgs)
    labels = np.asarray(imgs.labels[:n])
    train_idx, val_idx = held_out_split(labels, proto["split"]["val_fraction"], proto["split"]["seed"])
    bank, queries = train_idx[:proto["n_bank"]], val_idx[:proto["n_queries"]]
    idx = np.concatenate([bank, queries])
    model = load_model(checkpoint).model
    f = embed_images(model, [imgs.items[i] for i in idx], image_size=proto["image_size"],
                     batch_size=proto["batch_size"], device=device, strict=True)
    x = torch.from_numpy(f.features)
    acc = knn_accuracy(x[:len(bank)], labels[bank], x[len(bank):], labels[queries], proto["k"], proto["t"])
    return {"knn_acc": acc, "logged": training["knn_acc"], "protocol": proto}


# ---------------------------------------------------------------- SSL task
class SSLTask:
    """An image SSL method on an image folder / CSV / ``digits``, with a kNN monitor."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        from featviz.data import augment
        from featviz.data import images as data
        from featviz.models import architectures as models
        from featviz.train import methods

        cfg = resolve_config(cfg)
        self.cfg, self.info = cfg, info
        backbone = models.build_backbone(cfg.arch, seed=cfg.seed)
        self.spec = methods.METHODS.get(cfg.method).for_family(methods.arch_family(backbone))
        imgs = data.labelled_images(cfg.data, image_size=cfg.image_size)
        if cfg.limit:
            imgs = data.LabelledImages(imgs.items[:cfg.limit], imgs.labels[:cfg.limit], imgs.class_names,
                                       imgs.ids[:cfg.limit])
        self.class_names = imgs.class_names
        labels = np.asarray(imgs.labels)
        self.train_idx, self.val_idx = held_out_split(labels, cfg.val_fraction, cfg.seed)
        n_val = len(self.val_idx)
        if len(self.train_idx) < cfg.batch_size:
            raise DataError(f"{cfg.data!r} has {len(self.train_idx)} training images"
                            f"{f' (after holding out {n_val} for the kNN monitor)' if n_val else ''}, fewer "
                            f"than one batch of {cfg.batch_size}; lower --batch-size or add images")
        if cfg.batch_size % info.world_size:
            raise DataError(f"--batch-size {cfg.batch_size} must divide evenly over {info.world_size} processes")
        hp = dict(cfg.hparams)
        if not cfg.stop_grad:
            if cfg.method != "simsiam":
                raise DataError(f"--no-stop-grad is SimSiam's ablation; method {cfg.method!r} has no such switch")
            hp["stop_grad"] = False
        ctx = methods.DataContext(n_train=len(self.train_idx), batch_size=cfg.batch_size, epochs=cfg.epochs,
                                  image_size=cfg.image_size, feature_dim=models.feature_dim(backbone),
                                  world_size=info.world_size, family=methods.arch_family(backbone))
        auto = self.spec.defaults(ctx) if self.spec.defaults else {}
        self.hparam_sources = {k: "data (methods._*_defaults)" for k in auto if k not in hp}
        self.model = methods.build_method(cfg.method, backbone, **{**auto, **hp})
        self.items = [imgs.items[i] for i in self.train_idx]
        self.labels = labels[self.train_idx]
        self.all_items, self.all_labels = imgs.items, labels
        recipe = self.spec.recipe
        local = cfg.local_crops if self.spec.multi_crop else 0
        if not local:
            recipe = recipe.without_local()
        self.recipe = recipe.adjusted(min_scale=cfg.min_scale, hflip=cfg.hflip, rotate=cfg.rotate, shear=cfg.shear)
        self.mean, self.std = data.IMAGENET_MEAN, data.IMAGENET_STD
        self.boxes = None  # ContrastiveCrop's boxes of the training images (featviz.data.contrastive_crop)
        if cfg.crop == "contrastive":
            from featviz.data.contrastive_crop import BoxTracker, CropSchedule

            schedule = CropSchedule(cfg.crop_threshold, cfg.crop_alpha, cfg.crop_warmup, cfg.crop_update_every,
                                    cfg.epochs)
            self.boxes = BoxTracker(schedule, self.items, [imgs.ids[i] for i in self.train_idx] if imgs.ids else
                                    [str(i) for i in self.train_idx], image_size=cfg.image_size, mean=self.mean,
                                    std=self.std)
        views = augment.MultiView(self.recipe, cfg.image_size, local_crops=local, mean=self.mean, std=self.std,
                                  crop_alpha=cfg.crop_alpha if self.boxes else None)
        self.dataset = augment.ViewDataset(self.items, self.labels, views, seed=cfg.seed)
        self.collate = augment.collate_views
        self._eval_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._held_out_aug: tuple[torch.Tensor, torch.Tensor] | None = None
        self.held_out_z: tuple[torch.Tensor, torch.Tensor] | None = None
        self.held_out_alignment: float | None = None
        self.bank_idx, self.query_idx = knn_sets(self.train_idx, self.val_idx, cfg.image_size)

    @property
    def n(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.model.set_epoch(epoch)
        if self.boxes is not None:  # warm-up: RandomResizedCrop; then ContrastiveCrop in the current boxes
            self.dataset.boxes = self.boxes.for_epoch(epoch)

    def after_epoch(self, epoch: int, step: int, device: torch.device) -> dict[str, Any] | None:
        """ContrastiveCrop: recompute the boxes with the online backbone in eval mode when the
        schedule says so (every rank its shard, then all-gathered); the metrics record, or None."""
        if self.boxes is None:
            return None
        rec = self.boxes.update(self.model.backbone, epoch, step, device=device, info=self.info)
        if rec and self.info.is_main:
            self.boxes.save(Path(self.cfg.out) / "boxes.npz")
        return rec

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.boxes.state() if self.boxes is not None else {}

    def load_extra_state(self, st: dict[str, Any]) -> None:
        if self.boxes is not None:
            self.boxes.load_state(st)

    def loss(self, model: nn.Module, batch, device: torch.device, channels_last: bool) -> torch.Tensor:
        views = [v.to(device, non_blocking=True) for v in batch[0]]
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return model(views)

    def before_step(self, step: int) -> None:
        clip = self.spec.optim.clip_grad
        if clip:  # DINO utils.clip_gradients: each parameter's gradient norm at most ``clip``
            for p in self.model.parameters():
                if p.grad is not None:
                    norm = p.grad.detach().norm(2)
                    coef = clip / (norm + 1e-6)
                    if coef < 1:
                        p.grad.mul_(coef)
        self.model.before_step(step)

    def after_step(self, step: int, total: int) -> None:
        self.model.on_step_end(step / max(1, total))

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.model.embeddings

    def _eval_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank and query images through ``eval_transform``, in index order (float32, cached)."""
        if self._eval_cache is None:
            from featviz.data.images import ImageDataset, collate, eval_transform

            idx = np.concatenate([self.bank_idx, self.query_idx])
            ds = ImageDataset([self.all_items[i] for i in idx], self.all_labels[idx],
                              eval_transform(self.cfg.image_size, self.mean, self.std), strict=True)
            x, y, _, _ = collate([ds[i] for i in range(len(ds))])
            self._eval_cache = (x, y)
        return self._eval_cache

    def _held_out_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of each held-out query image from the method's recipe (Wang & Isola's
        alignment pairs), the same every epoch."""
        if self._held_out_aug is None:
            from featviz.data import augment

            items = [self.all_items[i] for i in self.query_idx]
            views = augment.MultiView(self.recipe, self.cfg.image_size, mean=self.mean, std=self.std)
            ds = augment.ViewDataset(items, self.all_labels[self.query_idx], views, seed=self.cfg.seed + 1)
            pairs = [ds[i][0] for i in range(len(ds))]
            self._held_out_aug = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        return self._held_out_aug

    @torch.no_grad()
    def _precise_bn(self, device: torch.device, x: torch.Tensor, batches: int = 8) -> None:
        """Re-estimate the BatchNorm running statistics of the exported and the monitored modules
        as exact averages over up to ``batches`` training batches (PreciseBN, Wu & Johnson 2021).

        The running averages lag the weights by ~10 steps (momentum 0.1); after an epoch of a few
        dozen steps that lag alone made a healthy SimSiam look half collapsed in eval mode. The
        statistics never enter a train-mode forward, so training is unchanged; checkpoints get the
        better ones. Split BatchNorm (MoCo v2) is measured unsplit. Skipped under DDP, where SyncBN
        would need every rank (its epochs are long).
        """
        from featviz.train.methods import set_bn_splits

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return
        model = self.model
        exported = model.exported()
        paths = [[exported["backbone"], *[m for k, m in exported.items() if k == "projector"]]]
        monitored = model.monitored_modules()
        if not all(any(m is p for p in paths[0]) for m in monitored):  # DINO: the student, not the teacher
            paths.append(monitored)
        bs = max(2, self.cfg.batch_size)
        set_bn_splits(model, 1)
        try:
            for mods in paths:
                bns = [m for mod in mods for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
                if not bns:
                    continue
                momenta = [bn.momentum for bn in bns]
                for bn in bns:
                    bn.reset_running_stats()
                    bn.momentum = None  # cumulative average
                for mod in mods:
                    mod.train()
                for i in range(0, min(len(x), batches * bs), bs):
                    if len(x) - i >= 2:
                        z = x[i:i + bs].to(device)
                        for mod in mods:
                            z = mod(z)
                for bn, m in zip(bns, momenta, strict=True):
                    bn.momentum = m
        finally:
            set_bn_splits(model, getattr(model, "bn_splits", 1) if getattr(model, "shuffle_bn", False) else 1)

    @torch.no_grad()
    def features(self, module: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``module(x)`` in batches of ``EVAL_BATCH`` (as ``featviz embed`` runs them), on CPU float32."""
        return torch.cat([module(x[i:i + EVAL_BATCH].to(device)).float().cpu() for i in range(0, len(x), EVAL_BATCH)])

    @torch.no_grad()
    def evaluate(self, device: torch.device) -> dict[str, Any]:
        """kNN accuracy of the exported backbone on the held-out split (empty without labels).

        The protocol (``knn_protocol``, stored with every checkpoint; ``checkpoint_knn``
        recomputes it from the file): the bank is the first training images, the queries the
        held-out ones, all through ``eval_transform`` at the training size; the exported backbone
        in eval mode with the BatchNorm statistics the checkpoint carries (PreciseBN); weighted
        kNN on l2-normalised features, k = ``knn_k``, t = 0.07.

        Also keeps ``held_out_z``, for the epoch's collapse metrics: the monitored output
        (``SSLMethod.monitored``) in eval mode of the held-out images as they are (std, rank,
        uniformity), and ``held_out_alignment`` between two augmented views of each (Wang &
        Isola). With a predictor, adds ``std_l2_predictor``/``rankme_predictor`` of its output:
        a projector ending in BatchNorm (SimSiam, MoCo v3) cannot output one vector for a whole
        batch, so a collapsed model sends almost every image to one point and ~1.5 % to its
        opposite, and std_l2 of z stays near 2*sqrt(p(1-p)) ~ 0.25 x 1/sqrt(d); the predictor has
        no BN at its end and shows the point (digits without stop-gradient: 0.26 x for z, 0.023 x
        for p).
        """
        if not len(self.query_idx):
            return {}
        from featviz.collapse import alignment

        model = self.model
        was = model.training
        x, y = self._eval_tensors()
        n_tr = len(self.bank_idx)
        if self.cfg.precise_bn:
            self._precise_bn(device, x[:n_tr])
        model.eval()
        feats = self.features(model.exported()["backbone"], x, device)
        v1, v2 = self._held_out_views()
        mon = lambda t: torch.cat([model.monitored(t[i:i + EVAL_BATCH].to(device)).cpu()  # noqa: E731
                                   for i in range(0, len(t), EVAL_BATCH)])
        self.held_out_z = (mon(x[n_tr:]), None)
        a1, a2 = mon(v1), mon(v2)
        self.held_out_alignment = alignment(a1.numpy(), a2.numpy())
        out: dict[str, Any] = {"knn_acc": knn_accuracy(feats[:n_tr], y[:n_tr], feats[n_tr:], y[n_tr:], self.cfg.knn_k)}
        if "predictor" in model.head_specs and model.monitor_head == "projector":
            from featviz.collapse import rankme, std_l2

            # the predictor's output has no BatchNorm at its end: a collapse to one point shows
            # there even when the projector's final BN keeps a few outliers per batch
            z = self.held_out_z[0]
            p = torch.cat([model.predictor(z[i:i + 512].to(device)).float().cpu() for i in range(0, len(z), 512)])
            out.update(std_l2_predictor=std_l2(p.numpy()), rankme_predictor=rankme(p.numpy()))
        model.train(was)
        return out

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (``backbone.*``, heads) and metadata for the model checkpoint."""
        tensors = {f"{prefix}.{k}": v for prefix, mod in self.model.exported().items()
                   for k, v in mod.state_dict().items()}
        meta = {"arch": describe(self.model.backbone).arch.to_dict(),
                "normalization": {"mean": list(self.mean), "std": list(self.std)},
                "input_size": self.cfg.image_size,
                "source_format": "featviz", "method": self.cfg.method, "heads": self.model.head_specs,
                "hparams": {**self.model.hparams, "stop_grad": self.cfg.stop_grad}, "class_names": self.class_names,
                "recipe": self.recipe.to_dict()}
        return tensors, meta

    def record(self) -> dict[str, Any]:
        """What the run's config.json adds to the ``TrainConfig``: the resolved method settings."""
        return {"hparams_resolved": self.model.hparams, "hparam_sources": self.hparam_sources,
                "recipe": self.recipe.to_dict(), "optim": self.spec.optim.to_dict(),
                "contrastive_crop": self.boxes.schedule.to_dict() if self.boxes is not None else None,
                "knn": knn_protocol(self.cfg, len(self.bank_idx), len(self.query_idx)) if len(self.query_idx) else None}


# ---------------------------------------------------------------- the loop
def _make_task(cfg: TrainConfig, info: DistInfo):
    from featviz.train import methods

    spec = methods.METHODS.get(cfg.method)
    if spec.kind == "segmentation":
        return spec.model_class()(cfg, info)
    return SSLTask(cfg, info)


def _lr_at(step: int, total: int, warmup: int, peak: float, final: float = 0.0) -> float:
    """Linear warm-up to ``peak``, then a half cosine to ``final`` x peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    q = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return peak * (q + final * (1 - q))


def _wd_at(step: int, total: int, start: float, end: float | None) -> float:
    """DINO ``utils.cosine_scheduler`` for the weight decay: ``start`` -> ``end`` over the run."""
    if end is None or end == start:
        return start
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / max(1, total)))


def schedule_step(opt: torch.optim.Optimizer, step: int, total: int, warmup: int, peak: float, final: float,
                  wd: float, wd_end: float | None) -> float:
    """Set every group's lr and weight decay for ``step``; returns the scheduled lr.

    Groups with ``fix_lr`` keep the peak lr (SimSiam ``--fix-pred-lr``); ``lr_scale`` multiplies
    (Barlow Twins' bias lr); groups with weight decay follow ``_wd_at`` (DINO's cosine)."""
    lr = _lr_at(step, total, warmup, peak, final)
    w = _wd_at(step, total, wd, wd_end)
    for g in opt.param_groups:
        g["lr"] = (peak if g.get("fix_lr") else lr) * g.get("lr_scale", 1.0)
        if g.get("base_weight_decay"):
            g["weight_decay"] = w
    return lr


class LARS(torch.optim.Optimizer):
    """LARS as the official SSL repositories write it (Barlow Twins ``main.py``, BYOL
    ``utils/optimizers.py``, MoCo v3 ``moco/optimizer.py``, DINO ``utils.py``): the weight decay
    is added to the gradient, the result scaled by eta * ||w|| / ||g + wd w||, then SGD momentum
    (mu = m mu + update; w -= lr mu). Groups with ``lars_exclude`` (biases, norms) skip the
    scaling. timm's ``Lars`` is APEX's LARC (||g|| + wd ||w|| in the denominator), which SwAV uses
    (``larc``), so it is not used here."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad
                if not g["lars_exclude"]:
                    w_norm, u_norm = torch.norm(p), torch.norm(dp)
                    q = torch.where((w_norm > 0) & (u_norm > 0), g["eta"] * w_norm / u_norm, torch.ones_like(w_norm))
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def param_groups(model: nn.Module, optim, *, weight_decay: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: weights, and biases / norm parameters (1-D, no decay
    unless ``optim.decay_bias_norm``; lr x ``optim.bias_lr``), each split by ``optim.fixed_lr``
    module prefixes (their lr is not decayed)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_1d = p.ndim <= 1 or name.endswith(".bias")
        fixed = any(name == f or name.startswith(f"{f}.") for f in optim.fixed_lr)
        groups.setdefault((is_1d, fixed), []).append(p)
    out = []
    for (is_1d, fixed), params in sorted(groups.items()):
        decay = weight_decay if (optim.decay_bias_norm or not is_1d) else 0.0
        out.append({"params": params, "weight_decay": decay, "base_weight_decay": decay,
                    "lr_scale": optim.bias_lr if is_1d else 1.0, "fix_lr": fixed,
                    "lars_exclude": is_1d and not optim.decay_bias_norm, "name": f"{'1d' if is_1d else 'weights'}"
                    f"{'+fixed_lr' if fixed else ''}"})
    return out


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, momentum: float = 0.9):
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "larc":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=momentum, trust_coeff=0.001, trust_clip=False, always_adapt=True)
    raise UnknownNameError(f"unknown optimizer {name!r}; expected one of: {', '.join(OPTIMIZERS)}")


def _prepare_run_dir(cfg: TrainConfig, *, resume: bool, force: bool) -> Path:
    out = Path(cfg.out)
    present = [f for f in RUN_FILES if (out / f).exists()]
    if resume:
        if not (out / "state.pt").exists():
            if present:  # config.json etc. but no finished epoch: a run stopped before its first epoch ended
                raise OutputExistsError(f"--resume: the run in {str(out)!r} stopped before its first epoch ended, "
                                        "so there is no state.pt to resume from; start it over with --force")
            raise OutputExistsError(f"--resume: {str(out)!r} has no run to resume (no state.pt); "
                                    "start a new run without --resume")
        saved = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
        for key in ("method", "data", "arch", "batch_size", "seed", "image_size", "stop_grad", "limit", "crop"):
            if getattr(saved, key) != getattr(cfg, key):
                raise FeatvizError(f"--resume: {key} is {getattr(cfg, key)!r} but the run in {str(out)!r} used "
                                   f"{getattr(saved, key)!r}; resume with the same settings or use a new --out")
        return check_place(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {str(out)!r} is a file; expected a run folder")
    if out.is_dir() and not present and any(out.iterdir()):
        raise OutputError(f"run folder {str(out)!r} is not empty and holds no featviz run; --force only replaces "
                          "featviz's run files, so choose a new or empty folder")
    if present and not force:
        how = "pass --resume to continue it or --force to start over" if (out / "state.pt").exists() else \
            "it stopped before its first epoch ended (no state.pt to resume); pass --force to start over"
        raise OutputExistsError(f"run folder {str(out)!r} already exists; {how}")
    check_place(out)  # writable, no file in the way
    for f in present:  # --force: remove only featviz's own run files, never the user's others
        (out / f).unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _rng_state() -> dict[str, torch.Tensor]:
    import random

    st = {"torch": torch.random.get_rng_state(),
          "numpy": torch.tensor(np.frombuffer(json.dumps(_np_state()).encode(), np.uint8).copy()),
          "python": torch.tensor(np.frombuffer(json.dumps(random.getstate()).encode(), np.uint8).copy())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_rng_state(st: dict[str, torch.Tensor]) -> None:
    import random

    torch.random.set_rng_state(st["torch"])
    name, keys, pos, hg, cached = json.loads(bytes(st["numpy"].numpy()).decode())
    np.random.set_state((name, np.array(keys, np.uint32), pos, hg, cached))
    py = json.loads(bytes(st["python"].numpy()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _save_model(path: Path, task, extra_meta: dict[str, Any]) -> None:
    from featviz.models.checkpoints import save_featviz

    tensors, meta = task.export()
    save_featviz(path, tensors, {**meta, "training": extra_meta}, force=True)


def _save_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int,
                best: float | None, history: list, extra: dict[str, torch.Tensor] | None = None) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(),
             "epoch": torch.tensor(epoch), "step": torch.tensor(step),
             "best": torch.tensor(float("nan") if best is None else best),
             "history": torch.tensor(np.frombuffer(json.dumps(history).encode(), np.uint8).copy()),
             **(extra or {})}
    with atomic_path(out / "state.pt") as tmp:
        torch.save(state, tmp)


def _choose_precision(cfg: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    amp = device.type == "cuda" if cfg.amp is None else cfg.amp
    cl = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    if amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16; training in float32 instead of bf16 autocast")
        amp = False
    return amp, cl


def train(config: TrainConfig, *, resume: bool = False, force: bool = False,
          progress: Progress | None = None, on_log: Callable[[dict[str, Any]], None] | None = None,
          ) -> TrainResult | None:
    """Train ``config.method`` and write checkpoints and metrics to ``config.out``.

    Args:
        config: the run's settings (``None`` fields take the defaults of ``resolve_config``).
        resume: continue the run in ``config.out`` from its last epoch (same settings required).
        force: start over in an existing run folder (removes only featviz's run files).
        progress: wraps the batch iterable, e.g. a rich progress bar (called as
            ``progress(iterable, total=n)``); the loop sets ``.description`` of nothing itself.
        on_log: called with each metrics record (loss, lr, throughput, ...) as it is written.

    Returns:
        The result on the main process; None on the other DDP ranks.

    Raises:
        OutputExistsError: ``out`` exists without ``resume``/``force``, or ``resume`` finds nothing.
        DataError: the dataset is smaller than one batch, or unreadable.
        UnknownNameError: unknown method, optimiser, hyperparameter or architecture.
        TrainingDivergedError: the loss became NaN/Inf (the last good checkpoint is kept).
    """
    from featviz.collapse import CollapseMonitor

    cfg = resolve_config(config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    try:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        if info.is_main:
            check_place(cfg.out)  # a folder that cannot be written: said before the data and the model are built
        task = _make_task(cfg, info)  # validates method/arch/data before touching RUN_DIR
        out = Path(cfg.out)
        record = {**cfg.to_dict(), **(task.record() if hasattr(task, "record") else {})}
        if info.is_main:
            out = _prepare_run_dir(cfg, resume=resume, force=force)
            write_json(out / "config.json", record)
        barrier(info)
        result = _run(cfg, task, info, out, resume=resume, progress=progress, on_log=on_log,
                      monitor_cls=CollapseMonitor, record=record)
        return result if info.is_main else None
    finally:
        cleanup(info)


def _run(cfg: TrainConfig, task, info: DistInfo, out: Path, *, resume: bool, progress, on_log, monitor_cls,
         record: dict[str, Any]):
    from featviz.train.methods import METHODS

    device = info.device
    amp, channels_last = _choose_precision(cfg, device)
    spec = METHODS.get(cfg.method)
    optim = getattr(task, "spec", spec).optim
    model = task.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if info.enabled:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if device.type == "cuda" and spec.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif has_bn and spec.sync_bn:
            log.warning("SyncBatchNorm needs CUDA; on CPU each process normalises its own shard of the batch")
        task.model = model
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = model

    groups = param_groups(model, optim, weight_decay=cfg.weight_decay)
    opt = build_optimizer(cfg.optimizer, groups, cfg.lr, momentum=optim.momentum)
    wd_end = None
    if optim.weight_decay_end is not None and cfg.defaults.get("weight_decay") != "user":
        wd_end = optim.weight_decay_end * cfg.weight_decay / optim.weight_decay if optim.weight_decay else None

    steps_per_epoch = task.n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    epoch0, step, best, history = 0, 0, None, []
    if resume:
        st = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        _set_rng_state(st["rng"])
        epoch0, step = int(st["epoch"]), int(st["step"])
        best = None if math.isnan(float(st["best"])) else float(st["best"])
        history = json.loads(bytes(st["history"].numpy()).decode())
        if hasattr(task, "load_extra_state"):
            task.load_extra_state(st)
        _truncate_metrics(out / "metrics.jsonl", step)
        log.info("resuming %s at epoch %d (step %d)", out, epoch0, step)
    monitor = monitor_cls(out, every=1, enabled=info.is_main)  # the loop decides when to log
    wrap = progress or (lambda it, total=None: it)
    t_start = time.perf_counter()
    last_good = out / "last.safetensors"
    set_epoch = getattr(task, "set_epoch", None) or task.dataset.set_epoch
    before_step = getattr(task, "before_step", lambda step: None)
    after_epoch = getattr(task, "after_epoch", lambda epoch, step, device: None)  # every rank

    for epoch in range(epoch0, cfg.epochs):
        model.train()
        set_epoch(epoch)
        batches = epoch_batches(task.n, cfg.batch_size, epoch, cfg.seed, info)
        loader = torch.utils.data.DataLoader(task.dataset, batch_sampler=batches, collate_fn=task.collate,
                                             num_workers=cfg.workers, pin_memory=device.type == "cuda")
        losses, t_epoch, seen = [], time.perf_counter(), 0
        for batch in wrap(loader, total=len(batches)):
            lr = schedule_step(opt, step, total, warmup, cfg.lr, optim.final_lr, cfg.weight_decay, wd_end)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = task.loss(ddp, batch, device, channels_last)
            if not torch.isfinite(loss):
                if info.is_main:
                    _append(out / "metrics.jsonl", {"event": "diverged", "step": step, "epoch": epoch, "lr": lr})
                kept = f"; the last good checkpoint is {str(last_good)!r}" if last_good.exists() else \
                    "; no epoch finished, so there is no checkpoint"
                raise TrainingDivergedError(
                    f"loss became {float(loss.detach())} at epoch {epoch}, step {step} ({cfg.method}, "
                    f"lr {lr:.3g}){kept}; lower --lr or add --warmup-epochs")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before_step(step)
            opt.step()
            task.after_step(step, total)
            step += 1
            losses.append(float(loss.detach()))
            seen += cfg.batch_size  # drop_last: every global batch is full
            if step % cfg.log_every == 0 and info.is_main:
                rec = _log(monitor, task, out, step, kind="step", loss=losses[-1], lr=lr, epoch=epoch + 1,
                           images_per_s=round(seen / (time.perf_counter() - t_epoch), 1),
                           **getattr(task, "last_parts", {}))
                if rec and on_log:
                    on_log(rec)
        if not losses:
            raise DataError(f"epoch {epoch} ran no step: {task.n} images, batch {cfg.batch_size}")
        train_seconds = time.perf_counter() - t_epoch
        evaluate = info.is_main and ((epoch + 1) % max(1, cfg.eval_every) == 0 or epoch + 1 == cfg.epochs)
        ev = task.evaluate(device) if evaluate else {}
        mean_loss = float(np.mean(losses))
        score = ev.get("knn_acc", ev.get("miou"))
        better = evaluate and ((score is not None and (best is None or score > best)) or
                               (score is None and (best is None or -mean_loss > best)))
        if better:
            best = score if score is not None else -mean_loss
        row = {"epoch": epoch + 1, "step": step, "loss": mean_loss, "lr": lr,
               "images_per_s": seen / train_seconds, "train_seconds": round(train_seconds, 3), **ev}
        history.append(row)
        if info.is_main:
            rec = _log(monitor, task, out, step, kind="epoch", held_out=evaluate,
                       **{k: v for k, v in row.items() if k != "step"})
            if rec and on_log:
                on_log(rec)
        boxes_rec = after_epoch(epoch, step, device)  # ContrastiveCrop's box update (all ranks take part)
        if info.is_main:
            if boxes_rec:
                _append(out / "metrics.jsonl", boxes_rec)
                if on_log:
                    on_log(boxes_rec)
            meta = {"epoch": epoch + 1, "step": step, **ev, "loss": mean_loss,
                    "knn": record.get("knn"), "config": {k: record[k] for k in ("data", "seed", "limit", "method")}}
            _save_model(out / "last.safetensors", task, meta)
            if better:
                _save_model(out / "best.safetensors", task, meta)
            _save_state(out, model, opt, epoch + 1, step, best, history,
                        task.extra_state() if hasattr(task, "extra_state") else None)
        barrier(info)
    monitor.close()
    return TrainResult(out, out / "last.safetensors", out / "best.safetensors", cfg.epochs, step, history,
                       time.perf_counter() - t_start, record)


def _log(monitor, task, out: Path, step: int, *, held_out: bool = False, **values: Any) -> dict[str, Any]:
    """One metrics line: collapse metrics plus ``values``.

    Step lines measure the last training batch (train mode; alignment between its two views);
    epoch lines (``held_out``) measure the held-out images in eval mode when the task has them
    (alignment between two augmented views of each). ``split`` says which.
    """
    z = getattr(task, "held_out_z", None) if held_out else None
    split = "held_out" if z is not None else "train_batch"
    if z is not None and getattr(task, "held_out_alignment", None) is not None:
        values = {**values, "alignment": task.held_out_alignment}  # two augmented views (Wang & Isola)
    z = z if z is not None else task.embeddings()
    if z is not None:
        return monitor.update(z[0], z[1], step=step, split=split, **values)
    rec = {"step": step, "time": round(time.time(), 3), **values}
    _append(out / "metrics.jsonl", rec)
    return rec


def _append(path: Path, record: dict[str, Any]) -> None:
    from featviz.collapse import append_jsonl

    append_jsonl(path, record)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past the resumed step (and the old 'done' marker) so none repeat."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "done" or (rec.get("step") is not None and rec["step"] > step):
            continue
        keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in keep))
