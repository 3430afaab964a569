"""Collapse figures: singular-value spectra, metric curves over training, run comparisons.

They use matplotlib's object API, imported inside the functions.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from featviz.collapse.metrics import CollapseReport
from featviz.models.description import ModelDescription


def _save(fig, path: str | os.PathLike, force: bool) -> Path:
    from featviz.io.outputs import atomic_path

    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
    return Path(path)


def plot_spectrum(reports: dict[str, CollapseReport], path: str | os.PathLike, *, title: str | None = None,
                  force: bool = True) -> Path:
    """Log-scale spectra of one or more outputs (backbone, projector, pixels …), PNG/PDF/SVG by extension.

    Three panels, each normalised by its largest value: singular values of the uncentred Z (what
    RankMe sees), eigenvalues of the centred covariance (effective rank, with the α-ReQ fit),
    and eigenvalues of cov(normalize(Z)) (Jing et al. 2022's dimensional-collapse plot).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    floor = 1e-12  # log(0) guard: a collapsed direction plots at the floor, not off the axis
    for (name, r), c in zip(reports.items(), colors * 4, strict=False):
        panels = [
            (r.singular_values, f"{name}: RankMe {r.rankme:.1f}"),
            (r.cov_eigenvalues, f"{name}: eff. rank {r.effective_rank:.1f}"
             + (f", α={r.alpha_req:.2f} (R²={r.alpha_req_r2:.2f})" if r.alpha_req is not None else "")),
            (r.normalized_cov_eigenvalues, f"{name}: std_l2 {r.std_l2:.3g} (ideal {r.std_l2_ideal:.3g})"),
        ]
        for ax, (vals, label) in zip(axes, panels, strict=False):
            if len(vals) == 0 or vals[0] <= 0:
                continue
            rel = np.maximum(vals / vals[0], floor)
            ax.plot(np.arange(1, len(rel) + 1), rel, color=c, lw=1.8, label=label)
        if r.alpha_req is not None:  # the fitted power law over its range, dashed
            lo, hi = r.alpha_req_range
            ranks = np.arange(lo, hi)
            lam = r.cov_eigenvalues[ranks - 1] / r.cov_eigenvalues[0]
            ranks, lam = ranks[lam > 0], lam[lam > 0]
            b = np.average(np.log(lam) + r.alpha_req * np.log(ranks), weights=1 / ranks)
            axes[1].plot(ranks, np.exp(b) * ranks ** -r.alpha_req, "--", color=c, lw=1, alpha=0.8)
    titles = ["σ_k of Z (uncentred) — RankMe", "λ_k of cov(Z) (centred) — eff. rank, α-ReQ",
              "λ_k of cov(normalize(Z)) — Jing et al."]
    for ax, t in zip(axes, titles, strict=False):
        ax.set_yscale("log")
        ax.set_xscale("log")
        # at least three decades, so a healthy (flat) spectrum looks flat next to a collapsed one
        ax.set_ylim(min(ax.get_ylim()[0], 1e-3), 2.0)
        ax.set_xlabel("rank k")
        ax.set_ylabel("relative to the largest")
        ax.set_title(t, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="lower left")
    any_r = next(iter(reports.values()))
    fig.suptitle(title or f"Singular-value spectrum (N={any_r.n:,}, d={any_r.d})", fontsize=12)
    return _save(fig, path, force)


CURVE_PANELS = (
    ("std_l2", "std of l2-normalised z", ("std_l2",)),
    ("rank", "rank", ("rankme", "effective_rank", "lidar")),
    ("geometry", "alignment / uniformity", ("alignment", "uniformity")),
    ("training", "training", ("loss", "knn_acc")),
)


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike, *, std_fraction: float = 0.3,
                title: str | None = None, force: bool = True) -> Path:
    """Metric curves over training steps from ``CollapseMonitor`` records (one panel per group).

    The std panel shows the ideal 1/√d and the alarm threshold ``std_fraction``/√d; records
    where ``featviz.collapse.watch`` raised an alarm (``_alarms``) get a red vertical line.
    """
    from matplotlib.figure import Figure

    recs = [r for r in records if "step" in r and r.get("event") is None and r.get("step") is not None]
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    styles = ["-o", "-s", "-^"]
    for ax, (group, label, keys) in zip(axes, CURVE_PANELS, strict=False):
        lines = []
        for k, (key, style) in enumerate(zip(keys, styles, strict=False)):
            pts = [(r["step"], r[key], r.get("split") == "held_out") for r in recs
                   if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            # different units (alignment vs uniformity, loss vs accuracy) get their own y axis
            target = ax.twinx() if k and group != "rank" else ax
            held = [p for p in pts if p[2]]
            if held and len(held) < len(pts):  # featviz train: training batches faint, epochs bold
                epoch_name = "epoch mean" if key == "loss" else "held-out"
                series = [([p for p in pts if not p[2]], f"{key} (batches)", "-", 0.8, 0.5),
                          (held, f"{key} ({epoch_name})", style, 1.8, 1.0)]
            else:  # one kind of line (kNN accuracy, or a CollapseMonitor of your own)
                series = [(pts, key, style, 1.5, 1.0)]
            for sel, name, st, lw, alpha in series:
                x, y, _ = zip(*sel, strict=True)
                lines += target.plot(x, y, st, ms=3, lw=lw, color=f"C{k}", label=name, alpha=alpha)
            if target is not ax:
                target.set_ylabel(key, color=f"C{k}")
                ax.set_ylabel(keys[0], color="C0")
        if group == "std_l2":
            ideal = [(r["step"], r["std_l2_ideal"]) for r in recs if r.get("std_l2_ideal")]
            if ideal:
                x, y = zip(*ideal, strict=True)
                lines += ax.plot(x, y, "--", color="gray", lw=1, label="ideal 1/√d")
                lines += ax.plot(x, [v * std_fraction for v in y], ":", color="red", lw=1.2,
                                 label=f"alarm {std_fraction:g}/√d")
            ax.set_ylim(bottom=0)
        alarm_steps, prev = [], set()  # onsets of alarms flagged by featviz.collapse.watch (``_alarms``)
        for r in recs:
            now = set(r.get("_alarms") or ())
            if now - prev:
                alarm_steps.append(r["step"])
            prev = now
        for k, step in enumerate(alarm_steps):
            line = ax.axvline(step, color="red", alpha=0.25, lw=2, label="alarm starts")
            if k == 0 and lines:
                lines.append(line)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title or f"Collapse metrics over training ({len(recs)} records)", fontsize=12)
    return _save(fig, path, force)


