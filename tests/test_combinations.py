"""Every kind of model crossed with every action: each pair works on a tiny model, or validation
refuses it in one line (exit code 2) before any work starts.

The kinds are the subsets of the flags that say what a model is: the stored *conditioning* flags
and the stored on/off flags (`--learn-sigma`), `[rarely needed]` ones aside; a subset that
validation refuses to train is a kind that cannot exist, and its one pair is `train`. The
samplers are `--sampler`'s choices. A flag of the sampling, editing, evaluation or output groups
that no action uses and that is not a known modifier fails `test_every_action_flag_is_crossed`,
so a new kind or sampler joins the matrix by itself, and a new action flag asks to be added.

What is crossed is the wiring, so the FID network is stood in for by a cheap feature map here
(0.2-0.4 s an image on a CPU core); test_cli, test_superres and test_text run
`--eval-fid`, `--eval-every`, `--eval-sr` and `--eval-prompts` with the real one.
`pytest -rP tests/test_combinations.py` prints each pair's outcome: works, or the refusal.
"""
import argparse
import contextlib
import io
import itertools
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import config
import settings
from ui import UserError
import ddpm
from features import evaluate
from features import tags
from features import kinds
import validation
from features.text import Vocab

SIZE = 16  # every kind draws SIZE px images; a super-resolution kind upsamples SIZE / 2 to SIZE
RUN = ["--batch-size", "8", "--seed", "7", "--epochs", "1", "--sample-every", "0"]  # not stored
TINY = ["--img-size", str(SIZE), "--num-channels", "8", "--channel-multiples", "1", "2",
        "--has-attn", "f", "t", "--num-blocks", "1", "--timesteps", "10", "--beta-min", "1e-4",
        "--beta-max", "0.5", *RUN]
