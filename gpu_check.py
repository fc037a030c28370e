"""gpu_check.py: `python bench.py --gpu-check`, does this setup work, and how fast?

On a GPU: the checks (the tests that can run on the device, a train-resume-sample round trip of a
tiny model with every data placement, FID, torchrun), then bench.py's figures at two batch sizes;
one report. With --device cpu it rehearses all of it on the CPU, in this process.
"""
import contextlib
import importlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch
from PIL import Image

import bench
import data
import ddpm
import evaluate

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
                    rc = (ddpm.main if cmd[0] == "ddpm" else bench.main)(cmd[1:])
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else 1
                except Exception:
                    traceback.print_exc()
                    rc = 1
            return rc, out.getvalue()
        script = {"ddpm": [sys.executable, os.path.join(HERE, "ddpm.py")],
                  "bench": [sys.executable, os.path.join(HERE, "bench.py")]}
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
