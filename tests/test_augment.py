"""Non-leaking augmentation (--augment P): exact identities and transforms, labels that say what was
done, the label embedding (only when on, zero at sampling), today's batches with P = 0, resume."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from features import augment
from features import evaluate
from features.augment import AUGMENT_DIM, recolour, warp
from config import parse_args
from data import demo_faces
from run.dataset import ImageDataset
from ddpm import Program, main
from unet import UNet


def neutral(B):
    zero, one = torch.zeros(B), torch.ones(B)
    return {"flip": zero.bool(), "rot": zero.long(), "tx": zero, "ty": zero, "sx": one, "sy": one}


@pytest.mark.parametrize("channels", [1, 3])
def test_every_transform_at_strength_zero_is_the_identity(channels):
    x = torch.rand(5, channels, 8, 12) * 2 - 1
    assert torch.equal(warp(x, **neutral(5)), x)
    zero, one = torch.zeros(5), torch.ones(5)
    assert torch.equal(recolour(x, zero, one, one, zero), x)
    for name, value in (("flip", False), ("rot", 0), ("tx", 0.0), ("ty", 0.0), ("sx", 1.0),
                        ("sy", 1.0)):  # each one alone at its neutral value, the rest too
        assert torch.equal(warp(x, **{**neutral(5), name: torch.full((5,), value)}), x), name
    y, labels = augment.augment(x, 0.0, 5, slice(None))  # probability 0
    assert torch.equal(y, x) and labels.shape == (5, AUGMENT_DIM) and not labels.any()


def test_flips_quarter_turns_and_integer_shifts_only_move_pixels():
    x = torch.rand(2, 3, 8, 8)
    p = neutral(2)
    assert torch.equal(warp(x, **{**p, "flip": torch.ones(2).bool()}), x.flip(-1))
    for k in range(4):
        assert torch.equal(warp(x, **{**p, "rot": torch.full((2,), k)}), torch.rot90(x, k, (2, 3)))
    shifted = warp(x, **{**p, "tx": torch.full((2,), 2.0), "ty": torch.full((2,), -3.0)})
    padded = F.pad(x, (3, 3, 3, 3), mode="reflect")  # right by 2, up by 3, mirrored at the edges
    assert torch.equal(shifted, padded[:, :, 3 + 3:3 + 3 + 8, 3 - 2:3 - 2 + 8])


def test_scaling_about_the_centre_is_exact_on_a_linear_ramp():
    H = W = 16
    ramp = torch.arange(W, dtype=torch.float64).expand(1, 1, H, W) + 0.5 * torch.arange(
        H, dtype=torch.float64)[:, None]  # I(y, x) = x + y / 2: bilinear sampling is exact on it
    c = (W - 1) / 2
    for sx, sy in ((2.0, 2.0), (1.25, 0.8)):  # zoom in; stretch x, squeeze y (anisotropic)
        p = {**neutral(1), "sx": torch.tensor([sx]), "sy": torch.tensor([sy])}
        out = warp(ramp, **p)[0, 0]
        xs, ys = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                                torch.arange(W, dtype=torch.float64), indexing="xy")
        want = ((xs - c) / sx + c) + 0.5 * ((ys - c) / sy + c)
        inside = (((xs - c) / sx).abs() <= c) & (((ys - c) / sy).abs() <= c)  # no reflection
        assert torch.allclose(out[inside], want[inside], atol=1e-9)


def test_hue_and_saturation_turn_about_the_grey_axis():
    x = torch.rand(3, 3, 4, 4) * 2 - 1
    zero, one = torch.zeros(3), torch.ones(3)
    third = recolour(x, zero, one, one, torch.full((3,), 2 * math.pi / 3))
    assert torch.allclose(third, x[:, [2, 0, 1]], atol=1e-6)  # a third of a turn: r <- b <- g
    grey = recolour(x, zero, one, zero, zero)  # saturation 0
    assert torch.allclose(grey, x.mean(1, keepdim=True).expand_as(x), atol=1e-6)
    turned = recolour(x, zero, one, one, torch.full((3,), 1.0))
    assert torch.allclose(turned.mean(1), x.mean(1), atol=1e-6)  # the luma is kept
    assert torch.allclose(recolour(x, torch.full((3,), 0.2), torch.full((3,), 2.0), one, zero),
                          (x + 0.2) * 2)


@pytest.mark.parametrize("channels", [1, 3])
def test_labels_are_nonzero_exactly_for_the_images_that_were_changed(channels):
    torch.manual_seed(0)
    x = torch.rand(256, channels, 8, 8) * 2 - 1  # random pixels: any transform changes them
    y, labels = augment.augment(x, 0.3, 256, slice(None))
    changed = (y != x).flatten(1).any(1)
    assert torch.equal(changed, labels.ne(0).any(1))
    assert changed.any() and not changed.all()  # both kinds are there (0.7^9 = 4 % untouched)
    if channels == 1:  # saturation and hue need colour: their labels stay zero
        assert not labels[:, [9, 10, 11]].any()


def test_shards_of_the_global_batch_are_augmented_as_one_process_would():
    x = torch.rand(8, 3, 8, 8)
    torch.manual_seed(3)
    whole, whole_labels = augment.augment(x, 0.5, 8, slice(None))
    for rank in range(2):
        torch.manual_seed(3)
        part, labels = augment.augment(x[rank::2], 0.5, 8, slice(rank, None, 2))
        assert torch.equal(part, whole[rank::2]) and torch.equal(labels, whole_labels[rank::2])


def test_the_label_embedding_exists_only_with_augmentation_and_zero_labels_add_nothing():
    kw = dict(img_channels=3, num_channels=8, channel_multiples=(1,), has_attn=(False,), num_blocks=1)
    plain, aug = UNet(**kw), UNet(**kw, augment_dim=AUGMENT_DIM)
    extra = set(aug.state_dict()) - set(plain.state_dict())
    assert extra == {"augment_embed.weight"} and set(plain.state_dict()) <= set(aug.state_dict())
    for w in plain.parameters():  # the zero-initialised convs hide the time embedding: fill them
        if not w.any():
            torch.nn.init.normal_(w, std=0.1)
    aug.load_state_dict({**plain.state_dict(), "augment_embed.weight": torch.randn(8, AUGMENT_DIM)})
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])
    base = plain(x, t)
    assert torch.equal(aug(x, t), base)  # no labels (sampling) = the plain network
    assert torch.equal(aug(x, t, augment_labels=torch.zeros(2, AUGMENT_DIM)), base)
    assert not torch.allclose(aug(x, t, augment_labels=torch.ones(2, AUGMENT_DIM)), base)


def test_augmentation_labels_are_zero_when_sampling_and_not_when_training(tiny, tmp_path):
    p = Program(*parse_args(tiny(tmp_path, "--epochs", "1", "--augment", "0.5")))
    seen = {"train": [], "sample": []}
    hook = lambda key: lambda module, inputs, out: seen[key].append(inputs[0].clone())
    p.trainer.model.augment_embed.register_forward_hook(hook("train"))
    p.trainer.ema.augment_embed.register_forward_hook(hook("sample"))
    p.run()  # 4 steps; the strips and the progress grid sample with the EMA weights
    assert len(seen["train"]) == 4 and any(labels.any() for labels in seen["train"])
    assert len(seen["sample"]) >= 20 and not any(labels.any() for labels in seen["sample"])


def test_augment_zero_trains_on_exactly_the_batches_of_the_data_and_has_no_embedding(
        tiny, tmp_path):
    batches = {}
    for P in ("0", "0.5"):
        p = Program(*parse_args(tiny(tmp_path / P, "--epochs", "2", "--augment", P)))
        seen, losses = [], p.trainer.diffusion.losses
        p.trainer.diffusion.losses = lambda net, x0, *rest: (seen.append(x0.clone())
                                                             or losses(net, x0, *rest))
        p.run()
        batches[P] = torch.cat(seen)
        assert hasattr(p.trainer.model, "augment_embed") == (P != "0")
    data = ImageDataset(demo_faces(32, 8, 3, seed=0), torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)  # --seed 7 (tiny), as the Program's data generator
    today = torch.cat([x for _ in range(2) for x in data.batches(8, gen)])
    assert torch.equal(batches["0"], today)
    assert batches["0.5"].shape == today.shape and not torch.equal(batches["0.5"], today)


def test_augment_is_stored_a_positive_value_may_change_on_resume_and_old_configs_mean_off(
        tiny, tmp_path):
    assert main(tiny(tmp_path, "--epochs", "1", "--augment", "0.5")) == 0
    ckpt = torch.load(tmp_path / "ckpt" / "ckpt-0.pth", weights_only=True)
    assert ckpt["config"]["augment"] == 0.5 and "augment_embed.weight" in ckpt["ema"]
    p = Program(*parse_args(tiny(tmp_path, "--epochs", "1", "--loadckpt", "latest")))
    assert p.cfg.model.augment == 0.5
    q = Program(*parse_args(tiny(tmp_path, "--loadckpt", "latest", "--augment", "0.2")))
    assert q.cfg.model.augment == 0.2
    assert main(tiny(tmp_path, "--loadckpt", "latest", "--augment", "0")) == 2  # off: another net
    del ckpt["config"]["augment"], ckpt["schema"]  # as written before --augment existed
    for k in [k for k in ckpt["model"] if k.startswith("augment_embed")]:
        del ckpt["model"][k], ckpt["ema"][k]
    ckpt.pop("optimizer")
    torch.save(ckpt, tmp_path / "older.pth")
    old = Program(*parse_args(["--loadckpt", str(tmp_path / "older.pth"), "--save-dir",
                               str(tmp_path / "o")]))
    assert old.cfg.model.augment == 0 and not hasattr(old.trainer.ema, "augment_embed")


def test_augment_outside_zero_to_one_is_a_one_line_error(tiny, tmp_path, capsys):
    assert main(tiny(tmp_path, "--augment", "1.5")) == 2
    err = capsys.readouterr().err
    assert err == "error: --augment is a probability in [0, 1], got 1.5\n"


def test_the_copy_alarm_stays_quiet_for_fresh_draws_and_rings_for_copies():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(500, 16))
    quiet = [evaluate.copy_score(rng.normal(size=(200, 16)), train)["share"] for _ in range(5)]
    assert max(quiet) < evaluate.copy_alarm(200, 500) < 1  # 5 fresh sets of 200: none rings
    near = train[:200] + 0.05 * rng.normal(size=(200, 16))  # near-copies
    assert evaluate.copy_score(near, train)["share"] > evaluate.copy_alarm(200, 500)
    assert evaluate.copy_alarm(1000, 500) < evaluate.copy_alarm(200, 500)  # more samples: tighter
    assert evaluate.copy_alarm(200, 50) > evaluate.copy_alarm(200, 5000)  # fewer training images


def test_the_copy_rate_of_fresh_draws_spreads_as_the_alarm_assumes():
    """Against n training points the rate of N fresh ones spreads by 0.5 sqrt(1/N + 1/n): the
    median training distance is an estimate too. With n = 40 that is 1.8x the 0.5 / sqrt(N) of
    the samples alone, which would put the alarm too low for small training sets."""
    rng = np.random.default_rng(2)
    N = 200
    for n in (40, 400):
        rates = [evaluate.copy_score(rng.normal(size=(N, 8)), rng.normal(size=(n, 8)))["share"]
                 for _ in range(100)]
        assert np.std(rates) == pytest.approx(0.5 * np.sqrt(1 / N + 1 / n), rel=0.2)
        assert abs(np.mean(rates) - 0.5) < 0.03
        assert np.mean(np.array(rates) > evaluate.copy_alarm(N, n)) <= 1 / 100


def test_the_alarm_line_names_the_rate_the_level_and_what_to_do():
    line = evaluate.copy_warning(1.0, 16, 1000, "out/nearest.png")
    assert line.startswith("warning: copy rate 100% is above 88%") and "\n" not in line
    assert "--augment" in line and "out/nearest.png" in line
    assert evaluate.copy_warning(0.5, 16, 1000, "x") is None  # real images' rate: quiet
