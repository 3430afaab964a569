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
from featviz._names import CAM_METHOD_NAMES, CheckpointKey, DeviceName, FormatName
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
