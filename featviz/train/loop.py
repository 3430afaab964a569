"""``featviz train``: SSL and segmentation training that is resumable, monitored and DDP-ready.

One loop serves every method. A *task* (``featviz.train.task.TrainTask``, the contract: an
``SSLTask`` for the SSL methods, a ``SegTask`` for segmentation) owns the model, its data, its loss
and what is evaluated and saved; the loop owns devices, precision, DDP, the optimiser and its
schedule, checkpoints, resume, metrics and NaN handling, and calls every member of the contract on
every task.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featviz.distributed import DistInfo, barrier, cleanup, init_distributed
from featviz.errors import DataError, FeatvizError, OutputError, OutputExistsError
from featviz.io.outputs import atomic_path, check_place
from featviz.io.progress import Progress
from featviz.train.config import TrainConfig, read_config, resolve_config, write_config
from featviz.train.optim import Schedule, build_optimizer, param_groups
from featviz.train.ssl_task import SSLTask
from featviz.train.task import TrainTask

log = logging.getLogger(__name__)

RUN_FILES = ("last.safetensors", "best.safetensors", "state.pt", "config.json", "metrics.jsonl", "boxes.npz")


class TrainingDivergedError(FeatvizError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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
        """What ``featviz train --json`` prints: paths, epochs, steps, seconds and the last epoch's numbers."""
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


# ---------------------------------------------------------------- the loop
def _make_task(cfg: TrainConfig, info: DistInfo) -> TrainTask:
    from featviz.train.segmentation.registry import SEG_METHODS

    if cfg.method in SEG_METHODS:
        from featviz.train.segmentation.task import SegTask

        return SegTask(cfg, info)
    return SSLTask(cfg, info)


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
        saved = read_config(out)
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


def _save_model(path: Path, task: TrainTask, extra_meta: dict[str, Any]) -> None:
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
        method_record = task.record()
        record = {**cfg.to_dict(), **method_record}
        if info.is_main:
            out = _prepare_run_dir(cfg, resume=resume, force=force)
            if not resume:  # a resumed run's config is rewritten once its state.pt has loaded
                write_config(out, cfg, method_record)
        barrier(info)
        result = _run(cfg, task, info, out, resume=resume, progress=progress, on_log=on_log,
                      monitor_cls=CollapseMonitor, record=record)
        return result if info.is_main else None
    finally:
        cleanup(info)


def _run(cfg: TrainConfig, task: TrainTask, info: DistInfo, out: Path, *, resume: bool, progress, on_log,
         monitor_cls, record: dict[str, Any]):
    device = info.device
    amp, channels_last = _choose_precision(cfg, device)
    optim = task.optim
    model = task.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if info.enabled:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if device.type == "cuda" and task.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif has_bn and task.sync_bn:
            log.warning("SyncBatchNorm needs CUDA; on CPU each process normalises its own shard of the batch")
        task.model = model
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = model

    groups = param_groups(model, optim, weight_decay=cfg.weight_decay)
    opt = build_optimizer(cfg.optimizer, groups, cfg.lr, momentum=optim.momentum)
    steps_per_epoch = task.n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    schedule = Schedule.of(cfg, optim, steps_per_epoch)
    epoch0, step, best, history = 0, 0, None, []
    if resume:
        epoch0, step, best, history = _resume_state(out / "state.pt", model, opt, task)
        if info.is_main:  # nothing in the run folder changes before its state has loaded
            write_config(out, cfg, record)
            _truncate_metrics(out / "metrics.jsonl", step)
        log.info("resuming %s at epoch %d (step %d)", out, epoch0, step)
    monitor = monitor_cls(out, every=1, enabled=info.is_main)  # the loop decides when to log
    wrap = progress or (lambda it, total=None: it)
    t_start = time.perf_counter()
    last_good = out / "last.safetensors"

    for epoch in range(epoch0, cfg.epochs):
        model.train()
        task.set_epoch(epoch)
        batches = epoch_batches(task.n, cfg.batch_size, epoch, cfg.seed, info)
        loader = torch.utils.data.DataLoader(task.dataset, batch_sampler=batches, collate_fn=task.collate,
                                             num_workers=cfg.workers, pin_memory=device.type == "cuda")
        losses, t_epoch, seen = [], time.perf_counter(), 0
        for batch in wrap(loader, total=len(batches)):
            lr = schedule.apply(opt, step)
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
            task.before_step(step)
            opt.step()
            task.after_step(step, total)
            step += 1
            losses.append(float(loss.detach()))
            seen += cfg.batch_size  # drop_last: every global batch is full
            if step % cfg.log_every == 0 and info.is_main:
                rec = _log(monitor, task, out, step, kind="step", loss=losses[-1], lr=lr, epoch=epoch + 1,
                           images_per_s=round(seen / (time.perf_counter() - t_epoch), 1),
                           **task.step_metrics())
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
            if evaluate and cfg.tsne_every and (epoch + 1) % cfg.tsne_every == 0:
                _snapshot(task, out, epoch + 1, step, on_log)
        boxes_rec = task.after_epoch(epoch, step, device)  # ContrastiveCrop's box update (every rank takes part)
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
            _save_state(out, model, opt, epoch + 1, step, best, history, task.extra_state())
        barrier(info)
    monitor.close()
    return TrainResult(out, out / "last.safetensors", out / "best.safetensors", cfg.epochs, step, history,
                       time.perf_counter() - t_start, record)


