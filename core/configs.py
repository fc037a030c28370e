"""The settings of a run, as frozen records the command line builds once (settings.resolve) and
hands down: each layer receives the part it uses, and nothing changes one after it is built.

    Settings
      data: DataConfig          where the training images come from
      model: spec.ModelSpec     the network, the noise process, the conditioning (stored)
      train: TrainConfig        the optimizer step, the run's length and its monitoring
      sample: SampleConfig      the sampler and what to draw
      edit: EditConfig          image to image, inpainting, interpolation
      evaluation: EvalConfig    FID / KID, bits/dim, the copy rate
      output: OutputConfig      where checkpoints and pictures go

Each part's fields are the flags of its groups of the parser (config.PARTS says which; a test
checks that the two agree), with the flags' meaning and defaults in config.py. Lists are held
as tuples. Nothing here imports torch.
"""
import dataclasses
from dataclasses import dataclass

from core.spec import ModelSpec, as_tuples, plain

DEFAULT_STEPS = {"ddpm": 0, "ddim": 50, "dpm++": 20, "heun": 18}  # sampler steps; 0: all T


@dataclass(frozen=True)
class DataConfig:
    data_folders: tuple[str, ...] | None
    demo: bool
    demo_images: int
    keep_small: bool
    data_path: str  # device | plain
    data_on: str  # auto | memory | disk
    data_memory: float | None  # MiB
    cache_dir: str
    __post_init__ = as_tuples


@dataclass(frozen=True)
class TrainConfig:
    train: bool
    resume: bool
    batch_size: int  # the global batch; also the samples drawn at once when sampling
    grad_accum: int
    lr: float | None  # None only until the network's size decides it (settings.with_lr)
    grad_clip: float
    ema_decay: float
    min_snr_gamma: float
    t_sampling: str  # lognormal | uniform
    importance_sampling: bool
    hflip: str  # on | off
    cond_drop: float
    sr_noise_max: float
    grad_checkpoint: bool
    compile: bool
    seed: int | None
    device: str  # cpu, cuda or cuda:N ("auto" resolved)
    precision: str  # auto | bf16 | fp16 | fp32
    # distillation
    distill: bool
    teacher_calls: int
    # the run's length, schedule and monitoring
    epochs: int
    max_steps: int
    max_minutes: float | None
    save_every: int  # steps; 0: at epoch ends only
    save_every_minutes: float  # 0: off
    lr_warmup: int
    lr_schedule: str  # constant | cosine
    sample_every: int | None
    start_over: bool
    tensorboard: bool
    __post_init__ = as_tuples


@dataclass(frozen=True)
class SampleConfig:
    loadckpt: str | None  # the checkpoint's path once read
    sampler: str  # ddpm | ddim | dpm++ | heun
    sample_steps: int | None  # None: the sampler's default (`steps`)
    spacing: str  # uniform | karras
    eta: float
    clip_x0: bool
    raw_weights: bool
    prompt: tuple[str, ...] | None
    guidance_scale: tuple[float, ...]
    lowres_folder: str | None
    sr_ckpt: str | None
    sr_noise: float
    __post_init__ = as_tuples

    @property
    def steps(self) -> int:
        """The steps the sampler takes: --sample-steps or the sampler's default (0: all T)."""
        return self.sample_steps or DEFAULT_STEPS[self.sampler]


@dataclass(frozen=True)
class EditConfig:
    init_folder: str | None
    strength: float
    mask_folder: str | None
    mask_box: tuple[int, int, int, int] | None
    resample: int
    interpolate: tuple[str, str] | None
    interpolate_seeds: tuple[int, int] | None
    frames: int
    __post_init__ = as_tuples


@dataclass(frozen=True)
class EvalConfig:
    eval_fid: int
    eval_bpd: int
    eval_every: int
    eval_samples: int
    eval_folders: tuple[str, ...] | None
    eval_sr: int
    eval_prompts: str | None
    __post_init__ = as_tuples


@dataclass(frozen=True)
class OutputConfig:
    ckpt_save_dir: str
    save_dir: str
    info: str | None
    export: str | None


@dataclass(frozen=True)
class Settings:
    """A run's every setting, part by part (see the module's docstring)."""
    data: DataConfig
    model: ModelSpec
    train: TrainConfig
    sample: SampleConfig
    edit: EditConfig
    evaluation: EvalConfig
    output: OutputConfig

    def to_dict(self) -> dict:
        """Every setting, part by part, as plain JSON types (config.json beside the outputs)."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


PART_TYPES = {f.name: f.type for f in dataclasses.fields(Settings)}
