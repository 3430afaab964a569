"""`featviz inspect`, `convert` and `layers`: what a checkpoint holds and what its layers are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featviz.cli._app import _echo_json, _user_errors, app, out
from featviz.cli.options import (
    ArchOpt,
    CheckpointKeyOpt,
    CheckpointOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    NumHeadsOpt,
    TrustOpt,
    _load_kwargs,
    image_size_value,
)


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
    """Detect a checkpoint's layout and architecture, and verify that it loads (a segmenter whole, else its encoder)."""
    from featviz.models import loader

    with _user_errors():
        info = loader.inspect_checkpoint(
            checkpoint, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint)
        )
    if as_json:
        _echo_json(info)
    elif info.get("kind") == "segmenter":
        out.print(_segmenter_table(info))
    else:
        out.print(_load_report_table(info))


def _load_report_table(r: dict):
    """The table of an encoder's load report (``featviz.models.checkpoints.LoadReport.to_dict()``)."""
    from rich.table import Table

    t = Table(show_header=False, box=None, title=f"[bold]{Path(r['path']).name}", title_justify="left")
    t.add_column(style="bold cyan")
    t.add_column()
    t.add_row("format", f"{r['format']}  [dim]{r['format_title']}[/]")
    t.add_row("container key", str(r["container_key"]))
    t.add_row("prefix stripped", repr(r["prefix"]))
    t.add_row("dropped", ", ".join(f"{k} ({v})" for k, v in r["dropped"].items()) or "-")
    if r.get("classifier"):
        c = r["classifier"]
        t.add_row("classifier", f"{c['name']} ({c['num_classes']} classes)  [dim]"
                  + ("loaded" if c["loaded"] else "kept in the file: cam --target class:N / top1 loads it")
                  + "[/]")
    t.add_row("architecture", f"{r['arch']['name']}  [dim]({r['arch_source']})[/]")
    t.add_row("details", ", ".join(f"{k}={v}" for k, v in r["arch_details"].items()))
    if r["not_inferable"]:
        t.add_row("not inferable", ", ".join(r["not_inferable"]))
    facts = r.get("model") or {}
    if facts:
        _facts_rows(t, facts)
    else:
        t.add_row("normalisation", f"mean={r['normalization']['mean']} std={r['normalization']['std']}"
                  f"  [dim]{r['normalization'].get('source', '')}[/]")
    if r.get("input_size") and not facts:
        t.add_row("input size", f"{r['input_size'][0]}x{r['input_size'][1]}")
    if r.get("method"):
        t.add_row("method", r["method"])
    if r.get("random_weights"):
        t.add_row("weights", "[yellow]RANDOM WEIGHTS (untrained)[/]  [dim](the file says so; so do its sheets)[/]")
    t.add_row("tensors", f"{r['loaded']} loaded, {len(r['missing'])} missing, "
              f"{len(r['unexpected'])} unexpected (file has {r['tensors_in_file']})")
    for w in r["warnings"]:
        t.add_row("[yellow]warning", w)
    return t


def _facts_rows(t, f: dict) -> None:
    """The rows of ``featviz.models.facts.model_facts``: what matters about the model for probing it."""
    t.add_row("family / library", f"{f['family']} · {f.get('library') or 'unknown'}")
    if f.get("patch_size"):
        t.add_row("patch", "x".join(map(str, f["patch_size"])))
    tok = f.get("tokens")
    if tok:
        names = {"class": "class", "register": "register/storage", "other": "other"}
        kinds = [f"{tok[k]} {name}" for k, name in names.items() if tok[k]] or ["none"]
        t.add_row("prefix tokens", f"{tok['excluded_from_maps']}: {', '.join(kinds)}  "
                  f"[dim](dropped from maps; {tok['grid'][0]}x{tok['grid'][1]} patches at the native size)[/]")
    if f.get("position_embedding"):
        t.add_row("positions", f["position_embedding"])
    t.add_row("pooling", f.get("pooling") or "unknown")
    n = f["normalization"]
    t.add_row("normalisation", f"{n['name']}  mean={n['mean']} std={n['std']}  [dim]{n.get('source', '')}[/]")
    t.add_row("native size", "x".join(map(str, f["native_size"])))


def _segmenter_table(s: dict):
    from rich.table import Table

    layout = {"cac": "CAC's official DeepLabv3+ (dvlab-research/Context-Aware-Consistency)",
              "featviz": "featviz's segmenter (featviz train -m supervised_seg|cac)"}.get(s["layout"], s["layout"])
    t = Table(show_header=False, box=None, title=f"[bold]{Path(s['path']).name}", title_justify="left")
    t.add_column(style="bold cyan")
    t.add_column()
    t.add_row("kind", "whole segmenter: backbone, DeepLabv3+ head" + (", projector" if s["projector_dim"] else "")
              + "  [dim](loads whole: cam and tsne --figure cac use all of it; embed and collapse its backbone)[/]")
    t.add_row("layout", f"{s['layout']}  [dim]{layout}[/]")
    t.add_row("method", str(s["method"]))
    t.add_row("backbone", f"{s['arch']}  [dim](output stride {s['output_stride']}, dilation {s['dilation']})[/]")
    t.add_row("head", f"ASPP rates {s['aspp_rates']}, decoder {s['decoder_dim']}-d at stride {s['feature_stride']}")
    t.add_row("projector", f"{s['projector_dim']}-d (CAC's contrastive projector)" if s["projector_dim"] else "-")
    names = s["class_names"]
    t.add_row("classes", f"{s['num_classes']}: " + ", ".join(names[:8]) + (" …" if len(names) > 8 else ""))
    if s.get("trained_crop"):
        t.add_row("trained crop", ", ".join(f"{k} {v}" for k, v in s["trained_crop"].items()))
    if s.get("normalization"):
        n = s["normalization"]
        t.add_row("normalisation", f"mean={n.get('mean')} std={n.get('std')}")
    for w in s.get("warnings", []):
        t.add_row("[yellow]warning", w)
    return t


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
    from featviz.models import checkpoints

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
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size", callback=image_size_value, help="Dummy input size, N or HxW (default: the model's)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List named modules with their output shapes and (C×H×W) maps: the names that cam and embed accept.

    The map column is what `embed --pixels`, `cam` and `collapse --pixels` get from a layer ("-": it has no
    spatial map); ViT tokens become the patch grid of --image-size.
    """
    from featviz.models.features import input_size, list_layers
    from featviz.models.loader import load_model

    with _user_errors():
        model, desc = load_model(checkpoint, **_load_kwargs(arch, fmt, num_heads, checkpoint_key, trust_checkpoint))
        hw = input_size(model, image_size)
        rows = list_layers(model, image_size=hw)
    if as_json:
        _echo_json(
            {
                "model": desc.to_dict(),
                "image_size": list(hw),
                "warnings": list(desc.warnings),
                "layers": [r._asdict() for r in rows],
            }
        )
        return
    from rich.table import Table

    table = Table("layer", "type", "output shape", "map", "params", box=None, title=f"{desc.name} at {hw[0]}x{hw[1]}")
    for r in rows:
        table.add_row(
            r.name,
            r.type,
            "×".join(map(str, r.shape)) if r.shape else "-",
            "×".join(map(str, r.map)) if r.map else "-",
            f"{r.params:,}",
        )
    out.print(table)
