"""Every speed figure of the project in one command, as a table of ratios against its target.

Runs each benchmark script of this folder in its own process (so one benchmark's imports and
caches never flatter another's), streams its full output, and collects the ``RESULT`` lines
each prints (``RESULT <name> = <value>  <what it is>``). At the end it prints one table:
figure, value, target, met. Every figure is a ratio measured side by side inside one script
(alternated A/B runs, medians), except where the issue states an absolute target (validate
time, start-up seconds), which is printed with the bare-``import torch`` time beside it.

    python benchmarks/all.py            # quick settings: about 15-25 minutes on 2 idle cores
    python benchmarks/all.py --full     # the settings docs/benchmarks.md was measured with
    python benchmarks/all.py --only zo_cost,timing_only

Exit status 0 whether or not targets are met (this measures, it does not gate); 1 when a
benchmark script failed or printed no RESULT line.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (quick arguments, full arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "engine_overhead": (["--model", "mlp", "--repeat", "5", "--engine-rounds", "10"],
                        ["--model", "mlp", "--repeat", "9", "--engine-rounds", "20"]),
    "timing_only": (["--rounds", "4", "--repeats", "3", "--large-clients", "1000", "--large-rounds", "5"],
                    ["--rounds", "4", "--repeats", "3"]),
    "retime_sweep": (["--rounds", "6", "--repeats", "2"], ["--rounds", "10", "--repeats", "3"]),
    "zo_cost": (["--reps", "5"], ["--reps", "11", "--threads-table"]),
    "eval_share": (["--rounds", "1", "--after-only", "--only", "quickstart", "straggler_scaling", "tau_hybrid_cnn"],
                   ["--rounds", "1"]),
    "startup": (["--repeat", "2", "--only", "validate,runs", "--scenarios", "quickstart,straggler_scaling"],
                ["--repeat", "3"]),
    "checkpoint_cost": (["--only", "tiny_mlp", "quickstart", "gas_quick"], []),
}

# figure name -> (target text, test of the value)
TARGETS: dict[str, tuple[str, object]] = {
    "engine.tiny_mlp_overhead": ("<= 1.15x the bare loop", lambda v: v <= 1.15),
    "engine.us_per_op_ratio": ("<= 0.5 (halved)", lambda v: v <= 0.5),
    "timing_only.speedup_vs_training": ("> 1 (informative)", lambda v: v > 1),
    "timing_only.client_ops_per_s_1000_clients": ("informative", None),
    "timing_only.projected_s_1000_rounds_1000_clients": ("1,000 rounds x 1,000 clients in seconds (< 60 s)",
                                                         lambda v: v < 60),
    "timing_only.peak_rss_ratio_2x_rounds": ("informative: ~1 when memory does not grow with the run", None),
    "retime.sweep8_vs_one_run": ("<= 1.3x", lambda v: v <= 1.3),
    "zo.server_step_vs_2p_forwards_max": ("<= 1.5x", lambda v: v <= 1.5),
    "zo.charged_vs_measured_min": (">= 0.75", lambda v: v >= 0.75),
    "zo.charged_vs_measured_max": ("<= 1.25", lambda v: v <= 1.25),
    "eval.share_max": ("<= 0.10 of host time", lambda v: v <= 0.10),
    "startup.validate_s": ("<= 1 s", lambda v: v <= 1.0),
    "startup.validate_vs_import_torch": ("< 1 (no torch import)", lambda v: v < 1.0),
    "startup.run_startup_cached_s_max": ("<= 5 s", lambda v: v <= 5.0),
    "checkpoint.share_max": ("informative (issue 11)", None),
}

RESULT = re.compile(r"^RESULT\s+(\S+)\s*=\s*([-+0-9.eEinfa]+)\s*(.*)$")


def run_one(name: str, args: list[str]) -> tuple[list[tuple[str, float, str]], int, float]:
    """Run benchmarks/<name>.py, echoing its output; return its RESULT lines, exit code, seconds."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        m = RESULT.match(line.strip())
        if m:
            results.append((m.group(1), float(m.group(2)), m.group(3).strip()))
    rc = proc.wait()
    return results, rc, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the longer settings docs/benchmarks.md was measured with")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    rows, failed = [], []
    for name in names:
        results, rc, secs = run_one(name, BENCHMARKS[name][1 if a.full else 0])
        if rc != 0 or not results:
            failed.append(f"{name} (exit {rc}, {len(results)} RESULT lines)")
        rows += [(name, secs, *r) for r in results]
    print("\n" + "=" * 100)
    print(f"{'figure':44} {'value':>12}  {'target':34} met")
    for name, secs, fig, value, what in rows:
        target, test = TARGETS.get(fig, ("", None))
        met = "" if test is None or math.isnan(value) else ("yes" if test(value) else "NO")
        print(f"{fig:44} {value:>12.4g}  {target:34} {met}")
        if what:
            print(f"{'':44} {'':>12}  ({what})")
    print(f"\n{len(rows)} figures from {len(names)} benchmarks; machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
