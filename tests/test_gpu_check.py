"""`python bench.py --gpu-check`: its CPU rehearsal (a tiny model) passes every check and writes
the report; a failing or hanging step fails its own line only; without a GPU it says so in one
line. And the benchmark takes as many training steps as it divides its time by."""
import os
import re
import subprocess
import sys

import bench
import evaluate
import gpu_check

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")
# The rehearsal's tests: one of each file, so that the check's pytest runs stay short.
ONE_TEST_EACH = "timestep_embedding_is_cos_sin or ema_warm_up_follows"


def lines_by_name(report: str) -> dict[str, tuple[str, str]]:
    """The check lines of a report -> {name: (status, reason)}."""
    found = re.findall(r"^(PASS|FAIL|SKIP)  (.+?) +\d+\.\d s  (.*)$", report, re.M)
    return {name: (status, reason) for status, name, reason in found}


def test_the_cpu_rehearsal_passes_every_check_and_writes_the_report(tmp_path, capsys):
    report = tmp_path / "check.txt"
    code = bench.main(["--gpu-check", "--device", "cpu", "--report", str(report),
                       "--gpu-check-k", ONE_TEST_EACH])
    printed = capsys.readouterr().out
    assert code == 0, printed
    text = report.read_text()
    assert text == printed  # the report printed is the report written
    assert text.startswith("ddpm.py GPU check: CPU REHEARSAL")
    checks = lines_by_name(text)
    try:
        evaluate.inception_path()
        fid = "PASS"
    except evaluate.MissingNetwork:
        fid = "SKIP"  # the report says why instead of failing
    expected = {
        "tests: test_unet.py on cpu": "PASS", "tests: test_samplers.py": "PASS",
        "train, memory": "PASS", "resume, memory": "PASS", "sample, ddpm": "PASS",
        "sample, ddim": "PASS", "sample, dpm++": "PASS", "sample, heun": "PASS",
        "eval-fid, 4 samples": fid, "train, disk": "PASS", "resume, disk": "PASS",
        "train, --compile": "SKIP", "resume, --compile": "SKIP",
        "sample, dpm++ --compile": "SKIP", "train, --super-res, disk": "PASS",
        "resume, --super-res, memory": "PASS", "upsample, --super-res": "PASS",
        "torchrun, gloo all-reduce": "PASS", "torchrun, ddpm.py": "PASS",
        "benchmark, batch 8": "PASS", "benchmark, batch 16": "PASS"}
    assert {name: status for name, (status, _) in checks.items()} == expected
    assert checks["resume, disk"][1] == "ckpt-1.pth at step 4"
    assert checks["sample, heun"][1] == "8 pictures ddpm-*.png"
    assert checks["upsample, --super-res"][1] == "16 pictures sr-*.png"
    assert checks["tests: test_unet.py on cpu"][1].startswith("1 passed")
    assert checks["torchrun, gloo all-reduce"][1] == "all-reduce over 1 process(es) on gloo: 1"
    if fid == "PASS":
        assert re.match(r"FID \d+\.\d+, KID", checks["eval-fid, 4 samples"][1])
    # The benchmark table: a row per batch size and variant, with figures.
    rows = re.findall(r"^ +(\d+)  (fp32|bf16) +(\d+\.\d) +(\d+\.\d) +n/a .* ([\d.]+) s +"
                      r"([\d.]+) s$", text, re.M)
    assert [(bs, v) for bs, v, *_ in rows] == [("8", "fp32"), ("8", "bf16"), ("16", "fp32"),
                                               ("16", "bf16")]
    assert all(float(x) > 0 for *_, a, b, c, d in rows for x in (a, b, c, d))
    assert text.rstrip().splitlines()[-1].startswith("18 passed, 0 failed, 3 skipped"
                                                     if fid == "PASS" else
                                                     "17 passed, 0 failed, 4 skipped")
    log = (tmp_path / "check.log").read_text()
    assert all(f"=== {name}:" in log for name, (s, _) in checks.items() if s != "SKIP")


def test_a_failing_or_hanging_step_fails_its_own_line_and_the_rest_still_run(tmp_path):
    b, _ = bench.parse(["--gpu-check", "--device", "cpu", "--report", str(tmp_path / "r.txt")])
    check = gpu_check.GpuCheck(b, str(tmp_path))
    python = [sys.executable, "-c"]
    check.check("fails", python + ["print('error: no such thing'); raise SystemExit(3)"], 60)
    check.check("hangs", python + ["import time; print('started', flush=True); time.sleep(600)"],
                3)
    check.check("passes", python + ["print('all well')"], 60, lambda out: out.strip())
    check.check("wrong result", python + ["pass"], 60, gpu_check.wrote(str(tmp_path), "x-", 2))
    check.b.budget = 0  # what is left after the budget is spent does not run
    check.check("late", python + ["print('ran')"], 60)
    assert check.finish() == 1
    check.report.close()
    check.log.close()
    checks = lines_by_name((tmp_path / "r.txt").read_text())
    assert checks == {
        "fails": ("FAIL", "exit code 3: error: no such thing"),
        "hangs": ("FAIL", "stopped at 3 s (its limit); last output: started"),
        "passes": ("PASS", "all well"),
        "wrong result": ("FAIL", "0 pictures x-*.png, not 2"),
        "late": ("FAIL", "not run: the 0 s of --budget are spent")}
    assert "1 passed, 4 failed, 0 skipped" in (tmp_path / "r.txt").read_text()


def test_without_a_gpu_the_check_says_so_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, BENCH, "--gpu-check", "--report", str(tmp_path / "r.txt")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
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
