"""Issue 15 as a user meets it: outputs that never destroy data, one clear line for every bad path,
a newcomer's path that works from any folder. Each test is one reported case."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
TINY = ("--arch", "resnet18_w8-cifar", "--image-size", "32")


def _one_line(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def emb_npz(tmp_path):
    from featviz.io.artifacts import Embeddings

    rng = np.random.default_rng(0)
    p = tmp_path / "emb.npz"
    Embeddings(rng.normal(size=(60, 8)), np.repeat(np.arange(3), 20), ["a", "b", "c"]).save(p)
    return p


@pytest.fixture
def cats(tmp_path):
    d = tmp_path / "cats"
    d.mkdir()
    for name in ("cat_0.jpg", "cat_1.jpg"):
        shutil.copy(SAMPLE / "photos" / "cat" / name, d / name)
    return d


def _users_files(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("my thesis")
    (folder / "sub" / "data.csv").write_text("1,2")


def _still_there(folder: Path) -> None:
    assert (folder / "thesis.tex").read_text() == "my thesis"
    assert (folder / "sub" / "data.csv").read_text() == "1,2"


# ------------------------------------------------------------------ data loss and output safety
def test_collapse_force_keeps_files_featviz_did_not_write(cli, emb_npz, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    _users_files(out)
    for force in ((), ("--force",)):  # a folder featviz did not make: refused either way
        assert "not written by featviz" in _one_line(cli("collapse", emb_npz, "--out", out, *force))
    _still_there(out)
    shutil.rmtree(out)
    assert cli("collapse", emb_npz, "--out", out).exit_code == 0
    _users_files(out)  # the user adds files to featviz's folder
    r = cli("collapse", emb_npz, "--out", out, "--force")
    assert r.exit_code == 0, r.output
    _still_there(out)
    assert (out / "report.json").is_file() and (out / "spectrum.png").is_file()


def test_cam_force_keeps_files_featviz_did_not_write(cli, cats, tmp_path):
    out = tmp_path / "cam"
    out.mkdir()
    _users_files(out)
    assert "not written by featviz" in _one_line(cli("cam", cats, *TINY, "--out", out, "--force"))
    _still_there(out)
    shutil.rmtree(out)
    assert cli("cam", cats, *TINY, "--out", out).exit_code == 0
    _users_files(out)
    (out / "overlays" / "notes.txt").write_text("mine")
    r = cli("cam", cats, *TINY, "--out", out, "--force", "--method", "eigencam")
    assert r.exit_code == 0, r.output
    _still_there(out)
    assert (out / "overlays" / "notes.txt").read_text() == "mine"
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["cat_0.eigencam.png", "cat_1.eigencam.png", "notes.txt"]  # the gradcam ones were featviz's


def test_two_embeds_in_one_folder_keep_their_own_manifests(cli, tmp_path, sample_dir):
    for name, size in (("a", "16"), ("b", "24")):
        r = cli("embed", "--arch", "resnet18_w8-cifar", "--images", sample_dir / "photos" / "cat", "--image-size", size,
                "--out", tmp_path / f"{name}.npz")
        assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "a.manifest.json").read_text())
    b = json.loads((tmp_path / "b.manifest.json").read_text())
    assert (a["output"], a["image_size"], b["output"], b["image_size"]) == ("a.npz", 16, "b.npz", 24)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder that cannot be written (os.access says so, as it does for a non-root user)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    from featviz.io import outputs

    real = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    return ro


def _refuses_to_compute(monkeypatch):
    """Any model load means work started before the output was checked.

    The modules that bind ``build_backbone`` by name at import are imported first, so the patch never
    leaks into them (a first import under the patch would keep ``boom`` for the rest of the session).
    """
    import featviz.models.checkpoints.backbone
    import featviz.models.checkpoints.classifier_layouts  # noqa: F401
    from featviz.models import architectures as models
    from featviz.models import checkpoints, loader

    def boom(*a, **k):
        raise AssertionError("work started before the output was checked")

    # load_backbone first: reading it imports the layout modules lazily, and one of them binds
    # build_backbone at import; patched before, it would keep `boom` for the rest of the session
    monkeypatch.setattr(checkpoints, "load_backbone", boom)
    monkeypatch.setattr(loader, "load_model", boom)
    monkeypatch.setattr(models, "build_backbone", boom)


@pytest.mark.parametrize("command", ["embed", "tsne", "tsne-end-to-end", "cam", "collapse", "convert", "demo",
                                     "train", "knn", "probe", "attention", "pca", "tsne-html", "embed-tensorboard",
                                     "similarity"])
def test_read_only_output_folder_is_one_line_before_any_work(cli, read_only, emb_npz, cats, command, monkeypatch,
                                                             tmp_path):
    ckpt = SAMPLE / "checkpoints" / "moco_v2_tiny.pth.tar"
    if command != "train":
        _refuses_to_compute(monkeypatch)
    if command in ("knn", "probe"):
        from featviz.eval import splits

        monkeypatch.setattr(splits, "load_splits", lambda *a, **k: pytest.fail("work started before the check"))
    args = {
        "knn": ["knn", "--train", emb_npz, "--val", emb_npz, "--out", read_only / "knn.json"],
        "probe": ["probe", "--train", emb_npz, "--val", emb_npz, "--out", read_only / "probe.json"],
        "attention": ["attention", cats, "--arch", "vit_small_patch16_224", "--out", read_only / "att"],
        "pca": ["pca", cats, *TINY, "--out", read_only / "pca"],
        "similarity": ["similarity", cats, *TINY, "--patch", "0,0", "--out", read_only / "sim"],
        "tsne-html": ["tsne", emb_npz, "--out", tmp_path / "map.png", "--html", read_only / "map.html"],
        "embed-tensorboard": ["embed", *TINY, "--images", cats, "--out", tmp_path / "e.npz",
                              "--tensorboard", read_only / "tb"],
        "embed": ["embed", *TINY, "--images", cats, "--out", read_only / "e.npz"],
        "tsne": ["tsne", emb_npz, "--out", read_only / "map.png"],
        "tsne-end-to-end": ["tsne", *TINY, "--images", cats, "--out", read_only / "map.png"],
        "cam": ["cam", cats, *TINY, "--out", read_only / "cam"],
        "collapse": ["collapse", emb_npz, "--out", read_only / "c"],
        "convert": ["convert", ckpt, read_only / "e.safetensors"],
        "demo": ["demo", "--out", read_only / "demo"],
        "train": ["train", "-m", "simsiam", "-d", "digits", "-a", "resnet18_w8-cifar", "--image-size", "16",
                  "-o", read_only / "run"],
    }[command]
    assert "is not writable" in _one_line(cli(*args))
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("command", ["pca", "attention", "embed-tensorboard", "similarity"])
def test_new_folder_outputs_refuse_a_folder_featviz_did_not_write(cli, cats, tmp_path, command, monkeypatch):
    _refuses_to_compute(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    _users_files(out)
    args = {"pca": ["pca", cats, *TINY, "--out", out],
            "attention": ["attention", cats, "--arch", "vit_small_patch16_224", "--out", out],
            "similarity": ["similarity", cats, *TINY, "--patch", "0,0", "--out", out],
            "embed-tensorboard": ["embed", *TINY, "--images", cats, "--out", tmp_path / "e.npz", "--tensorboard", out],
            }[command]
    for force in ((), ("--force",)):
        assert "not written by featviz" in _one_line(cli(*args, *force))
    _still_there(out)
    assert not (tmp_path / "e.npz").exists()


@pytest.mark.parametrize("command", ["pca", "embed-tensorboard"])
def test_new_folder_outputs_force_keeps_the_users_files(cli, cats, tmp_path, command):
    out = tmp_path / "out"
    args = {"pca": ["pca", cats, *TINY, "--out", out],
            "embed-tensorboard": ["embed", *TINY, "--images", cats, "--out", tmp_path / "e.npz", "--tensorboard", out],
            }[command]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    first = json.loads((out / ".featviz-output.json").read_text())["files"]
    _users_files(out)
    assert "--force" in _one_line(cli(*args))  # featviz's own folder: replaced only with --force
    r = cli(*args, "--force")
    assert r.exit_code == 0, r.output
    _still_there(out)
    marker = json.loads((out / ".featviz-output.json").read_text())
    assert marker["command"] == command.replace("-", " --") and "thesis.tex" not in marker["files"]
    assert len(marker["files"]) == len(first)


@pytest.mark.parametrize("args", [("attention", "--image-size", "0"), ("pca", "--image-size", "8x0")])
def test_new_commands_image_size_is_one_line(cli, cats, tmp_path, args):
    line = _one_line(cli(args[0], cats, "--arch", "resnet18_w8-cifar", *args[1:], "--out", tmp_path / "o"), code=2)
    assert "--image-size" in line and "at least 8" in line
    assert not (tmp_path / "o").exists()


def test_read_only_folder_for_a_real_unprivileged_user(emb_npz):
    """The same without a mock: a folder the user cannot write (as root: run as nobody)."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        emb = base / "emb.npz"
        shutil.copy(emb_npz, emb)
        os.chmod(emb, 0o644)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        os.chmod(ro, 0o555)
        cmd = [sys.executable, "-m", "featviz", "collapse", str(emb), "--out", str(ro / "c")]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: cannot drop privileges")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(base), "MPLCONFIGDIR": str(base)}
        if os.geteuid() == 0:  # a checkout in a private folder (mktemp -d is 0700): nobody cannot even import it
            probe = subprocess.run([*cmd[:4], sys.executable, "-c", "import featviz"], capture_output=True,
                                   text=True, env=env, cwd=base, timeout=60)
            if probe.returncode:
                pytest.skip(f"user nobody cannot import featviz from {ROOT} (a private folder?): "
                            f"{probe.stderr.strip().splitlines()[-1:]}")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=base, timeout=120)
        err = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(err) == 1 and "is not writable" in err[0], res.stderr
        assert list(ro.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_out_dot_works_for_cam_and_collapse(cli, emb_npz, cats, tmp_path, monkeypatch):
    for name, args in (("c", ["collapse", emb_npz]), ("m", ["cam", cats, *TINY, "--method", "eigencam"])):
        here = tmp_path / name
        here.mkdir()
        monkeypatch.chdir(here)
        r = cli(*args, "--out", ".")
        assert r.exit_code == 0, r.output
        assert len(list(here.iterdir())) >= 3
        assert cli(*args, "--out", ".", "--force").exit_code == 0


def test_stale_partial_files_are_removed_by_the_next_good_run(cli, emb_npz, tmp_path):
    from featviz.io.artifacts import Embeddings

    stale = tmp_path / ".e.el1i4bzu.tmp.npz"  # what a kill during the save left (earlier versions' name)
    stale.write_bytes(b"partial")
    Embeddings.load(emb_npz).save(tmp_path / "e.npz")
    assert not stale.exists()


# ------------------------------------------------------------------ train: killed before its first epoch
def test_train_killed_before_first_epoch_gives_advice_that_works(cli, tmp_path):
    run = tmp_path / "R"
    run.mkdir()
    (run / "config.json").write_text("{}")  # what a kill before the first epoch leaves
    args = ["train", "-m", "simsiam", "-d", "digits", "-a", "resnet18_w8-cifar", "--image-size", "16", "-b", "16",
            "--limit", "40", "-e", "1", "-o", run]
    for extra in (["--resume"], []):
        line = _one_line(cli(*args, *extra))
        assert "--force" in line and "pass --resume" not in line and "without --resume" not in line
    assert cli(*args, "--force").exit_code == 0


# ------------------------------------------------------------------ bad input that was not one line
@pytest.mark.parametrize("size", ["0", "0x32", "8x0", "1", "7", "abc", "32x"])
def test_cam_image_size_below_8_or_not_a_size_is_one_line(cli, cats, tmp_path, size):
    line = _one_line(cli("cam", cats, "--arch", "resnet18_w8-cifar", "--image-size", size, "--out", tmp_path / "o"),
                     code=2)  # a usage error, said in one line
    assert "--image-size" in line and ("at least 8" in line or "expected N or HxW" in line)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,says", [
    (["collapse", "e.npz", "--json", "true"], "unexpected extra argument"),  # --json is a flag: no value
    (["cam"], "Missing argument"),
    (["inspect", "x.pth", "--format", "nope"], "'nope' is not one of"),
    (["knn", "--k", "5", "--image-size", "4"], "--image-size"),
])
def test_usage_errors_are_one_line_too(cli, args, says):
    line = _one_line(cli(*args), code=2)
    assert says in line and "-h for help" in line and "╭" not in line


