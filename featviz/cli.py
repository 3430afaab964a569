"""The featviz command line: a thin Typer view over the library.

Module-level imports stay torch-free (typer, rich, stdlib, featviz's light modules), so
``featviz --help`` is fast; each command imports the library module it needs inside its body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from featviz import __version__
from featviz._names import CheckpointKey, DeviceName, FigureName, FormatName, PrecisionName
from featviz.errors import FeatvizError

app = typer.Typer(
    name="featviz",
    help="Visualize and diagnose the features that self-supervised vision models learn.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
out = Console()  # results
err = Console(stderr=True)  # progress, logs, errors


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a FeatvizError into one red line on stderr and exit code 1."""
    try:
        yield
    except FeatvizError as e:
        msg = str(e).replace("[", r"\[")
        err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None


def _echo_json(obj: Any) -> None:
    from featviz.outputs import to_jsonable

    typer.echo(json.dumps(to_jsonable(obj), indent=2))


def _progress(description: str):
    """A rich progress wrapper for library loops (the library itself has no rich dependency)."""

    def wrap(iterable, total: int | None = None):
        from rich.progress import track

        return track(iterable, description=description, total=total, console=err, transient=True)

    return wrap


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"featviz {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log details to stderr.")] = False,
) -> None:
    """Visualize and diagnose the features that self-supervised vision models learn."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_time=False, show_path=verbose)],
        force=True,
    )
    # featviz's warnings (fallbacks, assumptions) always reach stderr; its info/debug notes need -v


# ---------------------------------------------------------------- shared options
CheckpointOpt = Annotated[
    Optional[Path], typer.Option("--checkpoint", "-c", help="Checkpoint file (.pth, .pth.tar, .ckpt, .safetensors).")
]
ArchOpt = Annotated[
    Optional[str],
    typer.Option("--arch", "-a", help="Architecture: resnet18…152[-cifar], wide_resnet50_2, vit_small_patch16_224, timm:<name>. Inferred from the checkpoint when omitted."),
]
FormatOpt = Annotated[FormatName, typer.Option("--format", help="Checkpoint layout; 'auto' detects it.")]
NumHeadsOpt = Annotated[
    Optional[int], typer.Option("--num-heads", min=1, help="ViT attention heads (cannot be inferred from weights).")
]
CheckpointKeyOpt = Annotated[
    Optional[CheckpointKey], typer.Option("--checkpoint-key", help="DINO full checkpoints: which network (default teacher).")
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust-checkpoint", help="Allow arbitrary pickles (weights_only=False). Only for files you trust."),
]
DeviceOpt = Annotated[DeviceName, typer.Option("--device", help="auto = CUDA when available, else CPU.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout.")]


def _load_kwargs(arch, fmt, num_heads, checkpoint_key, trust) -> dict[str, Any]:
    return dict(arch=arch, format=fmt, num_heads=num_heads, checkpoint_key=checkpoint_key, trust=trust)


# ---------------------------------------------------------------- checkpoints
@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file to inspect.")],
    arch: ArchOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Detect a checkpoint's layout and architecture, and verify that its encoder loads."""
    from featviz import checkpoints

    with _user_errors():
        _, report = checkpoints.load_backbone(
            checkpoint, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint)
        )
    if as_json:
        _echo_json(report.to_dict())
    else:
        out.print(report.to_rich())


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to convert.")],
    output: Annotated[Path, typer.Argument(help="Output .safetensors file.")],
    arch: ArchOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    force: ForceOpt = False,
) -> None:
    """Write the encoder plus metadata to a pickle-free .safetensors file."""
    from featviz import checkpoints

    with _user_errors():
        path = checkpoints.convert_checkpoint(
            checkpoint, output, force=force, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint)
        )
    typer.echo(str(path))


@app.command()
def layers(
    arch: ArchOpt = None,
    checkpoint: CheckpointOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=8, help="Dummy input size (default: the model's).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List named modules with their output shapes: the names that cam and embed accept."""
    from featviz import models

    with _user_errors():
        model = models.resolve_model(
            checkpoint=checkpoint, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint)
        )
        rows = models.list_layers(model, image_size=image_size)
    if as_json:
        _echo_json([r._asdict() for r in rows])
        return
    from rich.table import Table

    table = Table("layer", "type", "output shape", "params", box=None)
    for r in rows:
        table.add_row(r.name, r.type, "×".join(map(str, r.shape)) if r.shape else "-", f"{r.params:,}")
    out.print(table)


