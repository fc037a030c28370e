"""Loading folders of real files (mixed sizes and modes, broken files), batches and conversions."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataError, demo_faces, load_folders, to_model, to_uint8
from run.dataset import ImageDataset
from data import grid, save_png


def test_uint8_to_model_and_back_is_exact_for_every_value():
    x = torch.arange(256, dtype=torch.uint8)
    m = to_model(x)
    assert m.min().item() == -1.0 and m.max().item() == 1.0
    assert torch.equal(to_uint8(m), x)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # out of range is clipped


@pytest.mark.parametrize("n, c, nrow, padding", [(7, 3, 3, 2), (2, 3, 8, 1), (12, 1, 4, 0)])
def test_grid_places_each_image_in_its_cell_on_the_background(n, c, nrow, padding):
    images = torch.randint(0, 255, (n, c, 5, 6), dtype=torch.uint8)
    out = grid(images, nrow, padding, pad_value=255)
    cols = min(nrow, n)
    rows = -(-n // cols)
    assert out.shape == (3, rows * (5 + padding) + padding, cols * (6 + padding) + padding)
    covered = torch.zeros(out.shape[1:], dtype=torch.bool)
    for i in range(n):
        y, x = padding + (i // cols) * (5 + padding), padding + (i % cols) * (6 + padding)
        assert torch.equal(out[:, y:y + 5, x:x + 6], images[i].expand(3, -1, -1))  # grey: 3 x 1
        covered[y:y + 5, x:x + 6] = True
    assert (out[:, ~covered] == 255).all()  # padding and empty cells


def test_a_grid_of_one_image_is_the_image_unpadded():
    images = torch.randint(0, 255, (1, 1, 5, 6), dtype=torch.uint8)
    assert torch.equal(grid(images, 8, padding=2), images[0])


@pytest.mark.parametrize("n, c", [(10, 3), (3, 1), (1, 3)])
def test_grid_matches_torchvision_make_grid_and_the_png_holds_it_exactly(tmp_path, n, c,
                                                                         reference):
    utils = reference("torchvision.utils")
    images = torch.randint(0, 255, (n, c, 8, 8), dtype=torch.uint8)
    theirs = utils.make_grid(images.float() / 255, nrow=4, padding=1, pad_value=0)
    ours = grid(images, 4, padding=1, pad_value=0)
    assert torch.equal(to_uint8(theirs * 2 - 1), ours.expand(theirs.shape))
    save_png(ours, str(tmp_path / "g.png"))
    back = torch.from_numpy(np.array(Image.open(tmp_path / "g.png")))  # (H, W, C) or grey (H, W)
    back = back.permute(2, 0, 1) if back.ndim == 3 else back[None]
    assert torch.equal(back, ours)


def make_mixed_folder(root):
    """Five usable images of assorted sizes and modes, one corrupt JPEG, one text file."""
    (root / "sub").mkdir(parents=True)
    wide = np.zeros((16, 48, 3), np.uint8)  # red | green | blue thirds: the centre crop is green
    wide[:, :16, 0], wide[:, 16:32, 1], wide[:, 32:, 2] = 255, 255, 255
    Image.fromarray(wide).save(root / "a_wide.png")
    Image.fromarray(np.full((64, 64), 77, np.uint8), "L").save(root / "b_gray.jpg", quality=100)
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent: must come out white
    Image.fromarray(rgba, "RGBA").save(root / "c_rgba.png")
    pal = Image.new("P", (30, 40))
    pal.putpalette([0, 0, 255] * 256)
    pal.save(root / "d_palette.gif")
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(root / "sub" / "e_nested.bmp")
    (root / "f_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image")


def test_load_folders_decodes_mixed_files_and_names_what_it_skipped(tmp_path):
    make_mixed_folder(tmp_path / "imgs")
    warnings = []
    x = load_folders([str(tmp_path / "imgs")], 16, 3, warn=warnings.append)
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 16, 16)
    assert warnings == [f"warning: used 5 of 6 image files, skipped 1: 1 could not be decoded "
                        f"({tmp_path / 'imgs' / 'f_broken.jpg'})"]
    wide, gray, rgba, pal, nested = x
    assert (wide[1] == 255).all() and (wide[0] == 0).all() and (wide[2] == 0).all()
    assert (gray - 77).abs().max() <= 1 and torch.equal(gray[0], gray[2])
    assert (rgba == 255).all()
    assert pal[2].float().mean() > 250 and pal[0].float().mean() < 5
    assert (nested == 200).all()


def test_grayscale_loading_gives_one_channel(tmp_path):
    make_mixed_folder(tmp_path / "imgs")
    x = load_folders([str(tmp_path / "imgs")], 8, 1, warn=lambda s: None)
    assert x.shape == (5, 1, 8, 8)


def test_folders_are_merged(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (10, 10)).save(tmp_path / name / "x.png")
    assert len(load_folders([str(tmp_path / "one"), str(tmp_path / "two")], 8, 3)) == 2


def test_no_usable_image_is_a_clear_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="could be read"):
        load_folders([str(tmp_path / "bad")], 8, 3, warn=lambda s: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_folders([str(tmp_path / "empty")], 8, 3)
    with pytest.raises(DataError, match="not found"):
        load_folders([str(tmp_path / "missing")], 8, 3)


def test_an_epoch_of_batches_holds_every_image_once_some_flipped():
    n = 40
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8)
    ds = ImageDataset(images, torch.device("cpu"))
    batches = list(ds.batches(16, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [16, 16, 8] == [16] * (ds.num_batches(16) - 1) + [8]
    got = to_uint8(torch.cat(batches))
    flipped = 0
    for img in images:
        same = (got == img).flatten(1).all(1)
        mirrored = (got == img.flip(-1)).flatten(1).all(1)
        assert (same | mirrored).sum() == 1
        flipped += int(mirrored.any() and not same.any())
    assert 5 < flipped < 35


def test_demo_faces_are_deterministic_and_varied():
    a, b = demo_faces(8, 32, seed=3), demo_faces(8, 32, seed=3)
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    assert demo_faces(2, 16, channels=1).shape == (2, 1, 16, 16)


def test_the_decoded_set_is_cached_bit_for_bit_and_rebuilt_when_a_file_changes(
        tmp_path, monkeypatch):
    import data
    make_mixed_folder(tmp_path / "imgs")
    folder, cache = [str(tmp_path / "imgs")], str(tmp_path / "cache")
    fresh = load_folders(folder, 16, 3, warn=lambda s: None, cache_dir=cache)
    warnings = []
    with monkeypatch.context() as m:
        m.setattr(data, "load_image", lambda *a, **k: pytest.fail("decoded although cached"))
        cached = load_folders(folder, 16, 3, warn=warnings.append, cache_dir=cache)
    assert torch.equal(cached, fresh) and cached.dtype == torch.uint8
    assert len(warnings) == 1 and "f_broken.jpg" in warnings[0]  # the skip is still reported
    # Change one file: the cache key changes and the set is decoded again.
    Image.fromarray(np.full((32, 32, 3), 10, np.uint8)).save(tmp_path / "imgs" / "sub" / "e_nested.bmp")
    os.utime(tmp_path / "imgs" / "sub" / "e_nested.bmp", ns=(1, 1))
    rebuilt = load_folders(folder, 16, 3, warn=lambda s: None, cache_dir=cache)
    assert (rebuilt[4] == 10).all() and torch.equal(rebuilt[:4], fresh[:4])
    assert sorted(f.rsplit(".", 1)[1] for f in os.listdir(cache)) == ["json", "npy"]  # old one gone


def test_device_batches_equal_the_per_image_path_batch_for_batch():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    ds = ImageDataset(images, torch.device("cpu"))
    fast = list(ds.batches(16, torch.Generator().manual_seed(5)))
    plain = [x for x, _ in ds.plain_batches(16, torch.Generator().manual_seed(5))]
    assert len(fast) == len(plain) == 4
    assert all(torch.equal(f, p) for f, p in zip(fast, plain))


def test_awkward_files_are_decoded_or_skipped_with_a_counted_reason(tmp_path, monkeypatch):
    import data
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.full((20, 20, 4), 128, np.uint8), "CMYK").save(d / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(d / "grey16.png")  # mode I;16
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (300, 200), (0, 255, 0)).save(d / "big.jpg", quality=95)
    Image.new("RGB", (8, 8)).save(d / "small.png")
    (d / "empty.png").write_bytes(b"")
    Image.new("RGB", (40, 40)).save(d / "whole.jpg")
    (d / "truncated.jpg").write_bytes((d / "whole.jpg").read_bytes()[:100])
    (d / "whole.jpg").unlink()
    (d / "fake.png").write_text("hello")
    (d / "loop").symlink_to(d)  # a symlink loop must not recurse forever
    warnings = []
    x = load_folders([str(d)], 16, 3, warn=warnings.append)
    assert x.shape == (4, 3, 16, 16)  # anim, big, cmyk, grey16 (sorted by name)
    anim, big, cmyk, grey16 = x
    assert (anim[0] > 200).all() and (anim[2] < 50).all()  # first frame: red
    assert (big[1] > 240).all() and (big[0] < 15).all()
    assert (grey16 == 255).all()
    assert cmyk.float().std() < 1  # one flat colour, converted
    assert len(warnings) == 1
    assert "used 4 of 8 image files, skipped 4: 3 could not be decoded" in warnings[0]
    assert "1 smaller than 16 px" in warnings[0] and "small.png" in warnings[0]
    assert len(load_folders([str(d)], 16, 3, warn=lambda s: None, keep_small=True)) == 5
    monkeypatch.setattr(data.Image, "MAX_IMAGE_PIXELS", 20000)  # big.jpg (60k px) is now a bomb
    assert len(load_folders([str(d)], 16, 3, warn=warnings.append)) == 3
    assert "1 too large (over 40000 pixels)" in warnings[-1] and "big.jpg" in warnings[-1]

    def denied(*a, **k):
        raise PermissionError("no")

    monkeypatch.setattr(data.Image, "open", denied)
    with pytest.raises(DataError, match="could be read"):
        load_folders([str(d)], 16, 3, warn=warnings.append)
    assert "could not be read (permission denied)" in warnings[-1]


@pytest.mark.parametrize("path", ["batches_with_tokens", "plain_batches"])
def test_hflip_off_never_mirrors_and_on_mirrors_about_half(path):
    images = torch.zeros(64, 1, 4, 4, dtype=torch.uint8)
    images[:, :, :, 0] = 255  # a marked left side
    for hflip, lo, hi in ((False, 0, 0), (True, 20, 44)):
        ds = ImageDataset(images, torch.device("cpu"), hflip=hflip)
        x = torch.cat([b for b, _ in getattr(ds, path)(8, torch.Generator().manual_seed(0))])
        mirrored = int((x[:, 0, 0, -1] > 0).sum())  # the mark on the right
        assert lo <= mirrored <= hi and len(x) == 64
