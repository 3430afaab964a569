"""`featviz probe`: a linear probe (standardised logistic regression) on frozen features."""

from __future__ import annotations

from typing import Annotated

import typer

from featviz.cli._app import _echo_json, _progress, _user_errors, app, out
from featviz.cli.options import (
    ArchOpt,
    BatchSizeOpt,
    CheckpointKeyOpt,
    CheckpointOpt,
    DeviceOpt,
    EvalCenterCropOpt,
    EvalSizeOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    NumHeadsOpt,
    OutJsonOpt,
    SeedOpt,
    SetOpt,
    TrainImagesOpt,
    TrainOpt,
    TrustOpt,
    ValFractionOpt,
    ValImagesOpt,
    ValOpt,
    print_protocol,
    sources,
)


def parse_grid(text: str) -> list[float]:
    """``"1e-4,1e-3,…"`` as floats.

    Raises:
        OptionError: a value that is not a finite positive number (a usage error).
    """
    import math

    from featviz.errors import OptionError

    try:
        cs = [float(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        cs = []
    if not cs or not all(math.isfinite(c) and c > 0 for c in cs):
        raise OptionError(f"--c-grid expects comma-separated positive numbers such as 0.01,0.1,1,10; got {text!r}")
    return cs


@app.command()
def probe(
    train: TrainOpt = None,
    val: ValOpt = None,
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    train_images: TrainImagesOpt = None,
    val_images: ValImagesOpt = None,
    images: SetOpt = None,
    c_grid: Annotated[
        str, typer.Option("--c-grid", help="Inverse regularisation strengths to choose from.")
    ] = "1e-4,1e-3,1e-2,1e-1,1,10,100,1000,10000",
    selection_fraction: Annotated[
        float, typer.Option("--selection-fraction", help="Share of the training rows held out to choose C.")
    ] = 0.2,
    max_iter: Annotated[int, typer.Option("--max-iter", min=1, help="L-BFGS iterations per fit.")] = 1000,
    image_size: EvalSizeOpt = None,
    center_crop: EvalCenterCropOpt = None,
    val_fraction: ValFractionOpt = 0.2,
    seed: SeedOpt = 0,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "auto",
    out_path: OutJsonOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Linear probe on frozen features: standardised logistic regression, C chosen on held-out training rows."""
    from featviz.eval.probe import run_probe

    shared = dict(train=train, val=val, checkpoint=checkpoint, arch=arch, train_images=train_images,
                  val_images=val_images, images=images, image_size=image_size, center_crop=center_crop,
                  val_fraction=val_fraction, seed=seed)
    args = {**shared, "c_grid": c_grid, "selection_fraction": selection_fraction, "max_iter": max_iter,
            "out": out_path}
    src = sources(batch_size=batch_size, device=device, fmt=fmt, num_heads=num_heads, checkpoint_key=checkpoint_key,
                  trust=trust_checkpoint, **shared)
    src.pop("seed")  # run_probe splits with its own seed argument
    with _user_errors():
        result = run_probe(
            cs=parse_grid(c_grid),
            selection_fraction=selection_fraction,
            seed=seed,
            max_iter=max_iter,
            out=out_path,
            force=force,
            arguments=args,
            progress=_progress("working"),
            **src,
        )
    if as_json:
        _echo_json(result)
        return
    print_protocol(result)
    best = max(g["selection_top1"] for g in result["grid"])
    out.print(
        f"C chosen on {result['selection']['n_held_out']:,} held-out training rows: {result['C']:g} "
        f"(held-out top-1 {100 * best:.1f} %)",
        highlight=False,
    )
    out.print(f"top-1 {100 * result['top1']:.2f} %   top-5 {100 * result['top5']:.2f} %", highlight=False)
    if out_path is not None:
        out.print(f"wrote {out_path}", highlight=False)
