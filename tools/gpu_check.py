"""gpu_check.py: `python -m tools.bench --gpu-check`, does this setup work, and how fast?

A probe (versions, nvidia-smi), the speed rows (speed_rows.py), a round trip through ddpm.py,
the tests on the GPU, torchrun and --compile, in that order, within --budget (each step a process
bounded by steps.py); every row and check line is written to the report the moment it ends, so
a kill loses nothing measured. With --device cpu it rehearses every step on the CPU with a tiny
model (ddpm.py and speed_rows.py in this process).
"""
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback

import torch
from PIL import Image

from tools import bench
import data
import ddpm
from features import evaluate
from tools import speed_rows
from tools.steps import LineSink, run_bounded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# The round trip's model: 8 px, one level with attention, T = 10 (the tests' tiny model): the
# check is of the code paths, and the time goes to the speed rows.
TINY = ["--img-size", "8", "--num-channels", "8", "--channel-multiples", "1", "--has-attn", "t",
        "--timesteps", "10", "--beta-max", "0.5"]
# The speed rows' steps and sizes: on a GPU ddpm.py's default model at batch 64 and 128, 5 warm-up
# steps and 3 windows of 10; sampling 64 and 512 images with 20 steps. In a rehearsal, tiny.
SPEED = ["--warmup", "5", "--steps", "10", "--batch-size", "128", "--sample-batch", "64",
         "--sample-steps", "20"]
SPEED_REHEARSAL = TINY + ["--warmup", "1", "--steps", "1", "--batch-size", "16",
                          "--sample-batch", "4", "--sample-steps", "2"]
# Run by torchrun: join the group on the backend argv[1], all-reduce ones, leave the group; then
# ddpm.py (argv[2]) with the flags after it, as `python ddpm.py ...` would run it.
PROBE = """import os, runpy, sys, torch, torch.distributed as dist
backend = sys.argv[1]
dev = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if backend == "nccl" else "cpu")
if dev.type == "cuda":
    torch.cuda.set_device(dev)
dist.init_process_group(backend)
x = torch.ones(4, device=dev)
dist.all_reduce(x)
assert x.tolist() == [float(dist.get_world_size())] * 4, x
print(f"all-reduce over {dist.get_world_size()} process(es) on {backend}: {x[0].item():g}",
      flush=True)
dist.destroy_process_group()
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")  # the project is on PYTHONPATH (launch)
"""
# Tests with torch's default device set (argv[1]): their modules and tensors are made there. TF32
# off: the tests compare with tolerances of 1e-5, and TF32 products carry 10 mantissa bits.
ON_DEVICE = """import sys, pytest, torch
dev = sys.argv[1]
torch.set_default_device(dev)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
code = pytest.main(sys.argv[2:])
if dev.startswith("cuda"):
    print(f"peak memory on {dev}: {torch.cuda.max_memory_allocated(dev) / 2**20:.1f} MiB")
sys.exit(code)
"""


class CheckFailed(Exception):
    """A step ran, but what it left is wrong: the message is the report's reason."""


def failure_line(out: str) -> str:
    """The line of a failed step's output that says most: pytest's first FAILED line (with its
    count), an `error:` line, else the last line (not a speed row: the report has those)."""
    lines = [line.strip() for line in out.splitlines()
             if line.strip() and not line.startswith(speed_rows.ROW)] or ["(no output)"]
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


def tests_line(cuda: bool):
    """A check of the tests: pytest's count, and on a GPU the memory they held there (none: the
    tests did not run on it)."""
    def verify(out: str) -> str:
        count = next((line.strip() for line in reversed(out.splitlines())
                      if re.search(r"\d+ passed", line)), None)
        if count is None:
            raise CheckFailed("no pytest count in the output: " + failure_line(out))
        if not cuda:
            return count
        m = re.search(r"peak memory on (\S+): ([\d.]+) MiB", out)
        if not m or float(m.group(2)) == 0:
            raise CheckFailed(f"{count}, but nothing was allocated on the GPU")
        return f"{count}; peak {m.group(2)} MiB on {m.group(1)}"
    return verify


def write_faces(folder: str, n: int, size: int) -> None:
    """n demo faces as 000.png, 001.png, ... in folder: a data folder (--data-on disk needs one)."""
    os.makedirs(folder)
    for i, face in enumerate(data.demo_faces(n, size, 3, seed=1)):
        Image.fromarray(face.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:03d}.png"))


