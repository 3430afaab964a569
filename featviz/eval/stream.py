"""``featviz embed --shard-size S``: embeddings streamed to a folder of shards, resumable, in flat memory.

Shard ``k`` is the inputs ``[k*S, (k+1)*S)`` of the listing; each is embedded, written
(``featviz.io.shards.write_shard``: its ``.npy`` arrays atomically, then its record) and dropped
from memory before the next, and the folder's ``manifest.json`` lists the finished shards as the
run goes. Memory stays that of one shard, whatever the number of images.

A killed run resumes at the next unfinished shard when the same command is run again (no
``--force``): the manifest records the run's settings and their SHA-256, a resume with other
settings is refused in one line, and a shard whose files no longer have their recorded SHA-256
(damaged, partial) is embedded again. Under torchrun rank 0 decides which shards are left and
every rank writes its share of them; rank 0 merges their records into the final manifest.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featviz.data.images import LabelledImages, labelled_images, resize_rule
from featviz.data.thumbnails import image_root
from featviz.distributed import DistInfo, barrier, broadcast_object, cleanup, init_distributed, shard
from featviz.errors import DataError, FeatvizError, OutputExistsError
from featviz.eval.embed import apply_limit, embed_images, provenance
from featviz.io import shards as fmt
from featviz.io.artifacts import Embeddings, check_finite
from featviz.io.outputs import check_output, manifest, prepare_folder, sha256, write_json, write_marker
from featviz.io.progress import Progress
from featviz.models.features import input_size, parse_image_size

log = logging.getLogger(__name__)


def check_sharded_out(out: str | os.PathLike, *, force: bool) -> Path:
    """Check a shard folder output before any work; an unfinished run of featviz's may be resumed.

    Raises:
        DataError: ``out`` names an .npz file.
        OutputError, OutputExistsError: see ``featviz.io.outputs.check_output`` (a finished run
            needs ``--force``; a folder featviz did not write is refused).
    """
    out = Path(out)
    if out.suffix == ".npz":
        raise DataError(
            f"--shard-size writes a folder of shards; give --out a folder name (e.g. "
            f"{out.with_suffix('')}/), not {out.name!r}, or drop --shard-size for one .npz"
        )
    existing = fmt.read_manifest(out)
    unfinished = existing is not None and not existing.get("complete")
    check_output(out, force=force or unfinished, folder=True)  # an unfinished run is resumed, not replaced
    return out


def run_embed_sharded(
    *,
    out: str | os.PathLike,
    images: str | os.PathLike,
    shard_size: int,
    checkpoint=None,
    arch: str | None = None,
    labels_csv=None,
    pixels: bool = False,
    masks=None,
    layer: str | None = None,
    max_pixels_per_class: int | None = None,
    image_size: int | str | Any = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    seed: int = 0,
    strict: bool = False,
    drop_nonfinite: bool = False,
    force: bool = False,
    load_kwargs: dict[str, Any] | None = None,
    progress: Progress | None = None,
    tensorboard=None,
    center_crop: bool | None = None,
    limit: int | None = None,
) -> Embeddings | None:
    """``featviz embed --shard-size``: pooled image embeddings written shard by shard into the folder ``out``.

    Takes ``featviz.eval.embed.run_embed``'s arguments (``pixels``, ``masks``, ``layer``,
    ``max_pixels_per_class`` and ``tensorboard`` are refused: they need every row at once).

    Returns:
        The finished folder's embeddings, memory-mapped (rank 0; None on other ranks).

    Raises:
        DataError: a refused option, no decodable image, NaN features (unless ``drop_nonfinite``).
        OutputExistsError: a finished output without ``force``, or an unfinished one with other settings.
    """
    if pixels or masks is not None or layer is not None or max_pixels_per_class is not None:
        raise DataError(
            "--shard-size streams pooled image embeddings; pixel embeddings (--pixels) are written to "
            "one .npz: drop --shard-size"
        )
    if tensorboard is not None:
        raise DataError("--tensorboard needs every row at once; write one .npz (drop --shard-size) for the projector")
    if shard_size < 1:
        raise DataError(f"--shard-size must be ≥ 1, got {shard_size}")
    out = check_sharded_out(out, force=force)
    info = init_distributed(device)
    try:
        from featviz.models.loader import load_model

        load_kwargs = load_kwargs or {}
        # listed before the model is built: the listing's transient objects are freed (``_compact``) before
        # the model's memory is taken, so the peak does not grow with the number of images
        hw = parse_image_size(image_size)
        listed = labelled_images(images, labels_csv=labels_csv, image_size=hw[0] if hw else 32)
        limited: dict[str, Any] = {}
        n = apply_limit(len(listed), {"limit": limit}, limited)
        src = _compact(listed, n)
        del listed
        model, desc = load_model(checkpoint, arch=arch, seed=seed, **load_kwargs)
        size = input_size(model, image_size)
        if not isinstance(src.items, _Names) and size[0] != (hw[0] if hw else 32):  # in-memory images (digits)
            src = _compact(labelled_images(images, labels_csv=labels_csv, image_size=size[0]), n)
        extra = {**provenance(desc, info, precision, seed), **limited}
        extra.update(image_size=size[0] if size[0] == size[1] else list(size), resize=resize_rule(size, center_crop))
        args = dict(
            images=str(images),
            checkpoint=None if checkpoint is None else str(checkpoint),
            arch=arch,
            image_size=image_size,
            center_crop=center_crop,
            batch_size=batch_size,
            device=device,
            precision=precision,
            strict=strict,
            limit=limit,
            shard_size=shard_size,
            drop_nonfinite=drop_nonfinite,
        )
        settings = _settings(src, images, checkpoint, load_kwargs, info, dict(args, seed=seed), size)
        writer = _Writer(out, src, settings, shard_size, manifest("embed", args, **extra))
        plan = None
        if info.is_main:
            try:
                plan = writer.open(force=force)
            except FeatvizError as e:
                plan = e
        plan = broadcast_object(plan, info)
        if isinstance(plan, FeatvizError):
            raise plan
        for k in [plan[i] for i in shard(len(plan), info)]:
            r = writer.inputs(k)
            part = embed_images(
                model,
                src.items[r.start : r.stop],  # only this shard's paths become Python strings
                image_size=size,
                batch_size=batch_size,
                device=info.device,
                precision=precision,
                workers=workers,
                strict=strict,
                progress=_shard_bar(progress if info.is_main else None, k, writer.n_shards),
                center_crop=center_crop,
            )
            part.index, part.skipped = part.index + r.start, [i + r.start for i in part.skipped]
            writer.write(k, part, drop_nonfinite=drop_nonfinite, rank=info.rank)
        barrier(info)  # every rank's shards are on disk
        emb = writer.finish() if info.is_main else None
        barrier(info)  # leave together (see run_embed)
        return emb
    finally:
        cleanup(info)


class _Names(Sequence):
    """Strings held as one NumPy array of UTF-8 bytes: their length each, not a Python object each.

    A ``Path`` costs about 600 bytes and a ``str`` about 100; for 1.28M images that is the difference
    between a listing of 800 MB and one of 60 MB.
    """

    def __init__(self, names: Iterable[str]):
        self.data = np.array([n.encode("utf-8") for n in names], dtype=bytes)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [b.decode("utf-8") for b in self.data[i]]
        return self.data[i].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (b.decode("utf-8") for b in self.data)


def _compact(src: LabelledImages, n: int) -> LabelledImages:
    """The first ``n`` of ``src`` with paths and ids as ``_Names``; the listing's objects are freed."""
    paths = all(isinstance(p, (str, os.PathLike)) for p in src.items)
    items = _Names(os.fspath(p) for p in src.items[:n]) if paths else list(src.items[:n])
    out = LabelledImages(items, src.labels[:n].copy(), list(src.class_names), _Names(src.ids[:n]))
    src.items = src.ids = []
    gc.collect()  # the listing's Path objects go, and with them the memory arenas they held
    return out


