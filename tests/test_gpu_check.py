"""`python -m tools.bench --gpu-check`: its CPU rehearsal (a tiny model) writes each speed row as it is
measured and keeps them when killed; the round trip passes; what --budget leaves no time for is
listed as not run, and no speed row starts after the deadline; a step ends, at its limit too, with
every process it started, even one in a session of its own that ignores SIGTERM, and a process
out of reach does not keep it reading; a failing or hanging step fails its own line only; without
a GPU it says so in one line. And the benchmark takes as many training steps as it divides its
time by, and times what a checkpoint save costs it."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tools import bench
from features import evaluate
from tools import gpu_check
from tools import speed_rows
from tools import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m tools.bench` as from the repository root, run in a folder of the test's own.
BENCH = ["-m", "tools.bench"]
IN_ROOT = {**os.environ, "PYTHONPATH": ROOT}
CHECK_LINE = re.compile(r"^(PASS|FAIL|SKIP|CUT ) {2}(.+?) +\d+\.\d s  (.*)$", re.M)
# A whole speed row of the report, by kind (its name, then its figures to the line's end).
ROW_LINE = {
    "matmul": r"matmul \S+( \(TF32 off\))? +[\d.]+ TFLOP/s measured; datasheet n/a",
    "train": r"train \d+ \S+( \(TF32 off\))? +[\d.]+ img/s  [\d.]+ ms/step \(median of 3 x 1, "
             r"spread [\d.]+%\)  MFU [\d.]+% of measured, n/a of datasheet  GPU busy n/a  "
             r"peak n/a  first step [\d.]+ s",
    "loss": r"loss fp32-bf16 +fp32 [\d.]+, bf16 [\d.]+ \(mean of 8, same t and noise\): agree, "
            r"[\d.]+% apart, at most [\d.]+% per image",
    "sample": r"sample \d+ \S+( \(TF32 off\))? +[\d.]+ img/s  \(2 DPM-Solver\+\+ steps in "
              r"[\d.]+ s, EMA weights\)  peak n/a"}


def lines_by_name(report: str) -> dict[str, tuple[str, str]]:
    """The check lines of a report -> {name: (status, reason)}."""
    return {name: (status.strip(), reason) for status, name, reason in CHECK_LINE.findall(report)}


def rows_of(report: str) -> list[str]:
    """The speed rows of a report, each checked whole -> their kinds, in order."""
    kinds = []
    for line in re.findall(r"^ROW {3}(.*)$", report, re.M):
        kind = line.split()[0]
        assert re.fullmatch(ROW_LINE[kind], line), line
        kinds.append(kind)
    return kinds


def switches():
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    return m.allow_tf32, c.allow_tf32, c.benchmark, torch.get_num_threads()


def test_the_speed_rows_are_written_in_order_each_whole(tmp_path, capsys):
    report, before = tmp_path / "r.txt", switches()
    code = gpu_check.main(["--gpu-check", "--device", "cpu", "--parts", "speed", "--budget",
                           "600", "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    text = report.read_text()
    assert text == printed  # the report printed is the report written
    assert switches() == before  # TF32 switches, cuDNN's autotuner and the thread count
    assert rows_of(text) == ["matmul"] * 3 + ["train"] * 6 + ["loss"] + ["sample"] * 6
    assert re.search(r"^ROW {3}train 16 fp32 \(TF32 off\) ", text, re.M)
    assert lines_by_name(text)["speed rows, eager"] == ("PASS", "16 of 16 rows")
    # The JSON lines: the plan, then a row each, as the report has them.
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows[0]["row"] == "plan" and rows[0]["rows"] == [r["name"] for r in rows[1:]]
    assert [r["row"] for r in rows[1:]] == rows_of(text)
    train = [r for r in rows if r["row"] == "train"]
    assert [(r["batch"], r["variant"]) for r in train] == [
        (n, p) for n in (8, 16) for p in ("fp32", "tf32", "bf16")]
    for r in train:  # img/s is the batch over the median window
        assert r["img_s"] == pytest.approx(r["batch"] / sorted(r["windows_ms"])[1] * 1e3)


def test_the_round_trip_passes_every_check_in_the_rehearsal(tmp_path):
    report = tmp_path / "r.txt"
    assert gpu_check.main(["--gpu-check", "--device", "cpu", "--parts", "round-trip",
                           "--budget", "600", "--report", str(report)]) == 0
    checks = lines_by_name(report.read_text())
    try:
        evaluate.inception_path()
        fid = "PASS"
    except evaluate.MissingNetwork:
        fid = "SKIP"  # the report says why instead of failing
    assert {name: s for name, (s, _) in checks.items()} == {
        "probe: nvidia-smi": "SKIP", "train, memory": "PASS", "resume, memory": "PASS",
        "sample, ddpm": "PASS", "sample, ddim": "PASS", "sample, dpm++": "PASS",
        "sample, heun": "PASS", "eval-fid, 4 samples": fid, "train, disk": "PASS",
        "resume, disk": "PASS", "train, --super-res, disk": "PASS",
        "resume, --super-res, memory": "PASS", "upsample, --super-res": "PASS"}
    assert checks["resume, disk"][1] == "ckpt-1.pth at step 4"
    assert checks["upsample, --super-res"][1] == "16 pictures sr-*.png"
    log = (tmp_path / "r.log").read_text()
    assert all(f"=== {name}:" in log for name, (s, _) in checks.items() if s != "SKIP")


def test_what_the_budget_leaves_no_time_for_is_listed_as_not_run(tmp_path):
    report = tmp_path / "r.txt"
    assert gpu_check.main(["--gpu-check", "--device", "cpu", "--budget", "0", "--report",
                           str(report)]) == 0  # nothing failed: nothing ran
    text = report.read_text()
    checks = lines_by_name(text)
    b, _ = bench.parse(["--check-rows", "eager", *gpu_check.SPEED_REHEARSAL])
    rows = [speed_rows.label(name) for name in speed_rows.check_plan(b)]
    assert list(checks)[:len(rows) + 2] == ["probe: nvidia-smi", "speed rows, eager", *rows]
    assert list(checks)[-5:] == ["tests: test_unet.py on cpu", "torchrun: gloo, ddpm.py",
                                 "speed rows, compile", "train, --compile",
                                 "sample, dpm++ --compile"]
    not_run = {name for name, (s, reason) in checks.items() if s == "CUT"}
    assert all(reason.startswith("not run: --budget 0 s") for name, (s, reason) in checks.items()
               if s == "CUT")
    assert {name for name, (s, _) in checks.items() if s != "SKIP"} == not_run
    assert "ROW" not in text
    assert f"{len(not_run)} not run or cut by --budget" in text.splitlines()[-1]


def test_no_speed_row_starts_after_the_deadline_however_much_budget_is_left():
    # --deadline is a clock time, so the model's build before the first row counts against it:
    # one already past leaves the plan alone, though --budget (300 s by default) is untouched.
    b, rest = bench.parse(["--check-rows", "eager", "--device", "cpu",
                           *gpu_check.SPEED_REHEARSAL, "--deadline", f"{time.time():.3f}"])
    rows, before = [], switches()
    speed_rows.check_rows(b, rest, rows.append)
    assert b.budget > 0 and [r["row"] for r in rows] == ["plan"]
    assert len(rows[0]["rows"]) == len(speed_rows.check_plan(b)) > 0
    assert switches() == before


def test_a_killed_check_keeps_every_row_it_measured(tmp_path):
    report, jsonl = tmp_path / "r.txt", tmp_path / "r.jsonl"
    proc = subprocess.Popen([sys.executable, *BENCH, "--gpu-check", "--device", "cpu", "--parts",
                             "speed", "--budget", "600", "--report", str(report)],
                            cwd=tmp_path, env=IN_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:  # until 2 rows are written
            if report.exists() and report.read_text().count("\nROW ") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the check ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = report.read_text()
    assert text.endswith("\n")  # no row cut in half
    kinds = rows_of(text)
    assert len(kinds) >= 2
    # A row goes to the JSON lines, then to the report: a kill between the two leaves one more.
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["row"] for r in rows[1:len(kinds) + 1]] == kinds
    assert len(kinds) <= len(rows) - 1 <= len(kinds) + 1
    assert not re.search(r"passed, \d+ failed", text)  # it was killed before its last line


def test_a_step_ends_with_every_process_it_started(tmp_path):
    # The step starts a grandchild in a session of its own that ignores SIGTERM and holds the
    # step's output open, prints both pids, and waits; the step is interrupted there.
    script = tmp_path / "step.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal("
        "signal.SIGTERM, signal.SIG_IGN); print(\"ignoring\", flush=True); time.sleep(600)'], "
        "start_new_session=True, stdout=subprocess.PIPE, text=True)\n"
        "assert g.stdout.readline() == 'ignoring\\n'\n"
        "print('pids', os.getpid(), g.pid, os.getpgid(0), os.getpgid(g.pid), flush=True)\n"
        "time.sleep(600)\n")
    pids, groups = [], []

    class Stop(Exception):
        pass

    def on_line(line):
        if line.startswith("pids"):
            step, grandchild, *pgids = map(int, line.split()[1:])
            pids.extend([step, grandchild])
            groups.extend(pgids)
            raise Stop  # as Ctrl-C would, or the limit: the step is ended either way

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Stop):
        steps.run_bounded([sys.executable, str(script)], 300, on_line, str(tmp_path),
                              dict(os.environ))
    assert len(pids) == 2
    assert groups[0] != groups[1]  # killing the step's process group alone would miss it
    assert not [pid for pid in pids if steps.alive(pid)]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


def test_a_step_past_its_limit_ends_with_a_grandchild_that_ignores_sigterm(tmp_path):
    # The step starts a grandchild in a session of its own that ignores SIGTERM, prints both pids
    # and sleeps past its limit: the limit ends it, and the grandchild with it.
    pids, handlers = [], (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))

    def on_line(line):
        if line.startswith("pids"):
            pids.extend(map(int, line.split()[1:]))
    try:
        t0 = time.monotonic()
        rc = steps.run_bounded([sys.executable, "-c", (
            "import os, subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal("
            "signal.SIGTERM, signal.SIG_IGN); print(\"ignoring\", flush=True); "
            "time.sleep(600)'], start_new_session=True, stdout=subprocess.PIPE, text=True)\n"
            "assert g.stdout.readline() == 'ignoring\\n'\n"
            "print('pids', os.getpid(), g.pid, flush=True)\n"
            "time.sleep(600)")], 5, on_line, str(tmp_path), dict(os.environ))
        took = time.monotonic() - t0
        assert rc is None  # stopped at its limit, not ended by itself
        assert len(pids) == 2, "the step did not start its grandchild within its limit"
        assert took < 120  # the limit, end_step's grace and the drain, not the 600 s sleeps
        assert not [pid for pid in pids if steps.alive(pid)]
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    finally:  # whatever failed above, nothing it started is left running
        for pid in pids:
            if steps.alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_step_that_ends_leaves_no_process_behind(tmp_path):
    # The step exits at once; the grandchild it leaves in its own session holds the output pipe
    # open: the step still ends (it does not wait for the pipe) and takes the grandchild along.
    lines = []
    rc = steps.run_bounded([sys.executable, "-c", (
        "import subprocess, sys\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal("
        "signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], start_new_session=True)\n"
        "print('grandchild', g.pid)\nsys.exit(3)")], 300, lines.append, str(tmp_path),
        dict(os.environ))
    assert rc == 3
    pid = int(lines[0].split()[1])
    assert not steps.alive(pid)


def test_a_process_the_kill_misses_does_not_keep_the_step_reading(tmp_path):
    # The step exits at once and leaves a grandchild in its own session, without the step's tag
    # in its environment (out of end_step's reach), writing to the step's output for 60 s: the
    # step's output is read for steps.DRAIN seconds more at most, not until that writer ends.
    lines = []
    try:
        t0 = time.monotonic()
        rc = steps.run_bounded([sys.executable, "-c", (
            "import os, subprocess, sys\n"
            f"env = {{k: v for k, v in os.environ.items() if k != {steps.TAG!r}}}\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time\\nfor _ in range(600): "
            "print(\"still here\", flush=True); time.sleep(0.1)'], start_new_session=True, "
            "env=env)\n"
            "print('grandchild', g.pid, flush=True)")], 300, lines.append, str(tmp_path),
            dict(os.environ))
        took = time.monotonic() - t0
        assert rc == 0
        assert took < 45  # well under the writer's 60 s
    finally:
        for line in lines:
            if line.startswith("grandchild") and steps.alive(int(line.split()[1])):
                os.kill(int(line.split()[1]), signal.SIGKILL)


def test_a_failing_or_hanging_step_fails_its_own_line_and_the_rest_still_run(tmp_path):
    b, _ = bench.parse(["--gpu-check", "--device", "cpu", "--report", str(tmp_path / "r.txt")])
    check = gpu_check.GpuCheck(b, str(tmp_path))
    python = [sys.executable, "-c"]
    try:
        check.check("fails", python + ["print('error: no such thing'); raise SystemExit(3)"], 60)
        check.check("hangs", python + ["import time; print('started', flush=True); "
                                       "time.sleep(600)"], 3)
        check.check("passes", python + ["print('all well')"], 60, lambda out: out.strip())
        check.check("wrong result", python + ["pass"], 60,
                    gpu_check.wrote(str(tmp_path), "x-", 2))
        check.check("not there", ["./no-such-program"], 60)
        check.b.budget = 0  # what is left after the budget is spent does not run
        check.check("late", python + ["print('ran')"], 60)
        assert check.finish() == 1
    finally:
        check.close()
    checks = lines_by_name((tmp_path / "r.txt").read_text())
    assert checks == {
        "fails": ("FAIL", "exit code 3: error: no such thing"),
        "hangs": ("FAIL", checks["hangs"][1]),
        "passes": ("PASS", "all well"),
        "wrong result": ("FAIL", "0 pictures x-*.png, not 2"),
        "not there": ("FAIL", "exit code 127: error: No such file or directory: ./no-such-program"),
        "late": ("CUT", "not run: --budget 0 s: the time of part round-trip ends at 0 s")}
    # Its last output is "started" unless the limit came before Python printed it.
    assert checks["hangs"][1].startswith("stopped at 3 s (its limit); last output: ")
    assert "1 passed, 4 failed, 0 skipped, 1 not run" in (tmp_path / "r.txt").read_text()


def test_the_gpu_busy_time_is_the_union_of_the_kernels_spans():
    # Overlapping and nested spans count once; gaps not at all.
    assert speed_rows.covered([(5, 6), (0, 2), (1, 3), (5.5, 5.7)]) == 4
    assert speed_rows.covered([]) == 0
    assert speed_rows.gpu_busy(torch.device("cpu"), lambda: None) is None


def test_without_a_gpu_the_check_says_so_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, *BENCH, "--gpu-check", "--report", str(tmp_path / "r.txt")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**IN_ROOT, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2
    out = (r.stdout + r.stderr).strip().splitlines()
    assert len(out) == 1 and "needs a CUDA GPU" in out[0] and "--device cpu" in out[0]
    assert not (tmp_path / "r.txt").exists()


def test_the_benchmark_takes_as_many_training_steps_as_it_times(tmp_path):
    # 32 demo images are 8 batches of 4: 11 steps take a second epoch.
    b, _ = bench.parse(["--device", "cpu", "--batch-size", "4"])
    prog = bench.build(b, gpu_check.TINY, str(tmp_path))
    bench.train_steps(prog, prog.data, 11, b.batch_size)
    assert len(prog.data) == 32 and prog.state.step == 11


def test_the_save_benchmark_times_a_real_save_and_the_steps_its_write_runs_beside(tmp_path,
                                                                                   capsys):
    out_json = tmp_path / "save.json"
    assert bench.main(["--save-speed", "--device", "cpu", "--batch-size", "4", "--warmup", "1",
                       "--steps", "2", "--json", str(out_json), *gpu_check.TINY]) == 0
    out = json.loads(out_json.read_text())
    assert len(out["rounds"]) == 2 and out["mib"] > 0 and out["steps_beside"] >= 1
    assert all(r[k] > 0 for r in out["rounds"] for k in ("step_s", "blocking_s", "write_s",
                                                           "write_beside_s", "sync_s"))
    assert "training time a save costs" in capsys.readouterr().out
