"""The timeline verifier: invariants every run's event log must keep (docs/verify.md).

``verify_run(DIR)`` reads a run folder through ``rundir`` (events.csv, metrics.csv,
summary.json, scenario.yaml) and returns a list of ``Violation`` (empty: the run is
consistent). ``run_scenario`` checks every run this way after writing its outputs, and a
violation fails the run (it is a bug of ours, not of the user); ``sflsim verify DIR`` checks a
folder on disk. The checks, each exact (no slack but where a float is a sum):

- ``spans``: every span has finite start <= end, a finite wait >= 0, and ends by the run's
  simulated time;
- ``client_compute``: a client's compute spans (party ``client``) never overlap;
- ``links``: messages on one link (a client's ``uplink``, or its ``downlink``) never overlap;
- ``server_capacity``: Split Server jobs (party ``server``; the Fed Server ``fed`` is its own
  machine) never run more at once than ``time.server.capacity`` (null: unlimited);
- ``seq``: per (client, party) the k-th operation starts no earlier than the (k-1)-th (the
  engine numbers a client's operations of one category as it starts them); no number twice;
- ``totals``: summary.json's events, bytes_up, bytes_down, evaluations and server_busy_s
  (the union of server spans, to 1e-9 relative) agree with events.csv and metrics.csv;
- ``metrics``: metrics.csv never goes back in sim_time_s, round, bytes_up or bytes_down; its
  evaluation marks hold: ``eval_set`` is ``subset`` or ``full``, ``eval_samples`` a positive
  integer, one sample count per set (the subset smaller than the full set); in a run that
  trained on a subset, the one ``full`` row is the last, at the same sim_time_s and round as
  the row before it (free in simulated time) and at the summary's sim_time_s; summary.json's
  final_accuracy is the last ``full`` row's accuracy (null without one). A metrics.csv written
  before the marks existed (no ``eval_set`` column) is checked without them.

Spans are half-open ``[start, end)``: one that starts exactly when another ends does not
overlap it; a zero-length span overlaps a span that strictly contains its instant.
Vectorised (pandas/numpy); nothing here knows an algorithm, and nothing prints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import pandas as pd

from simulator import rundir
from simulator.errors import UserError

CHECKS = ("spans", "client_compute", "links", "server_capacity", "seq", "totals", "metrics")
LINKS = ("uplink", "downlink")
EVAL_MARKS = ("eval_set", "eval_samples")  # metrics.csv columns that say which test samples a row used
REL_TOL = 1e-9
#: the events.csv columns the checks read (the others, round, flops and rng_elements, are not loaded)
CHECKED_COLUMNS = ("client", "party", "kind", "seq", "start_s", "end_s", "wait_s", "nbytes")
_UNSET: Any = object()


class Violation(NamedTuple):
    """One broken invariant: the check's name (one of ``CHECKS``) and what, where."""

    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


class TimelineError(RuntimeError):
    """A run's timeline broke an invariant: a bug in the simulator, never bad input."""

    def __init__(self, violations: list, where: str = "", shown: int = 5):
        self.violations = list(violations)
        head = "; ".join(str(v) for v in self.violations[:shown])
        more = f" (and {len(self.violations) - shown} more)" if len(self.violations) > shown else ""
        at = f" in {where}" if where else ""
        super().__init__(f"the timeline{at} breaks {len(self.violations)} invariant(s) (a simulator bug): "
                         f"{head}{more}")


