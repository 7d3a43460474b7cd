"""analysis.paper_figures: the C2/C3 tables and figures and the C4 tables read a study's report tables."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from analysis.paper_figures import (
    cut_gain_markdown,
    cut_gain_table,
    cut_tau_markdown,
    cut_tau_table,
    main,
    plot_speedup,
    plot_stragglers,
    straggler_table,
)

ROOT = Path(__file__).resolve().parents[1]
T975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (3 seeds), from a t table


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


# C4: final accuracy by (cut, tau) for seeds 3, 7, 11 (not 0..n-1, written in shuffled row order,
# so that pairing by position would give other numbers than pairing by seed).
SEEDS = (3, 7, 11)
ACC = {(1, 1): (0.30, 0.40, 0.50), (1, 2): (0.35, 0.50, 0.50), (1, 4): (0.60, 0.62, 0.64),
       (2, 1): (0.20, 0.30, 0.31), (2, 2): (0.50, 0.45, 0.40), (2, 4): (0.35, 0.40, 0.45)}


def _write_per_run(tmp_path, acc=ACC, seeds=SEEDS, time=lambda cut, tau, seed: 100.0 * cut + tau + seed / 10,
             drop=()) -> Path:
    rows = [{"scenario": "s", "algorithm": "mu_splitfed", "seed": seed, "model.cut": cut, "algorithm.tau": tau,
             "final_accuracy": v, "sim_time_s": time(cut, tau, seed)}
            for (cut, tau), values in acc.items() for seed, v in zip(seeds, values)]
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=1).drop(columns=list(drop))
    batch = tmp_path / "cut_tau"
    (batch / "report" / "tables").mkdir(parents=True)
    df.to_csv(batch / "report" / "tables" / "per_run.csv", index=False)
    return batch


def _half_width(values) -> float:
    """By hand: t(0.975, n - 1) * sample standard deviation / sqrt(n), for n = 3."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return T975_2 * sd / math.sqrt(len(values))


def test_cut_tau_table_means_intervals_and_seed_values(tmp_path):
    t = cut_tau_table(_write_per_run(tmp_path)).set_index("cut")
    assert t.attrs["taus"] == [1, 2, 4] and t.attrs["pairs"] == [(4, 1), (4, 2)]
    for (cut, tau), values in ACC.items():
        assert t.loc[cut, f"tau{tau}_mean"] == pytest.approx(sum(values) / 3)
        assert t.loc[cut, f"tau{tau}_ci95"] == pytest.approx(_half_width(values), rel=1e-9)
        assert t.loc[cut, f"tau{tau}_values"] == pytest.approx(values)
        assert t.loc[cut, "seeds"] == SEEDS
    assert t.loc[1, "tau1_ci95"] == pytest.approx(0.2484, abs=1e-4)  # 4.3027 * 0.1 / sqrt(3)
    assert t.loc[2, "sim_time_s"] == pytest.approx(200 + 7 / 3 + 0.7)  # mean of 100 cut + tau + seed / 10


def test_cut_tau_table_pairs_by_seed(tmp_path):
    t = cut_tau_table(_write_per_run(tmp_path)).set_index("cut")
    for cut in (1, 2):
        for a, b in [(4, 1), (4, 2)]:
            hi, lo = ACC[(cut, a)], ACC[(cut, b)]
            diff = [x - y for x, y in zip(hi, lo)]
            assert t.loc[cut, f"tau{a}-tau{b}_mean"] == pytest.approx(sum(diff) / 3)
            assert t.loc[cut, f"tau{a}-tau{b}_ci95"] == pytest.approx(_half_width(diff), rel=1e-9)
            assert t.loc[cut, f"tau{a}-tau{b}_p"] == pytest.approx(stats.ttest_rel(hi, lo).pvalue, rel=1e-9)
    assert t.loc[1, "tau4-tau1_mean"] == pytest.approx(0.22)  # 0.30, 0.22, 0.14