# The value that turns a kind flag on, for flags that are neither on/off nor a choice.
ON = {"super_res": str(SIZE // 2), "augment": "0.5"}
COLOURS = ("red", "blue")  # captions "<c> hair, <c> eyes": --prompt and --eval-prompts use them
PARSER = config.build_parser()
GROUPS = {g.title: g.actions for g in PARSER.flag_groups}


def kind_flags() -> list[argparse.Action]:
    """The flags that say what kind of model it is (see the module docstring)."""
    return [f for title in config.STORED_GROUPS for f in GROUPS[title]
            if not (f.help or "").startswith(config.RARE)
            and (title == "conditioning" or isinstance(f, argparse._StoreTrueAction))]


def on_flags(f: argparse.Action) -> list[str]:
    """The command-line words that turn kind flag f on."""
    if isinstance(f, argparse._StoreTrueAction):
        return [f.option_strings[0]]
    if f.choices:
        return [f.option_strings[0], next(c for c in f.choices if c != f.default)]
    if f.dest not in ON:
        raise KeyError(f"{f.option_strings[0]} is a new kind flag: give the value that turns it "
                       f"on in ON")
    return [f.option_strings[0], ON[f.dest]]


def kind_name(flags: tuple) -> str:
    return "+".join(f.option_strings[0][2:] for f in flags) or "plain"


KINDS = {kind_name(c): [w for f in c for w in on_flags(f)]
         for n in range(len(kind_flags()) + 1) for c in itertools.combinations(kind_flags(), n)}


def refusal(argv: list[str]) -> str | None:
    """validation's refusal of a command line without a checkpoint (None: admitted)."""
    try:
        settings.resolve(*config.parse_args(argv))
    except UserError as e:
        return str(e)
    return None


# A kind that validation refuses to train cannot exist: its one pair is `train`.
TRAINABLE = {k for k, flags in KINDS.items()
             if refusal(["--train", "--data-folders", "d", *TINY, *flags]) is None}


class Matrix:
    """The tiny data, and each kind's training run, made once on first use. Beside the kinds, the
    helpers of the cascade: an 8-px base model that a super-resolution kind upsamples, and a
    16 -> 32 px super-resolution model that upsamples a base kind."""

    def __init__(self, root):
        self.root, self.runs = root, {}
        rng = np.random.default_rng(0)
        for folder, n, side in (("data", 8, SIZE), ("init", 2, SIZE), ("lowres", 2, SIZE // 2)):
            (root / folder).mkdir()
            for i in range(n):  # blocks of 4 x 4 pixels: smooth enough for bicubic to matter
                cells = rng.integers(0, 256, (side // 4, side // 4, 3))
                arr = np.kron(cells, np.ones((4, 4, 1))).astype(np.uint8)
                Image.fromarray(arr).save(root / folder / f"{i}.png")
                (root / folder / f"{i}.txt").write_text(
                    f"{COLOURS[i % 2]} hair, {COLOURS[i // 2 % 2]} eyes")
        self.data, self.init, self.lowres = (str(root / f) for f in ("data", "init", "lowres"))

    def trained(self, kind: str) -> "Outcome":
        """The kind's (or helper's) training run."""
        if kind not in self.runs:
            self.runs[kind] = run(Pair(self, kind, "train").train())
        return self.runs[kind]

    def checkpoint(self, kind: str) -> str:
        outcome = self.trained(kind)
        assert outcome.code == 0, f"the {kind} kind did not train: {outcome.err}"
        return os.path.join(Pair(self, kind, "train").ckpt, "ckpt-0.pth")

    def copy(self, kind: str, folder: str) -> str:
        """The kind's checkpoint folder copied to folder (to resume there; the others keep it)."""
        shutil.copytree(os.path.dirname(self.checkpoint(kind)), folder)
        return folder


HELPERS = {"cascade-base": ["--img-size", str(SIZE // 2)],  # the data, made smaller
           "cascade-sr": ["--img-size", str(2 * SIZE), "--super-res", str(SIZE), "--keep-small"]}


class Pair:
    """A (kind, action) run in a folder of its own: the checkpoints go into `ckpt`, the pictures
    into `out`, and neither exists before the run."""

    def __init__(self, m: Matrix, kind: str, action: str):
        self.m, self.kind, self.action = m, kind, action
        folder = m.root / kind.replace("+", "_") / action
        os.makedirs(folder, exist_ok=True)
        self.folder, self.ckpt, self.out = str(folder), str(folder / "ckpt"), str(folder / "out")

    def train(self, *flags: str) -> list[str]:
        """A new training run of the kind."""
        return ["--train", "--data-folders", self.m.data, *TINY, *{**KINDS, **HELPERS}[self.kind],
                "--ckpt-save-dir", self.ckpt, "--save-dir", self.out, "--cache-dir",
                str(self.m.root / "cache"), *flags]

    def load(self, *flags: str, kind: str | None = None) -> list[str]:
        """Sampling (or measuring) with the kind's checkpoint."""
        return ["--loadckpt", self.m.checkpoint(kind or self.kind), "--batch-size", "2",
                "--save-dir", self.out, "--cache-dir", str(self.m.root / "cache"), *flags]

    def cascade(self) -> list[str]:
        """A super-resolution kind is the cascade's second stage, any other kind its first."""
        if "--super-res" in KINDS[self.kind]:
            return self.load("--sr-ckpt", self.m.checkpoint(self.kind), kind="cascade-base")
        return self.load("--sr-ckpt", self.m.checkpoint("cascade-sr"))


class Features:
    """Stands in for evaluate.InceptionFeatures: uint8 (B, C, H, W) -> 6 cheap features (B, 6)."""

    def __init__(self, device):
        pass

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().expand(-1, 3, -1, -1) / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


class Outcome:
    def __init__(self, code: int, out: str, err: str, refused: str | None):
        self.code, self.out, self.err, self.refused = code, out, err, refused


def run(argv: list[str]) -> Outcome:
    """ddpm.main(argv) in this process, its output captured, the RNGs left as they were; the
    message of validation's refusal, if it refused (None otherwise)."""
    refused = []

    def spy(a, *args, **kwargs):
        try:
            return validation.validate(a, *args, **kwargs)
        except UserError as e:
            refused.append(str(e))
            raise

    out, err = io.StringIO(), io.StringIO()
    py_state, np_state = random.getstate(), np.random.get_state()
    patched = [(settings, "validate", spy), (evaluate, "InceptionFeatures", Features)]
    real = [getattr(m, name) for m, name, _ in patched]
    try:
        for m, name, stand_in in patched:
            setattr(m, name, stand_in)
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ddpm.main(argv)
    finally:
        for (m, name, _), was in zip(patched, real):
            setattr(m, name, was)
        random.setstate(py_state)
        np.random.set_state(np_state)
    return Outcome(code, out.getvalue(), err.getvalue(), refused[-1] if refused else None)


def wrote(name: str):
    """Evidence of work: a file in the pair's output folder."""
    return lambda p, o: os.path.isfile(os.path.join(p.out, name))


def said(words: str):
    """Evidence of work: words on the standard output."""
    return lambda p, o: words in o.out


def saved(name: str):
    """Evidence of work: a checkpoint in the pair's checkpoint folder."""
    return lambda p, o: os.path.isfile(os.path.join(p.ckpt, name))


def exported(p: Pair) -> str:
    return os.path.join(p.folder, "weights.safetensors")


SAMPLERS = next(f for f in GROUPS["sampling"] if f.dest == "sampler").choices
# action -> (its command line for a Pair, the evidence that it did its work)
ACTIONS = {
    "train": (lambda p: p.train(), saved("ckpt-0.pth")),
    "resume": (lambda p: ["--resume", "--data-folders", p.m.data, "--ckpt-save-dir",
                          p.m.copy(p.kind, p.ckpt), "--save-dir", p.out, "--cache-dir",
                          str(p.m.root / "cache"), *RUN],
               saved("ckpt-1.pth")),
    "distill": (lambda p: ["--distill", "--loadckpt", p.m.checkpoint(p.kind), "--data-folders",
                           p.m.data, "--ckpt-save-dir", p.ckpt, "--save-dir", p.out,
                           "--cache-dir", str(p.m.root / "cache"), *RUN],
                saved("ckpt-0.pth")),
    **{f"sample-{s}": (lambda p, s=s: p.load("--sampler", s), wrote("ddpm-all.png"))
       for s in SAMPLERS},
    "eval-fid": (lambda p: p.load("--eval-fid", "2", "--data-folders", p.m.data),
                 wrote("nearest.png")),
    "eval-every": (lambda p: p.train("--eval-every", "1", "--eval-samples", "2"),
                   lambda p, o: '"fid"' in open(os.path.join(p.out, "metrics.jsonl")).read()),
    "eval-bpd": (lambda p: p.load("--eval-bpd", "2", "--data-folders", p.m.data),
                 said("bits/dim")),
    "lowres-folder": (lambda p: p.load("--lowres-folder", p.m.lowres), wrote("sr-all.png")),
    "eval-sr": (lambda p: p.load("--eval-sr", "2", "--data-folders", p.m.data),
                wrote("sr-compare.png")),
    "cascade": (lambda p: p.cascade(), wrote("sr-all.png")),
    "img2img": (lambda p: p.load("--init-folder", p.m.init), wrote("edit-all.png")),
    "inpaint": (lambda p: p.load("--init-folder", p.m.init, "--mask-box", "0", "0",
                                 str(SIZE // 2), str(SIZE // 2)), wrote("inpaint-all.png")),
    "interpolate": (lambda p: p.load("--interpolate", *(os.path.join(p.m.init, f"{i}.png")
                                                        for i in range(2)), "--frames", "2"),
                    wrote("interpolation.png")),
    "interpolate-seeds": (lambda p: p.load("--interpolate-seeds", "1", "2", "--frames", "2"),
                          wrote("interpolation.png")),
    "prompt": (lambda p: p.load("--prompt", f"{COLOURS[0]} hair"), wrote("prompts.png")),
    "eval-prompts": (lambda p: p.load("--eval-prompts", p.m.data, "--eval-samples", "2"),
                     said("prompted hair colour drawn")),
    "export": (lambda p: p.load("--export", exported(p)), lambda p, o: os.path.isfile(exported(p))),
    "info": (lambda p: ["--info", p.m.checkpoint(p.kind)], said("ddpm.py model")),
}
# Flags of those groups that change how an action runs rather than which action it is.
MODIFIERS = {"sample_steps", "spacing", "eta", "clip_x0", "raw_weights", "guidance_scale",
             "sr_noise", "strength", "mask_folder", "resample", "eval_folders"}
PAIRS = [(k, a) for k in KINDS for a in ACTIONS if k in TRAINABLE or a == "train"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return Matrix(tmp_path_factory.mktemp("combinations"))


@pytest.mark.parametrize("kind, action", PAIRS, ids=[f"{k}/{a}" for k, a in PAIRS])
def test_each_kind_and_action_works_or_is_refused_in_one_line(matrix, kind, action):
    argv_of, worked = ACTIONS[action]
    p = Pair(matrix, kind, action)
    o = matrix.trained(kind) if action == "train" else run(argv_of(p))
    if o.code == 0:
        print(f"{kind} x {action}: works")
        assert worked(p, o), f"exit code 0, but no sign of the work: {o.out}"
        return
    print(f"{kind} x {action}: refused: {o.refused}")
    assert o.code == 2 and o.refused, f"exit code {o.code}, not a refusal by validation: {o.err}"
    assert o.err == f"error: {o.refused}\n"  # one line, validation's
    made = [d for d in (p.out, p.ckpt) if os.path.exists(d) and (action, d) != ("resume", p.ckpt)]
    assert not made, f"refused, but after work began: {made} exist"


def test_every_action_flag_is_crossed(tmp_path):
    """Each flag of the sampling, editing, evaluation and output groups is an action of the
    matrix, a modifier of one, or where every action reads its checkpoint or writes."""
    class Paths(Matrix):  # the command lines only: no data, no runs
        def __init__(self):
            self.root, self.data, self.init, self.lowres = tmp_path, "d", "i", "l"

        def checkpoint(self, kind):
            return "c.pth"

        def copy(self, kind, folder):
            return folder

    used = set()
    for kind, (argv_of, _) in itertools.product(KINDS, ACTIONS.values()):
        words = set(argv_of(Pair(Paths(), kind, "a")))
        used |= {f.dest for f in config.flags_of(PARSER) if words & set(f.option_strings)}
    flags = {f.dest for g in ("sampling", "editing", "evaluation", "output") for f in GROUPS[g]}
    assert flags - used - MODIFIERS == set(), "add an action for these flags (or a modifier)"


def test_every_kind_class_has_the_whole_interface_and_wrappers_pass_it_on():
    """The kinds kinds.make_kind makes (and those they wrap) have every member of
    kinds.ModelKind, their classes define its methods themselves, and every public method of a
    kind is in ModelKind; a wrapper answers what it does not change as its inner kind does."""
    protocol = kinds.ModelKind
    methods = {k for k, v in vars(protocol).items() if callable(v) and not k.startswith("_")}
    vocab = Vocab.build([f"{c} hair" for c in COLOURS])
    preview_images = torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8)
    up = torch.linspace(-1, 1, 2 * 3 * SIZE * SIZE).view(2, 3, SIZE, SIZE)
    wrappers = 0
    for name, flags in KINDS.items():
        args, _ = config.parse_args(["--img-size", str(SIZE), *flags])
        s = settings.settings_of({**vars(args), "img_size": SIZE})  # not validated: every kind
        kind = kinds.make_kind(s.model, vocab if s.model.captions != "off" else None,
                               cond_drop=s.train.cond_drop, sr_noise_max=s.train.sr_noise_max,
                               sr_noise=s.sample.sr_noise, preview_images=preview_images)
        for k in [kind] + ([kind.inner] if hasattr(kind, "inner") else []):
            cls = type(k)
            assert isinstance(k, protocol) and methods <= set(vars(cls)), \
                f"{cls.__name__} lacks {methods - set(vars(cls))}"
            own = {m for m, v in vars(cls).items() if callable(v) and not m.startswith("_")}
            assert own <= methods, f"{cls.__name__}.{own - methods} is not in kinds.ModelKind"
        if hasattr(kind, "inner"):  # unet_inputs and train_batch are what a wrapper changes
            wrappers += 1
            assert kind.name == kind.inner.name
            for ask in (lambda k: k.unconditional(2, "cpu"), lambda k: k.preview(2, "cpu"),
                        lambda k: k.sample_inputs(up)):
                assert same(answer(ask, kind), answer(ask, kind.inner)), name
    assert wrappers


def answer(ask, kind):
    """ask(kind) on a fixed seed, or the one-line error it raises."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return ask(kind)
        except UserError as e:
            return str(e)


def same(x, y) -> bool:
    """Equal answers: tensors, and dicts, tuples and lists of them, compared exactly."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (tuple, list)):
        return type(x) is type(y) and len(x) == len(y) and all(map(same, x, y))
    return x == y


def test_eval_prompts_of_a_model_too_small_for_the_colour_classifier_is_refused_in_one_line(
        tmp_path):
    clf = tags.TagClassifier({"hair": list(COLOURS)}).eval()
    side = validation.TAG_MIN_SIDE
    assert set(clf(torch.zeros(1, 3, side, side))) == {"hair"}  # the smallest it takes
    with pytest.raises(AssertionError, match=f">= {side}"):
        clf(torch.zeros(1, 3, side - 1, side - 1))
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "text-model-bc9cbb7.pth")
    o = run(["--loadckpt", fixture, "--eval-prompts", str(tmp_path), "--save-dir",
             str(tmp_path / "out")])  # an 8-px text model
    assert o.code == 2 and o.err == f"error: {o.refused}\n" and f"{side} px and up" in o.refused
    assert not (tmp_path / "out").exists()
