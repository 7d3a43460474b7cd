"""Zeroth-order (ZO) estimation, seeded: in place on the client (the MeZO trick), drawn once on the server.

Two-point central difference (SPSA) with P perturbations and smoothing radius ``lam``::

    g = (1/P) * sum_p [F(x + lam*u_p) - F(x - lam*u_p)] / (2*lam) * u_p

Two paths compute it, with the same directions and the same floating-point results:

- **Client path** (``perturb_``, ``probe_pair``, ``zo_probe``, ``zo_update_``; MU-SplitFed's
  clients, GAS's ZO clients): a direction ``u_p`` is never stored. It is regenerated, chunk by
  chunk, from its seed each time it is needed (to perturb, to restore, to update), and the
  parameters are perturbed IN PLACE, so a step holds no second copy of the parameters. The
  only temporary is one chunk of ``u`` (``CHUNK_ELEMENTS`` float32 values, 256 KiB), whatever
  the model's size: the memory saving is the point (docs/memory.md). The elementwise ops work
  on slices of at most ``SERIAL_ELEMENTS`` values, so they never fork threads.
- **Server path** (``zo_step_``; MU-SplitFed's Split Server): each direction is drawn ONCE per
  step (``draw_direction``) and kept until the update, ``(P + 1) * d`` float32 values: one
  generation per direction instead of four. It replays the client path's operations element
  for element (+lam u, -2 lam u, +lam u in place, then the update), so it leaves the same bits;
  its elementwise ops run on the calling thread only (``_on_one_thread``), the forwards on all.

Everything here runs under ``torch.no_grad``: no autograd graph.

Directions (``direction``):

- ``gaussian``: u ~ N(0, I) (the authors' code base, DeComFL, and MeZO);
- ``sphere``: u uniform on the sphere of radius sqrt(d) over ALL parameters jointly (the
  MU-SplitFed paper), i.e. ``u = sqrt(d) * z / ||z||`` with z the Gaussian draw. ``||z||^2`` is
  the float64 sum of the float32 dot products of z's ``NORM_BLOCK``-value blocks. The client
  path needs a first pass that regenerates every chunk without touching the parameters (one
  extra generation pass), cached per (seed, sizes), so a probe and its update pay it once; the
  server path sums the same blocks of its kept draw (no extra generation).

Both satisfy E[u u^T] = I, so the estimator is unbiased for the gradient of the smoothed loss.

The random layout: seeds come from ``zo_seed`` (stream ``zo`` of ``simulator.rng``); a seed's
values are drawn from one torch generator, tensor by tensor in parameter order, each tensor in
consecutive calls of ``CHUNK_ELEMENTS`` values (its last call shorter). Changing
``CHUNK_ELEMENTS`` or the parameters' sizes or order changes the directions (not their
distribution): on CPU a call whose size is under 16 is drawn by another kernel than a longer
one, and on CUDA every call advances the generator by its own offset. Both paths draw in these
same calls. (torch's CPU kernel without SIMD, ``ATEN_CPU_CAPABILITY=default``, rounds the
Box-Muller transform differently from its AVX2/AVX-512 kernels, which agree: other low bits.) **History**: up to commit c051211 the server step used the client path (four
generations per direction); the server path from the commit after it keeps the RNG layout and
produces bit-identical parameters, coefficients and losses (``tests/test_zo.py``), so runs
reproduce the earlier trajectories exactly. Splitting the client path's elementwise ops into
``SERIAL_ELEMENTS`` slices does not change a value either.

Restoring after a probe (what is guaranteed, on both paths): MeZO's op sequence
(+lam*u, -2*lam*u, +lam*u) is NOT always the identity in floating point, and no in-place
scheme can make it one: for a fixed perturbation ``d`` the map ``x -> fl(x + d)`` sends every
float32 ``x`` with ``|x| << |d|`` onto the same few values near ``d`` (pigeonhole), so those
bits of ``x`` are gone unless they are stored elsewhere, which is the parameter copy the trick
exists to avoid. What we guarantee instead, and test:

- the restore is deterministic (same seed, same parameters: same result, bit for bit);
- each element ends within ``1.5 * 2**-23 * (|x| + 2*|lam*u|)`` of where it started (three
  roundings of at most half an ulp of values no larger than ``|x| + 2|lam*u|``); about half
  the elements come back bit-exact, the others move by about one ulp;
- the drift is measured by ``restore_drift`` (``benchmarks/zo_memory.py`` reports it).

The server path keeps this drift on purpose (an out-of-place probe would have none, but would
change every trajectory at the ulp level): its result is the client path's, bit for bit.

``Work``, ``pass_work`` and ``step_work`` count what each path does besides its forwards
(elementwise ops and random numbers, in elements): the algorithms charge those counts. This
module never sees the clock, never prints, and draws no randomness outside ``zo`` seeds.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch

from simulator import rng

Direction = Literal["gaussian", "sphere"]
DIRECTIONS = ("gaussian", "sphere")

#: Elements of u generated at a time: the only temporary of a perturbation (float32: 256 KiB).
CHUNK_ELEMENTS = 1 << 16
#: Largest slice the in-place path's elementwise ops (``z *= c``, ``p += z``) work on: torch's
#: grain size (``at::internal::GRAIN_SIZE``), below which an elementwise op runs on the calling
#: thread. On 64K-value slices the ops forked two threads, and with 2 threads on a shared CPU a
#: pass took 5-40x longer than on 1 (``benchmarks/zo_cost.py --threads-table``); on 32K slices
#: it does not depend on the thread count. The draws (and so the values) are unchanged.
SERIAL_ELEMENTS = 1 << 15
#: Blocks whose float32 dot products sum (in float64) to the sphere direction's squared norm.
NORM_BLOCK = 1 << 16


@dataclass(frozen=True)
class Work:
    """What a ZO operation does besides its forwards, in elements: elementwise ops over the
    parameters and random numbers drawn. The algorithms charge ``flops(price)`` as FLOPs
    (``time.zo_elementwise_flops_per_element``) and ``rng`` as ``rng_elements`` (priced by the
    latency models at ``time.zo_rng_flops_per_element``). Counting, not pricing: no clock here."""

    elementwise: int
    rng: int

    def flops(self, flops_per_element: float) -> float:
        """FLOP-equivalents of the elementwise ops at ``flops_per_element`` each."""
        return float(flops_per_element) * self.elementwise


def pass_work(n: int, passes: int, norm_passes: int = 0) -> Work:
    """The client path: ``passes`` calls of ``perturb_`` over n parameters (each draws n values,
    then ``z *= c`` and ``p += z``: 2 ops), and ``norm_passes`` sphere norm passes (each draws n
    values and sums ``z . z``: 1 op); a seed's norm pass runs once (cached)."""
    return Work(elementwise=n * (2 * passes + norm_passes), rng=n * (passes + norm_passes))


