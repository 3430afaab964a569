"""One pipeline for every view (``featviz attention``, ``pca``, ``cam``, ``crops``).

A view computes something from images with a model and writes it into an output folder. What it
does around that computation is the same for every view and lives here, in ``ViewRunner``:

1. the output folder is checked before any work (an existing one needs ``force``; a folder featviz
   did not write is refused);
2. the images under the inputs are listed with their ids (``image_ids``);
3. the model goes to its device in eval mode and its normalisation is read (``ViewRunner.place``);
4. the images are decoded, transformed (the model's eval transform at the run's size: a square N
   is center-cropped, an H×W size takes the whole image resized to exactly H×W, so overlays cover
   the whole picture; ``featviz.data.images.eval_transform``) and batched
   under the caller's progress bar (``ViewRunner.loader``, ``ViewRunner.batches``), and turned back
   into RGB for the pictures (``ViewRunner.rgb``);
5. the files are written into one atomic folder (``ViewRunner.output``) with a ``manifest.json``:
   the command, its arguments, the versions, how the images were resized (``resize``) and what the
   view adds (``ViewRunner.write_manifest``).

A view returns a typed result, a ``ViewResult`` dataclass whose ``to_dict()`` is the summary that
``--json`` prints (and that the result also reads as: ``result["images"]``).

A new view is one module, whose ``run_<view>`` drives a ``ViewRunner`` and returns its
``ViewResult``, and one thin CLI command.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def image_ids(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Image files under ``inputs`` and their ids.

    An id is the path relative to the folder given (the file name for a file); full paths when two
    inputs hold the same names, so that their outputs never collide.
    """
    from featviz.data.images import find_images

    files: list[Path] = []
    ids: list[str] = []
    for item in inputs:
        root = Path(item)
        for f in find_images(root):
            files.append(f)
            ids.append(str(f.relative_to(root)) if root.is_dir() else f.name)
    if len(set(ids)) < len(ids):  # two inputs hold the same names: their overlays must not collide
        ids = [str(f) for f in files]
    return files, ids


def safe_stem(image_id: str) -> str:
    """A file-name stem for an image id (``cat/cat_0.jpg`` -> ``cat__cat_0``)."""
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", image_id)
    return re.sub(r"[^A-Za-z0-9._-]+", "__", stem.replace("/", "__"))


class ViewResult(Mapping[str, Any]):
    """A view's typed result: a dataclass whose ``to_dict()`` is the summary ``--json`` prints.

    It reads as that summary too (a read-only ``Mapping``: ``result["images"]``, ``dict(result)``),
    so code written against the summary keeps working.
    """

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary, with the keys of the command's ``--json`` output, in that order."""
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        """The summary's value at ``key``."""
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        """The summary's keys, in order."""
        return iter(self.to_dict())

    def __len__(self) -> int:
        """How many keys the summary has."""
        return len(self.to_dict())