@dataclass
class RunData:
    """What the checks read: the events, and (when there) metrics, summary and server capacity."""

    events: pd.DataFrame
    metrics: Optional[pd.DataFrame] = None
    summary: Optional[dict] = None
    capacity: Any = _UNSET  # int, None (unlimited), or _UNSET (unknown: capacity not checked)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _events_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Columns as numbers (client: float, NaN for server-only work), party and kind as text
    categories (a byte a row: a timing-only run can have tens of millions of rows)."""
    out = pd.DataFrame({
        "client": pd.to_numeric(df["client"], errors="coerce").astype(float),
        "party": df["party"].astype(str).astype("category") if df["party"].dtype != "category" else df["party"],
        "kind": df["kind"].astype(str).astype("category") if df["kind"].dtype != "category" else df["kind"],
        "seq": pd.to_numeric(df["seq"], errors="coerce"),
    })
    for col in ("start_s", "end_s", "wait_s"):
        out[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    out["nbytes"] = pd.to_numeric(df["nbytes"], errors="coerce")
    return out.reset_index(drop=True)


def load_run(run_dir: str | Path) -> tuple[RunData, list[Violation]]:
    """A run folder's files, and a violation for each file a landed run must have but lacks."""
    from simulator.trace import EVENT_COLUMNS, METRIC_COLUMNS

    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"{d}: not a folder")
    if not (d / rundir.EVENTS).is_file():
        raise UserError(f"{d}: no {rundir.EVENTS}; not a run folder")
    missing: list[Violation] = []
    try:
        header = pd.read_csv(d / rundir.EVENTS, nrows=0).columns
        raw = pd.read_csv(d / rundir.EVENTS, dtype={"party": "category", "kind": "category"},
                          keep_default_na=False, usecols=lambda c: c in CHECKED_COLUMNS,
                          na_values={c: [""] for c in EVENT_COLUMNS if c not in ("party", "kind")})
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{d / rundir.EVENTS}: unreadable ({e})") from None
    lacking = [c for c in EVENT_COLUMNS[:10] if c not in header]
    if lacking:
        raise UserError(f"{d / rundir.EVENTS}: columns {lacking} missing")
    data = RunData(_events_frame(raw))
    del raw  # a second copy of every row, until the function returns
    if (d / rundir.METRICS).is_file():
        m = pd.read_csv(d / rundir.METRICS)
        required = tuple(c for c in METRIC_COLUMNS if c not in EVAL_MARKS)  # older runs have no marks
        if all(c in m.columns for c in required) and (all(c in m.columns for c in EVAL_MARKS)
                                                      or not any(c in m.columns for c in EVAL_MARKS)):
            data.metrics = m
        else:
            missing.append(Violation("metrics", f"{rundir.METRICS} lacks columns of {METRIC_COLUMNS}"))
    else:
        missing.append(Violation("metrics", f"{rundir.METRICS} is missing"))
    data.summary = rundir.read_json(d / rundir.SUMMARY)
    if data.summary is None:
        missing.append(Violation("totals", f"{rundir.SUMMARY} is missing or unreadable"))
    if (d / rundir.SCENARIO).is_file():
        import yaml

        scenario = yaml.safe_load((d / rundir.SCENARIO).read_text()) or {}
        server = ((scenario.get("time") or {}).get("server") or {})
        data.capacity = server.get("capacity", 1)  # the schema's default
    else:
        missing.append(Violation("server_capacity", f"{rundir.SCENARIO} is missing; capacity not checked"))
    return data, missing


def verify_run(run_dir: str | Path, limit: int = 20, require_files: bool = True) -> list[Violation]:
    """Every invariant of ``docs/verify.md`` on a run folder; [] when it keeps them all.

    ``require_files=False``: a missing metrics.csv, summary.json or scenario.yaml is no violation
    (a run interrupted before it wrote them); the checks that need them are skipped.
    """
    data, missing = load_run(run_dir)
    return (missing if require_files else []) + check(data, limit)


def verify_recorded(recorder, summary: Optional[dict], capacity: Optional[int], limit: int = 20) -> list[Violation]:
    """The same checks on a run kept in memory (``run_scenario`` without an output folder)."""
    from simulator.trace import EVENT_COLUMNS

    events = _events_frame(pd.DataFrame(recorder.events, columns=list(EVENT_COLUMNS)))
    metrics = pd.DataFrame(recorder.metrics) if recorder.metrics else None
    return check(RunData(events, metrics, summary, capacity), limit)


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------
def check(data: RunData, limit: int = 20) -> list[Violation]:
    """Run every check; each lists at most ``limit`` violations, then one line counting the rest."""
    ev = data.events
    out: list[Violation] = []
    out += check_spans(ev, data.summary, limit)
    out += check_overlaps(ev[ev.party == "client"], ("client",), "client_compute", "compute", limit)
    out += check_overlaps(ev[ev.party.isin(LINKS)], ("client", "party"), "links", "message", limit)
    if data.capacity is not _UNSET and data.capacity is not None:
        out += check_server_capacity(ev, int(data.capacity), limit)
    out += check_seq(ev, limit)
    if data.summary is not None:
        out += check_totals(ev, data.metrics, data.summary)
    if data.metrics is not None:
        out += check_metrics(data.metrics, limit, data.summary)
    return out


