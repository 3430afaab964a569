"""The SSL training task: an image SSL method on an image folder / CSV / ``digits``, with a kNN monitor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from featviz.distributed import DistInfo
from featviz.errors import DataError
from featviz.models.description import describe
from featviz.train.config import TrainConfig, resolve_config
from featviz.train.knn import EVAL_BATCH, held_out_split, knn_accuracy, knn_protocol, knn_sets
from featviz.train.optim import Optim
from featviz.train.task import Embeddings, TrainTask


class SSLTask(TrainTask):
    """An image SSL method on an image folder / CSV / ``digits``, with a kNN monitor.

    The ``TrainTask`` the loop drives for every SSL method: ``model`` is the registered
    ``SSLMethod`` (backbone + heads + momentum encoders), the data are two (or more) seeded views
    of each training image, ``evaluate`` is the kNN monitor on held-out images, and ``export``
    writes the backbone and the heads (DINO: the teacher's).

    Args:
        cfg: the run's settings (resolved here, if they were not).
        info: this process's place in a DDP run.

    Raises:
        DataError: fewer training images than one batch, a batch that does not divide over the
            processes, or ``--no-stop-grad`` on a method other than SimSiam.
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        """Build the backbone, the method, the held-out split and the views of ``cfg``."""
        from featviz.data import augment
        from featviz.data import images as data
        from featviz.models import architectures as models
        from featviz.train import methods

        cfg = resolve_config(cfg)
        self.cfg, self.info = cfg, info
        backbone = models.build_backbone(cfg.arch, seed=cfg.seed)
        self.spec = methods.SSL_METHODS.get(cfg.method).for_family(methods.arch_family(backbone))
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
        self.held_out_lidar: float | None = None
        self._held_out_feats: tuple[np.ndarray, np.ndarray] | None = None
        self.bank_idx, self.query_idx = knn_sets(self.train_idx, self.val_idx, cfg.image_size)

    @property
    def n(self) -> int:
        """Training images per epoch (the held-out ones excluded)."""
        return len(self.items)

    @property
    def optim(self) -> Optim:
        """The method's optimiser recipe for this backbone family."""
        return self.spec.optim

    @property
    def sync_bn(self) -> bool:
        """Whether BatchNorm is synchronised under CUDA DDP (MoCo v2: no, it shuffles keys)."""
        return self.spec.sync_bn

    def set_epoch(self, epoch: int) -> None:
        """The views' seeds, the method's epoch (queues, frozen layers) and ContrastiveCrop's boxes."""
        self.dataset.set_epoch(epoch)
        self.model.set_epoch(epoch)
        if self.boxes is not None:  # warm-up: RandomResizedCrop; then ContrastiveCrop in the current boxes
            self.dataset.boxes = self.boxes.for_epoch(epoch)

    def after_epoch(self, epoch: int, step: int, device: torch.device) -> dict[str, Any] | None:
        """ContrastiveCrop's box update, when its schedule says so; the metrics record, or None.

        The boxes are recomputed with the online backbone in eval mode (every rank its shard, then
        all-gathered) and saved as ``boxes.npz``.
        """
        if self.boxes is None:
            return None
        rec = self.boxes.update(self.model.backbone, epoch, step, device=device, info=self.info)
        if rec and self.info.is_main:
            self.boxes.save(Path(self.cfg.out) / "boxes.npz")
        return rec

    def extra_state(self) -> dict[str, torch.Tensor]:
        """ContrastiveCrop's boxes (nothing else: the method's state is in its module)."""
        return self.boxes.state() if self.boxes is not None else {}

    def load_extra_state(self, st: dict[str, Any]) -> None:
        """Restore ContrastiveCrop's boxes from ``state.pt``."""
        if self.boxes is not None:
            self.boxes.load_state(st)

    def loss(self, model: nn.Module, batch, device: torch.device, channels_last: bool) -> torch.Tensor:
        """The method's loss on one batch of views."""
        views = [v.to(device, non_blocking=True) for v in batch[0]]
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return model(views)

    def before_step(self, step: int) -> None:
        """DINO's per-parameter gradient clip, then the method's own hook (frozen prototypes, last layer)."""
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
        """The method's end-of-step hook (momentum encoders, queues, DINO's centre).

        Its progress is ``step / total``; for MoCo v3 ``(step + 1) / total``: ``main_moco.py``
        updates the momentum encoder at the start of step i + 1's forward with
        ``adjust_moco_momentum(epoch + i / iters_per_epoch)`` of that step (the online weights are
        the same: those after step i's update).
        """
        ahead = int(getattr(self.model, "momentum_of_next_step", False))
        self.model.on_step_end((step + ahead) / max(1, total))

    def step_metrics(self) -> dict[str, float]:
        """Nothing beyond the loss: an SSL loss is one term."""
        return {}

    def embeddings(self, *, held_out: bool) -> Embeddings | None:
        """The held-out images' monitored output (after an evaluation), else the last batch's two views."""
        if held_out and self.held_out_z is not None:
            extra = {} if self.held_out_alignment is None else {"alignment": self.held_out_alignment,
                                                                 "lidar": self.held_out_lidar, "lidar_views": 2}
            return Embeddings(self.held_out_z[0], self.held_out_z[1], "held_out", extra)
        z = self.model.embeddings
        return None if z is None else Embeddings(z[0], z[1], "train_batch")

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
        """Two views of each held-out query image from the method's recipe, the same every epoch.

        They are Wang & Isola's alignment pairs.
        """
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
        """Re-estimate the BatchNorm statistics of the exported and the monitored modules (PreciseBN).

        Exact averages over up to ``batches`` training batches (Wu & Johnson 2021). The running
        averages lag the weights by ~10 steps (momentum 0.1); after an epoch of a few dozen steps
        that lag alone made a healthy SimSiam look half collapsed in eval mode. The statistics
        never enter a train-mode forward, so training is unchanged; checkpoints get the
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
            set_bn_splits(model, model.train_bn_splits())

    @torch.no_grad()
    def features(self, module: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``module(x)`` in batches of ``EVAL_BATCH`` (as ``featviz embed`` runs them), on CPU float32."""
        return torch.cat([module(x[i:i + EVAL_BATCH].to(device)).float().cpu() for i in range(0, len(x), EVAL_BATCH)])

    @torch.no_grad()
    def evaluate(self, device: torch.device) -> dict[str, Any]:
        """The kNN accuracy of the exported backbone on the held-out split (empty without labels).

        The protocol (``knn_protocol``, stored with every checkpoint; ``checkpoint_knn``
        recomputes it from the file): the bank is the first training images, the queries the
        held-out ones, all through ``eval_transform`` at the training size; the exported backbone
        in eval mode with the BatchNorm statistics the checkpoint carries (PreciseBN); weighted
        kNN on l2-normalised features, k = ``knn_k``, t = 0.07.

        Also keeps ``held_out_z``, for the epoch's collapse metrics: the monitored output
        (``SSLMethod.monitored``) in eval mode of the held-out images as they are (std, rank,
        uniformity), ``held_out_lidar`` of two augmented views of each (Thilak et al.; the rule of
        every training record), and ``held_out_alignment`` between those two views (Wang &
        Isola). With a predictor, adds ``std_l2_predictor``/``rankme_predictor`` of its output:
        a projector ending in BatchNorm (SimSiam, MoCo v3) cannot output one vector for a whole
        batch, so a collapsed model sends almost every image to one point and ~1.5 % to its
        opposite, and std_l2 of z stays near 2*sqrt(p(1-p)) ~ 0.25 x 1/sqrt(d); the predictor has
        no BN at its end and shows the point (digits without stop-gradient: 0.26 x for z, 0.023 x
        for p).
        """
        if not len(self.query_idx):
            return {}
        from featviz.collapse import alignment, lidar

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
        self.held_out_lidar = lidar([a1.numpy(), a2.numpy()])
        self._held_out_feats = (feats[n_tr:].numpy(), y[n_tr:].numpy())
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

    def held_out_features(self) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
        """The kNN queries' features (the exported backbone, eval mode) and labels of the last ``evaluate``."""
        if self._held_out_feats is None:
            return None
        return (*self._held_out_feats, list(self.class_names or []))

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

