"""The run folder and the batch folder on disk: the one place that knows their file names.

A run folder (``sflsim run --out DIR``, or ``DIR/runs/<id>/`` of a batch) holds ``scenario.yaml``
(the resolved scenario), ``metrics.csv``, ``events.csv``, ``summary.json``,
``accuracy_vs_time.png`` and, when it came from a batch, ``run.json`` (its labels, status and
fingerprint). A batch folder (``sflsim compare`` / ``sweep``) holds ``batch.json`` (what was asked
for), ``runs.csv`` (the status of every run) and ``runs/``. A batch run is written into
``runs/<id>.partial/`` and renamed to ``runs/<id>/`` when it finished (completed or diverged), or
to ``runs/<id>.failed/`` (with ``traceback.txt``) when it raised.

A single run (``sflsim run --out DIR``, ``run_scenario(s, DIR)``) lands the same way: it is written
into ``DIR.partial-<pid>`` beside DIR and moved into place when it ends (``open_run``,
``land_run``). An existing DIR with files is refused (``check_out_dir``) unless ``overwrite``;
then the old folder is replaced as a whole at the very end, and only by a run that finished
(completed or diverged): a run that failed or was interrupted lands beside it as
``DIR.failed-<time>`` / ``DIR.interrupted-<time>`` and the old run stays. No folder ever holds a
mix of two runs.

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
#: summary.json fields measured on the host (they differ between identical runs; everything else is reproducible).
HOST_TIME_FIELDS = ("host_runtime_s", "eval_host_s")
FIGURE = "accuracy_vs_time.png"
RUN_META = "run.json"  # a batch run's labels, status and fingerprint
TRACEBACK = "traceback.txt"  # in a failed run's folder
# Siblings of a single run's folder DIR (sflsim run --out DIR)
RUN_PARTIAL = ".partial-"  # DIR.partial-<pid>: being written
RUN_REPLACED = ".replaced-"  # DIR.replaced-<pid>: the old run, for a moment, while --overwrite lands
RUN_BESIDE = {"failed": ".failed-", "interrupted": ".interrupted-"}  # DIR.<status>-<UTC time>: kept old DIR
RUN_FILES = (SCENARIO, SUMMARY, EVENTS, METRICS)  # any of these: a folder holds a run

FINISHED = ("completed", "diverged")  # a run's end states that a re-run reuses
RUNS_CSV_COLUMNS = ("run_id", "status", "algorithm", "variant", "seed", "final_accuracy", "sim_time_s", "rounds",
                    "host_s", "error", "path", "retimed_from")


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
# A single run's folder: checked before anything runs, written beside, landed at the end
# --------------------------------------------------------------------------------------------
def _is_within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def check_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output folder a run cannot (or must not) land in; return it as a Path.

    A UserError (one line, exit 2), with no side effect, when ``path`` is a file, lies under a
    file, cannot be created or written (the nearest existing folder above it is not writable),
    is (or contains) the working directory, or is a folder with files in it and ``overwrite`` is
    false. With ``overwrite`` a folder is replaced only if it holds a run (scenario.yaml,
    summary.json, events.csv or metrics.csv). An empty folder is fine.
    """
    from simulator.errors import UserError

    out = Path(path)
    where = f"--out {out}"
    if out.exists() and not out.is_dir():
        raise UserError(f"{where}: is a file, not a folder")
    top = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), None)
    if top is None:  # pragma: no cover - the root always exists
        raise UserError(f"{where}: no existing folder above it")
    if not top.is_dir():
        raise UserError(f"{where}: {top} is a file, so no folder can be made under it")
    parent = out.absolute().parent if out.exists() else top
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{where}: cannot write in {parent} (permission denied)")
    if not out.is_dir():
        return out
    if _is_within(Path.cwd().resolve(), out.resolve()):  # a run lands by renaming folders: never this one
        raise UserError(f"{where}: is (or contains) the working directory; choose a folder inside it")
    try:
        entries = sorted(e.name for e in out.iterdir())
    except OSError as e:
        raise UserError(f"{where}: cannot read the folder ({e.strerror})") from None
    if not entries:
        return out
    summary = read_json(out / SUMMARY) or {}
    holds_run = any((out / f).is_file() for f in RUN_FILES)
    what = (f"already holds a run (status {summary['status']})" if summary.get("status")
            else "already holds a run" if holds_run else f"is not empty ({len(entries)} entries, e.g. {entries[0]})")
    if not overwrite:
        raise UserError(f"{where}: {what}; pass --overwrite to replace it when the new run finishes, "
                        "or choose another folder")
    if not holds_run:
        raise UserError(f"{where}: {what} and holds no run (no {', '.join(RUN_FILES)}); "
                        "--overwrite replaces only a run folder")
    return out


