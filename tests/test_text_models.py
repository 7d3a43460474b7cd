"""Split transformer classifiers: the split model reproduces the unsplit transformers model."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from models.text import (  # noqa: E402
    OPT_PRESETS,
    TextSplitModel,
    build_hf_model,
    build_text_model,
    extended_attention_mask,
    known_num_layers,
    minilm_path,
    num_layers,
    tokenizer_for,
    whole_model,
)
from simulator.errors import UserError  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
            vocab_size=500, max_position_embeddings=32)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a shared 2-core machine are far faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(pad: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 500, (4, 9), generator=g)
    ids[0, 6:] = pad  # right padding of different lengths
    ids[1, 2:] = pad
    ids[3, 8:] = pad
    return ids


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_opt_split_matches_unsplit_model(cut):
    """client then server gives OPTForSequenceClassification's logits, padding included."""
    m = build_text_model("opt", cut=cut, num_classes=3, seed=5, config=TINY)
    ref = build_hf_model("opt", num_classes=3, seed=5, config=TINY)
    ids = _ids(m.pad_token_id)
    mask = m.aux(ids)
    with torch.no_grad():
        ours = m.server(m.client(ids), mask)
        theirs = ref(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (4, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_opt_sdpa_attention_matches_eager():
    """The attention implementation does not change the outputs."""
    eager = build_text_model("opt", cut=2, num_classes=2, seed=1, config=TINY)
    sdpa = build_text_model("opt", cut=2, num_classes=2, seed=1,
                            config=dict(TINY, attn_implementation="sdpa"))
    ids = _ids()
    with torch.no_grad():
        a = eager.server(eager.client(ids), eager.aux(ids))
        b = sdpa.server(sdpa.client(ids), sdpa.aux(ids))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_opt_client_is_causal_and_ignores_trailing_padding():
    """Changing token j leaves h[:, :j] unchanged; extra right padding leaves logits unchanged."""
    m = build_text_model("opt", cut=2, num_classes=2, seed=2, config=TINY)
    ids = _ids()
    changed = ids.clone()
    changed[2, 5] = 7
    with torch.no_grad():
        h, h2 = m.client(ids), m.client(changed)
        torch.testing.assert_close(h[2, :5], h2[2, :5])
        assert not torch.allclose(h[2, 5:], h2[2, 5:])
        longer = torch.cat([ids, torch.zeros(4, 3, dtype=torch.long)], dim=1)
        a = m.server(m.client(ids), m.aux(ids))
        b = m.server(m.client(longer), m.aux(longer))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_extended_mask_blocks_future_and_padding():
    """The 4-D additive mask is 0 exactly where a query may attend to a key."""
    mask = torch.tensor([[1, 1, 0]])
    causal = extended_attention_mask(mask, torch.float32, causal=True)[0, 0]
    allowed = causal == 0
    assert allowed.tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    both = extended_attention_mask(mask, torch.float32, causal=False)[0, 0] == 0
    assert both.tolist() == [[True, True, False]] * 3
    assert causal.min() == torch.finfo(torch.float32).min


def test_gradients_flow_from_server_to_client():
    """A first-order split step reaches every client parameter that the batch uses."""
    m = build_text_model("opt", cut=2, num_classes=2, seed=0, config=TINY)
    ids = _ids()
    h = m.client(ids)
    loss = torch.nn.functional.cross_entropy(m.server(h, m.aux(ids)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    block = m.client.blocks[0]
    assert block.fc1.weight.grad is not None and block.fc1.weight.grad.abs().sum() > 0
    assert m.server.head.weight.grad is not None


def test_same_seed_same_weights_and_keyed_init():
    """Weights are a function of the seed only; different seeds give different weights."""
    a = build_text_model("opt", cut=1, num_classes=2, seed=9, config=TINY)
    b = build_text_model("opt", cut=1, num_classes=2, seed=9, config=TINY)
    c = build_text_model("opt", cut=1, num_classes=2, seed=10, config=TINY)
    wa = a.client.blocks[0].fc1.weight
    assert torch.equal(wa, b.client.blocks[0].fc1.weight)
    assert not torch.equal(wa, c.client.blocks[0].fc1.weight)
    state = torch.random.get_rng_state()
    build_text_model("opt", cut=1, num_classes=2, seed=9, config=TINY)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("cut", [0, 4, -1, True, 1.5])
def test_invalid_cut_raises(cut):
    """A cut outside 1..n_layers-1 is a ValueError naming the valid range."""
    with pytest.raises(ValueError, match=r"1\.\.3"):
        build_text_model("opt", cut=cut, num_classes=2, seed=0, config=TINY)


def test_config_errors_are_explicit():
    """Unknown keys, a missing config and an unknown preset each raise ValueError."""
    with pytest.raises(ValueError, match="hiden_size"):
        build_text_model("opt", cut=1, num_classes=2, seed=0, config=dict(TINY, hiden_size=3))
    with pytest.raises(ValueError, match="config="):
        build_text_model("opt", cut=1, num_classes=2, seed=0)
    with pytest.raises(ValueError, match="preset"):
        build_text_model("opt", cut=1, num_classes=2, seed=0, config="opt-7b")
    with pytest.raises(ValueError, match="unknown text model"):
        build_text_model("gpt2", cut=1, num_classes=2, seed=0)


@pytest.mark.parametrize(
    "preset, params",
    [("opt-125m", 125_239_296), ("opt-350m", 331_196_416), ("opt-1.3b", 1_315_758_080)],
)
def test_presets_have_the_published_sizes(preset, params):
    """Presets built on meta have the published parameter counts (plus the class head)."""
    m = build_text_model(preset, cut=2, num_classes=2, seed=0, device="meta")
    n = sum(p.numel() for p in whole_model(m).parameters())
    head = OPT_PRESETS[preset]["word_embed_proj_dim"] * 2
    assert n == params + head
    assert m.n_layers == OPT_PRESETS[preset]["num_hidden_layers"] == num_layers(preset)
    assert next(m.client.parameters()).device.type == "meta"


def test_opt350m_projections_are_split_correctly():
    """opt-350m's project_in goes to the client and project_out to the server."""
    cfg = dict(TINY, preset="opt-350m", hidden_size=32, word_embed_proj_dim=16, ffn_dim=64,
               num_hidden_layers=3, num_attention_heads=4, vocab_size=500)
    m = build_text_model("opt", cut=1, num_classes=2, seed=0, config=cfg)
    ref = build_hf_model("opt", num_classes=2, seed=0, config=cfg)
    assert m.client.embedding.project_in is not None and m.server.project_out is not None
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(m.server(m.client(ids), m.aux(ids)),
                                   ref(input_ids=ids, attention_mask=m.aux(ids)).logits,
                                   rtol=1e-5, atol=1e-6)


def test_minilm_split_reproduces_the_pretrained_encoder():
    """MiniLM features are the mean-pooled last hidden states of the pretrained BertModel."""
    m = build_text_model("minilm", cut=2, num_classes=3, seed=0)
    ref = build_hf_model("minilm", num_classes=3, seed=0)
    tok = tokenizer_for("minilm")
    enc = tok(["the car drives itself", "no"], padding="max_length", max_length=10,
              truncation=True, return_tensors="pt")
    ids = enc["input_ids"]
    assert torch.equal(m.aux(ids), enc["attention_mask"])
    with torch.no_grad():
        feats = m.server.features(m.client(ids), m.aux(ids))
        hidden = ref(input_ids=ids, attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        expect = (hidden * mask).sum(1) / mask.sum(1)
        logits = m.server(m.client(ids), m.aux(ids))
    torch.testing.assert_close(feats, expect, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 3)
    assert m.n_layers == 6 and m.pad_token_id == 0 and m.kind == "minilm"


def test_minilm_weights_are_the_pretrained_ones_and_head_is_seeded():
    """Blocks load the package's weights; only the head depends on the seed."""
    a = build_text_model("minilm", cut=3, num_classes=2, seed=0)
    b = build_text_model("minilm", cut=3, num_classes=2, seed=1)
    assert torch.equal(a.client.blocks[0].output.dense.weight, b.client.blocks[0].output.dense.weight)
    assert not torch.equal(a.server.head.weight, b.server.head.weight)
    with pytest.raises(ValueError, match=r"1\.\.5"):
        build_text_model("minilm", cut=6, num_classes=2, seed=0)


def test_tokenizers_come_from_local_files(monkeypatch):
    """Both kinds get the package's BERT tokenizer offline; a bad local_path is a UserError."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (minilm_path() / "config.json").is_file()
    for kind in ("minilm", "opt"):
        tok = tokenizer_for(kind)
        assert tok.pad_token_id == 0 and len(tok) == 30522
    with pytest.raises(UserError, match="config.json"):
        tokenizer_for("opt", local_path="/nonexistent/opt")


def test_aux_is_the_padding_mask():
    """aux gives the int64 0/1 mask the server needs, computed from the pad id."""
    m = build_text_model("opt", cut=1, num_classes=2, seed=0, config=TINY)
    assert isinstance(m, TextSplitModel)
    mask = m.aux(torch.tensor([[5, 6, 0, 0]]))
    assert mask.dtype == torch.int64 and mask.tolist() == [[1, 1, 0, 0]]


def test_known_num_layers_agrees_with_num_layers():
    """The scenario's block count (no build, no transformers) is num_layers whenever it knows one."""
    for name, config in (("opt", TINY), ("opt", {"preset": "opt-350m"}), ("opt-1.3b", None), ("minilm", None)):
        assert known_num_layers(name, config) == num_layers(name, config)
    assert known_num_layers("opt", {"hidden_size": 8}) is None
    assert known_num_layers("opt", None, "/nowhere") is None


def test_tokenizer_for_loads_on_first_use():
    """tokenizer_for checks the folder now and loads the tokenizer when it is first used."""
    import copy

    from models.text import LocalTokenizer

    tok = tokenizer_for("minilm")
    assert isinstance(tok, LocalTokenizer) and not tok.loaded and "not loaded yet" in repr(tok)
    fp = tok.cache_fingerprint()
    assert not tok.loaded and fp == tokenizer_for("opt").cache_fingerprint()
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= {f[0] for f in fp["files"]}
    with pytest.raises(AttributeError):
        tok._not_a_tokenizer_attribute
    assert not copy.copy(tok).loaded
    ids = tok(["a driverless car"], padding="max_length", max_length=6, return_tensors="pt")["input_ids"]
    assert tok.loaded and ids.shape == (1, 6) and int(ids[0, 0]) == tok.cls_token_id
    assert tok.load() is tok.load()
