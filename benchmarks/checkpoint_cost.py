"""What checkpointing costs: the share of a run's host time spent taking snapshots, and their size.

With ``--checkpoint-every N`` a run serialises its state at every round end (GAS: global
iteration) into memory (``simulator.checkpoint.Checkpointer.snapshot``), so that an interrupted
run can write its last round end on the way out, and writes it to disk every N rounds. Each
workload runs with ``--checkpoint-every`` a quarter of its rounds; this times every snapshot
and every write inside the run and divides by the run's host time (a ratio
measured in the same run, not two runs compared), for a few shipped workloads:

  tiny_mlp      digits, MLP, 4 clients (the engine-overhead workload: the most rounds per second)
  quickstart    scenarios/quickstart.yaml, MU-SplitFed tau 2 (small CNN)
  gas_quick     scenarios/quickstart.yaml's gas/zo (ZO clients, diagonal statistics)
  gas_alexnet   scenarios/gas_fmnist.yaml (AlexNet cut 2, full covariance statistics: the largest state)

Also resumes each run from its checkpoint (one more round) and prints how long the replay to the
checkpoint took against the run's own host time up to it.

    python benchmarks/checkpoint_cost.py [--only NAME ...] [--rounds N]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from simulator import checkpoint, runner  # noqa: E402
from simulator.scenario import load_scenario, validate  # noqa: E402

TINY = {
    "name": "tiny_mlp", "seed": 0, "threads": 1,
    "data": {"dataset": "digits", "num_clients": 4, "partition": "iid"},
    "model": {"name": "mlp", "cut": 1},
    "algorithm": {"name": "splitfed_v1", "batch_size": 16, "local_steps": 2, "lr_client": 0.1, "lr_server": 0.1},
    "time": {"client": {"flops_per_s": 2.0e6}, "server": {"flops_per_s": 1.0e8, "capacity": 1}},
    "eval": {"every_rounds": 10},
}


def workloads(rounds: int) -> dict:
    q = ROOT / "scenarios/quickstart.yaml"
    return {
        "tiny_mlp": lambda: validate({**TINY, "stop": {"rounds": 20 * rounds}}),
        "quickstart": lambda: load_scenario(q, ["algorithm.tau=2", "stop.sim_time_s=null", f"stop.rounds={rounds}",
                                                "threads=1"]),
        "gas_quick": lambda: load_scenario(q, [
            "algorithm={name: gas, batch_size: 32, local_steps: 10, client_optimizer: zo, server_optimizer: fo, "
            "lr_client: 0.001, lr_server: 0.1, active_clients: 5, covariance: diagonal, zo: {lam: 0.005, "
            "perturbations: 1}}", "stop.sim_time_s=null", f"stop.rounds={rounds}", "threads=1"]),
        "gas_alexnet": lambda: load_scenario(ROOT / "scenarios/gas_fmnist.yaml",
                                             [f"stop.rounds={max(2, rounds // 2)}", "algorithm.local_steps=5",
                                              "threads=1"]),
    }


class Timed:
    """Wraps Checkpointer.snapshot and .write with timers."""

    def __init__(self):
        self.snap_s, self.write_s, self.snaps, self.nbytes = 0.0, 0.0, 0, 0

    def __enter__(self):
        self.snapshot, self.write = checkpoint.Checkpointer.snapshot, checkpoint.Checkpointer.write
        timed = self

        def snapshot(cp):
            t0 = time.perf_counter()
            timed.snapshot(cp)
            timed.snap_s += time.perf_counter() - t0
            timed.snaps += 1
            timed.nbytes = len(cp.latest)

        def write(cp):
            t0 = time.perf_counter()
            out = timed.write(cp)
            timed.write_s += time.perf_counter() - t0
            return out

        checkpoint.Checkpointer.snapshot, checkpoint.Checkpointer.write = snapshot, write
        return self

    def __exit__(self, *exc):
        checkpoint.Checkpointer.snapshot, checkpoint.Checkpointer.write = self.snapshot, self.write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    worst = 0.0
    for name, make in workloads(args.rounds).items():
        if args.only and name not in args.only:
            continue
        scenario = make()
        tmp = Path(tempfile.mkdtemp(prefix="sflsim-ckpt-"))
        try:
            every = max(2, scenario.stop.rounds // 4)
            with Timed() as t:
                res = runner.run_scenario(scenario, tmp / "run", checkpoint_every=every)
            host = res.summary["host_runtime_s"]
            share = (t.snap_s + t.write_s) / host
            worst = max(worst, share)
            rounds = res.summary["rounds"]
            t0 = time.perf_counter()
            resumed = runner.resume_run(tmp / "run", [f"stop.rounds={rounds + 1}"])
            resume_s = time.perf_counter() - t0
            print(f"{name:12s} rounds {rounds:3d}  every {every:2d}  host {host:7.2f} s  snapshots {t.snaps:3d} x "
                  f"{t.nbytes / 2**20:7.2f} MiB  share: snapshots {100 * t.snap_s / host:5.2f}% + writes "
                  f"{100 * t.write_s / host:5.2f}% = {100 * share:5.2f}%  "
                  f"per snapshot {1000 * t.snap_s / max(1, t.snaps):7.1f} ms  resume (replay + 1 round) "
                  f"{resume_s:6.2f} s vs {resumed.summary['host_runtime_s']:.2f} s host")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"RESULT checkpoint.share_max = {worst:.4f}  of host time: in-memory snapshots + checkpoint.pt every "
          f"rounds/4")


if __name__ == "__main__":
    main()
