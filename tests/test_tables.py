"""analysis.tables: per-run values, means with 95% CIs, speed-ups and paired differences."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.tables import (
    format_summary,
    markdown_table,
    paired_table,
    per_run_table,
    resolve_baseline,
    summary_table,
)
from simulator.errors import UserError
from tests.test_traces import T975, frame

# Time to 0.8: a reaches it at 10, 12, 14 s (seeds 0, 1, 2); b at 5, 7, 8 s.
RUNS = frame([
    ("a", 0, 0.0, 0, 0.1), ("a", 0, 10.0, 5, 0.8), ("a", 0, 20.0, 10, 0.9),
    ("a", 1, 0.0, 0, 0.1), ("a", 1, 12.0, 6, 0.8), ("a", 1, 20.0, 10, 0.85),
    ("a", 2, 0.0, 0, 0.1), ("a", 2, 14.0, 7, 0.8), ("a", 2, 20.0, 10, 0.8),
    ("b", 0, 0.0, 0, 0.1), ("b", 0, 5.0, 2, 0.8), ("b", 0, 20.0, 8, 0.92),
    ("b", 1, 0.0, 0, 0.1), ("b", 1, 7.0, 3, 0.8), ("b", 1, 20.0, 8, 0.88),
    ("b", 2, 0.0, 0, 0.1), ("b", 2, 8.0, 3, 0.81), ("b", 2, 20.0, 8, 0.83),
])


def test_per_run_table_has_final_values_and_targets():
    """One row per run with final accuracy, rounds and time/rounds to each target."""
    t = per_run_table(RUNS, [0.8, 0.95]).set_index("run_id")
    assert t.loc["a-seed1", "final_accuracy"] == 0.85 and t.loc["a-seed1", "rounds"] == 10
    assert t.loc["b-seed2", "time_to_0.8"] == 8.0 and t.loc["b-seed2", "rounds_to_0.8"] == 3
    assert t["time_to_0.95"].isna().all()


def test_summary_table_means_cis_and_speedup():
    """Mean 12 s, CI t(0.975,2) * 2/sqrt(3) for a; b's speed-up against a = 12 / (20/3)."""
    s = summary_table(per_run_table(RUNS, [0.8]), [0.8], baseline="a").set_index("label")
    assert s.loc["a", "n"] == 3 and s.loc["a", "reached_0.8"] == 3
    assert s.loc["a", "time_to_0.8_mean"] == pytest.approx(12.0)
    assert s.loc["a", "time_to_0.8_ci95"] == pytest.approx(T975[2] * 2 / math.sqrt(3), rel=1e-3)
    assert s.loc["b", "time_to_0.8_mean"] == pytest.approx(20 / 3)
    assert s.loc["b", "speedup_0.8"] == pytest.approx(12 / (20 / 3))
    assert s.loc["a", "speedup_0.8"] == 1.0
    assert s.loc["b", "final_accuracy_mean"] == pytest.approx((0.92 + 0.88 + 0.83) / 3)


def test_means_over_runs_that_reached_and_counts_them():
    """A seed that never reaches the target is counted in reached_<t> but not in the mean."""
    runs = RUNS[~((RUNS["run_id"] == "a-seed2") & (RUNS["test_accuracy"] >= 0.8))]
    s = summary_table(per_run_table(runs, [0.8]), [0.8]).set_index("label")
    assert s.loc["a", "reached_0.8"] == 2 and s.loc["a", "time_to_0.8_mean"] == pytest.approx(11.0)
    assert "(2/3)" in format_summary(s.reset_index(), [0.8]).iloc[0]["time to 80% (s)"]


def test_paired_differences_over_shared_seeds():
    """b - a per seed: -5, -5, -6 s -> mean -16/3, half-width t(0.975,2) * sd / sqrt(3)."""
    p = paired_table(per_run_table(RUNS, [0.8]), [0.8], baseline="a")
    row = p[p["metric"] == "time_to_0.8"].iloc[0]
    d = pd.Series([-5.0, -5.0, -6.0])
    assert (row["label"], row["baseline"], row["n"]) == ("b", "a", 3)
    assert row["mean_diff"] == pytest.approx(-16 / 3)
    assert row["ci95"] == pytest.approx(T975[2] * d.std(ddof=1) / math.sqrt(3), rel=1e-3)
    assert 0 < row["p_value"] < 0.01
    assert set(p["metric"]) == {"final_accuracy", "sim_time_s", "time_to_0.8", "rounds_to_0.8"}


def test_paired_uses_only_seeds_both_have():
    """A seed the baseline lacks is not paired."""
    runs = RUNS[RUNS["run_id"] != "a-seed2"]
    p = paired_table(per_run_table(runs, [0.8]), [0.8], baseline="a")
    assert p[p["metric"] == "time_to_0.8"].iloc[0]["n"] == 2


def test_baseline_resolution():
    """Baseline by label or algorithm name; the first row by default; a clear error otherwise."""
    table = pd.DataFrame({"label": ["x/t1", "x/t2", "y"], "algorithm": ["x", "x", "y"], "variant": ["t1", "t2", ""]})
    assert resolve_baseline(table, None) == 0
    assert resolve_baseline(table, "x/t2") == 1 and resolve_baseline(table, "y") == 2
    with pytest.raises(UserError, match="matches 2 rows"):
        resolve_baseline(table, "x")
    with pytest.raises(UserError, match="matches no row"):
        resolve_baseline(table, "z")


def test_markdown_table_escapes_pipes():
    """Markdown tables have a header, a separator and escaped cells."""
    text = markdown_table(pd.DataFrame({"a": ["x|y"], "b": [0.5]}))
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 0.5 |"]