def step_work(n: int, P: int, direction: str) -> Work:
    """The server path, ``zo_step_`` over n parameters with P directions: per direction one draw
    of n values and 6 ops (``c*z``, +, -2x, + for the probe; ``z *= c_p``, + for the update),
    plus the sphere's ``z . z`` on the kept draw (no second draw)."""
    ops = 6 + (1 if direction == "sphere" else 0)
    return Work(elementwise=P * n * ops, rng=P * n)


def zo_seed(run_seed: int, *key: rng.KeyPart) -> int:
    """The seed of one ZO direction: ``rng.int_seed(run_seed, "zo", *key)``."""
    return rng.int_seed(run_seed, "zo", *key)


# --------------------------------------------------------------------------------------------
# Drawing a direction
# --------------------------------------------------------------------------------------------
def _check(params: Sequence[torch.Tensor], direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not params:
        raise ValueError("no parameters to perturb")
    dev = params[0].device
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"parameter {i} has dtype {p.dtype}; ZO perturbs floating tensors only")
        if not p.is_contiguous():
            raise ValueError(f"parameter {i} is not contiguous; perturbation works on flat views")
        if p.device != dev:
            raise ValueError(f"parameters are on several devices ({dev} and {p.device})")


def _generator(seed: int, device: torch.device) -> torch.Generator:
    device = torch.device(device)
    # meta tensors (memory accounting) have no generator of their own; a CPU one draws no values there
    g = torch.Generator(device="cpu" if device.type == "meta" else device)
    g.manual_seed(int(seed))
    return g


