"""The Recorder: every charged span and every evaluation, buffered and written as CSV.

With an output folder, spans are streamed: each flush writes the buffered spans to
``events.csv`` and lets them go, so a run's memory does not grow with its length (a
timing-only run of 1,000 rounds of 1,000 clients writes 24 M spans). What the summary needs
is kept as it goes: the span count, the bytes sent and the server's busy intervals. The
algorithms' tables are streamed the same way (their row counts are kept). Without a folder (a
notebook's ``run_scenario(s)``) every span and row stays in memory.

Spans go to ``events.csv``, evaluations to ``metrics.csv`` (one line written and flushed per
evaluation, so an interrupted run keeps every evaluation it made; each line says which test
samples it used: ``eval_set`` and ``eval_samples``), and algorithm-specific
per-round tables (``<name>.csv``) through ``table``. The recorder never decides what happens
in a run; it only keeps what it is told, in the order it is told.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import threading
from array import array
from pathlib import Path
from typing import Any, NamedTuple, Optional

from simulator import rundir


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold SIGINT/SIGTERM until the block ends, then deliver them as they would have been.

    A flush writes rows and then moves its "written up to" mark; an interrupt between the two
    would make ``close`` write the same rows again (duplicate spans in events.csv). In the main
    thread the signals are caught for the block's few microseconds and re-raised through the
    handler that was installed (KeyboardInterrupt, or the CLI's SIGTERM handler); elsewhere
    (a Dask worker thread) signals never reach the code, so nothing is needed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    except ValueError:  # not in the interpreter's main thread after all
        for sig, h in old.items():
            signal.signal(sig, h)
        yield
        return
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        for sig in caught[:1]:
            handler = old[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


class Span(NamedTuple):
    """One charged operation: a row of events.csv (read it by name, never by position)."""

    client: Optional[int]
    party: str
    kind: str
    round: Optional[int]
    seq: int
    start_s: float
    end_s: float
    wait_s: float
    flops: float
    nbytes: int
    rng_elements: int = 0


EVENT_COLUMNS = Span._fields
METRIC_COLUMNS = (
    "sim_time_s", "round", "test_accuracy", "test_loss", "bytes_up", "bytes_down", "eval_set", "eval_samples",
)
#: ``eval_set`` of a metrics row: evaluated on the run's fixed training-time subset of the test
#: set, or on the full test set (every row when ``eval.subset`` is null, else the row at the end).
EVAL_SETS = ("subset", "full")


def _cell(v: Any) -> str:
    """How a metric or table value is written: None empty, a float by repr, the rest by str."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


