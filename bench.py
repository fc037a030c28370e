"""bench.py: how fast ddpm.py trains and samples on one device, variant by variant, in one table.

Everything runs through ddpm.Program (the code users run): img/s, ms/step, peak memory, model FLOPs
per image (torch.utils.flop_counter), MFU against an assumed dense peak, sampling and data times.
"""
import argparse
import contextlib
import gc
import io
import json
import os
import resource
import sys
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ddpm
from data import DataError, ImageDataset, load_folders

SMALL = ["--img-size", "32", "--num-channels", "32", "--channel-multiples", "1", "2", "2",
         "--has-attn", "f", "t", "f", "--num-blocks", "1"]
TOKENS = {"plain", "fp32", "bf16", "channels_last", "compile"}
# Dense peak TFLOP/s from the datasheets (bf16 with fp32 accumulation), first name match wins.
_H100 = {"bf16": 989, "tf32": 494, "fp32": 67}
PEAKS = [("H100 PCIe", "H100 PCIe", {"bf16": 756, "tf32": 378, "fp32": 51}),
         ("H100", "H100 SXM", _H100), ("H200", "H200 (as H100 SXM)", _H100),
         ("A100", "A100", {"bf16": 312, "tf32": 156, "fp32": 19.5}),
         ("4090", "RTX 4090", {"bf16": 165, "tf32": 82.6, "fp32": 82.6})]


def parse(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark ddpm.py training and sampling (img/s, memory, FLOPs, MFU).",
        epilog="Any other flag goes to ddpm.py unchanged, e.g. the model flags --img-size, "
               "--num-channels, --channel-multiples, --has-attn, --num-blocks, --timesteps "
               "(see python ddpm.py --help; its defaults are the default config).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--small", action="store_true",
                   help="CPU preset: " + " ".join(SMALL) + " --batch-size 32")
    p.add_argument("--batch-size", type=int, help="training batch (default: 32 with --small, "
                                                  "else 128)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 10 CUDA, 2 CPU)")
    p.add_argument("--steps", type=int, help="timed training steps (default: 50 CUDA, 6 CPU)")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling step")
    p.add_argument("--sample-steps", type=int, help="timed sampling steps (default: 20 CUDA, "
                                                    "3 CPU)")
    p.add_argument("--variants", help="comma list, each a +-joined set of: plain (per-image data "
                   "path), fp32 or bf16 (else the program's choice: bf16 on CUDA, fp32 on CPU), "
                   "channels_last, compile (default: plain-fp32,fp32,bf16 on CUDA, "
                   "plain-fp32,fp32 on CPU)")
    p.add_argument("--peak-tflops", type=float, help="assumed peak (default: a table by GPU name)")
    p.add_argument("--data-folder", metavar="DIR", help="also time decoding DIR and its cache")
    p.add_argument("--json", metavar="PATH", help="write the figures here too")
    b, rest = p.parse_known_args(argv)
    gpu = b.device.startswith("cuda")
    for k, v_gpu, v_cpu in [("warmup", 10, 2), ("steps", 50, 6), ("sample_steps", 20, 3)]:
        if getattr(b, k) is None:
            setattr(b, k, v_gpu if gpu else v_cpu)
    b.batch_size = b.batch_size or (32 if b.small else 128)
    b.variants = b.variants or ("plain-fp32,fp32,bf16" if gpu else "plain-fp32,fp32")
    return b, rest


