import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Under pytest-xdist (`-n 2`, the README's command) each worker is one process of its own: one
# thread each, also in the programs the tests start, so that two workers share two cores without
# over-subscribing them (OpenMP threads that wait for a descheduled sibling can be 10x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
