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
  queues, optimiser, RNG states, epoch/step); a plain-tensor file loaded with
  ``weights_only=True``.
- ``config.json``: the ``TrainConfig``; ``metrics.jsonl``: one line per logging step and per
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

from featviz.description import describe
from featviz.distributed import DistInfo, barrier, cleanup, init_distributed
from featviz.errors import DataError, FeatvizError, OutputError, OutputExistsError, UnknownNameError, did_you_mean
from featviz.outputs import atomic_path, check_place, write_json
from featviz.progress import Progress

log = logging.getLogger(__name__)

RUN_FILES = ("last.safetensors", "best.safetensors", "state.pt", "config.json", "metrics.jsonl")
SEG_METHODS = ("supervised_seg", "cac")


class TrainingDivergedError(FeatvizError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``RUN_DIR/config.json``).

    Attributes:
        method: a name in ``methods.METHODS`` or ``supervised_seg`` / ``cac``.
        data: an image folder, a labels CSV, ``digits``, or (segmentation) a VOC-layout folder.
        out: the run folder.
        arch: backbone architecture (``featviz.models`` names); default ``resnet18_w16-cifar``
            (segmentation: ``resnet18_w16-os8``).
        epochs, batch_size: global batch size (split over DDP processes).
        lr: peak learning rate; default: the method's base lr scaled by batch_size / 256.
        optimizer: ``sgd`` or ``adamw``; default per method.
        weight_decay: default per optimiser.
        warmup_epochs: linear warm-up before the cosine decay (per step).
        image_size: training crop size (SSL) / crop size (segmentation).
        stop_grad: SimSiam's stop-gradient (False = the collapse ablation).
        local_crops: extra small crops for multi-crop methods (SwAV, DINO).
        min_scale: override the recipe's smallest crop area (e.g. 0.5 for digits, whose identity
            a 20% crop destroys). hflip: horizontal flips (off for digits: a flipped 2 is no 2).
        threads: torch CPU threads (None = torch's default; 1 helps on a busy shared CPU).
        val_fraction: held-out share of labelled images for the kNN monitor.
        knn_k: neighbours of the kNN monitor.
        log_every: steps between metrics lines (an epoch line is always written).
        limit: use only the first N images (quick runs and tests).
        workers: DataLoader worker processes.
        amp: bf16 autocast (default: on CUDA only). channels_last: same default.
        selected_num, iou_bound, temp, weight_unsup, pos_thresh: CAC's pixel-contrast settings.
    """

    method: str
    data: str
    out: str
    arch: str | None = None
    epochs: int = 10
    batch_size: int = 256
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    warmup_epochs: float = 0.0
    image_size: int = 32
    device: str = "auto"
    seed: int = 0
    stop_grad: bool = True
    local_crops: int = 0
    min_scale: float | None = None
    hflip: bool = True
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


# method -> (optimizer, base lr, reference batch, weight decay): lr = base * batch / reference.
# SSL: CIFAR-scale recipes (SGD + momentum 0.9, cosine; DINO AdamW); segmentation: CAC's
# configs (SGD lr 0.01 for a batch of 8).
_OPTIM = {
    "simsiam": ("sgd", 0.06, 256, 5e-4), "simclr": ("sgd", 0.3, 256, 5e-4), "moco_v2": ("sgd", 0.06, 256, 5e-4),
    "moco_v3": ("sgd", 0.3, 256, 5e-4), "byol": ("sgd", 0.3, 256, 5e-4), "barlow_twins": ("sgd", 0.3, 256, 5e-4),
    "swav": ("sgd", 0.3, 256, 5e-4), "dino": ("adamw", 5e-4, 256, 0.04),
    "supervised_seg": ("sgd", 0.01, 8, 1e-4), "cac": ("sgd", 0.01, 8, 1e-4),
}


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


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, t: float = 0.07) -> float:
    """Weighted kNN on cosine similarity (InstDisc / DINO ``eval_knn``: weights exp(sim / t))."""
    train_f = nn.functional.normalize(train_f.float(), dim=1)
    test_f = nn.functional.normalize(test_f.float(), dim=1)
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), 1024):
        sim = test_f[i:i + 1024] @ train_f.T
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(idx), n_cls).scatter_add_(1, train_y[idx], (w / t).exp())
        correct += int((votes.argmax(1) == test_y[i:i + 1024]).sum())
    return correct / len(test_f)


# ---------------------------------------------------------------- SSL task
class SSLTask:
    """An image SSL method on an image folder / CSV / ``digits``, with a kNN monitor."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        from featviz import augment, data, methods, models

        self.cfg, self.info = cfg, info
        cls = methods.METHODS.get(cfg.method)
        backbone = models.build_backbone(cfg.arch, seed=cfg.seed)
        kwargs: dict[str, Any] = {}
        if not cfg.stop_grad:
            if cfg.method != "simsiam":
                raise DataError(f"--no-stop-grad is SimSiam's ablation; method {cfg.method!r} has no such switch")
            kwargs["stop_grad"] = False
        self.model = methods.build_method(cfg.method, backbone, **kwargs)
        imgs = data.labelled_images(cfg.data, image_size=cfg.image_size)
        if cfg.limit:
            imgs = data.LabelledImages(imgs.items[:cfg.limit], imgs.labels[:cfg.limit], imgs.class_names,
                                       imgs.ids[:cfg.limit])
        self.class_names = imgs.class_names
        labels = np.asarray(imgs.labels)
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(imgs))
        n_val = int(round(len(imgs) * cfg.val_fraction)) if (labels >= 0).all() and len(set(labels)) > 1 else 0
        self.val_idx, self.train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        if len(self.train_idx) < cfg.batch_size:
            raise DataError(f"{cfg.data!r} has {len(self.train_idx)} training images"
                            f"{f' (after holding out {n_val} for the kNN monitor)' if n_val else ''}, fewer "
                            f"than one batch of {cfg.batch_size}; lower --batch-size or add images")
        if cfg.batch_size % info.world_size:
            raise DataError(f"--batch-size {cfg.batch_size} must divide evenly over {info.world_size} processes")
        self.items = [imgs.items[i] for i in self.train_idx]
        self.labels = labels[self.train_idx]
        self.all_items, self.all_labels = imgs.items, labels
        views = augment.MultiView(cls.recipe, cfg.image_size, local_crops=cfg.local_crops if cls.multi_crop else 0,
                                  hflip=cfg.hflip, min_scale=cfg.min_scale)
        self.dataset = augment.ViewDataset(self.items, self.labels, views, seed=cfg.seed)
        self.collate = augment.collate_views
        self.mean, self.std = data.IMAGENET_MEAN, data.IMAGENET_STD
        self._eval_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._held_out_aug: torch.Tensor | None = None
        self.held_out_z: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return len(self.items)

    def loss(self, model: nn.Module, batch, device: torch.device, channels_last: bool) -> torch.Tensor:
        views = [v.to(device, non_blocking=True) for v in batch[0]]
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return model(views)

    def after_step(self, step: int, total: int) -> None:
        self.model.on_step_end(step / max(1, total))

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.model.embeddings

    def _eval_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._eval_cache is None:
            from featviz.data import ImageDataset, collate, eval_transform

            # cached as float16 within ~400 MB: 7000 images at 32 px, ~1300 at 224 px (2/3 bank, 1/3 queries)
            cap = max(300, int(4e8 // (3 * self.cfg.image_size ** 2 * 2)))
            self._n_bank = min(len(self.train_idx), 5000, cap * 2 // 3)
            idx = np.concatenate([self.train_idx[:self._n_bank], self.val_idx[:min(2000, cap // 3)]])
            ds = ImageDataset([self.all_items[i] for i in idx], self.all_labels[idx],
                              eval_transform(self.cfg.image_size, self.mean, self.std), strict=True)
            x, y, _, _ = collate([ds[i] for i in range(len(ds))])
            self._eval_cache = (x.half(), y)
        return self._eval_cache

    def _held_out_views(self) -> torch.Tensor:
        """One view of each held-out query image drawn from the method's recipe, the same every epoch."""
        if self._held_out_aug is None:
            from featviz import augment

            x, _ = self._eval_tensors()
            idx = self.val_idx[:len(x) - self._n_bank]  # the kNN queries, in the same order
            ds = augment.ViewDataset([self.all_items[i] for i in idx], self.all_labels[idx], self.dataset.views,
                                     seed=self.cfg.seed + 1)
            self._held_out_aug = torch.stack([ds[i][0][0] for i in range(len(ds))]).half()
        return self._held_out_aug

    @torch.no_grad()
    def _precise_bn(self, device: torch.device, x: torch.Tensor, batches: int = 8) -> None:
        """Re-estimate the BatchNorm running statistics of the monitored path (backbone and head)
        as exact averages over up to ``batches`` training batches (PreciseBN, Wu & Johnson 2021).

        The running averages lag the weights by ~10 steps (momentum 0.1); after an epoch of a few
        dozen steps that lag alone made a healthy SimSiam look half collapsed in eval mode. The
        statistics never enter a train-mode forward, so training is unchanged; checkpoints get the
        better ones. Skipped under DDP, where SyncBN would need every rank (its epochs are long).
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return
        model = self.model
        mods = [model.backbone] + ([getattr(model, model.monitor_head)] if model.monitor_head else [])
        bns = [m for mod in mods for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        model.train()
        bs = max(2, self.cfg.batch_size)
        for i in range(0, min(len(x), batches * bs), bs):
            if len(x) - i >= 2:
                model.monitored(x[i:i + bs].to(device).float())
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m

    @torch.no_grad()
    def evaluate(self, device: torch.device) -> dict[str, float]:
        """kNN accuracy of backbone features on the held-out split (empty without labels).

        Also keeps ``held_out_z``, for the epoch's collapse metrics: the monitored output
        (``SSLMethod.monitored``) in eval mode, after PreciseBN, of the held-out images as they
        are (std, rank, uniformity) and of one fixed augmented view of each (alignment). With a
        predictor, adds ``std_l2_predictor``/``rankme_predictor`` of its output: a projector
        ending in BatchNorm (SimSiam, MoCo v3) cannot output one vector for a whole batch, so a
        collapsed model sends almost every image to one point and ~1.5 % to its opposite, and
        std_l2 of z stays near 2*sqrt(p(1-p)) ~ 0.25 x 1/sqrt(d); the predictor has no BN at its
        end and shows the point (digits without stop-gradient: 0.26 x for z, 0.023 x for p).
        """
        if not len(self.val_idx):
            return {}
        model = self.model
        was = model.training
        x, y = self._eval_tensors()
        n_tr = self._n_bank
        self._precise_bn(device, x[:n_tr])
        model.eval()
        backbone = model.exported()["backbone"]
        feats = torch.cat([backbone(x[i:i + 512].to(device).float()).float().cpu() for i in range(0, len(x), 512)])
        self.held_out_z = tuple(
            torch.cat([model.monitored(v[i:i + 512].to(device).float()).cpu() for i in range(0, len(v), 512)])
            for v in (x[n_tr:], self._held_out_views()))
        out = {"knn_acc": knn_accuracy(feats[:n_tr], y[:n_tr], feats[n_tr:], y[n_tr:], self.cfg.knn_k)}
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
                "source_format": "featviz", "method": self.cfg.method, "heads": self.model.head_specs,
                "hparams": {**self.model.hparams, "stop_grad": self.cfg.stop_grad}, "class_names": self.class_names}
        return tensors, meta


# ---------------------------------------------------------------- the loop
def _make_task(cfg: TrainConfig, info: DistInfo):
    from featviz import methods

    if cfg.method in SEG_METHODS:
        from featviz import segmentation

        return segmentation.SegTask(cfg, info)
    if cfg.method not in methods.METHODS:
        names = [*methods.METHODS.names(), *SEG_METHODS]
        raise UnknownNameError(f"unknown method {cfg.method!r}{did_you_mean(cfg.method, names)}; "
                               f"expected one of: {', '.join(names)}")
    return SSLTask(cfg, info)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


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
        for key in ("method", "data", "arch", "batch_size", "seed", "image_size", "stop_grad", "limit"):
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
    from featviz.checkpoints import save_featviz

    tensors, meta = task.export()
    save_featviz(path, tensors, {**meta, "training": extra_meta}, force=True)


def _save_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int,
                best: float | None, history: list) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(),
             "epoch": torch.tensor(epoch), "step": torch.tensor(step),
             "best": torch.tensor(float("nan") if best is None else best),
             "history": torch.tensor(np.frombuffer(json.dumps(history).encode(), np.uint8).copy())}
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
        config: the run's settings.
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
        UnknownNameError: unknown method or architecture.
        TrainingDivergedError: the loss became NaN/Inf (the last good checkpoint is kept).
    """
    from featviz.collapse import CollapseMonitor

    cfg = config
    if cfg.arch is None:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "arch": "resnet18_w16-os8" if cfg.method in SEG_METHODS
                                     else "resnet18_w16-cifar"})
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
        if info.is_main:
            out = _prepare_run_dir(cfg, resume=resume, force=force)
            write_json(out / "config.json", cfg.to_dict())
        barrier(info)
        result = _run(cfg, task, info, out, resume=resume, progress=progress, on_log=on_log,
                      monitor_cls=CollapseMonitor)
        return result if info.is_main else None
    finally:
        cleanup(info)


def _run(cfg: TrainConfig, task, info: DistInfo, out: Path, *, resume: bool, progress, on_log, monitor_cls):
    device = info.device
    amp, channels_last = _choose_precision(cfg, device)
    model = task.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if info.enabled:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            log.warning("SyncBatchNorm needs CUDA; on CPU each process normalises its own shard of the batch")
        task.model = model
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = model

    opt_name, base_lr, ref_batch, wd = _OPTIM[cfg.method]
    opt_name = cfg.optimizer or opt_name
    peak = cfg.lr if cfg.lr is not None else base_lr * cfg.batch_size / ref_batch
    wd = cfg.weight_decay if cfg.weight_decay is not None else wd
    params = [p for p in model.parameters() if p.requires_grad]
    if opt_name == "adamw":
        opt = torch.optim.AdamW(params, lr=peak, weight_decay=wd)
    elif opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=peak, momentum=0.9, weight_decay=wd)
    else:
        raise UnknownNameError(f"unknown optimizer {opt_name!r}; expected sgd or adamw")

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
        _truncate_metrics(out / "metrics.jsonl", step)
        log.info("resuming %s at epoch %d (step %d)", out, epoch0, step)
    monitor = monitor_cls(out, every=1, enabled=info.is_main)  # the loop decides when to log
    wrap = progress or (lambda it, total=None: it)
    t_start = time.perf_counter()
    last_good = out / "last.safetensors"

    for epoch in range(epoch0, cfg.epochs):
        model.train()
        task.dataset.set_epoch(epoch)
        batches = epoch_batches(task.n, cfg.batch_size, epoch, cfg.seed, info)
        loader = torch.utils.data.DataLoader(task.dataset, batch_sampler=batches, collate_fn=task.collate,
                                             num_workers=cfg.workers, pin_memory=device.type == "cuda")
        losses, t_epoch, seen = [], time.perf_counter(), 0
        for batch in wrap(loader, total=len(batches)):
            lr = _lr_at(step, total, warmup, peak)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = task.loss(ddp, batch, device, channels_last)
            if not torch.isfinite(loss):
                if info.is_main:
                    _append(out / "metrics.jsonl", {"event": "diverged", "step": step, "epoch": epoch, "lr": lr})
                kept = f"; the last good checkpoint is {str(last_good)!r}" if last_good.exists() else \
                    "; no epoch finished, so there is no checkpoint"
                raise TrainingDivergedError(
                    f"loss became {float(loss.detach())} at epoch {epoch}, step {step} "
                    f"({cfg.method}, lr {lr:.3g}){kept}; "
                    "lower --lr or add --warmup-epochs")
            opt.zero_grad(set_to_none=True)
            loss.backward()
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
        ev = task.evaluate(device) if info.is_main else {}
        mean_loss = float(np.mean(losses))
        score = ev.get("knn_acc", ev.get("miou"))
        better = (score is not None and (best is None or score > best)) or \
                 (score is None and (best is None or -mean_loss > best))
        if better:
            best = score if score is not None else -mean_loss
        row = {"epoch": epoch + 1, "step": step, "loss": mean_loss, "lr": lr,
               "images_per_s": seen / (time.perf_counter() - t_epoch), **ev}
        history.append(row)
        if info.is_main:
            rec = _log(monitor, task, out, step, kind="epoch", held_out=True,
                       **{k: v for k, v in row.items() if k != "step"})
            if rec and on_log:
                on_log(rec)
            meta = {"epoch": epoch + 1, "step": step, **ev, "loss": mean_loss}
            _save_model(out / "last.safetensors", task, meta)
            if better:
                _save_model(out / "best.safetensors", task, meta)
            _save_state(out, model, opt, epoch + 1, step, best, history)
        barrier(info)
    monitor.close()
    return TrainResult(out, out / "last.safetensors", out / "best.safetensors", cfg.epochs, step, history,
                       time.perf_counter() - t_start)


def _log(monitor, task, out: Path, step: int, *, held_out: bool = False, **values: Any) -> dict[str, Any]:
    """One metrics line: collapse metrics plus ``values``.

    Step lines measure the last training batch (train mode); epoch lines (``held_out``) measure
    the held-out views in eval mode when the task has them. ``split`` says which.
    """
    z = getattr(task, "held_out_z", None) if held_out else None
    split = "held_out" if z is not None else "train_batch"
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
