"""The training feed: where the training images live (the training device, or the decode cache
memory-mapped from disk), and their batches: shuffled, flipped, split across processes, gathered
ahead by a thread when they come from disk.
"""
import contextlib
import math
import queue
import threading

import torch
from torch import Tensor

from core.configs import DataConfig
from core.spec import ModelSpec
from data import DataError, MappedImages, demo_faces, load_folders, to_model

FAULT_AROUND = 1 << 16  # a page fault on a file mapping may map up to 64 KiB around it (Linux)
DISK_RESIDENT = 1 << 30  # the most of the cache file the disk path keeps mapped in, by default


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the training device (the host's available memory for the CPU), or None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return None


def placement(images, device: torch.device, choice: str,
              limit: int | None) -> tuple[bool, int, str]:
    """Where the training images live: (on disk?, the most bytes of the file kept resident when
    on disk, the reason in one line). images: MappedImages (a cache file) or a tensor; choice:
    auto | memory | disk; limit: bytes the images may take in memory (None: half the free
    memory of the device)."""
    mapped = isinstance(images, MappedImages)
    x = images.images if mapped else images
    size = f"{len(x):,} images of {'x'.join(map(str, x.shape[1:]))} ({x.numel() / 2**20:,.1f} MiB)"
    free = free_memory(device) if limit is None else None
    budget = limit if limit is not None else None if free is None else free // 2
    resident = min(budget or DISK_RESIDENT, DISK_RESIDENT)
    why = (f"--data-memory {limit / 2**20:g} MiB" if limit is not None else
           "the free memory is unknown" if free is None else
           f"half the free memory of {'the host' if device.type == 'cpu' else device.type}: "
           f"{budget / 2**20:,.0f} MiB")
    if choice == "disk" or (choice == "auto" and budget is not None and x.numel() > budget):
        if not mapped:
            raise DataError("the disk path reads the decode cache file: train on --data-folders "
                            "with a --cache-dir, or use --data-on memory")
        return True, resident, (
            f"data: {size} read from disk, memory-mapped from {images.path}, batches gathered "
            f"ahead by a thread ({'--data-on disk' if choice == 'disk' else 'more than ' + why}; "
            f"at most {resident / 2**20:,.0f} MiB of the file resident)")
    return False, 0, (f"data: {size} in memory on {device.type} "
                      f"({'--data-on memory' if choice == 'memory' else 'within ' + why})")


def training_images(source: DataConfig, model: ModelSpec, device: torch.device, say=print):
    """The training images, at the model's size, where they will live (placement: on the
    device, or the decode cache memory-mapped from disk) -> (images: a tensor or MappedImages,
    their paths (None for --demo), the most bytes of the file kept resident on disk)."""
    paths = None
    if source.demo:
        images = demo_faces(source.demo_images, model.img_size, model.img_channels, seed=0)
    else:  # a memory-mapped view of the decode cache: nothing is read into memory yet
        images, paths = load_folders(source.data_folders, model.img_size, model.img_channels,
                                     warn=say, cache_dir=source.cache_dir,
                                     keep_small=source.keep_small, with_paths=True, mapped=True)
    limit = None if source.data_memory is None else int(source.data_memory * 2**20)
    on_disk, resident, why = placement(images, device, source.data_on, limit)
    say(why)
    if isinstance(images, MappedImages) and not on_disk:
        images = images.images.to(device, copy=True)  # read into memory once
    return images, paths, resident


class ImageDataset:
    """The training images, uint8 (N, C, H, W): batches are shuffled, flipped and scaled.
    In memory (a tensor, moved to the training device) or on disk (a MappedImages: each batch is
    gathered from the file on the CPU by a thread that reads `ahead` batches in advance, pinned,
    and copied to the device; at most `resident` bytes of the file stay mapped in). Both paths
    give the same batches. Optional tokens: int64 (N, L), each image's caption."""

    def __init__(self, images, device: torch.device, tokens: Tensor | None = None,
                 hflip: bool = True, resident: int = DISK_RESIDENT, ahead: int = 4):
        self.mapped = images if isinstance(images, MappedImages) else None
        images = self.mapped.images if self.mapped else images.to(device)  # on disk: a view
        assert images.dtype == torch.uint8 and images.ndim == 4, "images: uint8 (N, C, H, W)"
        self.images, self.resident, self.ahead = images, resident, ahead
        self.tokens = None if tokens is None else tokens.to(device)
        self.device, self.hflip = device, hflip  # hflip False: never mirrored
        self.host_images = None  # plain_batches' copy on the host

    def __len__(self) -> int:
        return len(self.images)

    def num_batches(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
        """Batches in an epoch: the last partial one is dropped under world > 1 or drop_last."""
        if world > 1 or drop_last:
            return len(self) // batch_size
        return math.ceil(len(self) / batch_size)

    def batches(self, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1,
                drop_last: bool = False):
        """One epoch of float batches (B, C, H, W) in [-1, 1], random order and random h-flips,
        gathered, flipped and scaled on the device in whole-batch operations. With world > 1
        processes, this one's share (every world-th image) of each full global batch."""
        for x, _ in self.batches_with_tokens(batch_size, generator, rank, world, drop_last):
            yield x

    def batches_with_tokens(self, batch_size: int, generator: torch.Generator, rank: int = 0,
                            world: int = 1, drop_last: bool = False, *, skip: int = 0):
        """As batches, with each batch's caption tokens (B, L) (None without captions).
        The epoch's order and flips go to the device once, at its start: no step waits for a
        host-to-device copy (the disk path's batches come pinned, copied asynchronously).
        skip: the epoch's first batches not to yield (nor read): a resume in mid-epoch."""
        order, flips = epoch_plan(len(self), generator, self.hflip)  # (N,) on the CPU
        shares = batch_shares(len(self), batch_size, rank, world, drop_last)[skip:]
        on_device = [to_device(v, self.device) for v in (order, flips)]
        gathered = (self.read_ahead([order[s] for s in shares]) if self.mapped else
                    (self.images.index_select(0, on_device[0][s]) for s in shares))
        for share, x in zip(shares, gathered):
            idx, flip = on_device[0][share], on_device[1][share]
            x = x.to(self.device, non_blocking=True)  # uint8 (B, C, H, W)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield to_model(x), None if self.tokens is None else self.tokens[idx]

    def read_ahead(self, plan: list[Tensor]):
        """uint8 images (B, C, H, W) on the CPU (pinned for a GPU) for each index tensor of the
        plan, gathered from the memory-mapped file by a background thread up to `ahead` batches
        early. Before a batch would take the pages touched since the last release past
        `resident`, they are released."""
        done, out = threading.Event(), queue.Queue(self.ahead)
        item = self.images[0].numel()
        per_image = (item // FAULT_AROUND + 2) * FAULT_AROUND  # most bytes one read maps in
        pin = self.device.type == "cuda"

        def work():
            touched = 0
            try:
                for idx in plan:
                    if touched + len(idx) * per_image > self.resident:
                        self.mapped.release()
                        touched = 0
                    x = self.images.index_select(0, idx)  # the gather reads the file
                    touched += len(idx) * per_image
                    out.put(x.pin_memory() if pin else x)
                    if done.is_set():
                        return
                out.put(None)
            except BaseException as e:  # handed to the consumer, raised there
                out.put(e)

        thread = threading.Thread(target=work, name="read-ahead", daemon=True)
        thread.start()
        try:
            while (got := out.get()) is not None:
                if isinstance(got, BaseException):
                    raise got
                yield got
        finally:  # the consumer stopped (end, --max-steps, Ctrl-C): let the thread finish
            done.set()
            while thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    out.get(timeout=0.1)
            self.mapped.release()

    def plain_batches(self, batch_size: int, generator: torch.Generator, rank: int = 0,
                      world: int = 1, drop_last: bool = False, *, skip: int = 0):
        """The same batches the per-image way (a DataLoader-style reference): one image at a time
        is converted and flipped on the CPU, then stacked and copied to the device. The images
        are read from a host copy made once (not the device's, every epoch)."""
        if self.host_images is None:
            self.host_images = self.images.cpu()
        images = self.host_images
        for idx, flip in batch_plan(len(self), batch_size, generator, rank=rank, world=world,
                                    hflip=self.hflip, drop_last=drop_last, skip=skip):
            items = [to_model(images[i]).flip(-1) if f else to_model(images[i])
                     for i, f in zip(idx.tolist(), flip.tolist())]
            yield (torch.stack(items).to(self.device),
                   None if self.tokens is None else self.tokens[idx.to(self.device)])


def epoch_plan(n: int, generator: torch.Generator, hflip: bool = True) -> tuple[Tensor, Tensor]:
    """An epoch's random order (n,) int64 and flips (n,) bool, on the CPU. Both are drawn at the
    epoch's start, so the generator moves the same whether or not the epoch is read to its end."""
    order = torch.randperm(n, generator=generator)
    flips = (torch.rand(n, generator=generator) < 0.5) & hflip  # drawn either way
    return order, flips


def batch_shares(n: int, batch_size: int, rank: int = 0, world: int = 1,
                 drop_last: bool = False) -> list[slice]:
    """This process's share of each batch of an epoch's order, as slices: batch i is positions
    i B .. (i + 1) B - 1, of which rank r takes every world-th from r. With world > 1 (every
    process must take the same number of steps) or drop_last the last partial batch is dropped."""
    return [slice(i + rank, min(i + batch_size, n), world) for i in range(0, n, batch_size)
            if not (world > 1 or drop_last) or i + batch_size <= n]


def batch_plan(n: int, batch_size: int, generator: torch.Generator, *, rank: int = 0,
               world: int = 1, hflip: bool = True, drop_last: bool = False, skip: int = 0):
    """An epoch's batches as (indices (B,), flip (B,) bool) on the CPU: epoch_plan cut into
    batch_shares, the first `skip` left out."""
    order, flips = epoch_plan(n, generator, hflip)
    for share in batch_shares(n, batch_size, rank, world, drop_last)[skip:]:
        yield order[share], flips[share]


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on the device; to a GPU from pinned memory, so the copy does not block."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
