"""bench.py: how fast ddpm.py trains and samples on one device, variant by variant, in one table.

Everything runs through ddpm.Program (the code users run; a step is Program.train_step, the one
the training loop calls): img/s, ms/step, peak memory, model FLOPs
per image (torch.utils.flop_counter), MFU against an assumed dense peak, sampling and data times.
The speed rows of `--gpu-check` are speed_rows.py's, which builds on the functions here.
"""
import argparse
import contextlib
import gc
import importlib
import importlib.util
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import config
import ddpm
from data import DataError, MappedImages, load_folders, to_model
from run.dataset import ImageDataset, free_memory
from ui import UserError, make_console

SMALL = ["--img-size", "32", "--num-channels", "32", "--channel-multiples", "1", "2", "2",
         "--has-attn", "f", "t", "f", "--num-blocks", "1"]
# The architecture of the comparison with the reference program (our CPU step against theirs).
PARITY = ["--img-size", "32", "--num-channels", "32", "--channel-multiples", "1", "2", "2",
          "--has-attn", "f", "t", "f", "--num-blocks", "2"]
# fp32: TF32 off (true fp32 products); tf32: fp32 tensors, TF32 products (what Program picks on a
# GPU); on a CPU the two are the same.
TOKENS = {"plain", "fp32", "tf32", "bf16", "channels_last", "compile"}
# The parts of --gpu-check after its probe, in their order, and the share of --budget each may
# end by (cumulative: time one part leaves unused goes to the next).
CHECK_PARTS = ("speed", "round-trip", "tests", "torchrun", "compile")
CHECK_SHARES = {"speed": 0.4, "round-trip": 0.3, "tests": 0.1, "torchrun": 0.1, "compile": 0.1}
# Dense peak TFLOP/s from the datasheets (bf16 with fp32 accumulation); first name match wins.
_SXM = {"bf16": 989, "tf32": 494, "fp32": 67}  # H100 SXM and H200 SXM alike
PEAKS = [("H100 PCIe", "H100 PCIe", {"bf16": 756, "tf32": 378, "fp32": 51}),
         ("H100", "H100 SXM", _SXM),
         ("H200 NVL", "H200 NVL", {"bf16": 835, "tf32": 418, "fp32": 60}),
         ("H200", "H200 SXM", _SXM),
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
                   "path), fp32 (TF32 off), tf32 (fp32 tensors, TF32 products) or bf16 (else the "
                   "program's choice: bf16 on CUDA, fp32 on CPU), channels_last, compile; default "
                   "plain-tf32,tf32,bf16 on CUDA, plain-fp32,fp32 on CPU")
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
    p.add_argument("--save-speed", action="store_true",
                   help="instead: what a checkpoint save costs training, for the model of the "
                        "flags: the file's MiB, the part that blocks the loop (state dict and "
                        "copy to the CPU), the write on the writer's thread, a step with and "
                        "without a write running, and a save that waits for its write "
                        "(on a CPU give a small --batch-size, e.g. 2)")
    p.add_argument("--gpu-check", action="store_true",
                   help="instead: does this setup work, and how fast? A probe (versions, "
                        "nvidia-smi), the speed rows (matmul peaks; training at two batch sizes in "
                        "fp32, TF32 and bf16; sampling), a round trip through ddpm.py (train, "
                        "resume, each sampler, disk, --super-res), the CUDA tests, torchrun, then "
                        "--compile; every row written to --report as it is measured (usage.md: "
                        "GPU check). --device cpu rehearses it with a tiny model")
    p.add_argument("--report", default="gpu-check.txt", metavar="PATH",
                   help="--gpu-check writes its report here (gpu-check.txt), its rows as JSON "
                        "lines beside it (.jsonl), every step's whole output too (.log)")
    p.add_argument("--budget", type=float, default=300, metavar="SECONDS",
                   help="--gpu-check: its time (300), shared out among the parts in turn; "
                        "what does not fit is listed as not run")
    p.add_argument("--parts", default=",".join(CHECK_PARTS), metavar="LIST",
                   help="--gpu-check: the parts to run, in their fixed order, after the probe "
                        f"(default: all, {','.join(CHECK_PARTS)})")
    p.add_argument("--gpu-check-k", help=argparse.SUPPRESS)  # pytest -k of the check's tests
    p.add_argument("--check-rows", choices=("eager", "compile"), help=argparse.SUPPRESS)
    # --check-rows: when its last row must have ended, in seconds since the epoch (time.time()),
    # set by gpu_check.py before it starts this process (import, CUDA start and build count).
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    b, rest = p.parse_known_args(argv)
    b.device_typed, b.device = b.device is not None, b.device or (
        "cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = b.device.startswith("cuda")
    for k, v_gpu, v_cpu in [("warmup", 10, 2), ("steps", 50, 6), ("sample_steps", 20, 3),
                            ("ancestral_steps", 200, 3)]:
        setattr(b, k, getattr(b, k) or (v_gpu if on_gpu else v_cpu))
    b.batch_size = b.batch_size or (32 if b.small or b.vs_reference else 128)
    b.variants = b.variants or ("plain-tf32,tf32,bf16" if on_gpu else "plain-fp32,fp32")
    return b, rest


def build(b, rest: list[str], tmp: str, quiet: bool = True) -> ddpm.Program:
    """A training Program on demo faces (of the model the flags give: the --demo preset does
    not apply) that writes only into tmp; quiet: no config line."""
    argv = (SMALL * b.small + ["--demo-images", str(8 * b.batch_size), "--seed", "0"] + rest
            + ["--train", "--demo", "--device", b.device, "--batch-size", str(b.batch_size),
               "--save-dir", tmp, "--ckpt-save-dir", tmp, "--cache-dir", tmp])
    args, typed = config.parse_args(argv)
    # Demo faces as data, not the demo preset's model: its flags count as typed (as parsed).
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        return ddpm.Program(args, typed | set(config.DEMO_PRESET))


def precision_flags(toks) -> list[str]:
    """A variant's precision as ddpm.py's flag (the trainer and its loss scaler are made for
    it): bf16 autocast, or fp32 (with or without TF32, set_tf32); none: the device's default."""
    if "bf16" in toks:
        return ["--precision", "bf16"]
    return ["--precision", "fp32"] if {"fp32", "tf32"} & set(toks) else []


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
        nets.diffusion(nets.net, x0).backward()
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


@contextlib.contextmanager
def tf32_restored():
    """cuBLAS's and cuDNN's TF32 switches and cuDNN's autotuner as they were when the block began
    (a GPU Program turns them on; a row turns TF32 off)."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = m.allow_tf32, c.allow_tf32, c.benchmark
    try:
        yield
    finally:
        m.allow_tf32, c.allow_tf32, c.benchmark = saved


def set_tf32(on: bool) -> None:
    """fp32 matrix products and convolutions in TF32 (on) or in full fp32; a CPU ignores both."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def run_variant(b, rest, tmp, data, toks: set[str], *, sample: bool, flops: float) -> dict:
    """Train (warm-up, then timed steps), then optionally sample, with one variant."""
    with tf32_restored():
        return _run_variant(b, rest, tmp, data, toks, sample=sample, flops=flops)


def _run_variant(b, rest, tmp, data, toks: set[str], *, sample: bool, flops: float) -> dict:
    cuda = b.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(b.device)
    prog = build(b, rest + precision_flags(toks), tmp)
    nets = prog.trainer
    if toks & {"fp32", "tf32"}:
        set_tf32("tf32" in toks)
    if "channels_last" in toks:
        for m in (nets.model, nets.ema):
            m.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its params
    if "compile" in toks:  # in place (nn.Module.compile): nets.net is nets.model
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
        dev, a = prog.device, prog.cfg.model
        out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
               f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
               "torch": torch.__version__, "config": a.to_dict(),
               "batch_size": b.batch_size,
               "params": sum(p.numel() for p in prog.trainer.model.parameters())}
        t0 = time.perf_counter()
        data, _ = prog.load_data(prog.vocab)
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
                                                        a.img_channels, warn=console.print,
                                                        cache_dir=tmp))
                out[key] = time.perf_counter() - t0
        out["rows"], out["sample_batch"], out["sample_steps"] = {}, b.sample_batch, b.sample_steps
        for v, toks in variants.items():  # sampling once per precision and layout
            sample = "plain" not in toks or toks - {"plain"} not in variants.values()
            out["rows"][v] = run_variant(b, rest, tmp, data, toks, sample=sample,
                                         flops=out["train_flops"])
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
    name = os.path.splitext(os.path.basename(b.vs_reference))[0]
    loader = importlib.util.spec_from_file_location(name, os.path.abspath(b.vs_reference))
    ref_mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(ref_mod)
    with tempfile.TemporaryDirectory() as tmp:
        prog = build(b, PARITY + ["--precision", "fp32", "--sample-every", "0"] + rest, tmp)
        a, dev = prog.cfg.model, prog.device
        torch.manual_seed(0)
        ref = ref_mod.GaussianDiffusion(ref_mod.UNet(a.img_channels, a.num_channels,
                                                     a.channel_multiples, a.has_attn,
                                                     a.num_blocks), a.timesteps, a.beta_min,
                                        a.beta_max).to(dev).train()
        ref_opt = torch.optim.Adam(ref.parameters(), prog.cfg.train.lr)
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
        free = free_memory(torch.device("cpu")) or 0
        if n * 3 * 64 * 64 < free // 2:
            rate(ImageDataset(mapped.images.to(dev, copy=True), dev), "memory")
        else:
            console.print(f"memory: not measured, the set is over half the free memory "
                          f"({free / 2**30:.1f} GiB)")


