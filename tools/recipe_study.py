"""The training-recipe study (docs/results/recipe.md): small models trained on a folder of faces
minus a fixed held-out split, each recipe for the same number of steps, then FID and KID of
samples (DPM-Solver++, 20 evenly spaced steps: SCORED_WITH) against the held-out faces. One JSON
line per run in WORK/results.jsonl; the table in WORK/table.md; each run's 64 samples in
WORK/<run>/samples.png.

    python -m tools.recipe_study --faces anime-faces-64/ --budget 16 --recipes today min-snr
    python -m tools.recipe_study --faces anime-faces-64/ --budget 16 --recipes today --seeds 0 1

A recipe is a set of ddpm.py flags (RECIPES); the budget fixes the image size, the architecture,
the batch and the steps (BUDGETS), typed explicitly so that a row means the same whatever the
program's defaults are. `--emas` also keeps extra EMA copies of the weights during a run and
scores each, to see how much the EMA length matters. Runs already in results.jsonl are skipped.
"""
import argparse
import copy
import json
import os
import random
import time

import numpy as np
import torch

import config
import ddpm
from data import IMAGE_EXTENSIONS
from features import evaluate
from run.trainer import ema_decay, update_ema

HELD_OUT = 2000  # faces kept out of training; the FID reference
# The recipe the README gave for small models before this study: every recipe flag typed.
TODAY = ["--lr", "1e-3", "--ema-decay", "0.999", "--prediction", "v", "--schedule", "linear",
         "--timesteps", "1000", "--beta-min", "1e-4", "--beta-max", "0.02", "--min-snr-gamma", "0",
         "--t-sampling", "uniform"]
RECIPES = {
    "today": TODAY,
    "min-snr-5": TODAY + ["--min-snr-gamma", "5"],
    "cosine": TODAY + ["--schedule", "cosine"],
    "cosine-shifted": TODAY + ["--schedule", "cosine-shifted"],
    "lognormal-t": TODAY + ["--t-sampling", "lognormal"],
    "lognormal-t+min-snr-5": TODAY + ["--t-sampling", "lognormal", "--min-snr-gamma", "5"],
    "lognormal-t+cosine-shifted": TODAY + ["--t-sampling", "lognormal", "--schedule",
                                           "cosine-shifted"],
    "lr-2e-3": TODAY + ["--lr", "2e-3"],
    "lr-decay": TODAY + ["--lr-schedule", "cosine"],  # to 0.1 x lr at the last step
    "defaults": [],  # no recipe flag: what the program does by itself
    # The architecture on the default recipe (typed after the budget's flags, so they win). At
    # 16 px: 20 channels and 2 blocks a level has the forward FLOPs of the budget's 24 and 1
    # (71 against 70 MFLOP an image); no attention saves 8 % of them.
    "deeper": ["--num-channels", "20", "--num-blocks", "2"],
    "no-attention": ["--has-attn", "f", "f"],
    "dropout-0.1": ["--dropout", "0.1"],
}
BUDGETS = {  # image size and architecture, batch, steps
    16: ["--img-size", "16", "--num-channels", "24", "--channel-multiples", "1", "2",
         "--has-attn", "f", "t", "--num-blocks", "1", "--batch-size", "64", "--max-steps", "1500"],
    32: ["--img-size", "32", "--num-channels", "24", "--channel-multiples", "1", "2", "2",
         "--has-attn", "f", "t", "f", "--num-blocks", "1", "--batch-size", "64",
         "--max-steps", "600"],
}


def split(faces: str, work: str) -> tuple[str, str]:
    """WORK/train and WORK/held-out: links to the faces, HELD_OUT of them (a fixed random choice,
    seed 0, of the sorted names) held out."""
    names = sorted(n for n in os.listdir(faces) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    held = set(random.Random(0).sample(names, HELD_OUT))
    dirs = os.path.join(work, "train"), os.path.join(work, "held-out")
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    for n in names:
        link = os.path.join(dirs[n in held], n)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(faces, n)), link)
    return dirs


# The sampler every row is scored with, typed: the default differs between recipes (10 Karras-
# spaced steps for log-normal t, 20 even ones for uniform t), and a row compares recipes only.
SCORED_WITH = ["--sampler", "dpm++", "--sample-steps", "20", "--spacing", "uniform"]


