"""Client peak memory of one training step: FedAvg, FedLoRA, SplitFed and MU-SplitFed side by side.

A measuring tool, not part of the event loop: the split methods' steps are the algorithms' own
functions, so the memory measured is that of the step a simulated run executes.

- ``fedavg``: the whole model, first-order: forward, cross-entropy, backward, ``torch.optim``
  step (SGD by default, ``optimizer="adam"`` optional). sflsim has no FedAvg algorithm, so
  this step is torch's;
- ``fedlora``: LoRA adapters (``peft``, rank ``lora_r`` on the attention query/value
  projections) plus the classification head on the whole model, first-order, as ``fedavg``;
- ``splitfed``: the client part only, as SplitFed's client runs it: forward with
  ``algorithms.common.forward`` on views of the parameters that require grad, then
  ``algorithms.splitfed.client_backward_step`` with the ``dL/dh`` the server sends (SGD with
  the algorithm's momentum buffers; ``optimizer="adam"``: the same gradients, torch's Adam);
- ``mu_splitfed``: the client part only, zeroth-order and in place, as MU-SplitFed's client
  runs it: ``client_activation`` (h), then per perturbation ``probe_plus`` (h+) and
  ``probe_minus`` (h-, then the restore), then ``client_zo_update``, all from
  ``algorithms.mu_splitfed`` on ``simulator.zo``'s in-place perturbation (u regenerated from a
  seed, ``zo.CHUNK_ELEMENTS`` float32 values at a time, so no parameter-sized buffer ever
  exists). The estimator settings are ``algorithms.common.ZOConfig``'s defaults (lam, P,
  Gaussian directions). ``h``, ``h+`` and ``h-`` are all kept until the update (the client
  sends each as soon as it is ready and the simulated server holds them until it answers:
  the conservative reading). The server's loss difference is a stand-in (1.0): the client's
  memory does not depend on its value.

Every step is measured after one warm-up step (steady state: optimizer state exists, no
gradients are held between steps).

**Accounted** (``account``, always on the ``meta`` device, so OPT-1.3B costs no memory):
parameters held, gradients of the trainable parameters, optimizer state (ZO: the one float32
chunk of ``u`` drawn at a time) and activations. First-order activations are the tensors
autograd saves for backward, captured with ``torch.autograd.graph.saved_tensors_hooks`` during
a meta forward (distinct storages, parameters and inputs excluded); zeroth-order activations
are the kept ``h`` and the 2P perturbed ones. ``total_bytes`` is their sum. ``peak_bytes`` is
the peak of live tensor bytes of the same step run on ``meta`` under ``StorageTracker`` (a
``TorchDispatchMode``): what a byte-exact allocator would report. The sum is not the peak:
first-order backward frees activations while it creates gradients, and the sum omits
short-lived intermediates (a zeroth-order forward's largest block temporaries).

**Measured** (``measure_step``), a real step on a real device:

- ``cuda``: ``torch.cuda.max_memory_allocated`` over the step, as the paper did;
- ``cpu``, ``how="rss"`` (default): the step runs in a fresh subprocess; the result is the
  persistent tensor bytes (parameters, inputs, optimizer state) plus the growth of the
  process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over its
  resident set just before the step. glibc's mmap threshold is pinned to 64 KiB so that freed
  tensors leave the resident set. Independent of PyTorch's bookkeeping; 4 KiB pages and a few
  hundred KiB to ~2 MiB of non-tensor noise (Python objects, oneDNN primitives);
- ``cpu``, ``how="tracker"``: ``StorageTracker`` around the real CPU step, in process:
  exact for tensor storages, blind to memory that is not a tensor.

This module never touches the simulated clock and never prints.
"""
from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from simulator import zo
from simulator.algorithms import mu_splitfed, splitfed
from simulator.algorithms.common import Params, ZOConfig, forward, leaf
from simulator.rng import torch_generator

