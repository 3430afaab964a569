"""`featviz train`: SSL and segmentation training runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from featviz.cli._app import _echo_json, _user_errors, app, err, out
from featviz.cli.choices import CropName, MethodName, OptimizerName
from featviz.cli.options import (
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    SeedOpt,
)


def _train_progress(every: int):
    """A rich progress bar per epoch showing the loss and throughput of the latest metrics line."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    state: dict[str, Any] = {"epoch": 0, "progress": None, "task": None}

    def wrap(iterable, total: int | None = None):
        state["epoch"] += 1
        if not err.is_terminal:  # logs and CI: the epoch lines are enough
            yield from iterable
            return
        with Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as bar:
            state["progress"], state["task"] = (
                bar,
                bar.add_task("train", total=total, epoch=state["epoch"], loss="-", ips="-"),
            )
            for item in iterable:
                yield item
                bar.advance(state["task"])

    def on_log(rec: dict[str, Any]) -> None:
        if rec.get("kind") == "boxes":
            err.print(
                f"ContrastiveCrop boxes after epoch {rec.get('epoch')}: mean area {rec['mean_box_area']:.3f}, "
                f"{100 * rec['whole_image_share']:.0f} % whole images, IoU with the previous "
                f"{rec['box_iou_previous']:.3f} ({rec['seconds']:.1f}s)",
                highlight=False,
            )
        elif rec.get("event") == "snapshot":
            err.print(f"t-SNE snapshot after epoch {rec.get('epoch')}: {rec.get('path')}", highlight=False)
        elif rec.get("kind") == "epoch":
            extra = "".join(f"  {k} {rec[k]:.3f}" for k in ("knn_acc", "miou", "std_l2") if rec.get(k) is not None)
            err.print(
                f"epoch {rec.get('epoch')}: loss {rec.get('loss', float('nan')):.4f}  "
                f"{rec.get('images_per_s', 0):.0f} img/s{extra}",
                highlight=False,
            )
        elif state["progress"] is not None:
            state["progress"].update(
                state["task"], loss=f"{rec.get('loss', float('nan')):.4f}", ips=f"{rec.get('images_per_s', 0):.0f}"
            )

    return wrap, on_log


