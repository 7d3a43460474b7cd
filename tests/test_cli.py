"""CLI smoke runs in a subprocess: run, validate, schema, bad input, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def sflsim(*args, cwd=None, env=None, timeout=120):
    """Run ``python -m simulator ARGS`` and return the CompletedProcess."""
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "simulator", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=e, timeout=timeout)


@pytest.fixture
def tiny_file(tiny_raw, tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    return p


def test_run_writes_outputs(tiny_file, tmp_path):
    """`sflsim run` with overrides and a seed writes every output and a one-line result."""
    out = tmp_path / "out"
    r = sflsim("run", tiny_file, "--out", out, "--seed", 5, "--set", "stop.rounds=1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["seed"] == 5 and s["rounds"] == 1
    assert yaml.safe_load((out / "scenario.yaml").read_text())["stop"]["rounds"] == 1


@pytest.mark.parametrize(
    "args, key",
    [
        (["--set", "algorithm.tua=2"], "algorithm.tua"),
        (["--set", "stop.rounds=-1"], "stop.rounds"),
        (["--set", "algorithm.participation=2"], "algorithm.participation"),
        (["--set", "nonsense"], "--set"),
        (["--set", "data.dataset=imagenet"], "data.dataset"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_file, tmp_path, args, key):
    """Bad scenario input exits 2 with one stderr line naming the dotted key, no traceback."""
    r = sflsim("run", tiny_file, "--out", tmp_path / "o", "--no-progress", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert key in lines[0] and "Traceback" not in r.stderr


def test_missing_dataset_says_where_and_how(tiny_file, tmp_path):
    """A missing dataset exits 2 and says where it looked and how to get it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = sflsim("run", tiny_file, "--out", tmp_path / "o", "--no-progress",
               "--set", "data.dataset=cifar10", "--set", f"data.root={empty}", env={"SFLSIM_DATA": str(empty)})
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert str(empty) in r.stderr and "cifar" in r.stderr.lower()


def test_validate_and_schema(tiny_file, tmp_path):
    """`validate` accepts good files and rejects bad ones; `schema` prints JSON Schema."""
    r = sflsim("validate", tiny_file, ROOT / "scenarios" / "quickstart.yaml")
    assert r.returncode == 0 and r.stdout.count(": ok") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: {name: splitfed_v1, tua: 1}\nstop: {rounds: 1}\n")
    r = sflsim("validate", bad)
    assert r.returncode == 2 and "algorithm.tua" in r.stderr
    r = sflsim("schema")
    assert r.returncode == 0 and json.loads(r.stdout)["title"] == "sflsim scenario"


def test_help_and_usage_errors():
    """--help works; an unknown subcommand is a one-line usage error with exit 2."""
    r = sflsim("--help")
    assert r.returncode == 0 and "run" in r.stdout and "examples" in r.stdout
    r = sflsim("frobnicate")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_keeps_outputs(tiny_file, tmp_path, sig, code):
    """SIGINT mid-run exits 130 (SIGTERM 143) and lands metrics, events and an 'interrupted' summary.

    The run is written into out.partial-<pid> beside out and moved into place when it stops."""
    out = tmp_path / "out"
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "simulator", "run", str(tiny_file), "--out", str(out),
                          "--no-progress", "--set", "stop.rounds=100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e)
    partial = tmp_path / f"out.partial-{p.pid}"
    deadline = time.time() + 90
    while time.time() < deadline:
        metrics = partial / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert not out.exists()  # nothing lands before the run ends
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert not partial.exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["interrupted_by"] == signal.Signals(sig).name
    assert len((out / "metrics.csv").read_text().splitlines()) >= 3
    assert (out / "events.csv").stat().st_size > 0
    assert f"what was recorded is in {out}/" in err