def _blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of the consecutive blocks of at most ``block`` elements covering range(n)."""
    for start in range(0, n, block):
        yield start, min(n, start + block)


def _draws(sizes: Sequence[int], seed: int, device: torch.device,
           block: int | None = None) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """(tensor index, start, stop, float32 Gaussian chunk z) in parameter order, chunk by chunk.

    Every chunk is drawn into ONE buffer of ``min(largest size, block)`` values, so the chunk
    yielded is only valid until the next one is drawn (the consumer uses it at once).
    """
    block = CHUNK_ELEMENTS if block is None else block
    g = _generator(seed, device)
    buf = torch.empty(min(max(sizes, default=0), block), dtype=torch.float32, device=device)
    for i, n in enumerate(sizes):
        for start, stop in _blocks(n, block):
            z = buf[: stop - start]
            torch.randn(stop - start, generator=g, dtype=torch.float32, device=device, out=z)
            yield i, start, stop, z


def _chunks(params: Sequence[torch.Tensor], seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(flat view of a slice of a parameter, the matching float32 slice of the Gaussian z).

    Slices hold at most ``SERIAL_ELEMENTS`` values, so the elementwise ops on them never fork
    threads (see ``SERIAL_ELEMENTS``); the draws themselves are ``CHUNK_ELEMENTS`` at a time.
    """
    flats = [p.view(-1) for p in params]
    for i, start, stop, z in _draws([f.numel() for f in flats], seed, params[0].device):
        for a, b in _blocks(stop - start, SERIAL_ELEMENTS):
            yield flats[i][start + a:start + b], z[a:b]


def _norm_of_blocks(blocks: Iterator[torch.Tensor]) -> float:
    """sqrt(sum of float32 dot products of the NORM_BLOCK-sized blocks, accumulated in float64)."""
    total = 0.0
    for z in blocks:
        total += float(torch.dot(z, z))  # float32 within a block, float64 across blocks
    return math.sqrt(total)


@functools.lru_cache(maxsize=1024)
def _sphere_norm(seed: int, sizes: tuple[int, ...], device: str) -> float:
    """||z|| of the Gaussian draw of ``seed`` over parameters of these sizes (the norm pass)."""
    return _norm_of_blocks(z for _, _, _, z in _draws(sizes, seed, torch.device(device), NORM_BLOCK))


def _sphere_factor(norm: float, sizes: Sequence[int], seed: int) -> float:
    if norm == 0.0:
        raise ArithmeticError(f"seed {seed}: the Gaussian draw has norm 0; cannot normalise")
    return math.sqrt(sum(sizes)) / norm


def _direction_scale(params: Sequence[torch.Tensor], seed: int, direction: str) -> float:
    """Factor turning the Gaussian draw z into u: 1, or sqrt(d)/||z|| for the sphere."""
    if direction == "gaussian":
        return 1.0
    sizes = tuple(int(p.numel()) for p in params)
    return _sphere_factor(_sphere_norm(int(seed), sizes, str(params[0].device)), sizes, seed)


@dataclass
class KeptDirection:
    """A direction drawn once and kept (the server path): u = factor * z, z one float32 tensor
    per parameter (flat), with the values the in-place path regenerates for the same seed."""

    z: list[torch.Tensor]
    factor: float  # 1 (gaussian) or sqrt(d)/||z|| (sphere)


def draw_direction(params: Sequence[torch.Tensor], seed: int, direction: Direction = "gaussian") -> KeptDirection:
    """Draw the direction of ``seed`` once, whole: ``d`` float32 values (memory of a parameter copy).

    The draws are made block by block (``CHUNK_ELEMENTS``) from one generator, exactly as
    ``perturb_`` regenerates them, so the values are the same on every device; the sphere's norm
    is summed over the same ``NORM_BLOCK`` blocks as the norm pass, so its factor is the same
    float too (no extra generation pass: the kept z is reused).
    """
    params = list(params)
    _check(params, direction)
    device = params[0].device
    g = _generator(seed, device)
    zs = [torch.empty(p.numel(), dtype=torch.float32, device=device) for p in params]
    for z in zs:
        for start, stop in _blocks(z.numel(), CHUNK_ELEMENTS):
            torch.randn(stop - start, generator=g, dtype=torch.float32, device=device, out=z[start:stop])
    factor = 1.0
    if direction == "sphere":
        sizes = [z.numel() for z in zs]
        norm = _norm_of_blocks(z[a:b] for z in zs for a, b in _blocks(z.numel(), NORM_BLOCK))
        factor = _sphere_factor(norm, sizes, seed)
    return KeptDirection(zs, factor)


