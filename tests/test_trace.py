"""Recorder: spans, metrics written at once, tables, busy time as a union of intervals."""
from __future__ import annotations

import csv

import pytest

from simulator.trace import EVENT_COLUMNS, METRIC_COLUMNS, Recorder


def _span(rec, party, s, e, client=0, nbytes=0):
    rec.span(client=client, party=party, kind="k", round=0, seq=0, start_s=s, end_s=e, wait_s=0.0,
             flops=1.0, nbytes=nbytes)


def test_metrics_are_on_disk_before_close(tmp_path):
    """Each evaluation is written and flushed immediately (an interrupted run keeps it)."""
    rec = Recorder(tmp_path)
    rec.metric(1.5, 1, 0.5, 1.0, eval_set="subset", eval_samples=100)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1] == "1.5,1,0.5,1.0,0,0,subset,100"


def test_metric_rows_name_their_test_samples(tmp_path):
    """A metrics row says which test samples it used; an unknown set is refused, not written."""
    rec = Recorder(tmp_path)
    rec.metric(2.0, 3, 0.75, 0.5, eval_set="full", eval_samples=359)
    with pytest.raises(ValueError, match="eval_set"):
        rec.metric(2.0, 3, 0.75, 0.5, eval_set="train", eval_samples=10)
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == METRIC_COLUMNS and len(rows) == 1
    assert (rows[0]["eval_set"], rows[0]["eval_samples"]) == ("full", "359")


def test_events_flush_and_close(tmp_path):
    """Spans are buffered and written on flush/close, with the documented columns."""
    rec = Recorder(tmp_path, flush_every=3)
    for i in range(4):
        _span(rec, "uplink", i, i + 1, nbytes=10)
    assert len((tmp_path / "events.csv").read_text().splitlines()) == 1 + 3  # auto-flushed at 3
    rec.close()
    with (tmp_path / "events.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == EVENT_COLUMNS and len(rows) == 4
    assert rec.bytes_up == 40 and rec.bytes_down == 0


def test_busy_time_is_a_union():
    """Overlapping server spans are counted once; gaps are not counted."""
    rec = Recorder()
    _span(rec, "server", 0.0, 2.0)
    _span(rec, "server", 1.0, 3.0)
    _span(rec, "server", 5.0, 6.0)
    _span(rec, "client", 0.0, 10.0)
    assert rec.busy_time("server") == pytest.approx(4.0)


def test_tables(tmp_path):
    """Algorithm tables are written as <name>.csv; a row with other columns is refused."""
    rec = Recorder(tmp_path)
    rec.table("client_rounds", {"round": 0, "client": 1, "tau_used": 2})
    rec.table("client_rounds", {"round": 0, "client": 2, "tau_used": 3})
    with pytest.raises(ValueError):
        rec.table("client_rounds", {"round": 0})
    rec.close()
    assert (tmp_path / "client_rounds.csv").read_text().splitlines() == ["round,client,tau_used", "0,1,2", "0,2,3"]


def test_none_is_an_empty_cell(tmp_path):
    """A server-only span has an empty client cell."""
    rec = Recorder(tmp_path)
    _span(rec, "server", 0.0, 1.0, client=None)
    rec.close()
    assert (tmp_path / "events.csv").read_text().splitlines()[1].startswith(",server,")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_CELL = st.one_of(
    st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8),
    st.sampled_from(["a,b", 'say "hi"', "line\nbreak", " ", "", "client_forward"]),
)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(*[_CELL] * len(EVENT_COLUMNS)), min_size=1, max_size=5))
def test_spans_are_written_as_cell_would_write_them(rows, tmp_path_factory):
    """events.csv is written by the csv module itself; for every value a span holds (None, int,
    float, str) that is byte for byte what the per-cell conversion ``_cell`` writes."""
    import io

    from simulator.trace import Span, _cell, _CsvFile

    spans = [Span(*r) for r in rows]
    path = tmp_path_factory.mktemp("spans") / "events.csv"
    f = _CsvFile(path, EVENT_COLUMNS)
    f.write_spans(spans)
    f.close()
    expected = io.StringIO()
    w = csv.writer(expected, lineterminator="\n")
    w.writerow(EVENT_COLUMNS)
    w.writerows([[_cell(v) for v in r] for r in spans])
    assert path.read_bytes() == expected.getvalue().encode()