def _parse_hparams(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> a dict; values read as JSON (numbers, true/false, lists), else text.

    Raises:
        OptionError: not KEY=VALUE, or a number that is not finite (NaN, Infinity) (a usage error).
    """
    import json
    import math

    from featviz.errors import OptionError

    def finite(v: Any) -> bool:
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, list):
            return all(finite(x) for x in v)
        if isinstance(v, dict):
            return all(finite(x) for x in v.values())
        return True

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--hparam {item!r}: expected KEY=VALUE, e.g. queue_size=4096")
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):  # not JSON: the text itself
            parsed = value
        if not finite(parsed):
            raise OptionError(f"--hparam {item!r}: {key.strip()} must be a finite number")
        out[key.strip()] = parsed
    return out


@app.command()
def train(
    method: Annotated[
        MethodName, typer.Option("--method", "-m", help="SSL method, or supervised_seg / cac for segmentation.")
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data", "-d", help="Image folder, labels CSV or 'digits'; for supervised_seg/cac a VOC-layout folder."
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder (RUN_DIR): checkpoints, metrics.jsonl, config.json.")
    ],
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            "-a",
            help="Backbone (default resnet18_w16-cifar; segmentation resnet18_w16-os8). resnet50 is the GPU path.",
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", "-e", min=1, help="Epochs (default: the dataset preset's, else 10).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", min=1, help="Global batch (default: the dataset preset's, else 256)."),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", min=0.0, help="Peak learning rate (default: the method's lr x batch / reference batch)."),
    ] = None,
    optimizer: Annotated[
        OptimizerName | None,
        typer.Option("--optimizer", help="sgd, adamw, lars (official LARS) or larc (SwAV's). Default: per method."),
    ] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", min=0.0, help="Default: per method.")] = None,
    weight_decay_end: Annotated[
        float | None,
        typer.Option("--weight-decay-end", min=0.0,
                     help="Cosine schedule of the weight decay to this value (default: dino's official end; "
                          "others constant)."),
    ] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option("--warmup-epochs", min=0.0, help="Linear warm-up before the cosine decay.")
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", min=8, help="Training crop size (default: the preset's, else the arch's input)."),
    ] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in RUN_DIR from its last epoch.")] = False,
    force: ForceOpt = False,
    no_stop_grad: Annotated[
        bool,
        typer.Option("--no-stop-grad", help="SimSiam ablation: let gradients through both branches (it collapses)."),
    ] = False,
    local_crops: Annotated[
        int | None,
        typer.Option("--local-crops", min=0, help="Multi-crop: extra small crops (swav, dino; default 0 on CPU)."),
    ] = None,
    min_scale: Annotated[
        float | None,
        typer.Option(
            "--min-scale", min=0.01, max=1.0, help="Smallest crop area (overrides the recipe's, e.g. 0.5 for digits)."
        ),
    ] = None,
    hflip: Annotated[
        bool | None,
        typer.Option("--hflip/--no-hflip", help="Horizontal flips in the views (default on; off for digits)."),
    ] = None,
    rotate: Annotated[
        float | None, typer.Option("--rotate", min=0.0, help="Random rotation in degrees before the crop (default 0).")
    ] = None,
    shear: Annotated[
        float | None, typer.Option("--shear", min=0.0, help="Random shear in degrees before the crop (default 0).")
    ] = None,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=1, help="Epochs between kNN/held-out evaluations (the last always).")
    ] = 1,
    tsne_every: Annotated[
        int,
        typer.Option(
            "--tsne-every",
            min=0,
            help="A t-SNE of the held-out split every K evaluated epochs, into RUN/tsne/ (0: none; "
            "collapse --watch names it).",
        ),
    ] = 0,
    hparam: Annotated[
        list[str] | None,
        typer.Option(
            "--hparam",
            help="A method hyperparameter KEY=VALUE, repeatable (e.g. queue_size=4096, tau=0.2, bn_splits=8; "
            "see docs/train.md).",
        ),
    ] = None,
    precise_bn: Annotated[
        bool,
        typer.Option("--precise-bn/--no-precise-bn", help="Re-estimate BatchNorm statistics before each evaluation."),
    ] = True,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="CPU threads for torch (1 helps on a busy shared CPU).")
    ] = None,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Steps between metrics.jsonl lines.")] = 10,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N images.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.")] = 0,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="bf16 autocast (default: on with CUDA).")] = None,
    channels_last: Annotated[
        bool | None, typer.Option("--channels-last/--no-channels-last", help="Default: on with CUDA.")
    ] = None,
    selected_num: Annotated[
        int, typer.Option("--selected-num", min=1, help="CAC: pixels sampled per crop as negatives.")
    ] = 6400,
    iou_bound: Annotated[
        tuple[float, float], typer.Option("--iou-bound", help="CAC: accepted IoU range of the two crops.")
    ] = (0.1, 1.0),
    temp: Annotated[float, typer.Option("--temp", min=1e-4, help="CAC: contrast temperature.")] = 0.1,
    weight_unsup: Annotated[
        float, typer.Option("--weight-unsup", min=0.0, help="CAC: weight of the pixel contrast loss.")
    ] = 0.1,
    crop: Annotated[
        CropName,
        typer.Option(
            "--crop",
            help="Global views' crop: rrc (RandomResizedCrop) or contrastive (ContrastiveCrop, Peng et al. 2022: "
            "centres drawn from Beta(alpha, alpha) inside each image's heatmap box; docs/crops.md).",
            rich_help_panel="ContrastiveCrop",
        ),
    ] = "rrc",
    crop_threshold: Annotated[
        float | None,
        typer.Option(
            "--crop-threshold",
            min=0.0,
            max=0.999,
            help="Heatmap threshold k of the boxes (official 0.10; the paper: 0.05-0.20 good).",
            rich_help_panel="ContrastiveCrop",
        ),
    ] = None,
    crop_alpha: Annotated[
        float | None,
        typer.Option(
            "--crop-alpha",
            min=1e-3,
            help="Beta(alpha, alpha) of the crop centres (official 0.1 for <= 96 px crops, 0.6 above; < 1 pushes "
            "the two views apart).",
            rich_help_panel="ContrastiveCrop",
        ),
    ] = None,
    crop_update_every: Annotated[
        int | None,
        typer.Option(
            "--crop-update-every",
            min=1,
            help="Epochs between box updates (official: a fifth of the run).",
            rich_help_panel="ContrastiveCrop",
        ),
    ] = None,
    crop_warmup: Annotated[
        int | None,
        typer.Option(
            "--crop-warmup",
            min=0,
            help="Epochs of plain RandomResizedCrop first (official: a fifth of the run).",
            rich_help_panel="ContrastiveCrop",
        ),
    ] = None,
    step_save: Annotated[
        int, typer.Option("--step-save", min=0, help="CAC: earlier steps whose negatives are kept (0 = none).")
    ] = 1,
    epoch_start_unsup: Annotated[
        int, typer.Option("--epoch-start-unsup", min=0, help="CAC: supervised-only epochs before the contrast loss.")
    ] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Train an SSL model (or a segmentation model, with CAC) with checkpoints and collapse metrics.

    Writes RUN_DIR/last.safetensors and best.safetensors every epoch (they load in inspect,
    embed, tsne, cam and collapse with no flags), RUN_DIR/metrics.jsonl (follow it with
    `featviz collapse --watch RUN_DIR`) and RUN_DIR/state.pt for --resume.
    Multi-GPU: `torchrun --nproc_per_node N -m featviz train ...`.
    """
    from featviz.train import loop as train_lib
    from featviz.train.config import TrainConfig

    with _user_errors():
        hparams = _parse_hparams(hparam or [])
    cfg = TrainConfig(
        method=method,
        data=data,
        out=str(out_dir),
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        weight_decay_end=weight_decay_end,
        warmup_epochs=warmup_epochs,
        image_size=image_size,
        device=device,
        seed=seed,
        stop_grad=not no_stop_grad,
        local_crops=local_crops,
        min_scale=min_scale,
        hflip=hflip,
        rotate=rotate,
        shear=shear,
        eval_every=eval_every,
        tsne_every=tsne_every,
        hparams=hparams,
        precise_bn=precise_bn,
        threads=threads,
        log_every=log_every,
        limit=limit,
        workers=workers,
        amp=amp,
        channels_last=channels_last,
        selected_num=selected_num,
        iou_bound=tuple(iou_bound),
        temp=temp,
        weight_unsup=weight_unsup,
        crop=crop,
        crop_threshold=crop_threshold,
        crop_alpha=crop_alpha,
        crop_update_every=crop_update_every,
        crop_warmup=crop_warmup,
        step_save=step_save,
        epoch_start_unsup=epoch_start_unsup,
    )
    wrap, on_log = _train_progress(log_every)
    with _user_errors():
        result = train_lib.train(cfg, resume=resume, force=force, progress=wrap, on_log=on_log)
    if result is None:  # a non-zero DDP rank
        return
    if as_json:
        _echo_json(result.to_dict())
    else:
        final = result.history[-1] if result.history else {}
        extra = "".join(f", {k} {final[k]:.3f}" for k in ("knn_acc", "miou") if k in final)
        out.print(f"{result.last} ({result.steps} steps in {result.seconds:.0f}s{extra})", highlight=False)
