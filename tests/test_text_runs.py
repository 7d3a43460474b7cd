"""Text scenarios end to end: a tiny OPT on a small SST-2 under every algorithm, text profiles,
bad text inputs (exit 2, one line naming the key) and ``sflsim memory``."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from models.text import build_text_model, minilm_path  # noqa: E402
from simulator.cli import main  # noqa: E402
from simulator.errors import ScenarioError, UserError  # noqa: E402
from models.profile import NON_MATMUL_FLOPS, profile_text_cut  # noqa: E402
from simulator.runner import run_scenario  # noqa: E402
from simulator.scenario import validate  # noqa: E402

try:  # the tokenizer of every text run here (random OPT configs read MiniLM's ids)
    minilm_path()
except UserError as e:  # pragma: no cover - the text extra is installed in CI
    pytest.skip(str(e), allow_module_level=True)

TINY_OPT = dict(hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=32)
MAX_LEN, BATCH = 12, 8

POS = ["a charming and affecting journey", "the best film of the year", "warm , funny and wise",
       "a masterpiece of quiet beauty", "i loved every minute of it", "sharp writing and great acting"]
NEG = ["a dull and tedious mess", "the worst film of the year", "bleak , boring and empty",
       "contains no wit , only labored gags", "i hated every minute of it", "flat writing and stiff acting"]


def _write_sst2(root) -> None:
    """A small SST-2 in GLUE's layout: 48 train and 16 dev sentences, balanced labels."""
    d = root / "SST-2"
    d.mkdir()
    train = [(f"{t} {i}", lab) for i in range(4) for lab, texts in ((1, POS), (0, NEG)) for t in texts]
    dev = [(f"{t} again", lab) for lab, texts in ((1, POS), (0, NEG)) for t in texts[:4]]
    dev += [(f"{t} twice", lab) for lab, texts in ((1, POS), (0, NEG)) for t in texts[2:6]]
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
        (d / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows),
                              encoding="utf-8")


ALGOS = {
    "splitfed_v1": {"name": "splitfed_v1", "batch_size": BATCH, "local_steps": 2,
                    "lr_client": 0.05, "lr_server": 0.05},
    "splitfed_v2": {"name": "splitfed_v2", "batch_size": BATCH, "local_steps": 2,
                    "lr_client": 0.05, "lr_server": 0.05},
    "mu_splitfed": {"name": "mu_splitfed", "batch_size": BATCH, "participation": 1.0, "tau": 2,
                    "lr_server": 0.05, "lr_client": 1.0e-4, "zo": {"lam": 1.0e-3}},
    "splitfed_zo": {"name": "splitfed_zo", "batch_size": BATCH, "participation": 1.0,
                    "lr_server": 0.05, "lr_client": 1.0e-4, "zo": {"lam": 1.0e-3}},
}


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    """Data comes from the test's own folder only."""
    monkeypatch.delenv("SFLSIM_DATA", raising=False)


@pytest.fixture
def text_raw(tmp_path) -> dict:
    """A tiny text scenario: random OPT (3 blocks, D = 32) cut at 1, small SST-2, 3 clients, 2 rounds."""
    _write_sst2(tmp_path)
    return {
        "name": "tiny_text", "seed": 1, "threads": 1,
        "data": {"dataset": "sst2", "root": str(tmp_path), "num_clients": 3, "max_len": MAX_LEN},
        "model": {"name": "opt", "cut": 1, "config": dict(TINY_OPT)},
        "algorithm": dict(ALGOS["splitfed_v1"]),
        "time": {"client": {"flops_per_s": 1.0e8}, "server": {"flops_per_s": 1.0e9, "capacity": 1}},
        "eval": {"every_rounds": 1},
        "stop": {"rounds": 2},
    }


