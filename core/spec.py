"""What a checkpoint stores of its model: the ModelSpec, one frozen record of everything that
rebuilds the network, the noise process and the model kind; and how each layout a checkpoint was
ever written in is read, one function per schema version.

The spec decides the file format: a field of ModelSpec is stored, and its default is both the
command line's default and what a checkpoint of a later schema means when it lacks the field. A
new model flag is a new field with a default (and `since`, the schema it first appears in); no
other list names it.

    schema 1: three dicts (model_config, diffusion_config, cond_config), "format": 1
    schema 2: one "config" dict, "format": 2 (early ones lack augment and sr_target)
    schema 3: the same, with "schema": 3; every field of its time present
    schema 4: the same, with student_steps (a student of distillation)
Nothing here imports torch.
"""
import dataclasses
from dataclasses import dataclass, field

SCHEMA = 4  # what this program writes


def as_tuples(record) -> None:
    """A frozen record's list fields (the command line's) held as tuples: __post_init__."""
    for f in dataclasses.fields(record):
        v = getattr(record, f.name)
        if isinstance(v, list):
            object.__setattr__(record, f.name, tuple(v))


def plain(record) -> dict:
    """A record as a plain dict of JSON types (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(record).items()}


def _since(version: int):
    """A field's metadata: the first schema whose checkpoints always hold it."""
    return {"since": version}


@dataclass(frozen=True)
class ModelSpec:
    """The stored flags: the UNet, the noise process and what the model is conditioned on.
    img_size is an int (a square) or (H, W); the per-level flags are tuples (lists in the
    checkpoint's dict: to_dict)."""
    # the UNet
    img_size: int | tuple[int, int] = 64  # side of a square, or (H, W)
    img_channels: int = 3
    num_channels: int = 64
    channel_multiples: tuple[int, ...] = (1, 2, 4, 8)  # width multiple per resolution level
    has_attn: tuple[bool, ...] = (False, False, True, True)  # self-attention per level
    num_blocks: int = 2
    dropout: float = 0.0
    learn_sigma: bool = field(default=False, metadata=_since(2))
    # the noise process
    timesteps: int = 1000
    beta_min: float = 1e-4
    beta_max: float = 0.02
    schedule: str = field(default="linear", metadata=_since(2))
    prediction: str = field(default="v", metadata=_since(2))
    # the conditioning
    captions: str = field(default="off", metadata=_since(2))
    super_res: int = field(default=0, metadata=_since(2))
    augment: float = field(default=0.0, metadata=_since(3))
    sr_target: str = field(default="residual", metadata=_since(3))
    # a student of progressive distillation: the steps it draws in (0: a diffusion model)
    student_steps: int = field(default=0, metadata=_since(4))

    __post_init__ = as_tuples  # lists (a checkpoint's, the command line's) held as tuples

    def to_dict(self) -> dict:
        """The plain dict a checkpoint stores (lists, not tuples)."""
        return plain(self)


FIELDS = [f.name for f in dataclasses.fields(ModelSpec)]  # in declaration order
DEFAULTS = ModelSpec()


def since(name: str) -> int:
    """The schema from which checkpoints always hold the field (1: from the first)."""
    return next(f for f in dataclasses.fields(ModelSpec) if f.name == name).metadata.get("since", 1)


# Schema 1 checkpoints lack the fields of schema 2; these are what they were trained with.
SCHEMA_1_MEANT = {"learn_sigma": False, "schedule": "linear", "prediction": "eps",
                  "captions": "off", "super_res": 0}
SCHEMA_1_DERIVED = ("vocab_size", "text_len", "lowres_channels")  # worked out from the rest now
# Early schema 2 checkpoints lack the fields of schema 3: no augmentation, and a
# super-resolution model that diffuses the image itself.
SCHEMA_2_MEANT = {"augment": 0.0, "sr_target": "image"}


def hw(size) -> tuple[int, int]:
    """--img-size as stored (an int for a square, [H, W] otherwise) -> (H, W)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def size_name(size) -> str:
    """64 -> '64', [16, 32] -> '16x32' (H x W)."""
    return "x".join(map(str, hw(size))) if not isinstance(size, int) else str(size)


def sr_target_name(sr_target: str) -> str:
    """What a super-resolution model diffuses, in words (--info and the start-up summary)."""
    return {"residual": "the residual over bicubic", "image": "the image itself"}[sr_target]


class SpecError(Exception):
    """A checkpoint whose stored spec is missing or lacks a field its schema always holds."""


def schema_of(ckpt: dict) -> int:
    """Which layout a checkpoint's spec is in."""
    if ckpt.get("format") == 1 or "config" not in ckpt and "model_config" in ckpt:
        return 1
    return ckpt.get("schema", 2)


def _read_1(ckpt: dict) -> dict:
    merged = {**SCHEMA_2_MEANT, **SCHEMA_1_MEANT, **ckpt["model_config"],
              **ckpt["diffusion_config"], **ckpt.get("cond_config", {})}
    return {k: v for k, v in merged.items() if k not in SCHEMA_1_DERIVED}


def _read_2(ckpt: dict) -> dict:
    return {**SCHEMA_2_MEANT, **ckpt["config"]}


def _read_3(ckpt: dict) -> dict:
    return dict(ckpt["config"])


READERS = {1: _read_1, 2: _read_2, 3: _read_3, 4: _read_3}


def stored_dict(ckpt: dict) -> dict:
    """A checkpoint's spec as the plain dict of every field, whatever its schema. A field newer
    than the checkpoint's schema takes its default; one its schema always holds must be there
    (SpecError names it)."""
    version = schema_of(ckpt)
    if version not in READERS:
        raise SpecError(f"schema {version} is newer than this program's ({SCHEMA})")
    try:
        c = READERS[version](ckpt)
    except (KeyError, TypeError, ValueError):
        raise SpecError("it has no model config") from None
    if not isinstance(c, dict):
        raise SpecError("it has no model config")
    lacking = [k for k in FIELDS if k not in c and since(k) <= version]
    if lacking:
        raise SpecError(f"its config lacks {', '.join(map(repr, lacking))}")
    defaults = DEFAULTS.to_dict()
    return {k: c[k] if k in c else defaults[k] for k in FIELDS}


def read(ckpt: dict) -> ModelSpec:
    """A checkpoint's ModelSpec (SpecError as stored_dict)."""
    return ModelSpec(**stored_dict(ckpt))
