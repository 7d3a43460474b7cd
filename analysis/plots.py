"""Figures: functions that draw onto a matplotlib ``ax`` they are given and return it.

No pyplot global state: ``new_figure`` makes a standalone Figure (Agg canvas), so plotting
works the same in a notebook, a script, a test and a Dask worker. Import this module only where
a figure is drawn (the runner does, when it writes the figure): matplotlib costs about a second. The numbers come from
``analysis.traces`` (curves over seeds, per-run values); this module only draws them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from analysis.traces import curve_of_run, add_labels, final_rows, group_columns, mean_curve

FINAL_MARKER = dict(marker="D", ms=7, mec="black", mew=0.8, ls="none")  # the full-test-set point at a run's end
FINAL_LABEL = "end of run, full test set"

# Colours of the timeline, one per activity (Okabe-Ito, readable by colour-blind readers).
ACTIVITY_COLORS = {
    "compute": "#0072B2",    # client compute
    "uplink": "#E69F00",
    "downlink": "#009E73",
    "server": "#D55E00",     # Split Server work for this client
    "queue": "#F0B9A0",      # waiting for a Split Server slot
    "fed": "#CC79A7",        # Fed Server aggregation
    "idle": "#EEEEEE",
}


def new_figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Axes]:
    """A standalone Figure with one Axes on an Agg canvas (not registered with pyplot, so no
    GUI backend is ever imported or selected)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    return fig, ax