def save_speed(b, rest: list[str]) -> dict:
    """What a checkpoint save costs the training loop (Program.save_checkpoint, after --warmup
    steps: Adam's state made), in --steps rounds of: a training step with no save; a save (the
    part that blocks training: state dict and copy to the CPU), then steps until its write on
    the writer's thread has ended; a synchronous save (the training thread waits for the write,
    which runs alone) -> the file's MiB and each figure's median over the rounds, in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        prog = build(b, rest, tmp)
        train_steps(prog, prog.data, b.warmup, b.batch_size)
        rounds = []

        def step():  # one, ended (on a GPU its kernels too, so the save's copy times no step)
            train_steps(prog, prog.data, 1, b.batch_size)
            if prog.device.type == "cuda":
                torch.cuda.synchronize(prog.device)
        for _ in range(b.steps):  # in turn, so that other processes' load hits all alike
            done = []  # when each write ended (on the writer's thread)
            saved = lambda p: done.append(time.perf_counter())  # noqa: E731
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            prog.save_checkpoint("bench.pth", done=saved)
            t2, k = time.perf_counter(), 0
            while k == 0 or not done:  # the steps its write runs beside
                step()
                k += 1
            t3 = time.perf_counter()
            prog.writer.wait()
            t4 = time.perf_counter()
            path = prog.save_checkpoint("bench.pth", done=saved)
            t5 = time.perf_counter()
            prog.writer.wait()
            rounds.append({"step_s": t1 - t0, "blocking_s": t2 - t1, "steps_beside": k,
                           "write_beside_s": done[0] - t2, "step_beside_s": (t3 - t2) / k,
                           "lost_s": t3 - t1 - k * (t1 - t0), "write_s": done[1] - t5,
                           "sync_s": time.perf_counter() - t4})
        out = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        out.update(mib=os.path.getsize(path) / 2**20, torch=torch.__version__,
                   device=f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch threads"
                   if prog.device.type == "cpu" else torch.cuda.get_device_name(prog.device),
                   params=sum(p.numel() for p in prog.trainer.model.parameters()),
                   batch_size=b.batch_size, rounds=rounds)
    return out


def save_report(b, out: dict, console: Console) -> None:
    """--save-speed's figures, one table."""
    console.print(f"{out['device']}, torch {out['torch']}: {out['params'] / 1e6:.1f}M-param UNet, "
                  f"batch {out['batch_size']}; medians of {b.steps} rounds after {b.warmup} "
                  f"warm-up steps")
    t = Table()
    t.add_column("checkpoint save")
    t.add_column("value", justify="right")
    for label, value in [
            ("checkpoint file (model, EMA, Adam state)", f"{out['mib']:,.0f} MiB"),
            ("blocking: state dict + copy to the CPU", f"{out['blocking_s']:.2f} s"),
            ("write on the writer's thread, alone", f"{out['write_s']:.2f} s"),
            ("write on the writer's thread, beside training", f"{out['write_beside_s']:.2f} s"),
            ("training step, no write", f"{out['step_s']:.2f} s"),
            (f"training step, a write beside it ({out['steps_beside']:g} step(s))",
             f"{out['step_beside_s']:.2f} s ({out['step_beside_s'] / out['step_s']:.2f}x)"),
            ("training time a save costs (blocking + slower steps)", f"{out['lost_s']:.2f} s"),
            ("synchronous save (copy + write, training waits)", f"{out['sync_s']:.2f} s")]:
        t.add_row(label, value)
    console.print(t)


