"""--distill as a command: a student of a trained checkpoint, a run like any other (resumed
exactly, --resume for every launch), whose checkpoint says it is a student and draws with its
own sampler; the kinds it cannot make a student of are refused in one line."""
import os

import pytest
import torch

from config import parse_args
from core import spec
from ddpm import Program, main
from run import checkpoint

MODEL = ["--demo", "--demo-images", "32", "--img-size", "8", "--num-channels", "8",
         "--channel-multiples", "1", "--has-attn", "f", "--num-blocks", "1", "--timesteps", "20",
         "--beta-max", "0.3", "--batch-size", "8", "--seed", "3", "--device", "cpu",
         "--sample-every", "0"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny teacher (4 steps of training) -> its checkpoint (the tests only read it)."""
    folder = tmp_path_factory.mktemp("teacher")
    assert main(["--train", *MODEL, "--epochs", "1", "--ckpt-save-dir", str(folder / "ckpt"),
                 "--save-dir", str(folder / "out")]) == 0
    return str(folder / "ckpt" / "ckpt-0.pth")


def distill(tmp_path, teacher, folder="student", *extra) -> list[str]:
    return ["--distill", "--loadckpt", teacher, *MODEL, "--epochs", "1",
            "--ckpt-save-dir", str(tmp_path / folder), "--save-dir", str(tmp_path / "s-out"),
            *extra]


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def test_a_student_starts_as_its_teacher_and_says_what_it_is(tmp_path, teacher, capsys):
    args, typed = parse_args(distill(tmp_path, teacher))
    prog = Program(args, typed)
    t = load(teacher)
    assert prog.new_student and prog.state.step == 0 and prog.run_id != t["run_id"]
    for part in (prog.trainer.model, prog.trainer.ema, prog.trainer.teacher):
        assert all(torch.equal(v, t["ema"][k]) for k, v in part.state_dict().items())
    assert prog.cfg.model.student_steps == 2 and prog.trainer.distill.tau == [19, 9]
    assert "a new student for 2 step(s)" in capsys.readouterr().out
    prog.train()
    s = load(tmp_path / "student" / "ckpt-0.pth")
    assert spec.read(s).student_steps == 2 and s["teacher"]["student_steps"] == 0
    assert all(torch.equal(v, t["ema"][k]) for k, v in s["teacher"]["ema"].items())
    assert any(not torch.equal(v, t["ema"][k]) for k, v in s["ema"].items())  # it learned
    assert s["train"]["teacher_calls"] == 4
    main(["--info", str(tmp_path / "student" / "ckpt-0.pth")])
    assert "a student of distillation of a diffusion model: draws in 2 step(s)" in \
        capsys.readouterr().out


def test_a_student_draws_with_ddim_in_its_steps_unless_told_otherwise(tmp_path, teacher,
                                                                      capsys):
    assert main(distill(tmp_path, teacher)) == 0
    ckpt = str(tmp_path / "student" / "ckpt-0.pth")
    cfg = Program(*parse_args(["--loadckpt", ckpt, "--save-dir", str(tmp_path / "a")])).cfg
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.clip_x0) == ("ddim", 2, False)
    cfg = Program(*parse_args(["--loadckpt", ckpt, "--sample-steps", "1", "--save-dir",
                               str(tmp_path / "b")])).cfg
    assert (cfg.sample.sampler, cfg.sample.steps) == ("ddim", 1)
    for steps in ("1", "2", "4"):
        out = tmp_path / f"draw-{steps}"
        assert main(["--loadckpt", ckpt, "--sample-steps", steps, "--batch-size", "4",
                     "--save-dir", str(out)]) == 0
        assert os.path.isfile(out / "ddpm-all.png")
        warned = "is a student made to draw in 2 DDIM step(s); with --sampler ddim in"
        assert (warned in capsys.readouterr().out) == (steps != "2")


def test_a_student_of_a_student_halves_its_steps_and_learns_from_its_ddim_steps(tmp_path,
                                                                                 teacher):
    assert main(distill(tmp_path, teacher, "s2", "--student-steps", "4")) == 0
    four = str(tmp_path / "s2" / "ckpt-0.pth")
    args, typed = parse_args(distill(tmp_path, four, "s1"))
    prog = Program(args, typed)
    assert prog.cfg.model.student_steps == 2 and prog.trainer.distill.teacher_steps == 4
    assert prog.trainer.distill.solves == {19: [19, 14], 9: [9, 4]}  # tau_4: 19, 14, 9, 4
    assert main(distill(tmp_path, four, "s3", "--student-steps", "3")) == 2  # 3 does not divide 4


def test_resuming_a_distillation_is_exact(tmp_path, teacher):
    """--resume for every launch: the first starts the student from the teacher, a restart
    goes on from the folder's checkpoint; 3 + 3 steps end with the weights of 6 in one go."""
    whole = ["--resume", *distill(tmp_path, teacher, "whole", "--epochs", "10", "--max-steps", "6")]
    assert main(whole) == 0
    split = ["--resume", *distill(tmp_path, teacher, "split", "--epochs", "10", "--save-every",
                                  "3")]
    assert main(split + ["--max-steps", "3"]) == 0
    assert main(split + ["--max-steps", "6"]) == 0  # the folder's run goes on (not the teacher)
    a, b = (load(checkpoint.latest(str(tmp_path / f))) for f in ("whole", "split"))
    assert a["step"] == b["step"] == 6 and a["run_id"] != b["run_id"]
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["teacher"]["ema"][k], v) for k, v in b["teacher"]["ema"].items())


