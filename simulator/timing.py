"""Timing-only runs: what a run with no tensor work reports where a training run has values.

A timing-only run (``timing_only: true``, ``sflsim run --timing-only``) runs an algorithm's
SimPy processes with its no-op tensor steps (``NoRoundSteps``, ``NoGASSteps``), which ask the
``TimingOnly`` object in ``RunContext.timing`` for evaluations and table values.
``simulator.retime.Replay`` answers them from a finished run instead. This module imports no
torch (docs/timing-only.md).
"""
from __future__ import annotations


class TimingOnly:
    """A run with no tensor work: the algorithms swap their tensor steps for no-op ones.

    What such a run reports where a training run has values: ``evaluate`` (accuracy and loss
    of an evaluation after ``rounds_done`` rounds) and ``row`` (a row of an algorithm table,
    whose loss columns are NaN here). ``simulator.retime.Replay`` answers both from a finished
    run instead.
    """

    has_values = False  # accuracy and losses are NaN (no figure is drawn)

    def evaluate(self, rounds_done: int) -> tuple[float, float]:
        return float("nan"), float("nan")

    def summary_fields(self) -> dict:
        """What summary.json says about how the run was made."""
        return {"timing_only": True}

    def row(self, table: str, row: dict) -> dict:
        return row
