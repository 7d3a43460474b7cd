"""Start-up cost of sflsim: validate, a run's set-up (imports, data, model, cut profile), batches.

Every figure is measured in fresh processes, alternating the things compared (A, B, A, B, ...)
and taking medians, and printed as a ratio next to its reference measured in the same loop:

1. ``sflsim validate`` against ``python -c pass`` and a bare ``python -c "import torch"``;
   it also checks that validate imported no torch.
2. A run's start-up per shipped scenario, split into imports (torch, the runner, the
   algorithm), data, model and cut profile, with empty caches (cold: no cut profile, no
   tokenised text) and warm ones (cached: both in ``$SFLSIM_CACHE``); it checks that the cached
   path imports neither torch._dynamo nor sympy (nor matplotlib, which only the figure needs).
   For text scenarios a cached run reads its token ids from the cache and never loads the
   tokenizer, so ``transformers`` is first imported in the model phase. Ratios: start-up / bare
   ``import torch``, cached / cold.
3. A batch (``run_batch`` on a local Dask cluster of 2 spawned workers, what ``sflsim compare``
   does) of short runs: wall time per run, this code against ``--baseline REV`` (the code of a
   git revision, exported with ``git archive``) when given, and against the same batch run in
   one process (``--workers 1``). ``--baseline`` also times validate of that revision.

    python benchmarks/startup.py                       # everything, 3 repeats
    python benchmarks/startup.py --baseline c051211    # + the batch of the code before issue 10
    python benchmarks/startup.py --only validate,runs --repeat 5

Torch runs on 1 thread in every measured process (SFLSIM bench convention).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SCENARIOS = ("quickstart", "mu_splitfed_fmnist", "gas_fmnist", "straggler_scaling")
TEXT_SCENARIOS = ("opt_tiny_smoke", "minilm_tweets")

# One run's set-up, phase by phase, as simulator.runner.build_context does it.
PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
from simulator.runner import build_context  # noqa: F401  (what a run imports)
from simulator.scenario import load_scenario
s = load_scenario(sys.argv[1])
import importlib
from simulator.algorithms import ALGORITHMS
importlib.import_module(ALGORITHMS[s.algorithm.name].builder[0])
t1 = time.perf_counter()
from models.profile import cached_profile_cut, cached_profile_text_cut
from models.split import split
from simulator.data import DATASETS, load_dataset
d, m = s.data, s.model
batch = s.algorithm.batch_size
if DATASETS[d.dataset].kind == "text":
    from models.text import build_text_model, tokenizer_for
    from simulator.data import load_text_dataset
    tok = tokenizer_for(m.name, m.local_path)
    data = load_text_dataset(d.dataset, d.root, tokenizer=tok, max_len=d.max_len, train_limit=d.train_limit,
                             test_limit=d.test_limit, seed=s.seed)
    t2 = time.perf_counter()
    parts = build_text_model(m.name, cut=m.cut, num_classes=data.num_classes, seed=s.seed, config=m.config,
                             local_path=m.local_path)
    t3 = time.perf_counter()
    cached_profile_text_cut(parts, d.max_len, batch, model={"name": m.name, "config": m.config,
                            "local_path": m.local_path, "num_classes": data.num_classes})
else:
    from models.zoo import build_model
    data = load_dataset(d.dataset, d.root, train_limit=d.train_limit, test_limit=d.test_limit, seed=s.seed)
    t2 = time.perf_counter()
    c, h, w = data.input_shape
    parts = split(build_model(m.name, c, data.num_classes, (h, w), seed=s.seed), m.cut)
    t3 = time.perf_counter()
    cached_profile_cut(parts, data.input_shape, batch, model={"name": m.name, "in_channels": c,
                       "num_classes": data.num_classes, "input_hw": [h, w]})
t4 = time.perf_counter()
heavy = [k for k in ("torch._dynamo", "sympy", "matplotlib") if k in sys.modules]
print(json.dumps({"imports": t1 - t0, "data": t2 - t1, "model": t3 - t2, "profile": t4 - t3, "heavy": heavy}))
"""