def test_what_cannot_be_distilled_is_refused_in_one_line(tmp_path, teacher, capsys):
    eps = load(teacher)
    eps["config"]["prediction"] = "eps"  # as if trained with --prediction eps
    torch.save(eps, tmp_path / "eps.pth")
    for path, extra, says in [(str(tmp_path / "eps.pth"), [], "predicts eps; a student needs"),
                              (teacher, ["--importance-sampling"], "--importance-sampling"),
                              (teacher, ["--student-steps", "0"], "at least 1")]:
        code = main(distill(tmp_path, path, "s", *extra))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and says in err
        assert not os.path.exists(tmp_path / "s")


def test_distill_needs_a_teacher_and_resume_of_a_diffusion_run_is_not_a_distillation(
        tmp_path, teacher, capsys):
    assert main(["--distill", *MODEL, "--ckpt-save-dir", str(tmp_path / "s")]) == 2
    assert "give --loadckpt TEACHER" in capsys.readouterr().err
    assert main(["--distill", "--resume", *MODEL, "--ckpt-save-dir",
                 os.path.dirname(teacher)]) == 2
    assert "is a diffusion model's run, not a distillation" in capsys.readouterr().err


def test_a_checkpoint_from_before_students_samples_as_a_diffusion_model_does(tmp_path, teacher):
    """Schema 3 had no student_steps: such a checkpoint is a diffusion model, drawn with
    DPM-Solver++ (10 Karras-spaced steps, x0 clipped) as one stored anew, to the same pixels."""
    old = load(teacher)
    del old["config"]["student_steps"], old["train"]["teacher_calls"]
    old["schema"] = 3
    torch.save(old, tmp_path / "old.pth")
    assert spec.read(old).student_steps == 0
    pictures = []
    for i, path in enumerate((str(tmp_path / "old.pth"), teacher)):
        out = tmp_path / f"out-{i}"
        args, typed = parse_args(["--loadckpt", path, "--batch-size", "4", "--seed", "1",
                                  "--save-dir", str(out)])
        cfg = Program(args, typed).cfg
        assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.spacing,
                cfg.sample.clip_x0) == ("dpm++", 10, "karras", True)
        assert main(["--loadckpt", path, "--batch-size", "4", "--seed", "1", "--save-dir",
                     str(out)]) == 0
        pictures.append((out / "ddpm-all.png").read_bytes())
    assert pictures[0] == pictures[1]


def test_a_student_is_not_written_among_its_teachers_checkpoints(tmp_path, teacher, capsys):
    folder = os.path.dirname(teacher)
    before = sorted(os.listdir(folder))
    assert main(["--distill", "--loadckpt", teacher, *MODEL, "--ckpt-save-dir", folder]) == 2
    assert "holds the teacher's run; give the student a --ckpt-save-dir of its own" in \
        capsys.readouterr().err
    assert sorted(os.listdir(folder)) == before
