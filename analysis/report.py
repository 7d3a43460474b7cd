"""The report of a compare or sweep folder: figures, tables, report.md and report.html.

``write_report(DIR)`` loads every finished run under ``DIR`` (``analysis.traces``), builds the
tables (``analysis.tables``) and figures (``analysis.plots``) and writes them to ``DIR/report/``:
``figures/*.png``, ``tables/*.csv`` and ``*.md``, ``report.md`` (figures linked) and
``report.html`` (the same content, figures embedded, one self-contained file). Runs that
evaluated on a validation split (``data.validation``) are labelled so wherever an accuracy is
shown, and for a grid of them the best point per algorithm (``analysis.select``) is a section
of the report and ``selection.json``. It never runs a simulation and never changes the runs it
reads.
"""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import plots
from analysis.tables import (
    format_paired,
    format_summary,
    markdown_table,
    paired_table,
    per_run_table,
    summary_table,
    target_name,
)
from analysis.traces import (
    add_labels,
    find_runs,
    group_columns,
    load_diverged,
    load_events,
    load_runs,
    load_scenario,
    load_summaries,
    varying_columns,
)
from simulator import rundir

MAX_TIMELINES = 6
MAX_TIMELINE_CLIENTS = 40
MAX_HEATMAPS = 12


# --------------------------------------------------------------------------------------------
# A tiny document model rendered to Markdown and HTML from the same blocks
# --------------------------------------------------------------------------------------------
@dataclass
class _Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def img(self, path: Path, rel: str, caption: str) -> None:
        self.blocks.append(("img", path, rel, caption))

    def table(self, df: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(("table", df, caption))

    def markdown(self) -> str:
        out: list[str] = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "img":
                out.append(f"![{b[3]}]({b[2]})\n\n*{b[3]}*")
            elif b[0] == "table":
                out.append((f"*{b[2]}*\n\n" if b[2] else "") + markdown_table(b[1]))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out: list[str] = []
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "img":
                data = base64.b64encode(Path(b[1]).read_bytes()).decode()
                out.append(f'<figure><img alt="{html.escape(b[3])}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{_inline(b[3])}</figcaption></figure>")
            elif b[0] == "table":
                cap = f"<caption>{_inline(b[2])}</caption>" if b[2] else ""
                head = "".join(f"<th>{html.escape(str(c))}</th>" for c in b[1].columns)
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(_text(v))}</td>" for v in r) + "</tr>"
                               for r in b[1].itertuples(index=False, name=None))
                out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
                 "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:90%}"
                 "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
                 "td:first-child,th:first-child{text-align:left}caption{caption-side:top;text-align:left;"
                 "font-style:italic;padding:4px 0}img{max-width:100%}figure{margin:1em 0}"
                 "figcaption{font-style:italic;color:#555}code{background:#f4f4f4;padding:0 3px}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def _text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _inline(text: str) -> str:
    """Escape, then render Markdown's inline code and links."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', t)
    return t


# --------------------------------------------------------------------------------------------
# Choices
# --------------------------------------------------------------------------------------------
def default_targets(per_run: pd.DataFrame, scenario_targets: Sequence[float]) -> list[float]:
    """The scenarios' ``stop.target_accuracy`` values plus the highest multiple of 0.05 that
    every run reached (so at least one target is met by all rows)."""
    out = {round(float(t), 6) for t in scenario_targets if t}
    if len(per_run):
        common = math.floor(float(per_run["best_accuracy"].min()) * 20 + 1e-9) / 20
        if common > 0:
            out.add(round(common, 6))
    return sorted(out)


def _timeline_window(events: pd.DataFrame, rounds: int = 2) -> float:
    """End of the first ``rounds`` rounds (or a tenth of the run when there are no rounds)."""
    r = pd.to_numeric(events["round"], errors="coerce")
    early = events[r < rounds]
    if len(early):
        return float(early["end_s"].max())
    return float(events["end_s"].max()) / 10


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")[:80] or "run"


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def write_report(batch_dir: str | Path, targets: Optional[Sequence[float]] = None, baseline: Optional[str] = None,
                 out_dir: Optional[str | Path] = None) -> Path:
    """Write figures, tables, report.md and report.html for a compare/sweep (or run) folder.

    ``targets``: test-accuracy fractions (default: see ``default_targets``); ``baseline``: the
    row speed-ups and paired differences refer to (a label, ``algorithm/variant`` or algorithm
    name; default the first row). Returns the path of report.md.
    """
    src = Path(batch_dir)
    out = Path(out_dir) if out_dir is not None else src / "report"
    fig_dir, tab_dir = out / "figures", out / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):
        old.unlink()

    runs = load_runs(src)
    summaries = load_summaries(src)
    diverged = load_diverged(src)  # results, but in no mean: counted per row and listed
    batch = rundir.read_json(src / rundir.BATCH_META) or {}
    statuses = rundir.read_runs_csv(src / rundir.RUNS_CSV)
    first_dirs = list(dict.fromkeys(runs["run_dir"]))
    scen = [load_scenario(d) for d in first_dirs]
    scen_targets = [((s.get("stop") or {}).get("target_accuracy")) for s in scen]
    per_run = per_run_table(runs, [], summaries)
    chosen = list(targets) if targets else default_targets(per_run, [t for t in scen_targets if t])
    per_run = per_run_table(runs, chosen, summaries)
    summary = summary_table(per_run, chosen, baseline, diverged=diverged)
    data = _eval_data(summaries)  # "test", "validation" or "test or validation"
    paired = paired_table(per_run, chosen, baseline)
    base_label = summary.attrs.get("baseline")

    # tables
    per_run.to_csv(tab_dir / "per_run.csv", index=False)
    summary.to_csv(tab_dir / "summary.csv", index=False)
    paired.to_csv(tab_dir / "paired.csv", index=False)
    (tab_dir / "diverged.csv").unlink(missing_ok=True)
    if len(diverged):
        diverged.to_csv(tab_dir / "diverged.csv", index=False)
    fsum, fpair = format_summary(summary, chosen), format_paired(paired[paired["n"] > 0])
    (tab_dir / "summary.md").write_text(markdown_table(fsum) + "\n")
    (tab_dir / "paired.md").write_text(markdown_table(fpair) + "\n")

    doc = _Doc()
    title = f"Report: {src.resolve().name}"
    doc.h(1, title)
    extra = [d.name for d in find_runs(src, listed_only=False) if str(d) not in set(runs["run_dir"])]
    _describe(doc, batch, statuses, runs, scen[0] if scen else {}, extra, diverged)

    doc.h(2, "Results")
    doc.p(f"Targets: {', '.join(f'{100 * t:g}%' for t in chosen) or 'none'}"
          + ("" if targets else " (chosen automatically: the scenario's stop.target_accuracy, if any, and the "
                                "highest multiple of 5% that every run reached)")
          + f". Baseline for speed-ups and paired differences: `{base_label}`.")
    doc.table(fsum, "Per row: mean ± 95% CI half-width over seeds (Student t). Time and rounds to a target are "
                    "averaged over the seeds that reached it; (k/n) says how many did. Speed-up = baseline's "
                    "mean time to target / the row's. " + _eval_note(runs, data=data))
    if len(diverged):
        doc.p(f"Excluded from means and CIs: {len(diverged)} diverged run(s) ("
              + ", ".join(f"`{r}`" for r in diverged["run_id"]) + "); the column `diverged` counts them per row "
              "and `seeds` the runs averaged.")
    if len(fpair):
        doc.table(fpair, "Paired differences (row − baseline) over shared seeds, which share the straggler "
                         "realisation; accuracy in percentage points, times in simulated seconds, p from a "
                         "two-sided paired t-test.")

    by = group_columns(runs)
    # With two seeds a t interval is 12.7 standard errors wide: show the min-max range instead.
    band = "ci" if int(summary.loc[summary["n"] > 0, "n"].min()) >= 3 else "range"
    band_text = "a 95% CI band (Student t)" if band == "ci" else "a band from the lowest to the highest seed"
    fig, ax = plots.new_figure(7.5, 4.5)
    plots.plot_mean_accuracy_vs_time(ax, runs, targets=chosen, band=band)
    ax.set_ylabel(f"{data} accuracy (%)")
    ax.set_title(f"{data} accuracy vs simulated time (mean over seeds)")
    _save(fig, fig_dir / "accuracy_vs_time.png")
    doc.img(fig_dir / "accuracy_vs_time.png", "figures/accuracy_vs_time.png",
            f"{data.capitalize()} accuracy vs simulated wall-clock time: mean over seeds with {band_text}. Each "
            "seed is interpolated linearly between evaluations; a run that ended earlier holds its last value "
            "(dashed part: some seeds have ended). Dotted: the targets. " + _eval_note(runs, figure=True, data=data))
    fig, ax = plots.new_figure(7.5, 4.5)
    plots.plot_accuracy_vs_rounds(ax, runs, targets=chosen, band=band)
    ax.set_ylabel(f"{data} accuracy (%)")
    ax.set_title(f"{data} accuracy vs rounds (mean over seeds)")
    _save(fig, fig_dir / "accuracy_vs_rounds.png")
    doc.img(fig_dir / "accuracy_vs_rounds.png", "figures/accuracy_vs_rounds.png",
            f"{data.capitalize()} accuracy vs rounds (global iterations) at the evaluated rounds, mean over seeds "
            f"with {band_text}. " + _eval_note(runs, figure=True, data=data))

    _heatmaps(doc, summary, by, chosen, fig_dir, data)
    selection = _selection(doc, src, out, data, runs.attrs.get("params") or [])
    _timelines(doc, runs, by, fig_dir)

    doc.h(2, "Tables")
    doc.ul([
        "[tables/summary.csv](tables/summary.csv): per row, `<metric>_mean` and `<metric>_ci95` (half-width) "
        "for final/best accuracy, simulated time, rounds, bytes up/down, server busy fraction, and "
        "`time_to_<t>`/`rounds_to_<t>`, `reached_<t>`, `speedup_<t>` per target",
        "[tables/paired.csv](tables/paired.csv): paired differences against the baseline",
        "[tables/per_run.csv](tables/per_run.csv): one line per run (the numbers the other tables average)",
    ] + (["[tables/diverged.csv](tables/diverged.csv): the runs that diverged, and where (in no other table's "
          "means)"] if len(diverged) else [])
      + (["[selection.json](selection.json): the best grid point per algorithm on the validation split, and the "
          "`--set` items that pass it to `sflsim compare`"] if selection else []))
    doc.h(2, "Method")
    doc.ul([
        "Which evaluations: during training each run evaluates on a fixed, class-stratified subset of the test "
        "set (`eval.subset`, drawn from the seed alone, so every algorithm with the same seed sees the same "
        "samples); at its end, once on the full test set. Curves, time and rounds to target, best accuracy "
        "and `stop.target_accuracy` use the training-time evaluations; final accuracy is the full-set one "
        "(metrics.csv column `eval_set`). Evaluation takes no simulated time. Runs with `data.validation` "
        "evaluate on samples held out of the training set instead of the test set, which they never read "
        "(`eval_data` in summary.json and in the tables).",
        "Time to target: simulated time of the first evaluation whose test accuracy is at least the target "
        "(resolution: the evaluation schedule). Rounds to target: the round count at that evaluation.",
        "Means and 95% confidence intervals are over seeds, with Student's t (n − 1 degrees of freedom); no "
        "interval with a single seed.",
        "Same seed = same device speeds and the same k-th random delay for every algorithm (common random "
        "numbers), so differences are paired by seed.",
        "Server busy fraction: time during which at least one Split Server job runs, divided by the run's "
        "simulated time.",
    ])
    md = out / "report.md"
    md.write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(title))
    return md


def _eval_data(summaries: pd.DataFrame) -> str:
    """What the runs evaluated on: ``test``, ``validation`` (``data.validation``) or ``test or validation``."""
    seen = set(summaries["eval_data"].dropna()) if "eval_data" in summaries.columns else set()
    if seen == {"validation"}:
        return "validation"
    return "test or validation" if len(seen) > 1 else "test"


def _selection(doc: _Doc, src: Path, out: Path, data: str, params: Sequence[str]) -> bool:
    """For a grid evaluated on validation: the best point per algorithm (``analysis.select``), as a
    section and ``selection.json``; False (and no file) otherwise."""
    from analysis.select import select_points

    (out / "selection.json").unlink(missing_ok=True)
    if data != "validation" or not [k for k in params if k != "algorithm.name"]:
        return False
    sel = select_points(src)
    sel.write(out / "selection.json")
    doc.h(2, "Selection on the validation split")
    doc.p(f"The grid point with the best mean final validation accuracy over its seeds "
          f"({sel.eval_samples or '?'} validation samples held out of the training set), per algorithm. A point "
          "with a diverged, failed or unfinished seed is never selected; ties go to the point planned first "
          "(the grid's order). Pass the choice on with `--set` (`selection.json`, key `set`):")
    doc.ul([f"`{line}`" for line in sel.lines()])
    table = sel.candidates.copy()
    table["final_accuracy"] = [f"{100 * v:.2f}" if pd.notna(v) else "—" for v in table["final_accuracy"]]
    table = table.rename(columns={"final_accuracy": "final validation acc. (%)"})
    table["chosen"] = ["yes" if c else "" for c in table["chosen"]]
    doc.table(table, "Every grid point: mean over the seeds that completed; `excluded` says why a point could not "
                     "be chosen.")
    return True


def _eval_note(runs: pd.DataFrame, figure: bool = False, data: str = "test") -> str:
    """One sentence on which samples the numbers come from (``eval_set``/``eval_samples``): the
    test set, or the validation split (``data``)."""
    if "eval_set" not in runs.columns or not (runs["eval_set"] == "subset").any():
        return f"Every evaluation is on the full {data} set."
    def sizes(rows: pd.DataFrame) -> str:
        v = sorted(int(n) for n in pd.to_numeric(rows["eval_samples"], errors="coerce").dropna().unique())
        return " or ".join(f"{n:,}" for n in v) or "?"
    sub, full = runs[runs["eval_set"] == "subset"], runs[runs["eval_set"] == "full"]
    if figure:
        return (f"Curves: the training-time evaluations on a fixed subset of {sizes(sub)} {data} samples; diamonds: "
                f"the mean full-{data}-set accuracy ({sizes(full)} samples) at the runs' end.")
    return (f"Final accuracy: the full {data} set ({sizes(full)} samples) at each run's end; best accuracy and "
            f"times to target: the training-time evaluations on a fixed subset of {sizes(sub)} {data} samples.")


def _describe(doc: _Doc, batch: dict, statuses: list[dict], runs: pd.DataFrame, scen: dict,
              extra: list[str], diverged: Optional[pd.DataFrame] = None) -> None:
    doc.h(2, "What was run")
    items = []
    if batch:
        items.append(f"Kind: {batch.get('kind')}; source: `{batch.get('source')}`"
                     + (f"; base scenario: `{batch['base']}`" if batch.get("base") else ""))
        if batch.get("algorithms"):
            items.append("Algorithms: " + ", ".join(f"`{a}`" for a in batch["algorithms"]))
        for alg, vs in (batch.get("variants") or {}).items():
            items.append(f"Variants of `{alg}`: " + "; ".join(
                f"`{lab}` ({', '.join(f'{k}={v}' for k, v in kv.items()) or 'as is'})" for lab, kv in vs.items()))
        if batch.get("grid"):
            items.append("Grid: " + "; ".join(f"`{k}` in {v}" for k, v in batch["grid"].items()))
        if batch.get("seeds") is not None:
            items.append(f"Seeds: {', '.join(map(str, batch['seeds']))}")
        if batch.get("set"):
            items.append("Overrides: " + ", ".join(f"`{s}`" for s in batch["set"]))
        ex = batch.get("execution") or {}
        if ex:
            where = f"on the Dask scheduler {ex['scheduler']}" if ex.get("scheduler") else (
                "in one process" if ex.get("in_process") else f"on a local Dask cluster of {ex.get('workers')} workers")
            threads = ex.get("threads_per_run")
            items.append(f"Ran {where}, " + (f"{threads} torch thread(s) per run" if threads
                                             else "each run with its scenario's torch threads"))
        dropped: dict[str, set] = {}
        for r in batch.get("runs", []):
            dropped.setdefault(r["algorithm"], set()).update(r.get("dropped_keys", []))
        for alg, keys in dropped.items():
            if keys:
                items.append(f"`{alg}` does not take " + ", ".join(f"`{k}`" for k in sorted(keys))
                             + " from the base scenario: not carried over")
    if scen:
        d, m, st = scen.get("data") or {}, scen.get("model") or {}, scen.get("stop") or {}
        stop = ", ".join(f"{k}={v}" for k, v in st.items() if v is not None)
        items.append(f"Scenario `{scen.get('name')}`: {d.get('dataset')}, {d.get('num_clients')} clients "
                     f"({d.get('partition')}), model {m.get('name')} cut {m.get('cut')}; stop: {stop}")
    counts: dict[str, int] = {}
    for r in statuses:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    n_loaded = runs["run_dir"].nunique()
    n_div = 0 if diverged is None else len(diverged)
    items.append(f"Runs in this report: {n_loaded}" + (f" completed, and {n_div} diverged (left out of means)"
                                                        if n_div else "") + (
        " (" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" in {rundir.RUNS_CSV})" if counts else ""))
    if extra:
        items.append(f"{len(extra)} other finished run folder(s) in {rundir.RUNS}/ are not in {rundir.BATCH_META} "
                     f"(left over from an earlier command) and are left out, e.g. `{extra[0]}`")
    doc.ul(items)
    if n_div:
        doc.p("Runs that diverged (a loss or parameter became NaN or inf; the run stopped there): results, "
              "but left out of every mean, CI and figure:")
        doc.table(pd.DataFrame({
            "run": diverged["run_id"], "what": diverged["diverged_what"], "round": diverged["diverged_round"],
            "local step": diverged["diverged_local_step"], "party": diverged["diverged_party"],
            "client": diverged["diverged_client"]}))
    bad = [r for r in statuses if r["status"] not in ("completed", "reused", "diverged")]
    if bad:
        doc.p("Runs left out (not finished):")
        doc.table(pd.DataFrame([{"run": r["run_id"], "status": r["status"], "error": r.get("error", "")}
                                for r in bad]))


def _heatmaps(doc: _Doc, summary: pd.DataFrame, by: list[str], targets: Sequence[float], fig_dir: Path,
              data: str = "test") -> None:
    """For sweeps over two or more keys: values over the first two varying keys."""
    keys = [c for c in varying_columns(summary, by) if c not in ("scenario", "variant")]
    keys = [k for k in keys if summary[k].nunique() > 1]
    if len(keys) < 2:
        return
    x, y, rest = keys[1], keys[0], keys[2:]
    doc.h(2, "Over the grid")
    panels = [("final_accuracy_mean", f"mean final {data} accuracy", "{:.3f}", "viridis")]
    for t in targets:
        tn = target_name(t)
        panels.append((f"time_to_{tn}_mean", f"mean time to {100 * t:g}% (s)", "{:.3g}", "viridis_r"))
        panels.append((f"rounds_to_{tn}_mean", f"mean rounds to {100 * t:g}%", "{:.3g}", "viridis_r"))
    combos = [()] if not rest else list(summary[rest].drop_duplicates().itertuples(index=False, name=None))
    made = 0
    for combo in combos:
        sub = summary
        for k, v in zip(rest, combo):
            sub = sub[sub[k] == v]
        suffix = ", ".join(f"{k}={v}" for k, v in zip(rest, combo))
        for col, what, fmt, cmap in panels:
            if made >= MAX_HEATMAPS:
                return
            if col not in sub.columns:
                continue
            fig, ax = plots.new_figure(5.5, 4.2)
            plots.plot_target_heatmap(ax, sub, x, y, col, fmt=fmt, cmap=cmap, label=what)
            ax.set_title(what + (f" ({suffix})" if suffix else ""), fontsize="medium")
            name = f"heatmap_{_slug(col)}{'_' + _slug(suffix) if suffix else ''}.png"
            _save(fig, fig_dir / name)
            doc.img(fig_dir / name, f"figures/{name}",
                    f"{what.capitalize()} over {y} x {x}" + (f" ({suffix})" if suffix else "")
                    + "; a dash: no seed reached the target (or every seed diverged).")
            made += 1


def _timelines(doc: _Doc, runs: pd.DataFrame, by: list[str], fig_dir: Path) -> None:
    """A Gantt chart of the first seed of each row (same window for all) and server utilisation."""
    firsts = runs.drop_duplicates("run_dir")
    firsts = add_labels(firsts, by).drop_duplicates("label").head(MAX_TIMELINES)
    if firsts.empty:
        return
    events = {r: load_events(r) for r in firsts["run_dir"]}
    events = {r: e for r, e in events.items() if len(e)}
    if not events:
        return
    window = max(_timeline_window(e) for e in events.values())
    doc.h(2, "Where the time goes")
    doc.p(f"One run per row (its first seed), from 0 to {window:.3g} s of simulated time (the first two rounds of "
          "the slowest): client compute, uplink, downlink, the Split Server's work for each client and the wait "
          "for a server slot; the grey background is idle time.")
    for row in firsts.to_dict("records"):
        e = events.get(row["run_dir"])
        if e is None:
            continue
        # Every client, also those that never took part in the window (participation < 1).
        k = (load_scenario(row["run_dir"]).get("data") or {}).get("num_clients")
        clients = list(range(k)) if isinstance(k, int) and k <= MAX_TIMELINE_CLIENTS else None
        n_rows = len(clients) if clients is not None else e["client"].dropna().nunique()
        fig, ax = plots.new_figure(8.0, 1.2 + 0.32 * (n_rows + 1))
        plots.plot_timeline(ax, e, 0.0, window, clients=clients)
        ax.set_title(f"{row['label']} (seed {row['seed']})", fontsize="medium")
        name = f"timeline_{_slug(str(row['label']))}.png"
        _save(fig, fig_dir / name)
        doc.img(fig_dir / name, f"figures/{name}", f"Timeline of {row['label']}, seed {row['seed']}")
    n = len(events)
    fig = Figure(figsize=(7.5, 1.0 + 1.6 * n))
    axes = np.atleast_1d(fig.subplots(n, 1, sharex=True))
    horizon = max(float(e["end_s"].max()) for e in events.values())
    for ax, row in zip(axes, [r for r in firsts.to_dict("records") if r["run_dir"] in events]):
        cap = ((load_scenario(row["run_dir"]).get("time") or {}).get("server") or {}).get("capacity")
        plots.plot_server_utilisation(ax, events[row["run_dir"]], capacity=cap, bin_s=horizon / 100,
                                      end_s=float(events[row["run_dir"]]["end_s"].max()), color="C3")
        ax.set_title(f"{row['label']} (seed {row['seed']}, capacity {cap if cap else 'unlimited'})",
                     fontsize="small")
        ax.set_xlabel("")
        ax.set_xlim(0, horizon)
    axes[-1].set_xlabel("simulated wall-clock time (s)")
    fig.tight_layout()
    _save(fig, fig_dir / "server_utilisation.png")
    doc.img(fig_dir / "server_utilisation.png", "figures/server_utilisation.png",
            "Split Server utilisation over simulated time (share of its capacity busy, in bins of 1% of the "
            "longest run).")
