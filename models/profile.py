"""Measure what one minibatch costs at a cut: FLOPs per pass, message bytes, parameter bytes.

Numbers are measured, never hard-coded: FLOPs with ``torch.utils.flop_counter.FlopCounterMode``
over a real forward and a real autograd backward, bytes with ``tensor.nbytes``. Profiling must
not change the model: it runs on shadow leaf tensors (``torch.func.functional_call``), so the
model's parameters, ``.grad`` fields, buffers and torch's global RNG are left as they were.
This module prices nothing in seconds (that is the latency models' job).

Measuring costs seconds the first time in a process (FlopCounterMode and the meta device
import torch._dynamo and sympy), so runs take their profile through ``cached_profile_cut`` /
``cached_profile_text_cut``: an on-disk cache (``cache_dir()``: ``$SFLSIM_CACHE``, else the
user cache) keyed by everything a profile depends on, including the torch version and a digest
of this code. A profile read from the cache equals the measured one, field for field.

What FlopCounterMode counts (torch 2.x): matmul-like and convolution ops (mm, addmm, bmm,
convolution and its backward, attention kernels), 2 FLOPs per multiply-add. It counts pooling,
ReLU and every other non-matmul op as 0. On a CPU those are far from free: max-pooling's
arithmetic is one comparison per input element (k*k per output element, stride k), but
``max_pool2d_with_indices`` takes about 7-10 ns per input element on the reference CPU
(torch 2.13.0, one thread), 370-550 FLOP-equivalents at the matmul rate of the same networks,
and 54-70% of the CNN clients' forward host time. Counting its arithmetic would change nothing;
so the ops below are priced per element with FLOP-EQUIVALENT constants measured on that CPU
(``benchmarks/zo_cost.py``, table 4: host time per element times the FLOP rate of the model's
own first-order server step), added to FlopCounterMode's counts through its
``custom_mapping`` (``NON_MATMUL_FLOPS``). They are machine figures frozen into the profile
(part of this file, so part of the cache key); other non-matmul ops (log-softmax, the loss, bias
adds, batch/layer norm, GELU, softmax) still count 0.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from models.split import SplitModel
from models.text import ServerWithMask, TextSplitModel
from simulator.cache import CACHE_ENV, cache_folder, source_digest, write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CutProfile:
    """Per-minibatch costs of one training step of a split model at one cut."""

    batch_size: int
    """Samples per minibatch; every per-batch number below is for this many samples."""
    activation_shape: tuple[int, ...]
    """Shape of the cut-layer activation h for one batch, e.g. (32, 64, 7, 7)."""
    activation_bytes: int
    """Bytes of h (and of dL/dh, same shape and dtype) in the profiled wire dtype."""
    label_bytes: int
    """Bytes of the batch's int64 labels (sent with h)."""
    client_forward_flops: int
    """Client forward, input -> h."""
    client_backward_flops: int
    """Client backward from dL/dh to the client parameter gradients (0 if nothing trainable)."""
    server_forward_flops: int
    """Server forward h -> logits, INCLUDING the cross-entropy loss (which counts 0, see top)."""
    server_backward_flops: int
    """Server backward: gradients of the server parameters AND dL/dh (a step that answers the
    client: SplitFed's server step, MU-SplitFed's ``server_gradient``)."""
    server_backward_params_flops: int
    """Server backward to the server parameter gradients only, h needing no gradient (a server
    step that sends nothing back: MU-SplitFed's first-order server local steps, GAS's update)."""
    client_param_bytes: int
    """Bytes of all client parameters, in their own dtype (a client model transfer)."""
    server_param_bytes: int
    """Bytes of all server parameters, in their own dtype."""
    client_params: int
    """Number of client parameters (elements)."""
    server_params: int
    """Number of server parameters (elements)."""
    client_trainable_params: int
    """Client parameters with requires_grad (all of them unless some are frozen)."""
    server_trainable_params: int
    """Server parameters with requires_grad."""


def _param_stats(module: nn.Module) -> tuple[int, int, int]:
    """(elements, bytes, trainable elements) of a module's parameters, shared ones counted once."""
    params = list(module.parameters())
    return (
        sum(p.numel() for p in params),
        sum(p.nbytes for p in params),
        sum(p.numel() for p in params if p.requires_grad),
    )


