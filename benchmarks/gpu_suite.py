"""featviz on one GPU, each figure next to its baseline in the same run: one table in <= 8 minutes (H100/H200).

    timeout 540 python benchmarks/gpu_suite.py --json gpu_suite.json      # the GPU run (about 8 min)
    python benchmarks/gpu_suite.py --cpu-small                             # every section on CPU, tiny sizes

Sections (each row: featviz's figure, the baseline's, their speed ratio, the target, notes):

- embed: ``featviz embed`` (``featviz.eval.embed.run_embed``, what the command runs) images/s against a bare
  ``torch.inference_mode()`` bf16 loop (torchvision ``ImageFolder`` + ``DataLoader``, channels_last, the same
  transform, batch size and worker count), ResNet-50 and ViT-S/B/L at 224 px, random weights (torchvision /
  timm constructors), on synthetic JPEGs written to a temporary folder. Both are timed in steady state: after 4
  warm-up batches, to the end. The notes add the same model's throughput on a synthetic batch already on
  the GPU (model only: the ceiling with no decoding) and timm's published model-only figures on other cards.
- train: ``featviz train`` (``featviz.train.loop.train``) AMP training steps/s against a bare AMP loop of the same
  model, views, optimiser and batch (the loss written out by hand: SimCLR's NT-Xent; DINO's centred
  self-distillation with the teacher's EMA and the official per-parameter clip), ResNet-50 SimCLR and ViT-S/16
  DINO at 224 px, steady state (after 4 warm-up steps).
- cam: Grad-CAM images/s of featviz's CAM core (``featviz.views.cam.explain``, what ``featviz cam`` runs per
  batch) against pytorch-grad-cam's ``GradCAM`` called directly, same ResNet-50, ``layer4``, batch and top-1
  targets; the largest difference between their maps is printed.
- maps: ``featviz tsne EMB.npz --method tsne|umap --backend torchdr --device cuda --out m.png --json`` on 1M x 256
  synthetic pixel-like embeddings (20 overlapping classes; ``tsne_bench.pixel_like``), against openTSNE (t-SNE)
  and umap-learn (UMAP) with every CPU core, each capped at a stated time: a capped run reports "did not finish
  in X s" and the ratio is then a lower bound. A featviz without ``--backend`` (or without torchdr) reports the
  row as skipped, with the reason.

Ratios are speed ratios: featviz's throughput / the baseline's (for times: the baseline's seconds / featviz's),
so > 1 means featviz is faster. ``--budget`` (default 480 s) is shared: the maps run last and their caps take
what
the other sections left. Every row is printed as it finishes and ``--json`` is rewritten after each row, so a
run cut short by ``timeout`` keeps what it measured.

With no CUDA device it prints one line ("gpu_suite: skipped: ...") and exits 0, unless ``--cpu-small``: then
every section runs on the CPU at tiny sizes (ResNet-18 / ViT-S at 64 px, a few batches, 2,000 points), which
proves the script works, not what the GPU reaches. Needs only what ``pip install -e .[gpu,test]`` installs
(torch, torchvision, timm, grad-cam, openTSNE, umap-learn, torchdr); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# timm's published inference throughput (images/s; eager, AMP, NCHW, model only, synthetic input)
TIMM_SOURCE = ("timm results/benchmark-infer-amp-nchw-pt291-cu130-5090.csv (bs 1024), -pt291-cu130-pro6000maxq.csv "
               "(bs 2048), -pt291-cu128-4090.csv; huggingface/pytorch-image-models @aa4b585, PyTorch 2.9.1")
TIMM_PUBLISHED = {  # model: {card: img/s}
    "resnet50": {"RTX 5090": 6356, "RTX PRO 6000 Max-Q": 6459, "RTX 4090": 4303},
    "vit_small_patch16_224": {"RTX 5090": 10973, "RTX PRO 6000 Max-Q": 11168, "RTX 4090": 8215},
    "vit_base_patch16_224": {"RTX 5090": 3916, "RTX PRO 6000 Max-Q": 4190, "RTX 4090": 2993},
    "vit_large_patch16_224": {"RTX 5090": 1108, "RTX PRO 6000 Max-Q": 1365, "RTX 4090": 954},
}

# name: (featviz --arch, bare constructor: "tv:<torchvision name>" or "timm:<name>", timm name for the notes)
EMBED_MODELS = {
    "ResNet-50": ("resnet50", "tv:resnet50", "resnet50"),
    "ViT-S/16": ("vit_small_patch16_224", "timm:vit_small_patch16_224", "vit_small_patch16_224"),
    "ViT-B/16": ("timm:vit_base_patch16_224", "timm:vit_base_patch16_224", "vit_base_patch16_224"),
    "ViT-L/16": ("timm:vit_large_patch16_224", "timm:vit_large_patch16_224", "vit_large_patch16_224"),
    "ResNet-18": ("resnet18", "tv:resnet18", None),  # --cpu-small
}

SIZES = {  # the GPU run, and --cpu-small
    "gpu": dict(embed_models=["ResNet-50", "ViT-S/16", "ViT-B/16", "ViT-L/16"], embed_n=6144, embed_batch=256,
                image_px=256, size=224, model_only_iters=15, skip=4,
                train=[("simclr", "resnet50", "ResNet-50 SimCLR"), ("dino", "vit_small_patch16_224", "ViT-S/16 DINO")],
                train_batch=128, train_images=4096, train_size=224,
                cam_n=512, cam_batch=64, cam_arch="resnet50", cam_size=224,
                map_n=1_000_000, map_dim=256, map_caps={"featviz": 150, "opentsne": 60, "umap-learn": 45}),
    "cpu": dict(embed_models=["ResNet-18", "ViT-S/16"], embed_n=64, embed_batch=8, image_px=72, size=64,
                model_only_iters=2, skip=2,
                train=[("simclr", "resnet18", "ResNet-18 SimCLR"),
                       ("dino", "timm:vit_tiny_patch16_224", "ViT-Ti/16 DINO")],
                train_batch=8, train_images=64, train_size=32,
                cam_n=16, cam_batch=8, cam_arch="resnet18", cam_size=64,
                map_n=2000, map_dim=32, map_caps={"featviz": 240, "opentsne": 120, "umap-learn": 120}),
}
MAP_RESERVE = 150  # seconds of --budget the embed/train/cam sections leave for the maps (GPU run)


# ------------------------------------------------------------------ bookkeeping
class Suite:
    """The rows, the clock and the JSON file."""

    def __init__(self, args, meta: dict):
        self.args, self.meta, self.rows, self.t0 = args, meta, [], time.perf_counter()
        self.reserve = 0.0  # seconds kept for the maps section

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def add(self, section: str, case: str, featviz=None, baseline=None, unit: str = "", ratio=None,
            target: str = "", notes: str = "", status: str = "ok", **extra) -> dict:
        row = dict(section=section, case=case, featviz=featviz, baseline=baseline, unit=unit, ratio=ratio,
                   target=target, notes=notes, status=status, at_s=round(self.elapsed(), 1), **extra)
        self.rows.append(row)
        print(f"[{row['at_s']:6.1f} s] {section:5s} {case}: {_fmt(featviz)} vs {_fmt(baseline)} {unit}  "
              f"ratio {_ratio(ratio)}  {status if status != 'ok' else ''} {notes}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        if not self.args.json:
            return
        path = Path(self.args.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "wall_s": round(self.elapsed(), 1), "rows": self.rows},
                                  indent=2, default=str))
        tmp.replace(path)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def _ratio(r) -> str:
    if r is None:
        return "-"
    if isinstance(r, str):
        return r
    return f"{r:.2f}x"


def table(rows: list[dict]) -> str:
    out = ["| section | case | featviz | baseline | unit | ratio (featviz speed / baseline) | target | notes |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = r["notes"] if r["status"] == "ok" else f"**{r['status']}**: {r['notes']}"
        out.append(f"| {r['section']} | {r['case']} | {_fmt(r['featviz'])} | {_fmt(r['baseline'])} | {r['unit']} | "
                   f"{_ratio(r['ratio'])} | {r['target']} | {notes} |")
    return "\n".join(out)


class Clock:
    """A progress hook (``progress(iterable, total=None)``): the time each batch is handed out, and the end."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.sizes: list[int] = []

    def __call__(self, iterable, total=None):
        for item in iterable:
            self.t.append(time.perf_counter())
            self.sizes.append(_batch_len(item))
            yield item
        self.t.append(time.perf_counter())

    def rate(self, skip: int, per_item: bool = False) -> float:
        """Items (or images) per second from the ``skip``-th batch to the end (fewer skipped when short)."""
        k = min(skip, max(0, len(self.sizes) - 2))
        n = (len(self.sizes) - k) if per_item else sum(self.sizes[k:])
        return n / (self.t[-1] - self.t[k])


