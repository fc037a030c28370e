"""Hostile input gives one line and exit code 2, never a traceback or a silently wrong run:
flags out of range, captions in any language or a damaged captions.csv, EXIF-rotated photos,
crafted checkpoints and exports, missing folders."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
from config import UserError, parse_args, stored_config
from ddpm import main
from text import CaptionError, Vocab, read_captions, words

TINY = ["--img-size", "8", "--num-channels", "8", "--channel-multiples", "1", "--has-attn", "f",
        "--num-blocks", "1", "--timesteps", "10", "--batch-size", "4", "--device", "cpu",
        "--seed", "0"]


def one_line_error(capsys, argv) -> str:
    """main(argv) must stop with exit code 2 and a single line on stderr; that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (code, err)
    return err


@pytest.mark.parametrize("flags, says", [
    (["--grad-clip", "0"], "--grad-clip"),  # clip_grad_norm_ to 0 zeroes every gradient
    (["--grad-clip", "-1"], "--grad-clip"),  # a negative norm flips the gradient's sign
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--eta", "nan"], "--eta"),
    (["--eta", "-1"], "--eta"),
    (["--eta", "1.5"], "--eta"),
    (["--min-snr-gamma", "-5"], "--min-snr-gamma"),
    (["--min-snr-gamma", "nan"], "--min-snr-gamma"),
    (["--guidance-scale", "2", "-1"], "--guidance-scale"),
    (["--guidance-scale", "inf"], "--guidance-scale"),
    (["--sr-noise", "nan"], "--sr-noise"),
    (["--data-memory", "nan"], "--data-memory"),
])
def test_flags_out_of_their_range_are_one_line(tmp_path, capsys, flags, says):
    err = one_line_error(capsys, ["--train", "--demo", "--demo-images", "4", "--epochs", "1",
                                  *TINY, "--ckpt-save-dir", str(tmp_path / "ck"),
                                  "--save-dir", str(tmp_path / "out"), *flags])
    assert says in err
    assert not (tmp_path / "ck").exists()  # refused before anything was trained


def test_eval_fid_of_one_sample_is_refused_because_kid_needs_two():
    from config import validate
    args, _ = parse_args(["--loadckpt", "x.pth", "--eval-fid", "1", "--data-folders", "d"])
    with pytest.raises(UserError, match="--eval-fid 0 \\(off\\) or >= 2"):
        validate(args)
    args.eval_fid = 2
    validate(args)


def test_the_edges_of_the_ranges_are_accepted():
    from config import validate
    for flags in (["--eta", "0"], ["--eta", "1"], ["--grad-clip", "inf"], ["--min-snr-gamma", "0"],
                  ["--guidance-scale", "0", "7.5"], ["--lr", "1e-9"]):
        args, _ = parse_args(["--train", "--demo", *flags])
        validate(args)  # raises nothing
