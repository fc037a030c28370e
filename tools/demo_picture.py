"""docs/demo-samples.png: the demo model's 64 samples (output/ddpm-all.png, from `make demo`) beside
64 of its training faces, both 2x enlarged. Usage: python -m tools.demo_picture [SAMPLES] [OUT]"""
import sys

from PIL import Image

from data import demo_faces, grid


def main(samples: str = "output/ddpm-all.png", out: str = "docs/demo-samples.png") -> None:
    left = Image.open(samples).convert("RGB")
    faces = grid(demo_faces(64, 32, 3, seed=0), 8, padding=1, pad_value=0)  # the first 64
    right = Image.fromarray(faces.permute(1, 2, 0).numpy())  # training faces, as ddpm.py's grids
    left, right = (im.resize((2 * im.width, 2 * im.height), Image.NEAREST) for im in (left, right))
    gap = 24
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)),
                       "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    canvas.save(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