def _shard_bar(progress: Progress | None, k: int, n_shards: int) -> Progress | None:
    if progress is None:
        return None
    return lambda it: progress(it, total=len(it), description=f"embedding shard {k + 1}/{n_shards}")


def _settings(
    src: LabelledImages, images, checkpoint, load_kwargs: dict, info: DistInfo, args: dict, size: tuple[int, int]
) -> dict[str, Any]:
    """What decides the output's numbers: a resume must present the same (the world size may change)."""
    import hashlib

    listing = hashlib.sha256()
    for i, label in zip(src.ids, src.labels.tolist(), strict=True):
        listing.update(f"{i}\t{label}\n".encode())
    listing.update("\t".join(src.class_names).encode())
    ckpt = None
    if checkpoint is not None and Path(checkpoint).is_file():
        st = Path(checkpoint).stat()
        ckpt = {"path": os.path.abspath(checkpoint), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    elif checkpoint is not None:
        ckpt = str(checkpoint)
    where = os.path.abspath(images) if Path(images).exists() else str(images)
    keep = ("arch", "center_crop", "batch_size", "precision", "strict", "shard_size", "drop_nonfinite")
    return {
        "images": where,
        "inputs": len(src),
        "listing_sha256": listing.hexdigest(),
        "checkpoint": ckpt,
        "load": {k: v for k, v in load_kwargs.items() if k != "trust"},
        "seed": args["seed"],
        "image_size": list(size),
        "device_type": info.device.type,
        **{k: args[k] for k in keep},
    }


class _Writer:
    """One shard folder being written: which shards are left, each shard, the manifest as it goes."""

    def __init__(self, out: Path, src: LabelledImages, settings: dict[str, Any], shard_size: int, head: dict[str, Any]):
        self.out, self.src, self.settings, self.shard_size = out, src, settings, shard_size
        self.hash = fmt.settings_sha256(settings)
        self.n_shards = max(1, math.ceil(len(src) / shard_size))
        self.head = head
        self.records: dict[int, dict] = {}

    def inputs(self, k: int) -> range:
        """The input positions shard ``k`` covers."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, len(self.src)))

    def files(self) -> list[str]:
        """Every file the finished folder holds."""
        return [fmt.MANIFEST] + [f for k in range(self.n_shards) for f in fmt.shard_files(k)]

    def open(self, *, force: bool) -> list[int]:
        """Start the folder, or resume an unfinished run with the same settings; return the shards left."""
        existing = fmt.read_manifest(self.out)
        resume = existing is not None and not existing.get("complete") and not force
        if resume and existing.get("settings_sha256") != self.hash:
            raise OutputExistsError(
                f"output folder {str(self.out)!r} holds an unfinished `featviz embed` with other settings "
                f"({_differences(existing.get('settings') or {}, self.settings)}); run it again with its settings "
                "to resume it, or pass --force to start over"
            )
        if resume:
            self.records, broken = fmt.finished_shards(self.out, self.n_shards, self.hash)
            for k, why in sorted(broken.items()):
                log.warning("shard %d of %s: %s; embedding it again", k, self.out, why)
            log.warning(
                "resuming %s: %d of %d shards already written, %d left",
                self.out,
                len(self.records),
                self.n_shards,
                self.n_shards - len(self.records),
            )
        else:
            prepare_folder(self.out, self.files(), force=force, command="embed")
        self._manifest(complete=False)
        return [k for k in range(self.n_shards) if k not in self.records]

    def write(self, k: int, part: Any, *, drop_nonfinite: bool, rank: int) -> None:
        """Write shard ``k`` from ``embed_images``' result; rank 0 then lists every finished shard."""
        index, feats = part.index, part.features
        dropped = 0
        if len(index):
            ok = check_finite(feats, drop=drop_nonfinite)
            if not ok.all():
                dropped = int((~ok).sum())
                log.warning("shard %d: dropped %d rows with NaN/Inf features", k, dropped)
                index, feats = index[ok], feats[ok]
        if not len(index):
            feats = np.zeros((0, feats.shape[1] if feats.ndim == 2 else 0), np.float32)
        arrays = {
            "features": np.ascontiguousarray(feats, np.float32),
            "labels": self.src.labels[index],
            "ids": np.array([self.src.ids[i] for i in index], dtype=str),
        }
        r = self.inputs(k)
        record = {
            "settings_sha256": self.hash,
            "inputs": [r.start, r.stop],
            "rank": rank,
            "skipped_images": [self.src.ids[i] for i in part.skipped],
            "dropped_nonfinite": dropped,
        }
        self.records[k] = fmt.write_shard(self.out, k, arrays, record)
        if rank == 0:
            self._collect()
            self._manifest(complete=False)

    def _collect(self, *, verify: bool = False) -> None:
        """Add the records other ranks have written since (rank 0 only)."""
        for k in range(self.n_shards):
            if k in self.records:
                continue
            record = fmt.read_json(self.out / f"{fmt.shard_stem(k)}.json")
            if fmt.shard_problem(self.out, k, record, self.hash, verify=verify) is None:
                self.records[k] = record

    def _manifest(self, *, complete: bool, **final: Any) -> None:
        shards = [self.records[k] for k in sorted(self.records)]
        write_json(
            self.out / fmt.MANIFEST,
            {
                **self.head,
                "format": fmt.FORMAT,
                "format_version": fmt.FORMAT_VERSION,
                "output": self.out.name,
                "complete": complete,
                "shard_size": self.shard_size,
                "n_shards": self.n_shards,
                "class_names": self.src.class_names,
                **final,
                "settings": self.settings,
                "settings_sha256": self.hash,
                "shards": shards,
            },
        )

    def finish(self) -> Embeddings:
        """Check every shard is there, write the final manifest and the ownership marker; return the folder."""
        self._collect()
        missing = [k for k in range(self.n_shards) if k not in self.records]
        if missing:
            raise DataError(
                f"{len(missing)} of {self.n_shards} shards of {str(self.out)!r} were not written (first: "
                f"{missing[0]}); run the same command again to finish them"
            )
        shards = [self.records[k] for k in range(self.n_shards)]
        skipped = [i for r in shards for i in r.get("skipped_images", [])]
        rows = sum(int(r["rows"]) for r in shards)
        if skipped:
            log.warning(
                "skipped %d of %d images that could not be decoded (the manifest's skipped_images lists them "
                "all; pass --strict to stop instead)",
                len(skipped),
                len(self.src),
            )
        if not rows:
            raise DataError(f"none of the {len(self.src)} images could be decoded; check the files")
        d = next(
            np.load(self.out / r["files"]["features"]["file"], mmap_mode="r").shape[1] for r in shards if int(r["rows"])
        )
        self._manifest(
            complete=True, n=rows, d=d, skipped_images=skipped, image_root=image_root(self.src.items, self.src.ids)
        )
        hashes = {r["files"][a]["file"]: r["files"][a]["sha256"] for r in shards for a in fmt.ARRAYS}
        hashes.update({f: sha256(self.out / f) for f in self.files() if f.endswith(".json")})
        write_marker(self.out, "embed", self.files(), hashes)
        return Embeddings.load(self.out)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The settings that differ, in words: ``image_size [32, 32] → [64, 64]``."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    words = [f"{k} {_short(old.get(k))} → {_short(new.get(k))}" for k in keys[:4]]
    return ", ".join(words) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "") or "an older format"


def _short(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 40 else text[:12] + "…"
