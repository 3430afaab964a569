"""`featviz knn`: DINO's weighted k-NN accuracy of frozen features, with the protocol stated."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from featviz.cli._app import _echo_json, _progress, _user_errors, app, out
from featviz.cli.options import (
    ArchOpt,
    BatchSizeOpt,
    CheckpointKeyOpt,
    CheckpointOpt,
    DeviceOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    NumHeadsOpt,
    SeedOpt,
    TrustOpt,
    _load_kwargs,
    image_size_value,
)

_NPZ = "Features already computed"
_IMG = "Images through a model"

TrainOpt = Annotated[
    Path | None,
    typer.Option("--train", help="Training features: an .npz from `featviz embed`.", rich_help_panel=_NPZ),
]
ValOpt = Annotated[Path | None, typer.Option("--val", help="Validation features (.npz).", rich_help_panel=_NPZ)]
TrainImagesOpt = Annotated[
    Path | None,
    typer.Option("--train-images", help="Training images, one subfolder per class.", rich_help_panel=_IMG),
]
ValImagesOpt = Annotated[
    Path | None,
    typer.Option("--val-images", help="Validation images, one subfolder per class.", rich_help_panel=_IMG),
]
SetOpt = Annotated[
    str | None,
    typer.Option(
        "--images",
        "-i",
        help="One labelled set, split by a fixed stratified split: 'digits' (its raw 8x8 pixels "
        "without a model) or DIR/<class>/*.",
        rich_help_panel=_IMG,
    ),
]
ValFractionOpt = Annotated[
    float, typer.Option("--val-fraction", help="Val share of the --images split.", rich_help_panel=_IMG)
]
EvalSizeOpt = Annotated[
    str | None,
    typer.Option("--image-size", callback=image_size_value, rich_help_panel=_IMG,
                 help="Input size, N or HxW (default: the model's; a ViT takes any multiple of its patch size)."),
]
OutJsonOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Also write the result and its provenance to this .json file.")
]


def sources(
    *, batch_size, device, fmt, num_heads, checkpoint_key, trust, **shared: Any
) -> dict[str, Any]:
    """The ``featviz.eval.splits.load_splits`` arguments of the shared input options: ``shared`` is the
    inputs as a command records them in its provenance (``train``, ``val``, ``checkpoint``, ``arch``,
    ``train_images``, ``val_images``, ``images``, ``image_size``, ``val_fraction``, ``seed``)."""
    load = _load_kwargs(None, fmt, num_heads, checkpoint_key, trust)
    load.pop("arch")
    return dict(**shared, batch_size=batch_size, device=device, load_kwargs=load)


def progress():
    """``progress(iterable, total=…, description=…)``: the CLI's transient bar on stderr (``_progress``)."""
    return _progress("working")


def print_protocol(result: dict[str, Any]) -> None:
    """What the features are and how they were split (stdout, before the numbers)."""
    p = result["protocol"]
    out.print(f"features: {p['features']}", highlight=False)
    if p.get("model"):
        src = f" from {p['checkpoint']}" if p.get("checkpoint") else " (random weights)"
        size = "x".join(str(v) for v in p.get("image_size") or [])
        out.print(f"model: {p['model']}{src} · input {size} px · {p['batchnorm']}", highlight=False)
    sizes = f"{result['n_train']:,} train, {result['n_val']:,} val, {result['dim']}-d, {result['num_classes']} classes"
    split = p.get("split")
    if split:
        out.print(
            f"split: {split['kind']}, val fraction {split['val_fraction']:g}, seed {split['seed']} · {sizes}",
            highlight=False,
        )
    else:
        out.print(f"data: {sizes}", highlight=False)


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
                  val_images=val_images, images=images, image_size=image_size, val_fraction=val_fraction, seed=seed)
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
            progress=progress(),
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
