"""Text prompts for a text model (a drawing.Drawer): grids per prompt and guidance scale
(--prompt), and a measure of how well samples follow their prompts (--eval-prompts).
Classifier-free guidance itself is GaussianDiffusion.guided (Ho & Salimans 2022).
"""
import math

import numpy as np
import torch

from features import evaluate
from features import tags
from data import load_folders, to_model
from features.superres import super_resolve
from features.text import read_captions, words


def sample_prompts(drawer, sr=None) -> None:
    """--batch-size samples per prompt and guidance scale: a grid each, and prompts.png with
    8 of each (a row per prompt and scale); with the cascade's SR stage sr (a Drawer) also
    prompts-sr.png."""
    n, rows = drawer.batch_size, []
    ids = [drawer.vocab.encode(p) for p in drawer.sample.prompt]  # unknown words: one line, first
    for prompt, tokens in zip(drawer.sample.prompt, ids):
        for w in drawer.sample.guidance_scale:
            cond = {"tokens": torch.tensor([tokens] * n, device=drawer.device)}
            x0, _ = drawer.draw(n, f"{prompt!r}, w = {w:g}", cond, w)
            slug = "-".join(words(prompt))[:60] or "empty"
            drawer.save_grid(x0, f"prompt-{slug}-w{w:g}.png", nrow=math.ceil(math.sqrt(n)))
            rows.append(x0[:8])
    drawer.save_grid(torch.cat(rows), "prompts.png", nrow=min(n, 8))
    if sr:  # the cascade: prompts.png, super-resolved
        sr.save_grid(super_resolve(sr, torch.cat(rows)), "prompts-sr.png", nrow=min(n, 8))
    drawer.console.print(f"wrote {len(rows)} grids ({len(drawer.sample.prompt)} prompts x "
                         f"{len(drawer.sample.guidance_scale)} guidance scales) to "
                         f"{drawer.save_dir}/prompt-*.png and prompts.png (a row per prompt and "
                         f"scale, in that order)"
                         + (", and prompts-sr.png" if sr else ""))


def evaluate_prompts(drawer, folder: str, *, samples: int, cache_dir: str) -> list[dict]:
    """Does the model draw what it is asked? Fit a hair / eye colour classifier on the
    captioned images in `folder` (held out from training), then per --guidance-scale draw
    --eval-samples images prompted "<h> hair, <e> eyes" over every colour pair and report how
    often the classifier sees the prompted colours, and FID against `folder`."""
    size, c = drawer.model.img_size, drawer.model.img_channels
    images, paths = load_folders([folder], size, c, warn=drawer.console.print,
                                 cache_dir=cache_dir, with_paths=True)
    clf, info = tags.fit_tag_classifier(images, read_captions(paths, [folder], "files"),
                                            device=drawer.device, progress="colour classifier")
    hair, eyes = ([k for k in clf.classes[attr] if k in drawer.vocab.stoi]
                  for attr in ("hair", "eyes"))
    drawer.console.print(f"colour classifier on {info['n_train']} held-out images: validation "
                         f"accuracy hair {info['val_acc']['hair']:.1%}, eyes "
                         f"{info['val_acc']['eyes']:.1%} on {info['n_val']} (chance for uniform "
                         f"prompts: {1 / len(hair):.1%} / {1 / len(eyes):.1%})")
    n = samples
    want = [(hair[i % len(hair)], eyes[(i // len(hair)) % len(eyes)]) for i in range(n)]
    tokens = drawer.vocab.encode_all([f"{h} hair, {e} eyes" for h, e in want])  # (n, L)
    net = evaluate.InceptionFeatures(drawer.device)
    ref, _ = evaluate.reference_features([folder], size, c, net, cache_dir, drawer.console)
    rows = []
    for w in drawer.sample.guidance_scale:
        inputs = lambda i, j: ({"tokens": tokens[i:j].to(drawer.device)}, None)  # noqa: E731
        samples = drawer.draw_many(n, f"w = {w:g}:", inputs, w)
        seen = tags.classify(clf, samples)
        row = {"guidance": w, "n": n,
               "hair_acc": float(np.mean([s == h for s, (h, _) in zip(seen["hair"], want)])),
               "eyes_acc": float(np.mean([s == e for s, (_, e) in zip(seen["eyes"], want)])),
               **evaluate.score(evaluate.extract(samples, net, drawer.batch_size), ref)}
        rows.append(row)
        drawer.save_grid(to_model(samples[:8 * len(hair)]), f"prompt-eval-w{w:g}.png",
                         nrow=len(hair))
        drawer.console.print(f"w = {w:g}: prompted hair colour drawn {row['hair_acc']:.1%}, eye "
                             f"colour {row['eyes_acc']:.1%} of {n} samples; FID {row['fid']:.2f} "
                             f"vs {len(ref)} held-out images")
    return rows