def _snapshot(task: TrainTask, out: Path, epoch: int, step: int, on_log: Callable | None) -> None:
    """``--tsne-every``: a t-SNE of the held-out features in ``out/tsne/`` and its line in ``metrics.jsonl``."""
    held = task.held_out_features()
    if held is None or len(held[0]) < 4:
        return
    from featviz.maps.snapshot import tsne_snapshot

    rec = tsne_snapshot(held[0], held[1], out, epoch=epoch, step=step, class_names=held[2] or None)
    if on_log:
        on_log(rec)


def _log(monitor, task: TrainTask, out: Path, step: int, *, held_out: bool = False, **values: Any) -> dict[str, Any]:
    """One metrics line: collapse metrics plus ``values``.

    Step lines measure the last training batch (train mode; alignment between its two views);
    epoch lines (``held_out``) measure the held-out images in eval mode when the task has them
    (alignment between two augmented views of each). ``split`` says which (``TrainTask.embeddings``).
    """
    z = task.embeddings(held_out=held_out)
    if z is not None:
        return monitor.update(z.z1, z.z2, step=step, split=z.split, **values, **z.extra)
    rec = {"step": step, "time": round(time.time(), 3), **values}
    _append(out / "metrics.jsonl", rec)
    return rec


def _append(path: Path, record: dict[str, Any]) -> None:
    from featviz.collapse import append_jsonl

    append_jsonl(path, record)


STATE_KEYS = ("model", "optimizer", "rng", "epoch", "step", "best", "history")
"""What a run's ``state.pt`` holds (``--resume`` checks them all before it changes anything)."""


def _resume_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                  task: TrainTask) -> tuple[int, int, float | None, list]:
    """Restore the model, optimiser, random state and task from a run's ``state.pt``.

    Returns:
        ``(epoch, step, best, history)`` to continue from.

    Raises:
        FeatvizError: the file cannot be read (permission), is truncated or damaged, or is not a
            state of this run's model; nothing in the run folder has changed.
    """
    import pickle
    import zipfile

    where = f"--resume: {str(path)!r}"
    redo = "start the run over with --force, or use a new --out"
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise FeatvizError(f"{where} cannot be read: permission denied; check its permissions (ls -l)") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise FeatvizError(f"{where} is truncated or damaged ({first}); {redo}") from None
    missing = [k for k in STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise FeatvizError(f"{where} is not a featviz training state (it lacks {', '.join(missing)}); {redo}")
    try:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        _set_rng_state(st["rng"])
        epoch0, step = int(st["epoch"]), int(st["step"])
        best = None if math.isnan(float(st["best"])) else float(st["best"])
        history = json.loads(bytes(st["history"].numpy()).decode())
        task.load_extra_state(st)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise FeatvizError(f"{where} does not fit this run's model and settings ({first}); {redo}") from None
    return epoch0, step, best, history if isinstance(history, list) else []


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past the resumed step (and the old 'done' marker) so none repeat."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), (int, float)):
            continue
        if rec.get("event") == "done" or (rec.get("step") is not None and rec["step"] > step):
            continue
        keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in keep))
