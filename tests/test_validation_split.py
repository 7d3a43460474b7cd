"""data.validation: a class-stratified, keyed validation split evaluated instead of the test set,
and the selection of the best grid point on it (analysis.select, sflsim select)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.select import select_points
from simulator import rundir
from simulator.cli import main
from simulator.data import formats, load_dataset
from simulator.data.images import IMAGE_DATASETS, _held_out_split, clear_cache, train_selection
from simulator.data.partitions import ValidationSplitError, hold_out, validation_size
from simulator.engine import Simulation
from simulator.errors import ScenarioError, UserError
from simulator.latency import build_time_model
from simulator.preflight import preflight
from simulator.rng import generator
from simulator.runner import build_context, run_scenario
from simulator.scenario import to_yaml, validate
from simulator.trace import Recorder


# --------------------------------------------------------------------------------------------
# The split itself
# --------------------------------------------------------------------------------------------
def test_hold_out_is_stratified_disjoint_and_complete():
    """Held-out samples keep the class proportions (largest remainder); kept and held partition the set."""
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    kept, held = hold_out(labels, 40, generator(0, "data", "validation", "x"))
    assert np.bincount(labels[held]).tolist() == [20, 10, 6, 4]
    assert np.intersect1d(kept, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(labels.size))
    assert np.all(np.diff(held) > 0) and np.all(np.diff(kept) > 0)


def test_hold_out_refuses_sizes_it_cannot_honour():
    """Fewer samples than classes, the whole set, or a class with nothing left for training."""
    labels = np.repeat(np.arange(3), [10, 10, 1])
    rng = generator(0, "data", "validation", "x")
    with pytest.raises(ValidationSplitError, match="one of each of the 3 classes"):
        hold_out(labels, 2, rng)
    with pytest.raises(ValidationSplitError, match="would leave none of the 21"):
        hold_out(labels, 21, rng)
    with pytest.raises(ValidationSplitError, match="every training sample of class\\(es\\) 2"):
        hold_out(labels, 3, rng)  # class 2's only sample goes to validation (one of each class)


def test_validation_size_takes_counts_and_fractions():
    """An integer is a count; a fraction in (0, 1) is rounded half up; anything else is refused."""
    assert validation_size(200, 1438) == 200
    assert validation_size(0.1, 1438) == 144  # 143.8
    assert validation_size(0.25, 10) == 3  # 2.5 rounds up
    for bad in (0, -1, 1.0, 1.5, True, "10"):
        with pytest.raises(ValidationSplitError):
            validation_size(bad, 100)


def _raw_digits():
    """The bundled digits' fixed train and test pixels (uint8, before normalisation)."""
    x, y = formats.read_sklearn_digits()
    train, test = _held_out_split(y, "digits")
    return x[train], y[train], x[test]


def _pixels(ds) -> tuple[np.ndarray, np.ndarray]:
    """Undo the normalisation: back to digits' integer pixel values (0..16)."""
    mean, std = ds.channel_mean[0], ds.channel_std[0]
    back = lambda t: np.rint((t.numpy() * std + mean) * 16).astype(np.int64)  # noqa: E731
    return back(ds.x_train), back(ds.x_test)


def test_loaded_validation_is_held_out_of_train_and_replaces_test():
    """x_test holds the held-out training images, x_train the rest; the test images are not in either."""
    x_tr, y_tr, x_te = _raw_digits()
    ds = load_dataset("digits", validation=200, seed=5)
    assert ds.eval_data == "validation" and len(ds.y_test) == 200 and len(ds.y_train) == len(y_tr) - 200
    kept, held = train_selection(y_tr, None, 200, "digits", 5)
    train_px, val_px = _pixels(ds)
    assert np.array_equal(val_px, x_tr[held].astype(np.int64)) and np.array_equal(ds.y_test.numpy(), y_tr[held])
    assert np.array_equal(train_px, x_tr[kept].astype(np.int64))
    assert np.intersect1d(kept, held).size == 0
    rows = lambda a: {r.tobytes() for r in a.reshape(len(a), -1).astype(np.int64)}  # noqa: E731
    assert not rows(val_px) & (rows(x_te) - rows(x_tr))  # no image that exists only in the test set
    assert np.bincount(ds.y_test.numpy()).tolist() == [20] * 10  # stratified: digits' train is balanced
    # The normalisation comes from the samples the clients train on, not from the held-out ones.
    assert ds.channel_mean[0] == pytest.approx(x_tr[kept].mean() / 16, rel=1e-9)


