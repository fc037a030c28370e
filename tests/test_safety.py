"""Hostile input gives one line and exit code 2, never a traceback or a silently wrong run:
flags out of range, captions in any language or a damaged captions.csv, EXIF-rotated photos,
crafted checkpoints and exports, missing folders."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from config import parse_args
from core import spec
from ui import UserError
from data import load_image
from ddpm import main
from features.text import CaptionError, Vocab, read_captions, words

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
    from validation import validate
    argv = ["--loadckpt", "x.pth", "--data-folders", "d", "--eval-fid"]
    with pytest.raises(UserError, match="--eval-fid 0 \\(off\\) or >= 2"):
        validate(parse_args(argv + ["1"])[0])
    validate(parse_args(argv + ["2"])[0])


def test_the_edges_of_the_ranges_are_accepted():
    from validation import validate
    for flags in (["--eta", "0"], ["--eta", "1"], ["--grad-clip", "inf"], ["--min-snr-gamma", "0"],
                  ["--guidance-scale", "0", "7.5"], ["--lr", "1e-9"]):
        args, _ = parse_args(["--train", "--demo", *flags])
        validate(args)  # raises nothing


def test_caption_words_are_unicode_words_in_any_script_casefolded():
    assert words("Rød hår, BLÅ øyne") == ["rød", "hår", "blå", "øyne"]  # not 'r', 'd', 'h', 'r'
    assert words("Красные волосы, синие глаза") == ["красные", "волосы", "синие", "глаза"]
    assert words("青い髪、赤い目") == ["青い髪", "赤い目"]  # no spaces: split at punctuation
    assert words("Straße") == words("STRASSE") == ["strasse"]  # casefolded, not just lowered
    assert words("re\u0301sume\u0301") == words("r\u00e9sum\u00e9") == ["r\u00e9sum\u00e9"]  # NFC
    assert words("हिन्दी") == ["हिन्दी"]  # vowel signs are combining marks: one word
    # ASCII captions give the words they always did (old vocabularies still encode them).
    assert words("Blue-haired girl's eyes: red_2!") == ["blue-haired", "girl's", "eyes", "red", "2"]
    vocab = Vocab.build(["Красные волосы", "синие глаза"])
    assert vocab.itos[2:] == ["волосы", "глаза", "красные", "синие"]
    assert vocab.encode("СИНИЕ волосы")[:2] == [vocab.stoi["синие"], vocab.stoi["волосы"]]


def make_captioned(folder, captions: list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, caption in enumerate(captions):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption, encoding="utf-8")
        paths.append(str(folder / f"{i}.png"))
    return paths


def test_captions_without_a_single_word_stop_the_run_in_one_line(tmp_path, capsys):
    with pytest.raises(CaptionError, match="none of the 2 captions holds a word"):
        Vocab.build(["!!!", "?? --"])
    make_captioned(tmp_path / "d", ["!!!", "...", "?!"])
    err = one_line_error(capsys, ["--train", "--data-folders", str(tmp_path / "d"), "--captions",
                                  "files", "--epochs", "1", *TINY, "--cache-dir",
                                  str(tmp_path / "c"), "--ckpt-save-dir", str(tmp_path / "ck"),
                                  "--save-dir", str(tmp_path / "out")])
    assert "nothing to condition on" in err
    assert not list((tmp_path / "ck").glob("*.pth"))


def captions_csv(tmp_path, text: str, encoding="utf-8") -> list[str]:
    """read_captions of images 0.png, 1.png, 2.png beside a captions.csv holding `text`."""
    paths = make_captioned(tmp_path / "d", ["", "", ""])
    for i in range(3):
        os.remove(tmp_path / "d" / f"{i}.txt")
    (tmp_path / "d" / "captions.csv").write_bytes(text.encode(encoding))
    return read_captions(paths, [str(tmp_path / "d")], "files")


def test_a_captions_csv_saved_with_a_byte_order_mark_is_read(tmp_path):
    text = 'file,caption\r\n0.png,"red hair, blue eyes"\r\n1.png,green\r\n'
    assert captions_csv(tmp_path, text, "utf-8-sig") == ["red hair, blue eyes", "green", ""]


@pytest.mark.parametrize("text, says", [
    ("file,caption\n0.png,red\n1.png\n", r"line 3: expected file,caption, got '1.png,'"),
    ('file,caption\n0.png,"red hair\n1.png,blue\n2.png,green\n', r"line 2: the row runs on to "
                                                                 r"line 4; close its quote"),
    ("file,caption\n0.png,red hair, blue eyes\n", r"line 2: .*quote a caption that holds commas"),
    ("name,text\n0.png,red\n", r"expected a header 'file,caption', got 'name,text'"),
    ("file,caption\n0.png,r\xe9d\n", r"not a UTF-8 csv"),
])
def test_a_damaged_captions_csv_is_refused_naming_its_line(tmp_path, text, says):
    with pytest.raises(CaptionError, match=says):
        captions_csv(tmp_path, text, "latin-1")


@pytest.mark.parametrize("tag, top", [(6, "red"), (8, "blue"), (1, None)])
def test_a_photo_is_turned_upright_as_its_exif_orientation_says(tmp_path, tag, top):
    stored = np.zeros((16, 32, 3), np.uint8)  # as the phone stored it: red left, blue right
    stored[:, :16, 0], stored[:, 16:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = tag  # 6: turn 90 degrees clockwise to show; 8: anticlockwise
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    x = load_image(str(tmp_path / "phone.jpg"), (32, 16), 3, keep_small=True).astype(int)
    if top is None:  # upright already: covered and centre-cropped as stored
        assert x[0, :, :8].mean() > 200 and x[2, :, 8:].mean() > 200
        return
    red, blue = (x[0], x[2]) if top == "red" else (x[2], x[0])
    assert red[:14].mean() > 240 and red[18:].mean() < 15  # that half on top, the other below
    assert blue[:14].mean() < 15 and blue[18:].mean() > 240


FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "text-model-bc9cbb7.pth")


def crafted(tmp_path, change) -> str:
    """The fixture checkpoint in the current layout (format 2, one config dict), changed by
    change(ckpt), saved as crafted.pth."""
    ckpt = torch.load(FIXTURE, weights_only=True)
    ckpt["config"] = spec.stored_dict(ckpt)
    for k in ("model_config", "diffusion_config", "cond_config"):
        ckpt.pop(k, None)
    ckpt["format"] = 2
    change(ckpt)
    torch.save(ckpt, tmp_path / "crafted.pth")
    return str(tmp_path / "crafted.pth")


@pytest.mark.parametrize("change, says", [
    (lambda c: c.pop("config"), "no model config"),
    (lambda c: c["config"].pop("timesteps"), "lacks 'timesteps'"),
    (lambda c: c.pop("step"), "no step count"),
    (lambda c: c.update(model=[1, 2]), "model weights are not a dict of tensors"),
    (lambda c: c["config"].update(num_channels=8), "does not fit this program"),
    (lambda c: c["ema"].pop("conv_in.weight"), "does not fit this program"),
])
def test_a_crafted_checkpoint_is_one_line_for_info_and_loading(tmp_path, capsys, change, says):
    path = crafted(tmp_path, change)
    assert says in one_line_error(capsys, ["--info", path])
    assert says in one_line_error(capsys, ["--loadckpt", path, "--save-dir", str(tmp_path / "o")])


def test_info_names_the_weights_that_do_not_fit_the_config(tmp_path, capsys):
    lost = crafted(tmp_path, lambda c: c["ema"].pop("conv_in.weight"))
    assert ("its ema weights are not the UNet its config describes (1 missing, e.g. "
            "conv_in.weight)") in one_line_error(capsys, ["--info", lost])
    wider = crafted(tmp_path, lambda c: c["config"].update(num_channels=8))  # the weights have 4
    assert ("its model weights are not the UNet its config describes (conv_in.bias is 4, the "
            "config builds 8)") in one_line_error(capsys, ["--info", wider])


def test_the_crafted_checkpoint_helper_keeps_a_good_one_good(tmp_path, capsys):
    assert main(["--info", crafted(tmp_path, lambda c: None)]) == 0
    assert "text-conditioned ddpm.py model" in capsys.readouterr().out


def export_with(tmp_path, metadata_change) -> str:
    """The fixture exported, then its safetensors metadata changed by metadata_change(meta)."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    good = str(tmp_path / "good.safetensors")
    assert main(["--loadckpt", FIXTURE, "--export", good]) == 0
    with safe_open(good, framework="pt") as f:
        meta = f.metadata()
    metadata_change(meta)
    save_file(load_file(good), tmp_path / "bad.safetensors", metadata=meta)
    return str(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("change, says", [
    (lambda m: m.pop("config"), "its metadata is damaged"),
    (lambda m: m.update(config="{not json"), "its metadata is damaged"),
    (lambda m: m.update(config="[1, 2]"), "holds no model config"),
    (lambda m: m.update(step="many"), "its metadata is damaged"),
    (lambda m: m.update(config=json.dumps({**json.loads(m["config"]), "num_channels": 8})),
     "does not fit this program"),
    (lambda m: m.update(text="null"), "does not fit this program"),  # the vocabulary lost
])
def test_an_export_with_damaged_or_unfitting_metadata_is_one_line(tmp_path, capsys, change, says):
    path = export_with(tmp_path, change)
    capsys.readouterr()
    assert says in one_line_error(capsys, ["--info", path])
    assert says in one_line_error(capsys, ["--loadckpt", path, "--save-dir", str(tmp_path / "o")])


def test_export_into_a_folder_that_cannot_take_it_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, ["--loadckpt", FIXTURE, "--export",
                                  str(tmp_path / "missing" / "x.safetensors")])
    assert "cannot write --export" in err and "No such file or directory" in err
    (tmp_path / "file").write_text("")
    err = one_line_error(capsys, ["--loadckpt", FIXTURE, "--export",
                                  str(tmp_path / "file" / "x.safetensors")])
    assert "cannot write --export" in err and "Not a directory" in err


def test_a_mask_folder_that_does_not_exist_is_one_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / "0.png")
    err = one_line_error(capsys, ["--loadckpt", FIXTURE, "--init-folder", str(tmp_path / "in"),
                                  "--mask-folder", str(tmp_path / "masks"),
                                  "--save-dir", str(tmp_path / "out")])
    assert f"--mask-folder {tmp_path / 'masks'}: No such file or directory" in err
