"""Analysis of sflsim runs: load them into pandas, time-to-target tables, figures, reports.

Importable from a notebook: ``from analysis import load_runs, time_to_target``. Figures live
in ``analysis.plots`` (functions that take an ``ax``), tables in ``analysis.tables``, the
report of a compare/sweep folder in ``analysis.report``, the best grid point of a sweep on a
validation split in ``analysis.select`` (``select_points``). Nothing here runs simulations.
"""
from analysis.traces import (
    load_events,
    load_runs,
    load_summaries,
    mean_ci,
    mean_curve,
    rounds_to_target,
    time_to_target,
)
from analysis.select import select_points

__all__ = [
    "load_events", "load_runs", "load_summaries", "mean_ci", "mean_curve", "rounds_to_target", "select_points",
    "time_to_target",
]
