"""Semantic segmentation: a DeepLabv3+-style model, VOC-layout data, supervised and CAC training.

``Segmenter`` = a torchvision ResNet backbone (dilated by ``-os8``/``-os16`` arch names) plus a
DeepLabv3+ head (ASPP on ``layer4``, a 1x1-reduced ``layer1`` skip, two 3x3 convs, a 1x1
classifier). ``forward`` returns per-pixel logits ``(N, C, H, W)`` at the input size.

CAC (Lai et al., "Semi-supervised Semantic Segmentation with Directional Context-aware
Consistency", CVPR 2021) adds, on two overlapping crops of an unlabelled image, a projector
(Conv1x1 -> ReLU -> Conv1x1, l2-normalised) on the stride-8 decoder features and the
*directional* contrastive loss ``directional_contrast``: each overlap pixel is pulled toward
its counterpart in the other crop only where that counterpart is the more confident one
(and above ``pos_thresh``); negatives are ``selected_num`` random pixels per crop whose pseudo
label differs from the anchor's.

Checkpoints: ``backbone.*`` + ``head.*`` (+ ``projector.*`` for CAC), with ``num_classes`` and
``class_names`` in the ``featviz`` metadata. ``load_segmenter(path)`` rebuilds the model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from featviz.data import IMAGENET_MEAN, IMAGENET_STD, load_image
from featviz.description import IMAGENET, ModelDescription, Normalization, attach, describe
from featviz.errors import CheckpointError, DataError
from featviz.masks import IGNORE_INDEX

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- model
def _conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the deep features + a low-level skip from ``layer1`` -> per-pixel logits at stride 4."""

    def __init__(self, in_ch: int, low_ch: int, num_classes: int, dim: int = 256, low_dim: int = 48,
                 rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.aspp = ASPP(in_ch, list(rates), dim)
        self.low = _conv_bn(low_ch, low_dim, 1)
        self.fuse = nn.Sequential(_conv_bn(dim + low_dim, dim, 3), _conv_bn(dim, dim, 3))
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def features(self, deep: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Decoder features (N, dim, H/4, W/4): the 'out_dim' features CAC contrasts."""
        x = self.aspp(deep)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, self.low(low)], dim=1))


def head_spec(backbone: nn.Module, num_classes: int, crop_size: int) -> dict[str, Any]:
    """A DeepLabv3+ head spec scaled to the backbone width and crop size (ResNet-50: 256/48, 6/12/18)."""
    c1, c4 = (getattr(blk, "conv3", blk.conv2).out_channels for blk in (backbone.layer1[-1], backbone.layer4[-1]))
    dim = int(min(256, max(32, c4 // 2)))
    stride = _output_stride(backbone)
    fmap = max(1, crop_size // stride)
    # DeepLab's 6/12/18 suit a 20-cell map at output stride 16 (CAC: crop 320); scale to ours
    rates = tuple(sorted({max(1, round(r * fmap / 20)) for r in (6, 12, 18)}))
    return {"type": "deeplabv3plus", "in_ch": int(c4), "low_ch": int(c1), "num_classes": int(num_classes),
            "dim": dim, "low_dim": max(8, dim * 48 // 256), "rates": list(rates)}


def _output_stride(backbone: nn.Module) -> int:
    name = describe(backbone).name
    stride = 8 if name.endswith("-os8") else 16 if name.endswith("-os16") else 32
    return stride // 4 if "-cifar" in name else stride


def _low_stride(backbone: nn.Module) -> int:
    """Stride of ``layer1`` (the decoder's resolution): 4, or 1 with a CIFAR stem."""
    return 1 if "-cifar" in describe(backbone).name else 4


class Segmenter(nn.Module):
    """A ResNet backbone + DeepLabv3+ head (+ CAC projector); ``forward`` -> logits (N, C, H, W)."""

    def __init__(self, backbone: nn.Module, head: dict[str, Any], projector: dict[str, Any] | None = None,
                 class_names: list[str] | None = None):
        super().__init__()
        if not hasattr(backbone, "layer4"):
            from featviz.errors import ArchitectureError

            raise ArchitectureError(f"segmentation needs a torchvision ResNet backbone, got "
                                    f"{describe(backbone).name!r}; use e.g. resnet50-os16 or resnet18_w16-os8")
        self.backbone = backbone
        self.head_spec, self.projector_spec = dict(head), projector
        self.head = DeepLabV3PlusHead(head["in_ch"], head["low_ch"], head["num_classes"], head["dim"],
                                      head["low_dim"], tuple(head["rates"]))
        self.projector = None
        if projector is not None:  # CAC: Conv1x1(out_dim) -> ReLU -> Conv1x1(proj_final_dim)
            self.projector = nn.Sequential(nn.Conv2d(head["dim"], head["dim"], 1), nn.ReLU(inplace=True),
                                           nn.Conv2d(head["dim"], projector["out"], 1))
        self.num_classes = head["num_classes"]
        self.class_names = list(class_names or [str(i) for i in range(self.num_classes)])

    def _stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        low = b.layer1(x)
        return b.layer4(b.layer3(b.layer2(low))), low

    def decoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder features at ``layer1``'s stride (4; 1 with a CIFAR stem)."""
        deep, low = self._stages(x)
        return self.head.features(deep, low)

    def pixel_features(self, x: torch.Tensor, which: str = "decoder") -> torch.Tensor:
        """Stride-8 pixel features as CAC contrasts them: ``decoder`` (avg-pooled by 2) or
        ``projector`` (l2-normalised; CAC models only)."""
        f = self.to_stride8(self.decoder_features(x))
        if which == "projector":
            if self.projector is None:
                raise CheckpointError("this segmenter has no CAC projector; use which='decoder'")
            return F.normalize(self.projector(f), dim=1)
        return f

    def to_stride8(self, f: torch.Tensor) -> torch.Tensor:
        """Average-pool decoder features to stride 8 (CAC: ``avg_pool2d(2)`` from stride 4)."""
        k = 8 // _low_stride(self.backbone)
        return F.avg_pool2d(f, k) if k > 1 else f

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits at the input size, decoder features at stride 4)."""
        f = self.decoder_features(x)
        logits = F.interpolate(self.head.classifier(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, f

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """Logits (N, C, H, W); with ``with_features`` also the stride-4 decoder features."""
        logits, f = self.logits_and_features(x)
        return (logits, f) if with_features else logits


def load_segmenter(path: str | os.PathLike) -> Segmenter:
    """Rebuild a ``Segmenter`` (eval mode) from a featviz segmentation checkpoint.

    The model's ``forward`` gives per-pixel logits (N, C, H, W); ``class_names`` and its
    ``ModelDescription`` (``featviz.description.describe``) are attached.

    Raises:
        CheckpointError: not a featviz segmentation checkpoint.
    """
    from featviz.checkpoints import read_featviz
    from featviz.models import ArchSpec, build_backbone

    tensors, meta = read_featviz(path)
    heads = meta.get("heads") or {}
    if "head" not in heads:
        raise CheckpointError(f"{Path(path).name} holds no segmentation head (method {meta.get('method')!r}); "
                              "expected a checkpoint from `featviz train --method supervised_seg|cac`")
    backbone = build_backbone(ArchSpec.from_dict(meta["arch"])).train()
    model = Segmenter(backbone, heads["head"], heads.get("projector"), meta.get("class_names"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{Path(path).name} does not fit its own metadata: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    norm = Normalization.from_dict(meta["normalization"], "featviz checkpoint metadata") \
        if meta.get("normalization") else IMAGENET
    attach(model, ModelDescription(
        arch=describe(backbone).arch, kind="segmenter", head="head", num_classes=model.num_classes,
        class_names=tuple(model.class_names), normalization=norm, input_size=describe(backbone).input_size,
        method=meta.get("method"), source={"format": "featviz", "path": str(path), "heads": sorted(heads)}))
    model.featviz_arch = describe(backbone).arch  # read by cam.py until issue 11 part 2
    return model.eval()


# ---------------------------------------------------------------- CAC loss
def directional_contrast(f1: torch.Tensor, f2: torch.Tensor, conf1: torch.Tensor, conf2: torch.Tensor,
                         label1: torch.Tensor, negatives: torch.Tensor, neg_labels: torch.Tensor, *,
                         temp: float = 0.1, pos_thresh: float = 0.75) -> torch.Tensor:
    """CAC's directional context-aware loss for anchors ``f1`` aligned pixel-by-pixel with ``f2``.

    l = -1/N sum_hw M_d * log( r(f1, f2) / (r(f1, f2) + sum_{n: label_n != label1} r(f1, f_n)) ),
    r(a, b) = exp(a . b / temp), M_d = 1[conf2 > conf1 and conf2 > pos_thresh], f2 detached: the
    less confident feature moves toward the more confident one, never the other way.

    Args:
        f1, f2: (P, d) l2-normalised features of the same image pixels in two crops.
        conf1, conf2: (P,) max softmax probability per pixel in each crop.
        label1: (P,) pseudo labels of the anchors (negatives with the same label are ignored).
        negatives, neg_labels: (M, d) sampled pixel features and their pseudo labels.

    Returns:
        The scalar loss (0 when no pixel passes the directional mask).
    """
    pos = (f1 * f2.detach()).sum(dim=1, keepdim=True) / temp  # P x 1
    neg = f1 @ negatives.T / temp  # P x M
    neg = neg.masked_fill(label1[:, None] == neg_labels[None, :], float("-inf"))
    nll = torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - pos[:, 0]
    mask = ((conf2 > conf1) & (conf2 > pos_thresh)).float()
    return (nll * mask).sum() / (mask.sum() + 1e-12)


# ---------------------------------------------------------------- data
class VOCFolder:
    """A VOC-layout folder: JPEGImages/, SegmentationClass/ (PNG, 255 = ignore), ImageSets/Segmentation/*.txt."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"{str(self.root)!r} is not a VOC-layout folder: expected JPEGImages/, "
                            "SegmentationClass/ and ImageSets/Segmentation/{train,val,unlabeled}.txt")
        classes = self.root / "classes.txt"
        self.class_names = [c.strip() for c in classes.read_text().splitlines() if c.strip()] \
            if classes.exists() else None

    def ids(self, split: str) -> list[str]:
        f = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if f.exists():
            return [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
        if split == "train":  # no lists: every image is a training image
            return sorted(p.stem for p in (self.root / "JPEGImages").glob("*.jpg"))
        return []

    def image(self, i: str) -> Image.Image:
        return load_image(self.root / "JPEGImages" / f"{i}.jpg")

    def mask_path(self, i: str) -> Path:
        return self.root / "SegmentationClass" / f"{i}.png"

    def mask(self, i: str) -> np.ndarray:
        p = self.mask_path(i)
        if not p.exists():
            raise DataError(f"image {i!r} has no mask {str(p)!r}")
        return np.asarray(Image.open(p), dtype=np.uint8)


class SegDataset(torch.utils.data.Dataset):
    """Labelled crops (+ a CAC pair of an unlabelled image), seeded by (seed, epoch, index)."""

    def __init__(self, voc: VOCFolder, labelled: list[str], unlabelled: list[str], *, crop_size: int,
                 iou_bound: tuple[float, float], seed: int, base_size: int):
        self.voc, self.labelled, self.unlabelled = voc, labelled, unlabelled
        self.crop_size, self.iou_bound, self.seed, self.base_size, self.epoch = crop_size, iou_bound, seed, base_size, 0
        self._norm = (np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labelled)

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        x = (arr.astype(np.float32) / 255.0 - self._norm[0]) / self._norm[1]
        return torch.from_numpy(x.transpose(2, 0, 1).copy())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from featviz.crops import LowLevelAugment, cac_pair

        rng = np.random.default_rng([self.seed, self.epoch, i])
        kw = dict(base_size=self.base_size, crop_size=self.crop_size, iou_bound=self.iou_bound)
        lid = self.labelled[i]
        s = cac_pair(self.voc.image(lid), self.voc.mask(lid), rng, **kw)
        aug = LowLevelAugment(rng)
        item = {"image": self._tensor(aug(s.crop1)), "mask": torch.from_numpy(s.mask1.astype(np.int64))}
        if self.unlabelled:
            uid = self.unlabelled[int(rng.integers(len(self.unlabelled)))]
            u = cac_pair(self.voc.image(uid), None, rng, **kw)
            item.update(u1=self._tensor(aug(u.crop1)), u2=self._tensor(aug(u.crop2)),
                        ov1=torch.tensor(u.pair.overlap1), ov2=torch.tensor(u.pair.overlap2),
                        flip=torch.tensor(u.pair.flip))
        return item


# ---------------------------------------------------------------- training task
class SegTask:
    """``supervised_seg`` (cross-entropy on labelled crops) or ``cac`` (+ directional contrast)."""

    def __init__(self, cfg, info):
        from featviz.models import build_backbone

        self.cfg, self.info = cfg, info
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
        base = max(cfg.image_size, int(round(cfg.image_size * 400 / 320)))  # CAC: base 400 for crop 320
        self.dataset = SegDataset(voc, train_ids, unlabelled, crop_size=cfg.image_size, iou_bound=cfg.iou_bound,
                                  seed=cfg.seed, base_size=base)
        self.collate = torch.utils.data.default_collate
        self.n = len(train_ids)
        self.last_parts: dict[str, float] = {}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool):
        x = batch["image"].to(device)
        if self.cfg.method != "cac":
            logits = model(x)
            loss = F.cross_entropy(logits.float(), batch["mask"].to(device), ignore_index=IGNORE_INDEX)
            self.last_parts = {"loss_sup": float(loss.detach())}
            return loss
        b = len(x)
        allx = torch.cat([x, batch["u1"].to(device), batch["u2"].to(device)])
        if channels_last:
            allx = allx.contiguous(memory_format=torch.channels_last)
        logits, feats = model(allx, with_features=True)  # through DDP's forward, so gradients sync
        sup = F.cross_entropy(logits[:b].float(), batch["mask"].to(device), ignore_index=IGNORE_INDEX)
        unsup = self._cac(model, feats[b:], logits[b:], batch)
        self.last_parts = {"loss_sup": float(sup.detach()), "loss_unsup": float(unsup.detach())}
        return sup + self.cfg.weight_unsup * unsup

    def _cac(self, model, feats: torch.Tensor, logits: torch.Tensor, batch) -> torch.Tensor:
        seg = _module(model)
        f = seg.to_stride8(feats)  # stride 4 -> 8 (CAC)
        z = F.normalize(seg.projector(f), dim=1).float()
        prob = F.softmax(F.interpolate(logits.float(), size=f.shape[-2:], mode="bilinear", align_corners=False), 1)
        conf, pseudo = prob.max(1)  # (2B, h, w)
        b = len(z) // 2
        rng = np.random.default_rng([self.cfg.seed, int(batch["ov1"].sum()), int(z.shape[-1])])
        # negatives: selected_num random pixels from each crop set (CAC: np.random.choice(b*h*w, selected_num))
        negs, neg_labels = [], []
        for half in (slice(0, b), slice(b, 2 * b)):
            flat = z[half].permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            lab = pseudo[half].reshape(-1)
            idx = torch.as_tensor(rng.choice(len(flat), min(self.cfg.selected_num, len(flat)), replace=False))
            negs.append(flat[idx])
            neg_labels.append(lab[idx])
        from featviz.methods import gather

        negatives, neg_labels = gather(torch.cat(negs)), gather(torch.cat(neg_labels))
        total, count = z.new_zeros(()), 0
        s = 8
        for i in range(b):
            pair = []
            for k, key in ((i, "ov1"), (b + i, "ov2")):
                t, l, bt, r = (int(v) for v in batch[key][i])
                which = 0 if key == "ov1" else 1
                flip = bool(batch["flip"][i][which])
                maps = [zz.flip(-1) if flip else zz for zz in (z[k], conf[k], pseudo[k])]
                pair.append([m[..., t // s:bt // s, l // s:r // s] for m in maps])
            (z1, c1, p1), (z2, c2, p2) = pair
            if z1.numel() == 0 or z1.shape != z2.shape:
                continue
            f1, f2 = z1.flatten(1).T, z2.flatten(1).T
            c1, c2, p1, p2 = c1.flatten(), c2.flatten(), p1.flatten(), p2.flatten()
            kw = dict(temp=self.cfg.temp, pos_thresh=self.cfg.pos_thresh)
            total = total + directional_contrast(f1, f2, c1, c2, p1, negatives, neg_labels, **kw) \
                + directional_contrast(f2, f1, c2, c1, p2, negatives, neg_labels, **kw)
            count += 2
        return total / max(1, count)

    def after_step(self, step: int, total: int) -> None:
        pass

    def embeddings(self):
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
        seg = self.model
        tensors = {f"backbone.{k}": v for k, v in seg.backbone.state_dict().items()}
        tensors.update({f"head.{k}": v for k, v in seg.head.state_dict().items()})
        heads: dict[str, Any] = {"head": seg.head_spec}
        if seg.projector is not None:
            tensors.update({f"projector.{k}": v for k, v in seg.projector.state_dict().items()})
            heads["projector"] = seg.projector_spec
        meta = {"arch": describe(seg.backbone).arch.to_dict(),
                "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "source_format": "featviz", "method": self.cfg.method, "heads": heads,
                "num_classes": seg.num_classes, "class_names": seg.class_names}
        return tensors, meta


def _module(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