def _batch_len(item) -> int:
    first = item[0]
    if isinstance(first, (list, tuple)):  # training views
        first = first[0]
    if first is None:  # featviz's embed batch with every image undecodable
        return len(item[2])
    return int(first.shape[0])


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ data
def _jpegs(args_tuple) -> None:
    from PIL import Image

    folder, start, stop, px = args_tuple
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        base = rng.integers(0, 255, (px // 8, px // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((px, px), Image.BICUBIC).save(Path(folder) / f"c{i % 10}" / f"{i:06d}.jpg",
                                                                   quality=90)


def make_jpegs(folder: Path, n: int, px: int) -> None:
    """``n`` synthetic px x px JPEGs (smooth random colours) in 10 class folders, written in parallel."""
    from concurrent.futures import ProcessPoolExecutor

    for c in range(10):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    jobs = min(16, os.cpu_count() or 1)
    step = -(-n // jobs)
    chunks = [(str(folder), s, min(n, s + step), px) for s in range(0, n, step)]
    if jobs == 1:
        for c in chunks:
            _jpegs(c)
        return
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_jpegs, chunks))


# ------------------------------------------------------------------ embed
def bare_model(spec: str, size: int):
    """What a researcher's script builds: torchvision's or timm's constructor, random weights, pooled output."""
    import torch

    torch.manual_seed(0)
    kind, name = spec.split(":", 1)
    if kind == "tv":
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        model.fc = torch.nn.Identity()
        return model
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0, img_size=size)


