"""Many runs at once: compare algorithms over seeds, sweep a grid of keys, on dask.distributed.

- ``plan``: a scenario plus algorithms, variants and seeds (``plan_compare``), or a grid file
  (``plan_sweep``), becomes a ``Plan`` of ``RunSpec`` s; pure, nothing runs.
- ``execute``: ``run_batch`` runs a plan (on Dask or in this process) into a batch folder,
  whose files ``simulator.rundir`` owns.

The command-line layer (``compare``, ``sweep``, ``report``) lives in ``simulator/cli.py``.
"""
from simulator.experiments.execute import BatchResult, execute_run, machine_cores, run_batch
from simulator.experiments.plan import Plan, RunSpec, plan_compare, plan_sweep

__all__ = ["BatchResult", "Plan", "RunSpec", "execute_run", "machine_cores", "plan_compare", "plan_sweep",
           "run_batch"]
