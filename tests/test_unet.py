"""The UNet: shapes for several configurations and attention that stays within one image."""
import math

import pytest
import torch
import torch.nn as nn

import unet
from unet import AttnBlock, UNet, timestep_embedding


def randomise_zero_init(model):
    """Zero-initialised layers make outputs trivially independent; give them real weights."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("channels,size,cfg", [
    (1, 32, dict(num_channels=16, channel_multiples=(1, 2), has_attn=(False, True), num_blocks=1)),
    (3, 32, dict(num_channels=16, channel_multiples=(1, 2, 2), has_attn=(False, True, False))),
    (3, 64, dict(num_channels=16, channel_multiples=(1, 2, 4, 8), has_attn=(False, False, True, True))),
    (1, 64, dict(num_channels=24, channel_multiples=(1, 3), has_attn=(True, False), num_blocks=1)),
])
def test_unet_returns_the_input_shape(channels, size, cfg):
    m = UNet(channels, **cfg)
    x = torch.randn(2, channels, size, size)
    out = m(x, torch.tensor([0, 999]))
    assert out.shape == x.shape


def test_image_size_not_divisible_by_the_downsampling_factor_is_refused():
    m = UNet(3, 8, (1, 2, 2), (False, False, False), 1)
    with pytest.raises(AssertionError, match="divisible by 4"):
        m(torch.randn(1, 3, 18, 18), torch.zeros(1, dtype=torch.long))


def batch_mixing(model, i=0, j=1):
    """How much image i's output moves when only image j of the batch changes."""
    torch.manual_seed(1)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 5, 5])
    with torch.no_grad():
        out = model(x, t)
        x2 = x.clone()
        x2[j] = torch.randn(3, 16, 16)
        out2 = model(x2, t)
    return (out2[i] - out[i]).abs().max().item(), (out2[j] - out[j]).abs().max().item()


def test_attention_does_not_mix_images_in_a_batch():
    m = randomise_zero_init(UNet(3, 16, (1, 2), (True, True), 1)).eval()
    other, own = batch_mixing(m)
    assert own > 1e-3  # the changed image's output did change
    assert other < 1e-5  # every other image's did not


class BatchMixingAttn(nn.Module):
    """The reference program's bug: (B, HW, C) into MultiheadAttention without batch_first."""

    def __init__(self, ch):
        super().__init__()
        self.norm, self.mha = nn.GroupNorm(1, ch), nn.MultiheadAttention(ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C) read as (L, N, E)
        return x + self.mha(h, h, h)[0].transpose(1, 2).reshape(B, C, H, W)


def test_the_batch_mixing_check_catches_the_reference_bug(monkeypatch):
    monkeypatch.setattr(unet, "AttnBlock", BatchMixingAttn)
    m = randomise_zero_init(UNet(3, 16, (1, 2), (True, True), 1)).eval()
    other, _ = batch_mixing(m)
    assert other > 1e-3


def test_attention_block_starts_as_the_identity():
    x = torch.randn(2, 64, 8, 8) * 3 + 1
    assert torch.equal(AttnBlock(64)(x), x)


def test_attention_residual_is_added_to_the_block_input_not_the_normalised_one():
    # GroupNorm ignores a constant shift of its input, so x + c must come out shifted by exactly c;
    # adding the residual to norm(x) instead would swallow the shift.
    block = randomise_zero_init(AttnBlock(32))
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        shift = block(x + 5.0) - block(x)
    assert torch.allclose(shift, torch.full_like(shift, 5.0), atol=1e-4)


def test_timestep_embedding_is_cos_sin_of_geometric_frequencies():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 16)
    assert emb.shape == (3, 16)
    assert torch.equal(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    assert emb[1, 0].item() == pytest.approx(torch.cos(torch.tensor(1.0)).item())  # frequency 1
    assert not torch.allclose(emb[1], emb[2])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    m = randomise_zero_init(UNet(3, 16, (1, 2), (False, True), 1))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    grads = []
    for flag in (False, True):
        m.grad_checkpoint = flag
        m.zero_grad()
        loss = m(x, t).pow(2).mean()
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_gradient_checkpointing_recomputes_blocks_in_backward(monkeypatch):
    m = UNet(3, 8, (1, 2), (False, False), 1)
    calls = []
    forward = unet.ResBlock.forward
    monkeypatch.setattr(unet.ResBlock, "forward",
                        lambda self, *a: calls.append(1) or forward(self, *a))
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([1])
    counts = []
    for flag in (False, True):
        m.grad_checkpoint, calls[:] = flag, []
        m(x, t).sum().backward()
        counts.append(len(calls))
    assert counts[1] == 2 * counts[0]  # every block ran again during backward


def test_upsample_is_nearest_x2_then_its_3x3_conv():
    # Upsample runs as a stride-2 4x4 transposed conv built from its 3x3 kernel: the same map.
    from unet import Upsample
    torch.manual_seed(0)
    up = Upsample(5).double()
    torch.nn.init.normal_(up.conv.weight)
    torch.nn.init.normal_(up.conv.bias)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    reference = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert torch.allclose(up(x), reference, atol=1e-12)


def test_attention_as_linear_maps_equals_the_1x1_conv_formula():
    torch.manual_seed(0)
    block = AttnBlock(128).double()  # 2 heads of 64
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 128, 4, 5, dtype=torch.float64)
    B, C, H, W = x.shape
    qkv = block.qkv(block.norm(x)).reshape(B, 3, 2, C // 2, H * W)  # the 1x1 conv form
    q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, HW, C / heads)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // 2), -1) @ v
    reference = x + block.proj(att.transpose(-1, -2).reshape(B, C, H, W))
    assert torch.allclose(block(x), reference, atol=1e-10)
