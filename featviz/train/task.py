"""The contract between ``featviz.train.loop`` and what it trains: ``TrainTask``.

The loop owns devices, precision, DDP, the optimiser and its schedule, checkpoints, resume,
metrics and NaN handling; a task owns the model, its data, its loss and what is evaluated,
logged and saved. The loop calls every member of ``TrainTask`` on every task and probes for
none: ``featviz.train.ssl_task.SSLTask`` (the SSL methods) and
``featviz.train.segmentation.task.SegTask`` (``supervised_seg``, ``cac``) implement all of it,
a no-op where a member does not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from featviz.train.optim import Optim


@dataclass(frozen=True)
class Embeddings:
    """What one metrics line's collapse metrics are measured on.

    Attributes:
        z1: the monitored output of one view (N, D).
        z2: of a second view of the same images, for alignment (None: not measured here).
        split: ``train_batch`` (the last training batch, train mode) or ``held_out`` (the
            held-out images in eval mode).
        extra: values the line adds to the metrics (e.g. the held-out ``alignment``, measured
            between two augmented views of each image).
    """

    z1: torch.Tensor
    z2: torch.Tensor | None
    split: str
    extra: dict[str, Any] = field(default_factory=dict)


class TrainTask(Protocol):
    """Everything ``featviz.train.loop.train`` asks of a task, in the order a run asks it.

    Attributes:
        model: the module trained and checkpointed in ``state.pt`` (the loop moves it to the
            device, may convert its BatchNorm and set it back wrapped for DDP bookkeeping).
        dataset: the training samples, indexed by the loop's seeded batches.
        collate: turns a list of samples into the batch ``loss`` takes (a plain function, so
            DataLoader workers need not pickle the task).
        optim: the optimiser recipe (its parameter groups, momentum, final lr, weight-decay end).
        sync_bn: convert BatchNorm to SyncBatchNorm under CUDA DDP.
    """

    model: nn.Module
    dataset: torch.utils.data.Dataset
    collate: Callable[[list[Any]], Any]
    optim: Optim
    sync_bn: bool

    @property
    def n(self) -> int:
        """Training samples per epoch (the loop draws ``n // batch_size`` full batches)."""
        ...

    def record(self) -> dict[str, Any]:
        """What ``config.json`` adds to the resolved ``TrainConfig`` (the method's own settings)."""
        ...

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors ``state.pt`` keeps beside the model and optimiser, for ``--resume``."""
        ...

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` saved (``state`` is the whole ``state.pt``)."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch (0-based), before its batches are drawn."""
        ...

    def loss(self, model: nn.Module, batch: Any, device: torch.device, channels_last: bool) -> torch.Tensor:
        """The scalar loss of one batch through ``model`` (``self.model``, or its DDP wrapper)."""
        ...

    def before_step(self, step: int) -> None:
        """Between ``backward`` and the optimiser step (gradient clipping and cancelling)."""
        ...

    def after_step(self, step: int, total: int) -> None:
        """After the optimiser step (momentum encoders, queues); ``step`` of ``total``, 0-based."""
        ...

    def step_metrics(self) -> dict[str, float]:
        """The last step's loss parts, added to its metrics line (empty when the loss is one term)."""
        ...

    def embeddings(self, *, held_out: bool) -> Embeddings | None:
        """What a metrics line measures collapse on.

        For an epoch line (``held_out``) the held-out images when the last ``evaluate`` measured
        them, else the last training batch; None when the task has no embeddings to monitor (the
        line keeps only its values).
        """
        ...

    def evaluate(self, device: torch.device) -> dict[str, Any]:
        """The epoch's held-out numbers (``knn_acc`` or ``miou`` chooses ``best``; empty: none)."""
        ...

    def after_epoch(self, epoch: int, step: int, device: torch.device) -> dict[str, Any] | None:
        """After an epoch's evaluation, on every rank; a metrics record to append, or None."""
        ...

    def held_out_features(self) -> tuple[Any, Any, list[str]] | None:
        """The held-out features, labels and class names the last ``evaluate`` measured (t-SNE snapshots), or None."""
        ...

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The model checkpoint: tensors (``backbone.*`` and heads) and the ``featviz`` metadata."""
        ...