METHODS: tuple[str, ...] = ("fedavg", "fedlora", "splitfed", "mu_splitfed")
MEASURE_METHODS: tuple[str, ...] = ("tracker", "rss")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
COLUMNS: tuple[str, ...] = (
    "method", "params_bytes", "grads_bytes", "optimizer_bytes", "activation_bytes",
    "total_bytes", "peak_bytes", "measured_peak_bytes",
)
# LoRA targets per architecture: the attention query and value projections (LoRA paper's
# default, and DeComFL's).
LORA_TARGETS = {"opt": ["q_proj", "v_proj"], "minilm": ["query", "value"]}
# Step sizes of the measured steps (their values do not change memory).
FO_LR, ADAM_LR = 1e-3, 1e-5
ZO_LR = 0.005  # MU-SplitFed's lr_client default (the paper's eta_c)
ZO_DELTA = 1.0  # stand-in for the server's F(x_s; h+) - F(x_s; h-)


@dataclass(frozen=True)
class StepSetting:
    """Everything that decides one client step's memory."""

    model_kind: str
    """``opt``, ``minilm`` or an OPT preset name (``opt-125m``, ``opt-350m``, ``opt-1.3b``)."""
    cut: int
    """Blocks on the client (split methods); FedAvg/FedLoRA hold the whole model regardless."""
    batch: int
    """Minibatch size B."""
    seq_len: int
    """Padded sequence length L (every token real: no padding)."""
    config: Any = None
    """Model config (a dict of OPT sizes or a preset name), see ``models.text``."""
    local_path: Optional[str] = None
    """Directory of real OPT weights (optional)."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32, float16 or bfloat16."""
    optimizer: str = "sgd"
    """First-order optimizer: ``sgd`` (no state unless momentum > 0) or ``adam`` (2 states)."""
    momentum: float = 0.0
    """SGD momentum (a state the size of the trainable parameters when > 0)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    num_classes: int = 2
    """Classes of the head (SST-2: 2)."""
    seed: int = 0
    """Seed for weights (``init`` stream), inputs (``data``) and ZO directions (``zo``)."""

    def __post_init__(self) -> None:
        for key in ("cut", "batch", "seq_len", "lora_r", "num_classes"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {self.momentum}")


# --------------------------------------------------------------------------------------------
# Counting live tensor storages
# --------------------------------------------------------------------------------------------
class StorageTracker(TorchDispatchMode):
    """Bytes of live tensor storages while the mode is on (cpu, cuda and meta alike).

    ``held`` tensors (parameters, inputs, optimizer state: what exists before the step) are
    counted in ``held_bytes``; every storage an op returns inside the mode is a new one,
    counted in ``current`` at its full size until it is freed (a weakref callback). Each
    distinct storage counts once (views and in-place results of a known storage count nothing).
    After each op, while its inputs are still alive (as a caching allocator sees it):

    - ``peak``: the most bytes of new storages alive at once (what the step allocates beyond
      what it was given);
    - ``largest``: the largest new storage (a ZO step's should be one chunk of u, never a
      parameter-sized buffer);
    - ``peak_total``: the most bytes of held and new storages alive at once (the step's peak
      memory, what an exact allocator would report).

    Memory that is not a tensor storage (kernel scratch outside tensors, allocator slack, the
    Python heap) is not seen; ``UntypedStorage.resize_`` outside dispatch is not seen either.
    """

    def __init__(self, held: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int, bool]] = {}  # id -> (ref, bytes, new?)
        self.held_bytes = 0
        self.current = self.peak = self.largest = 0
        for t in held:
            self._add(t, new=False)
        self.peak_total = self.held_bytes

    def _freed(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[0] is ref:
            del self._live[key]
            if entry[2]:
                self.current -= entry[1]
            else:
                self.held_bytes -= entry[1]

    def _add(self, t: torch.Tensor, *, new: bool) -> None:
        st = t.untyped_storage()
        key = id(st)
        entry = self._live.get(key)
        if entry is not None and entry[0]() is st:
            return
        nbytes = int(st.nbytes())
        ref = weakref.ref(st, lambda r, key=key: self._freed(key, r))
        self._live[key] = (ref, nbytes, new)
        if new:
            self.current += nbytes
            self.largest = max(self.largest, nbytes)
        else:
            self.held_bytes += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t, new=True)
        self.peak = max(self.peak, self.current)
        self.peak_total = max(self.peak_total, self.held_bytes + self.current)
        return out


# --------------------------------------------------------------------------------------------
# Building what a client holds, and its step
# --------------------------------------------------------------------------------------------
@dataclass
class ClientWork:
    """What one method's client holds and its step function.

    ``params`` are the tensors the step updates (the split methods: views of the module's
    parameters, as the algorithms' parameter dicts); ``state`` the algorithm's buffers
    (SplitFed's momentum) that persist across steps.
    """

    method: str
    module: nn.Module
    params: Params
    trainable: list[torch.Tensor]
    step: Callable[[], None]
    optimizer: Optional[torch.optim.Optimizer] = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    state: dict = field(default_factory=dict)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _make_optimizer(params: list[torch.Tensor], s: StepSetting) -> torch.optim.Optimizer:
    # foreach=False: per-parameter updates, so Adam's temporaries are one parameter at a time
    # (the multi-tensor path, torch's default on CUDA, allocates temporaries for all
    # parameters at once, e.g. sqrt of the whole second-moment state).
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=ADAM_LR, foreach=False)
    return torch.optim.SGD(params, lr=FO_LR, momentum=s.momentum, foreach=False)


def _inputs(s: StepSetting, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch_generator(s.seed, "data", "memory")
    # Ids >= 2 avoid the pad ids in use (0 in BERT vocabularies, 1 in OPT's): every token is
    # real, so the step costs what a batch of sequences of exactly seq_len tokens costs.
    ids = torch.randint(2, vocab, (s.batch, s.seq_len), generator=g)
    y = torch.randint(0, s.num_classes, (s.batch,), generator=g)
    return ids.to(device), y.to(device)


def _vocab_size(split_model: Any) -> int:
    emb = split_model.client.embedding
    inner = getattr(emb, "embed_tokens", None) or emb.embeddings.word_embeddings
    return int(inner.num_embeddings)


def _check_positions(split_model: Any, seq_len: int) -> None:
    emb = split_model.client.embedding
    if hasattr(emb, "embed_positions"):
        n = emb.embed_positions.num_embeddings - emb.offset
    else:
        n = emb.embeddings.position_embeddings.num_embeddings
    if seq_len > n:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {n} positions")


def _lora_model(whole: nn.Module, kind: str, s: StepSetting) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from simulator.rng import seeded_torch

    cfg = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, bias="none",
                     target_modules=LORA_TARGETS[kind])
    with seeded_torch(s.seed, "init", "lora"):  # peft initialises LoRA with torch's global RNG
        model = get_peft_model(whole, cfg)
    # The classification head is new, so it is trained too (as PEFT's SEQ_CLS task does).
    for p in whole.server.head.parameters():
        p.requires_grad_(True)
    return model


def build_client(method: str, s: StepSetting, device: Union[str, torch.device] = "cpu") -> ClientWork:
    """Build what ``method``'s client holds on ``device`` (``meta`` for shapes only)."""
    from models.text import build_text_model, whole_model

    _check_method(method)
    device = torch.device(device)
    sm = build_text_model(s.model_kind, cut=s.cut, num_classes=s.num_classes, seed=s.seed,
                          config=s.config, local_path=s.local_path, device=device)
    _check_positions(sm, s.seq_len)
    ids, y = _inputs(s, _vocab_size(sm), device)
    if method in ("fedavg", "fedlora"):
        module: nn.Module = whole_model(sm)
        if method == "fedlora":
            module = _lora_model(module, sm.kind, s)
    else:
        module = sm.client
        sm.server = None  # type: ignore[assignment]  # only the client part is held
    module = module.to(dtype=DTYPES[s.dtype])
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    if method in ("fedavg", "fedlora"):
        opt = _make_optimizer(trainable, s)
        params = {k: p for k, p in module.named_parameters()}
        return ClientWork(method, module, params, trainable, _whole_step(module, opt, ids, y), opt, [ids, y])
    # The algorithms' parameter dicts: here views of the module's parameters (no copy).
    params = {k: p.detach() for k, p in module.named_parameters()}
    work = ClientWork(method, module, params, list(params.values()), lambda: None, None, [ids, y])
    if method == "mu_splitfed":
        work.step = _zo_client_step(work, s)
    else:
        work.optimizer = _make_optimizer(work.trainable, s) if s.optimizer == "adam" else None
        work.step = _fo_client_step(work, s)
    return work


def _whole_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor,
                y: torch.Tensor) -> Callable[[], None]:
    """FedAvg / FedLoRA: forward, cross-entropy, backward, optimizer step."""
    def step() -> None:
        loss = nn.functional.cross_entropy(model(ids).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _fo_client_step(work: ClientWork, s: StepSetting) -> Callable[[], None]:
    """SplitFed's client (``SplitRounds.fo_exchange``): forward, then ``client_backward_step``."""
    cfg = SimpleNamespace(lr_client=FO_LR, momentum=s.momentum, weight_decay=0.0)
    module, params, opt = work.module, work.params, work.optimizer
    ids = work.inputs[0]

    def step() -> None:
        p = leaf(params)
        h = forward(module, p, ids)
        dh = torch.full_like(h, 1e-3)  # stand-in for the server's dL/dh (values do not change memory)
        if opt is None:
            splitfed.client_backward_step(params, p, h, dh, cfg, work.state)
        else:  # Adam: the algorithm's gradients, torch's update (the algorithms step with SGD)
            grads = torch.autograd.grad(h, list(p.values()), grad_outputs=dh)
            for t, g in zip(params.values(), grads):
                t.grad = g
            del grads
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def zo_settings() -> ZOConfig:
    """The ZO estimator the measured MU-SplitFed client uses: the algorithms' defaults."""
    return ZOConfig()


def zo_step_seeds(s: StepSetting, step_index: int) -> list[int]:
    """Direction seeds of the measured ZO client's ``step_index``-th step (1, 2, ...)."""
    return [zo.zo_seed(s.seed, "memory", "client", step_index, p) for p in range(zo_settings().perturbations)]


def _zo_client_step(work: ClientWork, s: StepSetting) -> Callable[[], None]:
    """MU-SplitFed's client (``SplitRounds.zo_exchange``): h, (h+, h-) per direction, update."""
    zc = zo_settings()
    module, params = work.module, work.params
    ids = work.inputs[0]
    counter = [0]

    def step() -> None:
        counter[0] += 1
        seeds = zo_step_seeds(s, counter[0])
        h = mu_splitfed.client_activation(module, params, ids)
        pairs = []
        for seed in seeds:
            hp = mu_splitfed.probe_plus(module, params, ids, seed, zc.lam, zc.direction)
            hm = mu_splitfed.probe_minus(module, params, ids, seed, zc.lam, zc.direction)
            pairs.append((hp, hm))
        mu_splitfed.client_zo_update(params, seeds, [ZO_DELTA] * len(seeds), zc.lam, ZO_LR, zc.direction)
        del h, pairs  # kept until the update, as the simulated exchange keeps them

    return step


# --------------------------------------------------------------------------------------------
# Accounting on the meta device
# --------------------------------------------------------------------------------------------
def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors`` (tied weights and views count once)."""
    seen = {id(st): st for st in (t.untyped_storage() for t in tensors)}
    return int(sum(st.nbytes() for st in seen.values()))


def saved_activation_bytes(forward_fn: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes autograd saves for backward while running ``forward_fn()`` (works on ``meta``).

    Each distinct storage counts once at its full size; storages of ``exclude`` (parameters,
    inputs) do not count. Saved tensors are held until the call returns, so storages are not
    freed and reused while being counted.
    """
    excluded = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = st._cdata
        if key not in excluded and key not in seen:
            seen[key] = st
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward_fn()
    total = int(sum(st.nbytes() for st in seen.values()))
    del out
    seen.clear()
    return total


def zo_chunk_bytes(params: Sequence[torch.Tensor]) -> int:
    """Bytes of the largest chunk of u that ``zo.perturb_`` draws for ``params`` (float32)."""
    return max((min(p.numel(), zo.CHUNK_ELEMENTS) * 4 for p in params), default=0)


def account(method: str, s: StepSetting) -> dict[str, Any]:
    """Bytes by category for ``method``'s client, from a model built on ``meta``.

    Returns params/grads/optimizer/activation bytes, ``total_bytes`` (their sum) and
    ``peak_bytes``: the peak live tensor bytes of the same step run on ``meta`` under
    ``StorageTracker`` (after a warm-up step), i.e. what an exact allocator would report.
    For ``mu_splitfed`` the optimizer column holds the one chunk of ``u`` that the in-place
    passes draw at a time (it has no other state), and the activations are the kept ``h``
    and 2P perturbed activations.
    """
    work = build_client(method, s, device="meta")
    params = list(work.module.parameters())
    ids, y = work.inputs
    if method == "mu_splitfed":
        h = mu_splitfed.client_activation(work.module, work.params, ids)
        row = dict(method=method, params_bytes=_nbytes(params), grads_bytes=0,
                   optimizer_bytes=zo_chunk_bytes(params),
                   activation_bytes=(1 + 2 * zo_settings().perturbations) * h.numel() * h.element_size())
        del h
    else:
        trainable_bytes = _nbytes(work.trainable)
        if s.optimizer == "adam":
            opt_bytes = 2 * trainable_bytes
        else:
            opt_bytes = trainable_bytes if s.momentum > 0 else 0
        if method == "splitfed":
            fwd = lambda: forward(work.module, leaf(work.params), ids)  # noqa: E731
        else:
            fwd = lambda: nn.functional.cross_entropy(work.module(ids).float(), y)  # noqa: E731
        act = saved_activation_bytes(fwd, exclude=params + [ids, y])
        row = dict(method=method, params_bytes=_nbytes(params), grads_bytes=trainable_bytes,
                   optimizer_bytes=opt_bytes, activation_bytes=act)
    row["total_bytes"] = (row["params_bytes"] + row["grads_bytes"] + row["optimizer_bytes"]
                          + row["activation_bytes"])
    row["peak_bytes"] = measure_tracker(work)
    return row


# --------------------------------------------------------------------------------------------
# Measuring a real step
# --------------------------------------------------------------------------------------------
def _state_tensors(work: ClientWork) -> list[torch.Tensor]:
    """Everything that exists between steps: parameters, buffers, inputs, optimizer state, grads."""
    tensors: list[torch.Tensor] = list(work.module.parameters()) + list(work.module.buffers())
    tensors += list(work.params.values()) + list(work.inputs)
    tensors += [v for v in work.state.values() if isinstance(v, torch.Tensor)]
    if work.optimizer is not None:
        for state in work.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += [t.grad for t in tensors if t.grad is not None]
    return tensors


def measure_tracker(work: ClientWork, *, warmup: bool = True) -> int:
    """Peak live tensor bytes of one step (after a warm-up step), on cpu or meta."""
    if warmup:
        work.step()  # creates optimizer state, as in a steady-state round
    # No gc.collect() needed: only storages created inside or held at entry count.
    tracker = StorageTracker(held=_state_tensors(work))
    with tracker:
        work.step()
    return int(tracker.peak_total)


def measure_cuda(work: ClientWork) -> int:
    """``torch.cuda.max_memory_allocated`` over one step after a warm-up step."""
    work.step()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    work.step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def _read_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _rss_worker(args: dict[str, Any], out_path: str) -> None:
    """Subprocess body for ``measure_rss``: build, warm up, reset VmHWM, step, report."""
    import ctypes

    torch.set_num_threads(int(args.pop("threads")))
    method = args.pop("method")
    s = StepSetting(**args)
    work = build_client(method, s, device="cpu")
    work.step()  # warm-up: optimizer state, thread pools, oneDNN caches
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    base_kib = _read_status_kib("VmRSS")
    persistent = _storage_bytes(_state_tensors(work))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    work.step()
    peak_kib = _read_status_kib("VmHWM")
    Path(out_path).write_text(json.dumps(
        dict(base_kib=base_kib, peak_kib=peak_kib, persistent_bytes=persistent,
             measured_peak_bytes=persistent + (peak_kib - base_kib) * 1024)
    ))


def measure_rss(method: str, s: StepSetting, *, threads: Optional[int] = None,
                timeout_s: float = 3600.0) -> int:
    """Peak of one real CPU step in a fresh subprocess (persistent tensors + RSS growth)."""
    _check_method(method)
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("measure='rss' needs Linux /proc/self/clear_refs")
    args = asdict(s)
    args.update(method=method, threads=threads or torch.get_num_threads())
    env = dict(os.environ)
    # Large blocks via mmap and returned to the kernel on free(): RSS follows live tensors.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rss.json")
        code = (f"import json,sys; from {__name__} import _rss_worker; "
                "_rss_worker(json.loads(sys.argv[1]), sys.argv[2])")
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args), out], env=env,
                              cwd=root, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"rss measurement of {method} failed:\n{proc.stderr[-3000:]}")
        return int(json.loads(Path(out).read_text())["measured_peak_bytes"])