def _shadow_state(module: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """New leaf tensors standing in for a module's parameters and buffers on ``device``.

    On the meta device they carry shape and dtype only. Elsewhere parameters are detached
    (same storage, never written: the forward does not write weights and gradients land on
    the shadow leaves) and buffers are cloned (batch norm updates running stats in place).
    """
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        state[name] = p.detach().to(device).requires_grad_(p.requires_grad)
    for name, b in module.named_buffers():
        state[name] = b.detach().to(device, copy=True)
    return state


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter (float32 if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


#: FLOP-equivalents per element of the non-matmul ops that dominate a small CNN's host time,
#: measured on the reference CPU (2-core shared, torch 2.13.0, one thread; 2026-12-02) by
#: ``benchmarks/zo_cost.py`` table 4: the op's host time per element times the FLOP rate of the
#: model's first-order server step (the rate the simulator's ``flops_per_s`` stands for), a
#: round figure between the AlexNet and small-CNN values. Keyed by aten op; the element count
#: is the op's INPUT (``self``) for pooling and its backward, the tensor for ReLU and its backward.
#: The arithmetic would be 1 comparison per input element for 2x2/stride-2 max-pooling and 1
#: per element for ReLU: the host cost is one to two orders of magnitude above that (memory
#: traffic, the index tensor, the NCHW kernel), so the measured figure is used.
NON_MATMUL_FLOPS: dict[str, int] = {
    "max_pool2d_with_indices": 450,           # forward: max and argmax over each window (373-552)
    "max_pool2d_with_indices_backward": 55,   # zero-fill dL/dx, scatter dL/dy by the indices (42-68)
    "relu": 30,                               # forward (clamp_min; 18-40)
    "relu_": 30,
    "threshold_backward": 20,                 # ReLU's backward: dL/dy where y > 0 (18-20)
}


def _custom_mapping() -> dict:
    """FlopCounterMode's ``custom_mapping``: the ``NON_MATMUL_FLOPS`` prices by aten op."""
    aten = torch.ops.aten
    mapping = {}
    for name, price in NON_MATMUL_FLOPS.items():
        arg = 1 if name == "max_pool2d_with_indices_backward" else 0  # (grad_output, self, ...)
        mapping[getattr(aten, name)] = _per_element_of(price, arg)
    return mapping


def _per_element_of(price: int, arg: int) -> Callable[..., int]:
    """A FlopCounterMode formula (shapes in): ``price`` times the elements of argument ``arg``."""
    def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        n = 1
        for d in args[arg]:
            n *= int(d)
        return price * n
    return formula


def _count(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn`` under a FlopCounterMode with the non-matmul prices; return (FLOP-equivalents
    counted, fn's result)."""
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        result = fn()
    return int(counter.get_total_flops()), result


def profile_cut(
    parts: SplitModel,
    input_shape: tuple[int, ...],
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    input_dtype: torch.dtype | None = None,
    device: str | torch.device = "meta",
) -> CutProfile:
    """Measure one training step of ``parts`` on a batch of zeros of shape (batch, *input_shape).

    Steps measured separately: client forward; server forward incl. cross-entropy against int64
    labels; server backward giving the server parameter gradients and dL/dh (h reaches the
    server as a leaf that requires grad, as in real split learning); client backward from
    dL/dh. ``dtype`` is the wire dtype of h and dL/dh (only bytes depend on it: the passes run
    in the parameters' dtype). ``input_dtype`` defaults to the client's parameter dtype (pass
    torch.long for token ids). ``device="meta"`` (default) runs the same ops on data-less tensors: FLOPs depend
    only on shapes, so this gives the counts of a real run (tests check it against "cpu")
    without the time or memory of one, even for large models.

    Backward FLOPs are what autograd really runs: e.g. a first layer whose input needs no
    gradient costs only its weight gradient (about 1x its forward, not 2x). The server backward
    is measured twice: with dL/dh (``server_backward_flops``) and without
    (``server_backward_params_flops``, h a constant). Counts include the ``NON_MATMUL_FLOPS``
    prices (see the top of this module).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(input_shape) < 1 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be positive sizes, got {input_shape!r}")
    dev = torch.device(device)
    client_state = _shadow_state(parts.client, dev)
    server_state = _shadow_state(parts.server, dev)
    x = torch.zeros(
        (batch_size, *input_shape), dtype=input_dtype or _float_dtype(parts.client), device=dev
    )
    labels = torch.zeros(batch_size, dtype=torch.int64, device=dev)

    # fork_rng: dropout (if any) would otherwise draw from torch's global generator.
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        client_fwd, h = _count(lambda: functional_call(parts.client, client_state, (x,)))
        if not isinstance(h, torch.Tensor) or not h.is_floating_point():
            raise TypeError(
                f"client output must be a floating tensor to profile, got {type(h).__name__}"
            )
        h_server = h.detach().requires_grad_(True)

        def server_forward() -> torch.Tensor:
            logits = functional_call(parts.server, server_state, (h_server,))
            return F.cross_entropy(logits, labels)

        server_fwd, loss = _count(server_forward)
        # .backward(), not autograd.grad: FlopCounterMode's module tracker rejects
        # autograd.grad with a leaf (h_server) among the inputs. Gradients land on the shadow
        # leaves only, never on the model's parameters.
        server_bwd, _ = _count(loss.backward)
        grad_h = h_server.grad
        # Again with h needing no gradient: the backward of a server step that sends nothing
        # back (no dL/dh; e.g. the first layer's input gradient is skipped). Fresh shadow leaves,
        # so the first pass's gradients are not accumulated into.
        params_state = _shadow_state(parts.server, dev)
        h_const = h.detach()

        def server_loss_params_only() -> torch.Tensor:
            return F.cross_entropy(functional_call(parts.server, params_state, (h_const,)), labels)

        server_params_bwd, _ = _count(server_loss_params_only().backward)
        if h.requires_grad:
            client_bwd, _ = _count(lambda: h.backward(grad_h))
        else:
            client_bwd = 0  # nothing on the client side is trainable

    activation_shape = tuple(int(s) for s in h.shape)
    client_n, client_bytes, client_train = _param_stats(parts.client)
    server_n, server_bytes, server_train = _param_stats(parts.server)
    return CutProfile(
        batch_size=batch_size,
        activation_shape=activation_shape,
        activation_bytes=int(torch.empty(activation_shape, dtype=dtype, device="meta").nbytes),
        label_bytes=int(labels.nbytes),
        client_forward_flops=client_fwd,
        client_backward_flops=client_bwd,
        server_forward_flops=server_fwd,
        server_backward_flops=server_bwd,
        server_backward_params_flops=server_params_bwd,
        client_param_bytes=client_bytes,
        server_param_bytes=server_bytes,
        client_params=client_n,
        server_params=server_n,
        client_trainable_params=client_train,
        server_trainable_params=server_train,
    )


def profile_text_cut(parts: TextSplitModel, seq_len: int, batch_size: int) -> CutProfile:
    """``profile_cut`` for a text split model: ids in, (h, mask) to the server.

    ``profile_cut`` calls the server on h only, so the server is wrapped with a ``[B, L]``
    attention mask held as a buffer (shadowed onto ``meta`` like every buffer): the FLOPs are
    those of the real passes, counted by FlopCounterMode on meta (attention included; they
    depend on shapes only, so the mask's values do not matter). The mask travels uplink with
    the labels, so ``label_bytes`` of the returned profile is labels + mask (int64, as
    ``parts.aux`` makes it): what ``sim.send`` prices for the side information.
    """
    mask = torch.ones((batch_size, seq_len), dtype=torch.int64, device="meta")
    wrapped = SplitModel(client=parts.client, server=ServerWithMask(parts.server, mask), cut=parts.cut)
    prof = profile_cut(wrapped, (seq_len,), batch_size, input_dtype=torch.long)
    return dataclasses.replace(prof, label_bytes=prof.label_bytes + int(mask.nbytes))


# --------------------------------------------------------------------------------------------
# The on-disk cache of cut profiles
# --------------------------------------------------------------------------------------------
#: Bumped when the entry format changes (older entries are then simply not found).
CACHE_FORMAT = 2  # 2: server_backward_params_flops and the NON_MATMUL_FLOPS prices
#: The code a profile depends on: the measurement and the model definitions.
_PROFILED_CODE = ("profile.py", "split.py", "zoo.py", "text.py", "specs.py")


def cache_dir() -> Optional[Path]:
    """The folder of cached cut profiles (``profiles/`` of ``simulator.cache``), or None when
    ``$SFLSIM_CACHE`` is ``off``."""
    return cache_folder("profiles")


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 of the source of the profiling and model code: an edit there invalidates entries."""
    return source_digest(Path(__file__).resolve().parent, _PROFILED_CODE)


def _structure(parts: Any) -> str:
    """SHA-256 of the two parts' architecture: module reprs, parameter and buffer names, shapes,
    dtypes and trainable flags (a frozen parameter changes the backward)."""
    h = hashlib.sha256()
    for side in (parts.client, parts.server):
        h.update(repr(side).encode())
        for name, p in side.named_parameters():
            h.update(f"\0p {name} {tuple(p.shape)} {p.dtype} {p.requires_grad}".encode())
        for name, b in side.named_buffers():
            h.update(f"\0b {name} {tuple(b.shape)} {b.dtype}".encode())
    return h.hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _from_entry(entry: Any, key: dict) -> CutProfile:
    """The profile of a parsed cache entry; ValueError saying what is wrong with it."""
    if not isinstance(entry, dict) or set(entry) != {"key", "profile", "checksum"}:
        raise ValueError("not a cache entry")
    if entry["checksum"] != hashlib.sha256(_canonical([entry["key"], entry["profile"]]).encode()).hexdigest():
        raise ValueError("checksum mismatch")
    if entry["key"] != key:
        raise ValueError("it belongs to another key")
    data = entry["profile"]
    names = [f.name for f in dataclasses.fields(CutProfile)]
    if not isinstance(data, dict) or sorted(data) != sorted(names):
        raise ValueError("fields differ from CutProfile's")
    values = {}
    for name in names:
        v = data[name]
        if name == "activation_shape":
            if not isinstance(v, list) or not all(type(s) is int and s > 0 for s in v):
                raise ValueError("activation_shape is not a list of positive integers")
            v = tuple(v)
        elif type(v) is not int or v < 0:
            raise ValueError(f"{name} is not a non-negative integer")
        values[name] = v
    return CutProfile(**values)


def cached(key: Mapping[str, Any], measure: Callable[[], CutProfile], folder: Optional[Path] = None) -> CutProfile:
    """The profile stored under ``key`` in ``folder`` (default ``cache_dir()``), else ``measure()``,
    stored for next time.

    ``key`` must hold everything the profile depends on (JSON values); the torch version, a
    digest of the profiling and model code and the ``NON_MATMUL_FLOPS`` prices are added here. An entry is checked before it is
    used (its own checksum, its full key, every field's type): a corrupt or foreign entry is
    logged and measured again, never used. A cache that cannot be written is logged and the
    measured profile returned.
    """
    folder = cache_dir() if folder is None else Path(folder)
    if folder is None:
        return measure()
    full = {**key, "format": CACHE_FORMAT, "torch": torch.__version__, "code": _code_digest(),
            "non_matmul_flops": dict(NON_MATMUL_FLOPS)}  # the prices as they are now, even if patched
    full = json.loads(_canonical(full))  # the key as it reads back from JSON (tuples -> lists)
    path = folder / f"{hashlib.sha256(_canonical(full).encode()).hexdigest()[:40]}.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot read the cut-profile cache entry %s (%s); measuring the profile", path, e.strerror)
    else:
        try:
            prof = _from_entry(json.loads(raw.decode("utf-8")), full)
            log.debug("cut profile from the cache: %s", path)
            return prof
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            log.warning("corrupt cut-profile cache entry %s (%s); measuring the profile again", path,
                        " ".join(str(e).split())[:200])
    t0 = time.perf_counter()
    prof = measure()
    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(prof).items()}
    entry = {"key": full, "profile": data,
             "checksum": hashlib.sha256(_canonical([full, data]).encode()).hexdigest()}
    try:
        write_atomic(path, (json.dumps(entry, indent=1, sort_keys=True) + "\n").encode("utf-8"))
        log.info("measured the cut profile in %.2f s; cached in %s", time.perf_counter() - t0, path)
    except OSError as e:
        log.warning("cannot write the cut-profile cache %s (%s); the profile is measured on every run "
                    "(set %s to a writable folder, or to off)", folder, e.strerror or e, CACHE_ENV)
    return prof


def cached_profile_cut(parts: SplitModel, input_shape: tuple[int, ...], batch_size: int, *,
                       model: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                       input_dtype: torch.dtype | None = None, device: str | torch.device = "meta",
                       folder: Optional[Path] = None) -> CutProfile:
    """``profile_cut`` through the disk cache (``cached``).

    ``model``: the model's name and constructor arguments (e.g. ``{"name": "alexnet",
    "in_channels": 1, "num_classes": 10, "input_hw": [28, 28]}``); the key also holds the cut,
    a digest of the built parts' architecture, the input shape, the batch, the dtypes and the
    profiling device.
    """
    key = {"profile": "image", "model": dict(model), "cut": parts.cut, "structure": _structure(parts),
           "input_shape": list(input_shape), "batch_size": batch_size, "dtype": str(dtype),
           "input_dtype": str(input_dtype), "device": str(device)}
    return cached(key, lambda: profile_cut(parts, input_shape, batch_size, dtype, input_dtype=input_dtype,
                                           device=device), folder)


def cached_profile_text_cut(parts: TextSplitModel, seq_len: int, batch_size: int, *, model: Mapping[str, Any],
                            folder: Optional[Path] = None) -> CutProfile:
    """``profile_text_cut`` through the disk cache; ``model`` as for ``cached_profile_cut``
    (name, config, local_path, classes). The transformers version is part of the key."""
    from importlib.metadata import version

    key = {"profile": "text", "model": dict(model), "cut": parts.cut, "structure": _structure(parts),
           "seq_len": seq_len, "batch_size": batch_size, "transformers": version("transformers")}
    return cached(key, lambda: profile_text_cut(parts, seq_len, batch_size), folder)
