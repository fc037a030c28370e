"""speed_rows.py: the speed rows of `python -m tools.bench --gpu-check`, measured one by one and each
printed as soon as it is measured, so that a check cut short keeps every row it reached.

    python -m tools.speed_rows --check-rows eager|compile [bench.py's flags] [--deadline T]

gpu_check.py starts it and reads its lines; it builds on bench.py's Program, timing and FLOP
counting, and takes bench.py's flags (bench.parse).
"""
import argparse
import gc
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import torch

import ddpm
from tools.bench import (PEAKS, build, flops_per_image, parse, precision_flags, set_tf32,
                         tf32_restored, timed, train_steps)

CHECK_PRECISIONS = ("fp32", "tf32", "bf16")  # fp32: TF32 off
ROW = "@row "  # --check-rows prints each row as this, then its JSON, on a line of its own


def datasheet(device: torch.device) -> tuple[dict | None, str]:
    """This GPU's dense peaks from its datasheet ({"bf16", "tf32", "fp32"} TFLOP/s; None where
    unknown, and on a CPU), and the name they are for."""
    if device.type != "cuda":
        return None, "a CPU"
    name = torch.cuda.get_device_name(device)
    return next(((peaks, label) for fragment, label, peaks in PEAKS if fragment in name),
                (None, name))


def matmul_tflops(device: torch.device, precision: str) -> float:
    """The rate of a large square matrix product, 2 n^3 FLOPs, in TFLOP/s: the peak this device
    reaches in practice in bf16, TF32 or fp32 (n = 16384 in bf16, else 8192; 256 on a CPU)."""
    n = (16384 if precision == "bf16" else 8192) if device.type == "cuda" else 256
    gen = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, y = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    with tf32_restored():
        set_tf32(precision == "tf32")
        timed(device, lambda: torch.mm(x, y), 2)  # warm-up: cuBLAS picks its kernel
        secs = timed(device, lambda: torch.mm(x, y), 10)
    return 2 * n ** 3 / secs / 1e12


def covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the intervals [start, end)."""
    total, reached = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def gpu_busy(device: torch.device, fn) -> float | None:
    """The fraction of fn's wall time (synchronised) in which the GPU runs a kernel or a copy
    (the union of the spans of the profiler's CUDA-device events): near 1 the GPU sets the
    pace; well below 1 it waits for the host's launches. fn runs under the CUDA activity alone
    (the host as unhindered as it can be); where that trace holds no device events, as some
    set-ups give, fn runs again with the CPU activity beside it (its per-op records slow the
    host a little: the figure is then a lower bound). None on a CPU, or when neither trace
    holds GPU work (no CUPTI)."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    for activities in ([ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        torch.cuda.synchronize(device)
        try:
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize(device)
                wall_us = (time.perf_counter() - t0) * 1e6
            spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == DeviceType.CUDA]  # kernels and copies, not host ops
        except Exception as e:  # noqa: BLE001 (the profiler, not the step: the row keeps the rest)
            print(f"GPU-busy fraction not measured: {type(e).__name__}: {e}", flush=True)
            return None
        if spans:
            return min(1.0, covered(spans) / wall_us)
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """The most memory torch held on the GPU since reset_peak, GiB; None on a CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def with_batch(b, n: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(b), "batch_size": n})


def train_row(b, rest, tmp, n: int, variant: str, *, flops: float, measured: dict,
              sheet: dict | None) -> dict:
    """Training at batch n in one variant (fp32, tf32 or bf16, + compile): the first step alone
    (with compile: the compilation), --warmup steps, 3 windows of --steps (median and spread),
    then 2 steps profiled for the GPU-busy fraction; MFU against the measured matmul peak and
    the datasheet's; the peak memory of it all."""
    dev, toks = torch.device(b.device), set(variant.split("+"))
    precision = next(p for p in CHECK_PRECISIONS if p in toks)
    with tf32_restored():
        prog = build(with_batch(b, n), rest + precision_flags({precision}), tmp)
        nets = prog.trainer
        set_tf32(precision != "fp32")
        if "compile" in toks:  # in place: nets.net is nets.model (the EMA only samples)
            nets.model.compile()
        reset_peak(dev)
        loop = lambda steps: train_steps(prog, prog.data, steps, n)  # noqa: E731
        first = timed(dev, lambda: loop(1))
        if b.warmup > 1:
            loop(b.warmup - 1)
        windows = [timed(dev, lambda: loop(b.steps)) / b.steps for _ in range(3)]
        busy = gpu_busy(dev, lambda: loop(2))
        mem = peak_gib(dev)
    secs = statistics.median(windows)
    img_s = n / secs
    mfu = lambda peak: flops * img_s / (peak * 1e12) if peak else None  # noqa: E731
    return {"batch": n, "variant": variant, "img_s": img_s, "ms_step": 1e3 * secs,
            "windows_ms": [1e3 * w for w in windows],
            "spread": (max(windows) - min(windows)) / secs,
            "steps": b.steps, "warmup": b.warmup, "first_step_s": first,
            "mfu_measured": mfu(measured.get(precision)),
            "mfu_datasheet": mfu(sheet and sheet[precision]), "busy": busy, "mem_gib": mem}