def plot_accuracy_vs_time(ax: Axes, metrics: pd.DataFrame, label: Optional[str] = None, **kw) -> Axes:
    """Test accuracy (%) against simulated wall-clock time from one run's metrics.

    The line is the training-time evaluations (the subset, ``eval_set``); when the run trained
    on a subset, its full-test-set evaluation at the end is a separate diamond."""
    df = metrics.sort_values("sim_time_s", kind="stable")
    curve = curve_of_run(df)
    n = _samples(curve)
    line_label = label if n is None or label is None else f"{label} ({n:,}-sample subset)"
    (line,) = ax.plot(curve["sim_time_s"], 100 * curve["test_accuracy"], marker=kw.pop("marker", "."),
                      label=line_label, **kw)
    if "eval_set" in df.columns and (df["eval_set"] == "subset").any():
        full = df[df["eval_set"] == "full"]
        if len(full):
            m = _samples(full)
            ax.plot(full["sim_time_s"], 100 * full["test_accuracy"], color=line.get_color(), **FINAL_MARKER,
                    label=FINAL_LABEL + (f" ({m:,})" if m is not None else ""))
    ax.set_xlabel("simulated wall-clock time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    return ax


def _samples(rows: pd.DataFrame) -> Optional[int]:
    """The one number of test samples of these rows, else None (unknown or mixed)."""
    if "eval_samples" not in rows.columns:
        return None
    v = pd.to_numeric(rows["eval_samples"], errors="coerce").dropna().unique()
    return int(v[0]) if len(v) == 1 else None


def plot_mean_accuracy(ax: Axes, runs: pd.DataFrame, x: str = "sim_time_s", by: Optional[Sequence[str]] = None,
                       band: Optional[str] = "ci", points: int = 300, targets: Sequence[float] = (),
                       legend: bool = True) -> Axes:
    """Mean test accuracy (%) over the seeds of each group against ``x``, with a band.

    Each run is interpolated linearly between its evaluations onto a common grid; a run that
    ended earlier holds its last value. The line is solid while every seed is still running
    and dashed where some have ended (their last value is held). One line per group
    (algorithm/variant/grid point, or ``by``). ``band``: ``"ci"`` (95% CI of the mean,
    Student t, clipped to [0, 100]%), ``"range"`` (min to max over seeds) or None; a band needs
    at least two seeds. Curves are the training-time evaluations (``analysis.traces.curve_rows``);
    for runs that trained on a subset of the test set, a diamond per group marks the mean over
    seeds of the full-test-set accuracy at the runs' end (at the mean of their ends).
    """
    if band not in ("ci", "range", None):
        raise ValueError(f"band must be 'ci', 'range' or None, got {band!r}")
    by = list(by) if by is not None else group_columns(runs)
    grid = None
    if x == "sim_time_s":
        hi = float(runs[x].max()) if len(runs) else 1.0
        grid = np.unique(np.concatenate([np.linspace(0.0, hi, points), runs[x].to_numpy(float)]))
    curves = mean_curve(runs, x=x, grid=grid, by=by)
    labelled = add_labels(curves, by) if by else curves.assign(label="all runs")
    colors = {}
    for i, (label, g) in enumerate(labelled.groupby("label", sort=False)):
        color = f"C{i % 10}"
        colors[tuple(g.iloc[0][c] for c in by)] = color
        xs, mean = g[x].to_numpy(float), 100 * g["mean"].to_numpy(float)
        full = (g["n_active"] == g["n"]).to_numpy()
        last_full = int(np.nonzero(full)[0].max()) if full.any() else 0
        ax.plot(xs[: last_full + 1], mean[: last_full + 1], color=color, lw=1.8, label=label)
        if last_full + 1 < len(xs):
            ax.plot(xs[last_full:], mean[last_full:], color=color, lw=1.2, ls="--")
        if band and int(g["n"].max()) > 1:
            lo, hi = ("low", "high") if band == "ci" else ("min", "max")
            ax.fill_between(xs, np.clip(100 * g[lo].to_numpy(float), 0, 100),
                            np.clip(100 * g[hi].to_numpy(float), 0, 100), color=color, alpha=0.18, lw=0)
    _plot_final_points(ax, runs, x, by, colors)
    for t in targets:
        ax.axhline(100 * t, color="0.4", ls=":", lw=1)
    ax.set_xlabel("simulated wall-clock time (s)" if x == "sim_time_s" else ("rounds" if x == "round" else x))
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    if legend and len(ax.get_legend_handles_labels()[0]):
        ax.legend(loc="best", fontsize="small")
    return ax


def _plot_final_points(ax: Axes, runs: pd.DataFrame, x: str, by: Sequence[str], colors: dict) -> None:
    """Per group, the mean full-test-set accuracy at the end of its runs that trained on a subset."""
    final = final_rows(runs, only_subset_runs=True)
    if final.empty:
        return
    groups = final.groupby(list(by), sort=False, dropna=False) if by else [((), final)]
    first = True
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        color = next((c for k, c in colors.items() if _same_key(k, key)), None)
        if color is None:
            continue
        n = _samples(g)
        ax.plot([float(pd.to_numeric(g[x]).mean())], [100 * float(g["test_accuracy"].mean())], color=color,
                **FINAL_MARKER, label=(FINAL_LABEL + (f" ({n:,})" if n is not None else "")) if first else None)
        first = False


def _same_key(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all((pd.isna(u) and pd.isna(v)) if (pd.isna(u) or pd.isna(v)) else u == v
                                    for u, v in zip(a, b))


def plot_mean_accuracy_vs_time(ax: Axes, runs: pd.DataFrame, **kw) -> Axes:
    """Mean test accuracy over seeds against simulated time, per group, with a 95% CI band."""
    return plot_mean_accuracy(ax, runs, x="sim_time_s", **kw)


def plot_accuracy_vs_rounds(ax: Axes, runs: pd.DataFrame, **kw) -> Axes:
    """Mean test accuracy over seeds against rounds (at the evaluated rounds), with a 95% CI band."""
    return plot_mean_accuracy(ax, runs, x="round", **kw)


def timeline_segments(events: pd.DataFrame, start_s: float = 0.0, end_s: float = np.inf) -> pd.DataFrame:
    """Activity segments per row of a timeline, clipped to [start_s, end_s].

    Rows are ``client <k>`` (its compute, uplink, downlink, the Split Server's work for it and
    its wait for a server slot) and ``server`` (all Split Server jobs and Fed Server work).
    Columns: row, activity, start_s, end_s.
    """
    e = events
    parts = []
    has_client = e["client"].notna()
    kinds = {"client": "compute", "uplink": "uplink", "downlink": "downlink", "server": "server"}
    for party, activity in kinds.items():
        sel = e[(e["party"] == party) & has_client]
        parts.append(pd.DataFrame({"row": sel["client"].astype(int), "activity": activity,
                                   "start_s": sel["start_s"], "end_s": sel["end_s"]}))
    queued = e[(e["party"] == "server") & has_client & (e["wait_s"] > 0)]
    parts.append(pd.DataFrame({"row": queued["client"].astype(int), "activity": "queue",
                               "start_s": queued["start_s"] - queued["wait_s"], "end_s": queued["start_s"]}))
    srv = e[e["party"].isin(["server", "fed"])]
    parts.append(pd.DataFrame({"row": -1, "activity": np.where(srv["party"] == "fed", "fed", "server"),
                               "start_s": srv["start_s"], "end_s": srv["end_s"]}))
    seg = pd.concat(parts, ignore_index=True)
    seg = seg[(seg["end_s"] > start_s) & (seg["start_s"] < end_s)].copy()
    seg["start_s"] = seg["start_s"].clip(lower=start_s)
    seg["end_s"] = seg["end_s"].clip(upper=end_s)
    return seg


def plot_timeline(ax: Axes, events: pd.DataFrame, start_s: Optional[float] = None, end_s: Optional[float] = None,
                  clients: Optional[Sequence[int]] = None, legend: bool = True) -> Axes:
    """A Gantt chart of one run between ``start_s`` and ``end_s`` (default: the whole run).

    One row per client (compute, uplink, downlink, Split Server work for it, waiting for a
    server slot; idle is the grey background) and a ``server`` row on top with every Split
    Server job (overlapping when its capacity is > 1) and the Fed Server's aggregation.
    """
    t0 = float(events["start_s"].min()) if start_s is None else float(start_s)
    t1 = float(events["end_s"].max()) if end_s is None else float(end_s)
    seg = timeline_segments(events, t0, t1)
    ids = sorted(int(c) for c in events["client"].dropna().unique()) if clients is None else list(clients)
    rows = [-1, *ids]
    ypos = {r: len(rows) - 1 - i for i, r in enumerate(rows)}
    h = 0.8
    for r in rows:
        y = ypos[r] - h / 2
        ax.broken_barh([(t0, t1 - t0)], (y, h), facecolors=ACTIVITY_COLORS["idle"], lw=0)
        mine = seg[seg["row"] == r]
        for activity in ("queue", "compute", "uplink", "downlink", "server", "fed"):
            a = mine[mine["activity"] == activity]
            if len(a):
                spans = list(zip(a["start_s"], a["end_s"] - a["start_s"]))
                ax.broken_barh(spans, (y, h), facecolors=ACTIVITY_COLORS[activity], lw=0,
                               alpha=0.75 if r == -1 and activity == "server" else 1.0)
    ax.set_yticks([ypos[r] for r in rows], ["server" if r == -1 else f"client {r}" for r in rows])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(t0, t1)
    ax.set_xlabel("simulated wall-clock time (s)")
    if legend:
        names = {"compute": "client compute", "uplink": "uplink", "downlink": "downlink",
                 "server": "Split Server work", "queue": "waiting for server", "fed": "Fed Server",
                 "idle": "idle"}
        present = set(seg["activity"]) | {"idle"}
        handles = [Patch(facecolor=ACTIVITY_COLORS[k], label=v) for k, v in names.items() if k in present]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    return ax


def busy_integral(events: pd.DataFrame, edges: np.ndarray, party: str = "server") -> np.ndarray:
    """Busy job-seconds of ``party`` spans inside each interval between consecutive ``edges``."""
    e = events[(events["party"] == party) & (events["end_s"] > events["start_s"])]
    if e.empty:
        return np.zeros(len(edges) - 1)
    times = np.concatenate([e["start_s"].to_numpy(float), e["end_s"].to_numpy(float)])
    steps = np.concatenate([np.ones(len(e)), -np.ones(len(e))])
    order = np.argsort(times, kind="stable")
    times, steps = times[order], steps[order]
    level = np.cumsum(steps)  # concurrent jobs right after each time point
    cum = np.concatenate([[0.0], np.cumsum(level[:-1] * np.diff(times))])  # integral up to each point
    at_edges = np.interp(edges, times, cum, left=0.0, right=cum[-1])
    return np.diff(at_edges)


def plot_server_utilisation(ax: Axes, events: pd.DataFrame, capacity: Optional[int] = None,
                            bin_s: Optional[float] = None, end_s: Optional[float] = None,
                            label: Optional[str] = None, **kw) -> Axes:
    """Split Server utilisation over simulated time, averaged over bins of ``bin_s`` seconds.

    With a ``capacity`` (concurrent server jobs) the y axis is the busy share of that capacity
    in %; without one (unlimited server) it is the mean number of concurrent jobs.
    """
    t1 = float(events["end_s"].max()) if end_s is None else float(end_s)
    if bin_s is None:
        bin_s = max(t1 / 100.0, 1e-9)
    edges = np.arange(0.0, t1 + bin_s, bin_s)
    if len(edges) < 2:
        edges = np.array([0.0, max(t1, bin_s)])
    busy = busy_integral(events, edges) / np.diff(edges)
    y = 100 * busy / capacity if capacity else busy
    centers = (edges[:-1] + edges[1:]) / 2
    ax.step(centers, y, where="mid", label=label, **kw)
    ax.set_xlabel("simulated wall-clock time (s)")
    ax.set_ylabel("server busy (%)" if capacity else "server jobs (mean)")
    if capacity:
        ax.set_ylim(0, 105)
    ax.grid(True, alpha=0.3)
    return ax


def plot_target_heatmap(ax: Axes, table: pd.DataFrame, x: str, y: str, value: str,
                        fmt: str = "{:.3g}", cmap: str = "viridis_r", colorbar: bool = True,
                        label: Optional[str] = None) -> Axes:
    """A heatmap of ``value`` over two keys (e.g. time to target over model.cut x algorithm.tau).

    ``table`` has one row per (x, y) cell (e.g. the summary table of a sweep). Cells whose
    value is NaN (target never reached) are blank and marked with a dash.
    """
    pivot = table.pivot_table(index=y, columns=x, values=value, aggfunc="first", dropna=False)
    pivot = pivot.sort_index().sort_index(axis=1)
    data = pivot.to_numpy(dtype=float)
    masked = np.ma.masked_invalid(data)
    im = ax.imshow(masked, cmap=cmap, aspect="auto", origin="lower")
    ax.set_xticks(range(pivot.shape[1]), [_tick(v) for v in pivot.columns])
    ax.set_yticks(range(pivot.shape[0]), [_tick(v) for v in pivot.index])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    finite = data[np.isfinite(data)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            text = "—" if not np.isfinite(v) else fmt.format(v)
            dark = np.isfinite(v) and (v > mid if cmap.endswith("_r") else v < mid)
            ax.text(j, i, text, ha="center", va="center", fontsize="small", color="white" if dark else "black")
    if colorbar and finite.size:
        ax.figure.colorbar(im, ax=ax, label=label or value)
    return ax


def _tick(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)
