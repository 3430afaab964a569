"""`featviz collapse`: collapse metrics of embeddings, a checkpoint, or a live run.

One command, three modes, each its own function: ``_measure_file`` (EMB), ``_measure_checkpoint``
(--checkpoint/--arch with --images) and ``_watch_run`` (--watch RUN_DIR); ``_check_mode`` is the one
place that decides the mode and refuses flags that do not apply to it. The tables are drawn by
``featviz.cli.collapse_view``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from featviz.cli._app import _echo_json, _progress, _user_errors, app, err, out
from featviz.cli.collapse_view import report_table, watch_table
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

_WATCH = "Watching a run (--watch)"
_CKPT = "From a checkpoint (--checkpoint / --arch + --images)"
_METRIC = "Metrics"

_FILE_MODE, _MODEL_MODE, _WATCH_MODE = "EMB", "--checkpoint/--arch", "--watch"  # the modes, as messages name them


@app.command()
def collapse(
    embeddings: Annotated[
        Path | None, typer.Argument(help="Embeddings .npz or shard folder (from `featviz embed`), or an (N, D) .npy.")
    ] = None,
    positives: Annotated[
        Path | None, typer.Option("--positives", help="Second views: row i pairs with row i of EMB (for alignment).")
    ] = None,
    checkpoint: CheckpointOpt = None,
    arch: ArchOpt = None,
    fmt: FormatOpt = "auto",
    num_heads: NumHeadsOpt = None,
    checkpoint_key: CheckpointKeyOpt = None,
    trust_checkpoint: TrustOpt = False,
    images: Annotated[
        Path | None, typer.Option("--images", "-i", help="Folder of images (or 'digits').", rich_help_panel=_CKPT)
    ] = None,
    pixels: Annotated[
        bool,
        typer.Option(
            "--pixels", help="Also measure dense features (ResNet layer4 / ViT patch tokens).", rich_help_panel=_CKPT
        ),
    ] = False,
    pixels_per_image: Annotated[
        int,
        typer.Option("--pixels-per-image", min=1, help="Cells sampled per image with --pixels.", rich_help_panel=_CKPT),
    ] = 64,
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            help="Layer for --pixels (default: ResNet layer4, ViT norm; `featviz layers` shows the maps).",
            rich_help_panel=_CKPT,
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            callback=image_size_value,
            help="View size, N or HxW (default: the model's; a ViT takes any multiple of its patch size).",
            rich_help_panel=_CKPT,
        ),
    ] = None,
    views: Annotated[
        int,
        typer.Option(
            "--views",
            "-q",
            min=2,
            max=64,
            help="Augmented views per image, at most 64 (LiDAR's classes; alignment uses the first two).",
            rich_help_panel=_CKPT,
        ),
    ] = 2,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "auto",
    watch_dir: Annotated[
        Path | None,
        typer.Option(
            "--watch",
            help="Follow RUN_DIR/metrics.jsonl (or new checkpoints, with --images) live.",
            rich_help_panel=_WATCH,
        ),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.01, help="Seconds between polls.", rich_help_panel=_WATCH)
    ] = 2.0,
    max_wait: Annotated[
        float | None,
        typer.Option(
            "--max-wait", min=0, help="Stop after this many seconds with nothing new.", rich_help_panel=_WATCH
        ),
    ] = None,
    until_step: Annotated[
        int | None, typer.Option("--until-step", help="Stop once a record reaches this step.", rich_help_panel=_WATCH)
    ] = None,
    rankme_drop: Annotated[
        float,
        typer.Option(
            "--rankme-drop",
            min=0.0,
            max=1.0,
            help="Alarm when the RankMe of held-out records falls below (1 - this) × their peak.",
            rich_help_panel=_WATCH,
        ),
    ] = 0.5,
    rank_fraction: Annotated[
        float,
        typer.Option(
            "--rank-fraction",
            min=0.0,
            max=1.0,
            help="Flag RankMe < this × min(N, D) (watch: on training batches).",
            rich_help_panel=_METRIC,
        ),
    ] = 0.1,
    std_fraction: Annotated[
        float,
        typer.Option(
            "--std-fraction", min=0.0, max=1.0, help="Alarm when std_l2 < this × 1/√d.", rich_help_panel=_METRIC
        ),
    ] = 0.3,
    fail_on_collapse: Annotated[
        bool,
        typer.Option(
            "--fail-on-collapse", help="Exit with code 3 when collapse is flagged (watch: at the first alarm)."
        ),
    ] = False,
    drop_nonfinite: Annotated[
        bool,
        typer.Option(
            "--drop-nonfinite", help="Drop rows with NaN/Inf (counted) instead of refusing.", rich_help_panel=_METRIC
        ),
    ] = False,
    exact_max: Annotated[
        int,
        typer.Option(
            "--uniformity-exact-max",
            min=2,
            help="Exact uniformity up to this many rows; sampled with a 95% CI above.",
            rich_help_panel=_METRIC,
        ),
    ] = 20_000,
    pairs: Annotated[
        int,
        typer.Option(
            "--uniformity-pairs", min=100, help="Random pairs for sampled uniformity.", rich_help_panel=_METRIC
        ),
    ] = 1_000_000,
    alpha_range: Annotated[
        str,
        typer.Option("--alpha-range", help="α-ReQ fit ranks LO,HI (1-based, HI excluded).", rich_help_panel=_METRIC),
    ] = "10,100",
    seed: SeedOpt = 0,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for report.json + spectrum.png (watch: curves.png; default RUN_DIR/collapse-watch).",
        ),
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure collapse: std of l2-normalised outputs, alignment/uniformity, RankMe, effective rank, α-ReQ, spectrum.

    Give an embeddings file, a checkpoint (two augmented views of --images are made), or --watch a training run.
    """
    mode = _check_mode(
        embeddings=embeddings,
        model=checkpoint or arch,
        watch_dir=watch_dir,
        positives=positives,
        pixels=pixels,
        layer=layer,
        images=images,
        views=views,
    )
    with _user_errors():
        metrics = dict(
            drop_nonfinite=drop_nonfinite,
            uniformity_exact_max=exact_max,
            uniformity_pairs=pairs,
            alpha_range=_parse_range(alpha_range),
        )
        load = _load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint)
        if mode == _WATCH_MODE:
            raise typer.Exit(
                _watch_run(
                    watch_dir,
                    images=images,
                    load=load,
                    image_size=image_size,
                    batch_size=batch_size,
                    views=views,
                    seed=seed,
                    device=device,
                    metrics=metrics,
                    out_dir=out_dir,
                    force=force,
                    interval=interval,
                    max_wait=max_wait,
                    until_step=until_step,
                    std_fraction=std_fraction,
                    rankme_drop=rankme_drop,
                    rank_fraction=rank_fraction,
                    fail_on_collapse=fail_on_collapse,
                    as_json=as_json,
                )
            )
        if out_dir is not None:
            from featviz.io.outputs import check_output

            check_output(out_dir, force=force, folder=True)  # fail before the (possibly long) computation
        if mode == _FILE_MODE:
            measured = _measure_file(embeddings, positives, seed=seed, metrics=metrics)
        else:
            measured = _measure_checkpoint(
                checkpoint,
                images,
                load=load,
                image_size=image_size,
                batch_size=batch_size,
                views=views,
                seed=seed,
                pixels=pixels,
                pixels_per_image=pixels_per_image,
                layer=layer,
                device=device,
                metrics=metrics,
            )
        if out_dir is not None:
            from featviz.collapse import write_report

            write_report(out_dir, measured.reports, measured.source, force=force, model=measured.model)
    flags = _show(measured, std_fraction=std_fraction, rank_fraction=rank_fraction, out_dir=out_dir, as_json=as_json)
    if fail_on_collapse and any(flags.values()):
        raise typer.Exit(3)