def measure_step(method: str, s: StepSetting, *, device: str = "cpu",
                 how: str = "rss") -> int:
    """Measured peak bytes of one real client step of ``method`` (see module docs)."""
    _check_method(method)
    dev = torch.device(device)
    if dev.type == "cuda":
        return measure_cuda(build_client(method, s, device=dev))
    if dev.type != "cpu":
        raise ValueError(f"measurement runs on cpu or cuda, not {device!r}")
    if how == "rss":
        return measure_rss(method, s)
    if how != "tracker":
        raise ValueError(f"how must be one of {', '.join(MEASURE_METHODS)}, got {how!r}")
    return measure_tracker(build_client(method, s, device=dev))


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
def memory_table(
    model_kind: str,
    *,
    cut: int,
    batch: int,
    seq_len: int,
    config: Any = None,
    measure: bool = False,
    device: str = "cpu",
    how: str = "rss",
    methods: Optional[Sequence[str]] = None,
    local_path: Optional[str] = None,
    dtype: str = "float32",
    optimizer: str = "sgd",
    momentum: float = 0.0,
    lora_r: int = 8,
    num_classes: int = 2,
    seed: int = 0,
):
    """One row per method: accounted bytes by category and, if ``measure``, the measured peak.

    Columns: method, params_bytes, grads_bytes, optimizer_bytes, activation_bytes,
    total_bytes (their sum), peak_bytes (the step's peak simulated on ``meta``),
    measured_peak_bytes (NaN when not measured). ``device`` and ``how`` choose the
    measurement (``cuda``: allocator peak; ``cpu``: ``rss`` or ``tracker``); the accounting
    always runs on ``meta``. The setting is kept in ``df.attrs``.
    """
    import pandas as pd

    s = StepSetting(model_kind=model_kind, cut=cut, batch=batch, seq_len=seq_len,
                    config=config, local_path=local_path, dtype=dtype, optimizer=optimizer,
                    momentum=momentum, lora_r=lora_r, num_classes=num_classes, seed=seed)
    methods = tuple(methods) if methods is not None else METHODS
    for m in methods:
        _check_method(m)
    rows = []
    for m in methods:
        row = account(m, s)
        row["measured_peak_bytes"] = (
            float(measure_step(m, s, device=device, how=how)) if measure else math.nan
        )
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.attrs.update(asdict(s))
    df.attrs["measured_with"] = (
        ("cuda max_memory_allocated" if torch.device(device).type == "cuda" else how)
        if measure else None
    )
    return df