def test_add_span_is_span(tmp_path):
    """Recorder.add_span (the engine's path) records, counts bytes and flushes as span() does."""
    from simulator.trace import Span

    a = Recorder(tmp_path / "a", flush_every=2, keep_events=True)
    b = Recorder(tmp_path / "b", flush_every=2, keep_events=True)
    for i, party in enumerate(["uplink", "downlink", "client", "uplink", "server"]):
        fields = dict(client=i % 2 or None, party=party, kind="k", round=0, seq=i, start_s=i * 0.1,
                      end_s=i * 0.1 + 0.3, wait_s=0.0, flops=2.0, nbytes=10 * (i + 1), rng_elements=i)
        a.span(**fields)
        b.add_span(Span(**fields))
        assert (tmp_path / "a" / "events.csv").read_bytes() == (tmp_path / "b" / "events.csv").read_bytes()
    assert a.events == b.events and (a.bytes_up, a.bytes_down) == (b.bytes_up, b.bytes_down) == (50, 20)
    assert len((tmp_path / "b" / "events.csv").read_text().splitlines()) == 1 + 4  # flushed at 2 and 4
    a.close(), b.close()
    assert (tmp_path / "a" / "events.csv").read_bytes() == (tmp_path / "b" / "events.csv").read_bytes()
    assert b.events_csv_text() == (tmp_path / "b" / "events.csv").read_text()


def test_streaming_recorder_lets_written_spans_go(tmp_path):
    """With an output folder (the default there) spans are written and dropped at each flush;
    the file, the count, the bytes and the server's busy time are those of a recorder that
    keeps every span, and asking for the dropped spans fails loudly."""
    import random

    from simulator.trace import Span

    keep = Recorder(tmp_path / "keep", flush_every=3, keep_events=True)
    stream = Recorder(tmp_path / "stream", flush_every=3)
    assert not stream.keep_events and Recorder().keep_events
    rnd = random.Random(5)
    for i in range(50):  # overlapping, nested, touching and empty server spans, in no order
        start = rnd.choice([0.0, 0.5, 1.0]) + rnd.random()
        end = start + rnd.choice([0.0, 0.1, 0.7, 2.0]) * rnd.random()
        span = Span(i % 3 or None, rnd.choice(["server", "client", "uplink", "downlink"]), "k", i // 10, i,
                    start, end, 0.0, 1.0, 7 * i)
        keep.add_span(span)
        stream.add_span(span)
        assert len(stream._spans) < 3 and stream.event_count == i + 1
        for rec in (keep, stream):
            rec.table("rows", {"i": i, "start": start})
    keep.close(), stream.close()
    for name in ("events.csv", "rows.csv"):
        assert (tmp_path / "keep" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes()
    assert stream.tables == {"rows": []} and stream.table_counts() == keep.table_counts() == {"rows": 50}
    with pytest.raises(ValueError, match="columns"):
        stream.table("rows", {"start": 0.0, "i": 1})
    assert stream._spans == [] and stream.event_count == len(keep.events) == 50
    with pytest.raises(ValueError, match="streamed to .*events.csv"):
        stream.events  # a loud error, not an empty list
    assert (stream.bytes_up, stream.bytes_down) == (keep.bytes_up, keep.bytes_down)
    spans = sorted((e.start_s, e.end_s) for e in keep.events if e.party == "server" and e.end_s > e.start_s)
    union = sum(e - s for s, e in _merged(spans))
    assert stream.busy_time("server") == keep.busy_time("server") == pytest.approx(union)
    assert keep.busy_time("client") > 0
    with pytest.raises(ValueError, match="streamed"):
        stream.busy_time("client")
    with pytest.raises(ValueError, match="streamed"):
        stream.events_csv_text()
    with pytest.raises(ValueError, match="out_dir"):
        Recorder(keep_events=False)


def _merged(spans):
    """The union of sorted (start, end) intervals, written out plainly."""
    out = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def test_interrupt_right_after_a_write_never_duplicates_rows(tmp_path, monkeypatch):
    """A SIGINT arriving between writing rows and marking them written (a real signal, in that
    window) is delivered after the flush, and close() writes nothing twice."""
    import os
    import signal

    from simulator import trace as trace_mod

    rec = trace_mod.Recorder(tmp_path)
    original = trace_mod._CsvFile.write_spans

    def write_then_signal(self, rows):
        original(self, rows)
        os.kill(os.getpid(), signal.SIGINT)  # lands before flush() moves its mark

    monkeypatch.setattr(trace_mod._CsvFile, "write_spans", write_then_signal)
    for i in range(3):
        rec.span(client=0, party="client", kind="k", round=0, seq=i, start_s=float(i), end_s=i + 0.5,
                 wait_s=0.0, flops=1.0, nbytes=0)
    with pytest.raises(KeyboardInterrupt):
        rec.flush()
    monkeypatch.setattr(trace_mod._CsvFile, "write_spans", original)
    rec.close()
    lines = (tmp_path / "events.csv").read_text().splitlines()
    assert len(lines) == 1 + 3, lines
