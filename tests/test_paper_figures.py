"""analysis.paper_figures: the C2/C3 tables and figures read a study's report tables."""
from __future__ import annotations

import pandas as pd

from analysis.paper_figures import plot_speedup, plot_stragglers, straggler_table


def _summary(tmp_path):
    rows = []
    for alg, variant, tau in [("splitfed_zo", "x1", 1), ("splitfed_zo", "x8", 1), ("mu_splitfed", "tau2-x1", 2),
                              ("mu_splitfed", "tau2-x8", 2), ("mu_splitfed", "tau4-x1", 4), ("gas", "zo-x1", 0)]:
        factor = int(variant.rsplit("x", 1)[1])
        rows.append({"algorithm": alg, "variant": variant, "n": 3, "sim_time_s_mean": 100.0 * factor,
                     "time_to_0.75_mean": 50.0 * factor / max(tau, 1), "time_to_0.75_ci95": 5.0,
                     "rounds_to_0.75_mean": 12.0 / max(tau, 1), "rounds_to_0.75_ci95": 1.0, "reached_0.75": 3})
    tables = tmp_path / "hybrid" / "report" / "tables"
    tables.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(tables / "summary.csv", index=False)
    return tmp_path / "hybrid"


def test_straggler_table_reads_method_and_factor(tmp_path):
    t = straggler_table(_summary(tmp_path), 0.75)
    got = {(r["method"], r["factor"]): r["time"] for r in t.to_dict("records")}
    assert got == {("splitfed_zo", 1): 50.0, ("splitfed_zo", 8): 400.0, ("mu_splitfed/tau2", 1): 25.0,
                   ("mu_splitfed/tau2", 8): 200.0, ("mu_splitfed/tau4", 1): 12.5, ("gas/zo", 1): 50.0}


def test_figures_are_written(tmp_path):
    batch = _summary(tmp_path)
    assert plot_stragglers(batch, 0.75, tmp_path / "c2.png").stat().st_size > 1000
    assert plot_speedup(batch, 0.75, tmp_path / "c3.png").stat().st_size > 1000
