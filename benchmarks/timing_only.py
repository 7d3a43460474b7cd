"""How fast is a timing-only run, against a training run of the same scenario?

Runs one scenario (MU-SplitFed, tau 2, ZO clients and a first-order server, small CNN on
Fashion-MNIST: the quickstart's setting, stopped by rounds) alternately as a training run and
as a timing-only run (``timing_only: true``), ``--repeats`` times each, and prints the medians:
host seconds, simulated client operations per host second (client compute and messages:
events.csv rows with a client), and the ratio training / timing-only. Then one large
timing-only run (``--large-clients`` clients, ``--large-rounds`` rounds, every client in every
round, into an output folder as ``sflsim run`` writes one, in a fresh process) and its rate, then
the same with twice the rounds, which gives the host time of a round without the start-up and
projects a 1,000-round run (the issue's "1,000 rounds of 1,000 clients"); the peak memory of the
two shows it does not grow with the run (spans are streamed to events.csv). Whole runs are
timed (start-up and the end-of-run verification included). Usage:

    python benchmarks/timing_only.py [--rounds 4] [--repeats 3] [--large-clients 1000 --large-rounds 20]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from simulator.runner import run_scenario  # noqa: E402
from simulator.scenario import validate  # noqa: E402


def scenario(rounds: int, clients: int, timing_only: bool, participation: float = 0.5, steps: int = 10,
             test_limit: int = 1000):
    return validate({
        "name": "timing-bench", "seed": 0, "threads": 1, "timing_only": timing_only,
        "data": {"dataset": "fashion_mnist", "num_clients": clients, "test_limit": test_limit},
        "model": {"name": "small_cnn", "cut": 1},
        "algorithm": {"name": "mu_splitfed", "batch_size": 32, "participation": participation,
                      "local_steps": steps, "tau": 2, "client_optimizer": "zo", "server_optimizer": "fo",
                      "lr_client": 0.001, "lr_server": 0.1},
        "time": {"client": {"flops_per_s": 2e9, "tiers": [{"name": "straggler", "share": 0.2, "speed_factor": 0.25}],
                            "delay_s": {"dist": "exponential", "mean": 0.05}},
                 "server": {"flops_per_s": 5e10, "capacity": 2}},
        "eval": {"every_rounds": None},
        "stop": {"rounds": rounds},
    })


def timed(s) -> tuple[float, int, float]:
    """(host seconds, client operations, simulated seconds) of one whole run."""
    t0 = time.perf_counter()
    res = run_scenario(s)
    host = time.perf_counter() - t0
    ops = sum(1 for e in res.recorder.events if e.client is not None)
    return host, ops, res.summary["sim_time_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-clients", type=int, default=1000)
    ap.add_argument("--large-rounds", type=int, default=20)
    ap.add_argument("--child", nargs=3, metavar=("ROUNDS", "CLIENTS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(int(args.child[0]), int(args.child[1]), args.child[2])
    torch.set_num_threads(1)

    train, timing = [], []
    timed(scenario(1, args.clients, True))  # warm-up: imports, dataset file cache
    for _ in range(args.repeats):  # alternate A and B so machine load hits both alike
        train.append(timed(scenario(args.rounds, args.clients, False)))
        timing.append(timed(scenario(args.rounds, args.clients, True)))
    assert len({t[1] for t in train + timing}) == 1, "the two modes charged different operations"
    assert len({t[2] for t in train + timing}) == 1, "the two modes ended at different simulated times"
    h_train = statistics.median(t[0] for t in train)
    h_timing = statistics.median(t[0] for t in timing)
    ops = train[0][1]
    print(f"scenario: mu_splitfed tau 2 (ZO clients, FO server), small_cnn, fashion_mnist, {args.clients} clients, "
          f"participation 0.5, 10 local steps, {args.rounds} rounds; {ops} client operations; medians of "
          f"{args.repeats}, alternated")
    print(f"{'mode':<14}{'host s':>10}{'client ops / host s':>22}")
    print(f"{'training':<14}{h_train:>10.3f}{ops / h_train:>22,.0f}")
    print(f"{'timing-only':<14}{h_timing:>10.3f}{ops / h_timing:>22,.0f}")
    print(f"ratio training / timing-only: {h_train / h_timing:.1f}x")
    print(f"RESULT timing_only.speedup_vs_training = {h_train / h_timing:.2f}  host time of training / timing-only, same scenario")

    # The large runs go through an output folder, as `sflsim run --timing-only` does (spans
    # streamed to events.csv, the folder verified at the end), each in a fresh process so that
    # its peak memory is its own.
    with tempfile.TemporaryDirectory() as tmp:
        host, ops, sim, run_rss, rss = large_child(args.large_rounds, args.large_clients, Path(tmp) / "a")
        print(f"large timing-only run: {args.large_clients} clients x {args.large_rounds} rounds (every client, 2 "
              f"local steps, into a folder): {ops:,} client operations, {sim:,.1f} s simulated, {host:.1f} s host, "
              f"{ops / host:,.0f} client ops / host s, peak RSS {run_rss:,.0f} MB before the end-of-run verification, "
              f"{rss:,.0f} MB with it")
        print(f"RESULT timing_only.client_ops_per_s_{args.large_clients}_clients = {ops / host:.0f}  simulated client "
              f"operations per host second, timing-only ({args.large_clients * args.large_rounds / host:,.0f} clients "
              f"x rounds per host second)")
        # The question: how long would 1,000 rounds of these clients take? The same scenario
        # again with twice the rounds gives the cost of a round without the start-up (data, model,
        # profile, per-client draws) and the end-of-run checks: projected = host(R) + (1000 - R) x
        # (host(2R) - host(R)) / R. Peak memory of the two says whether it grows with the run.
        host2, _, _, run_rss2, rss2 = large_child(2 * args.large_rounds, args.large_clients, Path(tmp) / "b")
    per_round = (host2 - host) / args.large_rounds
    projected = host + (1000 - args.large_rounds) * per_round
    print(f"the same with {2 * args.large_rounds} rounds: {host2:.1f} s host, so {per_round:.2f} s per round "
          f"without start-up; 1,000 rounds projected: {projected:,.0f} s ({projected / 60:.1f} min); peak RSS "
          f"{run_rss2:,.0f} MB before the verification (x{run_rss2 / run_rss:.2f} for twice the rounds), {rss2:,.0f} MB "
          f"with it (x{rss2 / rss:.2f}: the checks hold every row)")
    print(f"RESULT timing_only.projected_s_1000_rounds_{args.large_clients}_clients = {projected:.0f}  projected "
          f"host seconds of a 1,000-round timing-only run of {args.large_clients} clients (from runs of "
          f"{args.large_rounds} and {2 * args.large_rounds} rounds)")
    print(f"RESULT timing_only.peak_rss_ratio_2x_rounds = {run_rss2 / run_rss:.3f}  peak memory of the "
          f"{2 * args.large_rounds}-round run / the {args.large_rounds}-round run, before the end-of-run verification "
          f"(1.0: memory does not grow with the run)")


def large_child(rounds: int, clients: int, out: Path) -> tuple[float, int, float, float, float]:
    """(host s, client ops, simulated s, peak RSS MB before the end-of-run verification, peak RSS
    MB) of one large timing-only run into ``out``, in a fresh process (``--child``)."""
    cmd = [sys.executable, __file__, "--child", str(rounds), str(clients), str(out)]
    line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    host, ops, sim, run_rss, rss = line.split()
    return float(host), int(ops), float(sim), float(run_rss), float(rss)


def child(rounds: int, clients: int, out: str) -> None:
    import simulator.runner as runner

    torch.set_num_threads(1)
    s = scenario(rounds, clients, True, participation=1.0, steps=2, test_limit=100)
    verify, before_verify = runner._verify_folder, []

    def measured_verify(*args, **kwargs):  # the run's own peak, before the end-of-run checks read events.csv
        before_verify.append(peak_rss_mb())
        return verify(*args, **kwargs)

    runner._verify_folder = measured_verify
    t0 = time.perf_counter()
    res = run_scenario(s, out)
    host = time.perf_counter() - t0
    with open(Path(out) / "events.csv") as f:
        next(f)
        ops = sum(1 for line in f if not line.startswith(","))  # rows with a client
    print(host, ops, res.summary["sim_time_s"], before_verify[0], peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB: VmHWM on Linux (ru_maxrss would carry the
    parent's peak across fork and exec), else ru_maxrss (kB on Linux, bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


if __name__ == "__main__":
    main()