def _capped(check_name: str, messages: list[str], total: int, limit: int) -> list[Violation]:
    out = [Violation(check_name, m) for m in messages[:limit]]
    if total > limit:
        out.append(Violation(check_name, f"... and {total - limit} more"))
    return out


def _who(client: float) -> str:
    return "server-side" if math.isnan(client) else f"client {int(client)}"


def _span(row) -> str:
    return f"{row.kind} (seq {_int(row.seq)}) [{float(row.start_s)!r}, {float(row.end_s)!r})"


def _int(x) -> str:
    return "?" if x != x else str(int(x))


def check_spans(ev: pd.DataFrame, summary: Optional[dict], limit: int = 20) -> list[Violation]:
    """Finite start <= end, finite wait >= 0, known party, and no span ending after the run's end."""
    start, end, wait = ev.start_s.to_numpy(), ev.end_s.to_numpy(), ev.wait_s.to_numpy()
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(start) & np.isfinite(end) & (start <= end) & np.isfinite(wait) & (wait >= 0))
    bad |= ~ev.party.isin(("client", "server", "fed") + LINKS).to_numpy()
    bad |= ev.seq.isna().to_numpy()
    sim_end = (summary or {}).get("sim_time_s")
    late = np.zeros(len(ev), bool)
    if isinstance(sim_end, (int, float)) and math.isfinite(sim_end):
        with np.errstate(invalid="ignore"):
            late = end > sim_end
    idx = np.flatnonzero(bad | late)
    msgs = []
    for i in idx[:limit]:
        r = ev.iloc[i]
        why = (f"ends after the run's simulated time {sim_end!r}" if not bad[i]
               else f"unknown party {r.party!r}" if r.party not in ("client", "server", "fed") + LINKS
               else f"wait_s {float(r.wait_s)!r} is not a finite number >= 0"
               if not (r.wait_s >= 0 and math.isfinite(r.wait_s))
               else "no seq" if r.seq != r.seq
               else "start and end are not finite with start <= end")
        msgs.append(f"{_who(r.client)} {r.party} {_span(r)}: {why}")
    return _capped("spans", msgs, len(idx), limit)


def check_overlaps(ev: pd.DataFrame, keys: tuple[str, ...], check_name: str, what: str,
                   limit: int = 20) -> list[Violation]:
    """Within each group of ``keys``, no span starts before an earlier-starting one has ended."""
    if ev.empty:
        return []
    start, end = ev.start_s.to_numpy(), ev.end_s.to_numpy()
    order, group = _grouped_order(ev, keys, (end, start))  # by group, start, end
    start, end = start[order], end[order]
    reach = pd.Series(end).groupby(group, sort=False).cummax().to_numpy()  # latest end so far in the group
    first = np.r_[True, group[1:] != group[:-1]]
    prev_end = np.r_[np.nan, reach[:-1]]
    prev_end[first] = np.nan
    idx = np.flatnonzero(start < prev_end)
    heads = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))  # each row's group's first row
    msgs = []
    for i in idx[:limit]:
        r = ev.iloc[order[i]]
        j = heads[i] + np.flatnonzero(end[heads[i]:i] > start[i])[0]  # the earliest-starting span it overlaps
        earlier = ev.iloc[order[j]]
        link = f" {r.party}" if "party" in keys else ""
        msgs.append(f"{_who(r.client)}{link}: {what} {_span(r)} overlaps {_span(earlier)}")
    return _capped(check_name, msgs, len(idx), limit)


def _grouped_order(ev: pd.DataFrame, keys: tuple[str, ...], within: tuple[np.ndarray, ...]):
    """The stable order of ``ev`` by client (server-side work as -1), then the other ``keys`` in
    text order, then ``within`` (numpy's lexsort: last key first), and each sorted row's group
    number. Plain arrays, no copies of the frame (runs can have tens of millions of rows)."""
    client = ev.client.fillna(-1.0).to_numpy()
    others = [pd.factorize(ev[k], sort=True)[0] for k in keys if k != "client"]
    order = np.lexsort((*within, *reversed(others), client))
    keyed = [client[order], *(o[order] for o in others)]
    change = np.zeros(len(order), bool)
    change[0] = True
    for k in keyed:
        change[1:] |= k[1:] != k[:-1]
    return order, np.cumsum(change)