class ViewRunner:
    """What every view does around its own computation, in the order it does it (see the module).

    Args:
        command: The command's name (``attention``): the manifest's ``command`` and the folder marker's.
        out_dir: The output folder; checked here, before any work.
        force: Replace featviz's files in an existing ``out_dir`` (other files are kept).
        arguments: The command's arguments, for the manifest.
        progress: Wraps the batch loop (``progress(iterable, total=n)``: a progress bar), or None.

    Raises:
        OutputError, OutputExistsError: ``out_dir`` cannot be written, or exists and ``force`` is False.
    """

    def __init__(self, command: str, out_dir: str | os.PathLike, *, force: bool = False,
                 arguments: dict[str, Any] | None = None, progress: Callable[..., Iterable] | None = None) -> None:
        from featviz.io.outputs import check_output

        self.command = command
        self.out_dir = Path(out_dir)
        self.force = force
        self.arguments = arguments or {}
        self.progress = progress
        self.files: list[Path] = []
        self.ids: list[str] = []
        self.device: Any = None
        self.mean: tuple[float, ...] = ()
        self.std: tuple[float, ...] = ()
        self.resize: str | None = None
        self.limit: dict[str, int] | None = None  # {"first", "of"} under --limit
        check_output(self.out_dir, force=force, folder=True)  # before any work

    def images(self, inputs: Sequence[str | os.PathLike], *, limit: int | None = None) -> tuple[list[Path], list[str]]:
        """The image files under ``inputs`` and their ids (``image_ids``), kept for the loader.

        ``limit``: only the first N of them, in that (sorted, stable) order; the manifest's ``limit``
        says how many of how many (``--limit``).

        Raises:
            DataError: an input does not exist, or holds no image; ``limit`` < 1.
        """
        self.files, self.ids = image_ids(inputs)
        if limit is not None:
            from featviz.errors import DataError

            if limit < 1:
                raise DataError(f"--limit must be ≥ 1, got {limit}")
            self.limit = {"first": min(limit, len(self.files)), "of": len(self.files)}
            self.files, self.ids = self.files[:limit], self.ids[:limit]
        return self.files, self.ids

    def place(self, model: Any, device: str) -> Any:
        """``model`` on ``device`` (``auto``, ``cpu``, ``cuda``) in eval mode; its normalisation is read.

        Raises:
            DataError: the device is not available.
        """
        from featviz.data.images import normalization_of
        from featviz.distributed import resolve_device

        self.device = resolve_device(device)
        model = model.to(self.device).eval()
        self.mean, self.std = normalization_of(model)
        return model

    @property
    def normalization(self) -> dict[str, list[float]]:
        """The model's normalisation as manifests record it."""
        return {"mean": list(self.mean), "std": list(self.std)}

    def loader(self, *, batch_size: int, hw: tuple[int, int] | None = None, transform: Any = None,
               strict: bool = True, center_crop: bool | None = None) -> Any:
        """A DataLoader over the images, in order.

        Its batches are ``(x, labels, indices, skipped)`` (``featviz.data.images.collate``).

        Args:
            batch_size: Images per batch.
            hw: The input size for the default transform, the model's eval transform
                (``featviz.data.images.eval_transform``) with its normalisation; the manifest's
                ``resize`` says what it did.
            transform: Another transform (PIL image -> normalised tensor) instead.
            strict: An undecodable image raises ``DataError``; otherwise it is skipped (``skipped``).
            center_crop: For the default transform: None = center crop for a square N, the whole
                image resized to exactly H×W otherwise (``featviz.data.images.center_crop_default``).
        """
        import torch

        from featviz.data.images import ImageDataset, collate, eval_transform, resize_rule

        if transform is None:
            transform = eval_transform(hw, self.mean, self.std, center_crop=center_crop)
            self.resize = resize_rule(hw, center_crop)
        dataset = ImageDataset(self.files, None, transform, strict=strict)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)

    @contextmanager
    def batches(self, loader: Any) -> Iterator[Iterable]:
        """``loader`` under the progress bar; the bar ends with the block, error or not."""
        batches = loader if self.progress is None else self.progress(loader, total=len(loader))
        try:
            yield batches
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def rgb(self, x: Any) -> np.ndarray:
        """A normalised batch (B, 3, H, W) back to RGB images (B, H, W, 3) in [0, 1], on the CPU."""
        import torch

        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return (x.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    @contextmanager
    def output(self) -> Iterator[Path]:
        """A temporary folder whose files become ``out_dir``, whole, when the block succeeds."""
        from featviz.io.outputs import atomic_dir

        with atomic_dir(self.out_dir, force=self.force, command=self.command) as tmp:
            yield tmp

    def write_manifest(self, folder: Path, **extra: Any) -> None:
        """``folder/manifest.json``: schema, command, arguments, versions, ``resize``, ``limit``, then ``extra``.

        ``resize`` is what the default transform did (``loader``), unless ``extra`` says it; ``limit``
        (``{"first": N, "of": M}``) is there when ``images`` took only the first N.
        """
        from featviz.io.outputs import manifest, write_json

        if self.limit is not None and "limit" not in extra:
            extra = {"limit": self.limit, **extra}
        if self.resize is not None and "resize" not in extra:
            extra = {"resize": self.resize, **extra}
        write_json(Path(folder) / "manifest.json", manifest(self.command, self.arguments, **extra))

    def path(self, name: str) -> str:
        """Where the file ``name`` of the output folder will be, as the summary shows it."""
        return str(self.out_dir / name)
