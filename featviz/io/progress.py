"""The progress contract between the library and its callers (torch-free).

Long library loops take ``progress: Progress | None``: a callable that wraps an iterable (with an
optional ``total=``) and yields the same items, e.g. ``rich.progress.track`` or ``tqdm.tqdm``. The
CLI passes a rich bar; the library itself depends on no progress library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeAlias

Progress: TypeAlias = Callable[..., Iterable]