def check_server_capacity(ev: pd.DataFrame, capacity: int, limit: int = 20) -> list[Violation]:
    """Split Server jobs (party ``server``) running at once never exceed ``capacity``.

    A sweep over the positive-length jobs (at one instant, ends before starts); a zero-length
    job at t is too many when ``capacity`` jobs strictly contain t.
    """
    srv = ev[ev.party == "server"]
    if srv.empty:
        return []
    start, end = srv.start_s.to_numpy(), srv.end_s.to_numpy()
    pos = end > start
    ps, pe = start[pos], end[pos]
    times = np.concatenate([pe, ps])
    delta = np.concatenate([-np.ones(len(pe), np.int64), np.ones(len(ps), np.int64)])
    order = np.lexsort((delta, times))  # by time, then -1 (an end) before +1 (a start)
    running = np.cumsum(delta[order])
    over = np.flatnonzero((running > capacity) & (delta[order] > 0))
    msgs = [f"{int(running[j])} server jobs run at once at t={float(times[order][j])!r}, capacity {capacity}"
            for j in over[:limit]]
    total = len(over)
    zero = start[~pos & (end == start)]
    if len(zero):
        ss, se = np.sort(ps), np.sort(pe)
        inside = np.searchsorted(ss, zero, side="left") - np.searchsorted(se, zero, side="right")
        zover = np.flatnonzero(inside >= capacity)
        msgs += [f"a zero-length server job at t={float(zero[j])!r} while {int(inside[j])} jobs hold the "
                 f"{capacity} slot(s)" for j in zover[:limit]]
        total += len(zover)
    return _capped("server_capacity", msgs, total, limit)


def check_seq(ev: pd.DataFrame, limit: int = 20) -> list[Violation]:
    """Per (client, party): sorted by seq, start times never go back; no seq twice."""
    if ev.empty:
        return []
    seq = ev.seq.to_numpy(dtype=float)
    order, group = _grouped_order(ev, ("client", "party"), (seq,))
    seq, start = seq[order], ev.start_s.to_numpy()[order]
    same = np.r_[False, group[1:] == group[:-1]]
    prev_start = np.where(same, np.r_[np.nan, start[:-1]], np.nan)
    prev_seq = np.where(same, np.r_[np.nan, seq[:-1]], np.nan)
    back, dup = start < prev_start, seq == prev_seq
    idx = np.flatnonzero(back | dup)
    msgs = []
    for i in idx[:limit]:
        r = ev.iloc[order[i]]
        if dup[i]:
            msgs.append(f"{_who(r.client)} {r.party}: seq {_int(r.seq)} appears twice")
        else:
            msgs.append(f"{_who(r.client)} {r.party}: {_span(r)} starts before seq {_int(prev_seq[i])}, "
                        f"which started at {float(prev_start[i])!r}")
    return _capped("seq", msgs, len(idx), limit)


def union_length(start: np.ndarray, end: np.ndarray) -> float:
    """Seconds covered by at least one of the intervals (zero-length ones cover none)."""
    keep = end > start
    start, end = start[keep], end[keep]
    if not len(start):
        return 0.0
    order = np.argsort(start, kind="mergesort")
    st, en = start[order], end[order]
    reach = np.maximum.accumulate(en)
    new = np.r_[True, st[1:] > reach[:-1]]
    heads = np.flatnonzero(new)
    return float(np.sum(np.maximum.reduceat(en, heads) - st[heads]))


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)


def check_totals(ev: pd.DataFrame, metrics: Optional[pd.DataFrame], summary: dict) -> list[Violation]:
    """summary.json's totals against the sums over events.csv (and metrics.csv)."""
    out: list[Violation] = []
    expect = {
        "events": len(ev),
        "bytes_up": int(ev.nbytes[ev.party == "uplink"].sum()),
        "bytes_down": int(ev.nbytes[ev.party == "downlink"].sum()),
    }
    if metrics is not None:
        expect["evaluations"] = len(metrics)
    for key, value in expect.items():
        got = summary.get(key)
        if got != value:
            out.append(Violation("totals", f"summary.json {key} is {got!r}, the event log says {value!r}"))
    srv = ev[ev.party == "server"]
    busy = union_length(srv.start_s.to_numpy(), srv.end_s.to_numpy())
    got = summary.get("server_busy_s")
    if not isinstance(got, (int, float)) or not _close(float(got), busy):
        out.append(Violation("totals", f"summary.json server_busy_s is {got!r}, the union of server spans is "
                                       f"{busy!r}"))
    return out


