"""Tables over runs: per run, per group (mean and 95% CI over seeds), and paired differences.

Every number is computed from the tidy frames of ``analysis.traces``; the definitions (time
to target = first evaluation at or above it; means over the seeds that reached a target) are
stated in that module and in docs/analysis.md, so a reader can redo them from the CSVs.
Tables come back as DataFrames (numbers, for CSV) and can be formatted for Markdown/HTML.
This module never draws and never reads files.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from analysis.traces import (
    add_labels,
    final_values,
    group_columns,
    mean_ci,
    param_columns,
    rounds_to_target,
    run_columns,
    time_to_target,
)

# final_accuracy: the full test set at each run's end; final_subset_accuracy and best_accuracy:
# the training-time evaluations (the subset), which time and rounds to target are read from too.
BASE_METRICS = ("final_accuracy", "final_subset_accuracy", "best_accuracy", "sim_time_s", "rounds", "bytes_up",
                "bytes_down", "server_busy_fraction")


def target_name(target: float) -> str:
    """The column suffix of a target: 0.8 -> ``0.8``."""
    return f"{target:g}"


def target_metrics(targets: Sequence[float]) -> list[str]:
    """``time_to_<t>`` and ``rounds_to_<t>`` for each target."""
    out = []
    for t in targets:
        out += [f"time_to_{target_name(t)}", f"rounds_to_{target_name(t)}"]
    return out


def per_run_table(runs: pd.DataFrame, targets: Sequence[float] = (),
                  summaries: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per run: final accuracy (full test set), last and best training-time accuracy,
    time, rounds, bytes, server busy fraction and evaluation host seconds (from ``summaries``
    when given) and, per target, time and rounds to reach it (training-time rows; NaN: never)."""
    cols = run_columns(runs)
    table = final_values(runs)
    for t in targets:
        tt = time_to_target(runs, t)[[*cols, "time_to_target"]]
        rt = rounds_to_target(runs, t)[[*cols, "rounds_to_target"]]
        table = table.merge(tt.rename(columns={"time_to_target": f"time_to_{target_name(t)}"}), on=cols, how="left")
        table = table.merge(rt.rename(columns={"rounds_to_target": f"rounds_to_{target_name(t)}"}), on=cols,
                            how="left")
    if summaries is not None and len(summaries):
        key = "run_dir" if "run_dir" in table.columns and "run_dir" in summaries.columns else "run_id"
        extra = [c for c in ("server_busy_fraction", "server_busy_s", "host_runtime_s", "eval_host_s", "eval_data")
                 if c in summaries.columns]
        table = table.merge(summaries[[key, *extra]], on=key, how="left")
    table.attrs["params"] = param_columns(runs)
    return table


def _order_first_seen(df: pd.DataFrame, by: list[str]) -> list[tuple]:
    seen: list[tuple] = []
    for key in df[by].itertuples(index=False, name=None):
        if key not in seen:
            seen.append(key)
    return seen


def _rows_of(df: pd.DataFrame, by: list[str], key: tuple) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for c, v in zip(by, key):
        col = df[c]
        mask &= (col.isna().to_numpy() if pd.isna(v) else (col == v).to_numpy())
    return df[mask]


