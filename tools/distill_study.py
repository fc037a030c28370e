"""The few-step study (docs/results/distillation.md): at the recipe study's 16-px budget, a
teacher trained with today's defaults, its samplers at 1 to 20 network calls and the finely
solved ODE, and students distilled from it (progressive distillation, --distill), each scored
by FID and KID of 1,000 samples against the held-out faces, as in the recipe study. One JSON
line per row in WORK/results.jsonl (rows already there are skipped); the table in
WORK/table.md; 64 samples of the teacher at 20 calls and of the students at 2 and 1 step, side
by side, in WORK/side-by-side-s<seed>.png (pictures of the data: not for the repository).

    python -m tools.distill_study --faces anime-faces-64/ --seeds 0
    python -m tools.distill_study --faces anime-faces-64/ --seeds 1 --rows \
        "teacher dpm++ 20 uniform" "teacher dpm++ 10 karras"

A student is made in rounds (STUDENTS): from the teacher, with --teacher-calls calls of
DPM-Solver++ a student step, then from that student with its own DDIM steps (the paper's
halving). Each round's steps are typed here, and the rows give each round's seconds beside the
teacher's training seconds.
"""
import argparse
import json
import os
import time

import numpy as np
from PIL import Image

import config
import ddpm
from features import evaluate
from tools.recipe_study import BUDGETS, quality, split, train

# (name, teacher: "teacher" or another row's name, its flags); the rounds run in this order.
STUDENTS = [
    ("2-step", "teacher", ["--student-steps", "2", "--teacher-calls", "4", "--max-steps", "400"]),
    ("1-step from 2", "2-step", ["--student-steps", "1", "--max-steps", "300"]),
    # the same with 2.5 times the first round's steps: both rounds in the teacher's time
    ("2-step long", "teacher", ["--student-steps", "2", "--teacher-calls", "4",
                                "--max-steps", "1000"]),
    ("1-step from 2 long", "2-step long", ["--student-steps", "1", "--max-steps", "300"]),
    # a 2-step student alone, with the first round given the whole of the teacher's time
    ("2-step 600", "teacher", ["--student-steps", "2", "--teacher-calls", "4",
                               "--max-steps", "600"]),
    # ... with the learning rate decayed (cosine, to 0.1 x) over the round
    ("2-step 600 cosine", "teacher", ["--student-steps", "2", "--teacher-calls", "4",
                                      "--max-steps", "600", "--lr-schedule", "cosine"]),
    # ... with 2 teacher calls a step instead of 4: cheaper steps, rougher targets
    ("2-step 2 calls", "teacher", ["--student-steps", "2", "--teacher-calls", "2",
                                   "--max-steps", "900"]),
]
# (sampler, calls, spacing) of the teacher; dpm++ 200 uniform is the finely solved ODE.
TEACHER_ROWS = [("dpm++", n, "karras") for n in (1, 2, 4, 10, 20)] + \
    [("dpm++", 20, "uniform"), ("dpm++", 200, "uniform")]
STUDENT_STEPS = {"2-step": (1, 2, 4), "1-step from 2": (1,), "2-step long": (2,),
                 "1-step from 2 long": (1,), "2-step 600": (2,),
                 "2-step 600 cosine": (2,), "2-step 2 calls": (2,)}  # the steps each is drawn with


def sampler_flags(sampler: str, calls: int, spacing: str) -> list[str]:
    return ["--sampler", sampler, "--sample-steps", str(calls), "--spacing", spacing]