def test_split_is_keyed_by_seed_and_independent_of_train_limit():
    """Same seed, same split (also with a train_limit); another seed, another split."""
    a = load_dataset("digits", validation=100, seed=1, pixels=False)
    b = load_dataset("digits", validation=100, seed=1, train_limit=300, pixels=False)
    c = load_dataset("digits", validation=100, seed=2, pixels=False)
    y = _raw_digits()[1]
    held = {(s, lim): train_selection(y, lim, 100, "digits", s)[1] for s, lim in ((1, None), (1, 300), (2, None))}
    assert np.array_equal(held[(1, None)], held[(1, 300)]) and not np.array_equal(held[(1, None)], held[(2, None)])
    assert np.array_equal(a.y_test, b.y_test) and len(b.y_train) == 300
    kept_b = train_selection(y, 300, 100, "digits", 1)[0]
    assert np.intersect1d(kept_b, held[(1, None)]).size == 0
    assert len(c.y_test) == 100


def test_file_datasets_never_read_the_test_split(tmp_path, monkeypatch):
    """IDX (whole splits parsed) and PNG folders (only kept files decoded): the split comes out of
    train; a test file that cannot be parsed is never touched."""
    from simulator.data import locate
    from tests.test_data import _write_idx_set, _write_png

    monkeypatch.delenv("SFLSIM_DATA", raising=False)
    monkeypatch.setattr(locate, "DEBIAN_DATASETS_DIR", tmp_path / "no-debian")
    clear_cache()
    try:
        arrays = _write_idx_set(tmp_path / "fashion-mnist", n_train=40, n_test=10, gz=False)
        (tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte").write_bytes(b"not an IDX file")
        ds = load_dataset("fashion_mnist", tmp_path, validation=10, seed=2)
        kept, held = train_selection(arrays["train-labels"].astype(np.int64), None, 10, "fashion_mnist", 2)
        assert ds.eval_data == "validation" and ds.y_test.tolist() == arrays["train-labels"][held].tolist()
        assert sorted(ds.y_test.tolist()) == list(range(10)) and len(ds.y_train) == 30
        root = tmp_path / "cinic" / "CINIC-10"
        for cls in ("a", "b", "c"):
            for i in range(4):
                _write_png(root / "train" / cls / f"{i}.png", np.full((32, 32, 3), 10 * i, np.uint8))
            (root / "test" / cls).mkdir(parents=True)
            (root / "test" / cls / "0.png").write_bytes(b"not a PNG")
        png = load_dataset("cinic10", tmp_path / "cinic", validation=3, seed=2)
        assert png.eval_data == "validation" and sorted(png.y_test.tolist()) == [0, 1, 2]
        assert len(png.y_train) == 9
        again = load_dataset("cinic10", tmp_path / "cinic", validation=3, seed=2)  # from the cache: the same
        assert again.x_test.equal(png.x_test) and again.x_train.equal(png.x_train)
    finally:
        clear_cache()


def _context(raw):
    s = validate(raw)
    sim = Simulation(build_time_model(s.time, s.data.num_clients, s.seed), Recorder(None), 1)
    return build_context(s, sim, __import__("torch").device("cpu"))


def test_clients_train_on_the_rest_and_every_algorithm_sees_the_same_split(tiny_raw):
    """Partitions cover exactly the remaining training samples; the split does not depend on the algorithm."""
    tiny_raw["data"]["validation"] = 150
    a = _context(tiny_raw)
    tiny_raw["algorithm"] = {"name": "mu_splitfed", "batch_size": 16, "local_steps": 2}
    b = _context(tiny_raw)
    n_train = len(a.data.y_train)
    assert n_train == 1438 - 150 and a.data.eval_data == "validation"
    assert np.array_equal(np.sort(np.concatenate(a.partitions)), np.arange(n_train))
    assert all(np.array_equal(p, q) for p, q in zip(a.partitions, b.partitions))
    assert a.data.x_test.equal(b.data.x_test) and a.data.y_test.equal(b.data.y_test)


# --------------------------------------------------------------------------------------------
# A run evaluates on it, and says so
# --------------------------------------------------------------------------------------------
def test_run_evaluates_on_validation_and_summary_says_so(tiny_raw, tmp_path):
    """metrics rows: the subset of the validation split during training, all of it at the end."""
    tiny_raw["data"]["validation"] = 200
    tiny_raw["eval"] = {"every_rounds": 1, "subset": 50}
    out = tmp_path / "run"
    result = run_scenario(validate(tiny_raw), out)
    m = pd.read_csv(out / rundir.METRICS)
    assert m.loc[m.eval_set == "subset", "eval_samples"].unique().tolist() == [50]
    assert m.loc[m.eval_set == "full", "eval_samples"].tolist() == [200]
    s = json.loads((out / rundir.SUMMARY).read_text())
    assert s["eval_data"] == "validation" and s["eval_validation_samples"] == 200 and s["eval_test_samples"] is None
    assert s["final_accuracy"] == result.summary["final_accuracy"]
    assert sum(c["samples"] for c in s["clients"]) == 1438 - 200
    assert yaml.safe_load((out / rundir.SCENARIO).read_text())["data"]["validation"] == 200


def test_without_validation_nothing_changes(tiny_raw):
    """No split: the test set, eval_data test, and scenario.yaml without the key (fingerprints stay valid)."""
    s = validate(tiny_raw)
    assert "validation" not in yaml.safe_load(to_yaml(s))["data"]
    summary = run_scenario(s).summary
    assert summary["eval_data"] == "test" and summary["eval_test_samples"] == 359
    assert summary["eval_validation_samples"] is None


@pytest.mark.parametrize("value, key, message", [
    (9, "data.validation", "cannot hold one of each of the 10 classes"),
    (0.005, "data.validation", "7 samples (0.005 of 1,438) cannot hold one"),
    (1438, "data.validation", "would leave none of the 1,438 training samples"),
    (1437, "data.validation", "fewer than its 10 classes"),
    (1.5, "data.validation", "expected a number of training samples"),
    (-3, "data.validation", "expected a number of training samples"),
])
def test_bad_sizes_are_refused_naming_the_key(tiny_raw, value, key, message):
    """Schema or pre-flight (no data read): a ScenarioError naming data.validation."""
    tiny_raw["data"]["validation"] = value
    with pytest.raises(ScenarioError) as e:
        preflight(validate(tiny_raw))
    assert e.value.key == key and message in str(e.value)


def test_test_limit_and_eval_subset_are_checked_against_the_split(tiny_raw):
    """test_limit has no effect with a split (refused); eval.subset is bounded by the split's size."""
    tiny_raw["data"].update(validation=100, test_limit=50)
    with pytest.raises(ScenarioError, match="data.test_limit: has no effect with data.validation"):
        validate(tiny_raw)
    tiny_raw["data"]["test_limit"] = None
    tiny_raw["eval"] = {"subset": 300}
    with pytest.raises(ScenarioError, match="eval.subset: 300 is more than the validation samples"):
        preflight(validate(tiny_raw))


def test_a_class_left_without_training_samples_fails_the_run_naming_the_key(tiny_raw, monkeypatch):
    """Known only from the labels: the run refuses it before training (exit 2 from the CLI)."""
    digits = IMAGE_DATASETS["digits"]

    def one_nine():  # digits with a single 9: the split takes it, training would have none
        x, y = digits.read()
        keep = np.sort(np.concatenate([np.flatnonzero(y != 9), np.flatnonzero(y == 9)[:1]]))
        return x[keep].copy(), y[keep].copy()

    monkeypatch.setitem(IMAGE_DATASETS, "digits", dataclasses.replace(digits, read=one_nine))
    clear_cache()
    try:
        tiny_raw["data"]["validation"] = 100
        with pytest.raises(ScenarioError) as e:
            run_scenario(validate(tiny_raw))
        assert e.value.key == "data.validation" and "every training sample of class(es) 9" in str(e.value)
    finally:
        clear_cache()


def test_text_split_keeps_no_text_on_both_sides(tmp_path):
    """Tweets: a stratified, keyed split; a training example whose text is in validation is dropped."""
    pytest.importorskip("transformers")
    from models.text import tokenizer_for
    from simulator.data.text import TWEETS_FILE, load_text_dataset

    try:
        tok = tokenizer_for("minilm")
    except UserError as e:
        pytest.skip(str(e))
    rows = [("negative", f"bad thing {i}") for i in range(40)] + [("neutral", f"a thing {i}") for i in range(40)]
    rows += [("positive", f"good thing {i % 20}") for i in range(40)]  # every positive text twice
    (tmp_path / TWEETS_FILE).write_bytes(("sentiment,confidence,text\n" + "".join(
        f'{s},0.9,"{t}"\n' for s, t in rows)).encode("latin-1"))
    a = load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=8, validation=12, seed=4)
    b = load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=8, validation=12, seed=4)
    full = load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=8)
    assert a.eval_data == "validation" and len(a.y_test) == 12 and a.x_test.equal(b.x_test)
    assert np.bincount(a.y_test.numpy(), minlength=3).tolist() == [4, 4, 4]
    train_rows = {tuple(r) for r in a.x_train.tolist()}
    assert not train_rows & {tuple(r) for r in a.x_test.tolist()}
    assert len(a.y_train) < len(full.y_train) - 12  # duplicates of validation texts left training