def _expected_tiny_opt_flops(blocks: int, b: int = BATCH, length: int = MAX_LEN) -> int:
    """Forward FLOPs of OPT blocks by hand: 4 D x D projections, fc1 + fc2, QK^T and AV."""
    d, f = TINY_OPT["hidden_size"], TINY_OPT["ffn_dim"]
    per_block = 2 * b * length * (4 * d * d + 2 * d * f) + 2 * 2 * b * length * length * d
    return blocks * per_block


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_two_round_smoke_run_on_tiny_opt(text_raw, tmp_path, algo):
    """Every round-based algorithm runs two rounds of a tiny OPT on SST-2 and writes its outputs."""
    raw = copy.deepcopy(text_raw)
    raw["algorithm"] = dict(ALGOS[algo])
    out = tmp_path / "out"
    result = run_scenario(validate(raw), out)
    s = result.summary
    assert s["status"] == "completed" and s["rounds"] == 2 and s["algorithm"] == algo
    assert 0.0 <= s["final_accuracy"] <= 1.0 and s["sim_time_s"] > 0
    for name in ("summary.json", "metrics.csv", "events.csv", "scenario.yaml"):
        assert (out / name).is_file()
    losses = [m["test_loss"] for m in result.recorder.metrics]
    assert len(losses) == 3 and losses[-1] != losses[0]  # the model trained
    prof = s["profile"]
    assert prof["activation_shape"] == [BATCH, MAX_LEN, TINY_OPT["hidden_size"]]
    # Labels (int64) and the attention mask (int64 [B, L]) travel with h.
    assert prof["label_bytes"] == 8 * BATCH + 8 * BATCH * MAX_LEN
    ev = result.events  # streamed to events.csv, read back
    sent = ev[ev.kind == "activation"]
    assert len(sent) and (sent.nbytes == prof["activation_bytes"] + prof["label_bytes"]).all()


def test_text_profile_counts_real_flops_and_the_mask():
    """The cut profile's FLOPs are the hand count of the blocks (attention included), meta = CPU."""
    parts = build_text_model("opt", cut=1, num_classes=2, seed=0, config=TINY_OPT)
    prof = profile_text_cut(parts, MAX_LEN, BATCH)
    # OPT's FFN activation is ReLU, priced per element since 2026-12-02 (models.profile.NON_MATMUL_FLOPS):
    # forward and backward over the B x L x ffn_dim values of each block.
    relu_elements = BATCH * MAX_LEN * TINY_OPT["ffn_dim"]
    relu, relu_bwd = NON_MATMUL_FLOPS["relu"] * relu_elements, NON_MATMUL_FLOPS["threshold_backward"] * relu_elements
    assert prof.client_forward_flops == _expected_tiny_opt_flops(1) + relu
    head = 2 * BATCH * TINY_OPT["hidden_size"] * 2  # the score layer, 2 classes
    server_mm = _expected_tiny_opt_flops(2) + head
    assert prof.server_forward_flops == server_mm + 2 * relu
    assert prof.server_backward_flops == 2 * server_mm + 2 * relu_bwd
    assert prof.activation_bytes == 4 * BATCH * MAX_LEN * TINY_OPT["hidden_size"]
    # The same measurement with real tensors on the CPU gives the same numbers.
    from models.profile import profile_cut
    from models.split import SplitModel
    from models.text import ServerWithMask

    mask = torch.ones((BATCH, MAX_LEN), dtype=torch.int64)
    cpu = profile_cut(SplitModel(parts.client, ServerWithMask(parts.server, mask), 1), (MAX_LEN,),
                      BATCH, input_dtype=torch.long, device="cpu")
    for key in ("client_forward_flops", "client_backward_flops", "server_forward_flops",
                "server_backward_flops", "server_backward_params_flops", "activation_bytes"):
        assert getattr(cpu, key) == getattr(prof, key), key


def _error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def _write(tmp_path, raw) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("change, key", [
    ({"data": {"dataset": "digits"}}, "model.name"),  # text model, image data
    ({"model": {"name": "mlp", "cut": 1}}, "model.name"),  # image model, text data
    ({"model": {"name": "minilm", "cut": 6}}, "model.cut"),  # MiniLM has 6 blocks
    ({"model": {"name": "opt", "cut": 3, "config": TINY_OPT}}, "model.cut"),
    ({"model": {"name": "opt", "cut": 1}}, "model.config"),  # random OPT without sizes
    ({"model": {"name": "opt-125m", "cut": 1, "config": {"num_hidden_layers": 2}}}, "model.config"),
    ({"model": {"name": "minilm", "cut": 2, "local_path": "/nowhere"}}, "model.local_path"),
])
def test_bad_text_scenarios_are_rejected_at_validation(text_raw, tmp_path, capsys, change, key):
    """Mismatched text/image pairs and bad cuts or configs exit 2 with one line naming the key."""
    raw = copy.deepcopy(text_raw)
    for section, values in change.items():
        raw[section] = {**raw[section], **values} if section == "data" else dict(values)
    with pytest.raises(ScenarioError) as e:
        validate(raw)
    assert e.value.key == key
    err = _error_line(capsys, ["validate", _write(tmp_path, raw)])
    assert f"{key}:" in err


