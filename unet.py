"""The UNet of DDPM (Ho et al. 2020, Appendix B): from x_t and t it predicts eps, v or x0
(diffusion.py reads its output as the --prediction says).

A PixelCNN++-style UNet: sinusoidal time embedding -> MLP, residual blocks with the time embedding
added, self-attention at chosen resolutions and in the middle, strided-conv down-sampling, nearest +
conv up-sampling and skip connections across. Attention is per image (scaled_dot_product_attention).
Optional conditioning: a caption (cross-attention to its tokens where there is self-attention, and
its pooled feature added to the time embedding), or a low-resolution image for super-resolution
(concatenated to x_t as extra channels, its noise-augmentation level embedded like t; SR3).
With augment_dim > 0 the network is also told how its input was augmented (augment.py): a label
vector mapped linearly (no bias: zero labels add exactly zero) onto the sinusoidal t embedding (EDM).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from core.tokens import TextEncoder


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
        # The 1x1 convs qkv and proj applied as linear maps over (B, HW, C) pixel rows: the same
        # map, but q, k, v come out with unit stride in the head dim, which the fused (flash)
        # attention kernels need (else PyTorch falls back to the slower unfused math path).
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = F.linear(h, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, HW, 3C)
        q, k, v = qkv.unflatten(-1, (3, self.heads, C // self.heads)).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        h = F.linear(h.transpose(1, 2).reshape(B, H * W, C), self.proj.weight.flatten(1),
                     self.proj.bias)  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # residual on the block input


class CrossAttnBlock(nn.Module):
    """Every pixel attends to the caption's tokens (the "spatial transformer" of Rombach et al. 2022,
    cross-attention part), added to the block input."""

    def __init__(self, ch: int, ctx_dim: int, head_dim: int = 64):
        super().__init__()
        self.heads = ch // head_dim if ch % head_dim == 0 else 1
        self.norm = group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.kv = nn.Linear(ctx_dim, 2 * ch)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity map
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, ctx: tuple[Tensor, Tensor]) -> Tensor:
        """x: (B, C, H, W), ctx: tokens (B, L, ctx_dim) and keep (B, L) bool -> (B, C, H, W)."""
        tokens, keep = ctx
        B, C, H, W = x.shape
        # q as a linear map over pixel rows, as in AttnBlock: unit stride in the head dim, which
        # the fused attention kernels need.
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = F.linear(h, self.q.weight.flatten(1), self.q.bias)  # (B, HW, C)
        q = q.unflatten(-1, (self.heads, C // self.heads)).transpose(1, 2)  # (B, heads, HW, c)
        k, v = self.kv(tokens).reshape(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, h, HW, c)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Block(nn.Module):
    """One UNet stage step: a ResBlock, then self-attention (and cross-attention to the caption in
    a text-conditioned model) if asked for."""

    def __init__(self, in_ch: int, out_ch: int, t_dim: int, dropout: float, attn: bool,
                 ctx_dim: int = 0):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, t_dim, dropout)
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()
        self.cross = CrossAttnBlock(out_ch, ctx_dim) if attn and ctx_dim else None

    def forward(self, x: Tensor, temb: Tensor, ctx: tuple | None = None) -> Tensor:
        h = self.attn(self.res(x, temb))
        return h if self.cross is None else self.cross(h, ctx)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None, ctx=None) -> Tensor:
        return self.conv(x)


def nearest_conv_taps(w: Tensor) -> Tensor:
    """A 3x3 kernel (O, I, 3, 3) applied after nearest x2 up-sampling -> the 4x4 kernel (I, O, 4, 4)
    of the stride-2 transposed conv that computes the same map. Each output pixel of the
    up-sampled conv sees only 2x2 distinct input pixels, so taps landing on the same one add up:
    along each axis [k0, k1, k2] -> [k2, k1 + k2, k0 + k1, k0] (the same sums, 4/9 of the work)."""
    w = torch.stack([w[..., 2, :], w[..., 1, :] + w[..., 2, :], w[..., 0, :] + w[..., 1, :],
                     w[..., 0, :]], dim=-2)
    w = torch.stack([w[..., 2], w[..., 1] + w[..., 2], w[..., 0] + w[..., 1], w[..., 0]], dim=-1)
    return w.transpose(0, 1)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv (computed as the equivalent stride-2 4x4
    transposed conv, see nearest_conv_taps; the parameters stay those of the 3x3 conv)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None, ctx=None) -> Tensor:
        return F.conv_transpose2d(x, nearest_conv_taps(self.conv.weight), self.conv.bias,
                                  stride=2, padding=1)


class UNet(nn.Module):
    """net(x_t, t): (B, C, H, W), (B,) -> (B, C, H, W), C = img_channels: the prediction of eps,
    v or x0 (2C outputs with learn_sigma: the prediction, then var_out, the interpolation
    between log beta_t and log beta~_t).

    Level i runs at resolution H / 2^i with width num_channels * channel_multiples[i] and
    self-attention where has_attn[i]; H and W must be divisible by 2^(levels - 1).
    vocab_size > 0 adds a caption encoder (tokens of text_len ids) and cross-attention;
    lowres_channels > 0 makes a super-resolution model that also takes the upsampled low-res image.
    augment_dim > 0 adds the augmentation-label embedding (non-leaking augmentation, EDM).
    Either way a model without them has none of these parameters.
    """

    def __init__(self, img_channels: int = 3, num_channels: int = 64,
                 channel_multiples: tuple = (1, 2, 4, 8), has_attn: tuple = (False, False, True, True),
                 num_blocks: int = 2, dropout: float = 0.0, *, learn_sigma: bool = False,
                 vocab_size: int = 0, text_len: int = 0, lowres_channels: int = 0,
                 augment_dim: int = 0):
        super().__init__()
        assert len(channel_multiples) == len(has_attn), "one has_attn entry per channel multiple"
        self.levels = len(channel_multiples)
        self.grad_checkpoint = False  # recompute block activations in backward: less memory
        t_dim = 4 * num_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(num_channels, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.num_channels = num_channels
        if augment_dim:  # what augmentation the input went through; none (zeros) adds exactly 0
            self.augment_embed = nn.Linear(augment_dim, num_channels, bias=False)
        ctx_dim = t_dim if vocab_size else 0
        if vocab_size:  # caption -> tokens for cross-attention, pooled -> + time embedding
            self.text = TextEncoder(vocab_size, text_len, ctx_dim)
            self.text_proj = nn.Linear(ctx_dim, t_dim)
        self.lowres_channels = lowres_channels
        if lowres_channels:  # the low-res input's noise level, embedded like t (name: its keys)
            self.aug_mlp = nn.Sequential(
                nn.Linear(num_channels, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(img_channels + lowres_channels, num_channels, 3, padding=1)

        # Down path: remember the width of every skip it pushes.
        self.down, skip_chs, ch = nn.ModuleList(), [num_channels], num_channels
        for i, (mult, attn) in enumerate(zip(channel_multiples, has_attn)):
            for _ in range(num_blocks):
                self.down.append(Block(ch, num_channels * mult, t_dim, dropout, attn, ctx_dim))
                ch = num_channels * mult
                skip_chs.append(ch)
            if i < self.levels - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid = nn.ModuleList([Block(ch, ch, t_dim, dropout, True, ctx_dim),
                                  Block(ch, ch, t_dim, dropout, False)])

        # Up path: one more block per level than going down, each eating one skip.
        self.up = nn.ModuleList()
        for i, (mult, attn) in reversed(list(enumerate(zip(channel_multiples, has_attn)))):
            for _ in range(num_blocks + 1):
                self.up.append(Block(ch + skip_chs.pop(), num_channels * mult, t_dim, dropout, attn,
                                     ctx_dim))
                ch = num_channels * mult
            if i > 0:
                self.up.append(Upsample(ch))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, img_channels * (2 if learn_sigma else 1), 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # predict eps = 0 at the start: loss starts at E[eps^2] = 1
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor | None = None,
                lowres: Tensor | None = None, noise_level: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) in about [-1, 1], t: (B,) int64 in 0..T-1 -> (B, C or 2C, H, W).
        Text model: tokens (B, text_len) int64. SR model: lowres (B, C, H, W) (the low-res image
        upsampled to H x W, noise-augmented) and noise_level (B,) float, that noise's std.
        Augmenting model: augment_labels (B, augment_dim); None (sampling) means zeros."""
        assert x.ndim == 4 and t.shape == (x.shape[0],), "x: (B, C, H, W), t: (B,)"
        f = 2 ** (self.levels - 1)
        assert x.shape[-1] % f == 0 and x.shape[-2] % f == 0, \
            f"image size {tuple(x.shape[-2:])} must be divisible by {f} (2^(levels-1))"
        temb = timestep_embedding(t, self.num_channels)  # (B, num_channels)
        if hasattr(self, "augment_embed"):  # EDM: added to the noise embedding, before the MLP
            if augment_labels is None:  # sampling: the un-augmented distribution
                augment_labels = x.new_zeros(len(x), self.augment_embed.in_features)
            temb = temb + self.augment_embed(augment_labels.to(temb.dtype))
        temb = self.time_mlp(temb)  # (B, 4 * num_channels)
        ctx = None
        if hasattr(self, "text"):
            assert tokens is not None, "a text-conditioned UNet needs tokens (B, text_len)"
            feats, keep, pooled = self.text(tokens)  # (B, L, D), (B, L), (B, D)
            ctx, temb = (feats, keep), temb + self.text_proj(pooled)
        if self.lowres_channels:
            assert lowres is not None and noise_level is not None, \
                "a super-resolution UNet needs lowres and noise_level"
            x = torch.cat([x, lowres.to(x.dtype)], dim=1)  # (B, 2C, H, W)
            temb = temb + self.aug_mlp(timestep_embedding(noise_level * 1000, self.num_channels))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = self.run(layer, h, temb, ctx)
            skips.append(h)
        for layer in self.mid:
            h = self.run(layer, h, temb, ctx)
        for layer in self.up:
            if isinstance(layer, Block):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self.run(layer, h, temb, ctx)
        return self.conv_out(F.silu(self.norm_out(h)))

    def run(self, layer: nn.Module, h: Tensor, temb: Tensor, ctx: tuple | None) -> Tensor:
        """layer(h, temb, ctx), its activations recomputed in backward if grad_checkpoint is on."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, temb, ctx, use_reentrant=False)
        return layer(h, temb, ctx)
