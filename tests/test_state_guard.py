"""The guard that fails a test which leaves the process changed (state_guard, and the autouse
fixture in conftest.py): each kind of leak is named and put back, and a real pytest run fails the
leaking test and not the one after it."""
import os
import signal

import pytest
import torch

import state_guard

TESTS = os.path.dirname(os.path.abspath(__file__))


def _patch_cuda():
    torch.cuda.is_available = lambda: True


def _add_to_cuda():
    torch.cuda.planted = lambda: None


def _chdir():
    os.chdir(os.path.dirname(os.getcwd()) or "/")


# (what a careless test might do, the line the guard must print for it)
LEAKS = {
    "a torch.cuda function patched": (_patch_cuda, "torch.cuda.is_available:"),
    "a torch.cuda function added": (_add_to_cuda, "torch.cuda.planted: '<absent>'"),
    "a cuDNN flag": (lambda: setattr(torch.backends.cudnn, "benchmark",
                                     not torch.backends.cudnn.benchmark),
                     "torch.backends.cudnn.benchmark:"),
    "TF32 matmuls": (lambda: setattr(torch.backends.cuda.matmul, "allow_tf32",
                                     not torch.backends.cuda.matmul.allow_tf32),
                     "torch.backends.cuda.matmul.allow_tf32:"),
    "the default dtype": (lambda: torch.set_default_dtype(torch.float64),
                          "torch.get_default_dtype: torch.float32 -> torch.float64"),
    "the default device": (lambda: torch.set_default_device("meta"),
                           "torch function modes: 0 -> 1"),
    "the default device set to the CPU": (lambda: torch.set_default_device("cpu"),
                                          "torch function modes: 0 -> 1"),
    "the thread count": (lambda: torch.set_num_threads(torch.get_num_threads() + 1),
                         "torch.get_num_threads:"),
    "a signal handler": (lambda: signal.signal(signal.SIGUSR2, lambda *a: None),
                         "signal handler of SIGUSR2:"),
    "the working directory": (_chdir, "working directory:"),
    "an environment variable set": (lambda: os.environ.__setitem__("DDPM_PLANTED", "1"),
                                    "environment variable DDPM_PLANTED: '<unset>' -> '1'"),
    "an environment variable removed": (lambda: os.environ.pop("PATH"),
                                        "environment variable PATH:"),
}


@pytest.mark.parametrize("leak", LEAKS)
def test_each_kind_of_leak_is_named_and_put_back(leak):
    plant, line = LEAKS[leak]
    before = state_guard.snapshot()
    try:
        plant()
        changed = state_guard.differences(before, state_guard.snapshot())
    finally:
        state_guard.restore(before)
    # the change planted comes first; TF32 matmuls also move the float32 matmul precision they
    # set, and a default device other than the CPU is a second line
    assert [c for c in changed if c.startswith(line)] == changed[:1], changed
    paired = ("TF32 matmuls", "the default device")
    assert len(changed) == (2 if leak in paired else 1), changed
    assert state_guard._function_modes() == []  # put back: no mode left on torch's stack
    assert state_guard.differences(before, state_guard.snapshot()) == []


def test_an_unchanged_process_has_no_differences():
    assert state_guard.differences(state_guard.snapshot(), state_guard.snapshot()) == []


def test_the_fixture_fails_the_leaking_test_and_not_the_next(pytester, monkeypatch):
    """A pytest run of its own, with this suite's conftest: the test that leaves cuDNN's
    benchmark flag on fails at teardown, naming it; the next test finds the flag off again."""
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pytester.makeconftest(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("suite_conftest", {TESTS + "/conftest.py"!r})
        suite = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite)
        leaves_the_process_as_it_found_it = suite.leaves_the_process_as_it_found_it
    """)
    pytester.makepyfile(test_leak="""
        import torch

        def test_leaks():
            torch.backends.cudnn.benchmark = True

        def test_next():
            assert not torch.backends.cudnn.benchmark
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*the test left the process changed (now put back)*",
                                 "*torch.backends.cudnn.benchmark: False -> True*"])
