"""Image data for ddpm.py: folders or zip files of pictures (or built-in demo faces) as uint8
(N, C, H, W), decoded once into a cache file and read back from it (memory-mapped) on the next
start. Where the images live during training, and their batches: dataset.py.

to_model / to_uint8 are the only two conversions between stored pixels and the model's [-1, 1].
"""
import contextlib
import hashlib
import io
import json
import math
import mmap
import os
import re
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor

from core.spec import hw  # noqa: F401 (data.hw: the image size as (H, W))
from ui import progress_bar

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class DataError(Exception):
    """Bad input data; the message is one line that says what to change."""


def to_model(x: Tensor) -> Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float in [-1, 1] (values outside are clipped) -> uint8 pixels 0..255."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def make_lowres(x: Tensor, low: int) -> Tensor:
    """The super-resolution model's input: x (B, C, H, W) in [-1, 1] downsampled to low x low
    (bicubic, anti-aliased) and upsampled back to H x W (bicubic), clipped to [-1, 1]."""
    return upsample(downsample(x, low), x.shape[-1])


def downsample(x: Tensor, low: int) -> Tensor:
    """Bicubic, anti-aliased downsampling (B, C, H, W) -> (B, C, low, low)."""
    return F.interpolate(x, size=(low, low), mode="bicubic", antialias=True, align_corners=False)