def loss_row(b, rest, tmp) -> dict:
    """fp32 (TF32 off) and bf16-autocast losses of one model on one batch with the same t and
    noise: the mean of each and the largest per-image relative difference. The model's
    zero-initialised layers get random weights first (as nn.Conv2d draws them): at zero the
    network's output is zero and every loss is the noise's own, in any precision."""
    dev, n = torch.device(b.device), b.batch_size // 2
    with tf32_restored():
        prog = build(with_batch(b, n), rest, tmp)
        nets = prog.trainer
        with torch.no_grad():
            for w in nets.model.parameters():
                if w.dim() > 1 and not w.any():
                    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        x0 = next(prog.data.batches(n, prog.data_gen))  # (n, C, H, W) in [-1, 1]
        gen = torch.Generator(dev).manual_seed(0)
        t = torch.randint(0, nets.diffusion.T, (n,), device=dev, generator=gen)  # (n,)
        eps = torch.randn(x0.shape, device=dev, generator=gen)
        set_tf32(False)
        nets.model.eval()
        with torch.no_grad():
            fp32 = nets.diffusion.losses(nets.net, x0, t, eps).double()  # (n,)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                bf16 = nets.diffusion.losses(nets.net, x0, t, eps).double()
    return {"batch": n, "fp32": fp32.mean().item(), "bf16": bf16.mean().item(),
            "rel_diff": abs(bf16.mean() / fp32.mean() - 1).item(),
            "max_rel_diff_image": ((bf16 - fp32).abs() / fp32).max().item()}


def sample_row(prog: ddpm.Program, n: int, steps: int) -> dict:
    """Sampling n images (Drawer.draw, the EMA weights) with `steps` DPM-Solver++ steps, after a
    2-step warm-up: img/s and the peak memory of the timed draw."""
    dev, draw = prog.device, prog.drawer.draw
    draw(n, sampler=("dpm++", 2))
    reset_peak(dev)
    secs = timed(dev, lambda: draw(n, sampler=("dpm++", steps)))
    return {"batch": n, "steps": steps, "seconds": secs, "img_s": n / secs,
            "mem_gib": peak_gib(dev)}


