"""Load run outputs into tidy pandas frames, and the per-run numbers every table is built from.

A run folder holds metrics.csv (one line per evaluation), events.csv (one line per charged
span), summary.json and, when it came from a batch, run.json (its labels: algorithm, variant,
seed, grid point). ``load_runs`` turns run folders and batch folders (compare or sweep output)
into one frame with one row per evaluation. Grid keys become columns named by their dotted key
(``model.cut``); they are listed in ``df.attrs["params"]``.

Conventions, used by tables and figures alike:
- A run is identified by its identity columns (scenario, algorithm, variant, seed, run_id,
  run_dir and the grid keys, where present); a *group* is the same without seed/run_id/run_dir,
  so the seeds of one algorithm/variant/grid point form one group.
- Which evaluations count (``eval_set`` in metrics.csv): a run evaluates during training on a
  fixed subset of the test set (rows ``subset``) and once on the full test set at its end (a
  ``full`` row at the same sim_time_s); with ``eval.subset: null`` every row is ``full``. The
  *curve* of a run is its training-time rows (``curve_rows``): time and rounds to target, best
  accuracy and every curve are read from them. The final accuracy is the last ``full`` row
  (``final_rows``). A metrics.csv without the column (older runs) is all ``full``.
- Time to target is the simulated time of the first evaluation whose test accuracy is >= the
  target; it has the resolution of the evaluation schedule. NaN when never reached.
- Curves over seeds are interpolated linearly between evaluations onto a common grid; after a
  run's last evaluation (it stopped early, e.g. at its target) its last value is held.
- Confidence intervals: 95%, Student t with n-1 degrees of freedom, over seeds.

This module reads files and computes numbers; it never draws and never runs simulations.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from simulator import rundir
from simulator.errors import UserError

METRIC_COLUMNS = ("sim_time_s", "round", "test_accuracy", "test_loss", "bytes_up", "bytes_down", "eval_set",
                  "eval_samples")
LABEL_COLUMNS = ("scenario", "algorithm", "variant", "seed", "run_id", "run_dir")
RUN_ONLY = ("seed", "run_id", "run_dir")  # identity columns that differ between the seeds of a group
DERIVED_PREFIXES = ("time_to_", "rounds_to_", "reached_", "speedup_")  # per-target columns of tables
SUMMARY_FIELDS = ("status", "stop_reason", "final_accuracy", "final_subset_accuracy", "best_accuracy", "sim_time_s",
                  "rounds", "bytes_up", "bytes_down", "server_busy_s", "server_busy_fraction", "host_runtime_s",
                  "eval_host_s", "eval_subset_samples", "eval_test_samples", "threads", "eval_data",
                  "eval_validation_samples")


# --------------------------------------------------------------------------------------------
# Finding and loading runs
# --------------------------------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    """A folder with the outputs of one run (metrics.csv)."""
    return (Path(path) / rundir.METRICS).is_file()


def find_runs(paths: str | Path | Iterable[str | Path], *, complete_only: bool = True,
              listed_only: bool = True) -> list[Path]:
    """Run folders from run folders and batch folders (``DIR/runs/<id>/``), in batch order.

    Unfinished (``.partial``) and failed (``.failed``) runs of a batch are left out; with
    ``complete_only`` so is any run whose summary does not say ``completed``. With
    ``listed_only``, a batch folder with a batch.json gives only the runs it lists (the last
    command's), not folders left over from an earlier command into the same folder.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if is_run_dir(p) and not (p / rundir.BATCH_META).is_file():  # a batch.json makes it a batch folder
            found.append(p)
            continue
        runs = p / rundir.RUNS
        if not runs.is_dir():
            raise UserError(f"{p}: neither a run folder ({rundir.METRICS}) nor a batch folder ({rundir.RUNS}/)")
        batch = rundir.read_json(p / rundir.BATCH_META)
        order = [r.get("run_id") for r in (batch or {}).get("runs", [])]
        dirs = {d.name: d for d in runs.iterdir() if d.is_dir() and is_run_dir(d)
                and not d.name.endswith((rundir.PARTIAL, rundir.FAILED))}
        names = [n for n in order if n in dirs]
        if not (listed_only and batch is not None):
            names += sorted(n for n in dirs if n not in order)
        found.extend(dirs[n] for n in names)
    if complete_only:
        found = [d for d in found if (rundir.read_json(d / rundir.SUMMARY) or {}).get("status") == "completed"]
    return found


def run_labels(run_dir: str | Path) -> dict:
    """Labels of one run: scenario, algorithm, variant, seed, run_id, run_dir, and grid keys."""
    d = Path(run_dir)
    meta = rundir.read_json(d / rundir.RUN_META) or {}
    summary = rundir.read_json(d / rundir.SUMMARY) or {}
    labels = {
        "scenario": summary.get("scenario", ""),
        "algorithm": meta.get("algorithm", summary.get("algorithm", "")),
        "variant": meta.get("variant", "") or "",
        "seed": meta.get("seed", summary.get("seed")),
        "run_id": meta.get("run_id", d.name),
        "run_dir": str(d),
    }
    return {**labels, "params": dict(meta.get("params") or {})}


def _with_labels(frame: pd.DataFrame, labels: dict) -> pd.DataFrame:
    params = labels["params"]
    cols = {k: v for k, v in labels.items() if k != "params"}
    cols.update({k: _cell(v) for k, v in params.items()})
    head = pd.DataFrame({k: [v] * len(frame) for k, v in cols.items()}, index=frame.index)
    return pd.concat([head, frame], axis=1)


def _cell(v):
    """Grid values as frame cells: lists and mappings become their JSON text."""
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def _param_order(labels: list[dict]) -> list[str]:
    keys: list[str] = []
    for lab in labels:
        for k in lab["params"]:
            if k not in keys:
                keys.append(k)
    return keys


def load_runs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per evaluation of every run under ``paths`` (run or batch folders).

    Columns: scenario, algorithm, variant, seed, run_id, run_dir, the grid keys of a sweep,
    then sim_time_s, round, test_accuracy, test_loss, bytes_up, bytes_down, eval_set (``subset``
    or ``full``), eval_samples (empty for a run written before the column existed: all ``full``).
    """
    dirs = find_runs(paths)
    if not dirs:
        diverged = len(load_diverged(paths))
        raise UserError(f"no finished runs under {paths}"
                        + (f" ({diverged} diverged: see their {rundir.SUMMARY})" if diverged else ""))
    labels = [run_labels(d) for d in dirs]
    params = _param_order(labels)
    frames = []
    for d, lab in zip(dirs, labels):
        frames.append(_with_labels(_read_metrics(d), lab))
    df = pd.concat(frames, ignore_index=True)
    df = df[[*LABEL_COLUMNS, *params, *[c for c in df.columns if c not in LABEL_COLUMNS and c not in params]]]
    df.attrs["params"] = params
    return df


def _read_metrics(run_dir: Path) -> pd.DataFrame:
    """metrics.csv of one run; one written before ``eval_set`` existed evaluated the full set every time."""
    m = pd.read_csv(run_dir / rundir.METRICS)
    if "eval_set" not in m.columns:
        m["eval_set"] = "full"
    if "eval_samples" not in m.columns:
        m["eval_samples"] = pd.array([pd.NA] * len(m), dtype="Int64")
    bad = sorted(set(m["eval_set"].astype(str)) - {"subset", "full"})
    if bad:
        raise UserError(f"{run_dir / rundir.METRICS}: eval_set has {', '.join(map(repr, bad))}; expected subset or full")
    return m


def load_summaries(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per run: its labels, grid keys and the scalar fields of summary.json."""
    dirs = find_runs(paths)
    labels = [run_labels(d) for d in dirs]
    params = _param_order(labels)
    rows = []
    for d, lab in zip(dirs, labels):
        s = rundir.read_json(d / rundir.SUMMARY) or {}
        row = {k: v for k, v in lab.items() if k != "params"}
        row.update({k: _cell(lab["params"].get(k)) for k in params})
        row.update({k: s.get(k) for k in SUMMARY_FIELDS})
        row["eval_data"] = s.get("eval_data") or "test"  # a run from before the field evaluated on test
        rows.append(row)
    df = pd.DataFrame(rows, columns=[*LABEL_COLUMNS, *params, *SUMMARY_FIELDS])
    df.attrs["params"] = params
    return df


DIVERGED_FIELDS = ("what", "round", "local_step", "party", "client")


def load_diverged(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per run that diverged (summary ``status: diverged``): its labels, grid keys,
    rounds and sim_time_s done, and where it diverged (``diverged_what``, ``diverged_round``,
    ``diverged_local_step``, ``diverged_party``, ``diverged_client``). These runs are results
    but are left out of ``load_runs`` and so out of every mean; empty frame when there are none."""
    dirs = [d for d in find_runs(paths, complete_only=False)
            if (rundir.read_json(d / rundir.SUMMARY) or {}).get("status") == "diverged"]
    labels = [run_labels(d) for d in dirs]
    params = _param_order(labels)
    cols = [*LABEL_COLUMNS, *params, "rounds", "sim_time_s", *(f"diverged_{k}" for k in DIVERGED_FIELDS)]
    rows = []
    for d, lab in zip(dirs, labels):
        s = rundir.read_json(d / rundir.SUMMARY) or {}
        info = s.get("diverged") or {}
        row = {k: v for k, v in lab.items() if k != "params"}
        row.update({k: _cell(lab["params"].get(k)) for k in params})
        row.update(rounds=s.get("rounds"), sim_time_s=s.get("sim_time_s"))
        row.update({f"diverged_{k}": info.get(k) for k in DIVERGED_FIELDS})
        rows.append(row)
    df = pd.DataFrame(rows, columns=cols)
    df.attrs["params"] = params
    return df


def load_events(run_dir: str | Path) -> pd.DataFrame:
    """The spans of one run (events.csv): client, party, kind, round, seq, start_s, end_s, wait_s, ..."""
    path = Path(run_dir) / rundir.EVENTS
    if not path.is_file():
        raise UserError(f"{run_dir}: no {rundir.EVENTS}")
    return pd.read_csv(path)


def load_scenario(run_dir: str | Path) -> dict:
    """The resolved scenario a run was made from (scenario.yaml), as a mapping."""
    import yaml

    path = Path(run_dir) / rundir.SCENARIO
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------------------------
# Identity and grouping
# --------------------------------------------------------------------------------------------
def param_columns(df: pd.DataFrame) -> list[str]:
    """Grid-key columns: ``df.attrs["params"]`` when set (``load_runs`` sets it), else the
    dotted column names (``model.cut``) that are not derived numbers (``time_to_0.8``)."""
    if "params" in df.attrs:
        return [c for c in df.attrs["params"] if c in df.columns]
    return [c for c in df.columns if "." in str(c) and not str(c).startswith(DERIVED_PREFIXES)]


def run_columns(df: pd.DataFrame) -> list[str]:
    """Columns that identify one run."""
    return [c for c in LABEL_COLUMNS if c in df.columns] + param_columns(df)


def group_columns(df: pd.DataFrame) -> list[str]:
    """Columns that identify a group of runs (a run's columns without seed, run_id and run_dir)."""
    return [c for c in run_columns(df) if c not in RUN_ONLY]


def _group(df: pd.DataFrame, cols: Sequence[str]):
    if not cols:
        return [((), df)]
    return df.groupby(list(cols), sort=False, dropna=False)


def _key_dict(cols: Sequence[str], key) -> dict:
    if not isinstance(key, tuple):
        key = (key,)
    return dict(zip(cols, key))


# --------------------------------------------------------------------------------------------
# Which evaluations: the training-time curve and the final full-set row
# --------------------------------------------------------------------------------------------
def curve_of_run(run: pd.DataFrame) -> pd.DataFrame:
    """The training-time rows of one run: its ``subset`` rows when it has any, else every row."""
    if "eval_set" not in run.columns:
        return run
    sub = run["eval_set"] == "subset"
    return run[sub] if sub.any() else run


def curve_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The training-time evaluations of every run (what curves, time to target and best accuracy
    read): a run's ``subset`` rows when it has any, else all its rows (full set every time)."""
    if "eval_set" not in df.columns or not len(df):
        return df
    cols = run_columns(df)
    sub = df["eval_set"] == "subset"
    has = sub.groupby([df[c] for c in cols], dropna=False, sort=False).transform("any") if cols else sub.any()
    out = df[sub | ~has]
    out.attrs = dict(df.attrs)
    return out


def final_rows(df: pd.DataFrame, only_subset_runs: bool = False) -> pd.DataFrame:
    """Per run, its last evaluation on the full test set (the one at its end); runs without one
    (diverged or interrupted while training on a subset) have no row. ``only_subset_runs``: only
    runs that trained on a subset (elsewhere the final row is the curve's last point)."""
    cols = run_columns(df)
    rows = []
    if only_subset_runs and "eval_set" not in df.columns:
        df = df.iloc[:0]
    for _, g in _group(df, cols):
        g = g.sort_values("sim_time_s", kind="stable")
        if "eval_set" in g.columns:
            if only_subset_runs and not (g["eval_set"] == "subset").any():
                continue
            g = g[g["eval_set"] == "full"]
        if len(g):
            rows.append(g.iloc[-1])
    out = pd.DataFrame(rows, columns=df.columns).reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out


# --------------------------------------------------------------------------------------------
# Per-run numbers
# --------------------------------------------------------------------------------------------
def _first_reaching(df: pd.DataFrame, target: float, column: str, name: str) -> pd.DataFrame:
    cols = run_columns(df)
    if not cols:
        raise ValueError("the frame has no column that identifies a run (run_id, seed, algorithm, ...)")
    rows = []
    for key, g in _group(df, cols):
        g = curve_of_run(g.sort_values(["sim_time_s"], kind="stable"))
        hit = g[g["test_accuracy"] >= target]
        value = float(hit[column].iloc[0]) if len(hit) else math.nan
        rows.append({**_key_dict(cols, key), name: value, "reached": bool(len(hit))})
    out = pd.DataFrame(rows, columns=[*cols, name, "reached"])
    out.attrs["params"] = param_columns(df)
    return out


def time_to_target(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per run: simulated time of the first training-time evaluation with test accuracy >= target
    (NaN: never)."""
    return _first_reaching(df, target, "sim_time_s", "time_to_target")


def rounds_to_target(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per run: the round count at the first training-time evaluation with test accuracy >= target
    (NaN: never)."""
    return _first_reaching(df, target, "round", "rounds_to_target")


def final_values(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: final accuracy and loss (the last full-test-set evaluation; NaN without one),
    the last training-time accuracy (``final_subset_accuracy``, NaN when training evaluated the
    full set), the best training-time accuracy, and the time, rounds and bytes at its end."""
    cols = run_columns(df)
    rows = []
    for key, g in _group(df, cols):
        g = g.sort_values("sim_time_s", kind="stable")
        last, curve = g.iloc[-1], curve_of_run(g)
        full = g[g["eval_set"] == "full"] if "eval_set" in g.columns else g
        subset = "eval_set" in g.columns and bool((g["eval_set"] == "subset").any())
        final = full.iloc[-1] if len(full) else None
        row = {**_key_dict(cols, key),
               "final_accuracy": float(final["test_accuracy"]) if final is not None else math.nan,
               "final_subset_accuracy": float(curve["test_accuracy"].iloc[-1]) if subset else math.nan,
               "best_accuracy": float(curve["test_accuracy"].max()), "sim_time_s": float(last["sim_time_s"])}
        for c in ("round", "bytes_up", "bytes_down"):
            if c in g.columns:
                row["rounds" if c == "round" else c] = last[c]
        if "test_loss" in g.columns:
            row["final_loss"] = float(final["test_loss"]) if final is not None else math.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["params"] = param_columns(df)
    return out


# --------------------------------------------------------------------------------------------
# Statistics over seeds
# --------------------------------------------------------------------------------------------
def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float, int]:
    """Mean, half-width of the ``level`` confidence interval (Student t, n-1 dof), and n.

    NaN values are left out; the half-width is NaN with fewer than two values.
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, 1
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1) * sem), n


def _run_curves(df: pd.DataFrame, x: str, y: str, cols: Sequence[str]):
    """(identity, x values, y values) of each run, sorted by x, rows with NaN left out."""
    for key, g in _group(df, cols):
        g = curve_of_run(g).dropna(subset=[x, y]).sort_values([x, "sim_time_s"] if x != "sim_time_s" else x,
                                                          kind="stable")
        if not g.empty:
            yield _key_dict(cols, key), g[x].to_numpy(float), g[y].to_numpy(float)


def interpolate_runs(df: pd.DataFrame, grid: Sequence[float], x: str = "sim_time_s",
                     y: str = "test_accuracy") -> pd.DataFrame:
    """Each run's ``y`` interpolated linearly onto ``grid`` (values of ``x``), from its
    training-time evaluations (``curve_rows``).

    After a run's last evaluation its last value is held (``active`` is False there), before its
    first one its first value. One row per run and grid point.
    """
    grid = np.asarray(grid, dtype=float)
    cols = run_columns(df)
    parts = []
    for ident, xs, ys in _run_curves(df, x, y, cols):
        part = pd.DataFrame({x: grid, y: np.interp(grid, xs, ys), "active": grid <= xs[-1] + 1e-12})
        for c, v in reversed(list(ident.items())):
            part.insert(0, c, v)
        parts.append(part)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*cols, x, y, "active"])
    out = out[[*cols, x, y, "active"]]
    out.attrs["params"] = param_columns(df)
    return out


def common_grid(df: pd.DataFrame, x: str = "sim_time_s", points: int = 200) -> np.ndarray:
    """A grid over ``x`` from 0 to the largest value of any run, plus every evaluation point
    when there are few of them (rounds), so steps are not smoothed away."""
    values = np.unique(df[x].dropna().to_numpy(float))
    if len(values) == 0:
        return np.zeros(1)
    if len(values) <= points:
        return values
    return np.linspace(min(0.0, values.min()), values.max(), points)


def mean_curve(df: pd.DataFrame, x: str = "sim_time_s", y: str = "test_accuracy",
               grid: Optional[Sequence[float]] = None, by: Optional[Sequence[str]] = None,
               level: float = 0.95) -> pd.DataFrame:
    """Mean and ``level`` CI of ``y`` over the runs of each group, on a common ``x`` grid.

    Runs are interpolated as in ``interpolate_runs`` (linear, last value held). Columns: the
    group columns, x, mean, ci (half-width, Student t as in ``mean_ci``), low, high (mean -/+
    ci), min, max (over the runs), n (runs), n_active (runs that had not yet ended at x).
    """
    from scipy import stats

    by = list(by) if by is not None else group_columns(df)
    grid = common_grid(df, x) if grid is None else np.asarray(grid, dtype=float)
    cols = run_columns(df)
    parts = []
    for key, g in _group(df, by):
        curves = [(np.interp(grid, xs, ys), grid <= xs[-1] + 1e-12) for _, xs, ys in _run_curves(g, x, y, cols)]
        if not curves:
            continue
        values = np.vstack([c[0] for c in curves])
        n = values.shape[0]
        mean = values.mean(axis=0)
        if n > 1:
            ci = stats.t.ppf(0.5 + level / 2, n - 1) * values.std(axis=0, ddof=1) / math.sqrt(n)
            low, high = mean - ci, mean + ci
        else:
            ci, low, high = np.full_like(mean, np.nan), mean, mean
        part = pd.DataFrame({x: grid, "mean": mean, "ci": ci, "low": low, "high": high,
                             "min": values.min(axis=0), "max": values.max(axis=0), "n": n,
                             "n_active": np.vstack([c[1] for c in curves]).sum(axis=0)})
        for c, v in reversed(list(_key_dict(by, key).items())):
            part.insert(0, c, v)
        parts.append(part)
    columns = [*by, x, "mean", "ci", "low", "high", "min", "max", "n", "n_active"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def group_label(row: dict | pd.Series, columns: Sequence[str]) -> str:
    """A short text label of a group from the columns that vary (``splitfed_v1/tau2 model.cut=1``)."""
    row = dict(row)
    head = []
    if "algorithm" in columns and row.get("algorithm") not in (None, ""):
        head.append(str(row["algorithm"]))
    if "variant" in columns and row.get("variant") not in (None, "") and not pd.isna(row.get("variant")):
        head[-1:] = ["/".join([*head[-1:], str(row["variant"])])]
    if "scenario" in columns and row.get("scenario") not in (None, ""):
        head.insert(0, str(row["scenario"]))
    params = [f"{c}={_fmt_param(row.get(c))}" for c in columns if c not in LABEL_COLUMNS]
    text = " ".join(head)
    if params:
        text = (text + " " if text else "") + ",".join(params)
    return text or "all runs"


def _fmt_param(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def varying_columns(df: pd.DataFrame, columns: Optional[Sequence[str]] = None) -> list[str]:
    """The group columns whose value differs between groups (what a label needs to show)."""
    columns = group_columns(df) if columns is None else list(columns)
    out = [c for c in columns if df[c].astype(str).nunique(dropna=False) > 1]
    if "algorithm" in columns and "algorithm" not in out and (not out or "variant" in out):
        out.insert(0, "algorithm")  # a variant label reads "algorithm/variant"; never an empty label
    return out


def add_labels(df: pd.DataFrame, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """``df`` with a ``label`` column naming each row's group by the columns that vary."""
    show = varying_columns(df, columns)
    out = df.copy()
    out["label"] = [group_label(r, show) for r in df[show].to_dict("records")] if show else "all runs"
    out.attrs = dict(df.attrs)
    return out