def upsample(x: Tensor, size: int) -> Tensor:
    """Bicubic upsampling (B, C, h, w) -> (B, C, size, size), clipped to [-1, 1]."""
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def list_images(folders: list[str]) -> list[str]:
    """Every file with an image extension under the folders (recursively), sorted per folder.
    A .zip file counts as a folder: its members are named <zip>/<member>."""
    paths = []
    for folder in folders:
        if os.path.isfile(folder) and folder.lower().endswith(".zip"):
            paths += [os.path.join(folder, m) for m in zip_members(folder)]
            continue
        if not os.path.isdir(folder):
            raise DataError(f"data folder not found: {folder}")
        for root, files in walk(folder):
            paths += [os.path.join(root, f) for f in files
                      if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return paths


def zip_members(path: str) -> list[str]:
    """The image members of a zip file, in the order walk gives the same files unpacked (a
    folder's files by name, then its sub-folders by name)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [i.filename for i in z.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable zip file ({e})") from None
    names = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
             and not n.startswith("__MACOSX/")]  # macOS resource forks are not images
    # Per level: a file (0, name) comes before a folder (1, name), as os.walk visits them.
    return sorted(names, key=lambda n: [(1, p) for p in n.split("/")[:-1]] + [(0, n)])


class ZipReader:
    """Open zip files, shared by the decoding threads (one lock per archive: the archive's file
    position is shared; decoding happens outside the lock)."""

    def __init__(self):
        self.open, self.lock = {}, threading.Lock()

    def find(self, path: str) -> tuple[str, str] | None:
        """'<zip>/<member>' -> (zip file, member), or None for a plain file."""
        low, i = path.lower(), path.lower().find(".zip" + os.sep)
        while i != -1:
            if os.path.isfile(path[:i + 4]):
                return path[:i + 4], path[i + 5:].replace(os.sep, "/")
            i = low.find(".zip" + os.sep, i + 1)
        return None

    def read(self, path: str):
        """A plain path as it is; a zip member as a file object of its bytes."""
        where = self.find(path) if ".zip" in path.lower() else None
        if where is None:
            return path
        with self.lock:
            if where[0] not in self.open:
                self.open[where[0]] = (zipfile.ZipFile(where[0]), threading.Lock())
        z, lock = self.open[where[0]]
        with lock:
            return io.BytesIO(z.read(where[1]))


ZIPS = ZipReader()  # zip members are read through this (archives stay open)


def walk(folder: str):
    """(folder, sorted file names) for the folder and every sub-folder, sorted, following
    symbolic links; each real folder is visited once, so a symlink loop ends."""
    seen = set()  # real paths of visited folders
    for root, dirs, files in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(root))
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) not in seen)
        yield root, sorted(files)


class SkipImage(Exception):
    """A file that is not used for training; the message is the reason."""


def load_image(path: str, size, channels: int, keep_small: bool = False) -> np.ndarray:
    """Decode one image (the first frame of an animation), turn it upright as its EXIF
    orientation says (phone photos are stored on their side), flatten transparency onto white,
    resize it to cover size = S or (H, W), centre-crop. Returns uint8 (channels, H, W).

    Raises SkipImage for an image smaller than that unless keep_small (then it is upscaled).
    """
    (H, W) = hw(size)
    try:
        im = Image.open(ZIPS.read(path))
    except PermissionError:
        raise SkipImage("could not be read (permission denied)") from None
    except Image.DecompressionBombError:  # over 2 x Image.MAX_IMAGE_PIXELS: refuse, never decode
        raise SkipImage(f"too large (over {2 * Image.MAX_IMAGE_PIXELS} pixels)") from None
    except Exception:  # any decoder failure means "not a usable image"
        raise SkipImage("could not be decoded") from None
    with im:
        turned = orientation(im) in (5, 6, 7, 8)  # stored on its side: shown turned by 90 degrees
        shown = im.size[::-1] if turned else im.size
        if (shown[0] < W or shown[1] < H) and not keep_small:
            raise SkipImage(f"smaller than {W} x {H} px" if H != W else f"smaller than {H} px")
        # Big JPEGs decode at 1/2 .. 1/8 scale, no smaller than needed (as stored: maybe turned).
        im.draft("RGB" if channels == 3 else "L", (H, W) if turned else (W, H))
        try:
            im.load()
        except Exception:
            raise SkipImage("could not be decoded") from None
        if orientation(im) not in (None, 1):
            im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: keep the top 8 bits
            im = Image.fromarray((np.asarray(im, dtype=np.int64) // 257).clip(0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im.alpha_composite(rgba)
        im = im.convert("RGB" if channels == 3 else "L")
    w, h = im.size
    scale = max(W / w, H / h)  # the smallest scale that covers H x W
    nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - W) // 2, (nh - H) // 2
    im = im.crop((left, top, left + W, top + H))
    arr = np.array(im, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def orientation(im: Image.Image) -> int | None:
    """The EXIF orientation tag (1 = upright, 6 = turn 90 degrees clockwise to show, ...), or None
    where there is none or the EXIF block cannot be read (the image is then used as stored)."""
    try:
        return im.getexif().get(0x0112)
    except Exception:
        return None


def _key(size) -> str:
    """An image size as cache keys write it: 64, or [H, W] (a tuple or a list alike)."""
    return str(list(size) if isinstance(size, (list, tuple)) else size)


def folder_key(folders: list[str], size, channels: int, salt: str = "") -> tuple[str, list]:
    """A key that changes when any image file under the folders is added, removed or changed
    (sha256 of each path and fingerprint, plus size, channels and salt), and the image paths."""
    paths, key = list_images(folders), hashlib.sha256(f"{salt}|{_key(size)}|{channels}".encode())
    where = [ZIPS.find(p) if ".zip" in p.lower() else None for p in paths]
    sources = list(dict.fromkeys(w[0] if w else p for p, w in zip(paths, where)))
    prints = {}
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # an open and two reads a file
        for i in range(0, len(sources), 512):  # a chunk at a time: few futures held at once
            chunk = sources[i:i + 512]
            prints.update(zip(chunk, pool.map(fingerprint, chunk)))
    crcs = {}  # zip file -> {member: CRC-32}, from its central directory
    for p, w in zip(paths, where):  # a zip member: its archive's fingerprint and its own CRC
        key.update(f"|{os.path.abspath(p)}|{prints[w[0] if w else p]}".encode())
        if w:
            if w[0] not in crcs:
                with zipfile.ZipFile(w[0]) as z:
                    crcs[w[0]] = {i.filename: i.CRC for i in z.infolist()}
            key.update(f"|{crcs[w[0]][w[1]]}".encode())
    return key.hexdigest()[:32], paths


FINGERPRINT_BYTES = 4096  # read from each end of a file


def fingerprint(path: str) -> str:
    """A file's size, mtime and a hash of its first and last 4 KiB: a copy that keeps the size
    and mtime (`cp -p`, `rsync -a`) still changes it, as an image's last bytes are compressed
    pixels. An open and 8 KiB read a file: about 0.1 ms with the file in the page cache (10 s
    for 100,000 images); a cold disk adds its seeks."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        head = f.read(FINGERPRINT_BYTES)
        f.seek(max(st.st_size - FINGERPRINT_BYTES, len(head)))
        tail = f.read(FINGERPRINT_BYTES)
    return f"{st.st_size}|{st.st_mtime_ns}|{hashlib.sha256(head + tail).hexdigest()[:16]}"


class MappedImages:
    """A decode cache file (.npy of uint8 (N, C, H, W)) memory-mapped: `images` is a tensor view
    of its first `count` images, read from disk as they are touched. `release` drops the pages
    this process has touched (they stay in the kernel's page cache), so that reading a whole
    epoch never makes the file resident in this process."""

    def __init__(self, path: str, count: int):
        header = np.load(path, mmap_mode="r")  # reads the header only
        offset, shape = header.offset, (count, *header.shape[1:])
        del header
        self.path = path
        with open(path, "rb") as f:  # copy-on-write: a writable view that never writes the file
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = np.frombuffer(self.mm, np.uint8, count=math.prod(shape), offset=offset)
        self.images = torch.from_numpy(flat.reshape(shape))

    def release(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):  # Linux and most Unixes; elsewhere the OS decides
            self.mm.madvise(mmap.MADV_DONTNEED)


def load_folders(folders: list[str], size, channels: int, *, warn=print,
                 cache_dir: str | None = None, keep_small: bool = False, with_paths: bool = False,
                 mapped: bool = False):
    """Decode every image under the folders (all cores, progress bar) -> uint8 (N, C, H, W).

    Files that are not images by extension are ignored; files that fail to decode are skipped with
    one warning line that counts and names them by reason (undecodable, unreadable, smaller than
    `size` unless keep_small); no usable image at all raises DataError. With cache_dir, the
    decoded set is streamed into a cache file (never all in memory) and read back on the next
    start (decode_cache); where no cache can be written it is decoded into memory. mapped: a
    MappedImages of the cache file instead of a copy in memory (without a cache, a tensor).
    with_paths: also return the file of each image (a list of N paths).
    """
    salt = f"{CACHE_VERSION} keep_small={keep_small}"
    key, paths = folder_key(folders, size, channels, salt)
    if not paths:
        raise DataError(f"no image files (.jpg, .png, ...) in {', '.join(folders)}")
    cache = cache_dir and decode_cache(cache_dir, folders, size, channels, salt=salt, key=key,
                                       paths=paths, keep_small=keep_small, warn=warn)
    if cache:
        cache, count, bad = cache
    else:
        images, bad = decode_all(paths, size, channels, keep_small)
        count = len(images)
    if bad:
        warn(f"warning: used {count} of {len(paths)} image files, skipped {len(bad)}: "
             + skip_summary(bad))
    if not count:
        raise DataError(f"none of the {len(paths)} image files in {', '.join(folders)} could be read")
    if cache:
        images = MappedImages(cache + ".npy", count)
        images = images if mapped else images.images.clone()  # clone: a copy in memory
    else:
        images = torch.from_numpy(images)
    if with_paths:
        skipped = {p for p, _ in bad}
        return images, [p for p in paths if p not in skipped]
    return images


CACHE_VERSION = "decoded v4"  # in every key: a new layout or decoding never reads an old file
CACHE_NAME = re.compile(r"images-([0-9a-f]{16})-([0-9a-f]{32})\.(npy|json)")
OLD_CACHE_NAME = re.compile(r"images-[0-9a-f]{32}\.(npy|json)")  # earlier versions' names


def decode_cache(cache_dir: str, folders: list[str], size, channels: int, *, salt: str, key: str,
                 paths: list[str], keep_small: bool, warn) -> tuple[str, int, list] | None:
    """The decode cache of these folders: images-<source>-<key>.npy, uint8 (len(paths), C, H, W)
    whose first `count` rows are used, and beside it a .json of the count and the skipped files,
    written last (it marks the .npy whole). source names the folders and the decoding, key their
    contents (folder_key). A missing cache is decoded and written; a damaged one (truncated,
    unreadable, not of these files) is decoded again after one warning line; a folder that
    cannot take it (read-only, full, a file in its place) gives one warning line and None: the
    caller decodes into memory. Once a new cache is whole, the older ones of the same source go,
    with the temporaries of killed decodes and files named as earlier versions named them
    (which no version reads any more). -> (the .npy path less '.npy', count, skipped) or None."""
    source = hashlib.sha256(f"{salt}|{_key(size)}|{channels}|{[os.path.abspath(f) for f in folders]}"
                            .encode()).hexdigest()[:16]
    stem = os.path.join(cache_dir, f"images-{source}-{key}")
    try:
        meta = read_cache(stem, (len(paths), channels, *hw(size)))
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
        warn(f"warning: the decode cache {stem}.npy is damaged ({e}); decoding the images again")
        meta = None
    if meta:
        return stem, *meta
    try:
        os.makedirs(cache_dir, exist_ok=True)
        remove_stale_temporaries(cache_dir)
        count, bad = decode_to_file(paths, size, channels, keep_small, stem + ".npy")
        atomic_write(stem + ".json", lambda f: f.write(json.dumps(
            {"count": count, "skipped": bad}).encode()))
    except OSError as e:
        warn(f"warning: cannot write the decode cache in {cache_dir} ({e.strerror or e}); "
             f"decoding into memory instead, not kept for the next start")
        return None
    for name in os.listdir(cache_dir):  # this source's older caches, earlier versions' ones
        m = CACHE_NAME.fullmatch(name)
        if (m and m[1] == source and m[2] != key) or OLD_CACHE_NAME.fullmatch(name):
            with contextlib.suppress(OSError):  # a run still reading one keeps its open copy
                os.remove(os.path.join(cache_dir, name))
    return stem, count, bad


def read_cache(stem: str, shape: tuple) -> tuple[int, list] | None:
    """A complete cache pair stem.npy + stem.json of `shape` -> (count, skipped), or None where
    either file is missing (never written, or a decode stopped before the .json). A damaged pair
    raises ValueError (or OSError, EOFError, KeyError, TypeError) saying what is wrong."""
    if not (os.path.isfile(stem + ".json") and os.path.isfile(stem + ".npy")):
        return None
    with open(stem + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    count, bad = meta["count"], [tuple(b) for b in meta["skipped"]]
    if not (isinstance(count, int) and count + len(bad) == shape[0]
            and all(len(b) == 2 and all(isinstance(x, str) for x in b) for b in bad)):
        raise ValueError(f"its .json does not describe {shape[0]} files")
    with open(stem + ".npy", "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        stored, fortran, dtype = read_header(f)
        offset = f.tell()
    if tuple(stored) != shape or fortran or dtype != np.uint8:
        raise ValueError(f"it holds {dtype} {tuple(stored)}, not uint8 {shape}")
    if os.path.getsize(stem + ".npy") != offset + math.prod(shape):
        raise ValueError(f"{os.path.getsize(stem + '.npy'):,} bytes, not "
                         f"{offset + math.prod(shape):,}")
    return count, bad


STALE_AFTER = 60.0  # seconds untouched after which a dead process's temporary file is stale


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporaries atomic_write leaves when its process is killed (<file>.<pid>.tmp)
    whose process is not running here and which were not written to for STALE_AFTER seconds
    (the latter for a folder shared with other machines, whose processes are not seen here)
    -> the names removed."""
    removed = []
    for name in os.listdir(folder):
        m = re.fullmatch(r".+\.(\d+)\.tmp", name)
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            idle = time.time() - os.path.getmtime(path) if m else 0.0
            if m and not pid_alive(int(m[1])) and idle > STALE_AFTER:
                os.remove(path)
                removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is running on this machine."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is someone else's (PermissionError), or cannot be told
        return True
    return True


def skip_summary(bad: list[tuple[str, str]]) -> str:
    """[(path, reason)] -> '2 could not be decoded (a.jpg, b.png); 1 smaller than 64 px (c.png)'."""
    by_reason = {}
    for path, reason in bad:
        by_reason.setdefault(reason, []).append(path)
    return "; ".join(f"{len(ps)} {r} ({', '.join(ps[:3])}{', ...' if len(ps) > 3 else ''})"
                     for r, ps in by_reason.items())


def decode_into(put, paths: list[str], size, channels: int,
                keep_small: bool = False) -> tuple[int, list[list[str]]]:
    """Decode images on all cores with a progress bar, in order, calling put(i, image) for the
    i-th image used (uint8 (C, H, W)) -> count and the [path, reason] of every file skipped.
    Only a chunk of decoded images is held at a time."""
    def decode(path):
        try:
            return load_image(path, size, channels, keep_small)
        except SkipImage as e:
            return str(e)

    count, bad = 0, []
    for path, arr in zip(paths, decode_parallel(paths, decode, f"loading {len(paths)} images")):
        if isinstance(arr, str):
            bad.append([path, arr])
        else:
            put(count, arr)
            count += 1
    return count, bad


def decode_all(paths: list[str], size, channels: int,
               keep_small: bool = False) -> tuple[np.ndarray, list[list[str]]]:
    """decode_into an array in memory -> uint8 (N, C, H, W) of the images used, and the skipped."""
    out = np.empty((len(paths), channels, *hw(size)), np.uint8)
    count, bad = decode_into(out.__setitem__, paths, size, channels, keep_small)
    return out[:count], bad


def decode_to_file(paths: list[str], size, channels: int, keep_small: bool,
                   path: str) -> tuple[int, list[list[str]]]:
    """decode_into an .npy file of len(paths) rows (the first `count` used, the rest zeros),
    appended image by image with plain writes: neither the set nor the file is ever held in
    memory, whatever its size. Written beside `path` and renamed when complete."""
    shape = (len(paths), channels, *hw(size))
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    result = []

    def write(f):
        np.lib.format.write_array_header_1_0(f, header)
        result[:] = decode_into(lambda i, arr: f.write(arr.tobytes()), paths, size, channels,
                                keep_small)
        f.truncate(f.tell() + (len(paths) - result[0]) * math.prod(shape[1:]))

    atomic_write(path, write)
    return result[0], result[1]


def decode_parallel(paths: list[str], decode, desc: str, console=None, chunk: int = 512):
    """decode(path) for every path on all cores, yielded in order, with a progress bar. Paths go
    to the pool `chunk` at a time, so a consumer that keeps only what it needs stays bounded."""
    with ThreadPoolExecutor(os.cpu_count()) as pool, progress_bar(console) as bar:
        task = bar.add_task(desc, total=len(paths))
        for start in range(0, len(paths), chunk):
            for out in pool.map(decode, paths[start:start + chunk]):
                yield out
                bar.advance(task)


def atomic_write(path: str, write) -> None:
    """write(f) into a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a crash or a full disk mid-write never leaves a half-written file there (nor the temporary)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def demo_faces(n: int, size, channels: int = 3, seed: int = 0) -> Tensor:
    """n procedurally drawn cartoon faces, the same for the same seed -> uint8 (n, C, H, W)
    (size = S or (H, W); drawn square at the longer side, centre-cropped).

    Random background, skin tone, face position and size, hair colour and style, eye colour.
    """
    rng = np.random.default_rng(seed)
    (H, W), size = hw(size), max(hw(size))
    s = 4 * size  # draw large, then downsample for anti-aliasing
    out = np.empty((n, channels, H, W), dtype=np.uint8)
    hair_colours = [(20, 20, 20), (230, 200, 90), (200, 60, 40), (60, 90, 200), (240, 150, 190),
                    (110, 70, 40), (90, 180, 90), (235, 235, 240)]
    eye_colours = [(40, 90, 200), (200, 40, 40), (40, 150, 60), (150, 60, 180), (200, 140, 30)]
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(60, 230, 3))
        im = Image.new("RGB", (s, s), bg)
        d = ImageDraw.Draw(im)
        cx, cy = s * (0.5 + rng.uniform(-0.08, 0.08)), s * (0.55 + rng.uniform(-0.06, 0.06))
        r = s * rng.uniform(0.26, 0.34)  # face radius
        hair = hair_colours[rng.integers(len(hair_colours))]
        eye = eye_colours[rng.integers(len(eye_colours))]
        skin = tuple(int(c) for c in np.array([255, 222, 196]) - rng.integers(0, 40))
        long_hair = rng.random() < 0.5
        if long_hair:  # hair behind the face, down to the shoulders
            d.rectangle((cx - 1.25 * r, cy - 0.3 * r, cx + 1.25 * r, cy + 1.3 * r), fill=hair)
        d.ellipse((cx - 1.25 * r, cy - 1.35 * r, cx + 1.25 * r, cy + 0.6 * r), fill=hair)
        d.ellipse((cx - r, cy - 0.9 * r, cx + r, cy + 1.05 * r), fill=skin)
        d.chord((cx - 1.1 * r, cy - 1.3 * r, cx + 1.1 * r, cy - 0.05 * r), 180, 360, fill=hair)
        for side in (-1, 1):  # big anime eyes: white, iris, highlight
            ex, ey, ew, eh = cx + side * 0.4 * r, cy + 0.22 * r, 0.22 * r, 0.3 * r
            d.ellipse((ex - ew, ey - eh, ex + ew, ey + eh), fill=(255, 255, 255))
            d.ellipse((ex - 0.8 * ew, ey - 0.75 * eh, ex + 0.8 * ew, ey + eh), fill=eye)
            d.ellipse((ex - 0.5 * ew, ey - 0.6 * eh, ex, ey - 0.1 * eh), fill=(255, 255, 255))
        d.arc((cx - 0.18 * r, cy + 0.5 * r, cx + 0.18 * r, cy + 0.72 * r), 20, 160,
              fill=(150, 50, 60), width=max(1, s // 64))
        im = im.resize((size, size), Image.LANCZOS).convert("RGB" if channels == 3 else "L")
        arr = np.asarray(im)
        arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        out[i] = arr[:, (size - H) // 2:(size - H) // 2 + H, (size - W) // 2:(size - W) // 2 + W]
    return torch.from_numpy(out)


def grid(images: Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> Tensor:
    """uint8 (N, C, H, W) -> one uint8 (3, rows (H + padding) + padding, cols (W + padding) +
    padding) picture: nrow images a row (fewer if N is smaller), in order, on a pad_value
    background; one channel is shown as grey. A single image is returned as it is (C, H, W),
    unpadded, as torchvision's make_grid does."""
    n, c, h, w = images.shape
    if n == 1:
        return images[0]
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    out = torch.full((3, rows * (h + padding) + padding, cols * (w + padding) + padding),
                     pad_value, dtype=torch.uint8)
    for i, img in enumerate(images.expand(-1, 3, -1, -1) if c == 1 else images):
        y, x = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        out[:, y:y + h, x:x + w] = img
    return out


def save_png(picture: Tensor, path: str) -> None:
    """uint8 (C, H, W) -> a PNG file."""
    hwc = np.ascontiguousarray(picture.permute(1, 2, 0).cpu().numpy())
    Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).save(path)