def _check_mode(*, embeddings, model, watch_dir, positives, pixels, layer, images, views=2) -> str:
    """The one place that decides the mode: EMB, --checkpoint/--arch or --watch.

    It also refuses flags that do not apply to that mode (rather than ignore a flag that would change
    nothing).

    Returns:
        The mode's name.

    Raises:
        typer.BadParameter: not exactly one mode, or a flag that does not apply to it.
    """
    modes = [m for m, on in ((_FILE_MODE, embeddings), (_MODEL_MODE, model), (_WATCH_MODE, watch_dir)) if on]
    if len(modes) != 1:
        raise typer.BadParameter(
            f"give exactly one of EMB, --checkpoint/--arch or --watch (got {', '.join(modes) or 'none'})"
        )
    misplaced = [
        flag
        for flag, given, allowed in (
            ("--positives", positives, (_FILE_MODE,)),
            ("--pixels", pixels, (_MODEL_MODE,)),
            ("--layer", layer, (_MODEL_MODE,)),
            ("--images", images, (_MODEL_MODE, _WATCH_MODE)),
            ("--views", views != 2, (_MODEL_MODE, _WATCH_MODE)),
        )
        if given and modes[0] not in allowed
    ]
    if misplaced:
        raise typer.BadParameter(f"{', '.join(misplaced)} does not apply to {modes[0]} input")
    if views != 2 and images is None:
        raise typer.BadParameter("--views Q makes Q augmented views of --images; add --images DIR")
    if layer is not None and not pixels:
        raise typer.BadParameter("--layer picks the dense layer of --pixels; add --pixels")
    if modes[0] == _MODEL_MODE and images is None:
        raise typer.BadParameter("--checkpoint/--arch needs --images DIR (two augmented views are made of each)")
    return modes[0]