def bare_embed(model, root: Path, size: int, batch: int, workers: int, device, clock: Clock):
    """The bare loop: ImageFolder + DataLoader, inference_mode, bf16 autocast and channels_last on CUDA."""
    import torch
    import torchvision

    from featviz.data.images import IMAGENET_MEAN, IMAGENET_STD, eval_transform

    cuda = device.type == "cuda"
    ds = torchvision.datasets.ImageFolder(str(root), transform=eval_transform(size, IMAGENET_MEAN, IMAGENET_STD))
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=cuda,
                                     prefetch_factor=4 if workers else None)
    model = model.to(device).eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    feats = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for x, _ in clock(dl):
            x = x.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(model(x).float().cpu())
    return torch.cat(feats)


def model_only(model, size: int, batch: int, iters: int, device) -> float:
    """Images/s of the model alone on a random batch already on the device (what timm's tables measure)."""
    import torch

    cuda = device.type == "cuda"
    model = model.to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    if cuda:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for _ in range(2):
            model(x)
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
    return batch * iters / (time.perf_counter() - t)


def section_embed(suite: Suite, cfg: dict, device, workers: int, tmp: Path) -> None:
    import torch

    from featviz.eval.embed import run_embed

    root = tmp / "jpegs"
    t = time.perf_counter()
    make_jpegs(root, cfg["embed_n"], cfg["image_px"])
    print(f"        {cfg['embed_n']:,} synthetic {cfg['image_px']} px JPEGs in {time.perf_counter() - t:.1f} s",
          flush=True)
    size, batch, skip = cfg["size"], cfg["embed_batch"], cfg["skip"]
    for name in cfg["embed_models"]:
        arch, spec, timm_name = EMBED_MODELS[name]
        case = f"{name} @ {size} px, batch {batch}"
        if suite.left() < suite.reserve:
            suite.add("embed", case, status="skipped", notes=f"time budget: {suite.left():.0f} s left")
            continue
        try:
            model = bare_model(spec, size)
            ceiling = model_only(model, size, batch, cfg["model_only_iters"], device)
            bare_clock = Clock()
            bare_embed(model, root, size, batch, workers, device, bare_clock)
            del model
            fv_clock = Clock()
            t = time.perf_counter()
            emb = run_embed(out=tmp / "e.npz", images=root, arch=arch, image_size=size, batch_size=batch,
                            device=str(device), workers=workers, force=True, progress=fv_clock)
            wall = time.perf_counter() - t
            fv, bare = fv_clock.rate(skip), bare_clock.rate(skip)
            pub = TIMM_PUBLISHED.get(timm_name or "", {})
            notes = (f"model only {ceiling:,.0f} img/s (featviz at {100 * fv / ceiling:.0f} % of it); "
                     f"whole command {cfg['embed_n'] / wall:,.0f} img/s incl. model build + .npz; autocast "
                     f"{emb.manifest.get('autocast')}")
            if pub:
                notes += "; timm published (model only): " + ", ".join(f"{k} {v:,}" for k, v in pub.items())
            suite.add("embed", case, fv, bare, "img/s", fv / bare, ">= 0.95x", notes, model_only=ceiling,
                      command_img_s=cfg["embed_n"] / wall, timm_published=pub, images=cfg["embed_n"],
                      workers=workers)
        except Exception as e:  # one failed case must not lose the rest of the table
            suite.add("embed", case, status="failed", notes=f"{type(e).__name__}: {e}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ------------------------------------------------------------------ train
def _train_config(method: str, arch: str, root: Path, out: Path, cfg: dict, device, workers: int):
    from featviz.train.config import TrainConfig, resolve_config

    return resolve_config(TrainConfig(method=method, data=str(root), out=str(out), arch=arch, epochs=1,
                                      batch_size=cfg["train_batch"], image_size=cfg["train_size"], device=str(device),
                                      workers=workers, limit=cfg["train_images"], log_every=10))


def bare_train(method: str, arch: str, root: Path, tmp: Path, cfg: dict, device, workers: int,
               clock: Clock) -> int:
    """A hand-written AMP loop over featviz's model and views (the same optimiser class and settings)."""
    import torch
    import torch.nn.functional as F

    from featviz.distributed import DistInfo
    from featviz.train.loop import epoch_batches
    from featviz.train.optim import build_optimizer, param_groups
    from featviz.train.ssl_task import SSLTask

    c = _train_config(method, arch, root, tmp / "unused", cfg, device, workers)
    task = SSLTask(c, DistInfo())
    cuda = device.type == "cuda"
    model = task.model.to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(c.optimizer, param_groups(model, task.optim, weight_decay=c.weight_decay), c.lr,
                          momentum=task.optim.momentum)
    task.dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(task.dataset, batch_sampler=epoch_batches(task.n, c.batch_size, 0, c.seed,
                                                                                    DistInfo()),
                                         collate_fn=task.collate, num_workers=workers, pin_memory=cuda)
    steps = 0
    for views, _, _ in clock(loader):
        views = [v.to(device, non_blocking=True) for v in views]
        if cuda:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            if method == "simclr":  # NT-Xent (SimCLR tf2/objective.py), both views' losses summed
                a, b = (F.normalize(model.projector(model.backbone(v)).float(), dim=1) for v in views[:2])
                n, tau = len(a), model.tau
                eye = torch.eye(n, dtype=torch.bool, device=device)
                labels = torch.arange(n, device=device)
                loss = (F.cross_entropy(torch.cat([a @ b.T / tau, (a @ a.T / tau).masked_fill(eye, -1e9)], 1), labels)
                        + F.cross_entropy(torch.cat([b @ a.T / tau, (b @ b.T / tau).masked_fill(eye, -1e9)], 1),
                                          labels))
            else:  # DINO (main_dino.py): the student on every crop, the teacher on the two global ones
                n = len(views[0])
                s = model.projector(model.backbone(torch.cat(views[:2])))
                with torch.no_grad():
                    t = model.target_projector(model.target_backbone(torch.cat(views[:2])))
                    t_soft = F.softmax((t.float() - model.center) / model.teacher_temp(), dim=1).split(n)
                s_log = F.log_softmax(s.float() / model.tps, dim=1).split(n)
                loss = sum(-(t_soft[i] * s_log[j]).sum(1).mean() for i in range(2) for j in range(2) if i != j) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if method == "dino":
            for p in model.parameters():  # utils.clip_gradients (clip 3.0), as the official code does it
                if p.grad is not None:
                    coef = 3.0 / (p.grad.detach().norm(2) + 1e-6)
                    if coef < 1:
                        p.grad.mul_(coef)
            for p in model.projector.last_layer.parameters():  # cancel_gradients_last_layer, epoch 0
                p.grad = None
        opt.step()
        if method == "dino":
            with torch.no_grad():
                m = model.base_momentum
                for po, pt in zip([*model.backbone.parameters(), *model.projector.parameters()],
                                  [*model.target_backbone.parameters(), *model.target_projector.parameters()],
                                  strict=True):
                    pt.mul_(m).add_(po.detach(), alpha=1 - m)
                model.center.mul_(0.9).add_(t.float().mean(0, keepdim=True), alpha=0.1)
        steps += 1
    _sync(device)
    clock.t[-1] = time.perf_counter()
    return steps


def section_train(suite: Suite, cfg: dict, device, workers: int, tmp: Path) -> None:
    import torch

    from featviz.train.loop import train

    root = tmp / "jpegs"
    if not root.exists():
        make_jpegs(root, cfg["train_images"], cfg["image_px"])
    for method, arch, name in cfg["train"]:
        case = f"{name} @ {cfg['train_size']} px, batch {cfg['train_batch']}"
        if suite.left() < suite.reserve:
            suite.add("train", case, status="skipped", notes=f"time budget: {suite.left():.0f} s left")
            continue
        try:
            bare_clock = Clock()
            steps = bare_train(method, arch, root, tmp, cfg, device, workers, bare_clock)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            fv_clock = Clock()
            t = time.perf_counter()
            res = train(_train_config(method, arch, root, tmp / f"run-{method}", cfg, device, workers),
                        force=True, progress=fv_clock)
            wall = time.perf_counter() - t
            fv, bare = fv_clock.rate(cfg["skip"], per_item=True), bare_clock.rate(cfg["skip"], per_item=True)
            suite.add("train", case, fv, bare, "steps/s", fv / bare, ">= 0.95x",
                      f"{steps} steps each, {cfg['train_batch'] * fv:,.0f} img/s (x2 views); featviz's whole run "
                      f"{wall:.1f} s incl. kNN monitor + checkpoints; {workers} workers",
                      steps=steps, featviz_run_s=wall, featviz_steps=res.steps)
        except Exception as e:
            suite.add("train", case, status="failed", notes=f"{type(e).__name__}: {e}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ------------------------------------------------------------------ cam
def section_cam(suite: Suite, cfg: dict, device) -> None:
    import torch
    from torch import nn

    from featviz.models.architectures import build_backbone
    from featviz.views import cam as C

    arch, n, bs, size = cfg["cam_arch"], cfg["cam_n"], cfg["cam_batch"], cfg["cam_size"]
    case = f"Grad-CAM {arch} layer4 @ {size} px, batch {bs}"
    try:
        from pytorch_grad_cam import GradCAM

        model = build_backbone(arch, seed=0)
        model.fc = nn.Linear(2048 if "50" in arch else 512, 1000)  # a classifier: top-1 targets
        model = model.to(device).eval()
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        layer = model.layer4
        info = C.probe_model(model, x[:1])
        ctx = C.TargetContext(C.TargetSpec("top1"), info, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

        def featviz(xs):
            return np.concatenate([C.explain(info, xs[i:i + bs], "gradcam", [layer],
                                             C.make_targets(ctx, xs[i:i + bs]), batch_size=bs)[0]
                                   for i in range(0, len(xs), bs)])

        def direct(xs):
            cam = GradCAM(model=model, target_layers=[layer])
            try:
                return np.concatenate([cam(input_tensor=xs[i:i + bs], targets=None) for i in range(0, len(xs), bs)])
            finally:
                cam.activations_and_grads.release()

        featviz(x[:bs]), direct(x[:bs])  # warm-up
        times, maps = {}, {}
        for side, fn in (("direct", direct), ("featviz", featviz)):
            _sync(device)
            t = time.perf_counter()
            maps[side] = fn(x)
            _sync(device)
            times[side] = time.perf_counter() - t
        diff = float(np.abs(maps["featviz"] - maps["direct"]).max())
        fv, base = n / times["featviz"], n / times["direct"]
        suite.add("cam", case, fv, base, "img/s", fv / base, ">= 1.5x (performance.md B5)",
                  f"{n} images, fp32 both; largest map difference {diff:.1e}", max_map_difference=diff)
    except Exception as e:
        suite.add("cam", case, status="failed", notes=f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------ maps
def _run_capped(cmd: list[str], cap: float, log: Path) -> tuple[float, int | None, str]:
    """Run ``cmd`` (its own process group) for at most ``cap`` seconds: (seconds, exit code or None, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",  # a killed run still leaves its last progress line
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as fh:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, cap))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this function started
            proc.wait()
            rc = None
        dt = time.perf_counter() - t
    return dt, rc, log.read_text(errors="replace")


def _last_json(text: str):
    """The last JSON object in ``text`` (featviz --json prints one)."""
    start = text.rfind("\n{")
    for s in ([start + 1] if start >= 0 else []) + [text.find("{")]:
        if s < 0:
            continue
        try:
            return json.JSONDecoder().raw_decode(text[s:])[0]  # warnings may follow it (stderr is merged)
        except ValueError:
            continue
    return None


def _quality(obj, prefix: str = "") -> dict[str, float]:
    """Numbers in featviz's JSON whose key names a map quality (recall, accuracy, trustworthiness)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if isinstance(v, (int, float)) and not isinstance(v, bool) and any(
                    w in str(k).lower() for w in ("recall", "accuracy", "trust")):
                out[key] = float(v)
            elif isinstance(v, (dict, list)):
                out.update(_quality(v, f"{key}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out.update(_quality(v, f"{prefix}{i}."))
    return out


PUBLISHED_MAPS = {  # the peers' own published figures at 1M points (the reference notes, models-and-peers-2026.md)
    "tsne": "published: openTSNE 1M x 50 about 18 min on 8 cores, 67 min on 1 (openTSNE docs/source/benchmarks.rst, "
            "Xeon E5-2650 v4)",
    "umap": "published: umap-learn 1M about 33 min on 8 cores (openTSNE images/benchmarks-umap.png); TorchDR UMAP "
            "1.3M x 50 about 45 s on a GPU it does not name (TorchDR docs/source/figures/"
            "umap_benchmark_single_cell.png)",
}
BASELINE_CODE = {
    "opentsne": "from openTSNE import TSNE; TSNE(n_jobs={jobs}, verbose=True, random_state=0).fit(x)",
    "umap-learn": "import umap; umap.UMAP(n_jobs={jobs}, verbose=True).fit_transform(x)",
}


def section_maps(suite: Suite, cfg: dict, device, tmp: Path) -> None:
    sys.path.insert(0, str(HERE))
    from tsne_bench import pixel_like

    from featviz.io.artifacts import Embeddings

    n, dim = cfg["map_n"], cfg["map_dim"]
    t = time.perf_counter()
    x, y = pixel_like(n, dim, 20, seed=0)
    emb_path = tmp / "maps" / "emb.npz"
    emb_path.parent.mkdir(parents=True, exist_ok=True)
    Embeddings(x, y, [f"class {i}" for i in range(20)]).save(emb_path, force=True)
    np.save(tmp / "maps" / "x.npy", x)
    del x, y
    print(f"        {n:,} x {dim} embeddings written in {time.perf_counter() - t:.1f} s", flush=True)

    helptext = subprocess.run([sys.executable, "-m", "featviz", "tsne", "--help"], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "COLUMNS": "200"}).stdout
    has_backend = "--backend" in helptext
    try:
        import torchdr  # noqa: F401

        has_torchdr = True
    except ImportError:
        has_torchdr = False
    jobs = os.cpu_count() or 1
    rows = [("tsne", "t-SNE", "opentsne"), ("umap", "UMAP", "umap-learn")]
    for i, (method, label, peer) in enumerate(rows):
        case = f"{label} {n:,} x {dim}, TorchDR on {device.type} vs {peer} on {jobs} CPU cores"
        # the time left, shared by the rows still to run (featviz's run and its peer's)
        # on the GPU the rows still to run share the time left; the peer's cap is fixed (it will not finish
        # 1M points in minutes anyway), featviz's run takes the rest of its row's share
        share = max(40.0, suite.left() / (len(rows) - i)) if device.type == "cuda" else float("inf")
        cap_peer = min(cfg["map_caps"][peer], share / 3)
        cap_fv = min(cfg["map_caps"]["featviz"], share - cap_peer)
        fv_s = fv_done = None
        notes = []
        if not has_backend:
            why = "featviz tsne has no --backend option yet (issue 27 part 1, the TorchDR backend, is not merged)"
        elif not has_torchdr:
            why = "torchdr is not installed (pip install -e .[gpu])"
        else:
            why = None
        if why is None:
            png = tmp / "maps" / f"{method}.png"
            cmd = [sys.executable, "-m", "featviz", "tsne", str(emb_path), "--method", method, "--backend", "torchdr",
                   "--device", device.type, "--out", str(png), "--json"]
            fv_s, rc, text = _run_capped(cmd, cap_fv, tmp / "maps" / f"{method}-featviz.log")
            fv_done = rc == 0
            if rc is None:
                notes.append(f"featviz did not finish in {cap_fv:.0f} s")
            elif rc:
                last = text.strip().splitlines()[-1][:160] if text.strip() else ""
                notes.append(f"featviz failed (exit {rc}): {last}")
            else:
                q: dict[str, float] = {}
                for k, v in _quality(_last_json(text)).items():  # each measure once, by its own name
                    q.setdefault(k.rsplit(".", 1)[-1], v)
                if q:
                    notes.append("map quality: " + ", ".join(f"{k} {v:.3f}" for k, v in list(q.items())[:4]))
        code = (f"import numpy as np, time; x = np.load({str(tmp / 'maps' / 'x.npy')!r}); t = time.perf_counter(); "
                + BASELINE_CODE[peer].format(jobs=jobs) + "; print(f'fit {time.perf_counter() - t:.1f} s')")
        peer_s, prc, ptext = _run_capped([sys.executable, "-c", code], cap_peer, tmp / "maps" / f"{method}-peer.log")
        if prc is None:
            stage = [ln.strip() for ln in ptext.splitlines() if ln.strip()][-1:] or ["(no output)"]
            peer_fig = f"did not finish in {cap_peer:.0f} s"
            notes.append(f"{peer} capped at {cap_peer:.0f} s, last line: {stage[0][:100]!r}")
        elif prc:
            peer_fig = "failed"
            notes.append(f"{peer} failed (exit {prc}): {ptext.strip().splitlines()[-1][:160] if ptext.strip() else ''}")
        else:
            peer_fig = peer_s
            fit = [ln for ln in ptext.splitlines() if ln.startswith("fit ")]
            notes.append(f"{peer}: {fit[-1] if fit else '?'} of its {peer_s:.1f} s (import, load, fit)")
        notes.append(PUBLISHED_MAPS[method])
        extra = dict(featviz_cap_s=cap_fv, baseline_cap_s=cap_peer, baseline_exit=prc)
        if why is not None:
            suite.add("maps", case, None, peer_fig, "s", None, ">= 5x the CPU peer (performance.md B1)",
                      "; ".join([why, *notes]), status="skipped", **extra)
            continue
        ratio = None
        if fv_done and prc == 0:
            ratio = peer_s / fv_s
        elif fv_done and prc is None:
            ratio = f">= {cap_peer / fv_s:.2f}x"
        fv_fig = fv_s if fv_done else (f"did not finish in {cap_fv:.0f} s" if rc is None else "failed")
        suite.add("maps", case, fv_fig, peer_fig, "s", ratio, ">= 5x the CPU peer (performance.md B1)",
                  "; ".join(notes) + "; featviz time: the whole command (load, map, PNG, quality metrics)",
                  status="ok" if fv_done else "capped" if rc is None else "failed", **extra)


# ------------------------------------------------------------------ main
def _meta(args, device, workers: int) -> dict:
    import torch

    meta = {"argv": sys.argv[1:], "mode": "cpu-small" if args.cpu_small else "gpu", "device": str(device),
            "python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "workers": workers, "budget_s": args.budget, "timm_published_source": TIMM_SOURCE,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        meta["load_average"] = os.getloadavg()[0]
    except OSError:
        pass
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("featviz", "torchvision", "timm", "grad-cam", "openTSNE", "umap-learn", "torchdr", "faiss-cpu"):
        try:  # installed versions, without importing them
            meta[dist] = version(dist)
        except PackageNotFoundError:
            meta[dist] = None
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the figures to this JSON file (rewritten after each row)")
    ap.add_argument("--cpu-small", action="store_true", help="no GPU needed: every section on CPU at tiny sizes")
    ap.add_argument("--sections", default="embed,train,cam,maps", help="comma-separated subset, run in this order")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480 on GPU)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers for both sides (default: min(16, cores) on GPU, 0 on CPU)")
    ap.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    args = ap.parse_args()

    import torch

    if not args.cpu_small and not torch.cuda.is_available():
        line = ("gpu_suite: skipped: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, "
                "or pass --cpu-small to run every section on the CPU at tiny sizes")
        print(line, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"skipped": line, "rows": []}, indent=2))
        return
    device = torch.device("cpu" if args.cpu_small else args.device)
    cfg = SIZES["cpu" if args.cpu_small else "gpu"]
    workers = args.workers if args.workers is not None else (min(16, os.cpu_count() or 1) if device.type == "cuda"
                                                             else 0)
    if args.budget is None:
        args.budget = 480.0 if device.type == "cuda" else 1e9
    suite = Suite(args, _meta(args, device, workers))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    suite.reserve = MAP_RESERVE if device.type == "cuda" and "maps" in sections else 0.0
    m = suite.meta
    budget = f"budget {args.budget:.0f} s" if args.budget < 1e8 else "no time budget"
    print(f"gpu_suite ({m['mode']}): {m.get('gpu', 'CPU')}, {m['cpu_cores']} CPU cores, torch {m['torch']}, "
          f"{workers} DataLoader workers, {budget}", flush=True)
    with tempfile.TemporaryDirectory(prefix="featviz-gpu-suite-") as tmp_name:
        tmp = Path(tmp_name)
        for s in sections:
            t = time.perf_counter()
            print(f"== {s}", flush=True)
            if s == "embed":
                section_embed(suite, cfg, device, workers, tmp)
            elif s == "train":
                section_train(suite, cfg, device, workers, tmp)
            elif s == "cam":
                section_cam(suite, cfg, device)
            elif s == "maps":
                section_maps(suite, cfg, device, tmp)
            else:
                raise SystemExit(f"unknown section {s!r}; expected embed, train, cam or maps")
            suite.meta.setdefault("section_s", {})[s] = round(time.perf_counter() - t, 1)
    suite.save()
    print(f"\n{m.get('gpu', 'CPU')} ({m['mode']}), {m['cpu_cores']} CPU cores, torch {m['torch']}; sections "
          + ", ".join(f"{k} {v:.0f} s" for k, v in suite.meta["section_s"].items())
          + f"; wall time {suite.elapsed():.0f} s ({budget})\n")
    print(table(suite.rows), flush=True)
    if any(r.get("timm_published") for r in suite.rows):
        print(f"\ntimm's published figures (model only, eager AMP NCHW): {TIMM_SOURCE}", flush=True)


if __name__ == "__main__":
    main()
