"""`featviz tsne --figure cac`: CAC's Figure 3, the figure mode of the tsne command.

The command (``featviz.cli.tsne``) keeps its options; this module holds the mode's usage checks,
the call into ``featviz.maps.cac_figure`` and the lines it prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from featviz.cli._app import _progress, _usage, out, split_names


def cac_figure(
    checkpoints: list[Path],
    *,
    arch: str | None,
    image: Path | None,
    mask: Path | None,
    out_path: Path,
    iou_bound: tuple[float, float],
    crop_size: int | None,
    base_size: int | None,
    max_pixels: int,
    row_names: str | None,
    model_seeds: list[int] | None,
    features: str | None,
    layer: str | None,
    seed: int,
    perplexity: float,
    iterations: int,
    device: str,
    force: bool,
    load_kwargs: dict[str, Any],
    html: Path | None = None,
) -> None:
    """Draw CAC Figure 3 and print each row's numbers, then the files written (one per line).

    Args:
        checkpoints: one figure row per checkpoint (none: random-init ``arch`` rows, one per model seed).
        arch: the architecture for random-init rows, or to read the checkpoints with.
        image: the image (``--image``).
        mask: its class mask (``--mask``).
        out_path: the figure (``--out``); its JSON goes beside it.
        iou_bound: the crops' IoU range (``--iou-bound``).
        crop_size: crop side (``--crop-size``).
        base_size: rescale base (``--base-size``).
        max_pixels: overlap pixels shown per view (``--max-pixels``).
        row_names: row labels, comma-separated (``--row-names``).
        model_seeds: random-init seeds, one row each (``--model-seed``).
        features: which features (``--features``).
        layer: ``--layer``, the same choice under tsne's other name.
        seed: the crops' and t-SNE's seed.
        perplexity: t-SNE perplexity.
        iterations: t-SNE iterations.
        device: auto | cpu | cuda.
        force: overwrite outputs.
        load_kwargs: checkpoint-reading options (format, num_heads, checkpoint_key, trust).
        html: also write the interactive page here.

    Raises:
        typer.BadParameter: a usage mistake (missing --image/--mask, no rows, --features and --layer disagree).
    """
    if features is not None and layer is not None and features != layer:
        raise _usage(f"--features {features} and --layer {layer} disagree; give --features only")
    if image is None or mask is None:
        raise _usage("--figure cac needs --image IMG and --mask MASK")
    if not checkpoints and not arch:
        raise _usage("--figure cac needs --checkpoint (repeat it for more rows), or --arch for random-init rows")
    from featviz.distributed import resolve_device
    from featviz.maps import cac_figure as figure_lib

    n_rows = len(checkpoints) if checkpoints else len(model_seeds or [0])
    names = split_names(row_names, n_rows, []) if row_names else None
    figure_rows = figure_lib.load_figure_models(checkpoints or (), arch=arch, seeds=model_seeds or (0,), names=names,
                                                load_kwargs=load_kwargs)
    report = figure_lib.cac_figure(
        figure_rows,
        image,
        mask,
        out_path,
        iou_bound=iou_bound,
        crop_size=crop_size,
        base_size=base_size,
        features=features or layer,
        max_pixels=max_pixels,
        seed=seed,
        perplexity=perplexity,
        n_iter=iterations,
        device=resolve_device(device),
        force=force,
        progress=_progress("CAC figure rows"),
        html=html,
    )
    for row in report["rows"]:
        m = row["metrics"]
        out.print(
            f"[bold]{row['name']}[/]: cos(I,II) {m['cosine_same_pixel']['I_vs_II']:.3f}  "
            f"cos(I,III) {m['cosine_same_pixel']['I_vs_III']:.3f}  kNN agreement II→I "
            f"{m['knn_class_agreement']['II_to_I']:.3f}  III→I {m['knn_class_agreement']['III_to_I']:.3f}  "
            f"({row['features']} features, {row['feature_dim']}-d, stride {row['feature_stride']})",
            highlight=False,
        )
    typer.echo(f"{out_path}\n{out_path.with_suffix('.json')}" + (f"\n{html}" if html is not None else ""))