# ---------------------------------------------------------------- embed / tsne
ImagesOpt = Annotated[
    Optional[str],
    typer.Option("--images", "-i", help="Folder (class subfolders = labels), CSV of path,label, or 'digits'."),
]
PixelsOpt = Annotated[bool, typer.Option("--pixels", help="Dense pixel features labelled from --masks.")]
MasksOpt = Annotated[
    Optional[Path], typer.Option("--masks", help="Folder of class-index masks named like the images (255 = ignore).")
]
LayerOpt = Annotated[Optional[str], typer.Option("--layer", help="Layer for --pixels (default: ResNet layer4, ViT norm).")]
MaxPixOpt = Annotated[
    Optional[int], typer.Option("--max-pixels-per-class", min=1, help="Class-balanced pixel sample (seeded).")
]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", min=8, help="Input side (default: the model's; native size for --pixels).")]
PrecisionOpt = Annotated[PrecisionName, typer.Option("--precision", help="auto = bf16/fp16 autocast on CUDA, float32 on CPU.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", min=0, help="DataLoader workers (default: 8 on CUDA, 0 on CPU).")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Stop at the first undecodable image instead of skipping it.")]
DropNonfiniteOpt = Annotated[bool, typer.Option("--drop-nonfinite", help="Drop NaN/Inf feature rows instead of failing.")]


def _embed_kwargs(images, labels, pixels, masks, layer, max_pixels_per_class, image_size, batch_size, device,
                  precision, workers, seed, strict, drop_nonfinite) -> dict[str, Any]:
    return dict(images=images, labels_csv=labels, pixels=pixels, masks=masks, layer=layer,
                max_pixels_per_class=max_pixels_per_class, image_size=image_size, batch_size=batch_size,
                device=device, precision=precision, workers=workers, seed=seed, strict=strict,
                drop_nonfinite=drop_nonfinite)


@app.command()
def embed(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output embeddings file (.npz); manifest.json is written beside it.")],
    images: ImagesOpt = None,
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV of path,label for the images in --images.")] = None,
    pixels: PixelsOpt = False,
    masks: MasksOpt = None,
    layer: LayerOpt = None,
    max_pixels_per_class: MaxPixOpt = None,
    image_size: ImageSizeOpt = None,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    strict: StrictOpt = False,
    drop_nonfinite: DropNonfiniteOpt = False,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    force: ForceOpt = False,
) -> None:
    """Embed images (pooled) or pixels (--pixels --masks) with a checkpoint, or seeded random weights (--arch).

    Runs under torchrun too: `torchrun --nproc_per_node N -m featviz embed ...` shards the images and rank 0
    writes one merged file.
    """
    from featviz import embed as embed_lib

    with _user_errors():
        if images is None:
            raise _usage("--images is required (a folder, a CSV of path,label, or 'digits')")
        emb = embed_lib.run_embed(
            out=out_path, checkpoint=checkpoint, arch=arch, force=force, progress=_progress("embedding"),
            load_kwargs=dict(format=fmt, num_heads=num_heads, checkpoint_key=checkpoint_key, trust=trust_checkpoint),
            **_embed_kwargs(images, labels, pixels, masks, layer, max_pixels_per_class, image_size, batch_size,
                            device, precision, workers, seed, strict, drop_nonfinite))
    if emb is not None:  # rank 0 (or a single process)
        kind = "pixels" if emb.is_pixels else "images"
        typer.echo(f"{out_path}  ({emb.n:,} {kind} x {emb.d} dims, {len(emb.class_names)} classes)")


def _usage(message: str) -> typer.BadParameter:
    """A usage mistake: typer prints it with the usage line and exits 2."""
    return typer.BadParameter(message)


def _split_names(names: Optional[str], n: int, default: list[str]) -> list[str]:
    if not names:
        return default
    parts = [p.strip() for p in names.split(",")]
    if len(parts) != n:
        raise _usage(f"--names/--row-names has {len(parts)} names for {n} panels/rows; give one per panel, comma-separated")
    return parts


@app.command()
def tsne(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Plot file: .png, .pdf or .svg.")],
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Embeddings files (.npz from `featviz embed`); several share one map.", show_default=False)] = None,
    coords: Annotated[Optional[Path], typer.Option("--coords", help="Also save the coordinates (.npz) for re-plotting.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Fit on this file; place the others with openTSNE transform.")] = None,
    sample: Annotated[Optional[int], typer.Option("--sample", min=1, help="At most N points per input, stratified by class.")] = None,
    perplexity: Annotated[float, typer.Option("--perplexity", min=1.0, help="t-SNE perplexity (clamped for small N).")] = 30.0,
    iterations: Annotated[int, typer.Option("--iterations", min=1, help="Optimisation iterations after early exaggeration.")] = 500,
    jobs: Annotated[Optional[int], typer.Option("--jobs", help="openTSNE threads (default: 1 below 20k points, else the idle cores).")] = None,
    names: Annotated[Optional[str], typer.Option("--names", help="Panel names, comma-separated (default: file stems).")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Figure title.")] = None,
    seed: SeedOpt = 0,
    drop_nonfinite: DropNonfiniteOpt = False,
    figure: Annotated[Optional[FigureName], typer.Option("--figure", help="'cac': reproduce CAC Figure 3 (--image, --mask, --checkpoint ...).")] = None,
    checkpoints: Annotated[Optional[list[Path]], typer.Option("--checkpoint", "-c", help="Checkpoint; repeat for one CAC-figure row per checkpoint.")] = None,
    arch: ArchOpt = None,
    images: ImagesOpt = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV of path,label for --images.")] = None,
    pixels: PixelsOpt = False,
    masks: MasksOpt = None,
    layer: LayerOpt = None,
    max_pixels_per_class: MaxPixOpt = None,
    image_size: ImageSizeOpt = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="--figure cac: the image.")] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="--figure cac: its class mask (255 = ignore).")] = None,
    iou_bound: Annotated[tuple[float, float], typer.Option("--iou-bound", help="--figure cac: crop IoU range (CAC: 0.1 1.0).")] = (0.1, 1.0),
    crop_size: Annotated[int, typer.Option("--crop-size", min=8, help="--figure cac: crop side (CAC VOC: 320).")] = 320,
    base_size: Annotated[int, typer.Option("--base-size", min=8, help="--figure cac: rescale base (long side 0.8-2.0x; CAC VOC: 400).")] = 400,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=4, help="--figure cac: overlap pixels shown per view.")] = 1000,
    row_names: Annotated[Optional[str], typer.Option("--row-names", help="--figure cac: row labels, comma-separated (default: checkpoint stems).")] = None,
    model_seeds: Annotated[Optional[list[int]], typer.Option("--model-seed", help="--figure cac with --arch and no checkpoint: one random-init row per seed.")] = None,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = None,
    strict: StrictOpt = False,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    force: ForceOpt = False,
) -> None:
    """t-SNE map of embeddings files (one shared map for several), end to end from --images, or CAC Figure 3.

    [bold]featviz tsne emb.npz --out map.png[/]  ·  [bold]featviz tsne a.npz b.npz --reference a.npz --out maps.png[/]
    ·  [bold]featviz tsne --arch resnet18 --images DIR --out map.png[/]
    ·  [bold]featviz tsne --figure cac -c sup.safetensors -c cac.safetensors --image IMG --mask MASK --out fig.png[/]
    """
    load_kwargs = dict(format=fmt, num_heads=num_heads, checkpoint_key=checkpoint_key, trust=trust_checkpoint)
    with _user_errors():
        if figure == "cac":
            report = _tsne_figure(checkpoints or [], arch, image, mask, out_path, iou_bound, crop_size, base_size,
                                  max_pixels, row_names, model_seeds, layer, seed, perplexity, iterations, device,
                                  force, load_kwargs)
            for row in report["rows"]:
                m = row["metrics"]
                out.print(f"[bold]{row['name']}[/]: cos(I,II) {m['cosine_same_pixel']['I_vs_II']:.3f}  "
                          f"cos(I,III) {m['cosine_same_pixel']['I_vs_III']:.3f}  kNN agreement II→I "
                          f"{m['knn_class_agreement']['II_to_I']:.3f}  III→I {m['knn_class_agreement']['III_to_I']:.3f}",
                          highlight=False)
            typer.echo(f"{out_path}\n{out_path.with_suffix('.json')}")
            return
        from featviz import plotting
        from featviz import tsne as tsne_lib
        from featviz.artifacts import Embeddings
        from featviz.outputs import check_writable

        plotting.check_format(out_path)
        check_writable(out_path, force=force)
        if coords is not None:
            check_writable(coords, force=force)
        files = list(inputs or [])
        if reference is not None and reference not in files:
            files.insert(0, reference)
        if files and (images is not None or checkpoints):
            raise _usage("give embeddings files, or --images with --checkpoint/--arch, not both")
        if files:
            embs = [Embeddings.load(f) for f in files]
            panel_names = _split_names(names, len(files), [f.stem for f in files])
        elif images is not None:
            from featviz import embed as embed_lib

            if checkpoints and len(checkpoints) > 1:
                raise _usage("end-to-end tsne takes one --checkpoint; embed each with `featviz embed` and pass the .npz files")
            emb = embed_lib.run_embed(
                out=None, checkpoint=checkpoints[0] if checkpoints else None, arch=arch,
                progress=_progress("embedding"), load_kwargs=load_kwargs,
                **_embed_kwargs(images, labels, pixels, masks, layer, max_pixels_per_class, image_size,
                                batch_size, device, precision, workers, seed, strict, drop_nonfinite))
            embs = [emb]
            panel_names = _split_names(names, 1, [_checkpoint_name(checkpoints[0]) if checkpoints else f"{arch} (random init)"])
        else:
            raise _usage("give embeddings files (featviz tsne emb.npz --out map.png), or --images with "
                         "--checkpoint/--arch, or --figure cac")
        if drop_nonfinite:
            import numpy as np

            embs = [e.subset(np.flatnonzero(tsne_lib.check_finite(e.features, drop=True))) for e in embs]
        params = tsne_lib.TsneParams(perplexity=perplexity, seed=seed, n_iter=iterations, n_jobs=jobs)
        ref_idx = files.index(reference) if reference is not None else None
        result = tsne_lib.shared_map(embs, panel_names, reference=ref_idx, sample=sample, params=params,
                                     progress=_progress("t-SNE"))
        plotting.scatter_panels([result.panel(g) for g in range(len(embs))], result.class_names, out_path,
                                titles=panel_names, suptitle=title, force=force)
        if coords is not None:
            result.save(coords, force=force)
    typer.echo(str(out_path))
    if coords is not None:
        typer.echo(str(coords))


