"""Caption tokens as the network sees them: the special token ids, the empty caption of
classifier-free guidance, caption dropping, and the small text encoder trained with the UNet.

The encoder has no pretrained download: word embeddings + learned positions -> a pre-norm
transformer encoder -> per-token features for the UNet's cross-attention and a pooled feature for
its time embedding (as GLIDE, Nichol et al. 2022, and Imagen, Saharia et al. 2022). Reading
captions and the word vocabulary are features/text.py's.
"""
import torch
import torch.nn as nn
from torch import Tensor

PAD, EMPTY = 0, 1  # token ids: padding, and the empty caption (unconditional / dropped caption)
SPECIALS = ["<pad>", "<empty>"]


def empty_like(tokens: Tensor) -> Tensor:
    """Empty captions shaped like tokens (B, L)."""
    out = torch.full_like(tokens, PAD)
    out[:, 0] = EMPTY
    return out


def drop_captions(tokens: Tensor, p: float, u: Tensor) -> Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022): caption i is replaced by the empty
    caption where u[i] < p. tokens (B, L), u (B,) uniform in [0, 1)."""
    return torch.where((u < p)[:, None], empty_like(tokens), tokens)


class TextEncoder(nn.Module):
    """Token ids (B, L) -> token features (B, L, dim), a padding mask (B, L) (True = real token) and
    a pooled feature (B, dim) (the mean over real tokens)."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keep = ids != PAD  # (B, L); every caption has >= 1 real token (<empty> at least)
        h = self.tok(ids) + self.pos[: ids.shape[1]]  # (B, L, dim)
        h = self.norm(self.encoder(h, src_key_padding_mask=~keep))
        pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)  # (B, dim)
        return h, keep, pooled
