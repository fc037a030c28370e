"""Checkpoints of the three-dict layout (format 1) still load, sample and resume:
tests/fixtures/text-model-bc9cbb7.pth is one (see tests/fixtures/README.md)."""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image

import config
from core import spec
from config import parse_args
from ddpm import Program, main

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "text-model-bc9cbb7.pth")


def test_the_old_checkpoint_is_read_as_one_config_dict():
    old = torch.load(FIXTURE, weights_only=True)
    assert old["format"] == 1 and "config" not in old  # really the old layout
    cfg = spec.stored_dict(old)
    assert set(cfg) == set(config.stored_keys())
    assert cfg["img_size"] == 8 and cfg["num_channels"] == 4 and cfg["captions"] == "files"
    assert cfg["schedule"] == "linear" and cfg["super_res"] == 0


def test_the_old_checkpoint_alone_rebuilds_the_model_and_its_vocabulary(tmp_path):
    old = torch.load(FIXTURE, weights_only=True)
    args, typed = parse_args(["--loadckpt", FIXTURE, "--save-dir", str(tmp_path)])
    prog = Program(args, typed)
    assert prog.cfg.model.img_size == 8 and prog.vocab.itos[2:] == old["text"]["words"]
    for k, v in old["ema"].items():  # every weight loaded strictly, none left at its init
        assert torch.equal(prog.trainer.ema.state_dict()[k], v), k
    written = json.load(open(tmp_path / "config.json"))["model"]  # every setting, by part
    assert written["img_size"] == 8 and written["captions"] == "files"


def test_the_old_checkpoint_samples_with_prompts_and_every_sampler(tmp_path):
    for sampler, steps in (("ddpm", []), ("ddim", ["--sample-steps", "3"]),
                           ("dpm++", ["--sample-steps", "3"])):
        out = tmp_path / sampler
        assert main(["--loadckpt", FIXTURE, "--sampler", sampler, *steps, "--batch-size", "4",
                     "--seed", "0", "--save-dir", str(out)]) == 0
        grid = np.asarray(Image.open(out / "ddpm-all.png"))
        assert grid.shape == (2 * 9 + 1, 2 * 9 + 1, 3) and grid.std() > 1
    assert main(["--loadckpt", FIXTURE, "--prompt", "red hair", "--guidance-scale", "2",
                 "--batch-size", "2", "--sampler", "ddim", "--sample-steps", "2",
                 "--save-dir", str(tmp_path / "p")]) == 0
    assert os.path.isfile(tmp_path / "p" / "prompt-red-hair-w2.png")


def test_the_old_checkpoint_resumes_training_and_is_saved_in_the_new_layout(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(faces / f"{i}.png")
    (faces / "captions.csv").write_text("file,caption\n" + "".join(
        f"{i}.png,{['red', 'blue'][i % 2]} hair\n" for i in range(8)))
    shutil.copy(FIXTURE, tmp_path / "old.pth")
    assert main(["--train", "--data-folders", str(faces), "--loadckpt", str(tmp_path / "old.pth"),
                 "--epochs", "1", "--batch-size", "4", "--ckpt-save-dir", str(tmp_path / "ckpt"),
                 "--save-dir", str(tmp_path / "out")]) == 0
    old = torch.load(FIXTURE, weights_only=True)
    new = torch.load(tmp_path / "ckpt" / "ckpt-1.pth", weights_only=True)
    assert new["format"] == 2 and new["schema"] == spec.SCHEMA and new["config"] == spec.stored_dict(old)
    assert new["step"] == old["step"] + 2 and new["epoch"] == old["epoch"] + 1
    assert new["text"] == old["text"]