def test_cut_gain_table_compares_the_tau_gain_between_cuts_by_seed(tmp_path):
    g = cut_gain_table(_write_per_run(tmp_path))
    assert g.attrs["taus"] == (4, 1)
    gain = {cut: [x - y for x, y in zip(ACC[(cut, 4)], ACC[(cut, 1)])] for cut in (1, 2)}
    row = g.iloc[0]
    assert (row["cut_a"], row["cut_b"]) == (1, 2) and len(g) == 1
    assert row["mean"] == pytest.approx(sum(a - b for a, b in zip(gain[1], gain[2])) / 3)
    assert row["ci95"] == pytest.approx(_half_width([a - b for a, b in zip(gain[1], gain[2])]), rel=1e-9)
    assert row["p"] == pytest.approx(stats.ttest_rel(gain[1], gain[2]).pvalue, rel=1e-9)


def test_markdown_bolds_the_best_tau_of_each_cut(tmp_path):
    batch = _write_per_run(tmp_path)
    lines = cut_tau_markdown(cut_tau_table(batch)).splitlines()
    assert lines[0] == ("| cut | tau 1 | tau 2 | tau 4 | tau 4 − tau 1 (paired) | tau 4 − tau 2 (paired) "
                        "| sim. time (s) |")
    assert lines[1] == "|---:|---|---|---|---|---|---:|"
    p41 = f"{stats.ttest_rel(ACC[(1, 4)], ACC[(1, 1)]).pvalue:#.2g}"
    assert lines[2].startswith("| 1 | 40.0 ± 24.8 (30.0, 40.0, 50.0) | 45.0 ± 21.5 (35.0, 50.0, 50.0) | "
                               f"**62.0 ± 5.0** (60.0, 62.0, 64.0) | +22.0 ± 19.9 pp (p = {p41}) | ")
    assert lines[3].count("**") == 2 and "| **45.0 ± 12.4** (50.0, 45.0, 40.0) |" in lines[3]  # tau 2 at cut 2
    assert lines[3].endswith(" | 203 |")
    gain = cut_gain_markdown(cut_gain_table(batch)).splitlines()
    assert gain[0] == "| cut a | cut b | gain of tau 4 over tau 1: cut a − cut b (paired) |"
    p_gain = f"{stats.ttest_rel([0.30, 0.22, 0.14], [0.15, 0.10, 0.14]).pvalue:#.2g}"
    assert gain[2] == f"| 1 | 2 | +9.0 ± 19.7 pp (p = {p_gain}) |"  # gains 30, 22, 14 vs 15, 10, 14 pp


def test_a_negative_difference_has_a_minus_sign(tmp_path):
    acc = {**ACC, (2, 4): (0.10, 0.20, 0.25)}
    lines = cut_tau_markdown(cut_tau_table(_write_per_run(tmp_path, acc=acc))).splitlines()
    assert "| −" in lines[3] and "| -" not in lines[3]


