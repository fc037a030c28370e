"""The real command line, end to end, on tiny generated images: train, resume, sample, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import main

DDPM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddpm.py")


@pytest.fixture(scope="module")
def trained(run_ddpm, tiny_flags, tmp_path_factory):
    """A folder of 12 tiny pictures and a 2-epoch tiny model trained on it (in ckpt/, output/)."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    (root / "faces").mkdir()
    for i in range(12):
        arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "faces" / f"{i}.png")
    r = run_ddpm(root, "--train", "--data-folders", "faces", "--epochs", "2", "--seed", "0",
                 *tiny_flags)
    assert r.returncode == 0, r.stderr
    return root, r


def test_training_writes_checkpoints_and_pictures_of_the_right_size(png_size, trained):
    root, r = trained
    assert "epoch 0: mean loss" in r.stdout and "epoch 1: mean loss" in r.stdout
    assert sorted(os.listdir(root / "ckpt")) == ["ckpt-0.pth", "ckpt-1.pth"]
    # 16-px tiles with 1-px padding: 11 columns (t = 0, 1, 3, ..., 19 / x_T, ..., x_0).
    assert png_size(root / "output" / "forward-steps.png") == (11 * 17 + 1, 4 * 17 + 1)
    for name in ("run-before.png", "run-after.png"):
        assert png_size(root / "output" / name) == (11 * 17 + 1, 8 * 17 + 1)
    records = [json.loads(line) for line in open(root / "output" / "metrics.jsonl")]
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 2), (1, 4)]
    assert all(r["loss"] > 0 and r["img_per_s"] > 0 and r["seconds"] > 0 for r in records)
    assert png_size(root / "output" / "loss.png") == (600, 350)


