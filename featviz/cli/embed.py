"""`featviz embed`: image or pixel embeddings to .npz."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from featviz.cli._app import _image_limit, _progress, _user_errors, app
from featviz.cli.options import (
    ArchOpt,
    BatchSizeOpt,
    CenterCropOpt,
    CheckpointKeyOpt,
    CheckpointOpt,
    DeviceOpt,
    DropNonfiniteOpt,
    ForceOpt,
    FormatOpt,
    ImageSizeOpt,
    LayerOpt,
    LimitOpt,
    MasksOpt,
    MaxImagePixelsOpt,
    MaxPixOpt,
    NumHeadsOpt,
    PixelsOpt,
    PrecisionOpt,
    RequiredImagesOpt,
    SeedOpt,
    StrictOpt,
    TrustOpt,
    WorkersOpt,
    _embed_kwargs,
)


@app.command()
def embed(
    out_path: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output embeddings file E.npz (its manifest E.manifest.json goes beside it), or with --shard-size "
            "a folder of shards.",
        ),
    ],
    images: RequiredImagesOpt,
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="CSV of path,label for the images in --images.")
    ] = None,
    pixels: PixelsOpt = False,
    masks: MasksOpt = None,
    layer: LayerOpt = None,
    max_pixels_per_class: MaxPixOpt = None,
    image_size: ImageSizeOpt = None,
    center_crop: CenterCropOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    strict: StrictOpt = False,
    max_image_pixels: MaxImagePixelsOpt = None,
    drop_nonfinite: DropNonfiniteOpt = False,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            "--tensorboard",
            help="Also write TensorBoard projector files here (embeddings, labels, thumbnail sprite); "
            "needs featviz\\[tensorboard].",
        ),
    ] = None,
    shard_size: Annotated[
        int | None,
        typer.Option(
            "--shard-size",
            min=1,
            help="Stream to the folder --out in shards of N images (memory-mapped .npy, a manifest as it goes); "
            "a killed run resumes when run again.",
        ),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Embed images (pooled) or pixels (--pixels --masks) with a checkpoint, or seeded random weights (--arch).

    Runs under torchrun too: `torchrun --nproc_per_node N -m featviz embed ...` shards the images and rank 0
    writes one merged file (with --shard-size every rank writes its own shards, and rank 0 the manifest).
    """
    from featviz.eval import embed as embed_lib

    with _user_errors():
        _image_limit(max_image_pixels)
        if shard_size is not None:
            from featviz.eval.stream import run_embed_sharded

            run = partial(run_embed_sharded, shard_size=shard_size)
        else:
            run = embed_lib.run_embed
        emb = run(
            out=out_path,
            checkpoint=checkpoint,
            arch=arch,
            force=force,
            tensorboard=tensorboard,
            limit=limit,
            progress=_progress("embedding"),
            load_kwargs=dict(format=fmt, num_heads=num_heads, checkpoint_key=checkpoint_key, trust=trust_checkpoint),
            **_embed_kwargs(
                images,
                labels,
                pixels,
                masks,
                layer,
                max_pixels_per_class,
                image_size,
                batch_size,
                device,
                precision,
                workers,
                seed,
                strict,
                drop_nonfinite,
                center_crop,
            ),
        )
    if emb is not None:  # rank 0 (or a single process)
        kind = "pixels" if emb.is_pixels else "images"
        shards = f", {emb.manifest['n_shards']} shards" if shard_size is not None else ""
        typer.echo(f"{out_path}  ({emb.n:,} {kind} x {emb.d} dims, {len(emb.class_names)} classes{shards})")
        if tensorboard is not None:
            typer.echo(f"{tensorboard}  (tensorboard --logdir {tensorboard}, Projector tab)")
