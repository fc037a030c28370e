"""Non-leaking augmentation for small data sets (Karras et al. 2022, EDM, Sec. 5 and App. F.2;
the transforms of ADA, Karras et al. 2020). Each image is flipped, rotated, translated, scaled
and recoloured, each transform with probability p; the network is told what was done through a
label vector (zeros = nothing), so it learns the augmented images as a separate, labelled
distribution. Samples are drawn with zero labels: from the un-augmented images only.

Whole-batch tensor ops on the device; identities are exact (a transform at its neutral value
changes no bit), so p = 0 gives the batch back unchanged.
"""
import math

import torch
from torch import Tensor

# The label vector, one slot per number below (zero: transform not applied):
# xflip w; rot90 cos(k pi/2) - 1, sin(k pi/2); integer translation tx, ty (in units of the
# maximum); isotropic scale w (s = 2^(0.2 w)); anisotropic w (x by 2^(0.2 w), y by its
# inverse); brightness w (b = 0.2 w); contrast w (c = 2^(0.5 w)); saturation w (2^w); hue
# cos(theta) - 1, sin(theta).
AUGMENT_DIM = 12
TRANSLATE_MAX = 0.125  # integer translation: up to 1/8 of the image size (ADA)
SCALE_STD, ANISO_STD = 0.2, 0.2  # log2 standard deviations (ADA / EDM)
BRIGHTNESS_STD, CONTRAST_STD, SATURATION_STD = 0.2, 0.5, 1.0  # brightness in [-1, 1] units


def reflect(i: Tensor, n: int) -> Tensor:
    """Integer pixel indices -> 0..n-1 by mirroring at the edges without repeating them
    (-1 -> 1, n -> n-2), as padding mode 'reflect'."""
    return (n - 1) - ((n - 1) - i % (2 * n - 2)).abs()