def _parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--alpha-range takes LO,HI (two integers), got {text!r}") from None
    if not 1 <= lo < hi:
        raise typer.BadParameter(f"--alpha-range needs 1 <= LO < HI, got {text!r}")
    return lo, hi


@dataclass
class _Measured:
    """The reports of one run of the EMB or --checkpoint mode, what they measured, and the model."""

    reports: dict[str, Any]
    source: str
    model: Any = None


def _measure_file(embeddings: Path, positives: Path | None, *, seed: int, metrics: dict[str, Any]) -> _Measured:
    """EMB mode: the metrics of an embeddings file (alignment with --positives)."""
    from featviz.collapse import file_reports

    reports = file_reports(embeddings, positives, seed=seed, progress=_progress("collapse"), **metrics)
    return _Measured(reports, str(embeddings))


def _measure_checkpoint(
    checkpoint, images, *, load, image_size, batch_size, views, seed, pixels, pixels_per_image, layer, device, metrics
) -> _Measured:
    """--checkpoint/--arch mode: two augmented views of --images through the model (and its heads)."""
    from featviz.collapse import twoview

    measured = twoview.checkpoint_reports(
        checkpoint,
        images,
        load_kwargs=load,
        image_size=image_size,
        batch_size=batch_size,
        views=views,
        seed=seed,
        pixels=pixels,
        pixels_per_image=pixels_per_image,
        layer=layer,
        device=device,
        progress=_progress("two views"),
        **metrics,
    )
    if measured.skipped:
        err.print(f"[yellow]skipped {len(measured.skipped)} undecodable images[/]")
    return _Measured(measured.reports, measured.source, measured.model)


def _show(
    measured: _Measured, *, std_fraction: float, rank_fraction: float, out_dir: Path | None, as_json: bool
) -> dict[str, list[str]]:
    """Print the reports (a table, or --json) and the collapse flags; returns the flags per output."""
    reports, model = measured.reports, measured.model
    from featviz.collapse.verdict import cautions, verdict

    flags = {name: r.flags(std_fraction, rank_fraction) for name, r in reports.items()}
    verdicts = {name: verdict(r, std_fraction, rank_fraction) for name, r in reports.items()}
    notes = {name: cautions(r) for name, r in reports.items()}
    if as_json:
        first = next(iter(reports))
        _echo_json(
            {
                **reports[first].to_dict(),
                "output": first,
                "flags": flags[first],
                "verdict": verdicts[first],
                "cautions": notes[first],
                "outputs": {
                    k: {**r.to_dict(), "flags": flags[k], "verdict": verdicts[k], "cautions": notes[k]}
                    for k, r in reports.items()
                },
                **({} if model is None else {"model": model.to_dict(), "warnings": list(model.warnings)}),
            }
        )
        return flags
    wide = out.width >= 140  # definitions need room; narrow terminals get a pointer instead
    out.print(
        report_table(reports, std_fraction=std_fraction, title=f"collapse metrics: {measured.source}", definitions=wide)
    )
    if not wide:
        out.print("[dim]definitions and papers: docs/metrics.md (or --json / report.json)[/]")
    for name, r in reports.items():
        if r.n_nonfinite:
            err.print(f"[yellow]{name}: dropped {r.n_nonfinite} rows with NaN/Inf[/]")
        for f in flags[name]:
            out.print(f"[bold red]{name}:[/] {f}", highlight=False)
        style = "bold red" if flags[name] else "bold green"
        out.print(f"[{style}]verdict ({name}):[/] {verdicts[name]}", highlight=False)
        for c in notes[name]:
            out.print(f"[yellow]caution ({name}):[/] {c}", highlight=False)
    if out_dir is not None:
        out.print(f"wrote {out_dir / 'report.json'} and {out_dir / 'spectrum.png'}", highlight=False)
    return flags


