"""`featviz demo`: run featviz end to end on the bundled sample data (offline, CPU).

Each step writes into the demo folder and records the command that makes the same output
on the user's own data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from featviz.outputs import atomic_dir, write_json

log = logging.getLogger(__name__)

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
CHECKPOINT = SAMPLE / "checkpoints" / "moco_v2_tiny.pth.tar"


def _sample(path: Path) -> Path:
    from featviz.errors import DataError

    if not path.exists():
        raise DataError(f"bundled sample {str(path)!r} is missing; run featviz demo from a source checkout "
                        "(pip install -e .) or regenerate it with sample_data/make_sample_*.py")
    return path


def _inspect(out: Path) -> tuple[Path, str]:
    from featviz.checkpoints import load_backbone

    _, report = load_backbone(_sample(CHECKPOINT))
    path = write_json(out / "inspect.json", report.to_dict())
    return path, "featviz inspect YOUR_CHECKPOINT.pth --json"


def _layers(out: Path) -> tuple[Path, str]:
    from featviz.models import list_layers, resolve_model

    model = resolve_model(checkpoint=_sample(CHECKPOINT))
    rows = [r._asdict() for r in list_layers(model)]
    path = write_json(out / "layers.json", rows)
    return path, "featviz layers --checkpoint YOUR_CHECKPOINT.pth"


STEPS: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "checkpoint report": _inspect,
    "layer names": _layers,
}


MARKER = ".featviz-demo"


def run_demo(out_dir: str | Path, *, force: bool = False,
             progress: Callable | None = None) -> dict[str, tuple[Path, str]]:
    """Run every demo step into ``out_dir``; return ``{step: (output path, command for your data)}``.

    A folder written by an earlier demo (it holds a ``.featviz-demo`` marker) is replaced;
    any other existing, non-empty folder needs ``force``.
    """
    out_dir = Path(out_dir)
    force = force or (out_dir / MARKER).is_file()
    results: dict[str, tuple[Path, str]] = {}
    with atomic_dir(out_dir, force=force) as tmp:
        (tmp / MARKER).write_text("written by featviz demo; the next demo run replaces this folder\n")
        steps = list(STEPS.items())
        for name, step in (progress("demo")(steps) if progress else steps):
            path, command = step(tmp)
            results[name] = (out_dir / path.relative_to(tmp), command)
    return results
