"""The reproduction study's own figures (docs/reproduction.md), from a study's report tables.

    python -m analysis.paper_figures runs/paper docs/img

C2: time to a target accuracy against the straggler slowdown, one line per method (variants
named ``<method>-x<factor>`` in ``scenarios/paper/hybrid.yaml``). C3: rounds to a target against
tau at slowdown x1, with the ideal 1/tau speed-up from tau 1 drawn for reference. C4: final
accuracy and rounds to a target over cut x tau (``scenarios/paper/cut_tau.yaml``). Each reads
``<experiment>/report/tables/summary.csv`` (``sflsim report``) and draws mean and 95% CI bars.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

from analysis.plots import new_figure

FACTOR = re.compile(r"^(?P<method>.+?)[-/]x(?P<factor>\d+)$")


def _summary(batch: Path) -> pd.DataFrame:
    path = Path(batch) / "report" / "tables" / "summary.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run `sflsim report {batch}` first")
    return pd.read_csv(path)


def straggler_table(batch: Path, target: float) -> pd.DataFrame:
    """Rows: method, factor, time to ``target`` (mean, ci95), seeds that reached it, simulated
    time of the run (mean): the C2 table."""
    df = _summary(batch)
    rows = []
    for r in df.to_dict("records"):
        label = f"{r['algorithm']}/{r['variant']}" if isinstance(r["variant"], str) and r["variant"] else r["algorithm"]
        m = FACTOR.match(label)
        if not m:
            continue
        rows.append({"method": m["method"], "factor": int(m["factor"]),
                     "time": r.get(f"time_to_{target}_mean"), "ci": r.get(f"time_to_{target}_ci95"),
                     "reached": r.get(f"reached_{target}"), "seeds": r["n"], "sim_time_s": r["sim_time_s_mean"]})
    return pd.DataFrame(rows)


def _finish(fig, ax, out: Path, ticks, labels, xlabel: str, ylabel: str, title: str) -> Path:
    """A log2 x axis with the given ticks, the labels, a legend; saved to ``out``."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def plot_stragglers(batch: Path, target: float, out: Path) -> Path:
    t = straggler_table(batch, target)
    fig, ax = new_figure()
    for method, g in t.groupby("method", sort=False):
        if g["factor"].nunique() < 2:
            continue
        g = g.sort_values("factor")
        ax.errorbar(g["factor"], g["time"], yerr=g["ci"], marker="o", capsize=3, label=method)
    return _finish(fig, ax, out, [1, 2, 4, 8], ["x1", "x2", "x4", "x8"], "straggler tier slowed (20% of the clients)",
                   f"simulated time to {100 * target:g}% test accuracy (s)",
                   "C2: time to target vs straggler slowdown (mean, 95% CI, 3 seeds)")


def plot_speedup(batch: Path, target: float, out: Path) -> Path:
    df = _summary(batch)
    pts = []
    for r in df.to_dict("records"):
        v = r["variant"] if isinstance(r["variant"], str) else ""
        if r["algorithm"] == "splitfed_zo" and v == "x1":
            tau = 1
        elif r["algorithm"] == "mu_splitfed" and re.match(r"^tau\d+-x1$", v):
            tau = int(v[3:].split("-")[0])
        else:
            continue
        pts.append((tau, r[f"rounds_to_{target}_mean"], r[f"rounds_to_{target}_ci95"]))
    pts.sort()
    fig, ax = new_figure()
    taus = [p[0] for p in pts]
    ax.errorbar(taus, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label="measured")
    base = pts[0][1]
    ax.plot(taus, [base / t for t in taus], ls="--", color="0.4", label="ideal: rounds(tau 1) / tau")
    return _finish(fig, ax, out, taus, [str(t) for t in taus], "tau (server steps per local iteration)",
                   f"rounds to {100 * target:g}% test accuracy",
                   "C3: rounds to target vs tau (straggler x1, mean, 95% CI, 3 seeds)")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    study, img = Path(argv[0]), Path(argv[1])
    img.mkdir(parents=True, exist_ok=True)
    if (study / "hybrid").is_dir():
        print(plot_stragglers(study / "hybrid", 0.75, img / "paper_c2_stragglers.png"))
        print(plot_speedup(study / "hybrid", 0.75, img / "paper_c3_speedup.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
