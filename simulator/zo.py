"""Zeroth-order (ZO) estimation, in place and seeded: the MeZO trick.

Two-point central difference (SPSA) with P perturbations and smoothing radius ``lam``::

    g = (1/P) * sum_p [F(x + lam*u_p) - F(x - lam*u_p)] / (2*lam) * u_p

A direction ``u_p`` is never stored: it is regenerated, chunk by chunk, from a seed each time
it is needed (to perturb, to restore, to update). Parameters are perturbed IN PLACE, so a ZO
step holds no second copy of the parameters; everything here runs under ``torch.no_grad``, so
it builds no autograd graph. The only temporary is one chunk of ``u`` (``CHUNK_ELEMENTS``
float32 values, 256 KiB), whatever the model's size.

Directions (``direction``):

- ``gaussian``: u ~ N(0, I) (the authors' code base, DeComFL, and MeZO);
- ``sphere``: u uniform on the sphere of radius sqrt(d) over ALL parameters jointly (the
  MU-SplitFed paper), i.e. ``u = sqrt(d) * z / ||z||`` with z the Gaussian draw. The global
  norm ``||z||`` needs a first pass that regenerates every chunk without touching the
  parameters (one extra generation pass); it is cached per (seed, sizes), so a probe and its
  update pay it once.

Both satisfy E[u u^T] = I, so the estimator is unbiased for the gradient of the smoothed loss.

Seeds come from ``zo_seed`` (stream ``zo`` of ``simulator.rng``). The sequence of values drawn
for a seed depends on ``CHUNK_ELEMENTS`` and on the parameters' sizes and order: changing either
changes the directions (not their distribution).

Restoring after a probe (what is guaranteed): ``zo_probe`` uses MeZO's op sequence
(+lam*u, -2*lam*u, +lam*u). In floating point this is NOT always the identity, and no in-place
scheme can make it one: for a fixed perturbation ``d`` the map ``x -> fl(x + d)`` sends every
float32 ``x`` with ``|x| << |d|`` onto the same few values near ``d`` (pigeonhole), so those
bits of ``x`` are gone unless they are stored elsewhere, which is the parameter copy the trick
exists to avoid. What we guarantee instead, and test:

- the restore is deterministic (same seed, same parameters: same result, bit for bit);
- each element ends within ``1.5 * 2**-23 * (|x| + 2*|lam*u|)`` of where it started (three
  roundings of at most half an ulp of values no larger than ``|x| + 2|lam*u|``); about half
  the elements come back bit-exact, the others move by about one ulp;
- the drift is measured by ``restore_drift`` (``benchmarks/zo_memory.py`` reports it).

This module never sees the clock, never prints, and draws no randomness outside ``zo`` seeds.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterator, Literal, Sequence

import torch

from simulator import rng

Direction = Literal["gaussian", "sphere"]
DIRECTIONS = ("gaussian", "sphere")

#: Elements of u generated at a time: the only temporary of a perturbation (float32: 256 KiB).
CHUNK_ELEMENTS = 1 << 16


def zo_seed(run_seed: int, *key: rng.KeyPart) -> int:
    """The seed of one ZO direction: ``rng.int_seed(run_seed, "zo", *key)``."""
    return rng.int_seed(run_seed, "zo", *key)


# --------------------------------------------------------------------------------------------
# Regenerating a direction
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


def _draws(sizes: Sequence[int], seed: int, device: torch.device) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """(tensor index, start, stop, float32 Gaussian chunk z) in parameter order, chunk by chunk."""
    device = torch.device(device)
    # meta tensors (memory accounting) have no generator of their own; a CPU one draws no values there
    g = torch.Generator(device="cpu" if device.type == "meta" else device)
    g.manual_seed(int(seed))
    for i, n in enumerate(sizes):
        for start in range(0, n, CHUNK_ELEMENTS):
            stop = min(n, start + CHUNK_ELEMENTS)
            yield i, start, stop, torch.randn(stop - start, generator=g, dtype=torch.float32, device=device)


def _chunks(params: Sequence[torch.Tensor], seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(flat view of a slice of a parameter, the matching float32 slice of the Gaussian z)."""
    flats = [p.view(-1) for p in params]
    for i, start, stop, z in _draws([f.numel() for f in flats], seed, params[0].device):
        yield flats[i][start:stop], z
        del z  # let the chunk go before the next one is drawn (one chunk alive at a time)


@functools.lru_cache(maxsize=1024)
def _sphere_norm(seed: int, sizes: tuple[int, ...], device: str) -> float:
    """||z|| of the Gaussian draw of ``seed`` over parameters of these sizes (the first pass)."""
    total = 0.0
    for _, _, _, z in _draws(sizes, seed, torch.device(device)):
        total += float(torch.dot(z, z))  # float32 within a chunk, float64 across chunks
        del z
    return math.sqrt(total)


def _direction_scale(params: Sequence[torch.Tensor], seed: int, direction: str) -> float:
    """Factor turning the Gaussian draw z into u: 1, or sqrt(d)/||z|| for the sphere."""
    if direction == "gaussian":
        return 1.0
    sizes = tuple(int(p.numel()) for p in params)
    norm = _sphere_norm(int(seed), sizes, str(params[0].device))
    if norm == 0.0:
        raise ArithmeticError(f"seed {seed}: the Gaussian draw has norm 0; cannot normalise")
    return math.sqrt(sum(sizes)) / norm


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
        del view, z


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

    MeZO's sequence: +lam*u, call, -2*lam*u, call, +lam*u. ``fn`` reads the parameters
    in place (it may return a loss, an activation, anything). See the module docstring for
    what the restore guarantees.
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


@torch.no_grad()
def zo_update_(params: Sequence[torch.Tensor], seeds: Sequence[int], coeffs: Sequence[float], lr: float,
               direction: Direction = "gaussian") -> None:
    """In place: ``p -= lr * (1/P) * sum_p coeff_p * u_p``, each u_p regenerated from its seed.

    ``coeff_p = (F+ - F-) / (2*lam)`` is the projected gradient along u_p; P = len(seeds).
    """
    if len(seeds) != len(coeffs) or not seeds:
        raise ValueError(f"need one coefficient per seed, got {len(seeds)} seeds and {len(coeffs)} coefficients")
    P = len(seeds)
    for s, coeff in zip(seeds, coeffs):
        perturb_(params, s, -lr * float(coeff) / P, direction)


def zo_step_(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], lam: float, lr: float,
             seeds: Sequence[int], direction: Direction = "gaussian") -> tuple[list[float], float]:
    """One full ZO-SGD step: P probes, then the update. Returns (coefficients, mean of F+/F-).

    The mean of the probed losses, ``(1/P) sum_p (F+ + F-)/2``, estimates F(x) to second order
    in lam at no extra forward: a free training-loss reading.
    """
    coeffs, mids = [], []
    for s in seeds:
        plus, minus = probe_pair(params, loss_fn, lam, s, direction)
        coeffs.append((float(plus) - float(minus)) / (2.0 * lam))
        mids.append(0.5 * (float(plus) + float(minus)))
    zo_update_(params, seeds, coeffs, lr, direction)
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
