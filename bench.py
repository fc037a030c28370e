"""bench.py: how fast ddpm.py trains and samples on one device, variant by variant, in one table.

Everything runs through ddpm.Program (the code users run; a step is Program.train_step, the one
the training loop calls): img/s, ms/step, peak memory, model FLOPs
per image (torch.utils.flop_counter), MFU against an assumed dense peak, sampling and data times.
"""
import argparse
import contextlib
import gc
import importlib
import importlib.util
import io
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import config
import ddpm
import data
import evaluate
from data import DataError, ImageDataset, MappedImages, load_folders, to_model
from ui import make_console

SMALL = ["--img-size", "32", "--num-channels", "32", "--channel-multiples", "1", "2", "2",
         "--has-attn", "f", "t", "f", "--num-blocks", "1"]
# The architecture of the comparison with the reference program (our CPU step against theirs).
PARITY = ["--img-size", "32", "--num-channels", "32", "--channel-multiples", "1", "2", "2",
          "--has-attn", "f", "t", "f", "--num-blocks", "2"]
TOKENS = {"plain", "fp32", "bf16", "channels_last", "compile"}
# Dense peak TFLOP/s from the datasheets (bf16 with fp32 accumulation); first name match wins.
_H100 = {"bf16": 989, "tf32": 494, "fp32": 67}
PEAKS = [("H100 PCIe", "H100 PCIe", {"bf16": 756, "tf32": 378, "fp32": 51}),
         ("H100", "H100 SXM", _H100), ("H200", "H200 (as H100 SXM)", _H100),
         ("A100", "A100", {"bf16": 312, "tf32": 156, "fp32": 19.5}),
         ("4090", "RTX 4090", {"bf16": 165, "tf32": 82.6, "fp32": 82.6})]


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """bench.py's own flags, and the rest (passed to config.parse_args)."""
    p = argparse.ArgumentParser(
        description="Benchmark ddpm.py training and sampling: img/s, memory, FLOPs, MFU.",
        epilog="Any other flag goes to ddpm.py unchanged: the model flags --img-size, "
               "--num-channels, --channel-multiples, --has-attn, --num-blocks, --timesteps, ... "
               "(python ddpm.py --help; its defaults are the default config).")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if one is visible)")
    p.add_argument("--small", action="store_true",
                   help="CPU preset: " + " ".join(SMALL) + " --batch-size 32")
    p.add_argument("--batch-size", type=int, help="training batch (32 with --small, else 128)")
    p.add_argument("--warmup", type=int, help="untimed steps first (10 on CUDA, 2 on CPU)")
    p.add_argument("--steps", type=int, help="timed training steps (50 on CUDA, 6 on CPU)")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling step (64)")
    p.add_argument("--sample-steps", type=int,
                   help="timed DPM-Solver++ sampling steps (20 CUDA, 3 CPU)")
    p.add_argument("--ancestral-steps", type=int,
                   help="ancestral steps timed, the time scaled to all T (200 CUDA, 3 CPU)")
    p.add_argument("--variants", help="comma list, each a +-joined set of: plain (per-image data "
                   "path), fp32 or bf16 (else the program's choice: bf16 on CUDA, fp32 on CPU), "
                   "channels_last, compile; default plain-fp32,fp32,bf16 on CUDA, "
                   "plain-fp32,fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, help="assumed peak (default: by GPU name)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--data-folder", metavar="DIR", help="also time decoding DIR, then its cache")
    p.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    p.add_argument("--vs-reference", metavar="FILE.py",
                   help="instead: our whole training step against the reference program's "
                        "(e.g. ../shared/anchors/reference_ddpm.py) at " + " ".join(PARITY) +
                        ", batch 32, fp32, interleaved; --steps per round, --rounds")
    p.add_argument("--rounds", type=int, default=6, help="rounds of --vs-reference")
    p.add_argument("--data-speed", type=float, metavar="GiB",
                   help="instead: batches/s of the data path alone, from memory and from disk "
                        "(cold: the file's pages dropped from the page cache first; then warm), "
                        "on a synthetic 64x64 decode-cache file of GiB, and resident memory")
    p.add_argument("--data-batches", type=int, default=200,
                   help="batches timed per path with --data-speed")
    p.add_argument("--gpu-check", action="store_true",
                   help="instead: does this setup work, and how fast? The CUDA tests, a round "
                        "trip through ddpm.py (train, resume, each sampler, --eval-fid; memory, "
                        "disk, --compile, --super-res), torchrun, then the benchmark table: one "
                        "report, PASS/FAIL per check (README: GPU check). --device cpu "
                        "rehearses it with a tiny model")
    p.add_argument("--report", default="gpu-check.txt", metavar="PATH",
                   help="--gpu-check writes its report here (gpu-check.txt), every step's whole "
                        "output beside it (.log)")
    p.add_argument("--budget", type=float, default=480, metavar="SECONDS",
                   help="--gpu-check: its time (480); checks still to run when it is spent fail "
                        "unrun")
    p.add_argument("--gpu-check-k", help=argparse.SUPPRESS)  # pytest -k of the rehearsal's tests
    b, rest = p.parse_known_args(argv)
    b.device_typed, b.device = b.device is not None, b.device or (
        "cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = b.device.startswith("cuda")
    for k, v_gpu, v_cpu in [("warmup", 10, 2), ("steps", 50, 6), ("sample_steps", 20, 3),
                            ("ancestral_steps", 200, 3)]:
        setattr(b, k, getattr(b, k) or (v_gpu if on_gpu else v_cpu))
    b.batch_size = b.batch_size or (32 if b.small or b.vs_reference else 128)
    b.variants = b.variants or ("plain-fp32,fp32,bf16" if on_gpu else "plain-fp32,fp32")
    return b, rest


def build(b, rest: list[str], tmp: str, quiet: bool = True) -> ddpm.Program:
    """A training Program on demo faces (of the model the flags give: the --demo preset does
    not apply) that writes only into tmp; quiet: no config line."""
    argv = (SMALL * b.small + ["--demo-images", str(8 * b.batch_size), "--seed", "0"] + rest
            + ["--train", "--demo", "--device", b.device, "--batch-size", str(b.batch_size),
               "--save-dir", tmp, "--ckpt-save-dir", tmp, "--cache-dir", tmp])
    args, typed = config.parse_args(argv)
    parser = config.build_parser()
    for k in config.DEMO_PRESET:  # demo faces as data, not the demo preset's model
        if k not in typed:
            setattr(args, k, parser.get_default(k))
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        return ddpm.Program(args, typed)


def timed(device: torch.device, fn, n: int = 1) -> float:
    """Seconds per call of fn: on a GPU the mean of n calls, synchronised around the loop; on a
    CPU the median call, which other processes' load disturbs less."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    stamps = [time.perf_counter()]
    for _ in range(n):
        fn()
        stamps.append(time.perf_counter())
    if cuda:
        torch.cuda.synchronize(device)
        return (time.perf_counter() - stamps[0]) / n
    return statistics.median(t1 - t0 for t0, t1 in zip(stamps, stamps[1:]))


def flops_per_image(prog: ddpm.Program, x0: torch.Tensor) -> tuple[float, float]:
    """Model FLOPs per image (matmul, conv, attention): loss forward + backward, one UNet forward.
    Attention runs on the math backend here, so no fused kernel's recomputation is counted."""
    nets = prog.trainer
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as train:
        nets.diffusion(x0).backward()
    nets.model.zero_grad(set_to_none=True)
    t = torch.zeros(len(x0), dtype=torch.long, device=x0.device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        nets.model(x0, t)
    return train.get_total_flops() / len(x0), fwd.get_total_flops() / len(x0)


def peak_tflops(device: torch.device, amp_dtype, override: float | None):
    """The assumed dense peak in TFLOP/s (None if unknown), and where it comes from."""
    if override:
        return override, f"{override:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "none assumed on a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    # fp32 runs its convolutions (nearly all the FLOPs) in TF32 unless cuDNN is told otherwise.
    kind = "bf16" if amp_dtype else "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    for fragment, label, peaks in PEAKS:
        if fragment in name:
            return peaks[kind], f"{label} dense {kind} {peaks[kind]:g} TFLOP/s"
    return None, f"none known for {name} (give --peak-tflops)"


def train_steps(prog: ddpm.Program, data: ImageDataset, steps: int, batch_size: int,
                plain: bool = False) -> None:
    """`steps` optimizer steps (Program.train_step, the training loop's step) on the first
    steps x batch_size images (epoch after epoch when there are fewer), read by the device data
    path (plain: the per-image one). Only full batches: a short one would time another shape."""
    n = min(steps * batch_size, len(data) // batch_size * batch_size)
    assert n, f"train_steps needs at least one batch of {batch_size} images, got {len(data)}"
    ds = ImageDataset(data.images[:n], prog.device)
    batches = ds.plain_batches if plain else ds.batches_with_tokens
    done = 0
    while done < steps:
        for x0, tokens in batches(batch_size, prog.data_gen):
            prog.train_step(x0, tokens)
            done += 1
            if done == steps:
                break


def run_variant(b, rest, tmp, data, toks: set[str], sample: bool, flops: float) -> dict:
    """Train (warm-up, then timed steps), then optionally sample, with one variant."""
    cuda = b.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(b.device)
    prog = build(b, rest, tmp)
    nets = prog.trainer
    if "fp32" in toks:
        nets.amp_dtype = None
    if "bf16" in toks:
        nets.amp_dtype = torch.bfloat16
    if "channels_last" in toks:
        for m in (nets.model, nets.ema):
            m.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its params
    if "compile" in toks:  # in place (nn.Module.compile): diffusion.model is nets.model
        nets.model.compile()
        nets.ema.compile()
    loop = lambda steps: train_steps(prog, data, steps, b.batch_size, "plain" in toks)  # noqa
    loop(b.warmup)
    secs = timed(prog.device, lambda: loop(b.steps)) / b.steps  # per step
    if cuda:
        mem = f"{torch.cuda.max_memory_allocated(b.device) / 2**30:.2f} GiB"
    else:  # KiB on Linux; the whole process so far, not this variant alone
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB*"
    img_s = b.batch_size / secs
    peak, peak_desc = peak_tflops(prog.device, nets.amp_dtype, b.peak_tflops)
    row = {"img_s": img_s, "ms_step": 1e3 * secs, "peak_mem": mem, "peak_tflops": peak,
           "peak": peak_desc, "mfu": flops * img_s / (peak * 1e12) if peak else None}
    if sample:  # the real sampling loop (Drawer.draw) with EMA weights
        draw, T = prog.drawer.draw, nets.diffusion.T
        draw(b.sample_batch, sampler=("dpm++", 2))  # warm-up (and compilation)
        secs = timed(prog.device, lambda: draw(b.sample_batch, sampler=("dpm++", b.sample_steps)))
        row["sample_img_steps_s"], row["dpm_s"] = b.sample_batch * b.sample_steps / secs, secs
        # Ancestral steps all cost the same: time the last k of the chain, scale to all T.
        k = min(b.ancestral_steps, T)
        secs = timed(prog.device, lambda: draw(b.sample_batch, sampler=("ddpm", 0), start=k - 1))
        row["ancestral_s"], row["ancestral_timed"] = secs * T / k, k
    del prog
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def measure(b, rest, variants: dict[str, set[str]], console: Console) -> dict:
    """All figures: data, FLOPs, then each variant in turn."""
    with tempfile.TemporaryDirectory() as tmp:
        prog = build(b, rest, tmp, quiet=False)
        dev, a = prog.device, prog.args
        out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
               f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
               "torch": torch.__version__, "config": config.config_of(prog.args),
               "batch_size": b.batch_size,
               "params": sum(p.numel() for p in prog.trainer.model.parameters())}
        t0 = time.perf_counter()
        data = prog.load_data()
        out["demo_images"], out["demo_set_s"] = len(data), time.perf_counter() - t0
        x0 = next(data.batches(min(b.batch_size, 8), prog.data_gen))
        out["train_flops"], out["fwd_flops"] = flops_per_image(prog, x0)
        for path in ("batches", "plain_batches"):  # the data path alone: 1 epoch warm, 3 timed
            epoch = lambda: sum(1 for _ in getattr(data, path)(b.batch_size, prog.data_gen))
            epoch()
            out[f"{path}_img_s"] = len(data) / timed(dev, epoch, 3)
        del prog
        if b.data_folder:
            for key in ("folder_first_s", "folder_cached_s"):  # decode on all cores, then cache
                t0 = time.perf_counter()
                out["folder_images"] = len(load_folders([b.data_folder], a.img_size,
                                                        a.img_channels, console.print, tmp))
                out[key] = time.perf_counter() - t0
        out["rows"], out["sample_batch"], out["sample_steps"] = {}, b.sample_batch, b.sample_steps
        for v, toks in variants.items():  # sampling once per precision and layout
            sample = "plain" not in toks or toks - {"plain"} not in variants.values()
            out["rows"][v] = run_variant(b, rest, tmp, data, toks, sample, out["train_flops"])
    return out


def report(b, variants: dict[str, set[str]], out: dict, console: Console) -> None:
    """The table, then one line each for FLOPs, sampling and data."""
    rows, c, gf = out["rows"], out["config"], out["train_flops"] / 1e9
    base = next((v for v, t in variants.items() if t == {"plain", "fp32"}), next(iter(rows)))
    console.print(f"{out['device']}, torch {out['torch']}: {out['params'] / 1e6:.1f}M-param UNet "
                  f"{c['img_size']} px, {c['num_channels']} ch x {c['channel_multiples']}, "
                  f"batch {b.batch_size}, {b.steps} timed steps after {b.warmup} warm-up")
    t = Table()
    for col in ["variant", "img/s", "ms/step", f"vs {base}", "peak mem", "GFLOP/img",
                "MFU (peak TF/s)", "sample img-steps/s"]:
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v, r in rows.items():
        mfu = f"{r['mfu']:.1%} ({r['peak_tflops']:g})" if r["mfu"] is not None else "n/a"
        smp = (f"{r['sample_img_steps_s']:.0f}" if "sample_img_steps_s" in r else
               "= " + next(w for w, t in variants.items() if t == variants[v] - {"plain"}))
        t.add_row(v, f"{r['img_s']:.1f}", f"{r['ms_step']:.1f}",
                  f"{r['img_s'] / rows[base]['img_s']:.2f}x", r["peak_mem"], f"{gf:.2f}", mfu, smp)
    console.print(t)
    console.print(f"FLOPs (matmul, conv, attention; torch.utils.flop_counter): {gf:.2f} GFLOP per "
                  f"training image (forward + backward), {out['fwd_flops'] / 1e9:.2f} per sampling "
                  f"step. MFU peak: {'; '.join(sorted({r['peak'] for r in rows.values()}))}")
    console.print(f"sampling {b.sample_batch} images (Drawer.draw, EMA weights): {b.sample_steps} "
                  f"DPM-Solver++ steps / all {c['timesteps']} ancestral steps: "
                  + ", ".join(f"{r['dpm_s']:.2f} s / {r['ancestral_s']:.1f} s ({v})"
                              for v, r in rows.items() if "dpm_s" in r)
                  + f"; ancestral: the last {b.ancestral_steps} steps timed, scaled to "
                    f"{c['timesteps']}" * (b.ancestral_steps < c["timesteps"]))
    console.print(f"data: {out['demo_images']} demo faces drawn in {out['demo_set_s']:.2f} s; "
                  f"batches alone: {out['batches_img_s']:.0f} img/s on the device path, "
                  f"{out['plain_batches_img_s']:.0f} img/s on the per-image path")
    if b.data_folder:
        console.print(f"folder {b.data_folder}: {out['folder_images']} images decoded in "
                      f"{out['folder_first_s']:.2f} s (all cores), {out['folder_cached_s']:.2f} s "
                      f"from the cache")
    if not b.device.startswith("cuda"):
        load = os.getloadavg()[0]
        console.print(f"* CPU peak mem: the whole process's max RSS so far (getrusage). Load "
                      f"average {load:.1f} on {os.cpu_count()} cores at the end" + (
                          ": other processes slow these figures (--threads 1 stalls less)"
                          if load > os.cpu_count() else ""))


def vs_reference(b, rest: list[str], console: Console) -> None:
    """Our training step (Program.train_step: loss, backward, clip, Adam, EMA, NaN guard) against
    the reference program's (loss, backward, Adam) on the same batch size and architecture,
    alternating which goes first each round; medians of seconds per step."""
    folder, name = os.path.split(os.path.abspath(b.vs_reference))
    sys.path.insert(0, folder)
    ref_mod = importlib.import_module(os.path.splitext(name)[0])
    with tempfile.TemporaryDirectory() as tmp:
        prog = build(b, PARITY + ["--precision", "fp32", "--sample-every", "0"] + rest, tmp)
        a, dev = prog.args, prog.device
        torch.manual_seed(0)
        ref = ref_mod.GaussianDiffusion(ref_mod.UNet(a.img_channels, a.num_channels,
                                                     a.channel_multiples, a.has_attn,
                                                     a.num_blocks), a.timesteps, a.beta_min,
                                        a.beta_max).to(dev).train()
        ref_opt = torch.optim.Adam(ref.parameters(), a.lr)
        x0 = to_model(prog.data.images[:b.batch_size]).to(dev)
        ours = lambda steps: train_steps(prog, prog.data, steps, b.batch_size)  # noqa: E731

        def theirs(steps: int) -> None:
            for _ in range(steps):
                ref_opt.zero_grad(set_to_none=True)
                ref(x0).backward()
                ref_opt.step()

        runs, times = {"ours": ours, "reference": theirs}, {"ours": [], "reference": []}
        for fn in runs.values():
            fn(b.warmup)
        for r in range(b.rounds):
            for k in (("ours", "reference") if r % 2 == 0 else ("reference", "ours")):
                times[k].append(timed(dev, lambda: runs[k](b.steps)) / b.steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        n = {k: sum(p.numel() for p in m.parameters())
             for k, m in (("ours", prog.trainer.model), ("reference", ref))}
    console.print(f"{' '.join(PARITY)} --batch-size {b.batch_size}, fp32, "
                  f"{torch.get_num_threads()} thread(s), {b.rounds} rounds of {b.steps} steps "
                  f"(order alternating)")
    for k in runs:
        console.print(f"{k:10s} {n[k] / 1e6:.3f} M parameters: {1e3 * med[k]:.0f} ms/step "
                      f"(median; rounds {', '.join(f'{1e3 * t:.0f}' for t in times[k])})")
    console.print(f"ours runs at {med['reference'] / med['ours']:.2f}x the reference's speed")


def resident_mib() -> dict:
    """This process's resident memory now (VmRSS; anonymous and file-backed), MiB; Linux only."""
    try:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmRSS", "RssAnon", "RssFile")}
    except OSError:
        return {}


def data_speed(b, console: Console) -> None:
    """The data path alone (ImageDataset.batches, as training reads it): a synthetic uint8 cache
    file of 64x64 RGB images, read with random order and flips, from disk (cold, then warm) and
    from memory; batches/s over --data-batches batches of --batch-size, and resident memory."""
    dev = torch.device(b.device)
    n = int(b.data_speed * 2**30) // (3 * 64 * 64)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = os.path.join(tmp, "images.npy")
        out = np.lib.format.open_memmap(path, "w+", np.uint8, (n, 3, 64, 64))
        rng = np.random.default_rng(0)
        for i in range(0, n, 4096):  # written in chunks: never all in memory
            out[i:i + 4096] = rng.integers(0, 256, out[i:i + 4096].shape, dtype=np.uint8)
        out.flush()
        del out
        console.print(f"{n:,} images of 3x64x64 ({n * 3 * 64 * 64 / 2**30:.2f} GiB) in {path}; "
                      f"{b.data_batches} batches of {b.batch_size} per path, on {dev}")

        def rate(ds, label: str) -> None:
            batches = ds.batches(b.batch_size, torch.Generator().manual_seed(0))
            t0, got = time.perf_counter(), 0
            for x in batches:
                got += 1
                if got == b.data_batches:
                    break
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            secs = time.perf_counter() - t0
            batches.close()
            mem = resident_mib()
            console.print(f"{label:24s} {got / secs:8.1f} batches/s ({got * b.batch_size / secs:,.0f}"
                          f" img/s); resident now: " + ", ".join(f"{k} {v:,.0f} MiB"
                                                                 for k, v in mem.items()))

        mapped = MappedImages(path, n)
        with open(path, "rb") as f:  # drop the file's pages from the page cache: a cold read
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        rate(ImageDataset(mapped, dev), "disk, cold page cache")
        rate(ImageDataset(mapped, dev), "disk, warm page cache")
        free = data.free_memory(torch.device("cpu")) or 0
        if n * 3 * 64 * 64 < free // 2:
            rate(ImageDataset(mapped.images.to(dev, copy=True), dev), "memory")
        else:
            console.print(f"memory: not measured, the set is over half the free memory "
                          f"({free / 2**30:.1f} GiB)")


# -- python bench.py --gpu-check: does this setup work, and how fast? -------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
# The round trip's model: 8 px, one level with attention, T = 10 (the tests' tiny model): the
# check is of the code paths, and the time goes to the benchmark.
TINY = ["--img-size", "8", "--num-channels", "8", "--channel-multiples", "1", "--has-attn", "t",
        "--timesteps", "10", "--beta-max", "0.5"]
# Each process torchrun starts joins the group on the backend argv[1] and all-reduces ones.
PROBE = """import os, sys, torch, torch.distributed as dist
backend = sys.argv[1]
dev = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if backend == "nccl" else "cpu")
if dev.type == "cuda":
    torch.cuda.set_device(dev)
dist.init_process_group(backend)
x = torch.ones(4, device=dev)
dist.all_reduce(x)
assert x.tolist() == [float(dist.get_world_size())] * 4, x
print(f"all-reduce over {dist.get_world_size()} process(es) on {backend}: {x[0].item():g}")
dist.destroy_process_group()
"""
# test_unet.py with torch's default device set (argv[1]): its modules and tensors are made there.
ON_DEVICE = ("import sys, pytest, torch; torch.set_default_device(sys.argv[1]); "
             "sys.exit(pytest.main(sys.argv[2:]))")


class CheckFailed(Exception):
    """A step ran, but what it left is wrong: the message is the report's reason."""


def failure_line(out: str) -> str:
    """The line of a failed step's output that says most: pytest's first FAILED line (with its
    count), an `error:` line, else the last line."""
    lines = [line.strip() for line in out.splitlines() if line.strip()] or ["(no output)"]
    for prefix in ("FAILED ", "ERROR ", "error: "):
        hit = next((line for line in lines if line.startswith(prefix)), None)
        if hit:
            return (hit + ("; " + lines[-1] if prefix != "error: " else ""))[:240]
    return lines[-1][:240]


def trained_to(ckpt_dir: str, step: int):
    """A check of a training run: the newest checkpoint in ckpt_dir holds `step` steps."""
    def verify(out: str) -> str:
        names = sorted(n for n in os.listdir(ckpt_dir) if n.endswith(".pth")) \
            if os.path.isdir(ckpt_dir) else []
        if not names:
            raise CheckFailed(f"no checkpoint in {ckpt_dir}")
        steps = {n: torch.load(os.path.join(ckpt_dir, n), map_location="cpu",
                               weights_only=True)["step"] for n in names}
        newest = max(steps, key=steps.get)
        if steps[newest] != step:
            raise CheckFailed(f"{newest} holds step {steps[newest]}, not {step}")
        return f"{newest} at step {step}"
    return verify


def wrote(folder: str, prefix: str, n: int):
    """A check of a sampling run: n pictures <prefix><number>.png in folder."""
    def verify(out: str) -> str:
        got = [f for f in os.listdir(folder) if re.fullmatch(re.escape(prefix) + r"\d+\.png", f)] \
            if os.path.isdir(folder) else []
        if len(got) != n:
            raise CheckFailed(f"{len(got)} pictures {prefix}*.png, not {n}")
        return f"{n} pictures {prefix}*.png"
    return verify


def fid_line(out: str) -> str:
    """A check of --eval-fid: it printed a finite FID."""
    m = re.search(r"FID (\S+), KID (\S+)", out)
    if not m or not math.isfinite(float(m.group(1))):
        raise CheckFailed("no finite FID in the output: " + failure_line(out))
    return f"FID {m.group(1)}, KID {m.group(2)} x 1e-3 (a tiny model's: any finite value passes)"


def write_faces(folder: str, n: int, size: int) -> None:
    """n demo faces as 000.png, 001.png, ... in folder: a data folder (--data-on disk needs one)."""
    os.makedirs(folder)
    for i, face in enumerate(data.demo_faces(n, size, 3, seed=1)):
        Image.fromarray(face.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:03d}.png"))


class GpuCheck:
    """The checks of --gpu-check in order, each bounded by its own time limit and by what is left
    of --budget. Each is one report line (PASS, FAIL or SKIP, seconds, a one-line reason),
    printed and written to --report when it ends; a failure does not stop the others. Every
    step's whole output goes to the .log beside the report. Steps run as processes of their
    own, killed with their children at their limit; in a CPU rehearsal (which tests the check
    itself) ddpm.py and bench.py run in this process instead: no start-up, and no time limit."""

    def __init__(self, b, tmp: str, rest: list[str] = ()):
        self.b, self.tmp, self.dev, self.rest = b, tmp, b.device, list(rest)
        self.rehearsal = not b.device.startswith("cuda")
        # bf16 where the GPU has it (Ampere and later), else fp16 with loss scaling; a rehearsal
        # in fp32: autocast to bf16 makes a CPU step several times slower.
        self.precision = ("fp32" if self.rehearsal else "bf16"
                          if torch.cuda.get_device_capability(b.device)[0] >= 8 else "fp16")
        self.t0, self.statuses, self.benchmarks = time.perf_counter(), [], []
        self.log_path = os.path.splitext(b.report)[0] + ".log"
        self.report, self.log = open(b.report, "w"), open(self.log_path, "w")

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.report.write(text + "\n")
        self.report.flush()

    def launch(self, cmd: list[str], limit: float) -> tuple[int | None, str]:
        """cmd: ["ddpm", *flags], ["bench", *flags] or a command line -> (its exit code, None
        when it ran out of time; its output, stdout and stderr together)."""
        if self.rehearsal and cmd[0] in ("ddpm", "bench"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    rc = (ddpm.main if cmd[0] == "ddpm" else main)(cmd[1:])
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else 1
                except Exception:
                    traceback.print_exc()
                    rc = 1
            return rc, out.getvalue()
        script = {"ddpm": [sys.executable, os.path.join(HERE, "ddpm.py")],
                  "bench": [sys.executable, os.path.abspath(__file__)]}
        threads = {"OMP_NUM_THREADS": str(self.b.threads)} if self.b.threads else {}
        proc = subprocess.Popen(script.get(cmd[0], cmd[:1]) + cmd[1:], cwd=self.tmp, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, **threads}, start_new_session=True)
        try:
            out = proc.communicate(timeout=limit)[0]
        except BaseException as e:  # its whole session, torchrun's workers too; Ctrl-C reaches
            with contextlib.suppress(ProcessLookupError):  # only this process, so ends it too
                os.killpg(proc.pid, signal.SIGKILL)
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            return None, proc.communicate()[0]
        return proc.returncode, out

    def check(self, name: str, cmd: list[str] | None, limit: float, verify=None,
              skip: str | None = None) -> None:
        """One report line: cmd run (see launch) unless `skip` says why not; then verify(output)
        -> the reason to print, or CheckFailed."""
        t0 = time.perf_counter()
        left = self.b.budget - (t0 - self.t0)
        if skip:
            status, reason = "SKIP", skip
        elif left < 1:
            status, reason = "FAIL", f"not run: the {self.b.budget:g} s of --budget are spent"
        else:
            rc, out = self.launch(cmd, min(limit, left))
            self.log.write(f"=== {name}: {' '.join(cmd)}\n{out}\n")
            self.log.flush()
            try:
                if rc is None:
                    raise CheckFailed(f"stopped at {min(limit, left):.0f} s ("
                                      f"{'its limit' if limit < left else 'the end of --budget'})"
                                      f"; last output: {failure_line(out)}")
                if rc:
                    raise CheckFailed(f"exit code {rc}: {failure_line(out)}")
                status, reason = "PASS", verify(out) if verify else "done"
            except CheckFailed as e:
                status, reason = "FAIL", str(e)
        self.statuses.append(status)
        self.say(f"{status}  {name:<28} {time.perf_counter() - t0:6.1f} s  {reason}")

    def run(self) -> int:
        """Every check, the benchmark table, the count -> 0 if none failed, else 1."""
        if self.rehearsal:
            where = (f"CPU REHEARSAL on {os.cpu_count()} cores (a tiny model and batches; its "
                     f"times say nothing about a GPU)")
        else:
            gpu = torch.cuda.get_device_properties(self.dev)
            where = (f"{gpu.name} ({gpu.total_memory / 2**30:.0f} GiB) as {self.dev}, "
                     f"CUDA {torch.version.cuda}")
        self.say(f"ddpm.py GPU check: {where}; torch {torch.__version__}; round trip in "
                 f"{self.precision}")
        self.tests()
        self.round_trip()
        self.torchrun()
        self.benchmark()
        return self.finish()

    def finish(self) -> int:
        """The last line: the count of each status -> 0 if no check failed, else 1."""
        n = {s: self.statuses.count(s) for s in ("PASS", "FAIL", "SKIP")}
        self.say(f"{n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped in "
                 f"{time.perf_counter() - self.t0:.0f} s; report {self.b.report}, every step's "
                 f"output {self.log_path}")
        return 1 if n["FAIL"] else 0

    def tests(self) -> None:
        """The test files that can run on the GPU: test_unet.py with torch's default device set
        to it; test_samplers.py, whose runs of ddpm.py take ddpm.py's default device (CUDA)."""
        k = ["-k", self.b.gpu_check_k] if self.b.gpu_check_k else []
        skip = (None if importlib.util.find_spec("pytest") else
                "pytest is not installed (pip install -r requirements-test.txt)")
        for file, name, cmd in (
                ("test_unet.py", f"tests: test_unet.py on {self.dev}",
                 [sys.executable, "-c", ON_DEVICE, self.dev]),
                ("test_samplers.py", "tests: test_samplers.py", [sys.executable, "-m", "pytest"])):
            path = os.path.join(HERE, "tests", file)
            self.check(name, cmd + ["-q", "-p", "no:cacheprovider", path, *k], 240,
                       failure_line,  # passed: pytest's count, its last line
                       skip or (None if os.path.isfile(path) else f"{path} is not there"))

    def round_trip(self) -> None:
        """ddpm.py on a tiny model in bf16 (fp16 where the GPU has none): train a few steps ->
        checkpoint -> resume -> sample with each sampler -> --eval-fid, from memory; train and
        resume from disk, with --compile, and a super-resolution model."""
        t, faces, few = self.tmp, os.path.join(self.tmp, "faces"), os.path.join(self.tmp, "few")
        write_faces(faces, 16, 8)  # 2 batches of 8: --max-steps 2 is an epoch
        write_faces(few, 4, 8)  # FID's reference: 4 pictures (the Inception net is slow on a CPU)
        base = TINY + ["--batch-size", "8", "--device", self.dev, "--precision", self.precision,
                       "--seed", "0", "--cache-dir", os.path.join(t, "cache")]

        def train(run, place, steps, *extra):  # steps > 2: resume the run's newest checkpoint
            return [*base, "--train", "--data-folders", faces, "--data-on", place, "--epochs",
                    "1", "--max-steps", str(steps), *(["--loadckpt", "latest"] * (steps > 2)),
                    *extra, "--ckpt-save-dir", f"{t}/{run}/ckpt", "--save-dir", f"{t}/{run}/out"]

        def sample(run, out, *extra):
            return ["ddpm", *base, "--loadckpt", "latest", *extra, "--ckpt-save-dir",
                    f"{t}/{run}/ckpt", "--save-dir", f"{t}/{run}/{out}"]

        def trains(name, run, place, steps, *extra, limit=120, skip=None):
            self.check(name, ["ddpm", *train(run, place, steps, *extra)], limit,
                       trained_to(f"{t}/{run}/ckpt", steps), skip)

        trains("train, memory", "mem", "memory", 2)
        trains("resume, memory", "mem", "memory", 4)
        for s in ("ddpm", "ddim", "dpm++", "heun"):
            self.check(f"sample, {s}", sample("mem", s, "--sampler", s,
                                              *["--sample-steps", "5"] * (s != "ddpm")),
                       90, wrote(f"{t}/mem/{s}", "ddpm-", 8))
        try:
            no_fid = evaluate.inception_path() and None
        except evaluate.MissingNetwork as e:
            no_fid = str(e)
        self.check("eval-fid, 4 samples", sample("mem", "fid", "--eval-fid", "4",
                                                 "--data-folders", few), 180, fid_line, no_fid)
        trains("train, disk", "disk", "disk", 2)
        trains("resume, disk", "disk", "disk", 4)
        no_compile = ("checked on a GPU only: inductor's C++ compile of even this model takes "
                      "minutes on a CPU") if self.rehearsal else None
        trains("train, --compile", "comp", "memory", 2, "--compile", limit=300, skip=no_compile)
        trains("resume, --compile", "comp", "memory", 4, "--compile", limit=240, skip=no_compile)
        self.check("sample, dpm++ --compile", sample("comp", "dpm++", "--compile", "--sampler",
                                                     "dpm++", "--sample-steps", "5"),
                   240, wrote(f"{t}/comp/dpm++", "ddpm-", 8), no_compile)
        trains("train, --super-res, disk", "sr", "disk", 2, "--super-res", "4")
        trains("resume, --super-res, memory", "sr", "memory", 4, "--super-res", "4")
        self.check("upsample, --super-res", sample("sr", "up", "--lowres-folder", faces,
                                                   "--sampler", "dpm++", "--sample-steps", "5"),
                   90, wrote(f"{t}/sr/up", "sr-", 16))

    def torchrun(self) -> None:
        """torchrun with one process: an all-reduce on NCCL (gloo on the CPU), then ddpm.py
        trains under it (ddpm.py forms no process group for a single process)."""
        backend, probe = "gloo" if self.rehearsal else "nccl", os.path.join(self.tmp, "probe.py")
        with open(probe, "w") as f:
            f.write(PROBE)
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "1"]
        self.check(f"torchrun, {backend} all-reduce", run + [probe, backend], 120,
                   lambda out: next((line for line in out.splitlines()
                                     if line.startswith("all-reduce")), "no result printed"))
        args = [*TINY, "--batch-size", "8", "--device", self.dev, "--precision", self.precision,
                "--train", "--demo", "--demo-images", "16", "--max-steps", "2", "--epochs", "1",
                "--ckpt-save-dir", f"{self.tmp}/dist/ckpt", "--save-dir", f"{self.tmp}/dist/out",
                "--cache-dir", f"{self.tmp}/cache"]
        self.check("torchrun, ddpm.py", run + [os.path.join(HERE, "ddpm.py"), *args], 120,
                   trained_to(f"{self.tmp}/dist/ckpt", 2))

    def benchmark(self) -> None:
        """bench.py's own figures (measure) in a process per batch size, then one table; the
        model: ddpm.py's default, or the flags given after --gpu-check."""
        if self.rehearsal:
            sizes, flags = ((8, "fp32,bf16"), (16, "fp32,bf16")), TINY + [
                "--warmup", "1", "--steps", "2", "--sample-batch", "8", "--sample-steps", "2",
                "--ancestral-steps", "2"]
        else:
            sizes, flags = ((64, "fp32,bf16"), (128, "fp32,bf16,bf16+compile")), []
        for bs, variants in sizes:
            path = os.path.join(self.tmp, f"bench-{bs}.json")

            def verify(out, path=path):
                with open(path) as f:
                    self.benchmarks.append(json.load(f))
                return "img/s " + ", ".join(f"{v} {r['img_s']:.0f}"
                                            for v, r in self.benchmarks[-1]["rows"].items())
            self.check(f"benchmark, batch {bs}", ["bench", "--device", self.dev, "--batch-size",
                                                  str(bs), "--variants", variants, "--json", path,
                                                  *flags, *self.rest],
                       360 if "compile" in variants else 180, verify)
        self.table()

    def table(self) -> None:
        """The benchmark figures as plain text: a row per batch size and variant."""
        if not self.benchmarks:
            return
        first = self.benchmarks[0]
        c, n, steps = first["config"], first["sample_batch"], first["sample_steps"]
        T = c["timesteps"]
        model = ("the rehearsal's tiny UNet" if self.rehearsal else
                 "the UNet of " + " ".join(self.rest) if self.rest else "ddpm.py's default UNet")
        self.say(f"\nbenchmark on {first['device']}: {model}, {first['params'] / 1e6:.2f} M "
                 f"parameters, {c['img_size']} px, {first['train_flops'] / 1e9:.3g} GFLOP per "
                 f"training image; Program.train_step timed after warm-up; sampling {n} images "
                 f"with the EMA weights")
        self.say(f"{'batch':>5}  {'variant':<14} {'img/s':>9} {'ms/step':>8} {'MFU':>6} "
                 f"{'peak mem':>10}  {f'{steps} dpm++ steps':>15} {f'{T} ancestral':>15}")
        timed_steps = set()
        for out in self.benchmarks:
            for v, r in out["rows"].items():
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
                timed_steps.add(r["ancestral_timed"])
                self.say(f"{out['batch_size']:>5}  {v:<14} {r['img_s']:>9.1f} "
                         f"{r['ms_step']:>8.1f} {mfu:>6} {r['peak_mem']:>10}  "
                         f"{r['dpm_s']:>13.2f} s {r['ancestral_s']:>13.1f} s")
        peaks = "; ".join(sorted({r["peak"] for o in self.benchmarks for r in o["rows"].values()}))
        rss = " Peak mem on a CPU*: the process's max RSS so far." * self.rehearsal
        self.say(f"MFU against: {peaks}. Ancestral: the last {', '.join(map(str, timed_steps))} "
                 f"of the {T} steps timed, scaled to all {T} (every step costs the same).{rss}")


def gpu_check(b, rest: list[str]) -> int:
    """python bench.py --gpu-check -> 0 when no check failed, 1 when one did, 2 (and one line)
    when there is no GPU and no --device cpu asked for a rehearsal."""
    if not torch.cuda.is_available() and not (b.device_typed and b.device == "cpu"):
        print(f"error: bench.py --gpu-check needs a CUDA GPU, and torch {torch.__version__} sees "
              f"none (--device cpu rehearses it on the CPU with a tiny model)", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if b.device == "cpu" and not b.threads:  # a tiny model gains nothing from more threads,
        b.threads = 1  # and waits for descheduled ones on a busy machine
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = GpuCheck(b, tmp, rest)
        try:
            torch.set_num_threads(b.threads or threads)
            return check.run()
        finally:
            torch.set_num_threads(threads)
            check.report.close()
            check.log.close()


def main(argv=None) -> int:
    b, rest = parse(argv)
    console = make_console()
    if b.gpu_check:
        return gpu_check(b, rest)
    if b.threads:
        torch.set_num_threads(b.threads)
    if b.vs_reference:
        vs_reference(b, rest, console)
        return 0
    if b.data_speed:
        data_speed(b, console)
        return 0
    variants = {v.strip(): set(v.strip().replace("+", "-").split("-"))
                for v in b.variants.split(",") if v.strip()}
    bad = set().union(*variants.values()) - TOKENS
    try:
        if bad or not variants:
            raise config.UserError(f"unknown variant part(s) {sorted(bad)}; use {sorted(TOKENS)}")
        out = measure(b, rest, variants, console)
    except (config.UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(b, variants, out, console)
    if b.json:
        with open(b.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
