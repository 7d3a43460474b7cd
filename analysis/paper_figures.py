"""The reproduction study's own figures and tables (docs/reproduction.md), from a study's report tables.

    python -m analysis.paper_figures runs/paper docs/img

C2: time to a target accuracy against the straggler slowdown, one line per method (variants
named ``<method>-x<factor>`` in ``scenarios/paper/hybrid.yaml``). C3: rounds to a target against
tau at slowdown x1, with the ideal 1/tau speed-up from tau 1 drawn for reference. Both read
``<experiment>/report/tables/summary.csv`` (``sflsim report``), draw mean and 95% CI bars and go
to the image folder. C4 (``scenarios/paper/cut_tau.yaml``): the table of final accuracy over cut
x tau (mean, 95% t-interval, per seed; paired-by-seed differences between taus with t-tests;
simulated time) and the gain of the largest tau over the smallest compared between cuts, read
from ``cut_tau/report/tables/per_run.csv`` and written beside it as ``c4_table.md``. C4's figure
is the report's own ``figures/heatmap_final_accuracy_mean.png``.
"""
from __future__ import annotations

import re
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.plots import new_figure
from analysis.traces import mean_ci

FACTOR = re.compile(r"^(?P<method>.+?)[-/]x(?P<factor>\d+)$")
C4_COLUMNS = ("model.cut", "algorithm.tau", "seed", "final_accuracy", "sim_time_s")


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


def _per_run(batch: Path) -> pd.DataFrame:
    """The C4 columns of ``<batch>/report/tables/per_run.csv``; a missing column or value, a
    repeated (cut, tau, seed) or seeds that differ between the taus of a cut raise ValueError."""
    path = Path(batch) / "report" / "tables" / "per_run.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run `sflsim report {batch}` first")
    df = pd.read_csv(path)
    missing = [c for c in C4_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} (the C4 table needs {', '.join(C4_COLUMNS)})")
    df = df[list(C4_COLUMNS)]
    if df.isna().any(axis=None):
        raise ValueError(f"{path}: values missing in runs\n{df[df.isna().any(axis=1)].to_string(index=False)}")
    repeated = df[df.duplicated(["model.cut", "algorithm.tau", "seed"], keep=False)]
    if len(repeated):
        raise ValueError(f"{path}: more than one run per cut, tau and seed\n{repeated.to_string(index=False)}")
    _check_seeds(df, path)
    return df


def _check_seeds(df: pd.DataFrame, path: Path) -> None:
    """Every tau of a cut has the same seeds (runs are paired by seed)."""
    taus = sorted(df["algorithm.tau"].unique())
    for cut, g in df.groupby("model.cut"):
        seeds = {t: sorted(g.loc[g["algorithm.tau"] == t, "seed"].tolist()) for t in taus}
        if len({tuple(s) for s in seeds.values()}) > 1:
            raise ValueError(f"{path}: cut {cut}: the seeds differ between taus ("
                             + "; ".join(f"tau {t}: {s}" for t, s in seeds.items())
                             + "), so the runs cannot be paired by seed")


def _accuracy(df: pd.DataFrame, cut: int, tau: int) -> pd.DataFrame:
    """Columns seed and value (final accuracy) of the runs of one cell, by seed."""
    cell = df[(df["model.cut"] == cut) & (df["algorithm.tau"] == tau)]
    return cell[["seed", "final_accuracy"]].rename(columns={"final_accuracy": "value"}).sort_values("seed")


def _pair(a: pd.DataFrame, b: pd.DataFrame, what: str) -> pd.DataFrame:
    """Columns seed, a and b: ``a`` and ``b`` (seed, value) merged on seed; a seed in only one
    of them raises ValueError."""
    pairs = a.merge(b, on="seed", how="outer", suffixes=("_a", "_b"), validate="one_to_one", indicator=True)
    alone = pairs[pairs["_merge"] != "both"]
    if len(alone):
        raise ValueError(f"{what}: seeds {sorted(alone['seed'].tolist())} are not on both sides of the pairing")
    return pairs.rename(columns={"value_a": "a", "value_b": "b"})[["seed", "a", "b"]].sort_values("seed")


def _paired_stats(pairs: pd.DataFrame) -> tuple[float, float, float]:
    """Mean of a - b over the pairs, its 95% t-interval half-width, paired t-test p value."""
    mean, ci, _ = mean_ci(pairs["a"] - pairs["b"])
    return mean, ci, float(stats.ttest_rel(pairs["a"], pairs["b"]).pvalue)


def _taus(df: pd.DataFrame) -> list[int]:
    taus = sorted(df["algorithm.tau"].unique().tolist())
    if len(taus) < 2:
        raise ValueError(f"the C4 table compares taus, and there is only tau {taus}")
    return taus


def cut_tau_table(batch: Path) -> pd.DataFrame:
    """One row per cut: for each tau the mean final accuracy, its 95% t-interval half-width and
    the values by seed (``tau<t>_mean``, ``tau<t>_ci95``, ``tau<t>_values``, seeds in ``seeds``);
    paired by seed, largest tau minus smallest and, with more than two taus, minus the second
    largest (``tau<a>-tau<b>_mean``, ``_ci95``, ``_p``: paired t-test); the mean simulated time
    of the cut's runs (``sim_time_s``). The C4 table; ``attrs`` holds ``taus`` and ``pairs``."""
    df = _per_run(batch)
    taus = _taus(df)
    pairs = [(taus[-1], taus[0]), (taus[-1], taus[-2])] if len(taus) > 2 else [(taus[-1], taus[0])]
    rows = []
    for cut, g in df.groupby("model.cut"):
        row = {"cut": cut, "seeds": tuple(sorted(g["seed"].unique().tolist()))}
        for t in taus:
            acc = _accuracy(g, cut, t)
            row[f"tau{t}_mean"], row[f"tau{t}_ci95"], _ = mean_ci(acc["value"])
            row[f"tau{t}_values"] = tuple(acc["value"])
        for a, b in pairs:
            pair = _pair(_accuracy(g, cut, a), _accuracy(g, cut, b), f"cut {cut}, tau {a} vs tau {b}")
            row[f"tau{a}-tau{b}_mean"], row[f"tau{a}-tau{b}_ci95"], row[f"tau{a}-tau{b}_p"] = _paired_stats(pair)
        row["sim_time_s"] = g["sim_time_s"].mean()
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update(taus=taus, pairs=pairs)
    return out