# --------------------------------------------------------------------------------------------
# The client path: regenerated in place, chunk by chunk
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], seed: int, scale: float, direction: Direction = "gaussian") -> None:
    """In place: ``p += scale * u`` for every parameter, u regenerated from ``seed``.

    u is drawn chunk by chunk (``CHUNK_ELEMENTS`` values) from one generator seeded with
    ``seed``, in parameter order, so the full direction never exists in memory. Each element
    gets ``p + fl32(z * c)`` where ``c = fl32(scale * sphere_factor)``; the product is rounded
    before the add (no fused multiply-add), so ``scale`` and ``-2*scale`` move by exactly
    opposite-and-doubled amounts. ``sphere`` costs one extra generation pass per new seed.
    """
    params = list(params)
    _check(params, direction)
    c = float(scale) * _direction_scale(params, seed, direction)
    for view, z in _chunks(params, seed):
        view.add_(z.mul_(c))


def materialize_direction(params: Sequence[torch.Tensor], seed: int,
                          direction: Direction = "gaussian") -> list[torch.Tensor]:
    """The direction u of ``seed`` as new tensors shaped like ``params`` (tests, diagnostics)."""
    out = [torch.zeros_like(p) for p in params]
    perturb_(out, seed, 1.0, direction)
    return out


# --------------------------------------------------------------------------------------------
# Probes and updates
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def probe_pair(params: Sequence[torch.Tensor], fn: Callable[[], object], lam: float, seed: int,
               direction: Direction = "gaussian") -> tuple[object, object]:
    """(fn() at x + lam*u, fn() at x - lam*u), perturbing in place and restoring after.

    MeZO's sequence: +lam*u, call, -2*lam*u, call, +lam*u, u regenerated for each move.
    ``fn`` reads the parameters in place (it may return a loss, an activation, anything). See
    the module docstring for what the restore guarantees.
    """
    perturb_(params, seed, lam, direction)
    plus = fn()
    perturb_(params, seed, -2.0 * lam, direction)
    minus = fn()
    perturb_(params, seed, lam, direction)
    return plus, minus


def zo_probe(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], lam: float, seed: int,
             direction: Direction = "gaussian") -> float:
    """F(x + lam*u) - F(x - lam*u) for the direction of ``seed`` (params restored after)."""
    plus, minus = probe_pair(params, loss_fn, lam, seed, direction)
    return float(plus) - float(minus)


def _check_coeffs(seeds: Sequence[int], coeffs: Sequence[float]) -> None:
    if len(seeds) != len(coeffs) or not seeds:
        raise ValueError(f"need one coefficient per seed, got {len(seeds)} seeds and {len(coeffs)} coefficients")


@torch.no_grad()
def zo_update_(params: Sequence[torch.Tensor], seeds: Sequence[int], coeffs: Sequence[float], lr: float,
               direction: Direction = "gaussian") -> None:
    """In place: ``p -= lr * (1/P) * sum_p coeff_p * u_p``, each u_p regenerated from its seed.

    ``coeff_p = (F+ - F-) / (2*lam)`` is the projected gradient along u_p; P = len(seeds).
    """
    _check_coeffs(seeds, coeffs)
    P = len(seeds)
    for s, coeff in zip(seeds, coeffs):
        perturb_(params, s, -lr * float(coeff) / P, direction)


