"""analysis.plots: each figure function draws onto the ax it is given (Agg), with the expected artists."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from analysis.plots import (
    busy_integral,
    new_figure,
    plot_accuracy_vs_rounds,
    plot_accuracy_vs_time,
    plot_mean_accuracy_vs_time,
    plot_server_utilisation,
    plot_target_heatmap,
    plot_timeline,
    timeline_segments,
)
from tests.test_traces import RUNS

COLS = ["client", "party", "kind", "round", "seq", "start_s", "end_s", "wait_s", "flops", "nbytes"]
EVENTS = pd.DataFrame([
    (0, "client", "client_forward", 0, 0, 0.0, 1.0, 0.0, 1.0, 0),
    (0, "uplink", "activation", 0, 0, 1.0, 1.5, 0.0, 0.0, 10),
    (0, "server", "server_step", 0, 0, 1.5, 2.5, 0.0, 1.0, 0),
    (1, "client", "client_forward", 0, 0, 0.0, 1.2, 0.0, 1.0, 0),
    (1, "uplink", "activation", 0, 0, 1.2, 1.7, 0.0, 0.0, 10),
    (1, "server", "server_step", 0, 0, 2.5, 3.0, 0.8, 1.0, 0),  # waited 1.7 -> 2.5 for the slot
    (0, "downlink", "gradient", 0, 1, 2.5, 3.0, 0.0, 0.0, 10),
    (None, "fed", "aggregate", 0, 0, 3.0, 3.5, 0.0, 1.0, 0),
], columns=COLS)


def test_accuracy_vs_time_single_run_is_kept_for_the_runner():
    """The runner's one-run plot: one line in % against time."""
    fig, ax = new_figure()
    one = RUNS[RUNS["run_id"] == "a-seed0"]
    assert plot_accuracy_vs_time(ax, one, label="a") is ax
    assert ax.lines[0].get_ydata().tolist() == pytest.approx([10, 50, 80, 90])


def test_mean_accuracy_draws_one_line_and_band_per_group():
    """Group a (two seeds): a mean line, a dashed tail after seed 0 ends, and a band; b: a line only."""
    fig, ax = new_figure()
    assert plot_mean_accuracy_vs_time(ax, RUNS, points=11, targets=[0.8]) is ax
    labels = [l.get_label() for l in ax.lines if not l.get_label().startswith("_")]
    assert labels == ["a", "b"]
    a_line = ax.lines[0]
    x, y = a_line.get_xdata(), a_line.get_ydata()
    assert x[0] == 0 and x[-1] == pytest.approx(3.0)  # solid while both seeds run (seed 0 ends at 3 s)
    i = int(np.argmin(np.abs(x - 2.0)))
    assert y[i] == pytest.approx(100 * (0.8 + 0.7) / 2)
    assert ax.lines[1].get_linestyle() == "--"
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # b has one seed: no band
    assert any(l.get_ydata()[0] == 80 for l in ax.lines)  # the target line


def test_mean_accuracy_range_band_and_rounds():
    """The range band spans min..max of the seeds; accuracy vs rounds puts rounds on x."""
    fig, ax = new_figure()
    plot_accuracy_vs_rounds(ax, RUNS, band="range")
    assert ax.get_xlabel() == "rounds"
    verts = ax.collections[0].get_paths()[0].vertices
    assert verts[:, 1].max() == pytest.approx(90) and verts[:, 1].min() == pytest.approx(10)
    with pytest.raises(ValueError):
        plot_accuracy_vs_rounds(ax, RUNS, band="sd")


def test_timeline_segments_include_queue_and_clip_to_window():
    """Waiting for the server is a segment before the server span; segments are clipped."""
    seg = timeline_segments(EVENTS, 0.0, 2.8)
    q = seg[seg["activity"] == "queue"]
    assert q[["row", "start_s", "end_s"]].values.tolist() == [[1, 1.7, 2.5]]
    assert seg["end_s"].max() == pytest.approx(2.8)
    assert set(seg[seg["row"] == -1]["activity"]) == {"server"}  # fed work starts at 3.0 > 2.8


