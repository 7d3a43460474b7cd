"""What does an 8-point straggler-factor sweep cost with re-timing, against one run?

The sweep: one scenario (``splitfed_zo``, ZO clients and a first-order server, small CNN on
Fashion-MNIST, 20% stragglers, evaluated every 5 rounds, stopped by rounds) at 8 straggler
speed factors, run as ``sflsim sweep`` runs it in one process (``run_batch(..., workers=1)``):
the first point trains and the other 7 are re-timed from it (``simulator.retime``). Against:
one training run of the same scenario. Both are timed alternately, ``--repeats`` times, and the
medians' ratio is printed (the target: at most 1.3x). ``--full`` also times the sweep with
``--no-retime`` (every point trained) once, for scale. Usage:

    python benchmarks/retime_sweep.py [--rounds 10] [--repeats 2] [--full]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from simulator.experiments import plan_sweep, run_batch  # noqa: E402
from simulator.runner import run_scenario  # noqa: E402
from simulator.scenario import validate  # noqa: E402

FACTORS = [1.0, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.02]


def base(rounds: int) -> dict:
    return {
        "name": "retime-bench", "seed": 0, "threads": 1,
        "data": {"dataset": "fashion_mnist", "num_clients": 10, "test_limit": 1000},
        "model": {"name": "small_cnn", "cut": 1},
        "algorithm": {"name": "splitfed_zo", "batch_size": 32, "participation": 0.5, "local_steps": 10,
                      "client_optimizer": "zo", "server_optimizer": "fo", "lr_client": 0.001, "lr_server": 0.1},
        "time": {"client": {"flops_per_s": 2e9, "tiers": [{"name": "straggler", "share": 0.2, "speed_factor": 1.0}],
                            "delay_s": {"dist": "exponential", "mean": 0.05}},
                 "server": {"flops_per_s": 5e10, "capacity": 2}},
        "eval": {"every_rounds": 5},
        "stop": {"rounds": rounds},
    }


def one_run(raw: dict, work: Path) -> float:
    out = work / "one"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run_scenario(validate(raw), out)
    return time.perf_counter() - t0


def sweep(grid: Path, work: Path, retime: bool) -> tuple[float, int, float]:
    """(host seconds of the whole sweep, runs re-timed, host seconds of its trained point(s))."""
    out = work / ("sweep" if retime else "sweep-full")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    plan = plan_sweep(grid)
    result = run_batch(plan, out, workers=1, threads=1, progress=False, retime=retime)
    host = time.perf_counter() - t0
    assert result.count("completed") == len(FACTORS), [o["status"] for o in result.outcomes]
    trained = sum(o["host_s"] for o in result.outcomes if not o.get("retimed_from"))
    return host, len(plan.retime_sources()) if retime else 0, trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also time the sweep with every point trained (8 runs)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="retime-bench-"))
    try:
        raw = base(args.rounds)
        (work / "base.yaml").write_text(yaml.safe_dump(raw))
        grid = work / "grid.yaml"
        grid.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"time.client.tiers.0.speed_factor": FACTORS}}))
        warm = dict(raw, stop={"rounds": 1}, timing_only=True)
        run_scenario(validate(warm), work / "warm")  # imports, data file cache, matplotlib: paid once here
        ones, sweeps, inner = [], [], []
        for _ in range(args.repeats):  # alternate A and B
            ones.append(one_run(raw, work))
            host, retimed, trained = sweep(grid, work, True)
            sweeps.append(host)
            inner.append(host / trained)
        one, sw = statistics.median(ones), statistics.median(sweeps)
        print(f"scenario: splitfed_zo (ZO clients, FO server), small_cnn, fashion_mnist, 10 clients, {args.rounds} "
              f"rounds, eval every 5; sweep: time.client.tiers.0.speed_factor in {FACTORS}")
        print(f"one training run: {one:.1f} s host (median of {args.repeats})")
        print(f"8-point sweep, 1 trained + {retimed} re-timed: {sw:.1f} s host (median of {args.repeats})")
        print(f"ratio sweep / one run: {sw / one:.2f}x (target <= 1.3x)")
        print(f"RESULT retime.sweep8_vs_one_run = {sw / one:.3f}  8-point straggler sweep (1 trained, 7 re-timed) / one training run")
        print(f"ratio sweep / its own trained point (same sweep, less exposed to machine load): "
              f"{statistics.median(inner):.2f}x (each repeat: {', '.join(f'{r:.2f}' for r in inner)})")
        if args.full:
            full, _, _ = sweep(grid, work, False)
            print(f"8-point sweep, every point trained (--no-retime): {full:.1f} s host, {full / one:.2f}x one run")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
