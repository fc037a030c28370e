"""Ready for a GPU without one: every path runs with its tensors on the `meta` device standing
in for the GPU. A meta tensor holds no data but has a device, and PyTorch refuses to mix it with
a CPU tensor (other than a 0-dim scalar) exactly as CUDA does, so a CPU tensor reaching the
network fails here as it would on a GPU. Host reads (item, bool, tolist) and copies between the
host and the stand-in are counted: on a GPU each is a synchronisation."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ddpm
from run import trainer
from config import parse_args
from ddpm import Program

META = torch.device("meta")
READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
COPY = torch.ops.aten._to_copy.default
TRANSFERS = (COPY, torch.ops.aten.copy_.default)  # the ops that move data between devices


class StandIn(TorchDispatchMode):
    """Runs every op as usual, but an op given both a meta tensor and a host tensor (other than
    a 0-dim scalar, which CUDA takes too) raises, as on a GPU (PyTorch's meta kernels do not all
    check); a read of a meta tensor on the host gives `read_as` and a copy of one to the host
    gives zeros (meta tensors hold no data). Counts the reads, the copies out (device -> host)
    and the blocking copies in (host -> device, not non_blocking)."""

    def __init__(self, read_as=0):
        super().__init__()
        self.read_as, self.reads, self.copies_out, self.copies_in = read_as, [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func not in TRANSFERS and any(t.device == META for t in tensors):
            host = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and t.ndim > 0]
            if host:
                raise RuntimeError(f"{func}: host tensor(s) of shape {host} beside the device's")
        if func in READS and args[0].device == META:
            self.reads.append(args[0].dtype)
            return self.read_as
        if func is COPY:
            to = torch.device(kwargs.get("device") or args[0].device)
            if args[0].device == META and to.type == "cpu":
                self.copies_out += 1
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            if args[0].device.type == "cpu" and to == META and not kwargs.get("non_blocking"):
                self.copies_in += 1
        return func(*args, **kwargs)


@pytest.fixture
def stand_in(monkeypatch):
    """Programs made now run on the meta device (fused Adam included, as on a GPU); written
    pictures and checkpoints hold zeros."""
    real = ddpm.pick_device
    monkeypatch.setattr(ddpm, "pick_device", lambda name, precision="auto": (META, None)
                        if name == "meta" else real(name, precision))
    monkeypatch.setattr(trainer, "FUSED_DEVICES", (*trainer.FUSED_DEVICES, "meta"), raising=False)
    import torch.optim.optimizer as opt
    supported = opt._get_fused_kernels_supported_devices
    monkeypatch.setattr(opt, "_get_fused_kernels_supported_devices", lambda: [*supported(), "meta"])
    with StandIn() as mode, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "for .*: copying from a non-meta parameter")
        yield mode


def pictures(folder, n=12, size=16, seed=0, captions=False):
    """n random RGB pictures; with captions, in sub-folders 'red hair' and 'blue hair'."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / (["red_hair", "blue_hair"][i % 2] if captions else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}.png")


TINY = ["--img-size", "16", "--num-channels", "8", "--channel-multiples", "1", "2", "--has-attn",
        "f", "t", "--num-blocks", "1", "--timesteps", "10", "--beta-max", "0.5", "--batch-size",
        "4", "--seed", "0"]


def flags(tmp_path, *extra):
    return [*TINY, "--cache-dir", str(tmp_path / "cache"), "--save-dir", str(tmp_path / "out"),
            "--ckpt-save-dir", str(tmp_path / "ckpt"), *extra]


@pytest.mark.parametrize("kind", [
    ["--data-on", "memory"], ["--data-on", "disk"], ["--data-on", "disk", "--super-res", "8"],
    ["--data-on", "memory", "--super-res", "8"], ["--captions", "folders", "--data-on", "disk"],
    ["--augment", "0.5"], ["--importance-sampling"], ["--learn-sigma"],
    ["--grad-accum", "2"], ["--data-path", "plain"]])
