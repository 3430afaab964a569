"""``FeatvizMonitor``: featviz's collapse metrics, RankMe, LiDAR and an online kNN as a Lightning callback.

Example::

    from featviz.integrations.lightning import FeatvizMonitor
    from featviz.integrations.online import OnlineKnn

    monitor = FeatvizMonitor(every=50, knn=OnlineKnn(bank_x, bank_y, val_x, val_y), knn_every=500)
    trainer = L.Trainer(max_steps=5000, callbacks=[monitor], logger=TensorBoardLogger("runs"))
    trainer.fit(model, loader)
    # featviz collapse --watch runs/lightning_logs/version_0

Every ``every`` optimizer steps it measures the batch's two embeddings, from ``training_step``'s
output dict (``{"loss": …, "z1": …, "z2": …}``) or from ``embeddings(pl_module, batch) -> (z1, z2)``
(run in train mode without gradient, BatchNorm statistics left as they were), with
``featviz.collapse.CollapseMonitor``: std_l2, alignment, uniformity, RankMe, effective rank,
α-ReQ and LiDAR (the two views of each image are its surrogate class). Every ``knn_every`` steps
it adds a held-out record: ``OnlineKnn`` on ``features(pl_module, x)`` (default: the module's
``backbone``, else the module) and the collapse metrics of ``outputs(pl_module, x)`` (default: the
module's forward) on the held-out queries, both in eval mode.

Each record is a line of ``metrics.jsonl`` (``split``: ``train_batch`` or ``held_out``; the
format ``featviz collapse --watch`` reads) in ``out_dir`` (default: the Trainer's ``log_dir``, next
to the TensorBoard events), and every number goes to each of the Trainer's loggers
(``logger.log_metrics({"featviz/<split>/<key>": value}, step)``, e.g. ``featviz/train_batch/rankme``:
TensorBoard, CSV, …) at the same step.
``featviz-monitor.json`` in ``out_dir`` states the protocol. Only global rank 0 measures and writes.

With ``tsne_every=K`` (and a ``knn`` split) it also writes a t-SNE snapshot of the held-out
queries' features every K epochs, ``out_dir/tsne/epoch_EEEE.png`` (``featviz.maps.snapshot``),
and a ``{"event": "snapshot", "path": …}`` line in ``metrics.jsonl``, which ``featviz collapse
--watch`` names.

The callback must subclass the ``Callback`` of the package the Trainer comes from: ``FeatvizMonitor``
uses ``lightning.pytorch`` when installed, else ``pytorch_lightning``; ``monitor_class("pytorch_lightning")``
gives the other one (e.g. for lightly's examples, which import ``pytorch_lightning``).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
Embeddings = Callable[[Any, Any], tuple[Any, Any]]


class _MonitorLogic:
    """The callback's body, independent of which Lightning package provides ``Callback``."""

    def __init__(
        self,
        out_dir: str | os.PathLike | None = None,
        *,
        every: int = 50,
        embeddings: Embeddings | None = None,
        knn: Any = None,
        knn_every: int | None = None,
        features: Callable[[Any, Any], Any] | None = None,
        outputs: Callable[[Any, Any], Any] | None = None,
        log_to_loggers: bool = True,
        prefix: str = "featviz/",
        tsne_every: int | None = None,
        **report_kwargs: Any,
    ):
        """See the module docstring.

        Args:
            out_dir: folder of ``metrics.jsonl`` (default: ``trainer.log_dir``, else ``default_root_dir``).
            every: a training-batch record every this many optimizer steps.
            embeddings: ``(pl_module, batch) -> (z1, z2)``; default: ``training_step``'s ``z1``/``z2``.
            knn: an ``OnlineKnn`` (held-out labelled split), or None for no held-out records.
            knn_every: a held-out record every this many steps (default 10 × ``every``) and at the end.
            features: ``(pl_module, x) -> features`` for the kNN (default: ``pl_module.backbone``, else the module).
            outputs: ``(pl_module, x) -> embeddings`` of the held-out collapse metrics (default: forward).
            log_to_loggers: also send every number to the Trainer's loggers.
            prefix: the loggers' metric name prefix.
            tsne_every: a t-SNE snapshot of the held-out queries' features every this many epochs
                (needs ``knn``; None: none).
            **report_kwargs: passed to ``featviz.collapse.collapse_report``.
        """
        super().__init__()
        if every < 1 or (knn_every is not None and knn_every < 1) or (tsne_every is not None and tsne_every < 1):
            raise ValueError(f"every, knn_every and tsne_every must be >= 1, got {every}, {knn_every}, {tsne_every}")
        if tsne_every is not None and knn is None:
            raise ValueError("tsne_every maps the held-out split: pass knn=OnlineKnn(...) too")
        self.tsne_every = tsne_every
        self.snapshots: list[dict[str, Any]] = []
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.every, self.knn, self.knn_every = every, knn, knn_every or 10 * every
        self.embeddings_fn, self.features_fn, self.outputs_fn = embeddings, features, outputs
        self.log_to_loggers, self.prefix, self.report_kwargs = log_to_loggers, prefix, report_kwargs
        self.monitor = None
        self.records: list[dict[str, Any]] = []
        self._warned = False
        self._last_knn_step: int | None = None
        self._last_batch_step: int | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer, pl_module, stage: str | None = None) -> None:  # noqa: D102
        if stage not in (None, "fit") or self.monitor is not None:
            return
        from featviz.collapse import CollapseMonitor

        out = self.out_dir or Path(getattr(trainer, "log_dir", None) or trainer.default_root_dir)
        self.out_dir = out
        self.monitor = CollapseMonitor(out, every=1, enabled=trainer.is_global_zero, **self.report_kwargs)
        if trainer.is_global_zero:
            from featviz.io.outputs import write_json

            write_json(out / "featviz-monitor.json", self.protocol(), force=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        step = int(trainer.global_step)
        if not trainer.is_global_zero or self.monitor is None:
            return
        if step % self.every == 0 and step > 0 and step != self._last_batch_step:
            # (with gradient accumulation several batches end at one global step: the first is measured)
            self._last_batch_step = step
            z = self._batch_embeddings(pl_module, outputs, batch)
            if z is not None:
                loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
                self._emit(
                    trainer,
                    self.monitor.update(
                        z[0], z[1], step=step, split="train_batch", epoch=trainer.current_epoch, loss=loss
                    ),
                )
        if self.knn is not None and step % self.knn_every == 0 and step > 0 and step != self._last_knn_step:
            self._held_out(trainer, pl_module, step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        epoch = int(trainer.current_epoch) + 1  # the epochs done
        if self.tsne_every is None or not trainer.is_global_zero or self.monitor is None or epoch % self.tsne_every:
            return
        self.snapshot(trainer, pl_module, epoch)

    def snapshot(self, trainer, pl_module, epoch: int) -> dict[str, Any]:
        """Write the held-out t-SNE snapshot of ``epoch`` and its ``metrics.jsonl`` line; returns that line."""
        from featviz.maps.snapshot import tsne_snapshot

        was = pl_module.training
        pl_module.eval()
        try:
            feats = self.features_fn or _default_features
            x = self.knn.embed(lambda q: feats(pl_module, q), self.knn.queries, pl_module.device)
        finally:
            pl_module.train(was)
        record = tsne_snapshot(
            x,
            self.knn.query_labels,
            self.monitor.path.parent,
            epoch=epoch,
            step=int(trainer.global_step),
            metrics=self.monitor.path.name,
        )
        self.snapshots.append(record)
        return record

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        if not trainer.is_global_zero or self.monitor is None:
            return
        step = int(trainer.global_step)
        if self.knn is not None and self._last_knn_step != step:
            self._held_out(trainer, pl_module, step)
        self.monitor.close()

    # ------------------------------------------------------------------ measuring
    def _batch_embeddings(self, pl_module, outputs, batch) -> tuple[Any, Any] | None:
        if self.embeddings_fn is not None:
            import torch

            from featviz.integrations.online import frozen_batchnorm

            with torch.no_grad(), frozen_batchnorm(pl_module):
                z1, z2 = self.embeddings_fn(pl_module, batch)
            return z1, z2
        if isinstance(outputs, dict) and "z1" in outputs:
            return outputs["z1"], outputs.get("z2")
        if not self._warned:
            self._warned = True
            log.warning(
                "FeatvizMonitor: training_step returned no 'z1'/'z2' and no embeddings function was given; "
                "return {'loss': loss, 'z1': z1.detach(), 'z2': z2.detach()} or pass "
                "embeddings=lambda module, batch: (z1, z2)"
            )
        return None

    def _held_out(self, trainer, pl_module, step: int) -> None:
        self._last_knn_step = step
        device = pl_module.device
        was = pl_module.training
        pl_module.eval()
        try:
            feats = self.features_fn or _default_features
            knn = self.knn.evaluate(lambda x: feats(pl_module, x), device)
            outs = self.outputs_fn or (lambda m, x: m(x))
            z = self.knn.embed(lambda x: outs(pl_module, x), self.knn.queries, device)
        finally:
            pl_module.train(was)
        self._emit(
            trainer, self.monitor.update(z, None, step=step, split="held_out", epoch=trainer.current_epoch, **knn)
        )

    def _emit(self, trainer, record: dict[str, Any] | None) -> None:
        if record is None:
            return
        self.records.append(record)
        if not self.log_to_loggers:
            return
        scalars = logged_scalars(record, self.prefix)
        for lg in getattr(trainer, "loggers", None) or []:
            lg.log_metrics(scalars, step=record["step"])

    def protocol(self) -> dict[str, Any]:
        """What the records measure, written to ``featviz-monitor.json``."""
        return {
            "every": self.every,
            "knn_every": self.knn_every if self.knn is not None else None,
            "train_batch": "the batch's two views (training_step's z1/z2 or the embeddings function), "
            "train mode; LiDAR with the two views of each image as its class",
            "held_out": "OnlineKnn on features(pl_module, x), collapse metrics of outputs(pl_module, x) on the "
            "queries, eval mode"
            if self.knn is not None
            else None,
            "knn": self.knn.protocol() if self.knn is not None else None,
            "tsne_every": self.tsne_every,
            "tsne": "t-SNE (featviz.maps.projection.fit, seed 0) of features(pl_module, x) on the held-out queries, "
            "eval mode, every tsne_every epochs: tsne/epoch_EEEE.png"
            if self.tsne_every
            else None,
            "loggers": f"{self.prefix}<split>/<key> at the record's step" if self.log_to_loggers else None,
        }


def logged_scalars(record: dict[str, Any], prefix: str = "featviz/") -> dict[str, float]:
    """The numbers of a metrics record as the loggers receive them: ``{prefix + split/key: value}``.

    E.g. ``featviz/train_batch/rankme``, ``featviz/held_out/knn_acc``: the two kinds of record can
    share a step, so each has its own series. Every finite int/float except ``step`` and ``time``
    (booleans, lists and strings are left out).
    """
    split = f"{record['split']}/" if record.get("split") else ""
    return {
        f"{prefix}{split}{k}": float(v)
        for k, v in record.items()
        if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _default_features(pl_module, x):
    backbone = getattr(pl_module, "backbone", None)
    return backbone(x) if callable(backbone) else pl_module(x)


def _lightning(package: str | None):
    names = PACKAGES if package is None else (package,)
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(
        f"FeatvizMonitor needs {' or '.join(names)}, which is not installed "
        "(pip install lightning); in a plain loop use featviz.collapse.CollapseMonitor"
    )


@functools.cache  # one class per package and process, so isinstance checks work
def monitor_class(package: str | None = None) -> type:
    """``FeatvizMonitor`` subclassing ``Callback`` of ``package`` ("lightning.pytorch" or "pytorch_lightning").

    None: ``lightning.pytorch`` when installed, else ``pytorch_lightning``.

    Raises:
        ImportError: the package is not installed.
    """
    if package == "lightning":
        package = "lightning.pytorch"
    pl = _lightning(package)
    return type("FeatvizMonitor", (_MonitorLogic, pl.Callback), {"__module__": __name__, "__doc__": __doc__})


def __getattr__(name: str) -> Any:
    # PEP 562: importing Lightning costs seconds, so the class is built on first access only
    if name == "FeatvizMonitor":
        return monitor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