def sampling(ckpt: str, work: str, *flags: str) -> ddpm.Program:
    """A Program that samples from ckpt (1000 samples at a time: one batch of the 16-px model)."""
    args, typed = config.parse_args(["--loadckpt", ckpt, "--device", "cpu", "--batch-size",
                                     "250", "--save-dir", os.path.join(work, "draw"), *flags])
    return ddpm.Program(args, typed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", required=True, help="a folder of face pictures")
    p.add_argument("--work", default=".cache/distill-study", help="runs and results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--samples", type=int, default=1000, help="samples per FID")
    p.add_argument("--steps", type=int, help="every run's steps (a rehearsal)")
    p.add_argument("--rows", nargs="+", metavar="NAME",
                   help="score only the rows named (e.g. 'teacher dpm++ 20 karras' '2-step "
                        "student at 2'): a second seed for the rows that decide a default")
    a = p.parse_args()
    train_dir, held_dir = split(a.faces, a.work)
    out = os.path.join(a.work, "results.jsonl")
    done = {json.loads(line)["row"]: json.loads(line) for line in open(out)} \
        if os.path.exists(out) else {}
    net = evaluate.InceptionFeatures("cpu")
    ref = evaluate.reference_features([held_dir], 16, 3, net, os.path.join(a.work, "cache"))[0]
    short = ["--max-steps", str(a.steps)] if a.steps else []

    def record(row: dict) -> None:
        done[row["row"]] = row
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")

    for seed in a.seeds:
        folder = os.path.join(a.work, f"s{seed}")
        ckpts = {"teacher": os.path.join(folder, "teacher", "final.pth")}
        common = ["--data-folders", train_dir, "--seed", str(seed), "--device", "cpu",
                  "--cache-dir", os.path.join(a.work, "cache"), "--sample-every", "0"]
        if not os.path.exists(ckpts["teacher"]):  # the teacher: the defaults at the budget
            flags = (["--train", *common, "--start-over", "--ckpt-save-dir",
                      os.path.join(folder, "teacher"), "--save-dir",
                      os.path.join(folder, "teacher")] + BUDGETS[16] + short)
            prog, secs, _ = train(flags, [])
            prog.save_checkpoint("final.pth", wait=True)
            record({"row": f"s{seed} teacher training", "seed": seed, "train_s": round(secs, 1),
                    "steps": prog.state.step})
        wanted = {n for n, _, _ in STUDENTS if not a.rows or any(r.startswith(n + " student")
                                                                for r in a.rows)}
        for name, teacher, _ in reversed(STUDENTS):  # a wanted student's teacher is wanted
            if name in wanted and teacher != "teacher":
                wanted.add(teacher)
        for name, teacher, flags in STUDENTS:
            ckpts[name] = os.path.join(folder, name, "final.pth")
            if os.path.exists(ckpts[name]) or name not in wanted:
                continue
            flags = (["--distill", "--loadckpt", ckpts[teacher], *common, "--start-over",
                      "--ckpt-save-dir", os.path.join(folder, name), "--save-dir",
                      os.path.join(folder, name), "--batch-size", "64"] + flags + short)
            prog, secs, _ = train(flags, [])
            prog.save_checkpoint("final.pth", wait=True)
            record({"row": f"s{seed} {name} distillation", "seed": seed, "train_s": round(secs, 1),
                    "steps": prog.state.step, "flags": flags})
        grids = {}
        rows = [("teacher", f"teacher {s} {n} {sp}", sampler_flags(s, n, sp))
                for s, n, sp in TEACHER_ROWS]
        rows += [(name, f"{name} student at {k}", ["--sample-steps", str(k)])
                 for name, _, _ in STUDENTS for k in STUDENT_STEPS[name]]
        for ckpt, what, flags in rows:
            key = f"s{seed} {what}"
            if a.rows and what not in a.rows:
                continue
            picture = what in ("teacher dpm++ 20 uniform", "2-step long student at 2",
                               "1-step from 2 long student at 1")
            if key in done and not picture:
                continue
            prog = sampling(ckpts[ckpt], folder, *flags)
            if picture:  # the same 64 noise images for each
                grids[what] = prog.drawer.draw_many(64, "side by side", seed=0)
            if key not in done:
                t0 = time.time()
                row, _ = quality(prog, a.samples, ref, net)
                record({"row": key, "seed": seed, **row, "eval_s": round(time.time() - t0, 1)})
        if grids:
            side_by_side(grids, os.path.join(a.work, f"side-by-side-s{seed}.png"))
    table(done, os.path.join(a.work, "table.md"))


def side_by_side(grids: dict, path: str) -> None:
    """The grids (8 x 8 samples each, uint8 (64, C, H, W)) in a row, 4 px apart."""
    panels = []
    for samples in grids.values():
        r = int(len(samples) ** 0.5)  # 8 (fewer in a rehearsal)
        x = samples[:r * r].permute(0, 2, 3, 1).numpy()  # (r * r, H, W, C)
        h, w = x.shape[1:3]
        panels.append(x.reshape(r, r, h, w, -1).transpose(0, 2, 1, 3, 4).reshape(r * h, r * w, -1))
    gap = np.full((panels[0].shape[0], 4, panels[0].shape[2]), 255, np.uint8)
    row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    Image.fromarray(row.squeeze()).save(path)
    print(f"wrote {path}: {', '.join(grids)}")


def table(done: dict, path: str) -> None:
    """Mean (and spread over seeds) of each row's FID and KID -> a markdown table."""
    scored = [r for r in done.values() if "fid" in r]
    names = sorted({r["row"].split(" ", 1)[1] for r in scored},
                   key=lambda n: [r["row"] for r in scored].index(
                       next(r["row"] for r in scored if r["row"].endswith(n))))
    lines = ["| row | seeds | FID | KID x1e-3 |", "|---|---|---|---|"]
    for n in names:
        rs = [r for r in scored if r["row"].split(" ", 1)[1] == n]
        fid, kid = np.array([r["fid"] for r in rs]), np.array([r["kid"] for r in rs]) * 1e3
        spread = lambda v: f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""  # noqa: E731
        lines.append(f"| {n} | {len(rs)} | {fid.mean():.1f}{spread(fid)} | "
                     f"{kid.mean():.1f}{spread(kid)} |")
    times = [r for r in done.values() if "train_s" in r]
    lines += [""] + [f"- {r['row']}: {r['train_s']:.0f} s, {r['steps']} steps" for r in times]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
