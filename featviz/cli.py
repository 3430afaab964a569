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
from featviz._names import CAM_METHOD_NAMES, CheckpointKey, DeviceName, FigureName, FormatName, PrecisionName
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
        model, _ = models.resolve_model(
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
    from featviz import models
    from featviz import figure as figure_lib

    if image is None or mask is None:
        raise _usage("--figure cac needs --image IMG and --mask MASK")
    rows = []
    if checkpoints:
        for c in checkpoints:
            model, report = models.resolve_model(checkpoint=c, arch=arch, **load_kwargs)
            rows.append((_checkpoint_name(c), model, {"checkpoint": str(c), "load_report": report}))
    elif arch:
        for s in model_seeds or [0]:
            model, _ = models.resolve_model(arch=arch, seed=s, num_heads=load_kwargs.get("num_heads"))
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
@app.command()
def cam(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (overlays, maps.npz, contact sheet, manifest).")],
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    layer: Annotated[
        Optional[list[str]],
        typer.Option("--layer", "-l", help="Layer name, e.g. layer4, 'layer4[-1]', blocks.11.norm1 (repeat to average "
                     "layers; default per architecture; `featviz layers` lists them)."),
    ] = None,
    method: Annotated[
        list[str],
        typer.Option("--method", "-m", help="Method(s), comma-separated or repeated, or 'all': "
                     + ", ".join(CAM_METHOD_NAMES) + "."),
    ] = ["gradcam"],  # noqa: B006 - typer needs a list default
    target: Annotated[
        Optional[str],
        typer.Option("--target", "-t", help="top1 | class:N | seg:CLASS | similarity:REF_IMAGE | self | pair "
                     "(default: top1 with a classifier, else self)."),
    ] = None,
    image_size: Annotated[Optional[str], typer.Option("--image-size", help="N or HxW (default: the model's).")] = None,
    aug_smooth: Annotated[bool, typer.Option("--aug-smooth", help="Average over flips and scalings (6× slower).")] = False,
    eigen_smooth: Annotated[bool, typer.Option("--eigen-smooth", help="First principal component of the weighted maps.")] = False,
    metrics: Annotated[bool, typer.Option("--metrics", help="Add ROAD and confidence drop/increase per map.")] = False,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 16,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Heatmaps of where a classifier, segmenter or SSL encoder looks, with any pytorch-grad-cam method."""
    from featviz import cam as cam_lib

    args = {"images": images, "out": out_dir, "checkpoint": checkpoint, "arch": arch, "layer": layer,
            "method": method, "target": target, "image_size": image_size, "aug_smooth": aug_smooth,
            "eigen_smooth": eigen_smooth, "metrics": metrics, "device": device, "batch_size": batch_size, "seed": seed}
    with _user_errors():
        model, report = cam_lib.load_model(
            checkpoint=checkpoint, seed=seed, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint))
        summary = cam_lib.run_cam(
            images, out_dir, model=model, methods=method, layers=layer, target=target, image_size=image_size,
            batch_size=batch_size, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth, metrics=metrics, device=device,
            seed=seed, force=force, load_report=report, arguments=args, progress=_progress("cam"))
    if as_json:
        _echo_json(summary)
        return
    out.print(f"[bold]{summary['images']}[/] images × {len(summary['methods'])} methods "
              f"({', '.join(summary['methods'])}) · layer {', '.join(summary['layers'])} · target {summary['target']}")
    out.print(f"contact sheet: {summary['files']['contact_sheet']}", highlight=False)
    for name, values in (summary["metrics"] or {}).items():
        out.print(f"  {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in values.items()), highlight=False)



# ---------------------------------------------------------------- collapse
_WATCH = "Watching a run (--watch)"
_CKPT = "From a checkpoint (--checkpoint / --arch + --images)"
_METRIC = "Metrics"


@app.command()
def collapse(
    embeddings: Annotated[Optional[Path], typer.Argument(help="Embeddings .npz (from `featviz embed`) or an (N, D) .npy.")] = None,
    positives: Annotated[Optional[Path], typer.Option("--positives", help="Second views: row i pairs with row i of EMB (for alignment).")] = None,
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    images: Annotated[Optional[Path], typer.Option("--images", "-i", help="Folder of images (or 'digits').", rich_help_panel=_CKPT)] = None,
    pixels: Annotated[bool, typer.Option("--pixels", help="Also measure dense features (ResNet layer4 / ViT patch tokens).", rich_help_panel=_CKPT)] = False,
    pixels_per_image: Annotated[int, typer.Option("--pixels-per-image", min=1, help="Cells sampled per image with --pixels.", rich_help_panel=_CKPT)] = 64,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=8, help="View size (default: the model's).", rich_help_panel=_CKPT)] = None,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "auto",
    watch_dir: Annotated[Optional[Path], typer.Option("--watch", help="Follow RUN_DIR/metrics.jsonl (or new checkpoints, with --images) live.", rich_help_panel=_WATCH)] = None,
    interval: Annotated[float, typer.Option("--interval", min=0.01, help="Seconds between polls.", rich_help_panel=_WATCH)] = 2.0,
    max_wait: Annotated[Optional[float], typer.Option("--max-wait", min=0, help="Stop after this many seconds with nothing new.", rich_help_panel=_WATCH)] = None,
    until_step: Annotated[Optional[int], typer.Option("--until-step", help="Stop once a record reaches this step.", rich_help_panel=_WATCH)] = None,
    rankme_drop: Annotated[float, typer.Option("--rankme-drop", min=0.0, max=1.0, help="Alarm when RankMe falls below (1 - this) × its peak.", rich_help_panel=_WATCH)] = 0.5,
    std_fraction: Annotated[float, typer.Option("--std-fraction", min=0.0, max=1.0, help="Alarm when std_l2 < this × 1/√d.", rich_help_panel=_METRIC)] = 0.3,
    fail_on_collapse: Annotated[bool, typer.Option("--fail-on-collapse", help="Exit with code 3 when collapse is flagged (watch: at the first alarm).")] = False,
    drop_nonfinite: Annotated[bool, typer.Option("--drop-nonfinite", help="Drop rows with NaN/Inf (counted) instead of refusing.", rich_help_panel=_METRIC)] = False,
    exact_max: Annotated[int, typer.Option("--uniformity-exact-max", min=2, help="Exact uniformity up to this many rows; sampled with a 95% CI above.", rich_help_panel=_METRIC)] = 20_000,
    pairs: Annotated[int, typer.Option("--uniformity-pairs", min=100, help="Random pairs for sampled uniformity.", rich_help_panel=_METRIC)] = 1_000_000,
    alpha_range: Annotated[str, typer.Option("--alpha-range", help="α-ReQ fit ranks LO,HI (1-based, HI excluded).", rich_help_panel=_METRIC)] = "10,100",
    seed: SeedOpt = 0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for report.json + spectrum.png (watch: curves.png; default RUN_DIR/collapse-watch).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure collapse: std of l2-normalised outputs, alignment/uniformity, RankMe, effective rank, α-ReQ, spectrum.

    Give an embeddings file, a checkpoint (two augmented views of --images are made), or --watch a training run.
    """
    modes = [m for m, on in (("EMB", embeddings), ("--checkpoint/--arch", checkpoint or arch), ("--watch", watch_dir)) if on]
    if len(modes) != 1:
        raise typer.BadParameter(f"give exactly one of EMB, --checkpoint/--arch or --watch (got {', '.join(modes) or 'none'})")
    misplaced = [flag for flag, given, allowed in (
        ("--positives", positives, ("EMB",)), ("--pixels", pixels, ("--checkpoint/--arch",)),
        ("--images", images, ("--checkpoint/--arch", "--watch"))) if given and modes[0] not in allowed]
    if misplaced:  # refuse rather than ignore a flag that would change nothing
        raise typer.BadParameter(f"{', '.join(misplaced)} does not apply to {modes[0]} input")
    with _user_errors():
        kwargs = dict(drop_nonfinite=drop_nonfinite, uniformity_exact_max=exact_max, uniformity_pairs=pairs,
                      alpha_range=_parse_range(alpha_range))
        load = _load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint)
        if watch_dir is not None:
            code = _collapse_watch(watch_dir, out_dir, force, interval, max_wait, until_step, std_fraction, rankme_drop,
                                   fail_on_collapse, images, load, dict(image_size=image_size, batch_size=batch_size,
                                   seed=seed, device=device, report_kwargs=kwargs), as_json)
            raise typer.Exit(code)
        if out_dir is not None:
            from featviz.outputs import check_writable

            check_writable(out_dir, force=force)  # fail before the (possibly long) computation
        if embeddings is not None:
            reports, source = _collapse_embeddings(embeddings, positives, seed, kwargs)
        else:
            if images is None:
                raise typer.BadParameter("--checkpoint/--arch needs --images DIR (two augmented views are made of each)")
            reports, source = _collapse_checkpoint(checkpoint, images, load, pixels, pixels_per_image, image_size,
                                                   batch_size, seed, device, kwargs)
        if out_dir is not None:
            _collapse_outputs(out_dir, reports, source, force)
    flags = {name: r.flags(std_fraction) for name, r in reports.items()}
    if as_json:
        first = next(iter(reports.values()))
        _echo_json({**first.to_dict(), "output": next(iter(reports)), "flags": flags[next(iter(reports))],
                    "outputs": {k: {**r.to_dict(), "flags": flags[k]} for k, r in reports.items()}})
    else:
        from featviz.collapse import report_table

        wide = out.width >= 140  # definitions need room; narrow terminals get a pointer instead
        out.print(report_table(reports, std_fraction=std_fraction, title=f"collapse metrics: {source}", definitions=wide))
        if not wide:
            out.print("[dim]definitions and papers: docs/metrics.md (or --json / report.json)[/]")
        for name, r in reports.items():
            if r.n_nonfinite:
                err.print(f"[yellow]{name}: dropped {r.n_nonfinite} rows with NaN/Inf[/]")
            for f in flags[name]:
                out.print(f"[bold red]{name}:[/] {f}", highlight=False)
        if out_dir is not None:
            out.print(f"wrote {out_dir / 'report.json'} and {out_dir / 'spectrum.png'}", highlight=False)
    if fail_on_collapse and any(flags.values()):
        raise typer.Exit(3)


def _parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--alpha-range takes LO,HI (two integers), got {text!r}") from None
    if not 1 <= lo < hi:
        raise typer.BadParameter(f"--alpha-range needs 1 <= LO < HI, got {text!r}")
    return lo, hi


def _collapse_embeddings(path: Path, positives: Optional[Path], seed: int, kwargs: dict):
    from featviz import collapse as C

    z2 = None if positives is None else C.load_matrix(positives, what="positives")
    return {path.stem: C.collapse_report(C.load_matrix(path), z2, seed=seed, progress=_progress("collapse"), **kwargs)}, str(path)


def _collapse_checkpoint(checkpoint, images, load, pixels, pixels_per_image, image_size, batch_size, seed, device, kwargs):
    from featviz import data, models, views
    from featviz.distributed import resolve_device

    model, _ = models.resolve_model(checkpoint=checkpoint, seed=seed, **load)
    items = data.labelled_images(images).items
    reports, skipped = views.model_collapse_reports(
        model, items, heads=views.checkpoint_heads(checkpoint), image_size=image_size, batch_size=batch_size,
        seed=seed, pixels=pixels, pixels_per_image=pixels_per_image, device=resolve_device(device),
        progress=_progress("two views"), **kwargs)
    if skipped:
        err.print(f"[yellow]skipped {len(skipped)} undecodable images[/]")
    return reports, str(checkpoint or f"{load['arch']} (random init)")


def _collapse_outputs(out_dir: Path, reports: dict, source: str, force: bool) -> None:
    from featviz import collapse as C
    from featviz.outputs import atomic_dir, manifest, write_json

    with atomic_dir(out_dir, force=force) as tmp:
        write_json(tmp / "report.json", manifest(
            "collapse", {"source": source}, definitions=C.DEFINITIONS,
            outputs={k: {**r.to_dict(spectra=True), "flags": r.flags()} for k, r in reports.items()}))
        C.plot_spectrum(reports, tmp / "spectrum.png", title=f"Singular-value spectrum: {Path(source).name}")


def _collapse_watch(run_dir, out_dir, force, interval, max_wait, until_step, std_fraction, rankme_drop,
                    fail_on_collapse, images, load, ckpt_kwargs, as_json=False) -> int:
    import time
    from contextlib import nullcontext

    from rich.live import Live

    from featviz import collapse as C
    from featviz import watch as W
    from featviz.errors import DataError
    from featviz.outputs import check_writable

    out_dir = out_dir or run_dir / "collapse-watch"
    if out_dir.exists():
        check_writable(out_dir, force=force)
    watcher = W.CollapseWatcher(std_fraction=std_fraction, rankme_drop=rankme_drop)
    title = f"collapse watch: {run_dir}"
    checkpoint_metrics = None
    if images is not None:
        checkpoint_metrics = _checkpoint_metrics_fn(images, load, ckpt_kwargs)
    last_plot = [0.0]

    def redraw(final: bool = False) -> None:
        if watcher.records and (final or time.monotonic() - last_plot[0] > 5.0):
            out_dir.mkdir(parents=True, exist_ok=True)
            C.plot_curves(watcher.records, out_dir / "curves.png", std_fraction=std_fraction, title=title)
            last_plot[0] = time.monotonic()

    # with --json stdout carries only the final JSON summary, so no live table
    live_ctx = nullcontext() if as_json else Live(watcher.to_rich(title=title), console=out, refresh_per_second=4)
    with live_ctx as live:
        def on_event(kind: str, info: dict) -> None:
            if kind == "waiting":
                err.print(f"[dim]{info['message']}…[/]", highlight=False)
            elif kind == "records":
                if live is not None:
                    live.update(watcher.to_rich(title=title))
                if checkpoint_metrics is not None:  # keep what was computed from checkpoints
                    out_dir.mkdir(parents=True, exist_ok=True)
                    for r in info["records"]:
                        C.append_jsonl(out_dir / "metrics.jsonl", {k: v for k, v in r.items() if not k.startswith("_")})
                for a in info["alarms"]:
                    err.print(f"[bold red]ALARM[/] step {a['step']}: {a['message']}", highlight=False)
                redraw()
            elif kind == "stopped" and live is not None:
                live.update(watcher.to_rich(title=title))

        result = W.watch(run_dir, watcher=watcher, interval=interval, max_wait=max_wait, until_step=until_step,
                         stop_on_alarm=fail_on_collapse, checkpoint_metrics=checkpoint_metrics, on_event=on_event)
    redraw(final=True)
    if not result.records:
        raise DataError(f"no metrics appeared in {run_dir} within --max-wait {max_wait:g} s; is the run writing "
                        "metrics.jsonl (CollapseMonitor / featviz train)?")
    reasons = {"done": "the run finished", "until_step": f"reached step {until_step}",
               "max_wait": f"nothing new for {max_wait} s", "alarm": "collapse alarm"}
    err.print(f"stopped: {reasons[result.reason]}; {result.records} records, {len(result.alarms)} alarms"
              + (f"; curves: {out_dir / 'curves.png'}" if (out_dir / "curves.png").exists() else ""), highlight=False)
    if as_json:
        last = {k: v for k, v in watcher.records[-1].items() if not k.startswith("_")}
        _echo_json({"reason": result.reason, "records": result.records, "alarms": result.alarms, "last": last,
                    "curves": str(out_dir / "curves.png")})
    return 3 if fail_on_collapse and result.alarms else 0


def _checkpoint_metrics_fn(images, load, kw):
    from featviz import data, views
    from featviz.checkpoints import load_backbone
    from featviz.distributed import resolve_device

    items = data.labelled_images(images).items
    device = resolve_device(kw["device"])

    def metrics(path: Path) -> dict:
        model, _ = load_backbone(path, **load)
        heads = views.checkpoint_heads(path)
        reports, _ = views.model_collapse_reports(
            model, items, heads=heads, image_size=kw["image_size"], batch_size=kw["batch_size"], seed=kw["seed"],
            device=device, **kw["report_kwargs"])
        name = "projector" if "projector" in reports else "backbone"  # what the SSL loss sees, when present
        return {**reports[name].to_dict(), "output": name}

    return metrics


# ---------------------------------------------------------------- train
from featviz._names import MethodName, OptimizerName  # noqa: E402  (kept in this section for clean merges)


def _train_progress(every: int):
    """A rich progress bar per epoch showing the loss and throughput of the latest metrics line."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    state: dict[str, Any] = {"epoch": 0, "progress": None, "task": None}

    def wrap(iterable, total: int | None = None):
        state["epoch"] += 1
        if not err.is_terminal:  # logs and CI: the epoch lines are enough
            yield from iterable
            return
        with Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]}  {task.fields[ips]} img/s"), TimeRemainingColumn(),
                      console=err, transient=True) as bar:
            state["progress"], state["task"] = bar, bar.add_task("train", total=total, epoch=state["epoch"],
                                                                   loss="-", ips="-")
            for item in iterable:
                yield item
                bar.advance(state["task"])

    def on_log(rec: dict[str, Any]) -> None:
        if rec.get("kind") == "epoch":
            extra = "".join(f"  {k} {rec[k]:.3f}" for k in ("knn_acc", "miou", "std_l2") if rec.get(k) is not None)
            err.print(f"epoch {rec.get('epoch')}: loss {rec.get('loss', float('nan')):.4f}  "
                      f"{rec.get('images_per_s', 0):.0f} img/s{extra}", highlight=False)
        elif state["progress"] is not None:
            state["progress"].update(state["task"], loss=f"{rec.get('loss', float('nan')):.4f}",
                                     ips=f"{rec.get('images_per_s', 0):.0f}")

    return wrap, on_log


@app.command()
def train(
    method: Annotated[MethodName, typer.Option("--method", "-m", help="SSL method, or supervised_seg / cac for segmentation.")],
    data: Annotated[str, typer.Option("--data", "-d", help="Image folder, labels CSV or 'digits'; for supervised_seg/cac a VOC-layout folder.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder (RUN_DIR): checkpoints, metrics.jsonl, config.json.")],
    arch: Annotated[Optional[str], typer.Option("--arch", "-a", help="Backbone (default resnet18_w16-cifar; segmentation resnet18_w16-os8). resnet50 is the GPU path.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", "-e", min=1, help="Epochs.")] = 10,
    batch_size: BatchSizeOpt = 256,
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0, help="Peak learning rate (default: the method's base lr x batch/256).")] = None,
    optimizer: Annotated[Optional[OptimizerName], typer.Option("--optimizer", help="Default: per method (DINO adamw, others sgd).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", min=0.0, help="Default: per method.")] = None,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", min=0.0, help="Linear warm-up before the cosine decay.")] = 0.0,
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Training crop size in pixels.")] = 32,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in RUN_DIR from its last epoch.")] = False,
    force: ForceOpt = False,
    no_stop_grad: Annotated[bool, typer.Option("--no-stop-grad", help="SimSiam ablation: let gradients through both branches (it collapses).")] = False,
    local_crops: Annotated[int, typer.Option("--local-crops", min=0, help="Multi-crop: extra small crops (swav, dino).")] = 0,
    min_scale: Annotated[Optional[float], typer.Option("--min-scale", min=0.01, max=1.0, help="Smallest crop area (overrides the recipe's, e.g. 0.5 for digits).")] = None,
    hflip: Annotated[bool, typer.Option("--hflip/--no-hflip", help="Horizontal flips in the views (turn off for digits/text).")] = True,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (1 helps on a busy shared CPU).")] = None,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Steps between metrics.jsonl lines.")] = 10,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Use only the first N images.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.")] = 0,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bf16 autocast (default: on with CUDA).")] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="Default: on with CUDA.")] = None,
    selected_num: Annotated[int, typer.Option("--selected-num", min=1, help="CAC: pixels sampled per crop as negatives.")] = 6400,
    iou_bound: Annotated[tuple[float, float], typer.Option("--iou-bound", help="CAC: accepted IoU range of the two crops.")] = (0.1, 1.0),
    temp: Annotated[float, typer.Option("--temp", min=1e-4, help="CAC: contrast temperature.")] = 0.1,
    weight_unsup: Annotated[float, typer.Option("--weight-unsup", min=0.0, help="CAC: weight of the pixel contrast loss.")] = 0.1,
    as_json: JsonOpt = False,
) -> None:
    """Train an SSL model (or a segmentation model, with CAC) with checkpoints and collapse metrics.

    Writes RUN_DIR/last.safetensors and best.safetensors every epoch (they load in inspect,
    embed, tsne, cam and collapse with no flags), RUN_DIR/metrics.jsonl (follow it with
    `featviz collapse --watch RUN_DIR`) and RUN_DIR/state.pt for --resume.
    Multi-GPU: `torchrun --nproc_per_node N -m featviz train ...`.
    """
    from featviz import train as train_lib

    cfg = train_lib.TrainConfig(
        method=method, data=data, out=str(out_dir), arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
        optimizer=optimizer, weight_decay=weight_decay, warmup_epochs=warmup_epochs, image_size=image_size,
        device=device, seed=seed, stop_grad=not no_stop_grad, local_crops=local_crops, min_scale=min_scale,
        hflip=hflip, threads=threads, log_every=log_every,
        limit=limit, workers=workers, amp=amp, channels_last=channels_last, selected_num=selected_num,
        iou_bound=tuple(iou_bound), temp=temp, weight_unsup=weight_unsup)
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




# ---------------------------------------------------------------- demo
@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (an earlier demo's is replaced).")] = Path("featviz-demo"),
    retrain: Annotated[bool, typer.Option("--retrain", help="First remake the bundled checkpoints with featviz train (minutes).")] = False,
    force: ForceOpt = False,
) -> None:
    """Run featviz end to end on the bundled sample data (offline, CPU) and write an HTML report."""
    from featviz import demo as demo_lib

    with _user_errors():
        steps = demo_lib.run_demo(out_dir, force=force, retrain_first=retrain, progress=_progress)
    for step in steps:
        out.print(f"\n[bold]{step.title}[/]" + (f"  [dim]({step.seconds:.0f} s)[/]" if step.seconds else ""), highlight=False)
        for f in step.files:
            out.print(f"  {f}", highlight=False)
        out.print(f"  [dim]on your data:[/] {step.yours}", highlight=False)


def main() -> None:
    """Console-script entry point (also ``python -m featviz`` and ``torchrun -m featviz``)."""
    app(prog_name="featviz")


if __name__ == "__main__":
    main()