def test_image_model_rejects_text_only_keys(tiny_raw):
    """model.config belongs to text models only."""
    tiny_raw["model"]["config"] = {"hidden_size": 8}
    with pytest.raises(ScenarioError, match=r"^model\.config:"):
        validate(tiny_raw)


@pytest.mark.parametrize("config, max_len, key", [
    ({**TINY_OPT, "vocab_size": 100}, MAX_LEN, "model.config"),  # tokenizer ids beyond the vocabulary
    (TINY_OPT, 40, "data.max_len"),  # more tokens than positions
    ({**TINY_OPT, "pad_token_id": 1}, MAX_LEN, "model.config"),  # the mask would be wrong
    ({**TINY_OPT, "hidden_sise": 8}, MAX_LEN, "model.config"),  # unknown OPT key
])
def test_bad_text_runs_exit_2_naming_the_key(text_raw, tmp_path, capsys, config, max_len, key):
    """Model/data mismatches found when building the run exit 2 before any training."""
    raw = copy.deepcopy(text_raw)
    raw["model"]["config"] = config
    raw["data"]["max_len"] = max_len
    err = _error_line(capsys, ["run", _write(tmp_path, raw), "--out", str(tmp_path / "o"),
                               "--no-progress"])
    assert err.startswith(f"sflsim: error: {key}:"), err


TINY_MEM = json.dumps(dict(hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                           vocab_size=300, max_position_embeddings=16))


def test_memory_command_prints_a_markdown_table(capsys):
    """``sflsim memory`` prints one row per method; a tracker-measured peak equals the accounted one."""
    code = main(["memory", "--model", "opt", "--config", TINY_MEM, "--cut", "1", "--batch", "2",
                 "--seq-len", "4", "--measure", "--how", "tracker", "--unit", "MB"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | params MB | grads MB")
    assert "measured MB" in rows[0] and "paper" not in rows[0]
    body = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows[1:]}
    assert list(body) == ["fedavg", "fedlora", "splitfed", "mu_splitfed"]
    for cells in body.values():
        assert cells[5] == cells[6]  # peak (meta) == measured (tracker), to the printed digit
    assert float(body["mu_splitfed"][1]) == 0.0 and float(body["fedavg"][1]) > 0  # no ZO gradients


@pytest.mark.slow
def test_memory_command_opt13b_sits_next_to_the_paper(capsys):
    """For OPT-1.3B the paper's GB figures are printed beside the accounting (~10 s on meta)."""
    assert main(["memory", "--model", "opt-1.3b", "--methods", "mu_splitfed"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert "paper GB (OPT-1.3B, SST-2)" in rows[0] and len(rows) == 2
    cells = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert cells[0] == "mu_splitfed" and cells[-1] == "1.05"
    assert 0.8 < float(cells[6]) < 1.05  # accounted peak, GB (docs/memory.md: 0.936)


@pytest.mark.parametrize("argv, key", [
    (["--model", "gpt2"], "--model"),
    (["--model", "minilm", "--cut", "6"], "--cut"),
    (["--model", "opt", "--config", "{hidden"], "--config"),
    (["--model", "opt"], "--config"),
    (["--model", "opt-125m", "--methods", "fedsgd"], "--methods"),
])
def test_memory_command_bad_flags_exit_2(capsys, argv, key):
    """Bad ``sflsim memory`` flags are one line naming the flag, exit code 2."""
    err = _error_line(capsys, ["memory", *argv])
    assert err.startswith(f"sflsim: error: {key}:"), err


def test_text_runs_evaluate_a_stratified_subset_then_the_full_set(text_raw, tmp_path):
    """A text run trains on a 4-sentence subset of the 16 dev sentences (both labels), then
    evaluates all 16 at its end; 17 is refused naming eval.subset (the runner's own check:
    pre-flight only knows GLUE's 872)."""
    import numpy as np

    from simulator.runner import eval_subset

    raw = copy.deepcopy(text_raw)
    raw["eval"]["subset"] = 4
    result = run_scenario(validate(raw), tmp_path / "out")
    rows = result.recorder.metrics
    assert [(m["eval_set"], m["eval_samples"]) for m in rows] == [("subset", 4)] * 3 + [("full", 16)]
    assert result.summary["final_accuracy"] == rows[-1]["test_accuracy"]
    labels = np.array([1] * 8 + [0] * 8)
    assert sorted(labels[eval_subset(validate(raw), labels)].tolist()) == [0, 0, 1, 1]
    raw["eval"]["subset"] = 17
    with pytest.raises(ScenarioError, match=r"^eval\.subset: 17 is more than the 16 samples of the test set"):
        run_scenario(validate(raw), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