def plot_run_comparison(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike, *,
                        baseline_knn: float | dict[str, float] | None = None, title: str | None = None,
                        force: bool = True) -> Path:
    """Several training runs' collapse curves side by side (SimSiam's Figure 2 style).

    Panels: std of the l2-normalised output against 1/√d (and 0.5/√d, 0.1/√d), RankMe on a log
    scale, and kNN accuracy per epoch when the runs logged it (``baseline_knn``: a dashed line,
    e.g. a random-init encoder, or ``{label: accuracy}`` for several). ``runs`` maps a label to the run's
    ``metrics.jsonl`` records.
    Epoch lines measured on held-out images (``split == "held_out"``) are drawn bold with markers
    (with the predictor's output dashed when logged), training-batch lines faintly behind them.
    """
    from matplotlib.figure import Figure

    from featviz.io.outputs import atomic_path

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    has_knn = any("knn_acc" in r for recs in runs.values() for r in recs)
    fig = Figure(figsize=(14 if has_knn else 9.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 3 if has_knn else 2)
    d = None
    for color, (label, recs) in zip(colors, runs.items(), strict=False):
        steps = [r for r in recs if r.get("kind", "step") == "step" and "std_l2" in r and "step" in r]
        held = [r for r in recs if r.get("split") == "held_out" and "std_l2" in r and "step" in r]
        if not steps and not held:
            continue
        d = d or (held or steps)[0].get("d")
        for key, ax in (("std_l2", axes[0]), ("rankme", axes[1])):
            if held:  # the epoch's held-out images in eval mode: the curve to read
                ax.plot([r["step"] for r in held], [r[key] for r in held], "o-", color=color, ms=3.5, lw=1.8,
                        label=f"{label}: z")
                pred = [r for r in held if f"{key}_predictor" in r]
                if pred:  # SimSiam/BYOL/MoCo v3: the predictor's output p = h(z), no BN at its end
                    ax.plot([r["step"] for r in pred], [r[f"{key}_predictor"] for r in pred], "s--", color=color,
                            ms=3, lw=1.2, label=f"{label}: predictor p")
            if steps:  # training batches (train-mode BN): faint behind, for the live view
                ax.plot([r["step"] for r in steps], [r[key] for r in steps], color=color, lw=0.8,
                        alpha=0.3 if held else 1.0, label=None if held else label)
        epochs = [r for r in recs if r.get("kind") == "epoch" and "knn_acc" in r]
        if has_knn and epochs:
            axes[2].plot([r["epoch"] for r in epochs], [100 * r["knn_acc"] for r in epochs], "o-", color=color,
                         label=label, ms=4)
    if d:
        ideal = 1 / math.sqrt(d)
        axes[0].axhline(ideal, color="gray", ls="--", lw=1, label=r"$1/\sqrt{d}$ (isotropic)")
        axes[0].axhline(0.5 * ideal, color="gray", ls=":", lw=1, label=r"$0.5/\sqrt{d}$")
        axes[0].axhline(0.1 * ideal, color="black", ls=":", lw=1, label=r"$0.1/\sqrt{d}$")
        axes[0].set_ylim(0, ideal * 1.25)
    axes[0].set(xlabel="training step", ylabel="std of l2-normalised output",
                title=f"Collapse monitor (d = {d}; faint: training batches)")
    axes[0].legend(fontsize=7, loc="center right", bbox_to_anchor=(1.0, 0.56), framealpha=0.9)
    axes[1].set(xlabel="training step", ylabel="RankMe", yscale="log", title="Rank of the output (RankMe)")
    axes[1].legend(fontsize=8, loc="lower left")
    if has_knn:
        baselines = baseline_knn if isinstance(baseline_knn, dict) else \
            ({} if baseline_knn is None else {"random-init encoder": baseline_knn})
        for (name, value), ls in zip(baselines.items(), ("--", ":", "-."), strict=False):
            axes[2].axhline(100 * value, color="gray", ls=ls, lw=1, label=f"{name} ({100 * value:.1f}%)")
        axes[2].set(xlabel="epoch", ylabel="kNN accuracy on held-out data (%)", title="kNN monitor")
        lo, hi = axes[2].get_ylim()
        axes[2].set_ylim(lo - 0.45 * (hi - lo), hi)  # room below the curves for the legend
        axes[2].legend(fontsize=7, loc="lower right", framealpha=0.9)
    if title:
        fig.suptitle(title, fontsize=11)
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, dpi=120)
    return Path(path)


