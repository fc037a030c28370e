"""The decode cache is a cache: any damage is decoded again, a folder that cannot take it falls
back to memory, a changed file is noticed even with its size and mtime kept, and what it leaves
behind (older caches, temporaries of killed decodes) is removed."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import load_folders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_images(folder, n=3, value=0):
    """n flat-colour 16 x 16 BMPs (uncompressed: every one has the same byte size)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (value + 40 * i, 100, 200)).save(folder / f"{i}.bmp")


def cached(folder, cache, warnings=None, **kw):
    """load_folders through the cache; warnings collects its warning lines."""
    return load_folders([str(folder)], 8, 3, cache_dir=str(cache),
                        warn=(warnings if warnings is not None else []).append, **kw)


def cache_files(cache, ext):
    return sorted(f for f in os.listdir(cache) if f.endswith(ext))


def no_decoding(monkeypatch):
    monkeypatch.setattr(data, "load_image", lambda *a, **k: pytest.fail("decoded, not cached"))


@pytest.mark.parametrize("damage", ["truncated npy", "empty npy", "garbage json", "json of another",
                                    "npy of another shape", "npy is a folder"])
def test_a_damaged_cache_is_decoded_again_after_one_warning(tmp_path, monkeypatch, damage):
    make_images(tmp_path / "d")
    fresh = cached(tmp_path / "d", tmp_path / "c")
    npy = tmp_path / "c" / cache_files(tmp_path / "c", ".npy")[0]
    json_ = npy.with_suffix(".json")
    if damage == "truncated npy":
        npy.write_bytes(npy.read_bytes()[:-100])
    elif damage == "empty npy":
        npy.write_bytes(b"")
    elif damage == "garbage json":
        json_.write_bytes(b"\x00{not json")
    elif damage == "json of another":
        json_.write_text('{"count": 7, "skipped": []}')
    elif damage == "npy of another shape":
        np.save(npy, np.zeros((3, 3, 4, 4), np.uint8))
    else:
        npy.unlink()
        npy.mkdir()
    warnings = []
    again = cached(tmp_path / "d", tmp_path / "c", warnings)
    assert torch.equal(again, fresh)
    says = "cannot write the decode cache" if damage == "npy is a folder" else "is damaged"
    assert len(warnings) == 1 and says in warnings[0], warnings
    if damage != "npy is a folder":  # rewritten whole: the next start reads it
        with monkeypatch.context() as m:
            no_decoding(m)
            assert torch.equal(cached(tmp_path / "d", tmp_path / "c"), fresh)


def test_a_cache_folder_that_is_a_file_falls_back_to_memory_with_one_warning(tmp_path):
    make_images(tmp_path / "d")
    (tmp_path / "c").write_text("a file where the cache folder should be")
    warnings = []
    images = cached(tmp_path / "d", tmp_path / "c", warnings, mapped=True)
    assert isinstance(images, torch.Tensor) and images.shape == (3, 3, 8, 8)
    assert torch.equal(images, load_folders([str(tmp_path / "d")], 8, 3))
    assert len(warnings) == 1 and "cannot write the decode cache" in warnings[0]


FULL_DISK = """
import resource, signal, sys  # run in the repository root
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as if full
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
from data import load_folders
x = load_folders([{folder!r}], 8, 3, cache_dir={cache!r}, warn=print)
print("images", tuple(x.shape), int(x.sum()))
"""


def test_a_full_cache_disk_falls_back_to_memory_and_leaves_no_temporary(tmp_path):
    make_images(tmp_path / "d")
    (tmp_path / "c").mkdir()
    code = FULL_DISK.format(folder=str(tmp_path / "d"), cache=str(tmp_path / "c"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, r.stderr
    expected = load_folders([str(tmp_path / "d")], 8, 3)
    assert f"images (3, 3, 8, 8) {int(expected.sum())}" in r.stdout
    assert "cannot write the decode cache" in r.stdout and "File too large" in r.stdout
    assert os.listdir(tmp_path / "c") == []


def test_a_file_replaced_with_its_size_and_mtime_kept_is_decoded_again(tmp_path):
    make_images(tmp_path / "d", n=2)
    first = cached(tmp_path / "d", tmp_path / "c")
    path = tmp_path / "d" / "1.bmp"
    st = os.stat(path)
    Image.new("RGB", (16, 16), (7, 7, 7)).save(path)  # another picture, same byte size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or `rsync -a` leave it
    assert os.path.getsize(path) == st.st_size
    again = cached(tmp_path / "d", tmp_path / "c")
    assert torch.equal(again[0], first[0]) and (again[1] == 7).all()


def test_a_zip_member_replaced_in_an_archive_of_the_same_size_and_mtime_is_noticed(tmp_path):
    import zipfile

    def archive(colour):
        Image.new("RGB", (16, 16), colour).save(tmp_path / "x.bmp")
        with zipfile.ZipFile(tmp_path / "a.zip", "w", zipfile.ZIP_STORED) as z:
            z.write(tmp_path / "x.bmp", "x.bmp")
            z.writestr("pad.txt", "p" * 9000)  # the member lies outside the hashed head and tail
        os.utime(tmp_path / "a.zip", ns=(0, 10**18))

    archive((1, 2, 3))
    first = load_folders([str(tmp_path / "a.zip")], 8, 3, cache_dir=str(tmp_path / "c"))
    assert (first == torch.tensor([1, 2, 3])[:, None, None]).all()
    archive((9, 9, 9))
    code = (f"from data import load_folders; "  # run in the repository root
            
            f"print(load_folders([{str(tmp_path / 'a.zip')!r}], 8, 3, "
            f"cache_dir={str(tmp_path / 'c')!r}).unique().tolist())")  # the next start
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[9]", r.stderr


def test_a_new_cache_removes_the_older_ones_of_its_folders_only(tmp_path):
    make_images(tmp_path / "a")
    make_images(tmp_path / "b", value=5)
    cached(tmp_path / "a", tmp_path / "c")
    cached(tmp_path / "b", tmp_path / "c")
    old_naming = tmp_path / "c" / ("images-" + "0" * 32 + ".npy")  # as earlier versions named it
    old_naming.write_bytes(b"x")
    before = cache_files(tmp_path / "c", ".npy")
    assert len(before) == 3
    Image.new("RGB", (16, 16)).save(tmp_path / "a" / "3.bmp")  # folder a changes
    cached(tmp_path / "a", tmp_path / "c")
    after = cache_files(tmp_path / "c", ".npy")
    assert len(after) == 2 and len(cache_files(tmp_path / "c", ".json")) == 2
    b_cache = [f for f in before if f in after]
    assert len(b_cache) == 1 and not old_naming.exists()  # b's cache kept, a's old one gone
    # Each remaining cache is read back without decoding.
    for folder in ("a", "b"):
        assert len(cached(tmp_path / folder, tmp_path / "c")) == (4 if folder == "a" else 3)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_decodes_are_removed_and_live_ones_kept(tmp_path):
    make_images(tmp_path / "d")
    (tmp_path / "c").mkdir()
    dead, old = dead_pid(), time.time() - 3600
    stale = tmp_path / "c" / f"images-x.npy.{dead}.tmp"
    live = tmp_path / "c" / f"images-y.npy.{os.getpid()}.tmp"  # a process that runs
    fresh = tmp_path / "c" / f"images-z.npy.{dead}.tmp"  # just written: maybe another machine's
    for f in (stale, live, fresh):
        f.write_bytes(b"")
    for f in (stale, live):
        os.utime(f, (old, old))
    cached(tmp_path / "d", tmp_path / "c")
    assert not stale.exists() and live.exists() and fresh.exists()