# --------------------------------------------------------------------------------------------
# Selecting a grid point on it
# --------------------------------------------------------------------------------------------
def _fake_batch(root, points, eval_data="validation"):
    """A batch folder: ``points`` is [(params, [(seed, status, final_accuracy), ...]), ...] in plan order."""
    runs = []
    for params, seeds in points:
        for seed, status, acc in seeds:
            run_id = ",".join(f"{k}={v}" for k, v in params.items()) + f",seed={seed}"
            d = root / rundir.RUNS / run_id
            d.mkdir(parents=True)
            (d / rundir.METRICS).write_text("sim_time_s,round,test_accuracy\n")
            (d / rundir.SUMMARY).write_text(json.dumps({
                "status": status, "final_accuracy": acc, "final_loss": None if acc is None else 1 - acc,
                "eval_data": eval_data, "eval_validation_samples": 500 if eval_data == "validation" else None,
                "eval_test_samples": 500 if eval_data == "test" else None}))
            runs.append({"run_id": run_id, "algorithm": "mu_splitfed", "variant": "", "seed": seed,
                         "params": {"algorithm.name": "mu_splitfed", **params}})
    (root / rundir.BATCH_META).write_text(json.dumps({"kind": "sweep", "runs": runs}))
    return root


def test_selection_never_picks_a_point_with_a_diverged_or_failed_seed(tmp_path):
    """The best completed seed belongs to a point whose other seed diverged: that point is out."""
    src = _fake_batch(tmp_path, [
        ({"algorithm.lr_server": 0.01}, [(0, "completed", 0.70), (1, "completed", 0.72)]),
        ({"algorithm.lr_server": 0.1}, [(0, "completed", 0.95), (1, "diverged", None)]),
        ({"algorithm.lr_server": 0.05}, [(0, "completed", 0.80), (1, "completed", 0.78)]),
        ({"algorithm.lr_server": 1.0}, [(0, "failed", None), (1, "diverged", None)]),
    ])
    sel = select_points(src)
    (c,) = sel.chosen
    assert c["params"] == {"algorithm.lr_server": 0.05} and c["value"] == pytest.approx(0.79)
    assert c["set"] == ["mu_splitfed:algorithm.lr_server=0.05"] and c["seeds"] == [0, 1]
    assert sel.eval_data == "validation" and sel.eval_samples == 500
    out = sel.candidates.set_index("algorithm.lr_server")
    assert out.loc[0.1, "excluded"] == "diverged (seed 1)" and not out.loc[0.1, "chosen"]
    assert out.loc[1.0, "excluded"] == "failed (seed 0); diverged (seed 1)"
    written = json.loads(sel.write(tmp_path / "selection.json").read_text())
    assert written["set"] == ["mu_splitfed:algorithm.lr_server=0.05"] and len(written["points"]) == 4


