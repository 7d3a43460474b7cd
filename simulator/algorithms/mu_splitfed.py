"""MU-SplitFed: zeroth-order clients and tau unbalanced server updates that fill idle time.

Source: the MU-SplitFed paper (arXiv 2510.21155, NeurIPS 2025), its Algorithm 1, as
summarised in docs/algorithms.md ("MU-SplitFed"); how it is simulated: docs/mu_splitfed.md.
Also ``splitfed_zo``, the paper's "vanilla SplitFed": the same algorithm with tau = 1 (its
own config, no tau field). This module never prices anything itself (the engine does) and
never touches another algorithm's state.

Per round t, for each participating client m, in parallel (banners below map to these lines):

  1. the client part starts from the global x_c (downloaded, timed); the Split Server starts
     a server copy x_s,m from the global x_s (one copy per client, SplitFed-V1 style);
  2. the client samples ONE minibatch, computes h = h(x_c; xi) and sends h and the labels at
     once; then, for p = 1..P, h+_p = h(x_c + lam u_p; xi) and h-_p = h(x_c - lam u_p; xi),
     each sent as soon as it is computed (the client's messages queue on its uplink, FIFO);
  3. when h arrives the server runs tau local steps on x_s,m, all reusing (h, y): ZO steps
     (the paper: two-point, fresh u_s per step, step size eta_s) or first-order SGD steps
     (``server_optimizer: fo``). Each step is one server job: the steps of all clients
     compete for the server's slots;
  4. after its tau steps AND the arrival of the 2P perturbed activations, the server
     computes delta_p = F(x_s,m; h+_p) - F(x_s,m; h-_p) with the UPDATED copy and sends the
     P scalars (float32) down in one message;
  5. the client regenerates u_p and updates x_c,m = x_c - eta_c/P sum_p delta_p/(2 lam) u_p,
     then uploads x_c,m;
  6. round end: the Fed Server and the Split Server each apply x = x + eta_g * mean_m(x_m - x).

``tau: adaptive`` (an option of ours; the paper uses fixed tau): the server keeps stepping
while the client's perturbed activations are still on their way. Precisely, after each local
step ends, another one starts iff fewer than ``tau_max`` steps were taken and the last of
the client's 2P perturbed activations has not yet arrived at that simulated instant (at least
one step is always taken). A step that starts just before the arrival still runs to its end:
the activations then wait for it.

Choices where the paper is silent (also in docs/mu_splitfed.md):
- P (``perturbations``) is used by the client probes AND by each server ZO step;
- server ZO step FLOPs: 2P server forwards (no unperturbed forward: the central difference
  does not need it; the recorded training loss is the free midpoint (F+ + F-)/2) plus the
  in-place passes over the server parameters (3 per probe and 1 per update, 2 FLOPs per
  element each); a first-order server step is the profiled forward + backward (the backward
  includes dL/dh, which this step does not need: a slight overestimate) plus the SGD axpy;
- client perturbed forwards carry their in-place passes: h+ one pass, h- two (the -2 lam
  move and the restore); the client ZO update is one pass per perturbation. Generating u is
  not counted in FLOPs (like the elementwise ops that FlopCounterMode does not count);
- each client message takes its uplink in turn (a client sends one message at a time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import simpy
import torch
import torch.nn.functional as F
from pydantic import Field

from simulator.algorithms.common import (
    ClientBatches,
    Params,
    RoundConfig,
    RunContext,
    aggregate,
    aggregation_flops,
    aggregation_weights,
    batch_tensors,
    clone,
    evaluate,
    forward,
    leaf,
    num_params,
    params_of,
    select_clients,
    sgd_step,
)
from simulator.config import Fraction, PosFloat, PosInt
from simulator.errors import UserError
from simulator.latency import DOWNLINK, UPLINK
from simulator.zo import perturb_, zo_seed, zo_step_, zo_update_

SCALAR_BYTES = 4  # a loss difference travels as float32


# --------------------------------------------------------------------------------------------
# Configuration (paper defaults: Table 6 of arXiv 2510.21155)
# --------------------------------------------------------------------------------------------
class ZOSplitConfig(RoundConfig):
    """Options shared by mu_splitfed and splitfed_zo (defaults: the paper's Table 6)."""

    participation: Fraction = Field(0.5, description="Fraction of clients taking part in each round (paper: 5 of 10).")
    eta_g: PosFloat = Field(0.3, description="Global step: x = x + eta_g * mean(x_m - x) on both sides at round end.")
    eta_s: PosFloat = Field(0.01, description="Server step size (ZO or first-order SGD) for each of the tau local steps.")
    eta_c: PosFloat = Field(0.005, description="Client ZO step size.")
    lam: PosFloat = Field(0.005, description="ZO smoothing radius lambda (client probes and server ZO steps).")
    perturbations: PosInt = Field(1, description="P: directions per ZO estimate (client: 2P perturbed activations).")
    direction: Literal["gaussian", "sphere"] = Field(
        "gaussian", description="ZO direction: N(0, I) (the authors' code) or uniform on the sphere of radius sqrt(d) (the paper)."
    )
    server_optimizer: Literal["zo", "fo"] = Field(
        "zo", description="Server local steps: zeroth-order (the paper) or first-order SGD (backprop on the server part)."
    )


class MUSplitFedConfig(ZOSplitConfig):
    """MU-SplitFed: tau unbalanced server steps per client and round."""

    name: Literal["mu_splitfed"]
    tau: Union[PosInt, Literal["adaptive"]] = Field(
        2, description="Server local steps per client and round, or 'adaptive' (step until the perturbed activations arrive)."
    )
    tau_max: PosInt = Field(8, description="Most server steps per client and round with tau: adaptive (ignored otherwise).")


class SplitFedZOConfig(ZOSplitConfig):
    """The paper's vanilla SplitFed: MU-SplitFed with tau = 1."""

    name: Literal["splitfed_zo"]


# --------------------------------------------------------------------------------------------
# Pure steps: tensors in, tensors out (no clock)
# --------------------------------------------------------------------------------------------
def _server_loss(module, params: Params, h: torch.Tensor, y: torch.Tensor, aux=None) -> torch.Tensor:
    logits = forward(module, params, h) if aux is None else forward(module, params, h, aux)
    return F.cross_entropy(logits, y)


@torch.no_grad()
def client_activation(module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """h = h(x_c; xi), no graph."""
    return forward(module, params, x)


@torch.no_grad()
def probe_plus(module, params: Params, x: torch.Tensor, seed: int, lam: float, direction: str) -> torch.Tensor:
    """Move x_c to x_c + lam*u in place and return h+ (x_c stays moved until ``probe_minus``)."""
    perturb_(list(params.values()), seed, lam, direction)
    return forward(module, params, x)


@torch.no_grad()
def probe_minus(module, params: Params, x: torch.Tensor, seed: int, lam: float, direction: str) -> torch.Tensor:
    """From x_c + lam*u move to x_c - lam*u, return h-, and move back to x_c (MeZO's restore)."""
    ps = list(params.values())
    perturb_(ps, seed, -2.0 * lam, direction)
    h_minus = forward(module, params, x)
    perturb_(ps, seed, lam, direction)
    return h_minus


def client_zo_update(params: Params, seeds: list[int], deltas: list[float], lam: float, lr: float,
                     direction: str) -> None:
    """x_c -= lr/P * sum_p delta_p / (2 lam) * u_p, each u_p regenerated from its seed."""
    zo_update_(list(params.values()), seeds, [d / (2.0 * lam) for d in deltas], lr, direction)


def server_zo_step(module, params: Params, h: torch.Tensor, y: torch.Tensor, seeds: list[int], lam: float,
                   lr: float, direction: str, aux=None) -> float:
    """One ZO-SGD step on the server copy (in place); returns the midpoint loss estimate."""
    _, loss = zo_step_(list(params.values()), lambda: _server_loss(module, params, h, y, aux), lam, lr, seeds, direction)
    return loss


def server_fo_step(module, params: Params, h: torch.Tensor, y: torch.Tensor, lr: float, aux=None) -> float:
    """One first-order SGD step on the server copy (in place); returns the loss before it."""
    p = leaf(params)
    loss = _server_loss(module, p, h.detach(), y, aux)
    grads = torch.autograd.grad(loss, list(p.values()))
    sgd_step(params, dict(zip(p, grads)), lr)
    return float(loss.detach())


@torch.no_grad()
def loss_differences(module, params: Params, pairs: list[tuple[torch.Tensor, torch.Tensor]], y: torch.Tensor,
                     aux=None) -> list[float]:
    """delta_p = F(x_s; h+_p) - F(x_s; h-_p), computed and sent as float32."""
    out = []
    for hp, hm in pairs:
        d = _server_loss(module, params, hp, y, aux) - _server_loss(module, params, hm, y, aux)
        out.append(float(d.to(torch.float32)))
    return out


# --------------------------------------------------------------------------------------------
# The SimPy process
# --------------------------------------------------------------------------------------------
@dataclass
class _ClientRound:
    """What one client's round did (one row of client_rounds.csv)."""

    round: int
    client: int
    start_s: float
    tau_used: int = 0
    h_arrival_s: float = float("nan")
    perturbed_arrival_s: float = float("nan")
    server_steps_s: float = 0.0  # busy time of this client's tau local steps
    server_loss_diff_s: float = 0.0  # busy time of the final loss differences
    server_queue_s: float = 0.0  # time this client's server jobs waited for a slot
    server_idle_s: float = 0.0  # after the local steps, waiting for the perturbed activations
    client_wait_s: float = 0.0  # client: end of its last probe -> scalars received
    bytes_up: int = 0
    bytes_down: int = 0
    server_loss: float = float("nan")
    end_s: float = float("nan")

    def row(self) -> dict:
        return dict(self.__dict__)


class MUSplitFed:
    """MU-SplitFed (and splitfed_zo, which has no tau field and so runs tau = 1)."""

    def __init__(self, ctx: RunContext):
        self.ctx, self.cfg = ctx, ctx.cfg
        cfg = self.cfg
        for part in ("client", "server"):
            frozen = [n for n, p in getattr(ctx.parts, part).named_parameters() if not p.requires_grad]
            if frozen:  # ZO perturbs every parameter of a part: refuse rather than train frozen ones
                raise UserError(f"{cfg.name} trains every {part} parameter, but these are frozen: {frozen[:5]}")
        self.tau: Union[int, str] = getattr(cfg, "tau", 1)
        self.tau_max: int = getattr(cfg, "tau_max", 1)
        self.client_global: Params = params_of(ctx.parts.client)
        self.server_global: Params = params_of(ctx.parts.server)
        self.batches = ClientBatches(ctx.partitions, cfg.batch_size, ctx.seed)
        self.round = 0
        self.client_n = num_params(self.client_global)
        self.server_n = num_params(self.server_global)
        self.records: list[_ClientRound] = []
        # One FIFO queue per client uplink: a client sends one message at a time.
        self.uplinks = [simpy.Resource(ctx.sim.env, capacity=1) for _ in range(ctx.num_clients)]

    def evaluate(self, x, y, batch_size):
        return evaluate(self.ctx.parts, self.client_global, self.server_global, x, y, batch_size, self.ctx.device)

    # ---- timed helpers -----------------------------------------------------------------------
    def _upload(self, c: int, r: int, kind: str, nbytes: int, rec: _ClientRound, arrived: simpy.Event):
        """Queue on client c's uplink, send, then trigger ``arrived`` (value: arrival time)."""
        sim = self.ctx.sim
        with self.uplinks[c].request() as req:
            yield req
            yield from sim.send(c, UPLINK, kind, nbytes, r)
        rec.bytes_up += nbytes
        arrived.succeed(sim.now)

    def _serve(self, kind: str, flops: float, c: int, r: int) -> tuple[float, float]:
        """One Split Server job; returns (busy seconds, seconds waited for a slot)."""
        sim = self.ctx.sim
        yield from sim.serve(kind, flops, c, r)
        ev = sim.recorder.events[-1]  # the span just recorded: (client, party, kind, ..., start, end, wait, ...)
        assert ev[0] == c and ev[2] == kind, "the engine recorded another span in between"
        return ev[6] - ev[5], ev[7]

    # ---- one client's round ------------------------------------------------------------------
    def client_round(self, c: int, r: int, out: dict):
        ctx, cfg, sim, prof = self.ctx, self.cfg, self.ctx.sim, self.ctx.profile
        env, parts = sim.env, ctx.parts
        P, lam = cfg.perturbations, cfg.lam
        rec = _ClientRound(round=r, client=c, start_s=float(sim.now))
        self.records.append(rec)

        # Line 1: the client downloads x_c; the Split Server starts its copy x_s,m.
        yield from sim.send(c, DOWNLINK, "model_down", prof.client_param_bytes, r)
        rec.bytes_down += prof.client_param_bytes
        client = clone(self.client_global)
        server = clone(self.server_global)

        # Line 2: ONE minibatch; h at once, then the 2P perturbed activations as they are ready.
        idx = self.batches.next(c)
        scale = len(idx) / cfg.batch_size
        x, y = batch_tensors(ctx.data, idx, ctx.device)
        aux = parts.aux(x) if hasattr(parts, "aux") else None
        fwd = prof.client_forward_flops * scale
        act_bytes = int(prof.activation_bytes * scale)

        yield from sim.compute(c, "client_forward", fwd, r)
        h = client_activation(parts.client, client, x)
        # Arrival events exist up front, so the server side can look at them at any time.
        h_arrived = env.event()
        perturbed = [env.event() for _ in range(2 * P)]  # h+_1, h-_1, h+_2, ...
        scalars = env.event()
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        env.process(self._upload(c, r, "activation", act_bytes + int(prof.label_bytes * scale), rec, h_arrived))
        server_proc = env.process(self.server_side(c, r, server, h, y, aux, pairs, h_arrived, perturbed, scalars, rec))

        seeds = [zo_seed(ctx.seed, "client", r, c, p) for p in range(P)]
        for p, s in enumerate(seeds):
            yield from sim.compute(c, "client_forward_plus", fwd + 2 * self.client_n, r)
            hp = probe_plus(parts.client, client, x, s, lam, cfg.direction)
            env.process(self._upload(c, r, "activation_plus", act_bytes, rec, perturbed[2 * p]))
            yield from sim.compute(c, "client_forward_minus", fwd + 4 * self.client_n, r)
            hm = probe_minus(parts.client, client, x, s, lam, cfg.direction)
            env.process(self._upload(c, r, "activation_minus", act_bytes, rec, perturbed[2 * p + 1]))
            pairs.append((hp, hm))

        # Line 5: wait for the P scalars, then the ZO update and the upload of x_c,m.
        probes_done = sim.now
        deltas = yield scalars
        rec.client_wait_s = float(sim.now - probes_done)
        yield from sim.compute(c, "client_zo_update", 2 * self.client_n * P, r)
        client_zo_update(client, seeds, deltas, lam, cfg.eta_c, cfg.direction)
        up_done = env.event()
        yield env.process(self._upload(c, r, "model_up", prof.client_param_bytes, rec, up_done))
        yield server_proc
        rec.end_s = float(sim.now)
        out[c] = (client, server)
        sim.recorder.table("client_rounds", rec.row())

    # ---- the Split Server's side of one client's round ---------------------------------------
    def server_side(self, c, r, server: Params, h, y, aux, pairs, h_arrived, perturbed, scalars, rec: _ClientRound):
        ctx, cfg, sim, prof = self.ctx, self.cfg, self.ctx.sim, self.ctx.profile
        P, lam = cfg.perturbations, cfg.lam
        scale = len(y) / cfg.batch_size
        rec.h_arrival_s = float((yield h_arrived))

        # Line 3: tau local steps on x_s,m, all reusing (h, y); they start as h arrives.
        if cfg.server_optimizer == "zo":
            kind = "server_zo_step"
            flops = 2 * P * prof.server_forward_flops * scale + 8 * P * self.server_n
        else:
            kind = "server_fo_step"
            flops = (prof.server_forward_flops + prof.server_backward_flops) * scale + 2 * self.server_n
        steps = 0
        while True:
            busy, queued = yield from self._serve(kind, flops, c, r)
            rec.server_steps_s += busy
            rec.server_queue_s += queued
            if cfg.server_optimizer == "zo":
                seeds = [zo_seed(ctx.seed, "server", r, c, steps, p) for p in range(P)]
                rec.server_loss = server_zo_step(ctx.parts.server, server, h, y, seeds, lam, cfg.eta_s,
                                                 cfg.direction, aux)
            else:
                rec.server_loss = server_fo_step(ctx.parts.server, server, h, y, cfg.eta_s, aux)
            steps += 1
            if self.tau == "adaptive":
                if steps >= self.tau_max or all(e.triggered for e in perturbed):
                    break
            elif steps >= self.tau:
                break
        rec.tau_used = steps
        steps_end = sim.now

        # Line 4: with the UPDATED copy, once the perturbed activations are in, the P scalars.
        arrivals = yield sim.env.all_of(perturbed)
        rec.perturbed_arrival_s = float(max(arrivals.values()))
        rec.server_idle_s = float(max(0.0, sim.now - steps_end))
        busy, queued = yield from self._serve("server_loss_diff", 2 * P * prof.server_forward_flops * scale, c, r)
        rec.server_loss_diff_s += busy
        rec.server_queue_s += queued
        deltas = loss_differences(ctx.parts.server, server, pairs, y, aux)
        yield from sim.send(c, DOWNLINK, "loss_diff", SCALAR_BYTES * P, r)
        rec.bytes_down += SCALAR_BYTES * P
        scalars.succeed(deltas)

    # ---- the run -------------------------------------------------------------------------------
    def process(self):
        ctx, sim, cfg = self.ctx, self.ctx.sim, self.cfg
        while not sim.stopping:
            r = self.round
            clients = select_clients(ctx.seed, r, ctx.num_clients, cfg.participation)
            results: dict = {}
            procs = [sim.env.process(self.client_round(c, r, results)) for c in clients]
            yield sim.env.all_of(procs)
            # Line 6: x = x + eta_g * mean_m(x_m - x), Fed Server and Split Server in parallel.
            weights = aggregation_weights(cfg.aggregation, clients, ctx.partitions)
            m = len(clients)
            jobs = [
                sim.env.process(sim.fed("aggregate_client", aggregation_flops(self.client_n, m), r)),
                sim.env.process(sim.serve("aggregate_server", aggregation_flops(self.server_n, m), None, r)),
            ]
            yield sim.env.all_of(jobs)
            self.client_global = aggregate(self.client_global, [results[c][0] for c in clients], weights, cfg.eta_g)
            self.server_global = aggregate(self.server_global, [results[c][1] for c in clients], weights, cfg.eta_g)
            self.round += 1
            sim.end_round(r)

    def summary_extra(self) -> dict:
        """Totals over every client round, under the key ``mu_splitfed`` of summary.json."""
        done = [r for r in self.records if r.end_s == r.end_s]  # finished rounds (end_s is not NaN)
        n = len(done)
        taus = [r.tau_used for r in done]
        return {
            "mu_splitfed": {
                "tau": self.tau,
                "tau_max": self.tau_max if self.tau == "adaptive" else None,
                "server_optimizer": self.cfg.server_optimizer,
                "client_rounds": n,
                "mean_tau_used": (sum(taus) / n) if n else None,
                "min_tau_used": min(taus) if taus else None,
                "max_tau_used": max(taus) if taus else None,
                "server_local_steps": sum(taus),
                "server_steps_s": sum(r.server_steps_s for r in done),
                "server_loss_diff_s": sum(r.server_loss_diff_s for r in done),
                "server_queue_s": sum(r.server_queue_s for r in done),
                "server_idle_s": sum(r.server_idle_s for r in done),
                "client_wait_s": sum(r.client_wait_s for r in done),
                "mean_client_wait_s": (sum(r.client_wait_s for r in done) / n) if n else None,
                "bytes_up": sum(r.bytes_up for r in done),
                "bytes_down": sum(r.bytes_down for r in done),
            }
        }


def build(ctx: RunContext) -> MUSplitFed:
    return MUSplitFed(ctx)
