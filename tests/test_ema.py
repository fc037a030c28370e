"""The EMA of the weights: trainer.update_ema (and its GPU path, ema_step) against its plain form,
per tensor and in a real optimizer step (a step skipped for a non-finite loss leaves the average
as it was); on a GPU, that it launches a few kernels, not one per parameter."""
import copy

import pytest
import torch

from config import parse_args
from ddpm import Program
from run.trainer import ema_step, update_ema
from unet import UNet


def nets(dtype=torch.float64, device="cpu"):
    """A small UNet (many parameter tensors of many shapes) and its EMA copy, made to differ."""
    torch.manual_seed(0)
    model = UNet(3, 8, (1, 2), (False, True), 1).to(device, dtype)
    ema = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model, ema


def multi_tensor(ema, model, decay, ok):
    """update_ema's GPU path, ema_step, here on the CPU."""
    w = ok.to(torch.float64) * (1 - decay)
    ema_step(list(ema.parameters()), list(model.parameters()), w)


@pytest.mark.parametrize("update,ok", [(update_ema, None), (update_ema, True),
                                       (update_ema, False), (multi_tensor, True),
                                       (multi_tensor, False)])
def test_ema_update_is_its_plain_form_and_a_skipped_step_leaves_the_average(update, ok):
    model, ema = nets()
    before = [e.clone() for e in ema.parameters()]
    decay = 0.9
    update(ema, model, decay, None if ok is None else torch.tensor(ok))
    for e, e0, p in zip(ema.parameters(), before, model.parameters()):
        if ok is False:
            assert torch.equal(e, e0)
        else:  # float64: the forms agree to rounding
            torch.testing.assert_close(e, decay * e0 + (1 - decay) * p, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("nan", [False, True])
def test_a_training_step_moves_the_ema_as_the_plain_form_and_a_skipped_one_does_not(
        tiny, tmp_path, nan):
    p = Program(*parse_args(tiny(tmp_path)))
    t = p.trainer
    real_losses = t.diffusion.losses
    if nan:  # a non-finite loss: the step is skipped on the device
        t.diffusion.losses = lambda *args: real_losses(*args) * float("nan")
    x0, _ = next(iter(p.batches()))
    ema0 = [e.clone() for e in t.ema.parameters()]
    model0 = [w.clone() for w in t.model.parameters()]
    decay = 0.5  # far from 1: the update is large enough to see
    t.step(x0, None, 1e-2, decay)
    assert bool(t.ok) is not nan
    for e, e0, w, w0 in zip(t.ema.parameters(), ema0, t.model.parameters(), model0):
        if nan:
            assert torch.equal(e, e0) and torch.equal(w, w0)
        else:
            torch.testing.assert_close(e, decay * e0 + (1 - decay) * w)
    if not nan:
        assert any(not torch.equal(e, e0) for e, e0 in zip(t.ema.parameters(), ema0))


def profiled_ema(device: str) -> tuple[list, int]:
    """One update_ema of nets() on device, profiled with the CPU and (on a GPU) the CUDA activity
    -> the events on the device (kernels and copies, not the host's op records), the number of
    parameter tensors. The CPU activity beside the CUDA one: a CUDA-only trace has been seen to
    come back empty of kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    model, ema = nets(torch.float32, device)
    ok = torch.ones((), dtype=torch.bool, device=device)
    update_ema(ema, model, 0.999, ok)  # warm: allocations and any lazy set-up
    before = [e.clone() for e in ema.parameters()]
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device == "cuda")
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        update_ema(ema, model, 0.999, ok)
        if device == "cuda":
            torch.cuda.synchronize()
    for e, e0, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.999 * e0 + 0.001 * p)
    host = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    assert host  # the trace recorded the update
    return [e for e in prof.events() if e.device_type == DeviceType.CUDA], len(before)


def test_the_profiled_update_on_the_cpu_has_host_ops_and_no_device_events():
    kernels, _ = profiled_ema("cpu")
    assert kernels == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA kernel launches")
def test_ema_update_on_cuda_launches_fewer_kernels_than_there_are_parameters():
    kernels, tensors = profiled_ema("cuda")
    assert 0 < len(kernels) < tensors / 4, (len(kernels), tensors)