def run_partial(out: str | Path) -> Path:
    """``DIR.partial-<pid>``: where this process writes the run that lands in ``DIR``."""
    out = Path(out)
    return out.with_name(f"{out.name}{RUN_PARTIAL}{os.getpid()}")


def run_partials(out: str | Path) -> list[Path]:
    """Partial folders of ``DIR`` (this and other processes'; a killed run leaves one)."""
    out = Path(out)
    return sorted(out.parent.glob(f"{out.name}{RUN_PARTIAL}*")) if out.parent.is_dir() else []


def open_run(out: str | Path, overwrite: bool = False) -> Path:
    """Check ``out`` (``check_out_dir``), then make a fresh empty ``DIR.partial-<pid>`` (returned)."""
    out = check_out_dir(out, overwrite)
    partial = run_partial(out)
    shutil.rmtree(partial, ignore_errors=True)  # a leftover of this pid (an earlier process)
    partial.mkdir(parents=True)
    return partial


def _holds_files(path: Path) -> bool:
    return path.is_dir() and any(True for _ in path.iterdir())


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing what is there as a whole (never a mix)."""
    if not dst.exists() or (dst.is_dir() and not _holds_files(dst)):
        os.replace(src, dst)  # rename(2) replaces an empty folder atomically
        return
    old = dst.with_name(f"{dst.name}{RUN_REPLACED}{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)  # put the old run back
        raise
    shutil.rmtree(old, ignore_errors=True)


def beside(out: str | Path, status: str) -> Path:
    """``DIR.failed-<UTC time>`` (or ``.interrupted-``): a free name beside ``DIR``."""
    out = Path(out)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out.with_name(f"{out.name}{RUN_BESIDE[status]}{stamp}")
    n = 2
    while path.exists():
        path = out.with_name(f"{out.name}{RUN_BESIDE[status]}{stamp}-{n}")
        n += 1
    return path


def land_run(partial: str | Path, out: str | Path, status: str, traceback_text: Optional[str] = None,
             error: str = "") -> Path:
    """Move a single run's partial folder into place when it ends; return where it landed.

    ``completed``/``diverged``: to ``out``, replacing an old run there as a whole.
    ``failed`` (with ``traceback.txt`` and ``failed`` in its summary) or ``interrupted``: to
    ``out`` if that holds no files, else beside it (``beside``), so an old run is never lost
    to a run that did not finish.
    """
    partial, out = Path(partial), Path(out)
    if status == "failed":
        (partial / TRACEBACK).write_text(traceback_text or "")
        mark_summary_failed(partial, error)
    if status in FINISHED or not _holds_files(out):
        _replace_dir(partial, out)
        return out
    dest = beside(out, status)
    os.replace(partial, dest)
    return dest


def discard_run(partial: str | Path) -> None:
    """Remove a partial folder of a run that never started (bad input found during set-up)."""
    shutil.rmtree(partial, ignore_errors=True)


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
    _replace_dir(paths.partial, paths.final)
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
        "rounds": summary.get("rounds"), "retimed_from": summary.get("retimed_from"),
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