# --------------------------------------------------------------------------------------------
# The server path: one draw per direction, kept for the whole step
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _on_one_thread():
    """Run the enclosed (memory-bound, elementwise) ops on the calling thread only.

    Whole-tensor elementwise ops fork torch's intra-op threads; with 2 threads on a shared CPU
    the fork-join stalled four ops over the AlexNet server part to 406 ms against 30 ms on one
    thread (``benchmarks/zo_cost.py --threads 2``). Results do not depend on the thread count.
    The forwards between the moves keep the caller's threads.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def zo_step_(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], lam: float, lr: float,
             seeds: Sequence[int], direction: Direction = "gaussian") -> tuple[list[float], float]:
    """One full ZO-SGD step: P probes, then the update. Returns (coefficients, mean of F+/F-).

    Each direction is drawn ONCE (``draw_direction``) and kept until the update: the step
    holds P directions plus one scaled copy, ``(P + 1) * d`` float32 values (the Split Server
    is not memory-bound; the client path above regenerates instead). The moves are MeZO's,
    element for element the same floating-point operations as ``probe_pair`` then
    ``zo_update_``: ``x += fl(z*c)``, ``x += -2 fl(z*c)`` (exact doubling: the same value as
    ``fl(z*(-2c))``), ``x += fl(z*c)``, then per direction ``x += fl(z*c_p)``. So this step
    leaves bit for bit the parameters, coefficients and losses of the regenerating path
    (tested), restore drift included; it just generates each u once instead of four times.

    The mean of the probed losses, ``(1/P) sum_p (F+ + F-)/2``, estimates F(x) to second order
    in lam at no extra forward: a free training-loss reading.
    """
    params = list(params)
    _check(params, direction)
    if not seeds:
        raise ValueError("need at least one seed (P >= 1)")
    flats = [p.view(-1) for p in params]
    kept, coeffs, mids = [], [], []
    for s in seeds:
        u = draw_direction(params, s, direction)
        with _on_one_thread():
            moved = torch._foreach_mul(u.z, float(lam) * u.factor)  # fl(z * c), c = fl32(lam * factor)
            torch._foreach_add_(flats, moved)
        plus = loss_fn()
        with _on_one_thread():
            torch._foreach_add_(flats, moved, alpha=-2.0)
        minus = loss_fn()
        with _on_one_thread():
            torch._foreach_add_(flats, moved)
        del moved
        kept.append(u)
        coeffs.append((float(plus) - float(minus)) / (2.0 * lam))
        mids.append(0.5 * (float(plus) + float(minus)))
    P = len(seeds)
    with _on_one_thread():
        for u, coeff in zip(kept, coeffs):
            torch._foreach_mul_(u.z, float(-lr * float(coeff) / P) * u.factor)  # the same constant as zo_update_
            torch._foreach_add_(flats, u.z)
    return coeffs, sum(mids) / len(mids)


def spsa_gradient(f: Callable[[torch.Tensor], float], x: torch.Tensor, lam: float, P: int,
                  direction: Direction = "gaussian", seed: int = 0) -> torch.Tensor:
    """The P-direction estimate of the gradient of ``f`` at ``x`` (for tests on toy functions).

    Directions are ``zo_seed(seed, "spsa", p)``; ``x`` is not modified (a copy is probed).
    """
    if P < 1:
        raise ValueError(f"P must be >= 1, got {P}")
    xp = x.detach().clone()
    g = torch.zeros_like(xp)
    for p in range(P):
        s = zo_seed(seed, "spsa", p)
        diff = zo_probe([xp], lambda: f(xp), lam, s, direction)
        (u,) = materialize_direction([xp], s, direction)
        g.add_(u, alpha=diff / (2.0 * lam) / P)
    return g


def restore_drift(params: Sequence[torch.Tensor], lam: float, seed: int,
                  direction: Direction = "gaussian") -> dict:
    """Measure what +lam*u, -2*lam*u, +lam*u leaves behind (copies the params: a diagnostic).

    Returns the fraction of elements not restored bit for bit, the largest absolute change and
    the largest change in units of the bound ``1.5 * 2**-23 * (|x| + 2|lam*u|)``.
    """
    params = list(params)
    before = [p.detach().clone() for p in params]
    probe_pair(params, lambda: None, lam, seed, direction)
    us = materialize_direction(params, seed, direction)
    changed = total = 0
    max_abs = max_ratio = 0.0
    for p, b, u in zip(params, before, us):
        diff = (p.detach() - b).abs().double()
        bound = 1.5 * 2.0**-23 * (b.abs().double() + 2 * abs(lam) * u.abs().double())
        changed += int((p.detach() != b).sum())
        total += p.numel()
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            max_ratio = max(max_ratio, float((diff / bound.clamp_min(1e-300)).max()))
        with torch.no_grad():
            p.copy_(b)  # leave the caller's parameters as they were
    return {"changed_fraction": changed / max(1, total), "max_abs": max_abs, "max_over_bound": max_ratio}