def cut_gain_table(batch: Path) -> pd.DataFrame:
    """The gain of the largest tau over the smallest (final accuracy, by seed) compared between
    every two cuts, paired by seed: rows cut_a, cut_b, mean (gain at a minus gain at b), ci95, p
    (paired t-test). ``attrs`` holds the two taus."""
    df = _per_run(batch)
    taus = _taus(df)
    gains = {}
    hi, lo = taus[-1], taus[0]
    for cut in sorted(df["model.cut"].unique().tolist()):
        pair = _pair(_accuracy(df, cut, hi), _accuracy(df, cut, lo), f"cut {cut}, tau {hi} vs tau {lo}")
        gains[cut] = pair.assign(value=pair["a"] - pair["b"])[["seed", "value"]]
    rows = []
    for a, b in combinations(gains, 2):
        mean, ci, p = _paired_stats(_pair(gains[a], gains[b], f"gain at cut {a} vs cut {b}"))
        rows.append({"cut_a": a, "cut_b": b, "mean": mean, "ci95": ci, "p": p})
    out = pd.DataFrame(rows, columns=["cut_a", "cut_b", "mean", "ci95", "p"])
    out.attrs.update(taus=(hi, lo))
    return out


def _markdown(head: list[str], rows: list[list[str]], right: set[int]) -> str:
    """A Markdown table; the columns in ``right`` right-aligned."""
    sep = "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|"
    return "\n".join(["| " + " | ".join(head) + " |", sep, *("| " + " | ".join(r) + " |" for r in rows)])


def _diff_cell(mean: float, ci: float, p: float) -> str:
    """``+25.4 ± 21.7 pp (p = 0.037)``: an accuracy difference in percentage points (a minus sign,
    as in the docs' tables, when negative), p to 2 significant digits."""
    return f"{mean * 100:+.1f}".replace("-", "−") + f" ± {ci * 100:.1f} pp (p = {p:#.2g})"


def cut_tau_markdown(table: pd.DataFrame) -> str:
    """The C4 table in Markdown, accuracies in %: mean ± 95% CI (per seed), the best tau of each
    cut in bold, the paired differences, the simulated time."""
    taus, pairs = table.attrs["taus"], table.attrs["pairs"]
    head = ["cut", *(f"tau {t}" for t in taus), *(f"tau {a} − tau {b} (paired)" for a, b in pairs), "sim. time (s)"]
    rows = []
    for r in table.to_dict("records"):
        best = max(r[f"tau{t}_mean"] for t in taus)
        cells = []
        for t in taus:
            text = f"{r[f'tau{t}_mean'] * 100:.1f} ± {r[f'tau{t}_ci95'] * 100:.1f}"
            text = f"**{text}**" if np.isclose(r[f"tau{t}_mean"], best) else text
            cells.append(text + " (" + ", ".join(f"{v * 100:.1f}" for v in r[f"tau{t}_values"]) + ")")
        diffs = [_diff_cell(*(r[f"tau{a}-tau{b}_{k}"] for k in ("mean", "ci95", "p"))) for a, b in pairs]
        rows.append([str(r["cut"]), *cells, *diffs, f"{r['sim_time_s']:.0f}"])
    return _markdown(head, rows, right={0, len(head) - 1})


def cut_gain_markdown(table: pd.DataFrame) -> str:
    """The comparison of ``cut_gain_table`` between cuts in Markdown (percentage points)."""
    hi, lo = table.attrs["taus"]
    rows = [[str(r["cut_a"]), str(r["cut_b"]), _diff_cell(r["mean"], r["ci95"], r["p"])]
            for r in table.to_dict("records")]
    head = ["cut a", "cut b", f"gain of tau {hi} over tau {lo}: cut a − cut b (paired)"]
    return _markdown(head, rows, right={0, 1})


def write_cut_tau_tables(batch: Path) -> Path:
    """Both C4 tables, as Markdown, to ``<batch>/report/tables/c4_table.md``."""
    out = Path(batch) / "report" / "tables" / "c4_table.md"
    out.write_text("Final test accuracy (%), mean ± 95% CI (Student t), per seed in brackets; differences "
                   "paired by seed (paired t-test):\n\n" + cut_tau_markdown(cut_tau_table(batch))
                   + "\n\nGain of the largest tau over the smallest, compared between cuts (paired by seed):\n\n"
                   + cut_gain_markdown(cut_gain_table(batch)) + "\n")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    study, img = Path(argv[0]), Path(argv[1])
    img.mkdir(parents=True, exist_ok=True)
    if (study / "hybrid").is_dir():
        print(plot_stragglers(study / "hybrid", 0.75, img / "paper_c2_stragglers.png"))
        print(plot_speedup(study / "hybrid", 0.75, img / "paper_c3_speedup.png"))
    if (study / "cut_tau").is_dir():
        print(write_cut_tau_tables(study / "cut_tau"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