class GpuCheck:
    """The steps of --gpu-check in order, each bounded by its own time limit and by the share
    of --budget its part may end by. Each check is one report line (PASS, FAIL, SKIP, or CUT
    when --budget left no time for it), each speed row one line, written when it ends; a failure
    does not stop the others. Every step's output goes to the .log beside the report as it comes,
    the rows also to the .jsonl. Steps run as processes of their own, killed with every process
    they started at their limit; in a CPU rehearsal (which tests the check itself) ddpm.py and
    speed_rows.py run in this process instead: no start-up, and no kill (the speed rows stop at
    the part's time themselves)."""

    def __init__(self, b, tmp: str, rest: list[str] = ()):
        self.b, self.tmp, self.dev, self.rest = b, tmp, b.device, list(rest)
        self.rehearsal = not b.device.startswith("cuda")
        self.parts = [p for p in bench.CHECK_PARTS if p in b.parts.split(",")]
        # The parts --budget is shared among: a rehearsal skips --compile, and gives its time away.
        self.timed_parts = [p for p in self.parts if not (self.rehearsal and p == "compile")]
        # bf16 where the GPU has it (Ampere and later), else fp16 with loss scaling; a rehearsal
        # in fp32: autocast to bf16 makes a CPU step several times slower.
        self.precision = ("fp32" if self.rehearsal else "bf16"
                          if torch.cuda.get_device_capability(b.device)[0] >= 8 else "fp16")
        self.t0, self.statuses = time.perf_counter(), []
        self.stdout = sys.stdout  # the terminal's: a rehearsal's steps write to a LineSink
        stem = os.path.splitext(b.report)[0]
        self.log_path, self.jsonl_path = stem + ".log", stem + ".jsonl"
        self.report = open(b.report, "w")
        self.log, self.jsonl = open(self.log_path, "w"), open(self.jsonl_path, "w")

    def close(self) -> None:
        for f in (self.report, self.log, self.jsonl):
            f.close()

    def say(self, text: str = "") -> None:
        print(text, file=self.stdout, flush=True)
        self.report.write(text + "\n")
        self.report.flush()

    def part_end(self, part: str) -> float:
        """When `part` must have ended, seconds from the start: its cumulative share of --budget
        among the parts that run (what one part leaves unused goes to the next)."""
        parts = self.timed_parts
        shares = [bench.CHECK_SHARES[p] for p in parts]
        upto = parts.index(part) + 1 if part in parts else len(parts)
        return self.b.budget * sum(shares[:upto]) / (sum(shares) or 1)

    def left(self, part: str) -> float:
        return self.part_end(part) - (time.perf_counter() - self.t0)

    def spent(self, part: str) -> str:
        return (f"--budget {self.b.budget:g} s: the time of part {part} ends at "
                f"{self.part_end(part):.0f} s")

    def launch(self, cmd: list[str], limit: float, on_line) -> int | None:
        """cmd: ["ddpm", *flags], ["rows", *flags] (speed_rows.py) or a command line; every line
        of its output to on_line as it comes -> its exit code, None when it ran out of time."""
        if self.rehearsal and cmd[0] in ("ddpm", "rows"):
            sink = LineSink(on_line)
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                try:
                    rc = (ddpm.main if cmd[0] == "ddpm" else speed_rows.main)(cmd[1:])
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else 1
                except Exception:
                    traceback.print_exc()
                    rc = 1
            sink.close()
            return rc
        script = {"ddpm": [sys.executable, os.path.join(ROOT, "ddpm.py")],
                  "rows": [sys.executable, "-m", "tools.speed_rows"]}
        threads = {"OMP_NUM_THREADS": str(self.b.threads)} if self.b.threads else {}
        # Run in a folder of its own: the repository is where Python finds the project's modules.
        path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
        return run_bounded(script.get(cmd[0], cmd[:1]) + cmd[1:], limit, on_line, self.tmp,
                           {**os.environ, **threads, "PYTHONPATH": path})

    def check(self, name: str, cmd: list[str] | None, limit: float, verify=None,
              skip: str | None = None, part: str = "round-trip", *, on_line=None) -> str:
        """One report line: cmd run (see launch) unless `skip` says why not or its part's time
        is spent; then verify(output) -> the reason to print, or CheckFailed -> the status."""
        t0, left, lines = time.perf_counter(), self.left(part), []
        if skip:
            status, reason = "SKIP", skip
        elif left < 1:
            status, reason = "CUT", f"not run: {self.spent(part)}"
        else:
            self.log.write(f"=== {name}: {' '.join(cmd)}\n")

            def line(text: str) -> None:
                lines.append(text)
                self.log.write(text + "\n")
                self.log.flush()
                if on_line:
                    on_line(text)
            try:
                rc = self.launch(cmd, min(limit, left), line)
            except OSError as e:  # the program is not there
                rc, lines[:] = 127, [f"error: {e.strerror}: {cmd[0]}"]
            out = "\n".join(lines)
            try:
                if rc is None and limit >= left:
                    status, reason = "CUT", (f"stopped at {left:.0f} s, {self.spent(part)}; last "
                                             f"output: {failure_line(out)}")
                elif rc is None:
                    raise CheckFailed(f"stopped at {limit:.0f} s (its limit); last output: "
                                      f"{failure_line(out)}")
                elif rc:
                    raise CheckFailed(f"exit code {rc}: {failure_line(out)}")
                else:
                    status, reason = "PASS", verify(out) if verify else "done"
            except CheckFailed as e:
                status, reason = "FAIL", str(e)
            except Exception as e:  # noqa: BLE001 (what the step left cannot be read)
                status, reason = "FAIL", f"{type(e).__name__}: {e}"[:240]
        self.statuses.append(status)
        self.say(f"{status:<4}  {name:<30} {time.perf_counter() - t0:6.1f} s  {reason}")
        return status

    def run(self) -> int:
        """The probe, then each part asked for in order, the count -> 0 if none failed, else 1."""
        if self.rehearsal:
            where = (f"CPU REHEARSAL on {os.cpu_count()} cores (a tiny model and batches; its "
                     f"times say nothing about a GPU)")
        else:
            gpu = torch.cuda.get_device_properties(self.dev)
            where = (f"{gpu.name} ({gpu.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{gpu.major}.{gpu.minor}) as {self.dev}")
        self.say(f"ddpm.py GPU check: {where}; round trip in {self.precision}; --budget "
                 f"{self.b.budget:g} s for {', '.join(self.parts) or 'the probe alone'}")
        self.probe()
        for part in self.parts:
            {"speed": self.speed, "round-trip": self.round_trip, "tests": self.tests,
             "torchrun": self.torchrun, "compile": self.compile}[part]()
        return self.finish()

    def finish(self) -> int:
        """The last line: the count of each status -> 0 if no check failed, else 1."""
        n = {s: self.statuses.count(s) for s in ("PASS", "FAIL", "SKIP", "CUT")}
        self.say(f"{n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped, {n['CUT']} not "
                 f"run or cut by --budget, in {time.perf_counter() - self.t0:.0f} s; report "
                 f"{self.b.report}, rows {self.jsonl_path}, every step's output {self.log_path}")
        return 1 if n["FAIL"] else 0

    def probe(self) -> None:
        """Versions of what the check uses, and nvidia-smi's view of the GPU (5 s at most)."""
        def version(dist: str) -> str:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                return "not installed"
        self.say(f"versions: Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA "
                 f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), " + ", ".join(
                     f"{d} {version(d)}" for d in ("rich", "pytest", "pillow", "numpy"))
                 + f"; {sys.executable}")
        query = "name,driver_version,memory.total,power.limit,clocks.max.sm,temperature.gpu"
        skip = "a CPU rehearsal" if self.rehearsal else None
        self.check("probe: nvidia-smi", ["nvidia-smi", f"--query-gpu={query}",
                                         "--format=csv,noheader"], 5,
                   lambda out: f"{query}: {out.strip().splitlines()[0]}" if out.strip() else
                   "(no output)", skip, part=self.parts[0] if self.parts else "speed")

    def speed(self, kind: str = "eager") -> None:
        """The speed rows (speed_rows.check_rows) in one process, each row written as it comes;
        the rows it did not reach listed as not run."""
        part = "speed" if kind == "eager" else "compile"
        flags = ["--check-rows", kind, "--device", self.dev,
                 *(SPEED_REHEARSAL if self.rehearsal else SPEED), *self.rest]
        seen, plan, errors = [], speed_rows.check_plan(bench.parse(flags)[0]), []

        def on_line(text: str) -> None:
            try:
                row = speed_rows.ROW
                r = json.loads(text[len(row):]) if text.startswith(row) else None
            except ValueError:  # a row cut off by a kill: not measured to the end
                r = None
            if r is None:
                return
            self.jsonl.write(json.dumps(r) + "\n")
            self.jsonl.flush()
            if r["row"] == "plan":
                plan[:] = r["rows"]
            else:
                seen.append(r["name"])
                errors.extend([r["name"]] * (r["row"] == "error"))
            self.say(speed_rows.row_line(r))

        def verify(out: str) -> str:
            if errors:
                raise CheckFailed(f"{len(errors)} row(s) failed: {', '.join(errors)}")
            return f"{len(seen)} of {len(plan)} rows"

        # The last row must end a second before the step is stopped: an absolute time, so that
        # speed_rows.py's start (import, CUDA, the model's build) counts against it too.
        left = self.left(part)
        status = self.check(f"speed rows, {kind}", ["rows", *flags, "--deadline",
                                                    f"{time.time() + left - 1:.3f}"],
                            left, verify, part=part, on_line=on_line)
        why = "the step above failed before it" if status == "FAIL" else self.spent(part)
        for name in plan:
            if name not in seen:
                self.statuses.append("CUT")
                self.say(f"CUT   {speed_rows.label(name):<30}    0.0 s  not run: {why}")

    def round_trip(self) -> None:
        """ddpm.py on a tiny model in bf16 (fp16 where the GPU has none): train a few steps ->
        checkpoint -> resume -> sample with each sampler -> --eval-fid, from memory; train and
        resume from disk, and a super-resolution model."""
        t, faces, few = self.tmp, os.path.join(self.tmp, "faces"), os.path.join(self.tmp, "few")
        write_faces(faces, 16, 8)  # 2 batches of 8: --max-steps 2 is an epoch
        write_faces(few, 4, 8)  # FID's reference: 4 pictures (the Inception net is slow on a CPU)
        self.trains("train, memory", "mem", "memory", 2)
        self.trains("resume, memory", "mem", "memory", 4)
        for s in ("ddpm", "ddim", "dpm++", "heun"):
            self.check(f"sample, {s}", self.sample("mem", s, "--sampler", s,
                                                   *["--sample-steps", "5"] * (s != "ddpm")),
                       60, wrote(f"{t}/mem/{s}", "ddpm-", 8))
        try:
            no_fid = evaluate.inception_path() and None
        except evaluate.MissingNetwork as e:
            no_fid = str(e)
        self.check("eval-fid, 4 samples", self.sample("mem", "fid", "--eval-fid", "4",
                                                      "--data-folders", few), 120, fid_line, no_fid)
        self.trains("train, disk", "disk", "disk", 2)
        self.trains("resume, disk", "disk", "disk", 4)
        self.trains("train, --super-res, disk", "sr", "disk", 2, "--super-res", "4")
        self.trains("resume, --super-res, memory", "sr", "memory", 4, "--super-res", "4")
        self.check("upsample, --super-res", self.sample("sr", "up", "--lowres-folder", faces,
                                                        "--sampler", "dpm++", "--sample-steps",
                                                        "5"), 60, wrote(f"{t}/sr/up", "sr-", 16))

    def base(self) -> list[str]:
        return TINY + ["--batch-size", "8", "--device", self.dev, "--precision", self.precision,
                       "--seed", "0", "--cache-dir", os.path.join(self.tmp, "cache")]

    def trains(self, name, run, place, steps, *extra, limit=60, skip=None, part="round-trip"):
        """A training check: --max-steps steps (over 2: resuming the run's newest checkpoint)."""
        t = self.tmp
        self.check(name, ["ddpm", *self.base(), "--train", "--data-folders", f"{t}/faces",
                          "--data-on", place, "--epochs", "1", "--max-steps", str(steps),
                          *(["--loadckpt", "latest"] * (steps > 2)), *extra, "--ckpt-save-dir",
                          f"{t}/{run}/ckpt", "--save-dir", f"{t}/{run}/out"], limit,
                   trained_to(f"{t}/{run}/ckpt", steps), skip, part)

    def sample(self, run, out, *extra):
        return ["ddpm", *self.base(), "--loadckpt", "latest", *extra, "--ckpt-save-dir",
                f"{self.tmp}/{run}/ckpt", "--save-dir", f"{self.tmp}/{run}/{out}"]

    def tests(self) -> None:
        """tests/test_unet.py with torch's default device set to the device and TF32 off: its
        modules and tensors are made there (on a GPU the check reads the memory they held)."""
        k = ["-k", self.b.gpu_check_k] if self.b.gpu_check_k else []
        path = os.path.join(ROOT, "tests", "test_unet.py")
        skip = ("pytest is not installed (pip install -r requirements-test.txt)"
                if not importlib.util.find_spec("pytest") else
                None if os.path.isfile(path) else f"{path} is not there")
        self.check(f"tests: test_unet.py on {self.dev}",
                   [sys.executable, "-c", ON_DEVICE, self.dev, "-q", "-p", "no:cacheprovider",
                    path, *k], 120, tests_line(not self.rehearsal), skip, "tests")

    def torchrun(self) -> None:
        """torchrun with one process: an all-reduce on NCCL (gloo on the CPU), then ddpm.py trains
        in the same process (ddpm.py forms no process group for a single process)."""
        backend, probe = "gloo" if self.rehearsal else "nccl", os.path.join(self.tmp, "probe.py")
        with open(probe, "w") as f:
            f.write(PROBE)
        ckpt = f"{self.tmp}/dist/ckpt"
        args = [*self.base(), "--train", "--demo", "--demo-images", "16", "--max-steps", "2",
                "--epochs", "1", "--ckpt-save-dir", ckpt, "--save-dir", f"{self.tmp}/dist/out"]

        def verify(out: str) -> str:
            reduced = next((line for line in out.splitlines() if line.startswith("all-reduce")),
                           None)
            if reduced is None:
                raise CheckFailed("no all-reduce result printed")
            return f"{reduced}; ddpm.py: {trained_to(ckpt, 2)(out)}"
        self.check(f"torchrun: {backend}, ddpm.py", [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            probe, backend, os.path.join(ROOT, "ddpm.py"), *args], 90, verify, part="torchrun")

    def compile(self) -> None:
        """torch.compile: the speed row of bf16 + compile at the largest batch (its first step's
        time is the compilation's), then ddpm.py --compile trains the tiny model and samples."""
        skip = ("checked on a GPU only: inductor's C++ compile of even the tiny model takes "
                "minutes on a CPU") if self.rehearsal else None
        if skip:
            self.check("speed rows, compile", None, 0, skip=skip, part="compile")
        else:
            self.speed("compile")
        self.trains("train, --compile", "comp", "memory", 2, "--compile", limit=240, skip=skip,
                    part="compile")
        self.check("sample, dpm++ --compile", self.sample("comp", "dpm++", "--compile",
                                                          "--sampler", "dpm++", "--sample-steps",
                                                          "5"), 180,
                   wrote(f"{self.tmp}/comp/dpm++", "ddpm-", 8), skip, "compile")


