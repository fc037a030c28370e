"""Editing with a trained model: image-to-image (SDEdit), inpainting (RePaint), interpolation
(DDIM inversion + slerp), and the one-line errors of their flags."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import main
from core.diffusion import GaussianDiffusion, slerp

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "text-model-bc9cbb7.pth")  # 8 px, 3 channels, T = 10


def pictures(folder, n=4, size=8, seed=0):
    """n random size x size RGB pictures in folder, named 0.png ..; -> uint8 (n, H, W, 3)."""
    os.makedirs(folder, exist_ok=True)
    arrs = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i, arr in enumerate(arrs):
        Image.fromarray(arr).save(os.path.join(folder, f"{i}.png"))
    return arrs


def png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def run(tmp_path, *flags):
    return main(["--loadckpt", FIXTURE, "--batch-size", "4", "--seed", "0",
                 "--save-dir", str(tmp_path / "out"), *flags])


def test_img2img_at_low_strength_returns_the_input_to_quantisation(tmp_path):
    arrs = pictures(tmp_path / "in")
    for sampler in ("ddpm", "ddim"):
        assert run(tmp_path, "--init-folder", str(tmp_path / "in"), "--strength", "0.1",
                   "--sampler", sampler) == 0  # t = 1 of 10: noise of std sqrt(beta_1) = 0.01
        for i, arr in enumerate(arrs):
            # What is left is sqrt(beta_1) (eps - eps_hat) = 0.01 x (about N(0, 2) for this
            # untrained net) = 1.8 levels of 255 rms: a few levels at most over 192 values.
            diff = np.abs(png(tmp_path / "out" / f"edit-{i}.png") - arr)
            assert diff.max() <= 7 and diff.mean() < 2, (sampler, i)
    assert run(tmp_path, "--init-folder", str(tmp_path / "in"), "--strength", "0.7") == 0
    assert np.abs(png(tmp_path / "out" / "edit-0.png") - arrs[0]).mean() > 10  # a real change
    grid = png(tmp_path / "out" / "edit-all.png")
    assert grid.shape == (9 + 1, 8 * 9 + 1, 3)  # 4 pairs: input | result, 8 a row


def test_img2img_at_strength_one_is_ordinary_sampling_from_the_same_seed(tmp_path):
    pictures(tmp_path / "in")
    assert run(tmp_path, "--init-folder", str(tmp_path / "in"), "--strength", "1",
               "--sampler", "ddim", "--sample-steps", "5") == 0
    edits = [png(tmp_path / "out" / f"edit-{i}.png") for i in range(4)]
    assert run(tmp_path, "--sampler", "ddim", "--sample-steps", "5") == 0
    drawn = [png(tmp_path / "out" / f"ddpm-{i}.png") for i in range(4)]
    assert all(np.array_equal(e, d) for e, d in zip(edits, drawn))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_inpainting_keeps_the_known_region_and_fills_the_box(tmp_path, sampler):
    arrs = pictures(tmp_path / "in")
    assert run(tmp_path, "--init-folder", str(tmp_path / "in"), "--mask-box", "2", "1", "6", "5",
               "--sampler", sampler, "--resample", "2") == 0
    for i, arr in enumerate(arrs):
        out = png(tmp_path / "out" / f"inpaint-{i}.png")
        hole = np.zeros((8, 8), bool)
        hole[1:5, 2:6] = True
        assert np.abs(out[~hole] - arr[~hole]).max() <= 1  # rounding of x0 -> [-1, 1] -> uint8
        assert np.abs(out[hole] - arr[hole]).mean() > 10


def test_inpainting_reads_a_mask_per_image_by_name(tmp_path):
    arrs = pictures(tmp_path / "in", n=2)
    (tmp_path / "masks").mkdir()
    for i in range(2):
        m = np.full((8, 8), 255, np.uint8)
        m[:, :4] = 0  # fill the left half
        Image.fromarray(m).save(tmp_path / "masks" / f"{i}.png")
    assert run(tmp_path, "--init-folder", str(tmp_path / "in"), "--mask-folder",
               str(tmp_path / "masks"), "--sampler", "ddim", "--sample-steps", "4") == 0
    out = png(tmp_path / "out" / "inpaint-1.png")
    assert np.abs(out[:, 4:] - arrs[1][:, 4:]).max() <= 1
    assert os.path.isfile(tmp_path / "out" / "inpaint-all.png")


def gaussian_exact(d, c=0.5):
    """The exact eps of data x0 ~ N(0, c^2): its probability-flow ODE is linear."""
    class Exact(torch.nn.Module):
        def forward(self, xt, t):
            ab = d.ab64[t].double()[:, None, None, None]
            x0_hat = ab.sqrt() * c**2 / (ab * c**2 + 1 - ab) * xt.double()
            return ((xt.double() - ab.sqrt() * x0_hat) / (1 - ab).sqrt()).float()
    return Exact()


def test_ddim_inversion_then_decoding_reconstructs_the_image_better_with_more_steps():
    d = GaussianDiffusion(1000, prediction="eps")
    model = gaussian_exact(d)
    x0 = torch.tensor([0.3, -0.2, 0.45, -0.5]).reshape(4, 1, 1, 1)
    err = {}
    for n in (10, 20, 50, 100):
        x_T = d.invert(model, x0, n)
        back, _ = d.sample(model, x_T, "ddim", n, clip_x0=False)
        err[n] = (back - x0).abs().max().item()
    assert err[100] < err[50] < err[20] < err[10] and err[100] < 0.05
    x_T = d.invert(model, x0, 100)  # the exact ODE maps x0 to x0 sqrt(ab_T + (1 - ab_T) / c^2)
    assert torch.allclose(x_T, x0 * math.sqrt(d.ab64[-1] + (1 - d.ab64[-1]) / 0.25), rtol=0.05)


def test_slerp_ends_are_exact_and_midpoints_keep_the_noise_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    for w in (0.25, 0.5, 0.75):
        mid = slerp(a, b, w)
        assert abs(mid.norm() / ((a.norm() + b.norm()) / 2) - 1) < 0.02
        assert ((1 - w) * a + w * b).norm() < 0.9 * mid.norm()  # the straight line shrinks it
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: the straight line


def test_interpolation_strips_from_two_images_and_from_two_seeds(tmp_path):
    pictures(tmp_path / "in", n=2)
    assert run(tmp_path, "--interpolate", str(tmp_path / "in" / "0.png"),
               str(tmp_path / "in" / "1.png"), "--frames", "5", "--sampler", "ddim",
               "--sample-steps", "5") == 0
    assert png(tmp_path / "out" / "interpolation.png").shape == (10, 5 * 9 + 1, 3)
    assert run(tmp_path, "--interpolate-seeds", "1", "2", "--frames", "3") == 0
    strip = png(tmp_path / "out" / "interpolation.png")
    assert strip.shape == (10, 3 * 9 + 1, 3) and strip.std() > 1


@pytest.mark.parametrize("flags,message", [
    (["--init-folder", "in", "--strength", "0"], "--strength must be in (0, 1]"),
    (["--init-folder", "in", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--init-folder", "in", "--mask-folder", "masks"], "no mask for 1 in masks"),
    (["--init-folder", "in", "--mask-folder", "bigmasks"], "is 16 x 16; the model draws 8 x 8"),
    (["--mask-box", "0", "0", "4", "4"], "give --init-folder DIR"),
    (["--init-folder", "in", "--mask-box", "0", "0", "9", "4"], "must lie within the 8 x 8"),
    (["--init-folder", "in", "--mask-box", "0", "0", "4", "4", "--sampler", "dpm++"],
     "inpainting takes --sampler ddpm or ddim"),
    (["--interpolate", "in/0.png", "missing.png"], "--interpolate missing.png: no such file"),
])
def test_bad_editing_flags_are_one_line_errors(tmp_path, monkeypatch, capsys, flags, message):
    pictures(tmp_path / "in", n=2)
    os.makedirs(tmp_path / "masks")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "masks" / "0.png")
    os.makedirs(tmp_path / "bigmasks")
    for i in range(2):
        Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "bigmasks" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert main(["--loadckpt", FIXTURE, "--save-dir", "out", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_editing_flags_on_a_super_resolution_checkpoint_are_one_line_errors(tmp_path, capsys):
    assert main(["--train", "--demo", "--demo-images", "8", "--img-size", "8", "--super-res", "4",
                 "--num-channels", "4", "--channel-multiples", "1", "--has-attn", "f",
                 "--timesteps", "10", "--beta-max", "0.5", "--batch-size", "4", "--epochs", "1",
                 "--ckpt-save-dir", str(tmp_path), "--save-dir", str(tmp_path)]) == 0
    pictures(tmp_path / "in", n=1)
    capsys.readouterr()
    for flags in (["--init-folder", str(tmp_path / "in")], ["--interpolate-seeds", "1", "2"]):
        assert main(["--loadckpt", str(tmp_path / "ckpt-0.pth"), *flags]) == 2
        err = capsys.readouterr().err
        assert "super-resolution model" in err and len(err.strip().splitlines()) == 1
