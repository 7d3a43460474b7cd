"""Tests of simulator.zo: the seeded ZO estimator (in place on the client, drawn once on the server)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from simulator import rng, zo

# A quadratic F(x) = 1/2 x^T A x + b^T x: the central difference is exact for it, so the only
# randomness of the estimate is the direction, and its variance has a closed form.
A = torch.tensor([[2.0, 0.5, 0.0, 0.0], [0.5, 1.0, 0.0, 0.2], [0.0, 0.0, 3.0, 0.0], [0.0, 0.2, 0.0, 0.5]],
                 dtype=torch.float64)
B = torch.tensor([1.0, -1.0, 0.5, 0.25], dtype=torch.float64)
X0 = torch.tensor([0.3, 0.2, -0.1, 0.4], dtype=torch.float64)


def quad(x: torch.Tensor) -> float:
    return float(0.5 * x @ A @ x + B @ x)


def _per_component_variance(g: torch.Tensor, direction: str, P: int) -> torch.Tensor:
    """Variance of each component of one P-direction estimate g_hat = (1/P) sum (u^T g) u."""
    # Gaussian u: E[(u^T g)^2 u_i^2] = |g|^2 + 2 g_i^2, so Var_i = (|g|^2 + g_i^2) / P.
    # Sphere of radius sqrt(d): u = sqrt(d) v, E[v_i^4] = 3/(d(d+2)), E[v_i^2 v_j^2] = 1/(d(d+2)),
    # so E[(u^T g)^2 u_i^2] = d/(d+2) (|g|^2 + 2 g_i^2) and Var_i = that - g_i^2, over P.
    d = g.numel()
    n2 = float(g @ g)
    if direction == "gaussian":
        return (n2 + g**2) / P
    return (d / (d + 2) * (n2 + 2 * g**2) - g**2) / P


@pytest.mark.parametrize("direction", ["gaussian", "sphere"])
@pytest.mark.parametrize("P", [1, 3])
def test_estimator_mean_approaches_true_gradient(direction, P):
    """The mean of many SPSA estimates of a quadratic's gradient is within 4.5 sigma of it."""
    N = 300
    g_true = A @ X0 + B
    est = torch.stack([zo.spsa_gradient(quad, X0, 0.01, P, direction, seed=i) for i in range(N)])
    var = _per_component_variance(g_true, direction, P)
    sigma_of_mean = torch.sqrt(var / N)
    err = (est.mean(0) - g_true).abs()
    assert torch.all(err <= 4.5 * sigma_of_mean), (err, sigma_of_mean)
    # The spread itself matches the closed form (within sampling error of a variance, N=300).
    ratio = est.var(0) / var
    assert torch.all((ratio > 0.6) & (ratio < 1.5)), ratio


def test_more_perturbations_reduce_variance():
    """P = 4 gives about a quarter of the variance of P = 1 (same total of 400 estimates)."""
    v1 = torch.stack([zo.spsa_gradient(quad, X0, 0.01, 1, "gaussian", seed=i) for i in range(400)]).var(0).sum()
    v4 = torch.stack([zo.spsa_gradient(quad, X0, 0.01, 4, "gaussian", seed=10_000 + i)
                      for i in range(100)]).var(0).sum()
    assert 0.15 < float(v4 / v1) < 0.4


def test_sphere_direction_has_radius_sqrt_d_across_tensors_and_chunks():
    """A sphere direction over several tensors (one spanning chunks) has |u|^2 = d."""
    ps = [torch.zeros(3, 5), torch.zeros(zo.CHUNK_ELEMENTS + 123), torch.zeros(7)]
    u = zo.materialize_direction(ps, seed=11, direction="sphere")
    d = sum(p.numel() for p in ps)
    assert sum(float((t.double() ** 2).sum()) for t in u) == pytest.approx(d, rel=1e-5)
    g = zo.materialize_direction(ps, seed=11, direction="gaussian")
    assert sum(float((t.double() ** 2).sum()) for t in g) != pytest.approx(d, rel=1e-5)