def test_checkpoint_describes_itself_and_loads_without_code(trained):
    root, _ = trained
    ckpt = torch.load(root / "ckpt" / "ckpt-1.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4  # 12 images / batch 8 = 2 steps per epoch
    cfg = ckpt["config"]  # one plain dict: the model, diffusion and conditioning flags
    assert cfg["num_channels"] == 8 and cfg["has_attn"] == [False, True]
    assert {k: cfg[k] for k in ("img_size", "timesteps", "beta_min", "beta_max", "schedule",
                                "prediction", "captions", "super_res")} == {
        "img_size": 16, "timesteps": 20, "beta_min": 0.005, "beta_max": 0.5, "schedule": "linear",
        "prediction": "v", "captions": "off", "super_res": 0}
    assert set(ckpt) >= {"model", "ema", "optimizer", "epoch", "step", "data_rng"}


def test_sampling_from_the_checkpoint_alone_writes_64_images_and_the_strip(
        run_ddpm, png_size, trained):
    root, _ = trained
    r = run_ddpm(root, "--loadckpt", "ckpt-1.pth", "--seed", "1")  # bare name: found in ckpt/
    assert r.returncode == 0, r.stderr
    out = root / "output"
    for i in range(64):
        assert png_size(out / f"ddpm-{i}.png") == (16, 16)
    assert png_size(out / "ddpm-all.png") == (8 * 17 + 1, 8 * 17 + 1)
    assert png_size(out / "reverse-steps.png") == (11 * 17 + 1, 8 * 17 + 1)
    first = np.asarray(Image.open(out / "ddpm-all.png"))
    assert first.std() > 1  # not a blank picture

    # The same seed gives the same samples; another seed gives others.
    assert run_ddpm(root, "--loadckpt", "ckpt-1.pth", "--seed", "1").returncode == 0
    assert np.array_equal(np.asarray(Image.open(out / "ddpm-all.png")), first)
    assert run_ddpm(root, "--loadckpt", "ckpt-1.pth", "--seed", "2").returncode == 0
    assert not np.array_equal(np.asarray(Image.open(out / "ddpm-all.png")), first)


def test_resume_continues_the_epoch_count(run_ddpm, trained):
    root, _ = trained
    r = run_ddpm(root, "--train", "--data-folders", "faces", "--loadckpt", "ckpt/ckpt-1.pth",
                 "--epochs", "1", "--batch-size", "8", "--save-dir", "out2")
    assert r.returncode == 0, r.stderr
    assert "epoch 2: mean loss" in r.stdout
    resumed = torch.load(root / "ckpt" / "ckpt-2.pth", weights_only=True)
    before = torch.load(root / "ckpt" / "ckpt-1.pth", weights_only=True)
    assert resumed["epoch"] == 3 and resumed["step"] == 6
    assert resumed["config"] == before["config"]
    adam_steps = [s["step"].item() for s in resumed["optimizer"]["state"].values()]
    assert set(adam_steps) == {6.0}  # Adam's own count went on from 4, not from 0
    # the run's learning rate goes on (its size rule's value: no --lr was typed in either run)
    assert resumed["optimizer"]["param_groups"][0]["lr"] == before["train"]["lr"] == 1e-3
    r = run_ddpm(root, "--train", "--data-folders", "faces", "--loadckpt", "ckpt/ckpt-2.pth",
                 "--epochs", "1", "--batch-size", "8", "--save-dir", "out2", "--lr", "3e-5")
    assert r.returncode == 0, r.stderr
    lowered = torch.load(root / "ckpt" / "ckpt-3.pth", weights_only=True)
    assert lowered["optimizer"]["param_groups"][0]["lr"] == 3e-5  # a new --lr takes effect


def test_a_flag_that_contradicts_the_checkpoint_is_a_one_line_error(run_ddpm, trained):
    root, _ = trained
    r = run_ddpm(root, "--loadckpt", "ckpt-1.pth", "--num-channels", "32")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --num-channels 32 contradicts the checkpoint (8); drop the flag"


@pytest.mark.parametrize("args,message", [
    (["--loadckpt", "missing.pth"], "checkpoint not found"),
    (["--train"], "--train needs --data-folders"),
    (["--train", "--demo", "--has-attn", "t"], "--has-attn needs one t/f per"),
    (["--train", "--demo", "--img-size", "18"], "must be divisible by 4"),  # the preset's 3 levels
    (["--train", "--demo", "--beta-min", "0.1", "--beta-max", "0.01"], "--beta-min < --beta-max"),
    (["--train", "--data-folders", "nowhere"], "data folder not found"),
    ([], "nothing to do"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path, monkeypatch, capsys, args,
                                                       message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2  # in-process: any exception would fail the test with its traceback
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_with_pickled_code_is_refused_without_running_it(run_ddpm, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": 1, "payload": Evil()}, tmp_path / "evil.pth")
    r = run_ddpm(tmp_path, "--loadckpt", "evil.pth")
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr
    assert not marker.exists()


def test_eval_fid_scores_samples_and_reuses_the_cached_training_features(
        run_ddpm, png_size, trained):
    root, _ = trained
    args = ["--loadckpt", "ckpt-1.pth", "--eval-fid", "10", "--data-folders", "faces",
            "--batch-size", "5", "--save-dir", "eval", "--cache-dir", "cache", "--seed", "0",
            "--sampler", "ddpm"]
    first = run_ddpm(root, *args)
    if "not installed" in first.stderr:
        pytest.skip(first.stderr)
    assert first.returncode == 0, first.stderr
    assert "cached features of 12 images" in first.stdout
    fid = float(first.stdout.split("FID ")[1].split(",")[0])
    assert fid > 0 and "10 samples (ddpm, all T steps" in first.stdout
    # nearest.png: 8 rows of 16-px tiles; each sample, a gap, then its 3 nearest training images.
    w, h = png_size(root / "eval" / "nearest.png")
    assert h == 8 * 18 + 2 and w == 18 + 2 + 4 + 3 * 18 + 2
    second = run_ddpm(root, *args)
    assert second.returncode == 0 and "cached features" not in second.stdout
    assert float(second.stdout.split("FID ")[1].split(",")[0]) == pytest.approx(fid, rel=1e-6)
    assert len([f for f in os.listdir(root / "cache") if f.startswith("ref-")]) == 1


def test_training_on_the_device_data_path_matches_the_per_image_path(tmp_path):
    from config import parse_args
    from ddpm import Program
    weights = {}
    for path in ("device", "plain"):
        flags = ["--train", "--demo", "--demo-images", "24", "--img-size", "8", "--num-channels",
                 "8", "--channel-multiples", "1", "--has-attn", "f", "--timesteps", "10",
                 "--beta-max", "0.5", "--batch-size", "8", "--epochs", "1", "--seed", "3",
                 "--data-path", path, "--ckpt-save-dir", str(tmp_path / path),
                 "--save-dir", str(tmp_path / path)]
        Program(*parse_args(flags)).run()
        weights[path] = torch.load(tmp_path / path / "ckpt-0.pth", weights_only=True)["model"]
        losses = [json.loads(line)["loss"] for line in open(tmp_path / path / "metrics.jsonl")]
        weights[path + " loss"] = losses
    assert weights["device loss"] == weights["plain loss"]
    assert all(torch.equal(weights["device"][k], weights["plain"][k]) for k in weights["device"])


@pytest.mark.parametrize("args,message", [
    (["--train", "--demo", "--num-channels", "0"], "--num-channels must be positive"),
    (["--train", "--demo", "--batch-size", "-4"], "--batch-size must be positive"),
    (["--train", "--demo", "--channel-multiples", "1", "0"], "--channel-multiples must be positive"),
    (["--train", "--demo", "--beta-min", "0", "--beta-max", "0.02"], "0 < --beta-min"),
    (["--train", "--demo", "--beta-max", "1.5"], "--beta-max < 1"),
    (["--train", "--demo", "--device", "tpu"], "--device"),
    (["--train", "--demo", "--device", "cuda:7"], "--device cuda:7"),
    (["--train", "--demo", "--save-dir", "afile/sub"], "cannot create folder afile/sub"),
    (["--train", "--data-folders", "emptydir"], "no image files"),
    (["--loadckpt", "afile"], "cannot read checkpoint"),
    (["--loadckpt", "old.pth"], "not a ddpm.py checkpoint"),
    (["--loadckpt", "truncated.pth"], "cannot read checkpoint"),
    (["--loadckpt", "otherarch.pth"], "does not fit this program"),
    (["--loadckpt", "ckpt.pth", "--sampler", "ddpm", "--sample-steps", "10"], "always takes all T"),
])
def test_bad_flags_files_and_checkpoints_are_one_line_errors(tmp_path, monkeypatch, capsys,
                                                            args, message):
    (tmp_path / "afile").write_text("not a folder, not a checkpoint")
    (tmp_path / "emptydir").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "old.pth")  # a weights-only file of another tool
    good = {"format": 1, "model_config": {"img_channels": 3, "num_channels": 8,
                                          "channel_multiples": [1], "has_attn": [False],
                                          "num_blocks": 1, "dropout": 0.0},
            "diffusion_config": {"img_size": 8, "timesteps": 10, "beta_min": 0.01,
                                 "beta_max": 0.5}, "epoch": 1, "step": 1,
            "model": {"conv_in.weight": torch.zeros(3, 3, 3, 3)}, "optimizer": {}}
    torch.save(good, tmp_path / "otherarch.pth")
    torch.save(good, tmp_path / "ckpt.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "otherarch.pth").read_bytes()[:200])
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_eval_every_adds_fid_to_the_metrics_and_keeps_the_best_checkpoint(
        run_ddpm, png_size, trained, tmp_path):
    evaluate = pytest.importorskip("features.evaluate")
    try:
        evaluate.inception_path()
    except evaluate.MissingNetwork as e:
        pytest.skip(str(e))
    root, _ = trained
    held = tmp_path / "held"  # 7 other pictures: FID/KID against these, the copy rate against the 12
    held.mkdir()
    rng = np.random.default_rng(1)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(held / f"{i}.png")
    r = run_ddpm(root, "--train", "--data-folders", "faces", "--loadckpt", "ckpt/ckpt-1.pth",
                 "--epochs", "1", "--batch-size", "8", "--eval-every", "1", "--eval-samples", "10",
                 "--eval-folders", str(held), "--cache-dir", "cache", "--ckpt-save-dir",
                 str(tmp_path), "--save-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "vs 7 held-out images" in r.stdout
    record = json.loads(open(tmp_path / "metrics.jsonl").readlines()[-1])
    assert record["fid"] > 0 and "kid" in record and "kid_std" in record
    assert 0 <= record["copy_rate"] <= 1 and record["copy_alarm"] == evaluate.copy_alarm(10, 12)
    assert png_size(tmp_path / "loss.png") == (600, 550)  # the copy rate under the loss
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["best_fid"] == pytest.approx(record["fid"]) and best["epoch"] == 3


def test_eval_bpd_prints_the_bound_in_bits_per_dim(run_ddpm, trained):
    root, _ = trained
    r = run_ddpm(root, "--loadckpt", "ckpt-1.pth", "--eval-bpd", "5", "--data-folders", "faces",
                 "--batch-size", "4", "--save-dir", "bpd")
    assert r.returncode == 0, r.stderr
    line = r.stdout[r.stdout.index("bits/dim"):].replace("\n", " ")
    total = float(line.split()[1])
    parts = [float(line.split(k)[1].split()[0].rstrip(",")) for k in ("L_T", "terms", "L_0")]
    assert "on 5 training images" in line and total > 0
    assert total == pytest.approx(sum(parts), rel=1e-2)


FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "text-model-bc9cbb7.pth")


def test_eval_fid_without_the_fid_network_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from features import evaluate

    def missing():
        raise evaluate.MissingNetwork(f"the FID Inception network is not installed; run: "
                                      f"{evaluate.INSTALL}")

    monkeypatch.setattr(evaluate, "inception_path", missing)
    (tmp_path / "faces").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "faces" / f"{i}.png")
    code = main(["--loadckpt", FIXTURE, "--eval-fid", "4", "--data-folders",
                 str(tmp_path / "faces"), "--save-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: the FID Inception network is not installed")
    assert len(err.strip().splitlines()) == 1


def test_output_lines_are_never_wrapped_when_stdout_is_not_a_terminal(tmp_path):
    out = tmp_path / ("a-folder-name-long-enough-to-pass-any-console-width-" * 3)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    r = subprocess.run([sys.executable, DDPM, "--loadckpt", FIXTURE, "--sampler", "ddim",
                        "--sample-steps", "2", "--batch-size", "2", "--save-dir", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(str(out)) > 150  # longer than rich's 80-column default, whatever tmp_path is
    assert f"wrote 2 samples to {out}/ddpm-*.png, ddpm-all.png and reverse-steps.png" in r.stdout


def test_the_start_up_summary_tells_the_checkpoints_model_not_the_flag_defaults(run_ddpm, tmp_path):
    r = run_ddpm(tmp_path, "--loadckpt", FIXTURE, "--sampler", "ddim", "--sample-steps", "2",
                 "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[:3]
    assert first[0].startswith(f"loaded {FIXTURE} (epoch 1, step 2)")
    assert first[1].startswith("model: text-conditioned, 0.") and ", 8 px, 3 channel(s), T = 10" \
        in first[1]
    assert first[2].startswith("sampling with ddim, 2 uniform-spaced steps, eta 0.0, EMA weights; "
                               "cpu, fp32; outputs in output/")
    assert "img_size=64" not in r.stdout and "captions=off" not in r.stdout
    written = json.load(open(tmp_path / "output" / "config.json"))
    model, sample = written["model"], written["sample"]  # every setting, by part
    assert (model["img_size"], model["captions"], model["num_channels"]) == (8, "files", 4)
    assert sample["sampler"] == "ddim" and sample["loadckpt"] == FIXTURE


def test_heun_with_karras_spacing_samples_from_the_cli_and_says_its_network_calls(
        run_ddpm, tmp_path):
    r = run_ddpm(tmp_path, "--loadckpt", FIXTURE, "--sampler", "heun", "--sample-steps", "4",
                 "--spacing", "karras", "--batch-size", "4", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert "sampling with heun, 4 karras-spaced steps (7 network calls), EMA weights" in r.stdout
    grid = np.asarray(Image.open(tmp_path / "output" / "ddpm-all.png"))
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1, 3) and grid.std() > 1
    r = run_ddpm(tmp_path, "--loadckpt", FIXTURE, "--spacing", "karras")  # ddpm takes all T steps
    assert r.returncode == 2 and "always takes all T steps" in r.stderr