def quarter_turn(k: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of k quarter turns, exactly (1, 0, -1, 0 and 0, 1, 0, -1 for k = 0..3), made
    on k's device from k itself: no table copied from the host."""
    k = k % 4
    return ((k == 0).to(dtype) - (k == 2).to(dtype), (k == 1).to(dtype) - (k == 3).to(dtype))


def warp(x: Tensor, *, flip: Tensor, rot: Tensor, tx: Tensor, ty: Tensor, sx: Tensor,
         sy: Tensor) -> Tensor:
    """The geometric transforms, composed and applied in one bilinear resampling with
    reflection at the borders. x: (B, C, H, W); per image: flip (B,) bool (mirror left-right),
    rot (B,) int64 (k quarter turns counter-clockwise), tx, ty (B,) integer pixels (right, down),
    sx, sy (B,) scale factors. The image is flipped, rotated, scaled about its centre, then
    translated; each output pixel reads the source point that lands on it (the inverse map,
    in float64: integer transforms and identities hit pixel centres exactly, so they only move
    pixels). Bilinear sampling when shrinking (s < 1) aliases a little; ADA filters, we do not."""
    B, C, H, W = x.shape
    assert H >= 2 and W >= 2, "warp needs images of at least 2 x 2 pixels"
    dev, f64 = x.device, torch.float64
    cx, cy = (W - 1) / 2, (H - 1) / 2
    v, u = torch.meshgrid(torch.arange(H, device=dev, dtype=f64) - cy,
                          torch.arange(W, device=dev, dtype=f64) - cx, indexing="ij")  # (H, W)
    col = lambda a: a.to(f64)[:, None, None]  # (B,) -> (B, 1, 1)
    u, v = u - col(tx), v - col(ty)  # undo the translation
    u, v = u / col(sx), v / col(sy)  # undo the scaling
    c, s = quarter_turn(rot, f64)  # cos, sin of k quarter turns
    u, v = col(c) * u - col(s) * v, col(s) * u + col(c) * v  # undo the rotation (y points down)
    u = torch.where(col(flip).bool(), -u, u)  # undo the flip
    src_x, src_y = u + cx, v + cy  # (B, H, W) source coordinates in pixels
    x0, y0 = src_x.floor(), src_y.floor()
    fx, fy = (src_x - x0).to(x.dtype)[:, None], (src_y - y0).to(x.dtype)[:, None]  # (B, 1, H, W)
    flat = x.flatten(2)  # (B, C, HW)

    def at(yy: Tensor, xx: Tensor) -> Tensor:  # the source pixels (B, C, H, W)
        idx = reflect(yy.long(), H) * W + reflect(xx.long(), W)  # (B, H, W)
        return flat.gather(2, idx.flatten(1)[:, None].expand(-1, C, -1)).view(B, C, H, W)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def recolour(x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor,
             hue: Tensor) -> Tensor:
    """The colour transforms, in ADA's order: x + b, then times c (about mid-grey 0), then the
    chroma (x minus its luma, the mean over channels) rotated by hue radians about the grey axis
    and scaled by saturation. x: (B, C, H, W) in [-1, 1] (C = 1: brightness and contrast only);
    each parameter (B,). Written as x + change, so neutral values (0, 1, 1, 0) change nothing."""
    col = lambda a: a.to(x.dtype)[:, None, None, None]  # (B,) -> (B, 1, 1, 1)
    x = x + col(brightness)
    x = x * col(contrast)
    if x.shape[1] != 3:
        return x
    d = x - x.mean(1, keepdim=True)  # chroma: orthogonal to the grey axis g = (1, 1, 1) / sqrt 3
    r, g, b = d.unbind(1)
    cross = torch.stack([b - g, r - b, g - r], 1) / math.sqrt(3)  # g x d
    rotated = d * col(hue.cos()) + cross * col(hue.sin())  # Rodrigues' formula, g . d = 0
    x = x + (rotated - d)  # the hue rotation
    return x + rotated * col(saturation - 1)  # chroma scaled by saturation


def draw(n: int, p: float, size: tuple[int, int], channels: int, device) -> dict[str, Tensor]:
    """Random parameters for n images: each transform applied with probability p, else neutral.
    The draws' order and number do not depend on p or the data (only on n)."""
    H, W = size
    on = lambda: torch.rand(n, device=device) < p  # (n,) bool: this transform is applied
    zero = torch.zeros(n, device=device)
    flip = torch.randint(2, (n,), device=device).bool() & on()
    rot = torch.randint(4, (n,), device=device) * on()
    shift = torch.rand(2, n, device=device) * 2 - 1  # U(-1, 1)
    shift = torch.where(on(), shift, 0)
    tx = (shift[0] * W * TRANSLATE_MAX).round()
    ty = (shift[1] * H * TRANSLATE_MAX).round()
    w_scale, w_aniso, w_bright, w_contrast, w_sat = torch.randn(5, n, device=device)
    w_scale, w_aniso = torch.where(on(), w_scale, 0), torch.where(on(), w_aniso, 0)
    w_bright, w_contrast = torch.where(on(), w_bright, 0), torch.where(on(), w_contrast, 0)
    colour = channels == 3  # saturation and hue need colour
    w_sat = torch.where(on() & colour, w_sat, 0)
    hue = torch.where(on() & colour, (torch.rand(n, device=device) * 2 - 1) * math.pi, zero)
    return {"flip": flip, "rot": rot, "tx": tx, "ty": ty, "t_max": (W * TRANSLATE_MAX, H * TRANSLATE_MAX),
            "w_scale": w_scale, "w_aniso": w_aniso, "w_bright": w_bright,
            "w_contrast": w_contrast, "w_sat": w_sat, "hue": hue}


def labels_of(d: dict[str, Tensor]) -> Tensor:
    """The parameters -> the network's label vector (n, AUGMENT_DIM), zero where not applied."""
    rot_cos, rot_sin = quarter_turn(d["rot"], torch.float32)
    rot_cos = rot_cos - 1  # zero when not turned
    hue = d["hue"]
    return torch.stack([d["flip"].float(), rot_cos, rot_sin, d["tx"] / d["t_max"][0],
                        d["ty"] / d["t_max"][1], d["w_scale"], d["w_aniso"], d["w_bright"],
                        d["w_contrast"], d["w_sat"], hue.cos() - 1, hue.sin()], 1).float()


def augment(x: Tensor, p: float, n: int, share: slice) -> tuple[Tensor, Tensor]:
    """Augment a training batch: x (B, C, H, W) in [-1, 1] -> (augmented x (B, C, H, W), labels
    (B, AUGMENT_DIM)). The draws are for the global batch of n images and this process takes
    its share, as for t and eps, so N processes augment as one process with the whole batch."""
    d = draw(n, p, tuple(x.shape[-2:]), x.shape[1], x.device)
    labels = labels_of(d)[share]
    d = {k: v[share] if isinstance(v, Tensor) else v for k, v in d.items()}
    s = torch.exp2(d["w_scale"] * SCALE_STD)
    aniso = torch.exp2(d["w_aniso"] * ANISO_STD)
    x = warp(x, flip=d["flip"], rot=d["rot"], tx=d["tx"], ty=d["ty"], sx=s * aniso, sy=s / aniso)
    x = recolour(x, d["w_bright"] * BRIGHTNESS_STD, torch.exp2(d["w_contrast"] * CONTRAST_STD),
                 torch.exp2(d["w_sat"] * SATURATION_STD), d["hue"])
    return x, labels


class Augmented:
    """Any model kind (trainer.ModelKind) trained on augmented images: the network is also given
    the augmentation labels; samples are drawn with zero labels (the UNet's default), that is
    from the un-augmented images. Every other question is the inner kind's to answer."""

    def __init__(self, inner, p: float):
        self.inner, self.p = inner, p
        self.name = inner.name

    def unet_inputs(self) -> dict:
        return {**self.inner.unet_inputs(), "augment_dim": AUGMENT_DIM}

    def train_batch(self, x0: Tensor, tokens: Tensor | None, n: int, share: slice):
        x0, labels = augment(x0, self.p, n, share)
        target, cond = self.inner.train_batch(x0, tokens, n, share)
        return target, {**cond, "augment_labels": labels}

    def unconditional(self, n: int, device):
        return self.inner.unconditional(n, device)

    def preview(self, n: int, device):
        return self.inner.preview(n, device)

    def sample_inputs(self, up: Tensor):
        return self.inner.sample_inputs(up)
