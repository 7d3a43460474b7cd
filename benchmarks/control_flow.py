"""What does the algorithms' control flow cost, this tree against another checkout?

Timing-only runs (docs/timing-only.md) of four algorithms with many clients -- ``splitfed_v1``
(first-order clients), ``splitfed_zo``, ``mu_splitfed`` (tau 2, ZO clients, first-order
server) and ``gas`` (diagonal covariances) -- each run in a fresh Python process, alternately
with this tree and with ``--base`` (for example the commit before a change, from
``git worktree add`` or ``git archive``), ``--repeat`` times, and prints the medians side by
side: host seconds of the run (``run_scenario``, start-up included: labels, model, cut
profile, time model), simulated client operations per host second (events.csv rows with a
client) and the ratio base / this. Every run's events.csv, metrics.csv, client_rounds.csv /
gas tables and summary.json (host-time fields aside) are hashed: the two trees must write the
same bytes, or the benchmark fails. Usage:

    python benchmarks/control_flow.py --base /path/to/old/checkout [--clients 1000] [--rounds 3] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Runs in the child, with the tree under test first on sys.path.
CHILD = r'''
import hashlib, json, sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from simulator.runner import run_scenario
from simulator.scenario import validate

raw = json.loads(sys.argv[1])
small = json.loads(json.dumps(raw)); small["data"]["num_clients"] = 10; small["stop"]["rounds"] = 1
if "active_clients" in small["algorithm"]:
    small["algorithm"]["active_clients"] = 5
with tempfile.TemporaryDirectory() as d:
    run_scenario(validate(small), out_dir=Path(d) / "warm")  # imports, dataset file cache
    t0 = time.perf_counter()
    run_scenario(validate(raw), out_dir=Path(d) / "run")
    host = time.perf_counter() - t0
    digest = hashlib.sha256()
    for f in sorted((Path(d) / "run").iterdir()):
        if f.name == "summary.json":
            s = json.loads(f.read_text())
            text = json.dumps({k: v for k, v in s.items() if "host" not in k and "wall" not in k}, sort_keys=True)
            digest.update(text.encode())
        elif f.suffix == ".csv":
            digest.update(f.name.encode() + f.read_bytes())
    with open(Path(d) / "run" / "events.csv") as f:  # spans are streamed there, not kept
        ops = sum(1 for line in f if not line.startswith(",")) - 1  # rows with a client, header aside
    print(json.dumps({"host": host, "ops": ops, "digest": digest.hexdigest()}))
'''


def scenario(algorithm: str, clients: int, rounds: int) -> dict:
    """A timing-only scenario of ``algorithm``: small CNN on Fashion-MNIST, every client in every round."""
    algo = {
        "splitfed_v1": {"name": "splitfed_v1", "local_steps": 2, "participation": 1.0},
        "splitfed_zo": {"name": "splitfed_zo", "local_steps": 2, "participation": 1.0},
        "mu_splitfed": {"name": "mu_splitfed", "local_steps": 2, "participation": 1.0, "tau": 2,
                        "client_optimizer": "zo", "server_optimizer": "fo"},
        "gas": {"name": "gas", "local_steps": 2, "active_clients": max(1, clients // 2), "covariance": "diagonal"},
    }[algorithm]
    return {
        "name": f"control-flow-{algorithm}", "seed": 0, "threads": 1, "timing_only": True,
        "data": {"dataset": "fashion_mnist", "num_clients": clients, "test_limit": 100},
        "model": {"name": "small_cnn", "cut": 1},
        "algorithm": {"batch_size": 32, **algo},
        "time": {"client": {"flops_per_s": 2e9, "tiers": [{"name": "straggler", "share": 0.2, "speed_factor": 0.25}],
                            "delay_s": {"dist": "exponential", "mean": 0.05}},
                 "server": {"flops_per_s": 5e10, "capacity": 2}},
        "eval": {"every_rounds": None},
        "stop": {"rounds": rounds},
    }


def child(tree: Path, raw: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw)], env=env, cwd=tree, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"run in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (the 'before')")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--algorithms", default="splitfed_v1,splitfed_zo,mu_splitfed,gas")
    args = ap.parse_args()
    base = args.base.resolve()
    print(f"timing-only runs, {args.clients} clients, {args.rounds} rounds, small_cnn; medians of {args.repeat}, "
          f"alternated (base = {base})")
    print(f"{'algorithm':<14}{'client ops':>12}{'base s':>9}{'this s':>9}{'base ops/s':>12}{'this ops/s':>12}"
          f"{'speed-up':>10}")
    for algorithm in args.algorithms.split(","):
        raw = scenario(algorithm, args.clients, args.rounds)
        a, b = [], []
        for _ in range(args.repeat):
            a.append(child(base, raw))
            b.append(child(HERE, raw))
        digests = {r["digest"] for r in a + b}
        if len(digests) != 1:
            raise SystemExit(f"{algorithm}: the two trees wrote different outputs ({len(digests)} digests)")
        ops = b[0]["ops"]
        ha, hb = statistics.median(r["host"] for r in a), statistics.median(r["host"] for r in b)
        print(f"{algorithm:<14}{ops:>12,}{ha:>9.2f}{hb:>9.2f}{ops / ha:>12,.0f}{ops / hb:>12,.0f}{ha / hb:>9.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
