"""The map file that ``featviz tsne --coords`` writes, and reads back to redraw a map or place points into it.

One ``.npz`` (``allow_pickle=False``): ``coords`` (N, 2), ``labels``, ``class_names``, ``groups`` (the
input of each point), ``group_names``, ``rows`` (its row in that input), ``info`` (JSON: the method,
its settings and provenance), and, since placement (``featviz.maps.placement``), ``fitted`` (which
points the map was fitted on; the others were placed into it) and ``map_features`` (the features of
the fitted points, in order: what placing new points needs, so a published map file is enough to
extend it). No torch, no matplotlib.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from featviz.errors import ArtifactError, DataError

MAP_KEYS = ("coords", "groups")
"""The arrays that make an ``.npz`` a map file (an embeddings file has ``features``)."""


def write_map_file(path: str | os.PathLike, m: Any, *, force: bool = False) -> Path:
    """Write map ``m`` (a ``featviz.maps.projection.TsneMap``) to ``path`` (.npz) atomically.

    Raises:
        DataError: ``path`` does not end in .npz; OutputExistsError: it exists and ``force`` is False.
    """
    from featviz.io.outputs import atomic_path, check_writable, to_jsonable

    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"--coords must end in .npz, got {path.name!r}")
    check_writable(path, force=force)
    placing = {} if m.map_features is None else {"fitted": np.asarray(m.fitted, bool),
                                                  "map_features": np.asarray(m.map_features, np.float32)}
    with atomic_path(path, force=True) as tmp, open(tmp, "wb") as f:
        np.savez(f, coords=m.coords, labels=m.labels, class_names=np.array(m.class_names, dtype=str),
                 groups=m.groups, group_names=np.array(m.group_names, dtype=str), rows=m.rows,
                 info=np.array(json.dumps(to_jsonable(m.info))), **placing)
    return path


def read_map_file(path: str | os.PathLike) -> dict[str, Any]:
    """The fields of the map in ``path``, as ``TsneMap``'s keyword arguments.

    ``fitted`` and ``map_features`` are None in files written before placement existed.

    Raises:
        ArtifactError: missing, unreadable or not a map file.
    """
    from featviz.io.artifacts import read_npz

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"coordinates file {str(path)!r} does not exist; write it with `featviz tsne --coords`")
    d = read_npz(path)
    if any(k not in d for k in MAP_KEYS):
        raise ArtifactError(f"{str(path)!r} has no 'coords'/'groups' arrays; expected `featviz tsne --coords` output")
    return dict(coords=d["coords"], labels=d["labels"], class_names=list(d["class_names"]), groups=d["groups"],
                group_names=list(d["group_names"]), rows=d["rows"],
                info=json.loads(str(d["info"])) if "info" in d else {}, fitted=d.get("fitted"),
                map_features=d.get("map_features"))


def is_map_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a map file (``coords`` and ``groups`` arrays) rather than an embeddings file.

    Reads only the zip's directory; a missing or unreadable file is not a map file (its reader says why).
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
    except (OSError, zipfile.BadZipFile):
        return False
    return all(k in names for k in MAP_KEYS)