def test_featviz_alone_still_shows_its_help(cli):
    r = cli()
    assert "Usage" in r.output and "cam" in r.output and "error:" not in r.output


def test_cam_skips_undecodable_images_unless_strict(cli, cats, tmp_path):
    (cats / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = cli("cam", cats, *TINY, "--method", "eigencam", "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["images"] == 2 and summary["undecodable_images"] == ["broken.jpg"]
    assert "skipping broken.jpg" in r.stderr and "--strict" in r.stderr
    with np.load(tmp_path / "o" / "maps.npz") as z:
        assert list(z["ids"]) == ["cat_0.jpg", "cat_1.jpg"] and z["eigencam"].shape == (2, 32, 32)
    line = _one_line(cli("cam", cats, *TINY, "--method", "eigencam", "--out", tmp_path / "s", "--strict"))
    assert "broken.jpg" in line and not (tmp_path / "s").exists()


def test_tsne_on_one_dimensional_features_is_one_line(cli, tmp_path):
    from featviz.io.artifacts import Embeddings

    Embeddings(np.random.default_rng(0).normal(size=(40, 1)), np.zeros(40)).save(tmp_path / "n1.npz")
    line = _one_line(cli("tsne", tmp_path / "n1.npz", "--out", tmp_path / "m.png"))
    assert "(40, 1)" in line and "at least 2 dimensions" in line


@pytest.fixture
def voc(tmp_path):
    """Two scenes with masks whose values go past classes.txt (4 classes; value 200 besides 255 = ignore)."""
    from PIL import Image

    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    shutil.copy(SAMPLE / "seg" / "classes.txt", root / "classes.txt")
    for name in ("scene_003", "scene_004"):
        shutil.copy(SAMPLE / "seg" / "JPEGImages" / f"{name}.jpg", root / "JPEGImages")
        m = np.asarray(Image.open(SAMPLE / "seg" / "SegmentationClass" / f"{name}.png")).copy()
        if name == "scene_004":
            m[:48, :48] = 200
        Image.fromarray(m).save(root / "SegmentationClass" / f"{name}.png")
    return root


def test_embed_pixels_with_mask_values_outside_classes_txt_is_one_line(cli, voc, tmp_path):
    r = cli("embed", "--pixels", "--images", voc, "--arch", "resnet18_w8-cifar", "--out", tmp_path / "p.npz")
    line = _one_line(r)
    assert "scene_004.png" in line and "200" in line and "4 classes" in line
    assert not (tmp_path / "p.npz").exists()


def test_forced_format_of_another_layout_names_the_layout_not_an_attribute_error(cli, tmp_path):
    import torch

    p = tmp_path / "other.pth"
    torch.save({"model": {"a.weight": torch.zeros(2)}}, p)
    for cmd in (["inspect", p], ["embed", "--checkpoint", p, "--images", SAMPLE / "photos" / "cat", "--out",
                                 tmp_path / "e.npz"]):
        line = _one_line(cli(*cmd, "--format", "moco"))
        assert "--format moco" in line and "encoder_q" in line and "drop --format" in line
        assert "AttributeError" not in line and "NoneType" not in line


@pytest.mark.parametrize("content,looks", [(b"hello world\n", "a text file"), (None, "a JPEG image")])
def test_a_wrong_file_passed_as_npz_is_named_for_what_it_is(cli, tmp_path, content, looks):
    p = tmp_path / "emb.npz"
    if content is None:
        shutil.copy(SAMPLE / "photos" / "cat" / "cat_0.jpg", p)
    else:
        p.write_bytes(content)
    for cmd in (["tsne", p, "--out", tmp_path / "m.png"], ["collapse", p]):
        line = _one_line(cli(*cmd))
        assert looks in line and "pickled" not in line


@pytest.fixture
def large_image(tmp_path, monkeypatch):
    """A 200x200 photo under a 10,000-pixel decompression-bomb limit (the 10000x10000 case, scaled down)."""
    from PIL import Image

    d = tmp_path / "large"
    d.mkdir()
    Image.open(SAMPLE / "photos" / "cat" / "cat_0.jpg").convert("RGB").resize((200, 200)).save(d / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # restored after the test (the CLI sets it)
    return d


@pytest.mark.parametrize("command", ["embed", "cam"])
def test_decompression_bomb_limit_is_named_and_can_be_lifted(cli, large_image, tmp_path, command):
    args = {"embed": ["embed", "--images", large_image, *TINY, "--out", tmp_path / "e.npz"],
            "cam": ["cam", large_image, *TINY, "--method", "eigencam", "--out", tmp_path / "c"]}[command]
    line = _one_line(cli(*args))
    assert "200x200 = 40,000 pixels" in line and "decompression-bomb limit of 10,000" in line
    assert "--max-image-pixels 40000" in line and "could not be decoded" not in line
    r = cli(*args, "--max-image-pixels", "40000")
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ the console
def _help_texts(cli):
    import typer.main

    from featviz.cli import app

    yield "featviz", cli("--help").output
    for name in sorted(typer.main.get_command(app).commands):
        yield name, cli(name, "--help").output


def test_flags_show_no_value_placeholder_in_help(cli):
    for name, text in _help_texts(cli):
        assert "<bool>" not in text, name
    embed = cli("embed", "--help").output
    images = next(ln for ln in embed.splitlines() if "--images" in ln)
    assert images.lstrip("│ ").startswith("*")  # required, and shown so


def _run_piped(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERMINAL_WIDTH")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "featviz", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_piped_help_keeps_option_names(tmp_path):
    res = _run_piped("collapse", "--help")
    assert res.returncode == 0, res.stderr
    for name in ("--uniformity-exact-max", "--uniformity-pairs", "--fail-on-collapse", "--drop-nonfinite"):
        assert name in res.stdout
    assert max(len(ln) for ln in res.stdout.splitlines()) > 80


def test_piped_watch_table_keeps_its_cells(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(SAMPLE / "runs" / "simsiam_digits", run)
    res = _run_piped("collapse", "--watch", str(run), "--max-wait", "1", "--interval", "0.1")
    assert res.returncode == 0, res.stderr
    # piped: one plain line per record (no live table to redraw), every value whole
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 54, res.stdout
    held = next(ln for ln in lines if "held-out" in ln)
    for cell in ("std_l2=", "(96%)", "rankme=", "effective_rank=", "uniformity=", "alignment=", "knn_acc=",
                 "status=ok"):
        assert cell in held, held
    assert "…" not in res.stdout


# ------------------------------------------------------------------ the contact sheet says what it shows
def test_class_labels_carry_names_and_probability(tmp_path):
    import torch

    from featviz.views.cam.run import read_class_names
    from featviz.views.cam.targets import ClassTarget

    t = ClassTarget(None, 3, ["cat", "dog", "cup"])
    t.bind(torch.tensor([0.0, 2.0, 1.0]))
    assert t.label == "class 1 dog (p=0.67)"
    assert read_class_names("imagenet")[285] == "Egyptian cat" and len(read_class_names("imagenet")) == 1000
    (tmp_path / "names.txt").write_text("a\nb\n\n")
    assert read_class_names(tmp_path / "names.txt") == ["a", "b"]


def test_random_weights_say_so_on_the_sheet_and_in_the_manifest(cli, cats, tmp_path):
    from PIL import Image

    r = cli("cam", cats, *TINY, "--method", "eigencam", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert man["weights"] == "random weights, seed 0"
    w, h = Image.open(tmp_path / "o" / "contact_sheet.png").size
    assert w >= 2 * 160 and h >= 2 * 160  # 32-px inputs are enlarged to readable thumbnails


def test_scorecam_inner_progress_bars_are_held_back_and_other_output_is_not(cli, cats, tmp_path, capfd):
    import torch

    from featviz.views.cam.methods import _inner_bars_hidden

    r = cli("cam", cats, *TINY, "--method", "scorecam,ablationcam", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "it/s" not in r.output and "%|" not in r.output
    with _inner_bars_hidden():
        import sys

        import tqdm

        for _ in tqdm.tqdm(range(3)):
            pass
        print("a warning line", file=sys.stderr)
    err = capfd.readouterr().err
    assert "a warning line" in err and "it/s" not in err
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("cut", [200, 0.5])
def test_a_cut_legacy_checkpoint_is_called_truncated(cli, tmp_path, cut):
    import torch

    p = tmp_path / "old.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, p, _use_new_zipfile_serialization=False)
    data = p.read_bytes()
    p.write_bytes(data[: cut if isinstance(cut, int) else int(len(data) * cut)])
    line = _one_line(cli("inspect", p))
    assert "truncated or corrupt" in line and "download it again" in line