def check_plan(b) -> list[str]:
    """The names of the rows check_rows measures, in order."""
    if b.check_rows == "compile":
        return [f"train {b.batch_size} bf16+compile"]
    return ([f"matmul {p}" for p in CHECK_PRECISIONS]
            + [f"train {n} {p}" for n in (b.batch_size // 2, b.batch_size)
               for p in CHECK_PRECISIONS] + ["loss fp32-bf16"]
            + [f"sample {n} {p}" for p in CHECK_PRECISIONS
               for n in (b.sample_batch, 8 * b.sample_batch)])


def check_rows(b, rest: list[str], emit) -> None:
    """--gpu-check's speed rows (--check-rows eager or compile), each handed to emit (a dict, a
    row: its "row" kind and "name") as soon as it is measured, after a plan that names them all;
    none starts when the time left until --deadline (else --budget seconds from the call) is less
    than the longest row so far took, and one that fails is a row of its error.
    eager: the matmul peaks in fp32, TF32 and bf16; training at half of --batch-size and at
    --batch-size in each (train_row); fp32 against bf16 losses (loss_row); sampling
    --sample-batch and 8 times as many images in each. compile: bf16 + compile at --batch-size."""
    dev = torch.device(b.device)
    end = b.deadline if b.deadline is not None else time.time() + b.budget
    sizes, draws = (b.batch_size // 2, b.batch_size), (b.sample_batch, 8 * b.sample_batch)
    plan, longest = check_plan(b), [0.0]  # longest: the most seconds a row took so far

    def row(kind: str, name: str, fn, *args, **kwargs) -> None:
        t0 = time.time()
        if end - t0 <= longest[0]:  # it would likely be killed part-way: left as not run
            return
        try:
            emit({"row": kind, "name": name, **fn(*args, **kwargs)})
        except Exception as e:  # noqa: BLE001 (an out-of-memory, say: the other rows still run)
            emit({"row": "error", "name": name, "error": f"{type(e).__name__}: {e}"[:300]})
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        longest[0] = max(longest[0], time.time() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        prog = build(b, rest, tmp)
        x0 = next(prog.data.batches(min(b.batch_size, 8), prog.data_gen))
        train_flops, fwd_flops = flops_per_image(prog, x0)
        sheet, sheet_of = datasheet(dev)
        emit({"row": "plan", "name": b.check_rows, "rows": plan, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
              f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
              "params": sum(p.numel() for p in prog.trainer.model.parameters()),
              "config": prog.cfg.model.to_dict(), "train_flops": train_flops,
              "fwd_flops": fwd_flops, "datasheet": sheet, "datasheet_of": sheet_of})
        del prog
        measured = {}

        def matmul(p):
            measured[p] = matmul_tflops(dev, p)
            return {"precision": p, "tflops": measured[p], "datasheet": sheet and sheet[p]}

        if b.check_rows == "compile":
            measured["bf16"] = matmul_tflops(dev, "bf16")
            return row("train", plan[0], train_row, b, rest, tmp, b.batch_size, "bf16+compile",
                       flops=train_flops, measured=measured, sheet=sheet)
        for p in CHECK_PRECISIONS:
            row("matmul", f"matmul {p}", matmul, p)
        for n in sizes:
            for p in CHECK_PRECISIONS:
                row("train", f"train {n} {p}", train_row, b, rest, tmp, n, p, flops=train_flops,
                    measured=measured, sheet=sheet)
        row("loss", "loss fp32-bf16", loss_row, b, rest, tmp)
        for p in CHECK_PRECISIONS:
            if end - time.time() <= longest[0]:  # no row would start: no model to build either
                break
            with tf32_restored():
                prog = build(with_batch(b, draws[0]), rest + precision_flags({p}), tmp)
                set_tf32(p != "fp32")
                for n in draws:
                    row("sample", f"sample {n} {p}", lambda n: {"precision": p, **sample_row(
                        prog, n, b.sample_steps)}, n)
                del prog


# -- Each row as a line of the GPU check's report ------------------------------------------

def label(name: str) -> str:
    """A row's name as the report shows it: fp32 says that TF32 is off."""
    return re.sub(r"\bfp32\b(?!-)", "fp32 (TF32 off)", name)


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} GiB"


def row_line(r: dict) -> str:
    """One speed row (check_rows) as one line of the GPU check's report."""
    kind, name = r["row"], f"ROW   {label(r['name']):<30}"
    if kind == "plan":
        c, sheet = r["config"], r["datasheet"]
        peaks = (f"datasheet: {r['datasheet_of']} dense " + ", ".join(
            f"{p} {v:g}" for p, v in sheet.items()) + " TFLOP/s" if sheet else
            f"no datasheet peak known for {r['datasheet_of']}: MFU against the measured only")
        return (f"speed rows ({r['name']}) on {r['device']}, torch {r['torch']}: "
                f"{r['params'] / 1e6:.2f} M-parameter UNet, {c['img_size']} px, "
                f"{r['train_flops'] / 1e9:.3g} GFLOP per training image (forward + backward), "
                f"{r['fwd_flops'] / 1e9:.3g} per sampling step; {peaks}")
    if kind == "matmul":
        sheet = r["datasheet"]
        return (f"{name} {r['tflops']:9.4g} TFLOP/s measured" + (
            f"; datasheet {sheet:g} ({r['tflops'] / sheet:.0%} of it)" if sheet else
            "; datasheet n/a"))
    if kind == "train":
        first = (f"first step (compilation) {r['first_step_s']:.1f} s" if "compile" in
                 r["variant"] else f"first step {r['first_step_s']:.2f} s")
        return (f"{name} {r['img_s']:9.1f} img/s  {r['ms_step']:.1f} ms/step (median of 3 x "
                f"{r['steps']}, spread {pct(r['spread'])})  MFU {pct(r['mfu_measured'])} of "
                f"measured, {pct(r['mfu_datasheet'])} of datasheet  GPU busy "
                f"{pct(r['busy'], 0)}  peak {gib(r['mem_gib'])}  {first}")
    if kind == "loss":
        verdict = "agree" if r["rel_diff"] < 0.01 else "DIFFER"
        return (f"{name} fp32 {r['fp32']:.5f}, bf16 {r['bf16']:.5f} (mean of {r['batch']}, "
                f"same t and noise): {verdict}, {pct(r['rel_diff'], 3)} apart, at most "
                f"{pct(r['max_rel_diff_image'], 2)} per image")
    if kind == "sample":
        return (f"{name} {r['img_s']:9.1f} img/s  ({r['steps']} DPM-Solver++ steps in "
                f"{r['seconds']:.2f} s, EMA weights)  peak {gib(r['mem_gib'])}")
    return f"{name} error: {r['error']}"


def main(argv=None) -> int:
    """The rows of --check-rows, each printed as ROW + its JSON on a line of its own."""
    b, rest = parse(argv)
    if not b.check_rows:
        print("error: speed_rows.py needs --check-rows eager or compile", file=sys.stderr)
        return 2
    if b.threads:
        torch.set_num_threads(b.threads)
    check_rows(b, rest, lambda r: print(ROW + json.dumps(r), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
