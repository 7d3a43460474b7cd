"""Measure what one minibatch costs at a cut: FLOPs per pass, message bytes, parameter bytes.

Numbers are measured, never hard-coded: FLOPs with ``torch.utils.flop_counter.FlopCounterMode``
over a real forward and a real autograd backward, bytes with ``tensor.nbytes``. Profiling must
not change the model: it runs on shadow leaf tensors (``torch.func.functional_call``), so the
model's parameters, ``.grad`` fields, buffers and torch's global RNG are left as they were.
This module prices nothing in seconds (that is the latency models' job).

What FlopCounterMode counts (torch 2.x): matmul-like and convolution ops (mm, addmm, bmm,
convolution and its backward, attention kernels), 2 FLOPs per multiply-add. It does NOT count
pooling, ReLU, softmax / log-softmax, the loss, bias adds, batch norm or other elementwise ops.
For the networks here those are a small share; the numbers are a lower bound on arithmetic.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from models.split import SplitModel
from models.text import ServerWithMask, TextSplitModel


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
    """Server backward: gradients of the server parameters AND dL/dh."""
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


def _count(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn`` under a FlopCounterMode; return (FLOPs counted, fn's result)."""
    with FlopCounterMode(display=False) as counter:
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
    gradient costs only its weight gradient (about 1x its forward, not 2x).
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
