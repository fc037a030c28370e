import os
import sys

# Under pytest-xdist (`-n 2`, the README's command) each worker is one process of its own: one
# thread each, also in the programs the tests start, so that two workers share two cores without
# over-subscribing them (OpenMP threads that wait for a descheduled sibling can be 10x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)


# -- Helpers shared by the test modules, as fixtures (session-wide: they hold no state) ---------
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import state_guard  # noqa: E402

pytest_plugins = ["pytester"]  # test_state_guard runs a pytest session of its own


@pytest.fixture(autouse=True)
def leaves_the_process_as_it_found_it():
    """Fails a test that leaves the process changed (state_guard: torch.cuda's functions, torch's
    backend flags, default dtype and device, thread counts, signal handlers, working directory,
    environment), and puts the state back so that the next tests run as they would alone.
    Autouse, so set up before any fixture the test asks for: monkeypatch has undone its
    changes by the time this looks."""
    before = state_guard.snapshot()
    yield
    changed = state_guard.differences(before, state_guard.snapshot())
    if changed:
        state_guard.restore(before)
        pytest.fail("the test left the process changed (now put back):\n  " + "\n  ".join(changed),
                    pytrace=False)

DDPM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddpm.py")


@pytest.fixture(scope="session")
def run_ddpm():
    """run_ddpm(cwd, *args): `python ddpm.py *args` in cwd -> the CompletedProcess (text)."""
    def run(cwd, *args):
        return subprocess.run([sys.executable, DDPM, *args], cwd=cwd, capture_output=True,
                              text=True, timeout=300)
    return run


@pytest.fixture(scope="session")
def settings():
    """settings(argv, read=None): the run's Settings for a command line (settings.py's resolve; read
    reads a --loadckpt: (path, ckpt_dir) -> (ckpt, path)). A command line that asks for nothing
    trains on a folder (--train --data-folders faces), which validation needs."""
    import config
    from settings import resolve

    def settings_of(argv, read=None):
        task = {"--train", "--resume", "--loadckpt"} & set(argv)
        args, typed = config.parse_args(argv if task else ["--train", "--data-folders", "faces",
                                                           *argv])
        return resolve(args, typed, read)[0]
    return settings_of


@pytest.fixture(scope="session")
def reader():
    """reader(train=None, **config): a stand-in for checkpoint.read that reads a training
    checkpoint of the default model (config: fields changed) with this recipe (`train`),
    whatever the path."""
    from core import spec

    def make(train=None, **changes):
        ckpt = {"schema": spec.SCHEMA, "config": {**spec.DEFAULTS.to_dict(), **changes},
                "epoch": 1, "step": 1, "model": {}, "optimizer": {}, "train": train or {}}
        return lambda path, ckpt_dir: (ckpt, path)
    return make


@pytest.fixture(scope="session")
def tiny_flags():
    """The flags of a tiny 16 px model (two levels, T = 20, batch 8)."""
    return ["--img-size", "16", "--num-channels", "8", "--channel-multiples", "1", "2",
            "--has-attn", "f", "t", "--num-blocks", "1", "--timesteps", "20", "--beta-min",
            "0.005", "--beta-max", "0.5", "--batch-size", "8"]


@pytest.fixture(scope="session")
def tiny():
    """tiny(folder, *extra): the flags of a training run of a tiny 8 px model on 32 demo faces
    (seed 7) with its checkpoints in folder/ckpt and pictures in folder/out; every flag of the
    --demo preset but --epochs is typed, so the preset changes nothing here."""
    def flags(folder, *extra):
        return ["--train", "--demo", "--demo-images", "32", "--img-size", "8", "--num-channels",
                "8", "--channel-multiples", "1", "--has-attn", "t", "--num-blocks", "2",
                "--timesteps", "10", "--beta-min", "1e-4", "--beta-max", "0.5", "--lr", "1e-4",
                "--batch-size", "8", "--seed", "7", "--ckpt-save-dir", str(folder / "ckpt"),
                "--save-dir", str(folder / "out"), *extra]
    return flags


@pytest.fixture(scope="session")
def reference():
    """reference(module) -> an independent implementation a test compares with (torchvision,
    pytorch-fid), or a skip that says why it is missing: PyPI's torchvision installs beside a
    CPU-only PyTorch of another release but fails to import there (RuntimeError)."""
    import importlib

    def load(name):
        try:
            return importlib.import_module(name)
        except (ImportError, RuntimeError) as e:
            pytest.skip(f"{name} does not import here: {str(e).splitlines()[0]}")
    return load


@pytest.fixture(scope="session")
def png_size():
    """png_size(path) -> (width, height) of a picture."""
    def size(path):
        with Image.open(path) as im:
            return im.size
    return size


@pytest.fixture(scope="session")
def write_images():
    """write_images(folder, names, h=20, w=24, seed=0, nested=False): random RGB pictures.
    names: file names, or a count n (000.png, 001.png, ...; with nested, spread over
    sub-folders two levels deep)."""
    def write(folder, names, h=20, w=24, seed=0, nested=False):
        rng = np.random.default_rng(seed)
        names = [f"{i:03d}.png" for i in range(names)] if isinstance(names, int) else names
        for i, name in enumerate(names):
            sub = folder / ["", "b", "a", os.path.join("a", "deep")][i % 4] if nested else folder
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / name)
    return write


@pytest.fixture(scope="session")
def make_diffusion():
    """make_diffusion(T=1000, schedule="linear", prediction="eps", beta_max=None): a
    GaussianDiffusion, beta_T = 0.02 scaled to T (at most 0.5) unless given (its losses and
    samplers are given the network)."""
    from core.diffusion import GaussianDiffusion
    def make(T=1000, schedule="linear", prediction="eps", beta_max=None):
        beta_max = min(0.02 * 1000 / T, 0.5) if beta_max is None else beta_max
        return GaussianDiffusion(T, 1e-4, beta_max, schedule=schedule, prediction=prediction)
    return make


@pytest.fixture
def unused_port():
    """A TCP port free on the loopback now, for a process group's rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