def test_training_every_kind_keeps_its_tensors_on_the_device(stand_in, tmp_path, kind):
    pictures(tmp_path / "imgs", captions="--captions" in kind)
    args, typed = parse_args(flags(tmp_path, "--train", "--data-folders", str(tmp_path / "imgs"),
                                   "--device", "meta", "--epochs", "1", "--sample-every", "2",
                                   *kind))
    prog = Program(args, typed)
    assert prog.device == META and next(prog.trainer.model.parameters()).device == META
    prog.run()  # strips, steps, progress grids, a checkpoint: a CPU tensor would have raised
    assert prog.state.step == -(-12 // (4 * args.grad_accum))  # 12 images, batch 4 x grad_accum
    assert os.path.exists(tmp_path / "out" / "run-after.png")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A plain and a text model, each trained one epoch on the CPU."""
    root = tmp_path_factory.mktemp("trained")
    pictures(root / "imgs")
    pictures(root / "tagged", captions=True)
    for name, extra in [("plain", []), ("text", ["--captions", "folders"])]:
        folder = root / ("tagged" if extra else "imgs")
        Program(*parse_args([*TINY, "--train", "--epochs", "1", "--data-folders", str(folder),
                             "--ckpt-save-dir", str(root / name), "--save-dir", str(root / name),
                             "--cache-dir", str(root / "cache"), "--device", "cpu",
                             *extra])).run()
    return root


@pytest.mark.parametrize("task", [
    ["--sampler", "ddpm"], ["--sampler", "ddim", "--eta", "1"], ["--sampler", "dpm++"],
    ["--sampler", "heun", "--spacing", "karras"],
    ["--eval-bpd", "4", "--data-on", "disk"], ["--eval-bpd", "4", "--data-on", "memory"],
    ["--init-folder", "{imgs}", "--strength", "0.5"],
    ["--init-folder", "{imgs}", "--mask-box", "0", "0", "8", "8"],
    ["--interpolate-seeds", "1", "2", "--frames", "3"],
    ["--interpolate", "{imgs}/0.png", "{imgs}/1.png", "--frames", "3", "--sampler", "ddim",
     "--sample-steps", "3"]])
def test_sampling_measuring_and_editing_keep_their_tensors_on_the_device(stand_in, checkpoints,
                                                                         tmp_path, task):
    imgs = str(checkpoints / "imgs")
    task = [t.replace("{imgs}", imgs) for t in task]
    Program(*parse_args(["--loadckpt", str(checkpoints / "plain" / "ckpt-0.pth"), "--device",
                         "meta", "--data-folders", imgs, "--save-dir", str(tmp_path),
                         "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4",
                         *task])).run()
    assert os.listdir(tmp_path)  # its pictures were written (zeros: meta holds no data)


def test_prompts_keep_their_tensors_on_the_device(stand_in, checkpoints, tmp_path):
    Program(*parse_args(["--loadckpt", str(checkpoints / "text" / "ckpt-0.pth"), "--device",
                         "meta", "--save-dir", str(tmp_path), "--batch-size", "2", "--prompt",
                         "red hair", "--guidance-scale", "1", "3", "--sampler", "dpm++",
                         "--sample-steps", "3"])).run()
    assert os.path.exists(tmp_path / "prompts.png")


def test_a_cpu_tensor_reaching_the_model_on_the_stand_in_fails(stand_in):
    """The premise of the tests above: the stand-in refuses a host tensor, as CUDA does."""
    net = torch.nn.Conv2d(3, 3, 1).to(META)
    net(torch.zeros(1, 3, 4, 4, device=META))
    with pytest.raises(RuntimeError, match="device"):
        net(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("data_on", [["--data-on", "memory"], ["--data-on", "disk"],
                                     ["--augment", "0.5"]])
def test_a_default_training_step_never_waits_for_the_device(stand_in, tmp_path, monkeypatch,
                                                            data_on):
    """No host read (item, bool, tolist) and no blocking copy in a step of the default path
    (from memory or disk) or of an augmenting one:
    on a GPU the host queues step after step without waiting. The epoch's order goes to the
    device once, at its start; the guard and the figures read the device every 10 steps."""
    made = []  # torch.tensor(data, device=...) copies from the host, unseen by dispatch modes
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(k.get("device")) or
                        real_tensor(*a, **k))
    pictures(tmp_path / "imgs", n=24)
    prog = Program(*parse_args(flags(tmp_path, "--train", "--device", "meta", *data_on,
                                     "--data-folders", str(tmp_path / "imgs"))))
    batches = prog.batches()
    prog.train_step(*next(batches))  # the first step of an epoch sends its order and flips
    stand_in.reads.clear()
    stand_in.copies_in = stand_in.copies_out = 0
    made.clear()
    for _ in range(3):
        prog.train_step(*next(batches))
    assert stand_in.reads == [] and stand_in.copies_in == 0 and stand_in.copies_out == 0
    assert [d for d in made if d is not None and torch.device(d) == META] == []
    assert prog.state.step == 4


@pytest.mark.parametrize("capability, auto, bf16_ok", [((7, 5), torch.float16, False),
                                                       ((8, 0), torch.bfloat16, True),
                                                       ((9, 0), torch.bfloat16, True)])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability,
                                                                   auto, bf16_ok):
    """A T4 or V100 (7.x) emulates bf16 slowly, though torch.cuda.is_bf16_supported() says yes:
    it gets fp16 with loss scaling. The chosen GPU is asked, not the current one. On a GPU the
    fast-maths flags are turned on.

    torch.cuda's functions are plain module attributes, which monkeypatch puts back; the backend
    flags are properties of torch's C++ state, which monkeypatch cannot undo (pytest 9.2 tries
    delattr), so they are kept and restored by hand."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "a GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda d=None: asked.append(torch.device(d)) or capability)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    kept = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.benchmark = cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        device, dtype = trainer.pick_device("cuda:1")
        assert device == torch.device("cuda:1") and dtype == auto and asked[-1] == device
        assert cudnn.benchmark and cudnn.allow_tf32 and matmul.allow_tf32
        if bf16_ok:
            assert trainer.pick_device("cuda:1", "bf16")[1] == torch.bfloat16
        else:
            with pytest.raises(ddpm.UserError, match="emulates bf16"):
                trainer.pick_device("cuda:1", "bf16")
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = kept


def _seed_of_process(rank, world, port, seeds):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    seeds[rank] = trainer.shared_seed(None, world)
    torch.distributed.destroy_process_group()


def test_processes_without_a_seed_share_the_first_ones(unused_port):
    """Under torchrun without --seed every process takes the first one's random seed, so the
    shards of an epoch partition the data instead of overlapping."""
    import torch.multiprocessing as mp
    seeds = mp.Manager().dict()
    mp.spawn(_seed_of_process, args=(2, unused_port, seeds), nprocs=2)
    assert seeds[0] == seeds[1]
    assert trainer.shared_seed(None, 1) != trainer.shared_seed(None, 1)  # fresh when alone
    assert trainer.shared_seed(5, 1) == 5
