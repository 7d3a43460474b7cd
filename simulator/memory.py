"""Client peak memory of one training step: FedAvg, FedLoRA, SplitFed and MU-SplitFed side by side.

For one model, cut, batch and sequence length, each method's client step is

- ``fedavg``: the whole model, first-order: forward, cross-entropy, backward, optimizer step
  (SGD by default, ``optimizer="adam"`` optional);
- ``fedlora``: LoRA adapters (``peft``, rank ``lora_r`` on the attention query/value
  projections) plus the classification head on the whole model, first-order;
- ``splitfed``: the client part only, first-order (forward, backward of the gradient the
  server sends for ``h``, optimizer step);
- ``mu_splitfed``: the client part only, zeroth-order and in place (the MeZO trick): under
  ``torch.no_grad`` it computes ``h``, perturbs the parameters in place by ``+lam*u``,
  computes ``h+``, by ``-2*lam*u``, computes ``h-``, restores them by ``+lam*u`` and applies
  ``x -= eta * delta / (2*lam) * u``, regenerating ``u`` from a seeded generator each time,
  one chunk at a time, so no parameter-sized buffer ever exists. ``h``, ``h+`` and ``h-`` are
  all kept until the end (a client sends each as soon as it is ready; keeping them is the
  conservative reading).

Every step is measured after one warm-up step (steady state: optimizer state exists, no
gradients are held between steps).

**Accounted** (``account``, always on the ``meta`` device, so OPT-1.3B costs no memory):
parameters held, gradients of the trainable parameters, optimizer state (ZO: the one chunk of
``u`` drawn at a time) and activations. First-order activations are the tensors autograd
saves for backward, captured with ``torch.autograd.graph.saved_tensors_hooks`` during a meta
forward (distinct storages, parameters and inputs excluded); zeroth-order activations are the
kept ``h, h+, h-``. ``total_bytes`` is their sum. ``peak_bytes`` is the peak of live tensor
bytes of the same step run on ``meta`` under ``LiveTensorTracker`` (a ``TorchDispatchMode``):
what a byte-exact allocator would report. The sum is not the peak: first-order backward frees
activations while it creates gradients (the peak lies between ``total - min(act, grads)`` and
about ``total``), and the sum omits short-lived intermediates (a zeroth-order forward's
largest block temporaries).

**Measured** (``measure_step``), a real step on a real device:

- ``cuda``: ``torch.cuda.max_memory_allocated`` over the step, as the paper did;
- ``cpu``, ``how="rss"`` (default): the step runs in a fresh subprocess; the result is the
  persistent tensor bytes (parameters, inputs, optimizer state) plus the growth of the
  process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over its
  resident set just before the step. glibc's mmap threshold is pinned to 64 KiB so that freed
  tensors leave the resident set. Independent of PyTorch's bookkeeping; 4 KiB pages and a few
  hundred KiB to ~2 MiB of non-tensor noise (Python objects, oneDNN primitives);
- ``cpu``, ``how="tracker"``: ``LiveTensorTracker`` around the real CPU step, in process:
  exact for tensor storages, blind to memory that is not a tensor.

This module never touches the simulated clock and never prints.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from simulator.rng import torch_generator

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("fedavg", "fedlora", "splitfed", "mu_splitfed")
DEFAULT_METHODS: tuple[str, ...] = ("fedavg", "fedlora", "splitfed", "mu_splitfed")
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

# Elements of the ZO direction u generated at once: the only transient buffer of a ZO update
# (256 KiB in fp32; the same chunk as simulator.zo.CHUNK_ELEMENTS), instead of one as large as
# the largest parameter (the 50272 x 2048 token embedding of OPT-1.3B is 412 MB).
ZO_CHUNK_ELEMS = 1 << 16
# LoRA targets per architecture: the attention query and value projections (LoRA paper's
# default, and DeComFL's).
LORA_TARGETS = {"opt": ["q_proj", "v_proj"], "minilm": ["query", "value"]}


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
    zo_chunk: int = ZO_CHUNK_ELEMS
    """Elements of the ZO direction generated at once."""

    def __post_init__(self) -> None:
        for key in ("cut", "batch", "seq_len", "lora_r", "num_classes", "zo_chunk"):
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
# Building what a client holds
# --------------------------------------------------------------------------------------------
@dataclass
class ClientWork:
    """The modules, trainable parameters and step function of one method's client."""

    method: str
    module: nn.Module
    trainable: list[nn.Parameter]
    step: Callable[[], None]
    optimizer: Optional[torch.optim.Optimizer] = None
    inputs: list[torch.Tensor] = field(default_factory=list)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _make_optimizer(params: list[nn.Parameter], s: StepSetting) -> torch.optim.Optimizer:
    # foreach=False: per-parameter updates, so Adam's temporaries are one parameter at a time
    # (the multi-tensor path, torch's default on CUDA, allocates temporaries for all
    # parameters at once, e.g. sqrt of the whole second-moment state).
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=1e-5, foreach=False)
    return torch.optim.SGD(params, lr=1e-3, momentum=s.momentum, foreach=False)


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

    cfg = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, bias="none",
                     target_modules=LORA_TARGETS[kind])
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
    dtype = DTYPES[s.dtype]
    ids, y = _inputs(s, _vocab_size(sm), device)
    kind = sm.kind
    if method in ("fedavg", "fedlora"):
        module: nn.Module = whole_model(sm)
        if method == "fedlora":
            with _lora_init_seed(s):
                module = _lora_model(module, kind, s)
    else:
        module = sm.client
        if method == "mu_splitfed":
            # Only the client part is held: drop the server's reference (nothing else keeps it).
            sm.server = None  # type: ignore[assignment]
    module = module.to(dtype=dtype)
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    if method == "mu_splitfed":
        for p in module.parameters():
            p.requires_grad_(False)
        step = _zo_step_fn(module, ids, s)
        return ClientWork(method, module, list(module.parameters()), step, None, [ids, y])
    opt = _make_optimizer(trainable, s)
    if method == "splitfed":
        # The server's gradient dL/dh arrives as a tensor shaped like h.
        step = _fo_client_step_fn(module, opt, ids, s)
    else:
        step = _fo_whole_step_fn(module, opt, ids, y)
    return ClientWork(method, module, trainable, step, opt, [ids, y])


