"""Self-supervised methods: one registration per method, each matching its official code.

A method is an ``SSLMethod`` (backbone + heads, ``forward(views) -> loss``) and a frozen
``MethodRegistration`` registered next to it in ``SSL_METHODS``: the training views (an
``featviz.data.augment.Recipe``), the official optimiser and schedule (``Optim``, with the file and
line it comes from), featviz's default where a CPU-sized run needs another one (each such
deviation is listed in ``deviations`` and in docs/train.md), the data-dependent
hyperparameters (``defaults``: MoCo's queue and momentum, SwAV's queue and prototype freezing,
DINO's last-layer freezing), the presets measured on the built-in ``digits`` set, and whether
BatchNorm is synchronised under DDP. Segmentation methods (``supervised_seg``, ``cac``) have their
own registry (``featviz.train.segmentation.registry.SEG_METHODS``); ``featviz.cli.choices.MethodName``
lists the names of both (a test keeps them in sync).

Modules: ``registry`` (the registration type, ``SSL_METHODS``, ``build_method``), ``base``
(``SSLMethod``, ``MomentumMixin``), ``ddp`` (gather, batch shuffle, SplitBatchNorm) and one module
per family with its losses: ``contrastive`` (SimCLR, MoCo v2, MoCo v3), ``siamese`` (BYOL,
SimSiam), ``barlow_twins``, ``swav``, ``dino``. Importing this package registers every method.

Heads are built from JSON-able specs (``featviz.models.heads.build_head``) so a checkpoint can rebuild them; their
tensors are named ``projector.*``, ``predictor.*`` (and ``prototypes.*`` for SwAV), next to
``backbone.<torchvision/timm name>``. Head widths follow each paper for a 2048-d ResNet-50 and
shrink in proportion for narrower backbones (``scaled``).

Momentum encoders follow the official code: an EMA of the online *parameters* only; the
target keeps its own BatchNorm statistics from its own forwards (MoCo ``builder.py``
``_momentum_update_key_encoder``, BYOL ``byol_experiment.py`` ``target_state``, DINO
``main_dino.py`` teacher EMA).

Distributed runs: contrastive and batch-statistics losses (SimCLR, MoCo v3, Barlow Twins, SwAV)
gather embeddings from every rank (``gather``) and every rank computes the same global loss;
per-sample losses (SimSiam, BYOL, DINO) are averaged by DDP. Both equal the single-process loss
on the global batch. MoCo v2 shuffles the key batch across ranks (``batch_shuffle_ddp``) and,
in one process, splits BatchNorm (``SplitBatchNorm2d``) as the official CIFAR demo does.
"""

from featviz.train.methods.barlow_twins import BarlowTwins, barlow_loss
from featviz.train.methods.base import MomentumMixin, SSLMethod, zero_init_residual
from featviz.train.methods.contrastive import MoCoV2, MoCoV3, SimCLR, moco_ctr, moco_infonce, nt_xent
from featviz.train.methods.ddp import (
    SplitBatchNorm2d,
    all_mean,
    batch_shuffle_ddp,
    batch_unshuffle_ddp,
    convert_split_bn,
    gather,
    set_bn_splits,
)
from featviz.train.methods.dino import DINO, dino_h
from featviz.train.methods.registry import (
    SSL_METHODS,
    DataContext,
    MethodRegistration,
    arch_family,
    build_method,
    register,
)
from featviz.train.methods.siamese import BYOL, SimSiam, neg_cosine
from featviz.train.methods.swav import SwAV, sinkhorn

__all__ = [
    "BYOL", "DINO", "SSL_METHODS", "BarlowTwins", "DataContext", "MethodRegistration", "MoCoV2", "MoCoV3",
    "MomentumMixin", "SSLMethod", "SimCLR", "SimSiam", "SplitBatchNorm2d", "SwAV", "all_mean",
    "arch_family", "barlow_loss", "batch_shuffle_ddp", "batch_unshuffle_ddp", "build_method", "convert_split_bn",
    "dino_h", "gather", "moco_ctr", "moco_infonce", "neg_cosine", "nt_xent", "register", "set_bn_splits", "sinkhorn",
    "zero_init_residual",
]
