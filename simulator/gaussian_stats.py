"""Per-class Gaussian statistics of cut-layer activations, as GAS keeps them (Yang & Liu, AAAI 2025).

Weighted running mean and covariance per class, merged buffer by buffer with the paper's
formula, a cached Cholesky factor per class for sampling ``mu + L z``, and the top-up rule that
fills every class below B real activations with generated ones. Pure tensor code: this module
never sees the clock, the server model or a random number it did not get a generator for.

Merge (algorithms.md, "GAS"): with W_old the weight so far and a buffer of weight W_new, mean
mu_new and (biased, weighted) covariance S_new, d = W_old / (W_old + W_new):

    mu = d mu_old + (1 - d) mu_new
    S  = d (S_old + (mu - mu_old)(mu - mu_old)^T) + (1 - d)(S_new + (mu - mu_new)(mu - mu_new)^T)

Since mu - mu_old = (1-d) delta and mu - mu_new = -d delta with delta = mu_new - mu_old, the
two outer products add up to d (1-d) delta delta^T, so the full-covariance path does the same
merge in place as ``S = d S_old + U^T U`` with one rank-(n+1) product (one pass over the d x d
matrix instead of four). Both forms equal the weighted statistics of every activation seen so
far (tests/test_gas.py checks them against numpy's batch statistics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

Covariance = Literal["full", "diagonal"]


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------
def weighted_moments(x: torch.Tensor, w: torch.Tensor, diagonal: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weighted mean, biased weighted covariance (or variances) and total weight of rows of ``x``.

    ``x`` is (n, d), ``w`` (n,) non-negative with a positive sum. Matches the public code:
    mean = sum w x / W, S = sum w (x - mean)(x - mean)^T / W.
    """
    w = w.to(x.dtype)
    total = float(w.sum())
    if not total > 0:
        raise ValueError(f"weights must have a positive sum, got {total}")
    mean = (w[:, None] * x).sum(0) / total
    xc = x - mean
    if diagonal:
        return mean, (w[:, None] * xc * xc).sum(0) / total, total
    return mean, (xc * w[:, None]).T @ xc / total, total


