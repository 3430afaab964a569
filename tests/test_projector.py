"""TensorBoard projector export, read back: config, tensors, metadata, sprite."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featviz.data import thumbnails
from featviz.errors import OutputExistsError
from featviz.eval import projector
from featviz.io.artifacts import Embeddings

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def _photos() -> Embeddings:
    files = sorted((SAMPLE / "photos").rglob("*.jpg"))
    classes = sorted({f.parent.name for f in files})
    ids = [str(f.relative_to(SAMPLE / "photos")) for f in files]
    feats = np.random.default_rng(0).normal(size=(len(files), 6)).astype(np.float32)
    return Embeddings(
        feats,
        [classes.index(f.parent.name) for f in files],
        classes,
        ids,
        manifest={"image_root": thumbnails.image_root(files, ids)},
    )


def _read_config(logdir: Path):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    return text_format.Parse((logdir / "projector_config.pbtxt").read_text(), ProjectorConfig())


def test_export_reads_back(tmp_path):
    emb = _photos()
    out = projector.write_projector(emb, tmp_path / "tb")
    cfg = _read_config(out)
    assert len(cfg.embeddings) == 1
    e = cfg.embeddings[0]
    tensors = np.loadtxt(out / e.tensor_path, delimiter="\t", ndmin=2)
    np.testing.assert_allclose(tensors, emb.features, rtol=1e-5, atol=1e-6)
    rows = (out / e.metadata_path).read_text().splitlines()
    assert rows[0] == "label\tfile" and len(rows) == emb.n + 1
    assert rows[1] == f"{emb.class_names[emb.labels[0]]}\t{emb.ids[0]}"
    side = projector.sprite_side(emb.n)
    assert list(e.sprite.single_image_dim) == [side, side]
    with Image.open(out / e.sprite.image_path) as sp:
        assert sp.size == (math.ceil(math.sqrt(emb.n)) * side,) * 2
        tile = np.asarray(sp.convert("RGB"))[:side, :side].astype(float)
    want = np.asarray(
        thumbnails.image_thumbnail(Image.open(SAMPLE / "photos" / emb.ids[0]).convert("RGB"), side),
        float,
    )
    y0, x0 = (side - want.shape[0]) // 2, (side - want.shape[1]) // 2
    assert (
        np.abs(tile[y0 : y0 + want.shape[0], x0 : x0 + want.shape[1]] - want).mean() < 3
    )  # row 0's image, top left
    with pytest.raises(OutputExistsError):
        projector.write_projector(emb, out)
    projector.write_projector(emb.subset(np.arange(5)), out, force=True)
    assert len(_read_config(out).embeddings) == 1  # replaced as a whole, not appended


def test_pixel_metadata_has_y_x_and_missing_images_are_grey(tmp_path, caplog):
    emb = Embeddings(
        np.eye(4, 3, dtype=np.float32),
        [0, 1, 0, 1],
        ["a", "b"],
        ["nowhere.jpg"] * 4,
        image_index=np.zeros(4),
        yx=[[1, 2], [3, 4], [5, 6], [7, 8]],
        manifest={},
    )
    out = projector.write_projector(emb, tmp_path / "tb")
    e = _read_config(out).embeddings[0]
    rows = (out / e.metadata_path).read_text().splitlines()
    assert rows[0] == "label\tfile\ty\tx" and rows[2] == "b\tnowhere.jpg\t3\t4"
    with Image.open(out / e.sprite.image_path) as sp:
        a = np.asarray(sp.convert("RGB"))
    assert abs(a[:8, :8].mean() - 127) < 2  # a grey tile
    assert any("could not be found" in r.getMessage() for r in caplog.records)


def test_sprite_side_fits_tensorboard_limits():
    assert projector.sprite_side(20) == projector.MAX_SIDE
    assert projector.sprite_side(100_000) * math.ceil(math.sqrt(100_000)) <= projector.SPRITE_MAX
    assert projector.sprite_side(10_000_000) == 0


def test_missing_tensorboard_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(
        projector.MissingDependencyError, match=r"pip install 'featviz\[tensorboard\]'"
    ):
        projector.write_projector(_photos(), tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_run_embed_records_the_image_root_and_writes_the_projector(tmp_path, monkeypatch):
    from featviz.eval import embed

    monkeypatch.chdir(tmp_path)  # relative --images: the manifest still records an absolute root
    (tmp_path / "photos").symlink_to(SAMPLE / "photos")
    emb = embed.run_embed(
        out="e.npz", images="photos", arch="resnet18_w16-cifar", image_size=16, tensorboard="tb"
    )
    back = Embeddings.load(tmp_path / "e.npz")
    assert back.manifest["image_root"] == str(tmp_path / "photos")
    assert Path(back.manifest["image_root"]).is_absolute()
    e = _read_config(tmp_path / "tb").embeddings[0]
    assert (tmp_path / "tb" / e.tensor_path).is_file() and (
        tmp_path / "tb" / e.sprite.image_path
    ).is_file()
    assert len((tmp_path / "tb" / e.metadata_path).read_text().splitlines()) == emb.n + 1 == 21


def test_collapse_monitor_writes_its_scalars_to_a_summary_writer(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from featviz.collapse import CollapseMonitor

    rng = np.random.default_rng(0)
    writer = projector.summary_writer(tmp_path / "tb")
    mon = CollapseMonitor(tmp_path / "run", every=2, writer=writer)
    records = [mon.update(rng.normal(size=(64, 8)), rng.normal(size=(64, 8)), step=s, loss=1.0 / (s + 1))
               for s in range(5)]
    mon.close()
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"collapse/rankme", "collapse/std_l2", "collapse/loss"} <= tags
    assert "collapse/step" not in tags and "collapse/time" not in tags
    ev = acc.Scalars("collapse/rankme")
    assert [e.step for e in ev] == [0, 2, 4]  # every=2
    written = [r for r in records if r is not None]
    np.testing.assert_allclose([e.value for e in ev], [r["rankme"] for r in written], rtol=1e-6)
    # the JSON lines are unchanged by the writer
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"event": "done"' in lines[-1]
