"""torchrun with 2 CPU processes (gloo) trains exactly like 1 process with the same global batch
(with and without --augment: the augmentation draws are for the global batch, sharded)."""
import os
import subprocess
import sys

import pytest
import torch

DDPM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddpm.py")


@pytest.mark.parametrize("augment,port", [("0", 29533), ("0.5", 29535)])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, augment, port):
    flags = ["--train", "--demo", "--demo-images", "32", "--img-size", "8", "--num-channels", "8",
             "--channel-multiples", "1", "2", "--has-attn", "f", "t", "--num-blocks", "1",
             "--timesteps", "10", "--beta-min", "1e-4", "--beta-max", "0.5", "--lr", "1e-4",
             "--batch-size", "8", "--epochs", "2", "--seed", "11", "--device", "cpu",
             "--augment", augment]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, DDPM],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--master_addr=127.0.0.1", f"--master_port={port}", DDPM]}
    out = {}
    for name, cmd in runs.items():
        r = subprocess.run(cmd + flags + ["--ckpt-save-dir", str(tmp_path / name / "ckpt"),
                                          "--save-dir", str(tmp_path / name / "out")],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        out[name] = r.stdout
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


def test_two_processes_accumulating_two_micro_batches_match_one_process_with_the_whole_batch(tmp_path):
    base = ["--train", "--demo", "--demo-images", "32", "--img-size", "8", "--num-channels", "8",
            "--channel-multiples", "1", "--has-attn", "f", "--num-blocks", "1", "--timesteps",
            "10", "--beta-min", "1e-4", "--beta-max", "0.5", "--lr", "1e-4", "--epochs", "1",
            "--seed", "5", "--device", "cpu", "--grad-clip", "1e9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, DDPM, "--batch-size", "16"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--master_addr=127.0.0.1", "--master_port=29534", DDPM, "--batch-size", "8",
                    "--grad-accum", "2"]}  # global micro-batch 8 = 4 a process, twice a step
    for name, cmd in runs.items():
        r = subprocess.run(cmd + base + ["--ckpt-save-dir", str(tmp_path / name),
                                         "--save-dir", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    one, two = (torch.load(tmp_path / n / "ckpt-0.pth", weights_only=True) for n in ("one", "two"))
    assert one["step"] == two["step"] == 2 and two["train"]["images_seen"] == 32
    for k, w in one["model"].items():  # Adam amplifies rounding of near-zero gradients: 1e-5
        assert torch.allclose(w, two["model"][k], atol=1e-5), k
