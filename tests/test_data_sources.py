"""Data of any size and shape: the disk path (memory-mapped cache, read ahead) against the
in-memory path, a memory budget, non-square images end to end, and zip archives."""
import os
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
from run import dataset
from config import parse_args
from data import DataError, MappedImages, load_folders
from ddpm import Program, main


def zip_folder(folder, path):
    with zipfile.ZipFile(path, "w") as z:
        for root, _, files in os.walk(folder):
            for f in files:
                full = os.path.join(root, f)
                z.write(full, os.path.relpath(full, folder))


def folder_flags(tmp_path, name, *extra):
    return ["--train", "--img-size", "8", "--num-channels", "8", "--channel-multiples", "1",
            "--has-attn", "f", "--timesteps", "10", "--beta-max", "0.5", "--batch-size", "8",
            "--seed", "5", "--sample-every", "0", "--cache-dir", str(tmp_path / "cache"),
            "--ckpt-save-dir", str(tmp_path / name), "--save-dir", str(tmp_path / name), *extra]


def test_the_disk_path_gives_the_batches_and_weights_of_the_memory_path(write_images, tmp_path):
    write_images(tmp_path / "imgs", 28, 10, 12)
    args = ["--data-folders", str(tmp_path / "imgs"), "--epochs", "2"]
    progs = {}
    for on in ("memory", "disk"):
        progs[on] = Program(*parse_args(folder_flags(tmp_path, on, *args, "--data-on", on)))
        progs[on].run()
    assert progs["disk"].data.mapped is not None and progs["memory"].data.mapped is None
    a, b = (torch.load(tmp_path / on / "ckpt-1.pth", weights_only=True) for on in ("memory", "disk"))
    assert a["step"] == b["step"] == 8
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    # Batch for batch, also each process's share under DDP and with a partial last batch.
    mem, disk = progs["memory"].data, progs["disk"].data
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        xs = [list(ds.batches(6, torch.Generator().manual_seed(1), rank, world))
              for ds in (mem, disk)]
        assert len(xs[0]) == len(xs[1]) == (5 if world == 1 else 4)
        assert all(torch.equal(x, y) for x, y in zip(*xs))


def mapping_rss(path):
    """Resident bytes of this process's mappings of `path` (from /proc/self/smaps)."""
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return rss


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc")
def test_a_set_over_the_memory_budget_trains_from_disk_keeping_under_the_budget(
        write_images, tmp_path):
    write_images(tmp_path / "imgs", 500, 32, 32)  # 500 x 3 KiB = 1.5 MiB decoded
    budget = 1.0  # MiB
    prog = Program(*parse_args(folder_flags(tmp_path, "run", "--data-folders",
                                            str(tmp_path / "imgs"),
                                            "--img-size", "32", "--data-memory", str(budget),
                                            "--batch-size", "4", "--max-steps", "3")))
    prog.run()  # trains through the disk path
    ds = prog.data
    assert ds.mapped is not None and ds.resident == budget * 2**20
    assert ds.images.numel() > ds.resident
    path, peak, seen = os.path.realpath(ds.mapped.path), 0, 0
    for x in ds.batches(4, torch.Generator().manual_seed(0)):  # a whole epoch: every image
        peak, seen = max(peak, mapping_rss(path)), seen + len(x)
    assert seen == 500 and 0 < peak <= ds.resident
    # The same epoch without releasing pages keeps the file resident: the check can fail.
    ds.resident, peak = 1 << 40, 0
    for _ in ds.batches(4, torch.Generator().manual_seed(0)):
        peak = max(peak, mapping_rss(path))
    assert peak > budget * 2**20


def test_decoding_into_the_cache_never_holds_the_whole_set(write_images, tmp_path):
    write_images(tmp_path / "imgs", 2000, 24, 24)  # 2000 x 1,728 B = 3.3 MiB decoded
    folder, size = [str(tmp_path / "imgs")], 2000 * 3 * 24 * 24
    peaks = {}
    for cache in (None, str(tmp_path / "cache")):
        tracemalloc.start()
        images = load_folders(folder, 24, 3, cache_dir=cache, mapped=bool(cache))
        peaks[cache is None] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(images, MappedImages) == bool(cache)
    assert peaks[True] >= size  # in memory: the whole set, as it must be
    assert peaks[False] < 0.7 * size  # into the file: a chunk of decoded images at a time


def test_non_square_images_cover_the_size_and_are_centre_cropped(tmp_path):
    tall = np.zeros((60, 16, 3), np.uint8)  # red | green | blue thirds, top to bottom
    tall[:20, :, 0], tall[20:40, :, 1], tall[40:, :, 2] = 255, 255, 255
    Image.fromarray(tall).save(tmp_path / "tall.png")
    x = data.load_image(str(tmp_path / "tall.png"), (8, 16), 3)  # cover 8 x 16: scale 1
    assert x.shape == (3, 8, 16) and (x[1] == 255).all() and (x[[0, 2]] == 0).all()
    assert x.flags.writeable  # torch.from_numpy of it must not warn (evaluate's nearest.png)
    wide = data.load_image(str(tmp_path / "tall.png"), (8, 32), 3, keep_small=True)
    assert wide.shape == (3, 8, 32)  # upscaled x2 to 120 x 32, the green middle kept
    assert (wide[1] > 250).all()
    with pytest.raises(data.SkipImage, match="smaller than 32 x 8"):
        data.load_image(str(tmp_path / "tall.png"), (8, 32), 3)