def write_report(out_dir: str | os.PathLike, reports: dict[str, CollapseReport], source: str, *,
                 force: bool = False, model: ModelDescription | None = None) -> Path:
    """Write ``report.json`` and ``spectrum.png`` into ``out_dir``, as one atomic folder.

    ``report.json`` holds every output's metrics, spectra, flags, verdict and cautions
    (``featviz.collapse.verdict``) and the definitions, plus the
    manifest: the measured model's description and its load warnings when ``model`` is given.
    """
    from featviz.collapse.metrics import DEFINITIONS
    from featviz.collapse.verdict import cautions, verdict
    from featviz.io.outputs import atomic_dir, manifest, write_json

    about = {} if model is None else {"model": model.to_dict(), "warnings": list(model.warnings)}
    with atomic_dir(out_dir, force=force, command="collapse") as tmp:
        write_json(tmp / "report.json", manifest(
            "collapse", {"source": source}, **about, definitions=DEFINITIONS,
            outputs={k: {**r.to_dict(spectra=True), "flags": r.flags(), "verdict": verdict(r), "cautions": cautions(r)}
                     for k, r in reports.items()}))
        plot_spectrum(reports, tmp / "spectrum.png", title=f"Singular-value spectrum: {Path(source).name}")
    return Path(out_dir)
