"""Figures: functions that draw onto a matplotlib ``ax`` they are given and return it.

No pyplot global state: ``new_figure`` makes a standalone Figure (Agg canvas), so plotting
works the same in a notebook, a script, a test and a Dask worker.
"""
from __future__ import annotations

from typing import Optional

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def new_figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Axes]:
    """A standalone Figure with one Axes (not registered with pyplot)."""
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    return fig, ax


def plot_accuracy_vs_time(ax: Axes, metrics: pd.DataFrame, label: Optional[str] = None, **kw) -> Axes:
    """Test accuracy (%) against simulated wall-clock time from one run's metrics."""
    df = metrics.sort_values("sim_time_s")
    ax.plot(df["sim_time_s"], 100 * df["test_accuracy"], marker=kw.pop("marker", "."), label=label, **kw)
    ax.set_xlabel("simulated wall-clock time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    return ax