def _watch_run(
    run_dir: Path,
    *,
    images,
    load,
    image_size,
    batch_size,
    views,
    seed,
    device,
    metrics,
    out_dir,
    force,
    interval,
    max_wait,
    until_step,
    std_fraction,
    rankme_drop,
    rank_fraction,
    fail_on_collapse,
    as_json,
) -> int:
    """--watch mode: the library follows the run; this draws the live table and prints alarms.

    With --images, every new checkpoint in the run folder is measured (two views of the images).

    Returns:
        The exit code: 3 when --fail-on-collapse and an alarm fired, else 0.
    """
    from contextlib import nullcontext

    from rich.live import Live

    from featviz import collapse as C
    from featviz.cli.collapse_view import watch_line
    from featviz.collapse.monitor import snapshot_path

    metrics_fn = None
    if images is not None:
        metrics_fn = C.twoview.checkpoint_metrics_fn(
            images, load, image_size=image_size, batch_size=batch_size, seed=seed, device=device, views=views, **metrics
        )
    watcher = C.CollapseWatcher(std_fraction=std_fraction, rankme_drop=rankme_drop, rank_fraction=rank_fraction)
    title = f"collapse watch: {run_dir}"
    # with --json stdout carries only the final JSON summary; piped (not a terminal): one plain line per record
    live_table = not as_json and out.is_terminal
    # the table fits the terminal's height (a taller live table scrolls and repeats its header) and is
    # redrawn only when records arrive, with every message printed through the live display
    rows = max(3, min(15, out.size.height - 8))
    live_ctx = (
        Live(watch_table(watcher, rows=rows, title=title), console=out, auto_refresh=False, redirect_stderr=False)
        if live_table
        else nullcontext()
    )
    with live_ctx as live:
        say = err if live is None else live.console

        def on_event(kind: str, info: dict) -> None:
            if kind == "waiting":
                say.print(f"[dim]{info['message']}…[/]", highlight=False, style=None)
            elif kind in ("records", "stopped") and live is not None:
                live.update(watch_table(watcher, rows=rows, title=title), refresh=True)
            elif kind == "records" and not as_json:
                first = len(watcher.records) - sum(r.get("event") != "done" for r in info["records"])
                for i in range(first, len(watcher.records)):
                    out.print(watch_line(watcher, i), highlight=False, markup=False, soft_wrap=True)
            for r in info.get("records", ()) if kind == "records" else ():
                snap = snapshot_path(run_dir, r)
                if snap is not None:  # FeatvizMonitor(tsne_every=K): a t-SNE of the held-out split
                    say.print(
                        f"snapshot: t-SNE of the held-out split at epoch {r.get('epoch')} (step {r.get('step')}): "
                        f"{snap}",
                        highlight=False,
                        markup=False,
                    )
            for a in info.get("alarms", ()):
                say.print(f"[bold red]ALARM[/] step {a['step']}: {a['message']}", highlight=False)

        result = C.follow_run(
            run_dir,
            watcher=watcher,
            out_dir=out_dir,
            force=force,
            interval=interval,
            max_wait=max_wait,
            until_step=until_step,
            stop_on_alarm=fail_on_collapse,
            checkpoint_metrics=metrics_fn,
            on_event=on_event,
            title=title,
        )
    reason = (
        C.STOP_REASONS[result.reason]
        .replace("--until-step", f"step {until_step}")
        .replace("--max-wait", f"{max_wait} s")
    )
    err.print(
        f"stopped: {reason}; {result.records} records, {len(result.alarms)} alarms"
        + (f"; curves: {result.curves}" if result.curves.exists() else ""),
        highlight=False,
    )
    if as_json:
        _echo_json(result.to_dict())
    return 3 if fail_on_collapse and result.alarms else 0