def main(argv=None) -> int:
    b, rest = parse(argv)
    console = make_console()
    if b.gpu_check:  # the __main__ block below hands the check over to gpu_check.py
        print("error: --gpu-check runs as python -m tools.bench --gpu-check (or python -m tools.gpu_check)",
              file=sys.stderr)
        return 2
    if b.threads:
        torch.set_num_threads(b.threads)
    if b.vs_reference:
        vs_reference(b, rest, console)
        return 0
    if b.data_speed:
        data_speed(b, console)
        return 0
    if b.save_speed:
        try:
            out = save_speed(b, rest)
        except (UserError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        save_report(b, out, console)
        if b.json:
            with open(b.json, "w") as f:
                json.dump(out, f, indent=1)
        return 0
    variants = {v.strip(): set(v.strip().replace("+", "-").split("-"))
                for v in b.variants.split(",") if v.strip()}
    bad = set().union(*variants.values()) - TOKENS
    try:
        if bad or not variants:
            raise UserError(f"unknown variant part(s) {sorted(bad)}; use {sorted(TOKENS)}")
        out = measure(b, rest, variants, console)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(b, variants, out, console)
    if b.json:
        with open(b.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    if parse()[0].gpu_check:  # tools.gpu_check runs the check; it imports this module, not the reverse
        os.execv(sys.executable, [sys.executable, "-m", "tools.gpu_check", *sys.argv[1:]])
    sys.exit(main())
