"""Captions for text-conditioned DDPM: reading them, a word vocabulary, and the text model kind
(Captioned). The token ids the network sees and its text encoder are core/tokens.py's.
"""
import csv
import os
import unicodedata

import torch
from torch import Tensor

from core.tokens import EMPTY, PAD, SPECIALS, drop_captions, empty_like
from ui import UserError
from data import walk


class CaptionError(Exception):
    """A prompt or caption file that cannot be used; the message says what to change."""


def words(caption: str) -> list[str]:
    """'Blue hair, red eyes' -> ['blue', 'hair', 'red', 'eyes']: the Unicode words of the caption,
    NFC-normalised and casefolded ('Rød' -> 'rød', 'КРАСНЫЕ' -> 'красные'). A word is a run of
    letters and digits in any script (regex \\w without '_'), their combining marks, ' and -;
    anything else separates words."""
    text = unicodedata.normalize("NFC", caption).casefold().replace("\u2019", "'")
    runs = "".join(c if c.isalnum() or c in "'-" or unicodedata.category(c).startswith("M")
                   else " " for c in text).split()
    return [w for w in runs if any(c.isalnum() for c in w)]  # '--' alone is not a word


def read_captions(paths: list[str], folders: list[str], source: str) -> list[str]:
    """One caption per image path ('' = none: the image trains unconditionally).

    source 'files': a `name.txt` beside the image, else its row in a `captions.csv` (`file,caption`,
    file relative to the csv's folder) anywhere under the data folders;
    source 'folders': the image's sub-folder path under its data folder ('_' read as a space), so
    folders of classes train a class-conditional model.
    """
    if source == "folders":
        out = []
        for p in paths:
            root = max((f for f in folders if os.path.abspath(p).startswith(os.path.abspath(f) + os.sep)),
                       key=len, default=os.path.dirname(p))
            sub = os.path.relpath(os.path.dirname(os.path.abspath(p)), os.path.abspath(root))
            out.append("" if sub == "." else sub.replace(os.sep, " ").replace("_", " "))
        return out
    table = {}
    for folder in folders:
        for root, files in walk(folder):  # a symlink loop is walked once
            if "captions.csv" in files:
                table.update(read_csv(os.path.join(root, "captions.csv")))
    out = []
    for p in paths:
        txt = os.path.splitext(p)[0] + ".txt"
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8", errors="replace") as f:
                out.append(f.read().strip())
        else:
            out.append(table.get(os.path.abspath(p), ""))
    return out


def caption_tokens(paths: list[str], folders: list[str], source: str, vocab: "Vocab | None",
                   say=print) -> tuple[Tensor, "Vocab"]:
    """--captions source: each image's caption as tokens (N, L) (words the vocabulary lacks are
    dropped), and the vocabulary: vocab (a resumed run's), or built from these captions."""
    captions = read_captions(paths, folders, source)
    have = sum(map(bool, captions))
    if not have:
        where = "a .txt beside it or a captions.csv row" if source == "files" else "no sub-folders"
        raise CaptionError(f"--captions {source}: none of the {len(paths)} images has a caption "
                           f"({where})")
    vocab = vocab or Vocab.build([c for c in captions if c])
    say(f"captions: {have} of {len(paths)} images have one ({source}); vocabulary of "
        f"{len(vocab) - 2} words, up to {vocab.max_len} per caption")
    return vocab.encode_all(captions), vocab


