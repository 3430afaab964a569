"""The segmentation training task (``supervised_seg``, ``cac``) that ``featviz.train.loop`` drives."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featviz.data.images import IMAGENET_MEAN, IMAGENET_STD
from featviz.data.masks import IGNORE_INDEX
from featviz.errors import DataError
from featviz.models.description import describe
from featviz.models.segmenter import FEATURE_STRIDE, Segmenter, head_spec
from featviz.train.segmentation.cac import CACSettings, NegativeBank, cac_unsupervised_loss
from featviz.train.segmentation.dataset import SegDataset, VOCFolder
from featviz.train.segmentation.registry import SEG_METHODS
from featviz.train.task import Embeddings, TrainTask

log = logging.getLogger(__name__)


class SegTask(TrainTask):
    """``supervised_seg`` (cross-entropy on labelled crops) or ``cac`` (+ CAC's unsupervised loss).

    The ``TrainTask`` the loop drives for both segmentation methods: ``model`` is a
    ``featviz.models.segmenter.Segmenter`` (with CAC's negative bank as buffers, saved in
    ``state.pt`` but never exported), ``evaluate`` the mean IoU on the ``val`` list, and
    ``step_metrics`` the supervised and unsupervised loss parts. CAC's settings come from the
    config's ``weight_unsup``, ``temp``, ``pos_thresh``, ``selected_num``, ``step_save`` and
    ``epoch_start_unsup`` (``featviz train --step-save/--epoch-start-unsup``; CAC's defaults
    for a config without them).

    Args:
        cfg: the run's resolved settings (``featviz.train.config.TrainConfig``).
        info: this process's place in a DDP run.

    Raises:
        DataError: not a VOC-layout folder, training images without masks, no unlabelled images
            for ``cac``, a batch below 2 or not dividing over the processes, or a crop size that is
            not a multiple of CAC's feature stride.
        ArchitectureError: a backbone that is not a torchvision ResNet.
    """

    def __init__(self, cfg, info):
        """Check the data, build the segmenter and the crops of ``cfg``."""
        from featviz.models.architectures import build_backbone

        self.cfg, self.info = cfg, info
        registration = SEG_METHODS.get(cfg.method)
        self.optim, self.sync_bn = registration.optim, registration.sync_bn
        voc = VOCFolder(cfg.data)
        train_ids, val_ids = voc.ids("train"), voc.ids("val")
        if cfg.limit:
            train_ids = train_ids[:cfg.limit]
        missing = [i for i in train_ids if not voc.mask_path(i).exists()]
        if missing:
            raise DataError(f"{len(missing)} of {len(train_ids)} training images in {str(voc.root)!r} have no mask "
                            f"in SegmentationClass/ (e.g. {missing[0]}.png); {cfg.method} needs labelled images "
                            "-- list unlabelled ones in ImageSets/Segmentation/unlabeled.txt")
        unlabelled = voc.ids("unlabeled") if cfg.method == "cac" else []
        if cfg.method == "cac" and not unlabelled:
            raise DataError(f"cac needs unlabelled images: {str(voc.root)!r} has no "
                            "ImageSets/Segmentation/unlabeled.txt (or it is empty)")
        if cfg.batch_size < 2:
            raise DataError("segmentation needs --batch-size >= 2 (BatchNorm in the ASPP pooling branch)")
        if len(train_ids) < cfg.batch_size:
            raise DataError(f"{str(voc.root)!r} has {len(train_ids)} labelled training images, fewer than one "
                            f"batch of {cfg.batch_size}; lower --batch-size")
        if cfg.batch_size % info.world_size:
            raise DataError(f"--batch-size {cfg.batch_size} must divide evenly over {info.world_size} processes")
        if cfg.image_size % FEATURE_STRIDE:
            raise DataError(f"--image-size {cfg.image_size} must be a multiple of {FEATURE_STRIDE} (CAC's feature "
                            "stride: crop offsets and overlap boxes live on that grid)")
        names = voc.class_names
        if names is None:
            top = max(int(m[m != IGNORE_INDEX].max(initial=0)) for m in (voc.mask(i) for i in train_ids))
            names = [str(c) for c in range(top + 1)]
        self.class_names, self.voc, self.val_ids = names, voc, val_ids
        backbone = build_backbone(cfg.arch, seed=cfg.seed).train()
        if not hasattr(backbone, "layer4"):
            from featviz.errors import ArchitectureError

            raise ArchitectureError(f"segmentation needs a torchvision ResNet, got {cfg.arch!r}; "
                                    "use e.g. resnet18_w16-os8 (CPU) or resnet50-os16")
        spec = head_spec(backbone, len(names), cfg.image_size)
        proj = {"type": "conv_mlp", "out": min(128, spec["dim"])} if cfg.method == "cac" else None
        self.model = Segmenter(backbone, spec, proj, names)
        self.base_size = max(cfg.image_size, int(round(cfg.image_size * 400 / 320)))  # CAC: base 400 for crop 320
        self.dataset = SegDataset(voc, train_ids, unlabelled, crop_size=cfg.image_size, iou_bound=cfg.iou_bound,
                                  seed=cfg.seed, base_size=self.base_size)
        self.collate = torch.utils.data.default_collate
        self.last_parts: dict[str, float] = {}
        self.settings = CACSettings.from_config(cfg) if cfg.method == "cac" else None
        if self.settings is not None:
            cells = (cfg.batch_size // info.world_size) * (cfg.image_size // FEATURE_STRIDE) ** 2
            if self.settings.selected_num > cells:
                log.warning("--selected-num %d is more than the %d stride-8 pixels of a crop set on this process "
                            "(CAC's np.random.choice would fail); sampling all %d", self.settings.selected_num,
                            cells, cells)
            per_step = 2 * min(self.settings.selected_num, cells) * info.world_size
            # the bank lives on the model (saved in state.pt for --resume, never exported)
            self.model.cac_bank = NegativeBank(self.settings.step_save, per_step, proj["out"])

    @property
    def n(self) -> int:
        """Labelled training images per epoch."""
        return len(self.dataset)

    def record(self) -> dict[str, Any]:
        """Nothing beyond the ``TrainConfig`` (CAC's settings are config fields)."""
        return {}

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Nothing: CAC's negative bank is a buffer of the model, in ``state.pt`` with it."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Nothing to restore beyond the model (see ``extra_state``)."""

    def set_epoch(self, epoch: int) -> None:
        """The crops' seeds (and whether CAC's warm-up is over)."""
        self.dataset.set_epoch(epoch)

    def _unsup_active(self) -> bool:
        return self.dataset.epoch >= self.settings.epoch_start_unsup

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool):
        """Cross-entropy on the labelled crops, plus (``cac``, after the warm-up) CAC's unsupervised loss.

        The unsupervised loss is on the crop pairs; the parts are kept for ``step_metrics``.
        """
        def put(t):
            t = t.to(device)
            return t.contiguous(memory_format=torch.channels_last) if channels_last else t

        x = put(batch["image"])
        target = batch["mask"].to(device)
        seg = _module(model)
        if self.cfg.method != "cac" or not self._unsup_active():
            logits = model(x)
            sup = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
            if self.cfg.method == "cac":  # CAC's warm-up (epoch < epoch_start_unsup): supervised only
                seg.cac_bank.steps += 1
                if isinstance(model, nn.parallel.DistributedDataParallel):
                    # DDP without find_unused_parameters needs every parameter in the graph
                    sup = sup + 0.0 * sum(p.sum() for p in seg.projector.parameters())
                self.last_parts = {"loss_sup": float(sup.detach()), "loss_unsup": 0.0}
            else:
                self.last_parts = {"loss_sup": float(sup.detach())}
            return sup
        logits, s1, s2 = model(x, put(batch["u1"]), put(batch["u2"]))  # one DDP forward, three passes
        sup = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        bank = seg.cac_bank
        rng = np.random.default_rng([self.cfg.seed, int(bank.steps), self.info.rank])
        unsup, parts = cac_unsupervised_loss(s1["z"].float(), s2["z"].float(), s1["logits"], s2["logits"],
                                             batch["ov1"], batch["ov2"], batch["flip"], self.settings, rng,
                                             bank.entries())
        bank.push(*parts["negatives"])
        bank.steps += 1
        self.last_parts = {"loss_sup": float(sup.detach()), "loss_unsup": float(unsup.detach()),
                           "loss_unsup_1": float(parts["loss1"].detach()),
                           "loss_unsup_2": float(parts["loss2"].detach())}
        return sup + unsup

    def before_step(self, step: int) -> None:
        """Nothing between backward and the step."""

    def after_step(self, step: int, total: int) -> None:
        """Nothing after the step (the bank is updated inside ``loss``)."""

    def step_metrics(self) -> dict[str, float]:
        """The last step's loss parts (``loss_sup``; ``cac``: ``loss_unsup`` and its two directions)."""
        return self.last_parts

    def embeddings(self, *, held_out: bool) -> Embeddings | None:
        """None: a segmenter's pixel features are not monitored for collapse."""
        return None

    def after_epoch(self, epoch: int, step: int, device: torch.device) -> dict[str, Any] | None:
        """Nothing after an epoch."""
        return None

    def held_out_features(self) -> None:
        """None: a segmenter's held-out split is pixels, not one feature per image (no t-SNE snapshot)."""
        return None

    @torch.no_grad()
    def evaluate(self, device: torch.device) -> dict[str, float]:
        """Mean IoU over classes present in the ``val`` list (full images)."""
        if not self.val_ids:
            return {}
        seg = self.model
        was = seg.training
        seg.eval()
        c = len(self.class_names)
        conf = torch.zeros(c, c, dtype=torch.long)
        norm = (torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None])
        for i in self.val_ids:
            img = np.asarray(self.voc.image(i), np.float32) / 255.0
            x = ((torch.from_numpy(img.transpose(2, 0, 1)) - norm[0]) / norm[1])[None].to(device)
            pred = seg(x).argmax(1)[0].cpu()
            gt = torch.from_numpy(self.voc.mask(i).astype(np.int64))
            ok = gt != IGNORE_INDEX
            conf += torch.bincount(gt[ok] * c + pred[ok], minlength=c * c).reshape(c, c)
        seg.train(was)
        inter = conf.diag().float()
        union = conf.sum(0) + conf.sum(1) - conf.diag()
        present = union > 0
        return {"miou": float((inter[present] / union[present]).mean()), **self.last_parts}

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The segmenter's tensors (``backbone.*``, ``head.*``, CAC's ``projector.*``) and metadata."""
        seg = self.model
        tensors = {f"backbone.{k}": v for k, v in seg.backbone.state_dict().items()}
        tensors.update({f"head.{k}": v for k, v in seg.head.state_dict().items()})
        heads: dict[str, Any] = {"head": seg.head_spec}
        if seg.projector is not None:
            tensors.update({f"projector.{k}": v for k, v in seg.projector.state_dict().items()})
            heads["projector"] = seg.projector_spec
        hparams: dict[str, Any] = {"iou_bound": list(self.cfg.iou_bound)}
        if self.settings is not None:
            hparams.update(self.settings.to_dict())
        meta = {"arch": describe(seg.backbone).arch.to_dict(),
                "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "source_format": "featviz", "method": self.cfg.method, "heads": heads,
                "num_classes": seg.num_classes, "class_names": seg.class_names,
                "crop": {"crop_size": int(self.cfg.image_size), "base_size": int(self.base_size)},
                "hparams": hparams}
        return tensors, meta


def _module(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