def build(b, rest, tmp: str, quiet: bool) -> ddpm.Program:
    """A training Program on demo faces, writing only into tmp; quiet: no config line."""
    argv = (SMALL * b.small + ["--demo-images", str(8 * b.batch_size), "--seed", "0"] + rest
            + ["--train", "--demo", "--device", b.device, "--batch-size", str(b.batch_size),
               "--save-dir", tmp, "--ckpt-save-dir", tmp, "--cache-dir", tmp])
    args, typed = ddpm.parse_args(argv)
    ddpm.check_args(args)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        return ddpm.Program(args, typed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, n: int) -> float:
    """Seconds for n calls of fn, with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return time.perf_counter() - t0


def flops_per_image(prog: ddpm.Program, x0) -> tuple[float, float]:
    """Model FLOPs per image (matmul, conv, attention): loss forward + backward, one UNet forward.
    Attention is counted on the math backend so that no kernel's recomputation is included."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        prog.diffusion(x0).backward()
    train = fc.get_total_flops() / len(x0)
    prog.model.zero_grad(set_to_none=True)
    t = torch.zeros(len(x0), dtype=torch.long, device=x0.device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        prog.model(x0, t)
    return train, fc.get_total_flops() / len(x0)


def peak_tflops(device: torch.device, amp_dtype, override: float | None):
    """The assumed dense peak in TFLOP/s (None if unknown) and where it comes from."""
    if override:
        return override, f"{override:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "no peak assumed on a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    # fp32 runs its convolutions (nearly all the FLOPs) in TF32 unless cuDNN is told otherwise.
    kind = "bf16" if amp_dtype else "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    for fragment, label, peaks in PEAKS:
        if fragment in name:
            return peaks[kind], f"{label} dense {kind} {peaks[kind]:g} TFLOP/s"
    return None, f"no peak known for {name} (give --peak-tflops)"


def endless(batches_of, batch_size: int, gen, channels_last: bool):
    while True:
        for x in batches_of(batch_size, gen):
            yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


def run_variant(b, rest, tmp, data: ImageDataset, toks: set, sample: bool, flops: float) -> dict:
    """Train (warm-up, then timed steps) and optionally sample with one variant -> its figures."""
    if b.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(b.device)
    prog = build(b, rest, tmp, quiet=True)
    if "fp32" in toks:
        prog.amp_dtype = None
    if "bf16" in toks:
        if prog.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ddpm.UserError("this GPU does not support bf16")
        prog.amp_dtype = torch.bfloat16
    if "channels_last" in toks:
        for m in (prog.model, prog.ema):
            m.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its params
    if "compile" in toks:
        prog.model = prog.diffusion.model = torch.compile(prog.model)
        prog.ema = torch.compile(prog.ema)
    batches = endless(data.plain_batches if "plain" in toks else data.batches, b.batch_size,
                      prog.data_gen, "channels_last" in toks)
    step = lambda: prog.train_step(next(batches))
    for _ in range(b.warmup):
        step()
    secs = timed(prog.device, step, b.steps)
    if prog.device.type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated(prog.device) / 2**30:.2f} GiB"
    else:  # Linux reports KiB; this is the whole process so far, not this variant alone
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB*"
    img_s = b.steps * b.batch_size / secs
    peak, peak_desc = peak_tflops(prog.device, prog.amp_dtype, b.peak_tflops)
    row = {"img_s": img_s, "ms_step": 1e3 * secs / b.steps, "peak_mem": mem, "peak_tflops": peak,
           "peak": peak_desc, "mfu": flops * img_s / (peak * 1e12) if peak else None}
    if sample:  # the real sampling loop (Program.draw) on EMA weights, DDIM-spaced steps
        prog.args.sampler, prog.args.sample_steps = "ddim", 2
        prog.draw(b.sample_batch)  # warm-up (and compilation)
        prog.args.sample_steps = b.sample_steps
        secs = timed(prog.device, lambda: prog.draw(b.sample_batch), 1)
        row["sample_img_steps_s"] = b.sample_batch * b.sample_steps / secs
    del prog, batches, step
    gc.collect()
    if b.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    b, rest = parse(argv)
    console = Console(highlight=False)
    variants = [v.strip() for v in b.variants.split(",") if v.strip()]
    toks = {v: set(v.replace("+", "-").split("-")) for v in variants}
    bad = {t for ts in toks.values() for t in ts} - TOKENS
    if bad or not variants:
        console.print(f"error: unknown variant part(s) {sorted(bad)}; use {sorted(TOKENS)}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            prog = build(b, rest, tmp, quiet=False)
            t0 = time.perf_counter()
            data = prog.load_data()
            out = {"argv": argv or sys.argv[1:], "demo_set_s": time.perf_counter() - t0}
            x0 = next(data.batches(min(b.batch_size, 8), prog.data_gen))
            out["train_flops"], out["fwd_flops"] = flops_per_image(prog, x0)
            dev, cfg, a = prog.device, prog.model_config, prog.args
            params = sum(p.numel() for p in prog.model.parameters())
            for path in ("batches", "plain_batches"):  # one epoch of the data path alone
                out[f"{path}_img_s"] = len(data) / timed(
                    dev, lambda: sum(1 for _ in getattr(data, path)(b.batch_size, prog.data_gen)), 1)
            del prog
            if b.data_folder:
                for key in ("folder_first_s", "folder_cached_s"):  # decode, then cache hit
                    t0 = time.perf_counter()
                    n = len(load_folders([b.data_folder], a.img_size, a.img_channels,
                                         console.print, tmp))
                    out[key] = time.perf_counter() - t0
            rows = {}
            for v in variants:  # sampling: once per precision and layout (not per data path)
                same = toks[v] - {"plain"}
                sample = "plain" not in toks[v] or all(toks[w] != same for w in variants)
                rows[v] = run_variant(b, rest, tmp, data, toks[v], sample, out["train_flops"])
        except (ddpm.UserError, DataError) as e:
            console.print(f"error: {e}")
            return 2
    out["rows"] = rows

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    base = next((v for v in variants if toks[v] == {"plain", "fp32"}), variants[0])
    t = Table(title=f"ddpm.py training on {name}, torch {torch.__version__}: {params / 1e6:.1f}M "
                    f"params, {cfg['num_channels']} ch x {cfg['channel_multiples']}, "
                    f"batch {b.batch_size}, {b.steps} timed steps after {b.warmup}")
    for col in ["variant", "img/s", "ms/step", f"vs {base}", "peak mem", "GFLOP/img",
                "MFU (peak TF/s)", "sample img-steps/s"]:
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v, r in rows.items():
        mfu = f"{r['mfu']:.1%} ({r['peak_tflops']:g})" if r["mfu"] is not None else "n/a"
        smp = (f"{r['sample_img_steps_s']:.0f}" if "sample_img_steps_s" in r
               else "= " + next(w for w in variants if toks[w] == toks[v] - {"plain"}))
        t.add_row(v, f"{r['img_s']:.1f}", f"{r['ms_step']:.1f}",
                  f"{r['img_s'] / rows[base]['img_s']:.2f}x", r["peak_mem"],
                  f"{out['train_flops'] / 1e9:.2f}", mfu, smp)
    console.print(t)
    peaks = sorted({r["peak"] for r in rows.values()})
    console.print(f"FLOPs (matmul, conv, attention; torch.utils.flop_counter): "
                  f"{out['train_flops'] / 1e9:.2f} GFLOP per training image (forward + backward), "
                  f"{out['fwd_flops'] / 1e9:.2f} per sampling step; MFU peak: {'; '.join(peaks)}")
    timings = [f"{64e3 / r['sample_img_steps_s']:.0f} s ({v})" for v, r in rows.items()
               if "sample_img_steps_s" in r]
    console.print(f"sampling (Program.draw, EMA weights, batch {b.sample_batch}, "
                  f"{b.sample_steps} DDIM-spaced steps timed): 64 samples x 1000 steps ~ "
                  + ", ".join(timings))
    console.print(f"data: {len(data)} demo faces drawn in {out['demo_set_s']:.2f}s; one epoch of "
                  f"batches alone: {out['batches_img_s']:.0f} img/s on the device path, "
                  f"{out['plain_batches_img_s']:.0f} img/s per image (plain)")
    if b.data_folder:
        console.print(f"folder {b.data_folder}: {n} images decoded in {out['folder_first_s']:.2f}s "
                      f"(all cores), {out['folder_cached_s']:.2f}s from the cache")
    if dev.type == "cpu":
        console.print(f"* peak mem on CPU: the whole process's max RSS so far (getrusage). Load "
                      f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores while measuring")
    if b.json:
        with open(b.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