# A batch of short runs through run_batch (the code under test is whatever `simulator` resolves to).
BATCH = r"""
import json, sys, time
from simulator.experiments import plan_compare, run_batch
t0 = time.perf_counter()
plan = plan_compare(sys.argv[1], algorithms=sys.argv[2].split(","), seeds=sys.argv[3],
                    overrides=json.loads(sys.argv[4]))
res = run_batch(plan, sys.argv[5], workers=int(sys.argv[6]), threads=1, progress=False)
wall = time.perf_counter() - t0
assert all(o["status"] == "completed" for o in res.outcomes), res.outcomes
host = sorted(o["host_s"] for o in res.outcomes)  # each run's own time on its worker (execute_run)
print(json.dumps({"wall": wall, "runs": len(res.outcomes), "host_median": host[len(host) // 2], "host_max": host[-1]}))
"""

# Validate, reporting whether torch was imported (the CLI's own main, in a fresh interpreter).
VALIDATE = r"""
import sys
from simulator.cli import main
code = main(["validate", *sys.argv[1:]])
print("torch imported" if "torch" in sys.modules else "no torch", file=sys.stderr)
sys.exit(code)
"""


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(extra or {})
    return env


def _timed(cmd: list[str], cwd: Path = ROOT, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:4])}...\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return wall, proc


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_validate(repeat: int, baseline: str | None = None) -> None:
    py = sys.executable
    scenario = "scenarios/quickstart.yaml"
    with tempfile.TemporaryDirectory(prefix="sflsim-bench-validate-") as tmp:
        codes = {"sflsim validate": ROOT}
        if baseline:
            codes[f"sflsim validate ({baseline})"] = _export(baseline, Path(tmp))
        times: dict[str, list[float]] = {"python -c pass": [], "python -c 'import torch'": []}
        torch_seen: dict[str, set] = {}
        for _ in range(repeat):
            times["python -c pass"].append(_timed([py, "-c", "pass"])[0])
            times["python -c 'import torch'"].append(_timed([py, "-c", "import torch"])[0])
            for label, code in codes.items():
                wall, proc = _timed([py, "-c", VALIDATE, scenario], cwd=code, env=_env({"PYTHONPATH": str(code)}))
                times.setdefault(label, []).append(wall)
                torch_seen.setdefault(label, set()).add(proc.stderr.strip().splitlines()[-1])
    p, t = _med(times["python -c pass"]), _med(times["python -c 'import torch'"])
    print(f"\n## sflsim validate {scenario} (median of {repeat}, fresh processes)")
    print("| process | seconds | / python -c pass | / import torch | torch |")
    print("|---|---|---|---|---|")
    for name, ws in times.items():
        s = _med(ws)
        seen = ", ".join(sorted(torch_seen.get(name, set()))) or "-"  # reported by the validate processes
        print(f"| {name} | {s:.2f} | {s / p:.1f}x | {s / t:.2f}x | {seen} |")
    v = _med(times["sflsim validate"])
    print(f"RESULT startup.validate_s = {v:.3f}  seconds of `sflsim validate` in a fresh process (python -c pass: {p:.2f} s)")
    print(f"RESULT startup.validate_vs_import_torch = {v / t:.3f}  validate / a bare `import torch` process")


