"""The error hierarchy for mistakes a user can cause and fix (torch-free).

Every message says what was expected, what was found and what to do next. The CLI turns a
``FeatvizError`` into one red line on stderr and exit code 1 (2 for an ``OptionError``, a usage error);
anything else is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatvizError(Exception):
    """Base class for every error a user can cause and fix."""


class CheckpointError(FeatvizError):
    """A checkpoint file cannot be read, or does not fit the requested architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs pickle globals outside featviz's allow-list."""

    def __init__(self, message: str, blocked: list[str]):
        super().__init__(message)
        self.blocked = blocked


class CheckpointFormatError(CheckpointError):
    """A checkpoint layout is unknown or ambiguous."""


class ArchitectureError(FeatvizError):
    """An architecture name is unknown or cannot be inferred."""


class UnknownNameError(FeatvizError):
    """A name (method, layer, format, architecture) is not among the valid ones."""


class DataError(FeatvizError):
    """Input data is missing, empty, corrupt or too small for the request."""


class ImageTooLargeError(DataError):
    """An image is above Pillow's decompression-bomb limit (``--max-image-pixels`` lifts it)."""


class ArtifactError(FeatvizError):
    """An embeddings/coords/metrics file is malformed or of the wrong schema."""


class OutputError(FeatvizError):
    """An output cannot be written.

    Its folder is not writable, a parent is a file, or the folder exists and was not written by featviz.
    """


class OutputExistsError(OutputError):
    """An output already exists and ``--force`` was not given."""


class OptionError(DataError):
    """An option's value is malformed (``--k a,b``, ``--image-size 10x``): a usage error, exit code 2."""


class MissingDependencyError(FeatvizError):
    """An optional extra (e.g. ``featviz[tensorboard]``, ``featviz[umap]``) is not installed."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates that look like ``name`` (for 'did you mean' hints)."""
    candidates = list(candidates)
    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if len(hits) < n:  # substring matches catch 'layer4' vs 'layer4.1.conv2'
        hits += [c for c in candidates if name and name in c and c not in hits][: n - len(hits)]
    return hits


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Format a ' (did you mean: a, b?)' suffix, or '' when nothing is close."""
    hits = closest(name, candidates)
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""


def shorten(items: Iterable[str], n: int = 5) -> str:
    """Join at most ``n`` items and say how many more there are."""
    items = list(items)
    head = ", ".join(items[:n])
    return head + (f", … and {len(items) - n} more" if len(items) > n else "")