@contextlib.contextmanager
def _lora_init_seed(s: StepSetting):
    """peft initialises the LoRA matrices with torch's global RNG: key it."""
    from simulator.rng import seeded_torch

    with seeded_torch(s.seed, "init", "lora"):
        yield


def _fo_whole_step_fn(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor,
                      y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        loss = nn.functional.cross_entropy(model(ids).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _fo_client_step_fn(client: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor,
                       s: StepSetting) -> Callable[[], None]:
    def step() -> None:
        h = client(ids)
        # Stand-in for the server's dL/dh (its values do not change memory).
        grad_h = torch.full_like(h, 1e-3)
        h.backward(grad_h)
        del h, grad_h
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# --------------------------------------------------------------------------------------------
# Zeroth-order, in place (MeZO)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def perturb_in_place(params: Sequence[torch.Tensor], generator_fn: Callable[[], torch.Generator],
                     scale: float, *, chunk_elems: int = ZO_CHUNK_ELEMS) -> None:
    """``p += scale * u`` for every parameter, with ``u ~ N(0, I)`` regenerated from scratch.

    ``generator_fn()`` must return a freshly seeded generator: calling this twice with the
    same generator key applies the same ``u``. ``u`` is drawn ``chunk_elems`` elements at a
    time, so the only transient buffer is one chunk (never a parameter-sized copy). Note that
    ``+lam*u, -2*lam*u, +lam*u`` restores the parameters only up to float rounding (each
    addition rounds to the parameter's dtype), as in MeZO.
    """
    g = generator_fn()
    for p in params:
        flat = p.view(-1) if p.is_contiguous() else None
        if flat is None:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype, device=p.device), alpha=scale)
            continue
        n = flat.numel()
        for start in range(0, n, chunk_elems):
            stop = min(n, start + chunk_elems)
            z = torch.randn(stop - start, generator=g, dtype=p.dtype, device=p.device)
            flat[start:stop].add_(z, alpha=scale)