def main(argv=None) -> int:
    """python -m tools.bench --gpu-check (bench.py's flags) -> 0 when no check failed, 1 when one did,
    2 (and one line) when there is no GPU and no --device cpu asked for a rehearsal, or a flag
    is wrong."""
    b, rest = bench.parse(argv)
    bad = set(b.parts.split(",")) - set(bench.CHECK_PARTS)
    if bad:
        print(f"error: --parts {b.parts}: unknown {', '.join(sorted(bad))}; use a comma list of "
              f"{','.join(bench.CHECK_PARTS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not (b.device_typed and b.device == "cpu"):
        print(f"error: bench.py --gpu-check needs a CUDA GPU, and torch {torch.__version__} sees "
              f"none (--device cpu rehearses it on the CPU with a tiny model)", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if b.device == "cpu" and not b.threads:  # a tiny model gains nothing from more threads,
        b.threads = 1  # and waits for descheduled ones on a busy machine
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        try:
            check = GpuCheck(b, tmp, rest)
        except OSError as e:
            print(f"error: cannot write the report {b.report}: {e.strerror}", file=sys.stderr)
            return 2
        try:
            torch.set_num_threads(b.threads or threads)
            return check.run()
        finally:
            torch.set_num_threads(threads)
            check.close()


if __name__ == "__main__":
    sys.exit(main())
