#!/usr/bin/env bash
# Behaviour unchanged against an earlier commit, bit for bit on the CPU:
#   bash tools/behaviour_check.sh REV        (PY=python to use another Python than .venv's)
# Both trees (REV, in a temporary worktree, and this working tree) sample every checkpoint of
# tests/fixtures with seed 0 (DDIM, 5 steps; the SR one from 4 generated 8-px images) and train
# a seeded 2-epoch demo run (16 px, T = 50; its end-of-run pictures with the sampler typed, as
# the default may differ between the trees). Every picture must be the same bytes, and the run's
# losses, weights, EMA and optimizer state equal. Exit code 1 names what differs.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bash tools/behaviour_check.sh REV}
PY=${PY:-$PWD/.venv/bin/python}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/tree" >/dev/null 2>&1; rm -rf "$work"' EXIT
git worktree add --quiet --detach "$work/tree" "$rev"
mkdir -p "$work/lowres"
"$PY" -c "
import numpy as np; from PIL import Image
rng = np.random.default_rng(0)
for i in range(4):
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save('$work/lowres/%d.png' % i)"
for tree in base head; do
  dir=$([ $tree = base ] && echo "$work/tree" || echo "$PWD")
  for fx in "$PWD"/tests/fixtures/*.pth; do
    name=$(basename "$fx" .pth)
    extra=(); [[ $name == sr-* ]] && extra=(--lowres-folder "$work/lowres")
    (cd "$dir" && OMP_NUM_THREADS=1 "$PY" ddpm.py --loadckpt "$fx" --seed 0 --batch-size 4 \
      --sampler ddim --sample-steps 5 --device cpu "${extra[@]}" \
      --save-dir "$work/out/$tree/$name" > "$work/$tree-$name.log" 2>&1)
  done
  (cd "$dir" && OMP_NUM_THREADS=1 "$PY" ddpm.py --train --demo --demo-images 256 --img-size 16 \
    --num-channels 16 --channel-multiples 1 2 --has-attn f t --num-blocks 1 --timesteps 50 \
    --epochs 2 --seed 3 --device cpu --sample-every 0 \
    --sampler dpm++ --sample-steps 20 --spacing uniform \
    --ckpt-save-dir "$work/out/$tree/run/ckpt" \
    --save-dir "$work/out/$tree/run/out" > "$work/$tree-run.log" 2>&1)
done
"$PY" - "$work/out" <<'PY'
import glob, json, os, sys
import torch
work, differ = sys.argv[1], []
pictures = sorted(os.path.relpath(p, f"{work}/base")
                  for p in glob.glob(f"{work}/base/**/*.png", recursive=True))
for rel in pictures:
    with open(f"{work}/base/{rel}", "rb") as a, open(f"{work}/head/{rel}", "rb") as b:
        if a.read() != b.read():
            differ.append(rel)
losses = [[json.loads(l).get("loss") for l in open(f"{work}/{t}/run/out/metrics.jsonl")]
          for t in ("base", "head")]
a, b = (torch.load(f"{work}/{t}/run/ckpt/ckpt-1.pth", weights_only=True) for t in ("base", "head"))
same = {part: all(torch.equal(a[part][k], b[part][k]) for k in a[part])
        for part in ("model", "ema")}
same["optimizer"] = all(torch.equal(x, y) for s, r in zip(a["optimizer"]["state"].values(),
                                                          b["optimizer"]["state"].values())
                        for x, y in zip(s.values(), r.values()))
print(f"{len(pictures)} pictures, {len(pictures) - len(differ)} the same bytes"
      + (f"; differ: {', '.join(differ)}" if differ else ""))
print(f"losses by epoch: {losses[0]} then, {losses[1]} now")
print("weights, EMA, optimizer: "
      + ", ".join(f"{k} {'equal' if v else 'DIFFER'}" for k, v in same.items()))
sys.exit(1 if differ or losses[0] != losses[1] or not all(same.values()) else 0)
PY