def test_ties_go_to_the_point_planned_first_and_loss_is_minimised(tmp_path):
    """Equal means: the grid's first point; final_loss: the lowest."""
    src = _fake_batch(tmp_path, [
        ({"algorithm.lr_client": 0.005}, [(0, "completed", 0.8)]),
        ({"algorithm.lr_client": 0.001}, [(0, "completed", 0.8)]),
        ({"algorithm.lr_client": 0.02}, [(0, "completed", 0.6)]),
    ])
    assert select_points(src).chosen[0]["params"] == {"algorithm.lr_client": 0.005}
    assert select_points(src, "final_loss").chosen[0]["params"] == {"algorithm.lr_client": 0.005}
    with pytest.raises(UserError, match="--metric"):
        select_points(src, "accuracy")


def test_no_candidate_and_test_data_are_said_loudly(tmp_path, capsys):
    """Every point diverged: no choice (and --args exits 2); runs on test are refused unless allowed."""
    gone = _fake_batch(tmp_path / "a", [({"algorithm.lr_server": 1.0}, [(0, "diverged", None)])])
    sel = select_points(gone)
    assert sel.unselected == ["mu_splitfed"] and sel.set_items() == []
    assert main(["select", str(gone), "--args"]) == 2
    assert "no point of mu_splitfed completed every seed" in capsys.readouterr().err
    on_test = _fake_batch(tmp_path / "b", [({"algorithm.lr_server": 0.1}, [(0, "completed", 0.9)])], "test")
    with pytest.raises(UserError, match="evaluated on the test set"):
        select_points(on_test)
    assert select_points(on_test, allow_test=True).eval_data == "test"