def check_metrics(metrics: pd.DataFrame, limit: int = 20, summary: Optional[dict] = None) -> list[Violation]:
    """metrics.csv never goes back in simulated time, round, or bytes sent; its evaluation marks
    (``eval_set``, ``eval_samples``) are consistent, with each other and with ``summary``."""
    msgs, total = [], 0
    for col in ("sim_time_s", "round", "bytes_up", "bytes_down"):
        if col not in metrics.columns:
            continue
        v = pd.to_numeric(metrics[col], errors="coerce").to_numpy(dtype=float)
        back = np.flatnonzero(v[1:] < v[:-1]) + 1
        total += len(back)
        msgs += [f"row {i + 1}: {col} goes back from {float(v[i - 1])!r} to {float(v[i])!r}" for i in back[:limit]]
    if "eval_set" in metrics.columns:
        marks = _check_eval_marks(metrics, summary)
        total += len(marks)
        msgs += marks
    return _capped("metrics", msgs, total, limit)


def _check_eval_marks(m: pd.DataFrame, summary: Optional[dict]) -> list[str]:
    """The evaluation marks of metrics.csv (see the module docstring); messages, [] when kept."""
    out: list[str] = []
    sets = m["eval_set"].astype(str).to_numpy()
    bad = np.flatnonzero(~np.isin(sets, ("subset", "full")))
    out += [f"row {i + 1}: eval_set is {sets[i]!r}, expected subset or full" for i in bad[:5]]
    n = pd.to_numeric(m["eval_samples"], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~(np.isfinite(n) & (n >= 1) & (n == np.round(n))))
    out += [f"row {i + 1}: eval_samples is {m['eval_samples'].iloc[i]}, expected a positive integer" for i in bad[:5]]
    if out:
        return out
    counts = {}
    for name in ("subset", "full"):
        values = np.unique(n[sets == name])
        if len(values) > 1:
            out.append(f"eval_set {name} has {len(values)} sample counts ({', '.join(f'{v:g}' for v in values)}); "
                       "a run evaluates one fixed set of each")
        elif len(values):
            counts[name] = float(values[0])
    if "subset" in counts and "full" in counts and counts["subset"] >= counts["full"]:
        out.append(f"the subset has {counts['subset']:g} samples, not fewer than the full set's {counts['full']:g}")
    full = np.flatnonzero(sets == "full")
    if "subset" in counts and len(full):
        t = pd.to_numeric(m["sim_time_s"], errors="coerce").to_numpy(dtype=float)
        r = pd.to_numeric(m["round"], errors="coerce").to_numpy(dtype=float)
        last = len(sets) - 1
        if len(full) > 1 or full[0] != last:
            out.append(f"rows {', '.join(str(i + 1) for i in full[:5])} evaluate the full set; a run that trains "
                       "on a subset evaluates the full set once, in its last row")
        elif last == 0 or t[last] != t[last - 1] or r[last] != r[last - 1]:
            out.append(f"row {last + 1}: the full-set evaluation is not at the sim_time_s and round of the "
                       "training-time evaluation at the run's end")
        elif summary is not None and isinstance(summary.get("sim_time_s"), (int, float)) \
                and not _close(t[last], float(summary["sim_time_s"])):
            out.append(f"row {last + 1}: the full-set evaluation is at sim_time_s {t[last]!r}, the run ended at "
                       f"{summary['sim_time_s']!r}")
    if summary is not None and "final_accuracy" in summary:
        acc = pd.to_numeric(m["test_accuracy"], errors="coerce").to_numpy(dtype=float)
        want = float(acc[full[-1]]) if len(full) else None
        if want is not None and want != want:  # NaN (a timing-only run: no accuracy): summary.json says null
            want = None
        got = summary.get("final_accuracy")
        if not ((want is None and got is None) or (want is not None and isinstance(got, (int, float))
                                                     and _close(float(got), want))):
            out.append(f"summary.json final_accuracy is {got!r}, the last full-set evaluation says {want!r}")
    return out