def summary_table(per_run: pd.DataFrame, targets: Sequence[float] = (), baseline: Optional[str] = None,
                  level: float = 0.95, diverged: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per group (algorithm/variant/grid point): n runs, and for each metric its mean
    and CI half-width over seeds (``<m>_mean``, ``<m>_ci95``).

    Per target also ``reached_<t>`` (runs that reached it; time/rounds means are over those)
    and ``speedup_<t>`` = mean time to target of the baseline / that of the row (>1: faster).
    ``diverged`` (``analysis.traces.load_diverged``): runs that diverged; they are in no mean
    (``per_run`` holds completed runs only), a column ``diverged`` counts them per group, and a
    group whose every run diverged gets a row with n = 0 and no values. When ``per_run`` has
    ``eval_data`` (from the summaries), so does each row: ``test``, ``validation`` (every
    accuracy of the row is a validation accuracy, ``data.validation``), or both joined by ``+``.
    """
    by = group_columns(per_run)
    metrics = [m for m in (*BASE_METRICS, *target_metrics(targets)) if m in per_run.columns]
    keys = _order_first_seen(per_run, by)
    dv = None
    if diverged is not None:
        dv = diverged.reindex(columns=by)
        keys += [k for k in _order_first_seen(dv, by) if _rows_of(per_run, by, k).empty and k not in keys]
    rows = []
    for key in keys:
        g = _rows_of(per_run, by, key)
        row = {**dict(zip(by, key)), "n": len(g)}
        if dv is not None:
            row["diverged"] = len(_rows_of(dv, by, key))
        if "eval_data" in per_run.columns:
            row["eval_data"] = "+".join(sorted(set(g["eval_data"].dropna().astype(str)))) or None
        for m in metrics:
            mean, ci, _ = mean_ci(pd.to_numeric(g[m], errors="coerce"), level)
            row[f"{m}_mean"], row[f"{m}_ci95"] = mean, ci
        for t in targets:
            row[f"reached_{target_name(t)}"] = int(g[f"time_to_{target_name(t)}"].notna().sum())
        rows.append(row)
    table = add_labels(pd.DataFrame(rows), by)
    table = table[["label", *[c for c in table.columns if c != "label"]]]
    if targets and len(table):
        b = resolve_baseline(table, baseline)
        for t in targets:
            col = f"time_to_{target_name(t)}_mean"
            table[f"speedup_{target_name(t)}"] = table.loc[b, col] / table[col]
    table.attrs["baseline"] = table.loc[resolve_baseline(table, baseline), "label"] if len(table) else None
    return table


def resolve_baseline(table: pd.DataFrame, baseline: Optional[str]) -> int:
    """The index of the baseline row: by label, ``algorithm/variant``, or a unique algorithm name.

    None picks the first row. Raises ``UserError`` when nothing (or more than one row) matches.
    """
    from simulator.errors import UserError

    if baseline is None:
        return table.index[0]
    labels = table["label"].astype(str)
    hit = table.index[labels == baseline]
    if len(hit) == 1:
        return hit[0]
    if "algorithm" in table.columns:
        alg = table["algorithm"].astype(str)
        var = table["variant"].fillna("").astype(str) if "variant" in table.columns else pd.Series("", index=table.index)
        alg_var = alg + np.where(var != "", "/" + var, "")
        for candidates in (alg_var, alg):
            hit = table.index[candidates == baseline]
            if len(hit) == 1:
                return hit[0]
            if len(hit) > 1:
                raise UserError(f"--baseline {baseline!r} matches {len(hit)} rows; give one of: {', '.join(labels)}")
    raise UserError(f"--baseline {baseline!r} matches no row; expected one of: {', '.join(labels)}")


def paired_table(per_run: pd.DataFrame, targets: Sequence[float] = (), baseline: Optional[str] = None,
                 level: float = 0.95) -> pd.DataFrame:
    """Paired differences (row - baseline) over the seeds both have, per group and metric.

    Columns: label, baseline, metric, n (pairs where both values exist), mean_diff, ci95
    (half-width, Student t), low, high, p_value (two-sided paired t-test; NaN with n < 2).
    Seeds pair runs because the same seed gives the same straggler realisation.
    """
    from scipy import stats

    by = group_columns(per_run)
    metrics = [m for m in ("final_accuracy", "sim_time_s", *target_metrics(targets)) if m in per_run.columns]
    cols = ["label", "baseline", "metric", "n", "mean_diff", "ci95", "low", "high", "p_value"]
    if "seed" not in per_run.columns or not len(per_run):
        return pd.DataFrame(columns=cols)
    summary = summary_table(per_run, targets, baseline, level)
    b = resolve_baseline(summary, baseline)
    base_key = tuple(summary.loc[b, by])
    base = _rows_of(per_run, by, base_key).set_index("seed")
    rows = []
    for i in summary.index:
        if i == b:
            continue
        other = _rows_of(per_run, by, tuple(summary.loc[i, by])).set_index("seed")
        seeds = [s for s in other.index if s in base.index]
        for m in metrics:
            a = pd.to_numeric(other.loc[seeds, m], errors="coerce") if seeds else pd.Series(dtype=float)
            z = pd.to_numeric(base.loc[seeds, m], errors="coerce") if seeds else pd.Series(dtype=float)
            d = (a - z).dropna()
            mean, ci, n = mean_ci(d, level)
            p = float(stats.ttest_1samp(d, 0.0).pvalue) if n >= 2 and d.std(ddof=1) > 0 else math.nan
            rows.append({"label": summary.loc[i, "label"], "baseline": summary.loc[b, "label"], "metric": m,
                         "n": n, "mean_diff": mean, "ci95": ci, "low": mean - ci if n > 1 else math.nan,
                         "high": mean + ci if n > 1 else math.nan, "p_value": p})
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------------
# Formatting for Markdown and HTML
# --------------------------------------------------------------------------------------------
def _pm(mean: float, ci: float, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None or pd.isna(mean):
        return "—"
    text = f"{mean * scale:.{digits}f}"
    if ci is not None and not pd.isna(ci):
        text += f" ± {ci * scale:.{digits}f}"
    return text


def _time_digits(values: pd.Series) -> int:
    v = pd.to_numeric(values, errors="coerce").abs().dropna()
    if v.empty:
        return 1
    m = float(v.median())
    return 0 if m >= 100 else (1 if m >= 1 else 3)


def format_summary(table: pd.DataFrame, targets: Sequence[float] = ()) -> pd.DataFrame:
    """The summary table as text cells: mean ± 95% CI half-width, accuracies in %, bytes in MB.

    Accuracies measured on a validation split say so: the column reads ``final validation acc.``
    when every row evaluated on validation, and a column ``evaluated on`` names the data of each
    row when the rows differ."""
    out = pd.DataFrame({"run": table["label"], "seeds": table["n"].astype(int)})
    if "diverged" in table.columns and table["diverged"].sum() > 0:  # left out of every mean
        out["diverged"] = table["diverged"].astype(int)

    def col(name: str, metric: str, scale: float, digits: int) -> None:
        if f"{metric}_mean" in table.columns:
            out[name] = [_pm(m, c, scale, digits) for m, c in zip(table[f"{metric}_mean"], table[f"{metric}_ci95"])]

    tdig = _time_digits(table["sim_time_s_mean"]) if "sim_time_s_mean" in table.columns else 1
    data = set(table["eval_data"].dropna()) if "eval_data" in table.columns else set()
    if len(data) > 1:  # never let a validation accuracy pass for a test one: say it per row
        out["evaluated on"] = table["eval_data"].fillna("").tolist()
    col("final validation acc. (%)" if data == {"validation"} else "final acc. (%)", "final_accuracy", 100, 2)
    col("sim. time (s)", "sim_time_s", 1, tdig)
    col("rounds", "rounds", 1, 1)
    for t in targets:
        tn = target_name(t)
        reached, n = table[f"reached_{tn}"], table["n"]
        out[f"time to {100 * t:g}% (s)"] = [
            _pm(m, c, 1, tdig) + ("" if r == k else f" ({r}/{k})")
            for m, c, r, k in zip(table[f"time_to_{tn}_mean"], table[f"time_to_{tn}_ci95"], reached, n)]
        col(f"rounds to {100 * t:g}%", f"rounds_to_{tn}", 1, 1)
        if f"speedup_{tn}" in table.columns:
            out[f"speed-up at {100 * t:g}%"] = ["—" if pd.isna(s) else f"{s:.2f}x" for s in table[f"speedup_{tn}"]]
    col("MB up", "bytes_up", 1e-6, 2)
    col("MB down", "bytes_down", 1e-6, 2)
    col("server busy (%)", "server_busy_fraction", 100, 1)
    return out


def format_paired(table: pd.DataFrame) -> pd.DataFrame:
    """The paired-difference table as text cells (accuracy differences in percentage points)."""
    rows = []
    for r in table.to_dict("records"):
        acc = r["metric"].endswith("accuracy")
        scale, unit = (100, " pp") if acc else (1, " s" if "time" in r["metric"] else "")
        if r["n"] and not pd.isna(r["mean_diff"]):
            text = f"{r['mean_diff'] * scale:+.3g}"
            if not pd.isna(r["ci95"]):
                text += f" ± {r['ci95'] * scale:.3g}"
            text += unit
        else:
            text = "—"
        rows.append({"run": r["label"], "vs": r["baseline"], "metric": r["metric"], "pairs": r["n"],
                     "mean difference (95% CI)": text,
                     "p": "—" if pd.isna(r["p_value"]) else f"{r['p_value']:.3g}"})
    return pd.DataFrame(rows, columns=["run", "vs", "metric", "pairs", "mean difference (95% CI)", "p"])


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (cells as text, pipes escaped)."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False, name=None)]
    return "\n".join([head, sep, *body])


__all__ = [
    "BASE_METRICS", "format_paired", "format_summary", "markdown_table", "paired_table",
    "per_run_table", "resolve_baseline", "summary_table", "target_metrics", "target_name",
]
