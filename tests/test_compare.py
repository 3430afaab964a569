"""featviz.compare: the measures against transcriptions of the official code, known answers, the command.

Transcribed (compactly, on fixed arrays):
- Kornblith et al.'s colab (google-research ``representation_similarity/Demo.ipynb``): ``gram_linear``,
  ``center_gram``, ``cka``, ``feature_space_linear_cka``;
- Nguyen et al. (ICLR 2021): CKA_minibatch = mean_k HSIC1(X_k, Y_k) / sqrt(mean_k HSIC1(X_k, X_k) mean_k
  HSIC1(Y_k, Y_k)), HSIC1 the unbiased estimator of Song et al. (2012) as written in the paper;
- minyoungg/platonic-rep ``metrics.py``: ``compute_nearest_neighbors``, ``mutual_knn``, ``hsic_unbiased``,
  ``cknna`` (torch, as the original);
- google/svcca ``cca_core.get_cca_similarity`` (the coefficients), after the tutorial's SVD reduction.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from featviz.compare import measures as M
from featviz.errors import OptionError


# ------------------------------------------------------------------ transcriptions
def k_gram_linear(x):
    return x.dot(x.T)


def k_center_gram(gram, unbiased=False):
    gram = gram.copy()
    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def k_cka(gram_x, gram_y, debiased=False):
    gx, gy = k_center_gram(gram_x, debiased), k_center_gram(gram_y, debiased)
    return gx.ravel().dot(gy.ravel()) / (np.linalg.norm(gx) * np.linalg.norm(gy))


def k_feature_space_linear_cka(fx, fy, debiased=False):
    fx = fx - np.mean(fx, 0, keepdims=True)
    fy = fy - np.mean(fy, 0, keepdims=True)
    dot = np.linalg.norm(fx.T.dot(fy)) ** 2
    nx, ny = np.linalg.norm(fx.T.dot(fx)), np.linalg.norm(fy.T.dot(fy))
    if debiased:
        n = fx.shape[0]
        rx, ry = np.einsum("ij,ij->i", fx, fx), np.einsum("ij,ij->i", fy, fy)
        sx, sy = np.sum(rx), np.sum(ry)

        def helper(xty, r1, r2, s1, s2):
            return xty - n / (n - 2.0) * r1.dot(r2) + s1 * s2 / ((n - 1) * (n - 2))

        dot = helper(dot, rx, ry, sx, sy)
        nx = np.sqrt(helper(nx**2, rx, rx, sx, sx))
        ny = np.sqrt(helper(ny**2, ry, ry, sy, sy))
    return dot / (nx * ny)


def nguyen_hsic1(k, l):  # noqa: E741 - the paper's eq. (2): 1/(n(n-3)) [tr(K~L~) + 1'K~1 1'L~1/((n-1)(n-2)) - 2/(n-2) 1'K~L~1]
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    ) / (n * (n - 3))


def nguyen_cka_minibatch(xs, ys):
    xy = np.mean([nguyen_hsic1(x @ x.T, y @ y.T) for x, y in zip(xs, ys, strict=True)])
    xx = np.mean([nguyen_hsic1(x @ x.T, x @ x.T) for x in xs])
    yy = np.mean([nguyen_hsic1(y @ y.T, y @ y.T) for y in ys])
    return xy / np.sqrt(xx * yy)


def p_knn(feats, topk):
    return (feats @ feats.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :topk]


def p_mutual_knn(fa, fb, topk):
    ka, kb = p_knn(fa, topk), p_knn(fb, topk)
    n = ka.shape[0]
    r = torch.arange(n).unsqueeze(1)
    ma, mb = torch.zeros(n, n), torch.zeros(n, n)
    ma[r, ka] = 1.0
    mb[r, kb] = 1.0
    return ((ma * mb).sum(dim=1) / topk).mean().item()


def p_hsic_unbiased(K, L):  # noqa: N803 - the original's names
    m = K.shape[0]
    kt, lt = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    v = torch.sum(kt * lt.T) + torch.sum(kt) * torch.sum(lt) / ((m - 1) * (m - 2)) - 2 * torch.sum(kt @ lt) / (m - 2)
    return v / (m * (m - 3))


def p_cknna(fa, fb, topk):
    n = fa.shape[0]
    K, L = fa @ fa.T, fb @ fb.T  # noqa: N806

    def similarity(K, L):  # noqa: N803
        kh, lh = K.clone().fill_diagonal_(float("-inf")), L.clone().fill_diagonal_(float("-inf"))
        ik, il = torch.topk(kh, topk, dim=1)[1], torch.topk(lh, topk, dim=1)[1]
        mask = torch.zeros(n, n, dtype=K.dtype).scatter_(1, ik, 1) * torch.zeros(n, n, dtype=K.dtype).scatter_(1, il, 1)
        return p_hsic_unbiased(mask * K, mask * L)

    return similarity(K, L).item() / (torch.sqrt(similarity(K, K) * similarity(L, L)) + 1e-6).item()


def s_get_cca_coefs(acts1, acts2, epsilon=1e-10):
    numx = acts1.shape[0]
    cov = np.cov(acts1, acts2)
    sxx, sxy, syy = cov[:numx, :numx], cov[:numx, numx:], cov[numx:, numx:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    sxx = sxx + epsilon * np.eye(len(sxx))
    syy = syy + epsilon * np.eye(len(syy))

    def sqrt_pd(a):
        w, v = np.linalg.eigh(a)
        return v @ np.diag(np.sqrt(w)) @ np.conj(v).T

    ix, iy = sqrt_pd(np.linalg.pinv(sxx)), sqrt_pd(np.linalg.pinv(syy))
    return np.abs(np.linalg.svd(ix @ sxy @ iy, compute_uv=False))


def s_svcca(x, y, keep):  # the tutorial: acts (neurons, datapoints), centred, top `keep` SVD directions
    out = []
    for a in (x.T, y.T):
        c = a - np.mean(a, axis=1, keepdims=True)
        _, s, v = np.linalg.svd(c, full_matrices=False)
        out.append(np.dot(s[:keep] * np.eye(keep), v[:keep]))
    return np.mean(s_get_cca_coefs(*out))


# ------------------------------------------------------------------ CKA
def test_cka_equals_kornblith_colab_and_its_printed_values():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    assert M.cka(x, y) == pytest.approx(k_cka(k_gram_linear(x), k_gram_linear(y)), abs=1e-12)
    assert M.cka(x, y) == pytest.approx(k_feature_space_linear_cka(x, y), abs=1e-12)
    assert round(M.cka(x, y), 5) == 0.55761  # the colab's printed output
    assert M.cka(x, y, debiased=True) == pytest.approx(k_feature_space_linear_cka(x, y, True), abs=1e-12)
    assert M.cka(x, y, debiased=True) == pytest.approx(k_cka(k_gram_linear(x), k_gram_linear(y), True), abs=1e-10)
    assert round(M.cka(x, y, debiased=True), 5) == 0.51346
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 7)), rng.normal(size=(40, 13)) ** 3
    assert M.cka(a, b) == pytest.approx(k_feature_space_linear_cka(a, b), abs=1e-12)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scale():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert M.cka(x, 3.7 * x @ q) == pytest.approx(1.0, abs=1e-12)
    assert M.cka_minibatch(x, 0.2 * x @ q, batch_size=50) == pytest.approx(1.0, abs=1e-12)
    assert M.cka(x, x * np.linspace(1, 5, 16)) < 0.99  # anisotropic scaling is not invariant


def test_cka_of_independent_gaussians_goes_to_zero_with_n():
    rng = np.random.default_rng(2)
    vals = [M.cka(rng.normal(size=(n, 8)), rng.normal(size=(n, 8))) for n in (50, 500, 5000)]
    assert vals[0] > vals[1] > vals[2]
    assert vals[2] < 0.01
    big = [M.cka_minibatch(rng.normal(size=(n, 8)), rng.normal(size=(n, 8)), batch_size=64) for n in (256, 8192)]
    assert abs(big[1]) < abs(big[0]) and abs(big[1]) < 0.01  # the unbiased minibatch estimate: no 8/n floor


def test_minibatch_cka_equals_nguyen_formula_and_song_hsic():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(103, 6)), rng.normal(size=(103, 9))
    y[:, :6] += x
    xs, ys = [x[i : i + 25] for i in range(0, 103, 25)], [y[i : i + 25] for i in range(0, 103, 25)]
    want = nguyen_cka_minibatch(xs[:-1], ys[:-1])  # the last minibatch holds 3 rows: no unbiased HSIC
    assert M.cka_minibatch(x, y, batch_size=25) == pytest.approx(want, abs=1e-12)
    k, l = x[:30] @ x[:30].T, y[:30] @ y[:30].T  # noqa: E741
    assert M.hsic_unbiased(k, l) == pytest.approx(nguyen_hsic1(k, l), abs=1e-12)
    assert M.hsic_unbiased(k, l) == pytest.approx(p_hsic_unbiased(torch.tensor(k), torch.tensor(l)).item(), abs=1e-12)
    acc = M.MinibatchCKA()  # three layers at once: every pair equals the two-layer formula
    z = rng.normal(size=(103, 4))
    for i in range(0, 100, 25):
        acc.update([x[i : i + 25], y[i : i + 25], torch.tensor(z[i : i + 25])])
    mat = acc.matrix()
    assert mat[0, 1] == pytest.approx(want, abs=1e-12) and mat[1, 0] == pytest.approx(want, abs=1e-12)
    assert mat[0, 2] == pytest.approx(nguyen_cka_minibatch(xs[:-1], [z[i : i + 25] for i in range(0, 100, 25)]))
    assert np.allclose(np.diag(mat), 1.0)
    assert acc.batches == 4 and acc.rows == 100


# ------------------------------------------------------------------ platonic-rep
@pytest.mark.parametrize("k", [2, 5, 10])
def test_mutual_knn_and_cknna_equal_platonic_rep(k):
    rng = np.random.default_rng(10 + k)
    x = rng.normal(size=(60, 12))
    y = x @ rng.normal(size=(12, 20)) + 0.8 * rng.normal(size=(60, 20))
    tx, ty = torch.tensor(x), torch.tensor(y)
    assert M.mutual_knn(x, y, k) == pytest.approx(p_mutual_knn(tx, ty, k), abs=1e-6)  # its masks are float32
    assert M.cknna(x, y, k) == pytest.approx(p_cknna(tx, ty, k), abs=1e-9)
    nx = torch.nn.functional.normalize(tx, dim=-1)  # platonic-rep's measure_alignment normalises first
    ny = torch.nn.functional.normalize(ty, dim=-1)
    assert M.mutual_knn(x, y, k, normalize=True) == pytest.approx(p_mutual_knn(nx, ny, k), abs=1e-6)
    assert M.cknna(x, y, k, normalize=True) == pytest.approx(p_cknna(nx, ny, k), abs=1e-9)


def test_neighbours_in_blocks_equal_one_block_and_known_answers():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    a, b = M.Neighbours(x, 7, block_rows=512), M.Neighbours(x, 7, block_rows=37)
    assert np.array_equal(a.index, b.index)
    assert M.mutual_knn(x, x, 7) == 1.0
    assert M.cknna(x, x, 7) == pytest.approx(1.0, abs=1e-5)
    assert M.mutual_knn(x, rng.normal(size=(300, 8)), 7) < 0.1
    assert not (a.index == np.arange(300)[:, None]).any()  # a row is never its own neighbour


# ------------------------------------------------------------------ SVCCA
def test_svcca_equals_google_svcca_cca_core():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 30))
    y = x[:, :20] @ rng.normal(size=(20, 25)) + rng.normal(size=(500, 25))
    for keep in (5, 10, 20):
        assert M.svcca(x, y, dims=keep) == pytest.approx(s_svcca(x, y, keep), abs=1e-6)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    assert M.svcca(x, 2 * x @ q) == pytest.approx(1.0, abs=1e-9)


def test_measures_accept_torch_and_refuse_bad_shapes():
    from featviz.errors import DataError

    x = torch.randn(50, 4)
    assert M.cka(x, x) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(DataError, match="same inputs, row for row"):
        M.cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(DataError, match=r"1 ≤ k ≤ N-1"):
        M.mutual_knn(np.random.rand(5, 2), np.random.rand(5, 2), 5)


def test_package_exports_lazily_without_torch():
    code = (
        "import sys, numpy as np, featviz.compare as c; x = np.random.rand(20, 3); "
        "print(round(c.cka(x, x), 6), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1.0", "False"]


# ------------------------------------------------------------------ layers, pooling, streaming
def test_auto_layers_and_pooling_follow_the_feature_core():
    from featviz.models.architectures import build_backbone
    from featviz.models.features import FeatureExtractor
    from featviz.models.taps import LayerTaps, auto_layers

    cnn = build_backbone("resnet18_w16-cifar", seed=0).eval()
    assert auto_layers(cnn) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    vit = build_backbone("vit_small_patch16_224", seed=0).eval()
    assert auto_layers(vit) == [f"blocks.{i}" for i in range(12)]
    assert auto_layers(vit, max_layers=4) == ["blocks.0", "blocks.4", "blocks.7", "blocks.11"]
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        with LayerTaps(cnn, ["layer1[-1]", "layer3.0"]) as taps:
            got = taps(x)
        assert taps.layers == ["layer1.1", "layer3.0"] and set(taps.pooling.values()) == {"global average"}
        with FeatureExtractor(cnn, "layer3.0") as fx:
            assert torch.allclose(got[1], fx(x).mean(dim=(2, 3)), atol=1e-6)
        seen = []
        handle = vit.blocks[5].register_forward_hook(lambda _m, _i, o: seen.append(o[:, 0].clone()))
        with LayerTaps(vit, ["blocks.5", "blocks.2"]) as taps:
            out = taps(x)
        handle.remove()
        assert taps.pooling == {"blocks.5": "class token", "blocks.2": "class token"}
        assert torch.equal(out[0], seen[0])


def _json(res):
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_cli_simsiam_against_its_random_init_on_digits(cli, tmp_path, sample_dir, one_thread):
    from featviz.compare.stream import sample_order

    ckpt = sample_dir / "checkpoints" / "simsiam_digits.safetensors"
    out = tmp_path / "cmp"
    s = _json(
        cli(
            "compare",
            "-c",
            ckpt,
            "-c",
            "random",
            "--images",
            "digits",
            "--batches",
            "3",
            "-b",
            "40",
            "--measure",
            "cka,mknn,cknna,svcca",
            "--k",
            "5",
            "--html",
            "-o",
            out,
            "--json",
        )
    )
    assert s["mode"] == "between" and s["n_images"] == 120
    assert [m["name"] for m in s["models"]] == ["simsiam_digits", "resnet18_w16-cifar (random init)"]
    assert s["models"][1]["random_init"] and s["models"][1]["arch"] == s["models"][0]["arch"]
    assert s["rows"] == s["cols"] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert set(s["models"][0]["pooling"].values()) == {"global average"}
    p = s["protocol"]
    assert (p["batch_size"], p["batches"], p["k"], p["image_size"]) == (40, 3, 5, [16, 16])
    assert p["knn_accuracy"]["folds"] == 5 and len(s["knn"]) == 2 and len(s["knn"][0]["top1"]) == 8
    for name in ("compare.png", "compare.json", "compare.npz", "manifest.json", "compare.html"):
        assert (out / name).is_file()
    with np.load(out / "compare.npz") as z:
        a = [z[f"pooled/a/{n}"] for n in s["rows"]]
        b = [z[f"pooled/b/{n}"] for n in s["cols"]]
        ids, labels = list(z["ids"]), z["labels"]
    assert ids == [f"digits/{i}" for i in sorted(sample_order(1797, batch_size=40, batches=3, seed=0))]
    assert (labels >= 0).all()
    # every number of the JSON is the library's measure of the pooled vectors
    m = s["measures"]
    assert m["mknn"][2][5] == pytest.approx(M.mutual_knn(a[2], b[5], 5, normalize=True), abs=1e-6)
    assert m["cknna"][7][1] == pytest.approx(M.cknna(a[7], b[1], 5, normalize=True), abs=1e-6)
    assert m["svcca"][3][3] == pytest.approx(M.svcca(a[3], b[3]), abs=1e-6)
    # and CKA is Nguyen et al.'s over the same random minibatches
    order = sample_order(1797, batch_size=40, batches=3, seed=0)
    row = {v: i for i, v in enumerate(sorted(order))}
    batches = [[row[v] for v in order[i : i + 40]] for i in range(0, 120, 40)]
    want = nguyen_cka_minibatch(
        [a[0][r].astype(np.float64) for r in batches], [b[6][r].astype(np.float64) for r in batches]
    )
    assert m["cka"][0][6] == pytest.approx(want, abs=1e-5)
    assert "Bokeh" in (out / "compare.html").read_text()[:5000] or "bokeh" in (out / "compare.html").read_text()


def test_cli_within_one_vit_pools_the_class_token(cli, tmp_path, one_thread):
    s = _json(
        cli(
            "compare",
            "--arch",
            "vit_small_patch16_224",
            "--images",
            "digits",
            "--image-size",
            "32",
            "--layers",
            "blocks.0,blocks.6,blocks.11",
            "--batches",
            "2",
            "-b",
            "32",
            "-o",
            tmp_path / "v",
            "--json",
        )
    )
    assert s["mode"] == "within" and s["rows"] == s["cols"] == ["blocks.0", "blocks.6", "blocks.11"]
    assert s["models"][0]["pooling"] == dict.fromkeys(s["rows"], "class token")
    cka = np.array(s["measures"]["cka"])
    assert np.allclose(np.diag(cka), 1.0) and np.allclose(cka, cka.T)
    assert sorted(s["measures"]) == ["cka", "cknna", "mknn"]


def _emb(path, feats, ids, labels):
    from featviz.io.artifacts import Embeddings

    Embeddings(feats, labels, [str(i) for i in range(3)], np.array(ids)).save(path)
    return path


def test_npz_form_reorders_by_ids_and_refuses_other_images(cli, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 12)).astype(np.float32)
    labels = np.repeat([0, 1, 2], 30)
    x[np.arange(90), labels] += 5.0  # one direction per class: cosine k-NN separates them
    ids = [f"img{i}.png" for i in range(90)]
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    perm = rng.permutation(90)
    a = _emb(tmp_path / "a.npz", x, ids, labels)
    b = _emb(tmp_path / "b.npz", (2.0 * x @ q)[perm], [ids[i] for i in perm], labels[perm])
    s = _json(cli("compare", a, b, "-o", tmp_path / "ab", "--measure", "cka,mknn,svcca", "--json"))
    assert s["rows"] == ["a", "b"]
    m = s["measures"]
    assert m["cka"][0][1] == pytest.approx(1.0, abs=1e-5)  # the same features up to rotation and scale
    assert m["mknn"][0][1] == pytest.approx(1.0, abs=1e-6)
    assert m["svcca"][0][1] == pytest.approx(1.0, abs=1e-5)
    assert s["knn"][0]["layers"] == ["a", "b"] and s["knn"][0]["top1"][0] > 0.9
    c = _emb(tmp_path / "c.npz", x[:80], ids[:80], labels[:80])
    res = cli("compare", a, c, "-o", tmp_path / "ac")
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "hold different images" in lines[0] and "90 vs 80 rows" in lines[0]
    assert not (tmp_path / "ac").exists()


def test_measure_names_follow_the_one_name_list_rule():
    from featviz.compare.run import MEASURES, parse_measures

    assert parse_measures("cka mknn, CKA") == ("cka", "mknn") and parse_measures("all") == MEASURES
    with pytest.raises(OptionError, match=r"--measure: unknown measure 'ckaa' \(did you mean: cka"):
        parse_measures("cka,ckaa")  # a usage error (exit 2), with suggestions
    with pytest.raises(OptionError, match="names no measure"):
        parse_measures(",")


def test_bad_inputs_are_one_line(cli, tmp_path, sample_dir):
    res = cli("compare", "--images", "digits", "-o", tmp_path / "x")
    assert res.exit_code == 1 and "--arch for a randomly initialised model" in res.stderr
    res = cli(
        "compare", "--arch", "resnet18_w16-cifar", "--images", "digits", "--measure", "cka,nope", "-o", tmp_path / "x"
    )
    assert res.exit_code == 2 and "cka, mknn, cknna, svcca" in res.stderr  # a usage error
    res = cli("compare", "-c", "random", "--images", "digits", "-o", tmp_path / "x")
    assert res.exit_code == 1 and "random:ARCH" in res.stderr
    res = cli(
        "compare", "--arch", "resnet18_w16-cifar", "--images", "digits", "--layers", "layer9", "-o", tmp_path / "x"
    )
    assert res.exit_code == 1 and "no layer 'layer9'" in res.stderr
    assert not (tmp_path / "x").exists()
    for opt in ("--layers", "--layers-b"):  # the one layer-list rule (registry.parse_layers): a usage error
        res = cli("compare", "--arch", "resnet18_w16-cifar", "--images", "digits", opt, ",", "-o", tmp_path / "x")
        assert res.exit_code == 2 and f"{opt} ',' names no layer; expected 'auto'" in res.stderr
    assert not (tmp_path / "x").exists()


def test_stream_keeps_every_image_and_leaves_a_short_last_minibatch_out_of_cka(one_thread):
    from PIL import Image

    from featviz.compare.stream import Side, stream_layers
    from featviz.data.images import LabelledImages
    from featviz.models.architectures import build_backbone

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(10)]
    src = LabelledImages(imgs, np.full(10, -1), [], [f"im{i}" for i in range(10)])
    side = Side("m", build_backbone("resnet18_w16-cifar", seed=0), ["layer2.1", "layer4.1"])
    st = stream_layers([side], src, hw=(16, 16), center_crop=None, batch_size=4, batches=None, seed=1, device="cpu")
    assert st.ids == [f"im{i}" for i in range(10)] and [p.shape for p in st.pooled[0]] == [(10, 32), (10, 128)]
    assert (st.cka.batches, st.cka.rows, st.cka.skipped_batches) == (2, 8, 1)
    with torch.inference_mode():  # the pooled rows are each image's own, in input order
        from featviz.data.images import eval_transform, normalization_of

        tf = eval_transform((16, 16), *normalization_of(side.model))
        want = side.model.layer4(
            side.model.layer3(
                side.model.layer2(
                    side.model.layer1(side.model.relu(side.model.bn1(side.model.conv1(tf(imgs[7])[None]))))
                )
            )
        )
    assert np.allclose(st.pooled[0][1][7], want.mean(dim=(2, 3))[0].numpy(), atol=1e-5)


def test_files_without_labels_have_no_knn_curve(tmp_path):
    from featviz.compare.run import run_compare_files

    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6))
    a = _emb(tmp_path / "a.npz", x, [str(i) for i in range(40)], np.full(40, -1))
    b = _emb(tmp_path / "b.npz", x[:, :3], [str(i) for i in range(40)], np.full(40, -1))
    r = run_compare_files([a, b], tmp_path / "o", names=["a", "b"], measures="cka", k=5)
    assert r.knn is None and r.protocol["knn_accuracy"] is None
    assert r.matrices["cka"][0, 1] == pytest.approx(M.cka(x, x[:, :3]), abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        ".featviz-output.json",
        "compare.json",
        "compare.npz",
        "compare.png",
        "manifest.json",
    ]


def test_two_random_inits_differ_and_say_their_seeds():
    from featviz.compare.stream import load_sides

    a, b = load_sides(["random:resnet18_w16-cifar", "random"], layers="layer4[-1]", seed=3)
    assert (a.name, b.name) == ("resnet18_w16-cifar (random init)", "resnet18_w16-cifar (random init, seed 4)")
    assert (a.description["seed"], b.description["seed"]) == (3, 4) and a.layers == b.layers == ["layer4.1"]
    assert not torch.equal(a.model.conv1.weight, b.model.conv1.weight)


def test_cmap_colours_the_png_and_the_page_alike(cli, tmp_path):
    from featviz.compare.plots import palette256

    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    ids = [f"i{i}.png" for i in range(40)]
    a = _emb(tmp_path / "a.npz", x, ids, np.full(40, -1))
    b = _emb(tmp_path / "b.npz", x[:, :4], ids, np.full(40, -1))
    for cmap in ("viridis", None):
        r = cli("compare", a, b, "-o", tmp_path / str(cmap), "--measure", "cka", "--html",
                *(["--cmap", cmap] if cmap else []))
        assert r.exit_code == 0, r.output
    page = (tmp_path / "viridis" / "compare.html").read_text()
    assert palette256("viridis")[0] in page and palette256("magma")[0] not in page
    assert palette256("magma")[0] in (tmp_path / "None" / "compare.html").read_text()
    from PIL import Image

    v = np.asarray(Image.open(tmp_path / "viridis" / "compare.png").convert("RGB"), np.int64)
    d = np.asarray(Image.open(tmp_path / "None" / "compare.png").convert("RGB"), np.int64)
    assert v.shape == d.shape and np.abs(v - d).mean() > 1  # other cells, other colour bar
    assert json.loads((tmp_path / "viridis" / "manifest.json").read_text())["arguments"]["cmap"] == "viridis"
    r = cli("compare", a, b, "-o", tmp_path / "x", "--cmap", "viridiss")
    assert r.exit_code != 0 and "did you mean: viridis" in r.output and not (tmp_path / "x").exists()
