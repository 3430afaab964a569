"""`featviz knn`: DINO's weighted k-NN accuracy of frozen features, with the protocol stated."""

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


@app.command()
def knn(
    train: TrainOpt = None,
    val: ValOpt = None,
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    train_images: TrainImagesOpt = None,
    val_images: ValImagesOpt = None,
    images: SetOpt = None,
    k: Annotated[
        str, typer.Option("--k", help="Neighbour counts, comma-separated (DINO's default); one pass for all.")
    ] = "10,20,100,200",
    temperature: Annotated[
        float, typer.Option("--temperature", "-T", help="T in the vote weight exp(cosine / T) (DINO's 0.07).")
    ] = 0.07,
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
    """Weighted k-NN accuracy of frozen features (DINO eval_knn: cosine, top-k votes weighted by exp(s/T))."""
    from featviz.eval.knn import run_knn

    shared = dict(train=train, val=val, checkpoint=checkpoint, arch=arch, train_images=train_images,
                  val_images=val_images, images=images, image_size=image_size, center_crop=center_crop,
                  val_fraction=val_fraction, seed=seed)
    args = {**shared, "k": k, "temperature": temperature, "out": out_path}
    src = sources(batch_size=batch_size, device=device, fmt=fmt, num_heads=num_heads, checkpoint_key=checkpoint_key,
                  trust=trust_checkpoint, **shared)
    with _user_errors():
        result = run_knn(
            ks=k,
            temperature=temperature,
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
    out.print("    k      T    top-1     top-5")
    for r in result["knn"]:
        out.print(
            f"{r['k']:>5}  {r['temperature']:5g}  {100 * r['top1']:6.2f} %  {100 * r['top5']:6.2f} %", highlight=False
        )
    if out_path is not None:
        out.print(f"wrote {out_path}", highlight=False)
