"""The model kinds and the one factory that builds a model: what differs between kinds of model
(plain, text, super-resolution, augmented) is one object per kind, answering the questions of
one interface (ModelKind); make_model builds the UNet and its kind from a ModelSpec, for
training, sampling, checkpoints, the benchmark and the tools alike (as k-diffusion's
make_model(config)). A new kind is a class in the
module that owns it and a line in make_kind.
"""
from typing import Protocol, runtime_checkable

from torch import Tensor

from core.spec import ModelSpec
from features.augment import Augmented
from features.superres import SuperRes
from features.text import Captioned, Vocab
from ui import UserError
from unet import UNet


@runtime_checkable
class ModelKind(Protocol):
    """What differs between kinds of model (plain, text, super-resolution, augmented), as one
    object per kind; a kind that wraps another (augment.Augmented) passes every member on.
    A question a kind cannot answer raises UserError (validation refuses such runs first)."""

    name: str  # in words, for the start-up summary

    def unet_inputs(self) -> dict:
        """The UNet's extra constructor arguments: what the network is given."""

    def train_batch(self, x0: Tensor, tokens: Tensor | None, n: int,
                    share: slice) -> tuple[Tensor, dict]:
        """A training batch x0 (B, C, H, W) -> (what to diffuse (B, C, H, W), the network's
        conditioning dict). Random draws are for the global batch of n, this process's share
        taken, so N processes train as one with the whole batch."""

    def unconditional(self, n: int, device) -> dict | None:
        """The conditioning of n unprompted samples (None: nothing)."""

    def preview(self, n: int, device) -> tuple[dict | None, Tensor | None]:
        """(conditioning, base) of the n pictures drawn while training: a sample becomes an
        image as base + x0 (base None: x0 itself)."""

    def sample_inputs(self, up: Tensor) -> tuple[dict, Tensor | None]:
        """(conditioning, base) of samples drawn from the upsampled low-res images up
        (B, C, H, W): what a super-resolution model samples from."""


class Plain:
    """An unconditional model (the ModelKind interface)."""

    name = "unconditional"

    def unet_inputs(self) -> dict:
        return {}

    def train_batch(self, x0: Tensor, tokens: Tensor | None, n: int, share: slice):
        return x0, {}

    def unconditional(self, n: int, device) -> dict | None:
        return None

    def preview(self, n: int, device) -> tuple[dict | None, Tensor | None]:
        return self.unconditional(n, device), None

    def sample_inputs(self, up: Tensor):
        raise UserError(f"an {self.name} model draws from noise, not from low-res images")


def make_kind(model: ModelSpec, vocab: Vocab | None, *, cond_drop: float = 0.0,
              sr_noise_max: float = 0.0, sr_noise: float = 0.0,
              preview_images: Tensor | None = None) -> ModelKind:
    """What kind of model the spec describes (the one place that decides): text-conditioned
    (a vocabulary; captions dropped with probability cond_drop in training), super-resolution
    (its low-res input noised up to sr_noise_max in training, by sr_noise when sampling) or
    plain, trained on augmented images with model.augment. preview_images: training images a
    super-resolution model's pictures start from (None when only sampling)."""
    kind = (Captioned(vocab, cond_drop) if vocab else
            SuperRes(model.super_res, model.img_channels, model.sr_target, sr_noise_max,
                     sr_noise, preview_images) if model.super_res else Plain())
    return Augmented(kind, model.augment) if model.augment else kind


def make_unet(model: ModelSpec, kind: ModelKind) -> UNet:
    """The UNet the spec describes, with the kind's extra inputs, on the current default
    device (torch.device("meta") as a context: shapes only, no memory, no time)."""
    return UNet(img_channels=model.img_channels, num_channels=model.num_channels,
                channel_multiples=model.channel_multiples, has_attn=model.has_attn,
                num_blocks=model.num_blocks, dropout=model.dropout, learn_sigma=model.learn_sigma,
                **kind.unet_inputs())


def make_model(model: ModelSpec, vocab: Vocab | None, **kind_settings) -> tuple[UNet, ModelKind]:
    """The UNet (on the current default device) and the model kind a spec describes (and a text
    model's vocabulary); kind_settings: make_kind's (the kind's training and sampling noise, the
    preview images)."""
    kind = make_kind(model, vocab, **kind_settings)
    return make_unet(model, kind), kind
