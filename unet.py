"""The noise-prediction UNet eps_theta(x_t, t) of DDPM (Ho et al. 2020, Appendix B).

A PixelCNN++-style UNet: sinusoidal time embedding -> MLP, residual blocks with the time embedding
added, self-attention at chosen resolutions and in the middle, strided-conv down-sampling, nearest +
conv up-sampling and skip connections across. Attention is per image (scaled_dot_product_attention).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t (Vaswani et al. 2017, Sec. 3.5). t: (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows, else the largest divisor of 32 that fits."""
    return nn.GroupNorm(math.gcd(32, ch), ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv, + (1x1) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, t_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, out_ch)
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as its shortcut: stable deep training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x: (B, in_ch, H, W), temb: (B, t_dim) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W pixels of each image, added to the block input."""

    def __init__(self, ch: int, head_dim: int = 64):
        super().__init__()
        self.heads = ch // head_dim if ch % head_dim == 0 else 1
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity map
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W); image i attends only to its own pixels."""
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)  # residual on the block input, not on the normalised input


class Block(nn.Module):
    """One UNet stage step: a ResBlock, then self-attention if asked for."""

    def __init__(self, in_ch: int, out_ch: int, t_dim: int, dropout: float, attn: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, t_dim, dropout)
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.attn(self.res(x, temb))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): (B, C, H, W), (B,) -> (B, C, H, W), C = img_channels (2C outputs with
    learn_sigma: the prediction, then the variance interpolation v).

    Level i runs at resolution H / 2^i with width num_channels * channel_multiples[i] and
    self-attention where has_attn[i]; H and W must be divisible by 2^(levels - 1).
    """

    def __init__(self, img_channels: int = 3, num_channels: int = 64,
                 channel_multiples: tuple = (1, 2, 4, 8), has_attn: tuple = (False, False, True, True),
                 num_blocks: int = 2, dropout: float = 0.0, learn_sigma: bool = False):
        super().__init__()
        assert len(channel_multiples) == len(has_attn), "one has_attn entry per channel multiple"
        self.levels = len(channel_multiples)
        self.grad_checkpoint = False  # recompute block activations in backward: less memory
        t_dim = 4 * num_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(num_channels, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.num_channels = num_channels
        self.conv_in = nn.Conv2d(img_channels, num_channels, 3, padding=1)

        # Down path: remember the width of every skip it pushes.
        self.down, skip_chs, ch = nn.ModuleList(), [num_channels], num_channels
        for i, (mult, attn) in enumerate(zip(channel_multiples, has_attn)):
            for _ in range(num_blocks):
                self.down.append(Block(ch, num_channels * mult, t_dim, dropout, attn))
                ch = num_channels * mult
                skip_chs.append(ch)
            if i < self.levels - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid = nn.ModuleList([Block(ch, ch, t_dim, dropout, True),
                                  Block(ch, ch, t_dim, dropout, False)])

        # Up path: one more block per level than going down, each eating one skip.
        self.up = nn.ModuleList()
        for i, (mult, attn) in reversed(list(enumerate(zip(channel_multiples, has_attn)))):
            for _ in range(num_blocks + 1):
                self.up.append(Block(ch + skip_chs.pop(), num_channels * mult, t_dim, dropout, attn))
                ch = num_channels * mult
            if i > 0:
                self.up.append(Upsample(ch))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, img_channels * (2 if learn_sigma else 1), 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # predict eps = 0 at the start: loss starts at E[eps^2] = 1
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (B, C, H, W) in about [-1, 1], t: (B,) int64 in 0..T-1 -> (B, C or 2C, H, W)."""
        assert x.ndim == 4 and t.shape == (x.shape[0],), "x: (B, C, H, W), t: (B,)"
        f = 2 ** (self.levels - 1)
        assert x.shape[-1] % f == 0 and x.shape[-2] % f == 0, \
            f"image size {tuple(x.shape[-2:])} must be divisible by {f} (2^(levels-1))"
        temb = self.time_mlp(timestep_embedding(t, self.num_channels))  # (B, 4 * num_channels)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = self.run(layer, h, temb)
            skips.append(h)
        for layer in self.mid:
            h = self.run(layer, h, temb)
        for layer in self.up:
            if isinstance(layer, Block):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self.run(layer, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def run(self, layer: nn.Module, h: Tensor, temb: Tensor) -> Tensor:
        """layer(h, temb), its activations recomputed in backward if grad_checkpoint is on."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, temb, use_reentrant=False)
        return layer(h, temb)
