"""docs/demo-samples.png: the demo model's 64 samples (output/ddpm-all.png, from `make demo`) beside
64 of its training faces, both 2x enlarged. Usage: python scripts/demo_picture.py [SAMPLES] [OUT]"""
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import demo_faces  # noqa: E402  (the repository root on the path first)


def grid(images: np.ndarray, nrow: int = 8, pad: int = 1) -> Image.Image:
    """uint8 (N, C, H, W) -> one picture, nrow a row, `pad` black pixels between and around (as
    ddpm.py's grids are)."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    out = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), np.uint8)
    for i, im in enumerate(images):
        y, x = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        out[y:y + h, x:x + w] = im.transpose(1, 2, 0) if c == 3 else im[0][..., None]
    return Image.fromarray(out)


def main(samples: str = "output/ddpm-all.png", out: str = "docs/demo-samples.png") -> None:
    left = Image.open(samples).convert("RGB")
    right = grid(demo_faces(64, 32, 3, seed=0).numpy())  # the first 64 training faces
    left, right = (im.resize((2 * im.width, 2 * im.height), Image.NEAREST) for im in (left, right))
    gap = 24
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)),
                       "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    canvas.save(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