def train(flags: list[str], emas: list[float],
          setup=None) -> tuple[ddpm.Program, float, dict]:
    """A run of --max-steps steps through Program.train_step -> the program, the seconds the
    steps took, and the extra EMA copies {decay: module}. setup(program), if given, runs before
    the first step (a study's change to the run, e.g. its loss)."""
    args, typed = config.parse_args(flags)
    prog = ddpm.Program(args, typed)
    if setup:
        setup(prog)
    extra = {d: copy.deepcopy(prog.trainer.ema) for d in emas}
    prog.plan()  # --lr-schedule's length: --max-steps, as in train_loop
    t0, step = time.time(), 0
    while step < args.max_steps:
        for x0, tokens in prog.batches():
            prog.train_step(x0, tokens)
            for d, ema in extra.items():
                update_ema(ema, prog.trainer.model, ema_decay(prog.state.step, d))
            step += 1
            if step % 50 == 0:
                prog.check_steps()
                print(f"  step {step}", flush=True)
            if step == args.max_steps:
                break
    return prog, time.time() - t0, extra


def quality(prog: ddpm.Program, n: int, ref: np.ndarray, net) -> tuple[dict, torch.Tensor]:
    """FID and KID of n samples (seed 0, the program's sampler and sampling weights)."""
    samples = prog.drawer.draw_many(n, "samples", seed=0)
    return evaluate.score(evaluate.extract(samples, net, 250), ref), samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", required=True, help="a folder of face pictures")
    p.add_argument("--work", default=".cache/study", help="links, runs and results")
    p.add_argument("--budget", type=int, default=16, choices=sorted(BUDGETS))
    p.add_argument("--recipes", nargs="+", default=["today"], choices=sorted(RECIPES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--samples", type=int, default=1000, help="samples per FID")
    p.add_argument("--steps", type=int, help="override the budget's steps (a rehearsal)")
    p.add_argument("--emas", type=float, nargs="*", default=[], help="extra EMA decays to score")
    a = p.parse_args()
    train_dir, held_dir = split(a.faces, a.work)
    out = os.path.join(a.work, "results.jsonl")
    done = set()
    if os.path.exists(out):
        done = {json.loads(line)["run"] for line in open(out)}
    net = evaluate.InceptionFeatures("cpu")
    ref = None
    for name in a.recipes:
        for seed in a.seeds:
            budget = BUDGETS[a.budget] + (["--max-steps", str(a.steps)] if a.steps else [])
            run = f"{a.budget}px-{name}-s{seed}" + (f"-{a.steps}steps" if a.steps else "")
            if run in done:
                continue
            folder = os.path.join(a.work, run)
            flags = (["--train", "--data-folders", train_dir, "--seed", str(seed), "--device",
                      "cpu", "--ckpt-save-dir", os.path.join(folder, "ckpt"), "--save-dir",
                      folder, "--start-over"] + budget + SCORED_WITH + RECIPES[name])
            print(f"{run}: python ddpm.py {' '.join(flags)}", flush=True)
            prog, secs, extra = train(flags, a.emas)
            prog.save_checkpoint("final.pth", wait=True)
            if ref is None:
                ref = evaluate.reference_features([held_dir], prog.cfg.model.img_size, 3, net,
                                                  prog.cfg.data.cache_dir)[0]
            t0 = time.time()
            row, samples = quality(prog, a.samples, ref, net)
            prog.drawer.save_grid(samples[:64], "samples.png", nrow=8)  # in the run's folder
            row.update(run=run, recipe=name, seed=seed, budget=a.budget, flags=RECIPES[name],
                       steps=prog.state.step, images=prog.state.images_seen,
                       train_s=round(secs, 1), eval_s=round(time.time() - t0, 1),
                       ema=prog.cfg.train.ema_decay)
            for d, ema in extra.items():  # the same run, another EMA length
                prog.trainer.ema.load_state_dict(ema.state_dict())
                row[f"fid_ema_{d}"] = quality(prog, a.samples, ref, net)[0]["fid"]
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    table(out, os.path.join(a.work, "table.md"))


def table(results: str, path: str) -> None:
    """Mean and spread over seeds of each (budget, recipe, steps) -> a markdown table."""
    rows = [json.loads(line) for line in open(results)]
    lines = ["| px | recipe | seeds | FID | KID x1e-3 | train s | images |", "|---|---|---|---|---|---|---|"]
    for key in sorted({(r["budget"], r["recipe"], r["steps"]) for r in rows}):
        rs = [r for r in rows if (r["budget"], r["recipe"], r["steps"]) == key]
        fid, kid = np.array([r["fid"] for r in rs]), np.array([r["kid"] for r in rs]) * 1e3
        spread = lambda v: f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""  # noqa: E731
        lines.append(f"| {key[0]} | {key[1]} | {len(rs)} | {fid.mean():.1f}{spread(fid)} | "
                     f"{kid.mean():.1f}{spread(kid)} | {np.mean([r['train_s'] for r in rs]):.0f} | "
                     f"{rs[0]['images']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