class _CsvFile:
    """An append-only CSV file whose header is written once."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        self.path, self.columns = path, columns
        self._f = path.open("w", newline="")
        self._w = csv.writer(self._f, lineterminator="\n")
        self._w.writerow(columns)
        self._f.flush()

    def write(self, rows: list[tuple]) -> None:
        """Append ``rows``, each cell as ``_cell`` writes it, and flush them to the OS."""
        self._w.writerows([[_cell(v) for v in r] for r in rows])
        self._f.flush()

    def write_spans(self, rows: list[Span]) -> None:
        """Append spans as they are and flush them to the OS.

        The csv module's own conversion: None an empty cell, an int by str, a Python float by
        repr, a str as is -- what ``_cell`` writes for every type a span holds (the engine
        stores Python ints, floats, str and None), without a Python call per cell.
        ``tests/test_trace.py`` checks the two agree byte for byte.
        """
        self._w.writerows(rows)
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class Recorder:
    """Keeps spans, metrics and extra tables in memory and, with ``out_dir``, on disk."""

    def __init__(self, out_dir: Optional[Path] = None, flush_every: int = 2000,
                 keep_events: Optional[bool] = None):
        """``keep_events``: keep every span in ``events`` (default: only without ``out_dir``;
        with one, the spans are let go once written and ``events`` raises)."""
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.keep_events = self.out_dir is None if keep_events is None else bool(keep_events)
        if not self.keep_events and self.out_dir is None:
            raise ValueError("a recorder without out_dir must keep its events (nowhere to stream them)")
        self._spans: list[Span] = []  # every span (keep_events), else those not yet written
        self.metrics: list[dict] = []
        self.tables: dict[str, list[dict]] = {}
        self.bytes_up = 0
        self.bytes_down = 0
        self._flush_every = flush_every
        self._events_written = 0  # of those in ``_spans``
        self._events_dropped = 0  # written and let go (streaming)
        self._server_start = array("d")  # the server's spans, for busy_time
        self._server_end = array("d")
        self._tables_written: dict[str, int] = {}  # of those in ``tables[name]``
        self._tables_dropped: dict[str, int] = {}
        self._table_columns: dict[str, list] = {}
        self._files: dict[str, _CsvFile] = {}
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._files["events"] = _CsvFile(self.out_dir / rundir.EVENTS, EVENT_COLUMNS)
            self._files["metrics"] = _CsvFile(self.out_dir / rundir.METRICS, METRIC_COLUMNS)

    @property
    def events(self) -> list[Span]:
        """Every span recorded, in order (a recorder that keeps them: no ``out_dir``, or
        ``keep_events=True``); a streaming recorder raises, its spans are in events.csv."""
        if not self.keep_events:
            raise ValueError(f"the spans were streamed to {self.out_dir / rundir.EVENTS} and not kept in memory: read "
                             "that file (RunResult.events does), or record with keep_events=True")
        return self._spans

    @property
    def event_count(self) -> int:
        """Spans recorded so far (written or not, kept or not)."""
        return self._events_dropped + len(self._spans)

    def table_counts(self) -> dict[str, int]:
        """Rows of each algorithm table so far (written or not, kept or not)."""
        return {name: self._tables_dropped.get(name, 0) + len(rows) for name, rows in self.tables.items()}

    # -- spans ---------------------------------------------------------------------------
    def span(self, *, client, party, kind, round, seq, start_s, end_s, wait_s, flops, nbytes,
             rng_elements: int = 0) -> None:
        """One charged operation, with the seconds it waited for the server before starting."""
        self.add_span(Span(client, party, kind, round, seq, start_s, end_s, wait_s, flops, nbytes, rng_elements))

    def add_span(self, span: Span) -> None:
        """``span`` with its fields already in a ``Span`` (the engine's per-operation path)."""
        events = self._spans
        events.append(span)
        party = span.party
        if party == "uplink":
            self.bytes_up += span.nbytes
        elif party == "downlink":
            self.bytes_down += span.nbytes
        elif party == "server":
            self._server_start.append(span.start_s)
            self._server_end.append(span.end_s)
        if len(events) - self._events_written >= self._flush_every:
            self.flush()

    # -- metrics -------------------------------------------------------------------------
    def metric(self, sim_time_s: float, round: Optional[int], test_accuracy: float, test_loss: float, *,
               eval_set: str, eval_samples: int) -> dict:
        """One evaluation of the global model on ``eval_samples`` test samples of ``eval_set``
        (``subset`` or ``full``, see ``EVAL_SETS``); written to disk at once."""
        if eval_set not in EVAL_SETS:
            raise ValueError(f"eval_set must be one of {EVAL_SETS}, got {eval_set!r}")
        row = {
            "sim_time_s": float(sim_time_s),
            "round": round,
            "test_accuracy": float(test_accuracy),
            "test_loss": float(test_loss),
            "bytes_up": int(self.bytes_up),
            "bytes_down": int(self.bytes_down),
            "eval_set": eval_set,
            "eval_samples": int(eval_samples),
        }
        self.metrics.append(row)
        if "metrics" in self._files:
            self._files["metrics"].write([tuple(row[c] for c in METRIC_COLUMNS)])
        return row

    # -- extra tables --------------------------------------------------------------------
    def table(self, name: str, row: dict) -> None:
        """A row of an algorithm-specific table ``<name>.csv`` (columns fixed by its first row)."""
        rows = self.tables.setdefault(name, [])
        columns = self._table_columns.setdefault(name, list(row))
        if list(row) != columns:
            raise ValueError(f"table {name}: columns {list(row)} differ from {columns}")
        rows.append(dict(row))

    # -- disk ----------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is buffered (events and tables) to disk (never twice: an interrupt
        waits until the rows and the marks of what was written agree)."""
        if self.out_dir is None:
            self._events_written = len(self._spans)
            return
        with _interrupts_deferred():
            self._flush()

    def _flush(self) -> None:
        if self.out_dir is None:
            self._events_written = len(self._spans)
            return
        new = self._spans[self._events_written :]
        if new:
            self._files["events"].write_spans(new)
        self._events_written = len(self._spans)
        if not self.keep_events:
            self._events_dropped += len(self._spans)
            self._spans = []
            self._events_written = 0
        for name, rows in self.tables.items():
            if name not in self._files:
                self._files[name] = _CsvFile(self.out_dir / f"{name}.csv", tuple(self._table_columns[name]))
                self._tables_written[name] = 0
            done = self._tables_written[name]
            if len(rows) > done:
                cols = self._files[name].columns
                self._files[name].write([tuple(r[c] for c in cols) for r in rows[done:]])
                self._tables_written[name] = len(rows)
            if not self.keep_events:
                self._tables_dropped[name] = self._tables_dropped.get(name, 0) + len(rows)
                rows.clear()
                self._tables_written[name] = 0

    def close(self) -> None:
        """Flush and close every file."""
        self.flush()
        for f in self._files.values():
            f.close()

    # -- summaries -----------------------------------------------------------------------
    def busy_time(self, party: str = "server") -> float:
        """Seconds during which at least one span of ``party`` was running (union of spans).

        The server's spans are kept for this as they come (two floats each), so it works when
        the spans themselves were streamed; other parties need ``keep_events``.
        """
        if party == "server":
            import numpy as np

            start = np.array(self._server_start, dtype=np.float64)  # copies: the arrays keep growing
            end = np.array(self._server_end, dtype=np.float64)
            busy = end > start
            start, end = start[busy], end[busy]
            order = np.lexsort((end, start))  # by start, then end
            spans = zip(start[order].tolist(), end[order].tolist())
        else:
            if not self.keep_events:
                raise ValueError(f"busy_time({party!r}): the spans were streamed to disk, not kept")
            spans = sorted((e.start_s, e.end_s) for e in self._spans if e.party == party and e.end_s > e.start_s)
        total, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s
        return total

    def events_csv_text(self) -> str:
        """The events table as CSV text (for tests and notebooks without an out_dir)."""
        if not self.keep_events:
            raise ValueError("events_csv_text: the spans were streamed to events.csv, not kept; read that file")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(EVENT_COLUMNS)
        w.writerows(self._spans)
        return buf.getvalue()