def read_csv(path: str) -> dict[str, str]:
    """A captions.csv -> {absolute image path: caption}. UTF-8, with or without the byte-order
    mark spreadsheet programs write; a header naming the columns 'file' and 'caption'; one row a
    line. A row without a caption, with more fields than the header, or one that runs over
    several lines (a quote left open swallows the rows after it) is refused with its line."""
    folder, table = os.path.dirname(path), {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.DictReader(f)
            if not {"file", "caption"} <= set(rows.fieldnames or ()):
                raise CaptionError(f"{path}: expected a header 'file,caption', got "
                                   f"{','.join(rows.fieldnames or [])!r}")
            end = rows.line_num  # the header's line
            for row in rows:
                file, caption, after, end = row["file"], row["caption"], end, rows.line_num
                fields = [file or "", caption or "", *row.get(None, [])]
                breaks = max(sum(v.count("\n") for v in fields), sum(v.count("\r") for v in fields))
                if breaks:  # quoted line breaks (at the end of the file also the last one's)
                    raise CaptionError(f"{path} line {max(after + 1, end - breaks)}: the row runs "
                                       f"on to line {end}; close its quote (a caption is one line)")
                if caption is None or None in row:
                    raise CaptionError(f"{path} line {end}: expected file,caption, got "
                                       f"{','.join(fields)!r}; quote a caption that holds commas")
                table[os.path.abspath(os.path.join(folder, file))] = caption
    except (UnicodeDecodeError, csv.Error) as e:
        raise CaptionError(f"{path}: not a UTF-8 csv file of file,caption rows ({e})") from None
    return table


class Vocab:
    """Words <-> token ids; ids 0 and 1 are <pad> and <empty>, words follow in sorted order."""

    def __init__(self, words_: list[str], max_len: int):
        self.itos = SPECIALS + sorted(set(words_) - set(SPECIALS))
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.max_len = max_len

    @classmethod
    def build(cls, captions: list[str]) -> "Vocab":
        """From training captions; room for the longest caption (at least 8 tokens). Captions
        without a single word leave nothing to condition on: CaptionError."""
        tokenised = [words(c) for c in captions]
        if not any(tokenised):
            raise CaptionError(f"none of the {len(captions)} captions holds a word (letters or "
                               f"digits), e.g. {captions[0] if captions else ''!r}: a text model "
                               f"would have nothing to condition on")
        return cls([w for ws in tokenised for w in ws], max(8, *(len(ws) for ws in tokenised)))

    def __len__(self) -> int:
        return len(self.itos)

    def state(self) -> dict:
        return {"words": self.itos[len(SPECIALS):], "max_len": self.max_len}

    @classmethod
    def from_state(cls, state: dict) -> "Vocab":
        return cls(state["words"], state["max_len"])

    def encode(self, caption: str, strict: bool = True) -> list[int]:
        """Caption -> max_len ids, padded; '' -> [<empty>, <pad>, ...]. Unknown words raise
        CaptionError listing the vocabulary (strict, for prompts) or are dropped (training)."""
        ws = words(caption)
        unknown = [w for w in ws if w not in self.stoi]
        if unknown and strict:
            raise CaptionError(f"unknown word(s) {', '.join(repr(w) for w in unknown)} in prompt "
                               f"{caption!r}; this model knows: {' '.join(self.itos[len(SPECIALS):])}")
        ids = [self.stoi[w] for w in ws if w in self.stoi] or [EMPTY]
        if len(ids) > self.max_len:
            raise CaptionError(f"prompt {caption!r} has {len(ids)} words; this model takes at most "
                               f"{self.max_len}")
        return ids + [PAD] * (self.max_len - len(ids))

    def encode_all(self, captions: list[str], strict: bool = False) -> Tensor:
        """-> int64 (N, max_len)."""
        return torch.tensor([self.encode(c, strict) for c in captions], dtype=torch.long)

    def empty(self, n: int, device=None) -> Tensor:
        """n empty captions: (n, max_len), the unconditional input."""
        return empty_like(torch.empty((n, self.max_len), dtype=torch.long, device=device))


class Captioned:
    """A text-conditioned model (the trainer.ModelKind interface). It trains on each image's
    caption tokens, replaced by the empty caption with probability cond_drop (classifier-free
    guidance); unprompted samples are drawn from the empty caption."""

    name = "text-conditioned"

    def __init__(self, vocab: Vocab, cond_drop: float):
        self.vocab, self.cond_drop = vocab, cond_drop

    def unet_inputs(self) -> dict:
        return {"vocab_size": len(self.vocab), "text_len": self.vocab.max_len}

    def train_batch(self, x0: Tensor, tokens: Tensor, n: int, share: slice):
        u = torch.rand(n, device=x0.device)[share]  # (B,)
        return x0, {"tokens": drop_captions(tokens, self.cond_drop, u)}

    def unconditional(self, n: int, device) -> dict:
        return {"tokens": self.vocab.empty(n, device)}

    def preview(self, n: int, device) -> tuple[dict, None]:
        return self.unconditional(n, device), None

    def sample_inputs(self, up: Tensor):
        raise UserError(f"a {self.name} model draws from noise, not from low-res images")
