"""What a test may not leave changed in the process: every test runs between two snapshots of it
(the autouse fixture in conftest.py), and a difference fails that test and is put back.

A snapshot holds torch.cuda's functions (a test that patches `is_available` and fails to undo it
makes every later test of the worker ask a CUDA driver), torch's backend flags (TF32, cuDNN,
attention kernels, matmul precision), the default dtype and device, the thread counts, every
signal handler, the working directory and the environment.
"""
import os
import signal
import types

import torch
import torch.backends.cuda
import torch.backends.cudnn
import torch.backends.mkldnn

# The backend flags, as (name, module, attribute). Each is a property (or module attribute)
# that reads torch's C++ state; a flag this torch lacks is left out of the snapshot.
FLAGS = [(f"torch.backends.{path}.{attr}", module, attr) for path, module, attrs in [
    ("cudnn", torch.backends.cudnn, ("enabled", "benchmark", "benchmark_limit", "deterministic",
                                     "allow_tf32")),
    ("cuda.matmul", torch.backends.cuda.matmul,
     ("allow_tf32", "allow_fp16_reduced_precision_reduction",
      "allow_bf16_reduced_precision_reduction")),
    ("mkldnn", torch.backends.mkldnn, ("enabled",)),
] for attr in attrs]

# Getter functions whose value counts too, with the setter that puts it back.
SETTINGS = {
    "torch.get_float32_matmul_precision": (torch.get_float32_matmul_precision,
                                           torch.set_float32_matmul_precision),
    "torch.are_deterministic_algorithms_enabled": (torch.are_deterministic_algorithms_enabled,
                                                   torch.use_deterministic_algorithms),
    "torch.get_default_dtype": (torch.get_default_dtype, torch.set_default_dtype),
    # None: no default device set, no DeviceContext mode left on torch's function-mode stack
    "torch.get_default_device": (torch.get_default_device,
                                 lambda d: torch.set_default_device(None if d.type == "cpu" else d)),
    # a mode left on the stack (a default device set to "cpu" included) changes every later op
    "torch function modes": (lambda: len(_function_modes()), None),
    "torch.get_num_threads": (torch.get_num_threads, torch.set_num_threads),
    # set once per process by torch; compared, never set back
    "torch.get_num_interop_threads": (torch.get_num_interop_threads, None),
    "torch.is_grad_enabled": (torch.is_grad_enabled, torch.set_grad_enabled),
    **{f"torch.backends.cuda.{name}": (getattr(torch.backends.cuda, name),
                                       getattr(torch.backends.cuda, f"enable_{name[:-8]}"))
       for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled",
                    "cudnn_sdp_enabled") if hasattr(torch.backends.cuda, name)},
}

# Environment variables torch sets once per process when a part of it first starts (the
# compiler's cache folder): their appearing is torch's start-up, not a test's leak.
SET_BY_TORCH = {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}

def _function_modes() -> list:
    """The torch-function modes in force (torch.set_default_device pushes one)."""
    from torch.overrides import _get_current_function_mode_stack
    return _get_current_function_mode_stack()


# Signals whose handlers can be read and set (SIGKILL and SIGSTOP cannot).
SIGNALS = sorted(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))


def cuda_functions() -> dict:
    """torch.cuda's public callables by name: a patched one is a different object."""
    return {name: value for name, value in vars(torch.cuda).items()
            if not name.startswith("_") and callable(value)
            and not isinstance(value, (type, types.ModuleType))}


def snapshot() -> dict:
    """The process state a test must leave as it found it -> {name: value}."""
    state = {f"torch.cuda.{name}": fn for name, fn in cuda_functions().items()}
    for name, module, attr in FLAGS:
        try:
            state[name] = getattr(module, attr)
        except (AttributeError, RuntimeError):
            pass
    state.update({name: get() for name, (get, _) in SETTINGS.items()})
    state.update({f"signal handler of {getattr(s, 'name', int(s))}": signal.getsignal(s)
                  for s in SIGNALS})
    state["working directory"] = os.getcwd()
    # pytest names the running test and its phase in PYTEST_CURRENT_TEST: that one changes
    state["environment"] = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return state


def differences(before: dict, after: dict) -> list[str]:
    """What changed between two snapshots, one line each (empty: nothing)."""
    lines = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name, "<absent>"), after.get(name, "<absent>")
        if name == "environment" and old != new:
            lines += [f"environment variable {k}: {old.get(k, '<unset>')!r} -> "
                      f"{new.get(k, '<unset>')!r}" for k in sorted(old.keys() | new.keys())
                      if old.get(k) != new.get(k) and not (k in SET_BY_TORCH and k not in old)]
        elif old is not new and old != new:
            lines.append(f"{name}: {old!r} -> {new!r}")
    return lines


def restore(before: dict) -> None:
    """Puts back what a snapshot holds, so that one test's leak does not fail the next ones."""
    for name, fn in before.items():
        if name.startswith("torch.cuda."):
            setattr(torch.cuda, name[len("torch.cuda."):], fn)
    for name in cuda_functions().keys() - {n[len("torch.cuda."):] for n in before}:
        delattr(torch.cuda, name)  # added by the test
    for name, module, attr in FLAGS:
        if name in before and getattr(module, attr) != before[name]:
            setattr(module, attr, before[name])
    while len(_function_modes()) > before["torch function modes"]:
        torch.set_default_device(None)  # pops the default device's mode
        if len(_function_modes()) > before["torch function modes"]:
            break  # a mode of another kind: reported, not removed
    for name, (get, put) in SETTINGS.items():
        if put is not None and get() != before[name]:
            put(before[name])
    for s in SIGNALS:
        key = f"signal handler of {getattr(s, 'name', int(s))}"
        if signal.getsignal(s) != before[key] and before[key] is not None:
            signal.signal(s, before[key])
    os.chdir(before["working directory"])
    for k in os.environ.keys() - before["environment"].keys() - {"PYTEST_CURRENT_TEST"} - SET_BY_TORCH:
        del os.environ[k]
    os.environ.update(before["environment"])