def test_directions_are_keyed_and_regenerated_identically():
    """The same seed gives the same u (bit for bit); another seed another u; zo_seed is keyed."""
    ps = [torch.zeros(10, 10), torch.zeros(4)]
    a = zo.materialize_direction(ps, 5)
    b = zo.materialize_direction(ps, 5)
    c = zo.materialize_direction(ps, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert zo.zo_seed(0, "client", 1, 2) == zo.zo_seed(0, "client", 1, 2) != zo.zo_seed(0, "client", 1, 3)
    assert zo.zo_seed(0, "client", 1) != zo.zo_seed(1, "client", 1)


def test_perturb_moves_by_scale_times_regenerated_direction():
    """perturb_(scale) adds scale*u; a second call with -scale on zeros returns to zero exactly."""
    ps = [torch.zeros(6, 4), torch.zeros(9)]
    zo.perturb_(ps, 42, 0.25)
    u = zo.materialize_direction([torch.zeros(6, 4), torch.zeros(9)], 42)
    assert all(torch.equal(p, 0.25 * t) for p, t in zip(ps, u))  # x 0.25 is exact in binary
    zo.perturb_(ps, 42, -0.25)
    assert all(torch.count_nonzero(p) == 0 for p in ps)


@pytest.mark.parametrize("direction", ["gaussian", "sphere"])
def test_probe_restore_is_reproducible_and_within_rounding_bound(direction):
    """After a probe's +lam, -2lam, +lam every element is within 1.5 ulp-units of where it began."""
    # Bit-for-bit restore is impossible in place (module docstring: fl(x + d) forgets the low
    # bits of a small x), so we pin down what holds: the same start gives the same end, bit for
    # bit, and each element moves by at most 1.5 * 2^-23 * (|x| + 2|lam u|).
    with rng.seeded_torch(0, "test", "drift"):
        base = [torch.randn(200, 300) * 0.05, torch.randn(300) * 0.05]
    a = [t.clone() for t in base]
    b = [t.clone() for t in base]
    fa = zo.zo_probe(a, lambda: float(a[0].sum()), 0.005, 99, direction)
    fb = zo.zo_probe(b, lambda: float(b[0].sum()), 0.005, 99, direction)
    assert fa == fb
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # deterministic, bit for bit
    drift = zo.restore_drift([t.clone() for t in base], 0.005, 99, direction)
    assert drift["max_over_bound"] <= 1.0
    assert 0.0 < drift["changed_fraction"] < 0.7  # measured: about half move by ~1 ulp
    assert drift["max_abs"] < 1e-7


def test_in_place_perturbation_cannot_keep_small_values():
    """Why no in-place scheme restores bit for bit: fl(x + d) - d loses an x far below d."""
    x = torch.tensor([1e-12, 3e-12], dtype=torch.float32)
    d = torch.tensor([0.005, 0.005], dtype=torch.float32)
    assert torch.equal((x + d) - d, torch.zeros(2))  # both inputs collapse onto one value


def test_zo_update_applies_the_regenerated_directions():
    """zo_update_ moves x by -lr/P * sum_p coeff_p u_p with each u_p regenerated."""
    x = [torch.ones(50, 3), torch.full((5,), 2.0)]
    start = [t.clone() for t in x]
    seeds, coeffs = [7, 8, 9], [0.5, -1.0, 2.0]
    zo.zo_update_(x, seeds, coeffs, lr=0.1)
    for i, t in enumerate(x):
        expect = start[i].clone()
        for s, c in zip(seeds, coeffs):
            expect -= 0.1 * c / 3 * zo.materialize_direction(start, s)[i]
        assert torch.allclose(t, expect, atol=1e-6)


def test_zo_step_builds_no_graph_and_leaves_no_grad():
    """A ZO step on trainable parameters runs without autograd and leaves no .grad."""
    lin = torch.nn.Linear(8, 3)
    xb = torch.ones(4, 8)
    seen = []

    def loss():
        seen.append(torch.is_grad_enabled())
        out = lin(xb).square().mean()
        assert out.grad_fn is None
        return out

    before = lin.weight.detach().clone()
    coeffs, mid = zo.zo_step_(list(lin.parameters()), loss, lam=0.01, lr=0.1, seeds=[1, 2])
    assert seen and not any(seen)
    assert all(p.grad is None for p in lin.parameters())
    assert len(coeffs) == 2 and math.isfinite(mid)
    assert not torch.equal(before, lin.weight.detach())


def test_gradient_descent_with_zo_steps_decreases_a_quadratic():
    """Repeated ZO-SGD steps (sphere, P=2) reduce the quadratic's value."""
    x = X0.clone()
    f0 = quad(x)
    for t in range(200):
        zo.zo_step_([x], lambda: quad(x), lam=1e-3, lr=0.05,
                    seeds=[zo.zo_seed(0, "t", t, p) for p in range(2)], direction="sphere")
    assert quad(x) < f0 - 0.5


def test_bad_inputs_fail_loudly():
    """Unknown directions, integer tensors and mismatched seeds/coefficients raise."""
    with pytest.raises(ValueError, match="direction"):
        zo.perturb_([torch.zeros(3)], 0, 1.0, "uniform")
    with pytest.raises(TypeError, match="floating"):
        zo.perturb_([torch.zeros(3, dtype=torch.long)], 0, 1.0)
    with pytest.raises(ValueError, match="coefficient"):
        zo.zo_update_([torch.zeros(3)], [1, 2], [0.1], 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        zo.perturb_([torch.zeros(4, 4).t()], 0, 1.0)
    with pytest.raises(ValueError, match="at least one seed"):
        zo.zo_step_([torch.zeros(3)], lambda: 0.0, 0.01, 0.1, [])
    with pytest.raises(ValueError, match="direction"):
        zo.draw_direction([torch.zeros(3)], 0, "uniform")


# --------------------------------------------------------------------------------------------
# The server path (directions drawn once and kept) against the regenerating client path
# --------------------------------------------------------------------------------------------
def _reference_step(params, loss_fn, lam, lr, seeds, direction):
    """The regenerating path (four regenerations per direction): what zo_step_ did up to c051211."""
    coeffs, mids = [], []
    for s in seeds:
        plus, minus = zo.probe_pair(params, loss_fn, lam, s, direction)
        coeffs.append((float(plus) - float(minus)) / (2.0 * lam))
        mids.append(0.5 * (float(plus) + float(minus)))
    zo.zo_update_(params, seeds, coeffs, lr, direction)
    return coeffs, sum(mids) / len(mids)


def _odd_params(dtype=torch.float32):
    """Tensors that cross chunk boundaries, end off a multiple of 16, or are shorter than 16."""
    with rng.seeded_torch(0, "test", "kept"):
        return [(torch.randn(zo.CHUNK_ELEMENTS + 37) * 0.1).to(dtype), (torch.randn(3, 5) * 0.1).to(dtype),
                (torch.randn(zo.CHUNK_ELEMENTS + 5) * 0.1).to(dtype),  # a last chunk under 16 values
                (torch.randn(2 * zo.CHUNK_ELEMENTS) * 0.1).to(dtype), (torch.randn(7) * 0.1).to(dtype)]


@pytest.mark.parametrize("direction", ["gaussian", "sphere"])
@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kept_step_is_bit_identical_to_the_regenerating_path(direction, P, dtype):
    """zo_step_ (u drawn once) leaves the same bits, coefficients and losses as regenerating u."""
    a, b = _odd_params(dtype), _odd_params(dtype)
    w = [torch.linspace(-1, 1, t.numel(), dtype=dtype) for t in a]

    def loss(ps):  # a nonlinear F, so the probes' rounding reaches the coefficients
        return lambda: float(sum(torch.tanh(p.view(-1) * 3).dot(v) for p, v in zip(ps, w)))

    seeds = [zo.zo_seed(3, "kept", p) for p in range(P)]
    got = zo.zo_step_(a, loss(a), 0.005, 0.01, seeds, direction)
    want = _reference_step(b, loss(b), 0.005, 0.01, seeds, direction)
    assert got == want
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("direction", ["gaussian", "sphere"])
def test_drawn_direction_is_the_regenerated_one(direction):
    """draw_direction's factor * z equals materialize_direction bit for bit (and the same norm)."""
    ps = _odd_params()
    u = zo.draw_direction(ps, 17, direction)
    ref = zo.materialize_direction(ps, 17, direction)
    c = torch.tensor(u.factor, dtype=torch.float32)  # perturb_ rounds the factor to float32 too
    assert all(torch.equal((z * c).view_as(r), r) for z, r in zip(u.z, ref))
    if direction == "sphere":
        d = sum(p.numel() for p in ps)
        assert u.factor == pytest.approx(math.sqrt(d) / math.sqrt(sum(float((z.double() ** 2).sum()) for z in u.z)),
                                         rel=1e-6)


def test_kept_step_holds_its_directions_only_for_the_step():
    """The server path's extra memory is P directions and one scaled copy, freed after the step."""
    from simulator.measure.memory import StorageTracker

    ps = _odd_params()
    d = sum(p.numel() for p in ps)
    tracker = StorageTracker(held=ps)
    with tracker:
        zo.zo_step_(ps, lambda: float(ps[0].sum()), 0.005, 0.01, [1, 2], "gaussian")
    assert 3 * 4 * d <= tracker.peak <= 3 * 4 * d + 4 * 1024  # (P + 1) d float32, plus scalars
    assert tracker.current == 0  # nothing of the step outlives it


class _WorkCounter(TorchDispatchMode):
    """Counts what ops really touch: drawn values (normal_) and elements of elementwise ops."""

    ELEMENTWISE = {"mul", "mul_", "add", "add_", "dot", "_foreach_mul", "_foreach_mul_", "_foreach_add_"}

    def __init__(self):
        super().__init__()
        self.rng = self.elementwise = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "normal_" or name in self.ELEMENTWISE:
            first = args[0]
            n = sum(t.numel() for t in first) if isinstance(first, (list, tuple)) else first.numel()
            if name == "normal_":
                self.rng += n
            else:
                self.elementwise += n
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("direction", ["gaussian", "sphere"])
def test_charged_work_counts_are_the_work_done(direction):
    """zo.step_work / pass_work (what the algorithms charge) equal the draws and ops really run."""
    ps = _odd_params()
    n = sum(p.numel() for p in ps)
    with _WorkCounter() as c:
        zo.zo_step_(ps, lambda: 0.0, 0.005, 0.01, [4, 5], direction)
    assert (c.elementwise, c.rng) == (zo.step_work(n, 2, direction).elementwise, zo.step_work(n, 2, direction).rng)
    zo._sphere_norm.cache_clear()
    sphere = 1 if direction == "sphere" else 0
    with _WorkCounter() as c:  # a new seed: sphere pays its norm pass once
        zo.perturb_(ps, 6, 0.1, direction)
    assert (c.elementwise, c.rng) == (zo.pass_work(n, 1, sphere).elementwise, zo.pass_work(n, 1, sphere).rng)
    with _WorkCounter() as c:  # the same seed again (the restore, the update): no norm pass
        zo.perturb_(ps, 6, -0.1, direction)
    assert (c.elementwise, c.rng) == (zo.pass_work(n, 1).elementwise, zo.pass_work(n, 1).rng)


def test_kept_step_gives_the_same_bits_at_any_thread_count_and_restores_it():
    """At 2 torch threads the server step leaves the bits of 1 thread, and the thread count."""
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ps = _odd_params()
            seen = []
            # (a loss whose sums stay under torch's grain size: a parallel sum would round otherwise)
            coeffs = zo.zo_step_(ps, lambda: seen.append(torch.get_num_threads())
                                 or float(ps[0][:1000].sum()) + float(ps[2][-1000:].sum()),
                                 0.005, 0.01, [8, 9], "gaussian")
            assert seen == [threads] * 4  # the forwards keep the caller's threads
            assert torch.get_num_threads() == threads
            out.append((coeffs, ps))
    finally:
        torch.set_num_threads(before)
    assert out[0][0] == out[1][0]
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