def zo_client_step(client: nn.Module, ids: torch.Tensor, *, seed: int, step_index: int = 0,
                   lam: float = 0.005, eta: float = 0.005,
                   server_delta: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]] = None,
                   chunk_elems: int = ZO_CHUNK_ELEMS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One MU-SplitFed client step in place; returns ``(h, h+, h-, delta)``.

    ``server_delta(h, h+, h-)`` stands for the Split Server's answer
    ``F(x_s; h+) - F(x_s; h-)`` (a scalar); by default a fixed 1.0 (memory does not depend
    on it). The direction ``u`` comes from ``rng.torch_generator(seed, "zo", "client",
    step_index)`` on the parameters' device (CPU for meta parameters).
    """
    params = [p for p in client.parameters()]
    dev = params[0].device
    gdev = "cpu" if dev.type == "meta" else dev.type

    def gen() -> torch.Generator:
        return torch_generator(seed, "zo", "client", step_index, device=gdev)

    with torch.no_grad():
        h = client(ids)
        perturb_in_place(params, gen, lam, chunk_elems=chunk_elems)
        h_plus = client(ids)
        perturb_in_place(params, gen, -2.0 * lam, chunk_elems=chunk_elems)
        h_minus = client(ids)
        perturb_in_place(params, gen, lam, chunk_elems=chunk_elems)
        delta = 1.0 if server_delta is None else float(server_delta(h, h_plus, h_minus))
        perturb_in_place(params, gen, -eta * delta / (2.0 * lam), chunk_elems=chunk_elems)
    return h, h_plus, h_minus, delta


def _zo_step_fn(client: nn.Module, ids: torch.Tensor, s: StepSetting) -> Callable[[], None]:
    counter = [0]

    def step() -> None:
        counter[0] += 1
        zo_client_step(client, ids, seed=s.seed, step_index=counter[0], chunk_elems=s.zo_chunk)

    return step


# --------------------------------------------------------------------------------------------
# Accounting on the meta device
# --------------------------------------------------------------------------------------------
def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def saved_activation_bytes(forward: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes autograd saves for backward while running ``forward()`` (works on ``meta``).

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
        out = forward()
    total = int(sum(st.nbytes() for st in seen.values()))
    del out
    seen.clear()
    return total


def zo_chunk_bytes(params: Sequence[torch.Tensor], chunk_elems: int) -> int:
    """Bytes of the largest direction chunk ``perturb_in_place`` draws for ``params``."""
    return max((min(p.numel(), chunk_elems) * p.element_size() for p in params), default=0)


def account(method: str, s: StepSetting) -> dict[str, Any]:
    """Bytes by category for ``method``'s client, from a model built on ``meta``.

    Returns params/grads/optimizer/activation bytes, ``total_bytes`` (their sum) and
    ``peak_bytes``: the peak live tensor bytes of the same step run on ``meta`` under
    ``LiveTensorTracker`` (after a warm-up step), i.e. what an exact allocator would report.
    For ``mu_splitfed`` the optimizer column holds the one direction chunk ``u`` that the
    in-place update draws at a time (it has no other state), and the activations are the
    kept ``h, h+, h-``.
    """
    work = build_client(method, s, device="meta")
    params = list(work.module.parameters())
    params_bytes = _nbytes(params)
    ids, y = work.inputs
    if method == "mu_splitfed":
        with torch.no_grad():
            h = work.module(ids)
        row = dict(method=method, params_bytes=params_bytes, grads_bytes=0,
                   optimizer_bytes=zo_chunk_bytes(params, s.zo_chunk),
                   activation_bytes=3 * h.numel() * h.element_size())
        del h
    else:
        trainable_bytes = _nbytes(work.trainable)
        if s.optimizer == "adam":
            opt_bytes = 2 * trainable_bytes
        else:
            opt_bytes = trainable_bytes if s.momentum > 0 else 0
        if method == "splitfed":
            fwd = lambda: work.module(ids)  # noqa: E731
        else:
            fwd = lambda: nn.functional.cross_entropy(work.module(ids).float(), y)  # noqa: E731
        act = saved_activation_bytes(fwd, exclude=params + [ids, y])
        row = dict(method=method, params_bytes=params_bytes, grads_bytes=trainable_bytes,
                   optimizer_bytes=opt_bytes, activation_bytes=act)
    row["total_bytes"] = (row["params_bytes"] + row["grads_bytes"] + row["optimizer_bytes"]
                          + row["activation_bytes"])
    row["peak_bytes"] = measure_tracker(work)
    return row


# --------------------------------------------------------------------------------------------
# Measuring a real step
# --------------------------------------------------------------------------------------------
def _persistent_bytes(work: ClientWork) -> int:
    tensors: list[torch.Tensor] = list(work.module.parameters()) + list(work.module.buffers())
    tensors += work.inputs
    if work.optimizer is not None:
        for state in work.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    # Distinct storages (tied weights count once).
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return int(sum(seen.values()))


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages and their peak (works on cpu and meta).

    Every storage an op returns (and every tensor given to ``track``) is counted once at its
    full size until the storage is freed (a weakref callback). The peak is taken after each
    op, while the op's inputs are still alive, as a caching allocator would see it. Memory
    that is not a tensor storage (kernel scratch outside tensors, allocator slack, the Python
    heap) is not seen; ``UntypedStorage.resize_`` outside dispatch is not seen either.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0
        self.largest_new = 0  # largest storage created inside the tracker

    def track(self, *tensors: torch.Tensor) -> None:
        """Count tensors created before the tracker was entered (parameters, inputs, state)."""
        for t in tensors:
            self._add(t)
        self.peak = max(self.peak, self.current)
        self.largest_new = 0

    def _freed(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[0] is ref:
            del self._live[key]
            self.current -= entry[1]

    def _add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        key = id(st)
        entry = self._live.get(key)
        if entry is not None and entry[0]() is st:
            return
        nbytes = int(st.nbytes())
        ref = weakref.ref(st, lambda r, key=key: self._freed(key, r))
        self._live[key] = (ref, nbytes)
        self.current += nbytes
        self.largest_new = max(self.largest_new, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _flatten_tensors(out):
            self._add(t)
        if self.current > self.peak:
            self.peak = self.current
        return out


def _flatten_tensors(obj: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    leaves, _ = tree_flatten(obj)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _state_tensors(work: ClientWork) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = list(work.module.parameters()) + list(work.module.buffers())
    tensors += list(work.inputs)
    if work.optimizer is not None:
        for state in work.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += [p.grad for p in work.module.parameters() if p.grad is not None]
    return tensors


def measure_tracker(work: ClientWork, *, warmup: bool = True) -> int:
    """Peak live tensor bytes of one step (after a warm-up step), on cpu or meta."""
    if warmup:
        work.step()  # creates optimizer state, as in a steady-state round
    # No gc.collect() needed: only storages created inside or passed to track() count.
    tracker = LiveTensorTracker()
    tracker.track(*_state_tensors(work))
    with tracker:
        work.step()
    return int(tracker.peak)


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
    persistent = _persistent_bytes(work)
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
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rss.json")
        code = ("import json,sys; from simulator.memory import _rss_worker; "
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
    methods = tuple(methods) if methods is not None else DEFAULT_METHODS
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


class NewStorageTracker(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive: now, peak, largest.

    Storages of ``known`` tensors (parameters, inputs) are never counted, so in-place updates
    of the parameters count nothing: what remains is what a step allocates beyond the model.
    Used to show that a ZO step holds no parameter-sized buffer.
    """

    def __init__(self, known: Sequence[torch.Tensor]):
        super().__init__()
        self._known = {id(t.untyped_storage()) for t in known}
        self._keep = [t.untyped_storage() for t in known]  # keep their ids valid
        self._live: dict[int, int] = {}
        self.current = self.peak = self.largest = 0

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = id(st)
                if key in self._known or key in self._live:
                    continue
                n = int(st.nbytes())
                self._live[key] = n
                weakref.finalize(st, self._freed, key)
                self.current += n
                self.largest = max(self.largest, n)
        self.peak = max(self.peak, self.current)
        return out
