"""Offline Hugging Face names: ``hf:ORG/NAME[@REV]`` and timm's ``hf-hub:ORG/NAME[@REV]``.

A name resolves to its snapshot folder in the local Hugging Face cache, and only there: featviz
never makes a network call (``huggingface_hub`` is asked with ``local_files_only=True`` and
``HF_HUB_OFFLINE=1``). The cache is where ``huggingface_hub`` puts it: ``HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``), read when
the name is resolved. A name that is not cached is a one-line error with the command that downloads it.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from featviz.errors import CheckpointError, MissingDependencyError

PREFIXES = ("hf:", "hf-hub:")
_NAME_RE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+|[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[\w.\-/]+))?")


@dataclass(frozen=True)
class HubName:
    """A parsed ``hf:`` name: the repository and the revision (None: ``main``)."""

    repo_id: str
    revision: str | None = None

    def download_command(self) -> str:
        """The command that puts this repository in the cache."""
        return f"hf download {self.repo_id}" + (f" --revision {self.revision}" if self.revision else "")

    def __str__(self) -> str:
        return f"hf:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def is_hub_name(value: object) -> bool:
    """Whether ``value`` (a string or path) is an ``hf:``/``hf-hub:`` name rather than a file."""
    return isinstance(value, (str, os.PathLike)) and str(value).startswith(PREFIXES)


def parse(value: str | os.PathLike) -> HubName:
    """``hf:ORG/NAME[@REV]`` (or ``hf-hub:...``) as a ``HubName``.

    Raises:
        CheckpointError: not a repository name.
    """
    text = str(value)
    body = next((text[len(p):] for p in PREFIXES if text.startswith(p)), text)
    m = _NAME_RE.fullmatch(body)
    if not m:
        raise CheckpointError(f"{text!r}: expected hf:ORG/NAME or hf:ORG/NAME@REVISION (e.g. "
                              "hf:facebook/dinov2-small, hf-hub:timm/vit_small_patch16_dinov3.lvd1689m)")
    return HubName(m["repo"], m["rev"])


def cache_dir() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it (read from the environment now)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


@contextmanager
def _offline():
    """``HF_HUB_OFFLINE=1`` for the duration (restored after)."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def resolve(value: str | os.PathLike) -> Path:
    """The local snapshot folder of an ``hf:`` name, from the Hugging Face cache only.

    Raises:
        MissingDependencyError: ``huggingface_hub`` is not installed.
        CheckpointError: the name is malformed, or not in the cache (the message names the download command).
    """
    name = parse(value)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise MissingDependencyError(f"{name} is a Hugging Face name: install the extra with "
                                     "`pip install 'featviz[hf]'`") from None
    cache = cache_dir()
    try:
        with _offline():
            folder = snapshot_download(name.repo_id, revision=name.revision, cache_dir=str(cache),
                                       local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise CheckpointError(f"{name} is not in the local Hugging Face cache ({cache}); featviz never downloads: "
                              f"run `{name.download_command()}` (or `huggingface-cli download {name.repo_id}"
                              + (f" --revision {name.revision}" if name.revision else "") + "`), then retry") from None
    return Path(folder)
