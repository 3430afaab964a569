"""`featviz compare`: how two checkpoints (or the layers of one) differ, layer by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featviz.cli._app import _echo_json, _progress, _usage, _user_errors, app, out
from featviz.cli.options import (
    ArchOpt,
    CenterCropOpt,
    CheckpointKeyOpt,
    CmapOpt,
    DeviceOpt,
    ForceOpt,
    FormatOpt,
    ImageSizeOpt,
    ImagesOpt,
    JsonOpt,
    NumHeadsOpt,
    SeedOpt,
    TrustOpt,
    command_arguments,
    plot_style,
)


@app.command()
def compare(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (compare.png, compare.json, compare.npz, manifest).")
    ],
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(help="Embeddings files (.npz from `featviz embed`) of the same images, instead of models."),
    ] = None,
    checkpoints: Annotated[
        list[str] | None,
        typer.Option(
            "--checkpoint",
            "-c",
            help="Model A; repeat for model B. 'random' = a seeded random init of A's architecture, "
            "'random:ARCH' of ARCH.",
        ),
    ] = None,
    arch: ArchOpt = None,
    images: ImagesOpt = None,
    layers: Annotated[
        str,
        typer.Option("--layers", "-l", help="'auto' (every ResNet block, every ViT block; at most 24) or L1,L2,…"),
    ] = "auto",
    layers_b: Annotated[
        str | None,
        typer.Option("--layers-b", help="Model B's layers (default: 'auto' when --layers is, else the same names)."),
    ] = None,
    measure: Annotated[
        str, typer.Option("--measure", "-m", help="Comma-separated: cka, mknn (mutual k-NN), cknna, svcca.")
    ] = "cka,mknn,cknna",
    k: Annotated[int, typer.Option("--k", min=2, help="Neighbours of mutual k-NN and CKNNA (platonic-rep: 10).")] = 10,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", "-b", min=4, help="Images per minibatch: the unbiased HSIC's and the forward's."),
    ] = 256,
    batches: Annotated[
        int | None,
        typer.Option("--batches", min=1, help="At most this many random minibatches (default: every image once)."),
    ] = None,
    image_size: ImageSizeOpt = None,
    center_crop: CenterCropOpt = None,
    html: Annotated[bool, typer.Option("--html", help="Also write compare.html (values on hover).")] = False,
    cmap: CmapOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Layer × layer similarity (linear CKA by minibatches, mutual k-NN, CKNNA, SVCCA) within one model or between
    two, with the k-NN accuracy of every layer beside it.

    [bold]featviz compare -c run.pth -c random --images digits -o cmp[/]  ·  [bold]featviz compare -c a.pth -c b.pth
    -i DIR --layers auto -o cmp --html[/]  ·  [bold]featviz compare a.npz b.npz -o cmp[/]
    """
    with _user_errors():
        from featviz.compare import run as lib

        style = plot_style(only=("cmap",))
        names = [p.stem for p in inputs or []]
        if inputs:
            if checkpoints or images or arch:
                raise _usage("give embeddings files, or --checkpoint/--arch with --images, not both")
            if len(set(names)) < len(names):
                names = [str(p) for p in inputs]
            result = lib.run_compare_files(
                inputs,
                out_dir,
                names=names,
                measures=measure,
                k=k,
                seed=seed,
                html=html,
                force=force,
                arguments=command_arguments(),
                progress=_progress("compare"),
                cmap=style.cmap,
            )
        else:
            if images is None:
                raise _usage("give --images (a folder, a CSV or 'digits') with --checkpoint/--arch, or .npz files")
            from featviz.compare.stream import common_size, load_sides
            from featviz.data.images import labelled_images
            from featviz.distributed import resolve_device

            lib.parse_measures(measure)
            lib.check_outputs(out_dir, force=force)  # before loading anything
            load = dict(format=fmt, num_heads=num_heads, checkpoint_key=checkpoint_key, trust=trust_checkpoint)
            sides = load_sides(
                checkpoints or [], arch=arch, layers=layers, layers_b=layers_b, seed=seed, load_kwargs=load
            )
            hw = common_size(sides, image_size)
            src = labelled_images(images, image_size=hw[0])
            result = lib.run_compare(
                sides,
                src,
                out_dir,
                measures=lib.parse_measures(measure),
                k=k,
                hw=hw,
                center_crop=center_crop,
                batch_size=batch_size,
                batches=batches,
                seed=seed,
                device=resolve_device(device),
                html=html,
                force=force,
                arguments=command_arguments(),
                progress=_progress("compare"),
                cmap=style.cmap,
            )
    if as_json:
        _echo_json(result.to_dict())
        return
    _print(result)


def _print(result) -> None:
    import numpy as np

    s = result.to_dict()
    m = s["models"]
    what = " vs ".join(x["name"] for x in m) if not result.within or len(m) == 1 else f"{len(m)} files"
    out.print(f"[bold]{what}[/] · {len(s['rows'])}×{len(s['cols'])} layers · {s['n_images']:,} images", highlight=False)
    for name, mat in result.matrices.items():
        diag = "" if not result.within else " (off-diagonal)"
        vals = mat[~np.eye(*mat.shape, dtype=bool)] if result.within and mat.size > 1 else mat.ravel()
        out.print(f"{name}: mean{diag} {vals.mean():.3f}, min {vals.min():.3f}, max {vals.max():.3f}", highlight=False)
    for curve in result.knn or []:
        accs = ", ".join(f"{100 * v:.0f}" for v in curve["top1"])
        out.print(f"k-NN top-1 % per layer, {curve['model']}: {accs}", highlight=False)
    for path in s["files"].values():
        out.print(path, highlight=False)