def bench_runs(repeat: int, scenarios: list[str]) -> None:
    py = sys.executable
    rows = []
    for name in scenarios:
        path = ROOT / "scenarios" / f"{name}.yaml"
        cold: list[dict] = []
        warm: list[dict] = []
        bare: list[float] = []
        with tempfile.TemporaryDirectory(prefix="sflsim-bench-cache-") as keep:
            _timed([py, "-c", PHASES, str(path)], env=_env({"SFLSIM_CACHE": keep}))  # fills the kept cache
            for _ in range(repeat):
                bare.append(_timed([py, "-c", "import torch"])[0])
                with tempfile.TemporaryDirectory(prefix="sflsim-bench-cold-") as empty:
                    cold.append(_last_json(_timed([py, "-c", PHASES, str(path)],
                                                  env=_env({"SFLSIM_CACHE": empty}))[1]))
                warm.append(_last_json(_timed([py, "-c", PHASES, str(path)], env=_env({"SFLSIM_CACHE": keep}))[1]))
        rows.append((name, cold, warm, _med(bare)))
    worst_cached: list[tuple[float, float, str]] = []
    print(f"\n## A run's start-up (median of {repeat}; seconds, then start-up / bare `import torch` process)")
    print("| scenario | caches (profile, tokens) | imports | data | model | profile | start-up | / import torch | "
          "cached / cold | dynamo, sympy or matplotlib imported |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, cold, warm, bare in rows:
        totals = {}
        for label, runs in (("cold", cold), ("cached", warm)):
            ph = {k: _med([r[k] for r in runs]) for k in ("imports", "data", "model", "profile")}
            total = _med([sum(r[k] for k in ("imports", "data", "model", "profile")) for r in runs])
            totals[label] = total
            heavy = sorted({m for r in runs for m in r["heavy"]})
            ratio = f"{total / totals['cold']:.2f}" if label == "cached" else ""
            print(f"| {name} | {label} | {ph['imports']:.2f} | {ph['data']:.2f} | {ph['model']:.3f} | "
                  f"{ph['profile']:.3f} | {total:.2f} | {total / bare:.2f}x | {ratio} | {', '.join(heavy) or 'none'} |")
        worst_cached.append((totals["cached"], totals["cached"] / bare, name))
    if worst_cached:
        s, r, name = max(worst_cached)
        print(f"RESULT startup.run_startup_cached_s_max = {s:.3f}  seconds of a run's start-up with warm caches, "
              f"slowest scenario ({name}; {r:.2f}x a bare `import torch` process)")


def _export(rev: str, into: Path) -> Path:
    """The code of git revision ``rev`` in a folder of its own (read-only use of the repository)."""
    dest = into / f"sflsim-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def bench_batch(repeat: int, baseline: str | None, runs: int) -> None:
    py = sys.executable
    scenario = "scenarios/straggler_scaling.yaml"
    # Short runs: one round on a small slice of the data, so the batch measures start-up.
    overrides = ["stop.rounds=1", "data.train_limit=2000", "data.test_limit=200", "algorithm.local_steps=1",
                 "eval.every_rounds=1"]
    algorithms, seeds = "mu_splitfed,splitfed_zo", str(max(1, runs // 2))
    with tempfile.TemporaryDirectory(prefix="sflsim-bench-batch-") as tmp:
        tmp = Path(tmp)
        codes = {"this code": ROOT}
        if baseline:
            codes[f"baseline {baseline}"] = _export(baseline, tmp)
        cache = tmp / "cache"
        _timed([py, "-c", PHASES, str(ROOT / scenario)], env=_env({"SFLSIM_CACHE": str(cache)}))  # warm cache
        walls: dict[tuple[str, int], list[float]] = {}
        hosts: dict[tuple[str, int], list[tuple[float, float]]] = {}
        n_runs = 0
        for i in range(repeat):
            for label, code in codes.items():
                for workers in (2, 1):
                    out = tmp / f"out-{label.replace(' ', '-')}-{i}-{workers}"  # a fresh folder per batch
                    args = [py, "-c", BATCH, str(code / scenario), algorithms, seeds, json.dumps(overrides), str(out),
                            str(workers)]
                    env = _env({"SFLSIM_CACHE": str(cache), "PYTHONPATH": str(code)})
                    res = _last_json(_timed(args, cwd=code, env=env)[1])
                    n_runs = res["runs"]
                    walls.setdefault((label, workers), []).append(res["wall"])
                    hosts.setdefault((label, workers), []).append((res["host_median"], res["host_max"]))
    print(f"\n## A batch of {n_runs} one-round runs (straggler_scaling, train_limit 2000), median of {repeat}")
    ref = _med(walls[("this code", 1)]) / n_runs
    print("| code | execution | batch wall per run (s) | / this code in one process | a run on its worker: "
          "median (s) | slowest (s) |")
    print("|---|---|---|---|---|---|")
    for (label, workers), ws in sorted(walls.items()):
        per = _med(ws) / n_runs
        how = "2 spawned Dask workers" if workers == 2 else "in one process (--workers 1)"
        med_host = _med([h[0] for h in hosts[(label, workers)]])
        max_host = _med([h[1] for h in hosts[(label, workers)]])
        print(f"| {label} | {how} | {per:.2f} | {per / ref:.2f}x | {med_host:.2f} | {max_host:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="validate,runs,batch", help="comma-separated: validate, runs, batch")
    ap.add_argument("--scenarios", default=",".join(IMAGE_SCENARIOS + TEXT_SCENARIOS))
    ap.add_argument("--baseline", default=None, metavar="REV", help="git revision to compare validate and the batch with")
    ap.add_argument("--batch-runs", type=int, default=8)
    args = ap.parse_args()
    only = set(args.only.split(","))
    print(f"sflsim start-up benchmark; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    if "validate" in only:
        bench_validate(args.repeat, args.baseline)
    if "runs" in only:
        bench_runs(args.repeat, [s for s in args.scenarios.split(",") if s])
    if "batch" in only:
        bench_batch(args.repeat, args.baseline, args.batch_runs)


if __name__ == "__main__":
    main()
