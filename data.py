"""In-memory image data for ddpm.py: folders of pictures (or built-in demo faces) as uint8 (N, C, H, W).

to_model / to_uint8 are the only two conversions between stored pixels and the model's [-1, 1].
"""
import contextlib
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

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
    """Every file with an image extension under the folders (recursively), sorted per folder."""
    paths = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise DataError(f"data folder not found: {folder}")
        for root, files in walk(folder):
            paths += [os.path.join(root, f) for f in files
                      if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return paths


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


def load_image(path: str, size: int, channels: int, keep_small: bool = False) -> np.ndarray:
    """Decode one image (the first frame of an animation), flatten transparency onto white,
    resize the shorter side to `size`, centre-crop. Returns uint8 (channels, size, size).

    Raises SkipImage for an image smaller than `size` unless keep_small (then it is upscaled).
    """
    try:
        im = Image.open(path)
    except PermissionError:
        raise SkipImage("could not be read (permission denied)") from None
    except Image.DecompressionBombError:  # over 2 x Image.MAX_IMAGE_PIXELS: refuse, never decode
        raise SkipImage(f"too large (over {2 * Image.MAX_IMAGE_PIXELS} pixels)") from None
    except Exception:  # any decoder failure means "not a usable image"
        raise SkipImage("could not be decoded") from None
    with im:
        if min(im.size) < size and not keep_small:
            raise SkipImage(f"smaller than {size} px")
        im.draft("RGB" if channels == 3 else "L", (size, size))  # big JPEGs: decode at 1/2..1/8
        try:
            im.load()
        except Exception:
            raise SkipImage("could not be decoded") from None
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: keep the top 8 bits
            im = Image.fromarray((np.asarray(im, dtype=np.int64) // 257).clip(0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im.alpha_composite(rgba)
        im = im.convert("RGB" if channels == 3 else "L")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def folder_key(folders: list[str], size: int, channels: int, salt: str = "") -> tuple[str, list]:
    """A key that changes when any image file under the folders is added, removed or modified
    (sha256 of each path, size and mtime, plus size, channels and salt), and the image paths."""
    paths, key = list_images(folders), hashlib.sha256(f"{salt}|{size}|{channels}".encode())
    for p in paths:
        st = os.stat(p)
        key.update(f"|{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return key.hexdigest()[:32], paths


def load_folders(folders: list[str], size: int, channels: int, warn=print,
                 cache_dir: str | None = None, keep_small: bool = False, with_paths: bool = False):
    """Decode every image under the folders (all cores, progress bar) -> uint8 (N, C, size, size).

    Files that are not images by extension are ignored; files that fail to decode are skipped with
    one warning line that counts and names them by reason (undecodable, unreadable, smaller than
    `size` unless keep_small); no usable image at all raises DataError. With cache_dir, the
    decoded set is kept in cache_dir/images-<folder_key>.npz and read back on the next start.
    with_paths: also return the file of each image (a list of N paths).
    """
    key, paths = folder_key(folders, size, channels, f"decoded v2 keep_small={keep_small}")
    if not paths:
        raise DataError(f"no image files (.jpg, .png, ...) in {', '.join(folders)}")
    cache = cache_dir and os.path.join(cache_dir, f"images-{key}.npz")
    if cache and os.path.isfile(cache):
        with np.load(cache) as z:
            images, bad = z["images"], [tuple(s.split("|", 1)) for s in z["skipped"]]
    else:
        images, bad = decode_all(paths, size, channels, keep_small)
    if bad:
        warn(f"warning: used {len(images)} of {len(paths)} image files, skipped {len(bad)}: "
             + skip_summary(bad))
    if not len(images):
        raise DataError(f"none of the {len(paths)} image files in {', '.join(folders)} could be read")
    if cache and not os.path.isfile(cache):
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write(cache, lambda f: np.savez(  # a file object: savez would append .npz to a name
            f, images=images, skipped=np.array([f"{r}|{p}" for p, r in bad], dtype=str)))
    if with_paths:
        skipped = {p for p, _ in bad}
        return torch.from_numpy(images), [p for p in paths if p not in skipped]
    return torch.from_numpy(images)


def skip_summary(bad: list[tuple[str, str]]) -> str:
    """[(path, reason)] -> '2 could not be decoded (a.jpg, b.png); 1 smaller than 64 px (c.png)'."""
    by_reason = {}
    for path, reason in bad:
        by_reason.setdefault(reason, []).append(path)
    return "; ".join(f"{len(ps)} {r} ({', '.join(ps[:3])}{', ...' if len(ps) > 3 else ''})"
                     for r, ps in by_reason.items())


def decode_all(paths: list[str], size: int, channels: int,
               keep_small: bool = False) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode images on all cores with a progress bar -> uint8 (N, C, size, size) and the
    (path, reason) of every file skipped."""
    def decode(path):
        try:
            return load_image(path, size, channels, keep_small)
        except SkipImage as e:
            return str(e)

    images, bad = [], []
    for path, arr in zip(paths, decode_parallel(paths, decode, f"loading {len(paths)} images")):
        (bad.append((path, arr)) if isinstance(arr, str) else images.append(arr))
    empty = np.empty((0, channels, size, size), np.uint8)
    return (np.stack(images) if images else empty), bad


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


def demo_faces(n: int, size: int, channels: int = 3, seed: int = 0) -> Tensor:
    """n procedurally drawn cartoon faces, the same for the same seed -> uint8 (n, C, size, size).

    Random background, skin tone, face position and size, hair colour and style, eye colour.
    """
    rng = np.random.default_rng(seed)
    s = 4 * size  # draw large, then downsample for anti-aliasing
    out = np.empty((n, channels, size, size), dtype=np.uint8)
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
        out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return torch.from_numpy(out)


class ImageDataset:
    """All training images as one uint8 (N, C, H, W) tensor; batches are shuffled, flipped, scaled.
    Optional tokens: int64 (N, L), each image's caption, which batches_with_tokens returns too."""

    def __init__(self, images: Tensor, device: torch.device, tokens: Tensor | None = None,
                 hflip: bool = True):
        assert images.dtype == torch.uint8 and images.ndim == 4, "images: uint8 (N, C, H, W)"
        self.images = images.to(device)  # the whole set lives on the training device
        self.tokens = None if tokens is None else tokens.to(device)
        self.device, self.hflip = device, hflip  # hflip False: never mirrored

    def __len__(self) -> int:
        return len(self.images)

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return math.ceil(len(self) / batch_size) if world == 1 else len(self) // batch_size

    def batches(self, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        """One epoch of float batches (B, C, H, W) in [-1, 1], random order and random h-flips,
        gathered, flipped and scaled on the device in whole-batch operations. With world > 1
        processes, this one's share (every world-th image) of each full global batch."""
        for x, _ in self.batches_with_tokens(batch_size, generator, rank, world):
            yield x

    def batches_with_tokens(self, batch_size: int, generator: torch.Generator, rank: int = 0,
                            world: int = 1):
        """As batches, with each batch's caption tokens (B, L) (None without captions)."""
        for idx, flip in batch_plan(len(self), batch_size, generator, rank, world, self.hflip):
            idx = idx.to(self.device)
            x = self.images[idx]
            x = torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x)
            yield to_model(x), None if self.tokens is None else self.tokens[idx]

    def plain_batches(self, batch_size: int, generator: torch.Generator, rank: int = 0,
                      world: int = 1):
        """The same batches the per-image way (a DataLoader-style reference): one image at a time
        is converted and flipped on the CPU, then stacked and copied to the device."""
        images = self.images.cpu()
        for idx, flip in batch_plan(len(self), batch_size, generator, rank, world, self.hflip):
            items = [to_model(images[i]).flip(-1) if f else to_model(images[i])
                     for i, f in zip(idx.tolist(), flip.tolist())]
            yield (torch.stack(items).to(self.device),
                   None if self.tokens is None else self.tokens[idx.to(self.device)])


def batch_plan(n: int, batch_size: int, generator: torch.Generator, rank: int = 0,
               world: int = 1, hflip: bool = True):
    """An epoch's random order and flips: (indices (B,), flip (B,) bool) per batch, on the CPU.
    With world > 1: the last partial batch is dropped and this rank gets [rank::world] of each."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        flip = (torch.rand(len(idx), generator=generator) < 0.5) & hflip  # drawn either way
        if world > 1 and len(idx) < batch_size:
            return
        yield idx[rank::world], flip[rank::world]
