"""`featviz tsne`: 2-D maps of embeddings, and CAC's Figure 3 (``--figure cac``: ``featviz.cli.figure``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featviz.cli._app import (
    _checkpoint_name,
    _echo_json,
    _progress,
    _usage,
    _user_errors,
    app,
    split_names,
)
from featviz.cli.choices import FigureName, HtmlMode, MapBackend, MapMethod
from featviz.cli.figure import cac_figure
from featviz.cli.options import (
    DEVICE_HELP,
    ArchOpt,
    BatchSizeOpt,
    CenterCropOpt,
    CheckpointKeyOpt,
    DropNonfiniteOpt,
    ForceOpt,
    FormatOpt,
    ImageSizeOpt,
    ImagesOpt,
    JsonOpt,
    LayerOpt,
    MasksOpt,
    MaxPixOpt,
    NumHeadsOpt,
    PaletteOpt,
    PixelsOpt,
    PointAlphaOpt,
    PointSizeOpt,
    PrecisionOpt,
    SeedOpt,
    StrictOpt,
    TrustOpt,
    WorkersOpt,
    _embed_kwargs,
    device_value,
    plot_style,
)


@app.command()
def tsne(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Plot file: .png, .pdf or .svg.")],
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Embeddings (.npz or shard folders, from `featviz embed`); several share one map.", show_default=False
        ),
    ] = None,
    coords: Annotated[
        Path | None, typer.Option("--coords", help="Also save the coordinates (.npz) for re-plotting.")
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="Fit on this embeddings file and place the others into its map (openTSNE/UMAP transform); or a map "
            "a previous run wrote (its --coords .npz): place the inputs into that very map, no refit.",
        ),
    ] = None,
    sample: Annotated[
        int | None, typer.Option("--sample", min=1, help="At most N points per input, stratified by class.")
    ] = None,
    method: Annotated[
        MapMethod, typer.Option("--method", help="tsne (openTSNE), umap (umap-learn) or pca (scikit-learn).")
    ] = "tsne",
    backend: Annotated[
        MapBackend,
        typer.Option(
            "--backend",
            help="tsne/umap: opentsne (openTSNE, umap-learn; CPU), torchdr (TorchDR on --device; featviz\\[gpu]) or "
            "auto (torchdr on CUDA when installed, else opentsne).",
        ),
    ] = "auto",
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Also write an interactive page (.html, self-contained; hover shows thumbnails)."),
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option("--image-root", help="--html: folder the images' ids are relative to (default: the manifest's)."),
    ] = None,
    html_mode: Annotated[
        HtmlMode,
        typer.Option("--html-mode", help="--html: 'inline' (one self-contained file), 'large' (a fast canvas page "
                     "+ a MAP_files/ folder beside it) or 'auto' (large above 200,000 points)."),
    ] = "auto",
    html_thumbnails: Annotated[
        int | None,
        typer.Option("--html-thumbnails", min=0, help="--html: at most N thumbnails, a seeded random sample "
                     "(default 20,000)."),
    ] = None,
    perplexity: Annotated[
        float, typer.Option("--perplexity", min=1.0, help="t-SNE perplexity (clamped for small N).")
    ] = 30.0,
    neighbors: Annotated[
        int, typer.Option("--neighbors", min=2, help="UMAP n_neighbors (clamped for small N).")
    ] = 15,
    min_dist: Annotated[float, typer.Option("--min-dist", min=0.0, help="UMAP min_dist.")] = 0.1,
    iterations: Annotated[
        int, typer.Option("--iterations", min=1, help="Optimisation iterations after early exaggeration.")
    ] = 500,
    jobs: Annotated[
        int | None, typer.Option("--jobs", help="openTSNE threads (default: 1 below 20k points, else the idle cores).")
    ] = None,
    names: Annotated[
        str | None, typer.Option("--names", help="Panel names, comma-separated (default: file stems).")
    ] = None,
    title: Annotated[
        str | None, typer.Option("--title", help="Figure title (the method's name is added when it lacks it).")
    ] = None,
    palette: PaletteOpt = None,
    point_size: PointSizeOpt = None,
    alpha: PointAlphaOpt = None,
    seed: SeedOpt = 0,
    drop_nonfinite: DropNonfiniteOpt = False,
    figure: Annotated[
        FigureName | None,
        typer.Option("--figure", help="'cac': reproduce CAC Figure 3 (--image, --mask, --checkpoint ...)."),
    ] = None,
    checkpoints: Annotated[
        list[Path] | None,
        typer.Option("--checkpoint", "-c", help="Checkpoint; repeat for one CAC-figure row per checkpoint."),
    ] = None,
    arch: ArchOpt = None,
    images: ImagesOpt = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV of path,label for --images.")] = None,
    pixels: PixelsOpt = False,
    masks: MasksOpt = None,
    layer: LayerOpt = None,
    max_pixels_per_class: MaxPixOpt = None,
    image_size: ImageSizeOpt = None,
    center_crop: CenterCropOpt = None,
    image: Annotated[Path | None, typer.Option("--image", help="--figure cac: the image.")] = None,
    mask: Annotated[Path | None, typer.Option("--mask", help="--figure cac: its class mask (255 = ignore).")] = None,
    iou_bound: Annotated[
        tuple[float, float], typer.Option("--iou-bound", help="--figure cac: crop IoU range (CAC: 0.1 1.0).")
    ] = (0.1, 1.0),
    features: Annotated[
        str | None,
        typer.Option(
            "--features",
            help="--figure cac: decoder | projector | backbone | LAYER (default: decoder for segmenters, the "
            "classifier's stride-8 input; backbone for encoders).",
        ),
    ] = None,
    crop_size: Annotated[
        int | None,
        typer.Option("--crop-size", min=8, help="--figure cac: crop side (default: the checkpoints' training crop, "
                     "else CAC VOC's 320)."),
    ] = None,
    base_size: Annotated[
        int | None,
        typer.Option("--base-size", min=8, help="--figure cac: rescale base, long side 0.8-2.0x (default: the "
                     "checkpoints' training base, else CAC VOC's 400)."),
    ] = None,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", min=4, help="--figure cac: overlap pixels shown per view.")
    ] = 1000,
    row_names: Annotated[
        str | None,
        typer.Option("--row-names", help="--figure cac: row labels, comma-separated (default: checkpoint stems)."),
    ] = None,
    model_seeds: Annotated[
        list[int] | None,
        typer.Option("--model-seed", help="--figure cac with --arch and no checkpoint: one random-init row per seed."),
    ] = None,
    batch_size: BatchSizeOpt = 64,
    device: Annotated[
        str,
        typer.Option("--device", callback=device_value,
                     help=DEVICE_HELP + " Where checkpoints embed and where --backend torchdr maps; openTSNE, "
                     "umap-learn and PCA run on the CPU."),
    ] = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = None,
    strict: StrictOpt = False,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """2-D map (t-SNE, UMAP or PCA) of embeddings files (one shared map for several), end to end from --images,
    or CAC Figure 3.

    [bold]featviz tsne emb.npz --out map.png --html map.html[/]  ·  [bold]featviz tsne e.npz --method umap -o m.png[/]
    ·  [bold]featviz tsne a.npz b.npz --reference a.npz --out maps.png[/]
    ·  [bold]featviz tsne big.npz --backend torchdr --device cuda --out big.png --json[/]
    ·  [bold]featviz tsne --arch resnet18 --images DIR --out map.png[/]
    ·  [bold]featviz tsne --figure cac -c sup.safetensors -c cac.safetensors --image IMG --mask MASK --out fig.png[/]
    """
    load_kwargs = dict(format=fmt, num_heads=num_heads, checkpoint_key=checkpoint_key, trust=trust_checkpoint)
    with _user_errors():
        if figure == "cac":
            styled = [o for o, v in (("--palette", palette), ("--point-size", point_size), ("--alpha", alpha)) if v]
            if styled:  # CAC's Figure 3 keeps the paper's look: say so rather than ignore the options
                raise _usage(f"{', '.join(styled)} style the embeddings map; --figure cac draws CAC's own figure")
            cac_figure(
                checkpoints or [],
                arch=arch,
                image=image,
                mask=mask,
                out_path=out_path,
                iou_bound=iou_bound,
                crop_size=crop_size,
                base_size=base_size,
                max_pixels=max_pixels,
                row_names=row_names,
                model_seeds=model_seeds,
                features=features,
                layer=layer,
                seed=seed,
                perplexity=perplexity,
                iterations=iterations,
                device=device,
                force=force,
                load_kwargs=load_kwargs,
                html=html,
            )
            return
        from featviz.maps import backends
        from featviz.maps import projection as tsne_lib

        if backend == "torchdr" and method != "pca":
            backends.require_torchdr()  # before any work

        style = plot_style()  # bad colour maps and sizes fail before any work

        if html is None and (html_mode != "auto" or html_thumbnails is not None):
            raise _usage("--html-mode and --html-thumbnails shape the --html page; add --html map.html")
        from featviz.maps import mapfile

        placing = reference is not None and mapfile.is_map_file(reference)  # a saved map, not embeddings
        files = [f for f in inputs or [] if not (placing and f == reference)]  # the map is not an input to place
        if reference is not None and reference not in files and not placing:
            files.insert(0, reference)
        if files and (images is not None or checkpoints):
            raise _usage("give embeddings files, or --images with --checkpoint/--arch, not both")
        if not files and images is None:
            raise _usage(
                "give embeddings files (featviz tsne emb.npz --out map.png), or --images with "
                "--checkpoint/--arch, or --figure cac"
            )
        if checkpoints and len(checkpoints) > 1:
            raise _usage(
                "end-to-end tsne takes one --checkpoint; embed each with `featviz embed` and pass the .npz files"
            )
        params = tsne_lib.TsneParams(
            method=method, perplexity=perplexity, seed=seed, n_iter=iterations, n_jobs=jobs, n_neighbors=neighbors,
            min_dist=min_dist, backend=backend, device=device,
        )
        run = dict(
            reference=files.index(reference) if reference is not None and not placing else None, sample=sample,
            params=params,
            coords=coords, html=html, image_root=image_root, title=title, drop_nonfinite=drop_nonfinite, force=force,
            progress=_progress("t-SNE") if method == "tsne" else _progress("UMAP") if backend == "torchdr" and
            method == "umap" else None, style=style,
            page=dict(mode=html_mode, seed=seed, progress=_progress("thumbnails"),
                      **({} if html_thumbnails is None else {"max_thumbnails": html_thumbnails})),
        )
        mapper = tsne_lib.run_map
        if placing:
            mapper, run = _placement(reference, run, html=html, image_root=image_root, method=method)
        if files:
            tsne_lib.check_map_outputs(out_path, coords=coords, html=html, force=force)
            panels = split_names(names, len(files), [f.stem for f in files])
            summary = mapper(out_path, files=files, names=panels, **run)
        else:
            from featviz.eval import embed as embed_lib

            tsne_lib.check_map_outputs(out_path, coords=coords, html=html, force=force)  # before embedding
            emb = embed_lib.run_embed(
                out=None,
                checkpoint=checkpoints[0] if checkpoints else None,
                arch=arch,
                progress=_progress("embedding"),
                load_kwargs=load_kwargs,
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
            default = _checkpoint_name(checkpoints[0]) if checkpoints else f"{arch} (random init)"
            summary = mapper(out_path, embeddings=[emb], names=split_names(names, 1, [default]), **run)
    if json_out:
        _echo_json(summary)
        return
    for path in summary["outputs"].values():
        typer.echo(path)


def _placement(map_path: Path, run: dict, *, html, image_root, method) -> tuple:
    """``--reference MAP`` (a saved map): ``placement.run_placement`` and its arguments.

    The map's own method and settings place the points: ``--method`` naming another method is
    refused, a map setting given on the command line is named in a warning, and ``--html`` is
    refused (the page needs the map's images, which a map file does not carry).
    """
    import functools
    import logging

    from typer._click.core import ParameterSource  # Typer's own click (its contexts), as cli/options.py
    from typer._click.globals import get_current_context

    from featviz.maps import placement
    from featviz.maps.plotting import map_title

    if html is not None or image_root is not None:
        raise _usage("--html/--image-root: placing into a saved map (--reference MAP.npz) draws the plot (and "
                     "--coords) only; for a page, map the embeddings files together: featviz tsne a.npz b.npz --html")
    params = placement.map_params(placement.load_placeable(map_path))
    ctx = get_current_context()
    given = {name for name in ("method", "perplexity", "neighbors", "min_dist", "iterations", "jobs", "backend")
             if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)}
    if "method" in given and method != params.method:
        raise _usage(f"--method {method}: {map_path.name} is a {params.method} map; placing uses the map's own "
                     f"method (leave out --method, or give --method {params.method})")
    ignored = [f"--{name.replace('_', '-')} {ctx.params[name]}" for name in sorted(given - {"method"})]
    if ignored:
        logging.getLogger(__name__).warning(
            "%s: no effect when placing into the saved map %s; its own settings are used: %s", ", ".join(ignored),
            map_path.name, map_title(params))
    keep = ("sample", "coords", "title", "drop_nonfinite", "force", "style")
    run = {k: run[k] for k in keep} | {"progress": _progress("placing") if params.method == "tsne" else None}
    return functools.partial(placement.run_placement, map_path=map_path), run
