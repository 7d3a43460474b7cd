"""Shared fixtures: tiny scenarios that run in a second or two on the digits dataset."""
from __future__ import annotations

import copy
import signal

import pytest
import torch

# Tests compare traces byte for byte: fix the thread count so float sums are ordered the same.
torch.set_num_threads(1)

# The Ctrl-C tests send SIGINT to this process and to `sflsim run` subprocesses. A shell that
# starts a job in the background (`make test &`, nohup) sets SIGINT to "ignore", which Python
# and every child would inherit: no KeyboardInterrupt, and those tests fail for a reason that
# is not sflsim's. Put back what an interactive shell gives (children then start with SIGINT at
# its default, so Python installs its own handler there too).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TINY = {
    "name": "tiny",
    "seed": 3,
    "threads": 1,
    "data": {"dataset": "digits", "num_clients": 4, "partition": "iid"},
    "model": {"name": "mlp", "cut": 1},
    "algorithm": {"name": "splitfed_v1", "batch_size": 16, "local_steps": 2, "lr_client": 0.1, "lr_server": 0.1},
    "time": {
        "client": {
            "flops_per_s": {"dist": "uniform", "low": 1.0e6, "high": 4.0e6},
            "delay_s": {"dist": "exponential", "mean": 0.05},
        },
        "server": {"flops_per_s": 1.0e8, "capacity": 1},
    },
    "eval": {"every_rounds": 1},
    "stop": {"rounds": 2},
}


@pytest.fixture(autouse=True, scope="session")
def _profile_cache(tmp_path_factory):
    """Cut profiles are cached in a folder of this test session, never in the user's cache
    (subprocesses inherit it through the environment)."""
    import os

    old = os.environ.get("SFLSIM_CACHE")
    os.environ["SFLSIM_CACHE"] = str(tmp_path_factory.mktemp("sflsim-cache"))
    yield
    if old is None:
        os.environ.pop("SFLSIM_CACHE", None)
    else:
        os.environ["SFLSIM_CACHE"] = old


@pytest.fixture
def tiny_raw() -> dict:
    """A fresh copy of a tiny scenario mapping (digits, MLP, 4 clients, 2 rounds)."""
    return copy.deepcopy(TINY)
