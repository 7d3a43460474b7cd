"""How much of a shipped scenario's host time goes into evaluation, before and after ``eval.subset``?

For every shipped scenario file (scenarios/*.yaml, scenarios/grids/*.yaml,
scenarios/studies/*.yaml) it takes one run per algorithm/variant (the first seed and grid
point: the learning rates of the step grids do not change the cost), and runs it twice, side by
side (alternating, ``--repeats`` times, medians):

  before  the full test set at every evaluation, with the evaluation schedule (and test set) the
          file had before ``eval.subset`` existed (``BEFORE`` below);
  after   the file as shipped (a training-time subset, the full test set once at the end).

Each run is short (``--rounds`` rounds, evaluations only at the start and the end) and changes
nothing that sets the cost of a round or of an evaluation. Timers around the runner's
evaluations give: set-up (start to the first evaluation), host seconds per training round, and
per evaluation of each kind. From these the share of host time spent evaluating is projected
onto the run as shipped (its rounds, or its simulated time divided by the simulated time per
round, and its evaluation schedule), which is what ``eval_host_s / host_runtime_s`` of the full
run would say:

    share = E / (setup + rounds * round_s + E),  E = n_eval * eval_s + n_final * final_s

Prints one line per run (evaluations, projected shares before/after, their ratio, and the share
measured in the short run itself) and the largest projected share after. ``--quickstart`` also
times ``make quickstart``'s command (``sflsim compare scenarios/quickstart.yaml --report``, 5
runs) before and after, alternating.

    python benchmarks/eval_share.py [--rounds 3] [--repeats 1] [--only NAME ...] [--quickstart]

Torch threads: 1 for the short runs (the shipped scenarios use 1 or 2); the quickstart command
runs as ``make quickstart`` does (its Dask workers, its threads).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator import runner  # noqa: E402
from simulator.scenario import validate  # noqa: E402

SHIPPED = sorted(ROOT.glob("scenarios/*.yaml")) + sorted(ROOT.glob("scenarios/grids/*.yaml")) + sorted(
    ROOT.glob("scenarios/studies/*.yaml"))

# What each file evaluated before eval.subset: the full test set every time, with these keys as
# they were then (the keys this change re-set; every other key is the file's own).
_OLD = {"eval.subset": None}
BEFORE = {
    "quickstart.yaml": {**_OLD, "eval.every_sim_s": 5, "eval.every_rounds": None},
    "gas_fmnist.yaml": {**_OLD, "eval.every_rounds": 10, "data.test_limit": None},
    "minilm_tweets.yaml": {**_OLD, "eval.every_rounds": 4},
    "mu_splitfed_fmnist.yaml": {**_OLD, "eval.every_rounds": 5, "data.test_limit": None},  # test_limit 2000 now
    "opt_tiny_smoke.yaml": {**_OLD, "eval.every_rounds": 1, "data.test_limit": 500},
    "straggler_scaling.yaml": {**_OLD, "eval.every_rounds": 5},
    "steps_gas.yaml": {**_OLD, "eval.every_rounds": 5},
    "steps_mu_allzo.yaml": {**_OLD, "eval.every_rounds": 5},
    "steps_mu_hybrid.yaml": {**_OLD, "eval.every_rounds": 5},
    "steps_splitfed_v1.yaml": {**_OLD, "eval.every_rounds": 5},
    "steps_splitfed_zo.yaml": {**_OLD, "eval.every_rounds": 5},
    "sweep_tau_cut.yaml": {**_OLD, "eval.every_rounds": 2, "data.test_limit": 2000},
    "allzo_cnn.yaml": {**_OLD, "eval.every_rounds": 10},
    "hybrid_alexnet.yaml": {**_OLD, "eval.every_rounds": 5},
    "tau_hybrid_cnn.yaml": {**_OLD, "eval.every_rounds": 2},
}


def _set(raw: dict, dotted: str, value) -> None:
    node = raw
    *path, leaf = dotted.split(".")
    for k in path:
        node = node.setdefault(k, {})
    node[leaf] = value


def representatives(path: Path) -> list[tuple[str, dict]]:
    """(label, resolved scenario mapping): the first run of each algorithm/variant of a file."""
    from simulator.experiments.plan import plan_compare, plan_sweep
    from simulator.scenario import load_raw

    plan = plan_sweep(path) if "grid" in load_raw(path) else plan_compare(path)
    out, seen = [], set()
    for spec in plan.specs:
        key = (spec.algorithm, spec.variant)
        if key not in seen:
            seen.add(key)
            out.append((spec.algorithm + (f"/{spec.variant}" if spec.variant else ""), copy.deepcopy(spec.scenario)))
    return out


def with_overrides(raw: dict, overrides: dict) -> dict:
    out = copy.deepcopy(raw)
    for k, v in overrides.items():
        _set(out, k, v)
    return out


def short(raw: dict, rounds: int) -> dict:
    """The same run, ``rounds`` rounds long, evaluated only at its start and end."""
    return with_overrides(raw, {"stop.rounds": rounds, "stop.sim_time_s": None, "stop.target_accuracy": None,
                                "eval.every_rounds": None, "eval.every_sim_s": None, "threads": 1})


def timed_run(raw: dict) -> dict:
    """Run in memory; host seconds of set-up, training (per round) and each kind of evaluation."""
    evals: list[tuple[str, float, float]] = []  # (eval_set, start, seconds)
    original = runner._Controller._measure

    def measure(self, which):
        t0 = time.perf_counter()
        row = original(self, which)
        evals.append((which[0], t0, time.perf_counter() - t0))
        return row

    runner._Controller._measure = measure
    try:
        t0 = time.perf_counter()
        result = runner.run_scenario(validate(raw))
    finally:
        runner._Controller._measure = original
    s = result.summary
    end = evals[-1][1] + evals[-1][2]
    setup = evals[0][1] - t0
    eval_s = sum(e[2] for e in evals)
    rounds = max(int(s["rounds"]), 1)
    during = "subset" if any(e[0] == "subset" for e in evals) else "full"
    train_evals = [e[2] for e in evals if e[0] == during]
    final = [e[2] for e in evals if e[0] == "full"] if during == "subset" else []
    return {
        "setup_s": setup, "round_s": (end - t0 - setup - eval_s) / rounds, "sim_per_round": s["sim_time_s"] / rounds,
        "eval_s": statistics.median(train_evals), "final_s": statistics.median(final) if final else 0.0,
        "eval_samples": s["eval_subset_samples"] or s["eval_test_samples"], "test_samples": s["eval_test_samples"],
        "subset": during == "subset", "short_share": s["eval_host_s"] / s["host_runtime_s"],
    }


def evaluations(raw: dict, rounds: float) -> int:
    """Training-time evaluations of the run as shipped: at 0, on its schedule, and at its end."""
    ev, stop = raw["eval"], raw["stop"]
    n, aligned = 1, False
    if ev.get("every_rounds"):
        n += math.floor(rounds / ev["every_rounds"])
        aligned = float(rounds).is_integer() and int(rounds) % ev["every_rounds"] == 0
    if ev.get("every_sim_s") and stop.get("sim_time_s"):
        n += math.floor(stop["sim_time_s"] / ev["every_sim_s"])
        aligned = aligned or (stop["sim_time_s"] / ev["every_sim_s"]).is_integer()
    return n + (0 if aligned else 1)  # the end, unless the schedule already evaluated there


def projected(raw: dict, m: dict) -> dict:
    stop = raw["stop"]
    limits = [stop["rounds"]] if stop.get("rounds") else []
    if stop.get("sim_time_s"):
        limits.append(stop["sim_time_s"] / max(m["sim_per_round"], 1e-12))
    rounds = min(limits)
    n = evaluations(raw, rounds)
    e = n * m["eval_s"] + (m["final_s"] if m["subset"] else 0.0)
    return {"rounds": rounds, "evals": n, "eval_host_s": e, "share": e / (m["setup_s"] + rounds * m["round_s"] + e)}


def bench_runs(paths: list[Path], rounds: int, repeats: int, after_only: bool = False) -> list[dict]:
    rows = []
    for path in paths:
        before = BEFORE.get(path.name)
        if before is None:
            raise SystemExit(f"{path.name}: no BEFORE entry; add the settings it had before eval.subset")
        for label, raw in representatives(path):
            configs = {"before": with_overrides(raw, before), "after": raw}
            got: dict[str, list[dict]] = {"before": [], "after": []}
            for i in range(repeats):
                order = ("before", "after") if i % 2 == 0 else ("after", "before")
                for which in (("after",) if after_only else order):
                    m = timed_run(short(configs[which], rounds))
                    m.update(projected(configs[which], m))
                    got[which].append(m)
            a = _median(got["after"])
            b = _median(got["before"]) if got["before"] else None
            rows.append({"file": path.name, "run": label, "before": b, "after": a})
            print(_line(rows[-1]), flush=True)
    return rows


def _median(ms: list[dict]) -> dict:
    out = dict(ms[0])
    for k in ("setup_s", "round_s", "eval_s", "final_s", "share", "eval_host_s", "short_share"):
        out[k] = statistics.median(m[k] for m in ms)
    return out


HEADER = (f"{'file':<24} {'run':<20} {'rounds':>6} {'evals b/a':>10} {'samples b/a':>15} {'round s':>8} "
          f"{'eval s b/a':>11} {'final s':>7} "
          f"{'eval share before':>17} {'after':>7} {'after/before':>12} {'short-run after':>15}")


def _line(r: dict) -> str:
    a = r["after"]
    b = r["before"] or {"eval_samples": "-", "evals": "-", "eval_s": math.nan, "share": math.nan}
    samples = f"{b['eval_samples']}/{a['eval_samples']}" + ("+1x" + str(a["test_samples"]) if a["subset"] else "")
    return (f"{r['file']:<24} {r['run']:<20} {a['rounds']:>6.0f} {b['evals']:>4}/{a['evals']:<5} {samples:>15} "
            f"{a['round_s']:>8.2f} {b['eval_s']:>5.2f}/{a['eval_s']:<5.2f} {a['final_s']:>7.2f} {100 * b['share']:>16.1f}% {100 * a['share']:>6.1f}% {a['share'] / b['share']:>12.2f} "
            f"{100 * a['short_share']:>14.1f}%")


def bench_quickstart(repeats: int) -> None:
    """``sflsim compare scenarios/quickstart.yaml`` wall time, before and after, alternating."""
    before = [f"--set=eval.{k.split('.', 1)[1]}={'null' if v is None else v}"
              for k, v in BEFORE["quickstart.yaml"].items()]
    times: dict[str, list[float]] = {"before": [], "after": []}
    for i in range(repeats):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for which in order:
            with tempfile.TemporaryDirectory() as d:
                cmd = [sys.executable, "-m", "simulator", "compare", str(ROOT / "scenarios/quickstart.yaml"),
                       "--out", str(Path(d) / "q"), "--report", "--no-progress"] + (before if which == "before" else [])
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
                times[which].append(time.perf_counter() - t0)
                print(f"quickstart {which}: {times[which][-1]:.1f} s", flush=True)
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"quickstart (5 runs): after/before wall time = {a / b:.2f} (before {b:.0f} s, after {a:.0f} s, "
          f"medians of {repeats})")
    print(f"RESULT eval.quickstart_after_vs_before = {a / b:.3f}  wall time of the quickstart command, subset vs full-set evaluation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each short run")
    ap.add_argument("--repeats", type=int, default=1, help="before/after pairs per run (medians)")
    ap.add_argument("--only", nargs="*", default=None, help="file names (or stems) to run, e.g. quickstart")
    ap.add_argument("--quickstart", action="store_true", help="also time `sflsim compare scenarios/quickstart.yaml`")
    ap.add_argument("--no-runs", action="store_true", help="skip the per-scenario table")
    ap.add_argument("--after-only", action="store_true", help="only the shipped settings (no 'before' runs: "
                                                                "saves the full-test-set evaluations of the old ones)")
    args = ap.parse_args()
    paths = [p for p in SHIPPED if args.only is None or p.name in args.only or p.stem in args.only]
    if not args.no_runs:
        print(HEADER)
        rows = bench_runs(paths, args.rounds, args.repeats, args.after_only)
        worst = max(rows, key=lambda r: r["after"]["share"])
        print(f"largest projected evaluation share after: {100 * worst['after']['share']:.1f}% "
              f"({worst['file']} {worst['run']}); before it was up to "
              f"{100 * max((r['before'] or {'share': math.nan})['share'] for r in rows):.1f}%")
        print(f"RESULT eval.share_max = {worst['after']['share']:.4f}  projected evaluation share of host time, "
              f"worst shipped run ({worst['file']} {worst['run']})")
    if args.quickstart:
        bench_quickstart(args.repeats)


if __name__ == "__main__":
    main()
