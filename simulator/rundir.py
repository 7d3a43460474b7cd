"""The run folder and the batch folder on disk: the one place that knows their file names.

A run folder (``sflsim run --out DIR``, or ``DIR/runs/<id>/`` of a batch) holds ``scenario.yaml``
(the resolved scenario), ``metrics.csv``, ``events.csv``, ``summary.json``,
``accuracy_vs_time.png`` and, when it came from a batch, ``run.json`` (its labels, status and
fingerprint). A batch folder (``sflsim compare`` / ``sweep``) holds ``batch.json`` (what was asked
for), ``runs.csv`` (the status of every run) and ``runs/``. A batch run is written into
``runs/<id>.partial/`` and renamed to ``runs/<id>/`` when it finished (completed or diverged), or
to ``runs/<id>.failed/`` (with ``traceback.txt``) when it raised.

This module reads and writes those folders; it takes folders, run ids, labels and fingerprints,
never plan objects, and imports nothing from ``simulator.experiments`` (which plans and runs
batches), the runner or ``analysis/`` (which read what lands here).
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

# A batch folder
RUNS = "runs"  # the folder of the batch's run folders
PARTIAL = ".partial"  # suffix of a run folder being written
FAILED = ".failed"  # suffix of the folder of a run that raised
BATCH_META = "batch.json"
RUNS_CSV = "runs.csv"
# A run folder
SCENARIO = "scenario.yaml"
METRICS = "metrics.csv"
EVENTS = "events.csv"
SUMMARY = "summary.json"
FIGURE = "accuracy_vs_time.png"
RUN_META = "run.json"  # a batch run's labels, status and fingerprint
TRACEBACK = "traceback.txt"  # in a failed run's folder

FINISHED = ("completed", "diverged")  # a run's end states that a re-run reuses
RUNS_CSV_COLUMNS = ("run_id", "status", "algorithm", "variant", "seed", "final_accuracy", "sim_time_s", "rounds",
                    "host_s", "error", "path")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written to a temporary file and renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    """A JSON file as a dict, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def now() -> str:
    """The UTC time for run.json and batch.json, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint(scenario: dict) -> str:
    """A digest of a resolved scenario, ignoring ``threads`` (a resource setting, not an input)."""
    data = {k: v for k, v in scenario.items() if k != "threads"}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def format_value(value: Any) -> str:
    """A compact text form of a grid value for run ids and runs.csv (``0.1``, ``true``, ``null``, ``[1,2]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


# --------------------------------------------------------------------------------------------
# One run's folder in a batch
# --------------------------------------------------------------------------------------------
class RunPaths(NamedTuple):
    final: Path  # runs/<id>/: finished (completed or diverged)
    partial: Path  # runs/<id>.partial/: being written
    failed: Path  # runs/<id>.failed/: raised


def run_paths(runs_dir: str | Path, run_id: str) -> RunPaths:
    runs = Path(runs_dir)
    return RunPaths(runs / run_id, runs / (run_id + PARTIAL), runs / (run_id + FAILED))


def run_state(runs_dir: str | Path, run_id: str, fingerprint: str) -> str:
    """``complete`` (same inputs, finished: completed or diverged), ``changed`` (finished from
    other inputs), or ``missing``."""
    final = Path(runs_dir) / run_id
    if not final.is_dir():
        return "missing"
    meta = read_json(final / RUN_META) or {}
    summary = read_json(final / SUMMARY) or {}
    finished = (meta.get("status") in FINISHED and summary.get("status") == meta.get("status")
                and (final / METRICS).is_file())
    if not finished:
        return "missing"
    return "complete" if meta.get("fingerprint") == fingerprint else "changed"


def open_partial(runs_dir: str | Path, run_id: str, meta: dict) -> Path:
    """A fresh ``runs/<id>.partial/`` (stale partial and failed folders removed) with ``meta`` in run.json."""
    paths = run_paths(runs_dir, run_id)
    for stale in (paths.partial, paths.failed):
        shutil.rmtree(stale, ignore_errors=True)
    paths.partial.mkdir(parents=True)
    write_json_atomic(paths.partial / RUN_META, meta)
    return paths.partial


def land_failed(runs_dir: str | Path, run_id: str, meta: dict, traceback_text: str) -> Path:
    """A run that raised: its traceback, ``failed`` in its summary and run.json; the partial
    folder becomes ``runs/<id>.failed/`` (returned)."""
    paths = run_paths(runs_dir, run_id)
    (paths.partial / TRACEBACK).write_text(traceback_text)
    mark_summary_failed(paths.partial, meta["error"])
    write_json_atomic(paths.partial / RUN_META, meta)
    os.replace(paths.partial, paths.failed)
    return paths.failed


def land_finished(runs_dir: str | Path, run_id: str, meta: dict) -> Path:
    """A run that finished: run.json written, the partial folder renamed to ``runs/<id>/``
    (returned), replacing a finished run from other inputs or an unfinished leftover."""
    paths = run_paths(runs_dir, run_id)
    write_json_atomic(paths.partial / RUN_META, meta)
    if paths.final.exists():
        shutil.rmtree(paths.final)
    os.replace(paths.partial, paths.final)
    return paths.final


def record_crash(runs_dir: str | Path, run_id: str, labels: dict, error: str, traceback_text: str) -> Path:
    """A run whose worker died (or that could not start): what it wrote, if anything, moves to
    ``runs/<id>.failed/`` (returned) with the traceback and ``failed`` in run.json."""
    paths = run_paths(runs_dir, run_id)
    if paths.partial.is_dir():
        shutil.rmtree(paths.failed, ignore_errors=True)
        os.replace(paths.partial, paths.failed)
    paths.failed.mkdir(parents=True, exist_ok=True)
    (paths.failed / TRACEBACK).write_text(traceback_text)
    meta = read_json(paths.failed / RUN_META) or labels
    meta.update(status="failed", error=error, finished_at=now())
    write_json_atomic(paths.failed / RUN_META, meta)
    return paths.failed


def mark_summary_failed(run_dir: Path, error: str) -> None:
    """The runner writes its summary in a ``finally``: say there that the run failed."""
    path = Path(run_dir) / SUMMARY
    summary = read_json(path)
    if summary is not None:
        summary["status"] = "failed"
        summary["error"] = error
        write_json_atomic(path, summary)


# --------------------------------------------------------------------------------------------
# Outcomes and runs.csv
# --------------------------------------------------------------------------------------------
def diverged_text(summary: dict) -> str:
    """The one-line Diverged message of a diverged run's summary."""
    from simulator.errors import Diverged

    info = summary.get("diverged") or {}
    try:
        return str(Diverged(**info))
    except TypeError:  # written by another version
        return "diverged: " + ", ".join(f"{k}={v}" for k, v in info.items() if v is not None)


def outcome(run_id: str, status: str, path: Path, *, error: str = "", host_s: Optional[float] = None,
            summary: Optional[dict] = None) -> dict:
    """One run's line of a batch's outcomes (and of runs.csv)."""
    if summary is None and status in ("completed", "reused", "diverged"):
        summary = read_json(path / SUMMARY) or {}
    if host_s is None and status == "reused":
        host_s = (read_json(path / RUN_META) or {}).get("host_s")
    summary = summary or {}
    return {
        "run_id": run_id, "status": status, "error": error, "host_s": host_s, "path": str(path),
        "final_accuracy": summary.get("final_accuracy"), "sim_time_s": summary.get("sim_time_s"),
        "rounds": summary.get("rounds"),
    }


def reused_outcome(run_id: str, path: Path) -> dict:
    """The outcome of a finished run found on disk: ``reused``, or ``diverged`` (a result too)."""
    summary = read_json(path / SUMMARY) or {}
    if summary.get("status") == "diverged":
        host_s = (read_json(path / RUN_META) or {}).get("host_s")
        return outcome(run_id, "diverged", path, error=diverged_text(summary), host_s=host_s, summary=summary)
    return outcome(run_id, "reused", path, summary=summary)


def write_runs_csv(out: Path, runs: Sequence[dict], outcomes: dict[str, dict]) -> None:
    """``runs.csv``: one line per planned run (pending ones say ``pending``), grid keys as columns.

    ``runs``: the labels of every planned run, in order (run_id, algorithm, variant, seed, params).
    """
    param_keys: list[str] = []
    for r in runs:
        for k in r["params"]:
            if k not in param_keys:
                param_keys.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(RUNS_CSV_COLUMNS[:5]) + param_keys + list(RUNS_CSV_COLUMNS[5:]))
    for r in runs:
        o = outcomes.get(r["run_id"]) or {"status": "pending", "path": str(out / RUNS / r["run_id"])}
        row = [r["run_id"], o["status"], r["algorithm"], r["variant"], r["seed"]]
        row += [format_value(r["params"][k]) if k in r["params"] else "" for k in param_keys]
        row += ["" if o.get(c) is None else o.get(c) for c in RUNS_CSV_COLUMNS[5:]]
        w.writerow(row)
    tmp = out / (RUNS_CSV + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, out / RUNS_CSV)


def read_runs_csv(path: Path) -> list[dict]:
    """The rows of a runs.csv as dicts of text; [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