def merge_moments(mu_old: torch.Tensor, s_old: torch.Tensor, w_old: float,
                  mu_new: torch.Tensor, s_new: torch.Tensor, w_new: float,
                  ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The paper's merge, literally (a d x d covariance, or a length-d variance vector).

    ``ridge`` > 0 adds ``ridge * I`` (``ridge`` to every variance) after the merge, as the
    public code does at every merge (a quirk; the paper's formula has none).
    """
    w = w_old + w_new
    d = w_old / w
    mu = d * mu_old + (1 - d) * mu_new
    a, b = mu - mu_old, mu - mu_new
    if s_old.dim() == 1:
        s = d * (s_old + a * a) + (1 - d) * (s_new + b * b)
        if ridge:
            s = s + ridge
    else:
        s = d * (s_old + torch.outer(a, a)) + (1 - d) * (s_new + torch.outer(b, b))
        if ridge:
            s = s + ridge * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    return mu, s, w


def top_up_counts(real_counts: list[int], batch_size: int) -> list[int]:
    """How many activations to generate per class: B - n_c for classes below B, else 0."""
    return [max(0, batch_size - int(n)) for n in real_counts]


# --------------------------------------------------------------------------------------------
# The running statistics
# --------------------------------------------------------------------------------------------
@dataclass
class ClassGaussian:
    """Running statistics of one class. ``cov`` is (d, d) or, diagonal, (d,)."""

    mean: torch.Tensor
    cov: torch.Tensor
    weight: float
    merges: int = 0
    factor: Optional[torch.Tensor] = None  # cached Cholesky factor (or std vector), None = stale
    jitter: float = 0.0  # jitter added to the diagonal for the cached factor


@dataclass
class FactorReport:
    """What one factorisation cost: attempts (1 = no jitter needed) and the jitter that worked."""

    cls: int
    attempts: int
    jitter: float


@dataclass
class GaussianStats:
    """Per-class weighted Gaussian statistics of flattened activations.

    State is data (tensors and floats in dicts): it can be saved with ``torch.save``.
    """

    num_classes: int
    dim: int
    covariance: Covariance = "full"
    dtype: torch.dtype = torch.float32
    ridge: float = 0.0
    jitter_start: float = 1e-6
    jitter_growth: float = 10.0
    jitter_attempts: int = 12
    classes: dict = field(default_factory=dict)  # class -> ClassGaussian
    factorisations: int = 0
    failed_factorisations: int = 0

    @property
    def diagonal(self) -> bool:
        return self.covariance == "diagonal"

    def has(self, c: int) -> bool:
        return c in self.classes

    def all_ready(self) -> bool:
        """True once every class has statistics (generation starts only then)."""
        return all(c in self.classes for c in range(self.num_classes))

    def mean_cov(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.classes[c]
        return g.mean, g.cov

    # -- merging -------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> list[int]:
        """Merge a buffer of flattened activations ``x`` (n, d), labels ``y``, weights ``w``.

        Returns the classes that were updated (sorted). Their cached factors become stale.
        """
        x = x.reshape(x.shape[0], -1).to(self.dtype)
        if x.shape[1] != self.dim:
            raise ValueError(f"activations have {x.shape[1]} features, statistics expect {self.dim}")
        w = w.to(self.dtype)
        updated = []
        for c in sorted(int(v) for v in torch.unique(y)):
            mask = y == c
            xc, wc = x[mask], w[mask]
            g = self.classes.get(c)
            if g is None:
                mean, cov, total = weighted_moments(xc, wc, self.diagonal)
                self.classes[c] = ClassGaussian(mean, cov, total)
            elif self.diagonal:
                mean, var, total = weighted_moments(xc, wc, True)
                g.mean, g.cov, g.weight = merge_moments(g.mean, g.cov, g.weight, mean, var, total, self.ridge)
                g.merges += 1
                g.factor = None
            else:
                self._merge_full_in_place(g, xc, wc)
            updated.append(c)
        return updated

    def _merge_full_in_place(self, g: ClassGaussian, x: torch.Tensor, w: torch.Tensor) -> None:
        """S = d S_old + (1-d)/W_new sum w_i (x_i - mu_new)(..)^T + d(1-d) delta delta^T."""
        w_new = float(w.sum())
        if not w_new > 0:
            raise ValueError(f"weights must have a positive sum, got {w_new}")
        mu_new = (w[:, None] * x).sum(0) / w_new
        total = g.weight + w_new
        d = g.weight / total
        delta = mu_new - g.mean
        rows = torch.cat([
            (x - mu_new) * torch.sqrt(w * ((1 - d) / w_new))[:, None],
            (math.sqrt(d * (1 - d)) * delta)[None, :],
        ])
        g.cov.mul_(d).addmm_(rows.T, rows)
        if self.ridge:
            g.cov.diagonal().add_(self.ridge)
        g.mean = d * g.mean + (1 - d) * mu_new
        g.weight = total
        g.merges += 1
        g.factor = None

    # -- sampling ------------------------------------------------------------------------
    def needs_factor(self, c: int) -> bool:
        """True if sampling class ``c`` would (re)compute its Cholesky factor."""
        return not self.diagonal and self.classes[c].factor is None

    @torch.no_grad()
    def factor(self, c: int) -> tuple[torch.Tensor, Optional[FactorReport]]:
        """The cached factor of class ``c`` (lower Cholesky L with L L^T = S + jitter I).

        Computed when stale. Jitter is added only when a factorisation fails: first none, then
        ``jitter_start``, growing by ``jitter_growth`` (the public code's schedule, 1e-6 x 10^k);
        RuntimeError after ``jitter_attempts`` failures. Diagonal: the std vector sqrt(var).
        """
        g = self.classes[c]
        if g.factor is not None:
            return g.factor, None
        if self.diagonal:
            g.factor = torch.sqrt(torch.clamp(g.cov, min=0.0))
            return g.factor, None
        eye = None
        jitter = 0.0
        for attempt in range(1, self.jitter_attempts + 2):
            mat = g.cov if jitter == 0.0 else g.cov + jitter * eye
            L, info = torch.linalg.cholesky_ex(mat)
            if int(info) == 0:
                self.factorisations += 1
                g.factor, g.jitter = L, jitter
                return L, FactorReport(c, attempt, jitter)
            self.failed_factorisations += 1
            if eye is None:
                eye = torch.eye(self.dim, dtype=self.dtype, device=g.cov.device)
            jitter = self.jitter_start if jitter == 0.0 else jitter * self.jitter_growth
        raise RuntimeError(
            f"class {c}: covariance is not positive definite even with jitter {jitter / self.jitter_growth:g} "
            f"after {self.jitter_attempts + 1} attempts"
        )

    @torch.no_grad()
    def sample(self, c: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, Optional[FactorReport]]:
        """``n`` draws mu + L z (z ~ N(0, I) from ``generator``) of class ``c``, shape (n, d)."""
        L, report = self.factor(c)
        g = self.classes[c]
        z = torch.randn((n, self.dim), generator=generator, dtype=self.dtype, device=g.mean.device)
        if self.diagonal:
            return g.mean + z * L, report
        return g.mean + z @ L.T, report

    # -- FLOPs (for the time model) ------------------------------------------------------
    def update_flops(self, n: int) -> float:
        """Arithmetic of merging ``n`` activations of one class (mean, centring, the product)."""
        d = self.dim
        if self.diagonal:
            return 6.0 * n * d + 8.0 * d
        return 4.0 * n * d + 2.0 * (n + 1) * d * d + 2.0 * d * d

    def factor_flops(self) -> float:
        """One Cholesky factorisation: d^3 / 3 (0 for the diagonal mode's square root)."""
        return 0.0 if self.diagonal else self.dim ** 3 / 3.0

    def sample_flops(self, n: int) -> float:
        """Drawing ``n`` samples: the product z L^T (or z * std) plus the mean."""
        d = self.dim
        return (2.0 * n * d) if self.diagonal else (2.0 * n * d * d + n * d)