def test_timeline_draws_rows_for_clients_and_server():
    """A server row and one row per client, each with an idle background and activity bars."""
    fig, ax = new_figure()
    assert plot_timeline(ax, EVENTS) is ax
    assert [t.get_text() for t in ax.get_yticklabels()] == ["server", "client 0", "client 1"]
    bars = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bars) >= 3 + 6
    assert ax.get_xlim() == (0.0, 3.5)
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"client compute", "uplink", "downlink", "Split Server work", "waiting for server", "Fed Server",
            "idle"} <= set(names)


def test_busy_integral_by_hand():
    """Server spans [1.5, 2.5] and [2.5, 3.0]: 0.5 s busy in [0, 2], 1.0 s in [2, 4]."""
    assert busy_integral(EVENTS, np.array([0.0, 2.0, 4.0])).tolist() == pytest.approx([0.5, 1.0])
    overlap = pd.DataFrame([(0, "server", "s", 0, 0, 0.0, 1.0, 0, 0, 0), (1, "server", "s", 0, 0, 0.5, 1.5, 0, 0, 0)],
                           columns=COLS)
    assert busy_integral(overlap, np.array([0.0, 1.0, 2.0])).tolist() == pytest.approx([1.5, 0.5])


def test_server_utilisation_in_percent_of_capacity():
    """Capacity 2 and one job busy for a whole bin: 50%."""
    fig, ax = new_figure()
    plot_server_utilisation(ax, EVENTS, capacity=2, bin_s=0.5, end_s=3.0)
    y = ax.lines[0].get_ydata()
    assert y.max() == pytest.approx(50.0) and y.min() == 0.0
    assert ax.get_ylabel() == "server busy (%)"


def test_heatmap_marks_targets_never_reached():
    """A 2x2 grid: an image with the values, and a dash where the target was never reached."""
    table = pd.DataFrame({"model.cut": [1, 1, 2, 2], "algorithm.tau": [1, 2, 1, 2], "t": [10.0, 5.0, 20.0, np.nan]})
    fig, ax = new_figure()
    assert plot_target_heatmap(ax, table, "algorithm.tau", "model.cut", "t", label="time") is ax
    img = ax.images[0].get_array()
    assert img.shape == (2, 2) and img[0, 1] == 5.0 and np.ma.is_masked(img[1, 1])
    assert [t.get_text() for t in ax.texts] == ["10", "5", "20", "—"]
    assert ax.get_xlabel() == "algorithm.tau" and ax.get_ylabel() == "model.cut"


def test_final_full_set_point_is_drawn_apart_from_the_curve(tmp_path):
    """A subset run: the line stops at its last subset value; a diamond marks the full-set accuracy."""
    from analysis.plots import FINAL_LABEL
    from analysis.traces import load_runs
    from tests.test_traces import write_fake_run

    write_fake_run(tmp_path, "a", algorithm="a", seed=0, times=[0, 1, 2], accs=[0.1, 0.5, 0.7], full_acc=0.85)
    runs = load_runs(tmp_path / "a")
    fig, ax = new_figure()
    plot_mean_accuracy_vs_time(ax, runs, points=5)
    diamonds = [l for l in ax.lines if l.get_marker() == "D"]
    assert len(diamonds) == 1 and diamonds[0].get_label().startswith(FINAL_LABEL)
    assert diamonds[0].get_xydata().tolist() == [[2.0, pytest.approx(85.0)]]
    line = next(l for l in ax.lines if l.get_marker() != "D")
    assert line.get_ydata()[-1] == pytest.approx(70.0)
    fig, ax = new_figure()
    plot_accuracy_vs_time(ax, runs, label="a")
    assert ax.lines[0].get_ydata().tolist() == pytest.approx([10, 50, 70])
    assert ax.lines[0].get_label() == "a (100-sample subset)" and ax.lines[1].get_marker() == "D"
    assert ax.lines[1].get_label() == f"{FINAL_LABEL} (1,000)"