@pytest.mark.parametrize("change, message", [
    (dict(drop=["sim_time_s"]), "no column sim_time_s"),
    (dict(drop=["seed"]), "no column seed"),
    (dict(acc={**ACC, (2, 4): (0.35, 0.40)}), r"cut 2: the seeds differ between taus \(tau 1: \[3, 7, 11\]; "
                                               r"tau 2: \[3, 7, 11\]; tau 4: \[3, 7\]\)"),
    (dict(acc={**ACC, (2, 4): (0.35, 0.40, float("nan"))}), "values missing"),
    (dict(acc={(1, 1): (0.3, 0.4, 0.5)}), "only tau"),
])
def test_cut_tau_table_fails_loudly(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        cut_tau_table(_write_per_run(tmp_path, **change))


def test_repeated_runs_and_seeds_differing_between_cuts_fail(tmp_path):
    batch = _write_per_run(tmp_path)
    path = batch / "report" / "tables" / "per_run.csv"
    df = pd.read_csv(path)
    pd.concat([df, df.iloc[:1]]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="more than one run per cut, tau and seed"):
        cut_tau_table(batch)
    df.loc[df["model.cut"] == 2, "seed"] = df.loc[df["model.cut"] == 2, "seed"].replace(11, 12)
    df.to_csv(path, index=False)
    cut_tau_table(batch)  # within each cut the seeds agree
    with pytest.raises(ValueError, match=r"gain at cut 1 vs cut 2: seeds \[11, 12\] are not on both sides"):
        cut_gain_table(batch)


def test_main_writes_the_c4_tables_beside_the_report(tmp_path, capsys):
    batch = _write_per_run(tmp_path)
    assert main([str(tmp_path), str(tmp_path / "img")]) == 0
    out = batch / "report" / "tables" / "c4_table.md"
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text()
    assert cut_tau_markdown(cut_tau_table(batch)) in text and cut_gain_markdown(cut_gain_table(batch)) in text


# The study's C4 runs (runs/paper/cut_tau, 5 rounds): final accuracy and simulated time (s, to
# 0.1 s) of seeds 0, 1, 2, copied from its report's per_run.csv (runs/ is not in git).
STUDY = {
    (1, 1): ((0.4115, 0.305, 0.22), (164.9, 164.2, 158.8)),
    (1, 2): ((0.462, 0.392, 0.1705), (165.5, 165.2, 159.3)),
    (1, 4): ((0.574, 0.5665, 0.5565), (172.3, 171.6, 167.3)),
    (2, 1): ((0.3915, 0.274, 0.219), (195.5, 194.7, 189.5)),
    (2, 2): ((0.4665, 0.398, 0.143), (195.5, 195.2, 189.8)),
    (2, 4): ((0.5115, 0.5035, 0.471), (197.2, 196.2, 192.5)),
    (3, 1): ((0.376, 0.262, 0.223), (216.6, 215.9, 210.4)),
    (3, 2): ((0.465, 0.375, 0.136), (216.9, 216.2, 210.7)),
    (3, 4): ((0.4365, 0.445, 0.222), (217.0, 216.3, 211.6)),
    (4, 1): ((0.194, 0.1615, 0.156), (473.6, 473.0, 467.5)),
    (4, 2): ((0.4255, 0.1, 0.1085), (473.6, 473.0, 467.5)),
    (4, 4): ((0.4265, 0.1605, 0.1), (473.6, 473.0, 467.5)),
}
STUDY_PER_RUN = ROOT / "runs" / "paper" / "cut_tau" / "report" / "tables" / "per_run.csv"


def _study(tmp_path) -> Path:
    return _write_per_run(tmp_path, acc={k: v[0] for k, v in STUDY.items()}, seeds=(0, 1, 2),
                    time=lambda cut, tau, seed: STUDY[(cut, tau)][1][seed])


def test_study_c4_table_is_the_one_in_reproduction_md(tmp_path):
    batch = _study(tmp_path)
    t = cut_tau_table(batch).set_index("cut")
    assert (round(100 * t.loc[1, "tau4_mean"], 1), round(100 * t.loc[1, "tau4_ci95"], 1)) == (56.6, 2.2)
    assert round(100 * t.loc[1, "tau4-tau1_mean"], 1) == 25.4 and round(t.loc[1, "tau4-tau1_p"], 3) == 0.037
    doc = (ROOT / "docs" / "reproduction.md").read_text()
    table = cut_tau_markdown(cut_tau_table(batch))
    assert table in doc  # header, alignment and every row, character for character
    gain = cut_gain_table(batch).set_index(["cut_a", "cut_b"])
    assert [round(100 * gain.loc[(1, 3), k], 1) for k in ("mean", "ci95")] == [17.3, 35.6]
    assert round(gain.loc[(1, 3), "p"], 2) == 0.17
    assert "cut 1 vs cut 3, paired: +17.3 ± 35.6 pp, p = 0.17 at 5 rounds" in " ".join(doc.split())


@pytest.mark.skipif(not STUDY_PER_RUN.is_file(), reason="the study's runs are not here (runs/ is not in git)")
def test_study_values_above_are_the_study_runs():
    df = pd.read_csv(STUDY_PER_RUN).sort_values(["model.cut", "algorithm.tau", "seed"])
    for (cut, tau), g in df.groupby(["model.cut", "algorithm.tau"]):
        assert tuple(g["seed"]) == (0, 1, 2)
        assert tuple(g["final_accuracy"]) == STUDY[(cut, tau)][0]
        assert tuple(g["sim_time_s"]) == pytest.approx(STUDY[(cut, tau)][1], abs=0.05)
    assert len(df) == len(STUDY) * 3