def test_a_real_tiny_grid_selects_on_validation_end_to_end(tiny_raw, tmp_path, capsys):
    """sweep (one point diverges) -> report labels validation and writes selection.json -> select --args
    gives sflsim compare the chosen step size."""
    tiny_raw["data"]["validation"] = 200
    tiny_raw["eval"] = {"every_rounds": 1, "subset": 100}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_raw))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "grid": {"algorithm.lr_server": [0.05, 0.1, 1.0e6]}, "set": {"algorithm.lr_client": 0.1}}))
    out = tmp_path / "out"
    assert main(["sweep", str(tmp_path / "grid.yaml"), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    status = pd.read_csv(out / rundir.RUNS_CSV).set_index("algorithm.lr_server")["status"]
    assert status.to_dict() == {0.05: "completed", 0.1: "completed", 1.0e6: "diverged"}
    acc = pd.read_csv(out / rundir.RUNS_CSV).set_index("algorithm.lr_server")["final_accuracy"]
    best = 0.1 if acc[0.1] > acc[0.05] else 0.05  # a tie goes to the first planned point, 0.05
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"splitfed_v1: algorithm.lr_server={best}" in printed and "best by validation accuracy" in printed
    chosen = json.loads((out / "report" / "selection.json").read_text())
    assert chosen["set"] == [f"splitfed_v1:algorithm.lr_server={best}"] and chosen["eval_data"] == "validation"
    md = (out / "report" / "report.md").read_text()
    assert "final validation acc. (%)" in md and "## Selection on the validation split" in md
    assert "full validation set (200 samples)" in md
    assert "final validation acc." in (out / "report" / "tables" / "summary.md").read_text()
    assert main(["select", str(out), "--args"]) == 0
    args = capsys.readouterr().out.split()
    assert args == ["--set", f"splitfed_v1:algorithm.lr_server={best}"]
    assert main(["compare", str(tmp_path / "base.yaml"), *args, "--dry-run", "--out", str(tmp_path / "c")]) == 0