def _checkpoint_name(path: Path) -> str:
    """A checkpoint's display name: its file name without checkpoint suffixes (``x.pth.tar`` -> ``x``)."""
    name = path.name
    while True:
        stem, dot, ext = name.rpartition(".")
        if not dot or ext.lower() not in ("tar", "pth", "pt", "ckpt", "safetensors", "bin", "pkl"):
            return name
        name = stem


def _tsne_figure(checkpoints, arch, image, mask, out_path, iou_bound, crop_size, base_size, max_pixels, row_names,
                 model_seeds, layer, seed, perplexity, iterations, device, force, load_kwargs) -> dict[str, Any]:
    from featviz import embed as embed_lib
    from featviz import figure as figure_lib

    if image is None or mask is None:
        raise _usage("--figure cac needs --image IMG and --mask MASK")
    rows = []
    if checkpoints:
        for c in checkpoints:
            model, report = embed_lib.load_model(checkpoint=c, arch=arch, **load_kwargs)
            rows.append((_checkpoint_name(c), model, {"checkpoint": str(c), "load_report": report}))
    elif arch:
        for s in model_seeds or [0]:
            model, _ = embed_lib.load_model(arch=arch, seed=s, num_heads=load_kwargs.get("num_heads"))
            rows.append((f"{arch} random init (seed {s})", model, {"arch": arch, "init_seed": s}))
    else:
        raise _usage("--figure cac needs --checkpoint (repeat it for more rows), or --arch for random-init rows")
    labels = _split_names(row_names, len(rows), [r[0] for r in rows])
    models = [figure_lib.FigureModel(n, m, src) for n, (_, m, src) in zip(labels, rows)]
    from featviz.distributed import resolve_device

    return figure_lib.cac_figure(models, image, mask, out_path, iou_bound=iou_bound, crop_size=crop_size,
                                 base_size=base_size, layer=layer, max_pixels=max_pixels, seed=seed,
                                 perplexity=perplexity, n_iter=iterations, device=resolve_device(device),
                                 force=force, progress=_progress("CAC figure rows"))


# ---------------------------------------------------------------- cam


# ---------------------------------------------------------------- collapse


# ---------------------------------------------------------------- train


# ---------------------------------------------------------------- demo
@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (an earlier demo's is replaced).")] = Path("featviz-demo"),
    force: ForceOpt = False,
) -> None:
    """Run featviz end to end on the bundled sample data (offline, CPU)."""
    from featviz import demo as demo_lib

    with _user_errors():
        outputs = demo_lib.run_demo(out_dir, force=force, progress=_progress)
    for name, (path, command) in outputs.items():
        out.print(f"[bold]{name}[/]: {path}\n  [dim]$ {command}[/]", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
