"""Warm Dask workers: what a worker process imports once, when it starts, for all its runs.

A batch's local cluster starts its workers with ``preload=["simulator.experiments.worker"]``
(``run_batch``), so each worker process imports torch, the runner and every algorithm while the
cluster comes up, then runs run after run in that same process: a run's start-up in a batch is
its data, model and (cached) cut profile, not Python's imports. The raw dataset arrays also
stay in the process (``simulator.data.images`` keeps the last few), so later runs on the same
data skip reading the files. Workers of an existing scheduler (``--scheduler``) get the same
with ``dask worker ADDRESS --preload simulator.experiments.worker``.

Nothing here runs a simulation or changes one: importing a module twice is a no-op, so a run
behaves the same on a warm worker, a cold one, or in the calling process.
"""
from __future__ import annotations

import importlib
import logging
import time

log = logging.getLogger(__name__)

#: What every run imports; importing it here, once per worker process, takes it off the runs.
WARM_MODULES = (
    "torch",
    "simulator.runner",
    "simulator.algorithms.splitfed",
    "simulator.algorithms.mu_splitfed",
    "simulator.algorithms.gas",
    "models.zoo",
    "simulator.experiments.execute",
)


def warm() -> float:
    """Import ``WARM_MODULES``; return the seconds it took (0.0 when they were imported already)."""
    t0 = time.perf_counter()
    for name in WARM_MODULES:
        importlib.import_module(name)
    return time.perf_counter() - t0


def dask_setup(worker=None) -> None:  # called by Dask when the module is a worker preload
    seconds = warm()
    log.debug("worker %s warmed in %.2f s", getattr(worker, "address", "?"), seconds)