def test_a_16x32_model_trains_samples_and_draws_strips_and_fid(
        png_size, write_images, tmp_path, monkeypatch):
    write_images(tmp_path / "imgs", 12, 20, 40)
    monkeypatch.chdir(tmp_path)
    flags = ["--img-size", "16", "32", "--channel-multiples", "1", "2", "--has-attn", "f", "t",
             "--num-channels", "8", "--timesteps", "10", "--beta-max", "0.5", "--seed", "0"]
    assert main(["--train", "--data-folders", "imgs", "--epochs", "1", "--batch-size", "6",
                 *flags]) == 0
    # forward-steps: T = 10 columns (t = 0..9) of 32 + 1 px, 4 rows of 16 + 1 px; progress grid
    # 8 samples a row.
    assert png_size("output/forward-steps.png") == (10 * 33 + 1, 4 * 17 + 1)
    assert png_size("output/progress.png") == (8 * 33 + 1, 17 + 1)
    ckpt = torch.load("ckpt/ckpt-0.pth", weights_only=True)
    assert ckpt["config"]["img_size"] == [16, 32]
    assert main(["--loadckpt", "ckpt/ckpt-0.pth", "--batch-size", "3", "--sampler", "ddim",
                 "--sample-steps", "3", "--save-dir", "s"]) == 0
    assert png_size("s/ddpm-0.png") == (32, 16)
    assert png_size("s/reverse-steps.png")[1] == 3 * 17 + 1
    evaluate = pytest.importorskip("features.evaluate")
    try:
        evaluate.inception_path()
    except evaluate.MissingNetwork as e:
        pytest.skip(str(e))
    prog = Program(*parse_args(["--loadckpt", "ckpt/ckpt-0.pth", "--batch-size", "6",
                                "--sampler", "ddim", "--sample-steps", "2", "--data-folders",
                                "imgs", "--save-dir", "fid"]))
    result = evaluate.sample_quality(prog.drawer, prog.cfg.data, 6, eval_folders=None)
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert png_size("fid/nearest.png")[1] == 6 * 18 + 2  # 6 rows of 16-px tiles


def test_a_zip_and_the_same_folder_give_the_same_cache(write_images, tmp_path):
    write_images(tmp_path / "imgs", 20, 12, 12, nested=True)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    zip_folder(tmp_path / "imgs", tmp_path / "imgs.zip")
    (tmp_path / "cache").mkdir()
    got = {}
    for src in ("imgs", "imgs.zip"):
        images, paths = load_folders([str(tmp_path / src)], 8, 3, cache_dir=str(tmp_path / "cache"),
                                     with_paths=True, mapped=True)
        got[src] = images.images, [os.path.relpath(p, tmp_path / src) for p in paths]
    assert got["imgs"][1] == got["imgs.zip"][1] and len(got["imgs"][1]) == 20
    assert torch.equal(got["imgs"][0], got["imgs.zip"][0])
    caches = sorted(f for f in os.listdir(tmp_path / "cache") if f.endswith(".npy"))
    assert len(caches) == 2  # one each; same contents, byte for byte after the header
    a, b = (np.load(tmp_path / "cache" / f) for f in caches)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kind,message", [
    ("garbage", "is not a readable zip file"), ("truncated", "is not a readable zip file"),
    ("no-images", "no image files"), ("memory-on-demo", "the disk path reads the decode cache")])
def test_a_damaged_or_empty_zip_is_a_one_line_error(write_images, tmp_path, monkeypatch, capsys,
                                                    kind, message):
    write_images(tmp_path / "imgs", 4, 8, 8)
    zip_folder(tmp_path / "imgs", tmp_path / "good.zip")
    (tmp_path / "garbage.zip").write_bytes(b"PK\x03\x04 this is not a zip file at all")
    (tmp_path / "truncated.zip").write_bytes((tmp_path / "good.zip").read_bytes()[:300])
    with zipfile.ZipFile(tmp_path / "no-images.zip", "w") as z:
        z.writestr("readme.txt", "no pictures here")
    monkeypatch.chdir(tmp_path)
    source = ["--demo", "--data-on", "disk"] if kind == "memory-on-demo" else \
        ["--data-folders", f"{kind}.zip"]
    assert main(["--train", *source, "--img-size", "8", "--channel-multiples", "1",
                 "--has-attn", "f"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_damaged_member_of_a_zip_is_skipped_with_a_warning(write_images, tmp_path):
    write_images(tmp_path / "imgs", 3, 8, 8)
    zip_folder(tmp_path / "imgs", tmp_path / "a.zip")
    with zipfile.ZipFile(tmp_path / "a.zip", "a") as z:
        z.writestr("broken.jpg", b"\xff\xd8\xff not really a jpeg")
    warnings = []
    images = load_folders([str(tmp_path / "a.zip")], 8, 3, warn=warnings.append)
    assert len(images) == 3 and "broken.jpg" in warnings[0] and "could not be decoded" in warnings[0]


def test_the_memory_path_is_chosen_where_the_set_fits_and_says_why():
    x = torch.zeros(10, 3, 8, 8, dtype=torch.uint8)
    on_disk, _, why = dataset.placement(x, torch.device("cpu"), "auto", 1 << 20)
    assert not on_disk and "in memory" in why and "--data-memory 1 MiB" in why
    with pytest.raises(DataError, match="decode cache"):
        dataset.placement(x, torch.device("cpu"), "auto", 100)  # over budget, but no file to read
