"""MU-SplitFed: zeroth-order clients and tau unbalanced server updates that fill idle time.

Source: the MU-SplitFed paper (arXiv 2510.21155, NeurIPS 2025), its Algorithm 1, as
summarised in docs/algorithms.md ("MU-SplitFed"); how it is simulated: docs/mu_splitfed.md.
Also ``splitfed_zo``, the paper's "vanilla SplitFed": the same algorithm with tau = 1 (its
own config, no tau field). Step sizes use the shared vocabulary: the paper's eta_c, eta_s and
eta_g are ``lr_client``, ``lr_server`` and ``lr_global``; lambda, P and the direction are ``zo``. This module never prices anything itself (the engine does) and
never touches another algorithm's state.

This module also holds the round-based exchange that SplitFed V1/V2 use (``SplitRounds``):
every round-based algorithm is this class with other settings, so one key means one thing.

Per round t, for each participating client m, in parallel, ``local_steps`` times (or
``local_epochs`` passes; the paper's Algorithm 1 as written does ONE local iteration per round),
each local iteration being the whole exchange below (banners map to these lines):

  1. the client part starts from the global x_c (downloaded, timed); the Split Server starts
     a server copy x_s,m from the global x_s (one copy per client, SplitFed-V1 style);
  2. the client samples a minibatch, computes h = h(x_c; xi) and sends h and the labels at
     once; then, for p = 1..P, h+_p = h(x_c + lam u_p; xi) and h-_p = h(x_c - lam u_p; xi),
     each sent as soon as it is computed (the client's messages queue on its uplink, FIFO);
  3. when h arrives the server runs tau local steps on x_s,m, all reusing (h, y): ZO steps
     (the paper: two-point, fresh u_s per step, step size eta_s) or first-order SGD steps
     (``server_optimizer: fo``). Each step is one server job: the steps of all clients
     compete for the server's slots (a first-order client, ``client_optimizer: fo``, sends h
     only; after the tau steps the server returns dL/dh computed with its UPDATED copy);
  4. after its tau steps AND the arrival of the 2P perturbed activations, the server
     computes delta_p = F(x_s,m; h+_p) - F(x_s,m; h-_p) with the UPDATED copy and sends the
     P scalars (float32) down in one message;
  5. the client regenerates u_p and updates x_c,m = x_c - eta_c/P sum_p delta_p/(2 lam) u_p;
     after its last local iteration it uploads x_c,m;
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
  elementwise ops over the server parameters (``zo.step_work``: each direction is drawn once
  and kept, then 6 ops, 7 with ``sphere``'s norm) at ``time.zo_elementwise_flops_per_element``
  each, and the P draws per parameter as ``rng_elements``, priced at
  ``time.zo_rng_flops_per_element``; a first-order server step is the profiled forward +
  backward (the backward includes dL/dh, which this step does not need: an overestimate, half
  the backward on the small CNN) plus the SGD axpy;
- client perturbed forwards carry their in-place passes (``zo.pass_work``: 2 elementwise ops
  and one draw per parameter each): h+ one pass, h- two (the -2 lam move and the restore); the
  client ZO update is one pass per perturbation (docs/time-model.md);
- each client message takes its uplink in turn (a client sends one message at a time).
"""
from __future__ import annotations

import itertools
from array import array
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import simpy
import torch
import torch.nn.functional as F

from simulator.algorithms.splitfed import client_backward_step, server_step
from simulator.algorithms.common import (
    ClientBatches,
    Params,
    RunContext,
    aggregate,
    aggregation_flops,
    aggregation_weights,
    aux_of,
    batch_tensors,
    check_finite,
    check_params,
    clone,
    evaluate,
    forward,
    leaf,
    num_params,
    params_of,
    run_round,
    select_clients,
    sgd_step,
    server_logits,
)
from simulator.algorithms.configs import MUSplitFedConfig, SplitFedZOConfig, ZOSplitConfig  # noqa: F401
from simulator.errors import UserError
from simulator.latency import DOWNLINK, UPLINK
from simulator.zo import Work, pass_work, perturb_, step_work, zo_seed, zo_step_, zo_update_

SCALAR_BYTES = 4  # a loss difference travels as float32


# --------------------------------------------------------------------------------------------
# Pure steps: tensors in, tensors out (no clock)
# --------------------------------------------------------------------------------------------
def _server_loss(module, params: Params, h: torch.Tensor, y: torch.Tensor, aux=None) -> torch.Tensor:
    return F.cross_entropy(server_logits(module, params, h, aux), y)


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


def server_fo_step(module, params: Params, h: torch.Tensor, y: torch.Tensor, lr: float, aux=None,
                   momentum: float = 0.0, weight_decay: float = 0.0, buffers: dict | None = None) -> float:
    """One first-order SGD step on the server copy (in place); returns the loss before it."""
    p = leaf(params)
    loss = _server_loss(module, p, h.detach(), y, aux)
    grads = torch.autograd.grad(loss, list(p.values()))
    sgd_step(params, dict(zip(p, grads)), lr, momentum, weight_decay, buffers)
    return float(loss.detach())


def server_gradient(module, params: Params, h: torch.Tensor, y: torch.Tensor, aux=None) -> tuple[torch.Tensor, float]:
    """dL/dh at the (unchanged) server params: what a first-order client gets back."""
    h = h.detach().requires_grad_(True)
    loss = _server_loss(module, params, h, y, aux)
    (dh,) = torch.autograd.grad(loss, h)
    return dh, float(loss.detach())


@torch.no_grad()
def loss_differences(module, params: Params, pairs: list[tuple[torch.Tensor, torch.Tensor]], y: torch.Tensor,
                     aux=None) -> list[float]:
    """delta_p = F(x_s; h+_p) - F(x_s; h-_p), computed and sent as float32."""
    out = []
    for hp, hm in pairs:
        d = _server_loss(module, params, hp, y, aux) - _server_loss(module, params, hm, y, aux)
        out.append(float(d.to(torch.float32)))
    return out


def _module_function(name: str):
    """A steps method that calls this module's function ``name`` as it is when called (so a test
    that patches the module's function patches the training run's step too)."""
    def call(self, *args, **kwargs):
        return globals()[name](*args, **kwargs)

    call.__name__ = name
    return call


# --------------------------------------------------------------------------------------------
# The tensor work of a round, as one replaceable object (timing-only runs swap it)
# --------------------------------------------------------------------------------------------
class RoundSteps:
    """Every tensor operation ``SplitRounds`` runs, behind one object (a training run).

    The SimPy process below calls only these methods for tensor work, so a timing-only run
    (``NoRoundSteps``) follows the very same control flow with the tensors left out: one
    schedule, never two copies of it (docs/timing-only.md).
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    clone = _module_function("clone")
    client_activation = _module_function("client_activation")
    probe_plus = _module_function("probe_plus")
    probe_minus = _module_function("probe_minus")
    client_zo_update = _module_function("client_zo_update")
    server_zo_step = _module_function("server_zo_step")
    server_fo_step = _module_function("server_fo_step")
    server_gradient = _module_function("server_gradient")
    loss_differences = _module_function("loss_differences")
    server_step = _module_function("server_step")
    client_backward_step = _module_function("client_backward_step")
    aggregate = _module_function("aggregate")
    check_finite = _module_function("check_finite")
    check_params = _module_function("check_params")

    def batch(self, idx):
        """The minibatch tensors of indices ``idx``: (x, y, aux)."""
        x, y = batch_tensors(self.ctx.data, idx, self.ctx.device)
        return x, y, aux_of(self.ctx.parts, x)

    def next_batch(self, batches: ClientBatches, c: int):
        """Client c's next minibatch: (x, y, aux, its number of samples)."""
        idx = batches.next(c)
        x, y, aux = self.batch(idx)
        return x, y, aux, len(idx)

    def zo_seeds(self, P: int, *key) -> list[int]:
        """The seeds of the P directions of one ZO op: ``zo_seed(run seed, *key, p)``."""
        seed = self.ctx.seed
        return [zo_seed(seed, *key, p) for p in range(P)]

    @staticmethod
    def graph_forward(module, params: Params, x):
        """h with the graph to the client parameters: (the leaf views, h)."""
        p = leaf(params)
        return p, forward(module, p, x)

    def evaluate(self, client_params: Params, server_params: Params, x, y, batch_size: int):
        return evaluate(self.ctx.parts, client_params, server_params, x, y, batch_size, self.ctx.device)

    @staticmethod
    def row(table: str, row: dict) -> dict:
        """A row of an algorithm table as it is recorded (a re-timed run fills in the values)."""
        return row


class NoRoundSteps(RoundSteps):
    """``RoundSteps`` with no tensor work: a timing-only run (``ctx.timing``).

    Parameters are never copied or changed (the global parts stay the initial model), a
    minibatch is its labels only (their count sets the priced FLOPs), losses are NaN and are
    not checked. Evaluation and table values come from ``ctx.timing`` (NaN, or a finished
    run's values when re-timing: ``simulator.retime``).
    """

    def batch(self, idx):
        return None, self.ctx.data.y_train[torch.as_tensor(idx, dtype=torch.long)], None

    @staticmethod
    def next_batch(batches, c):
        # Only the sample count is priced: the cursor moves on, no permutation is drawn.
        return None, None, None, batches.next_size(c)

    @staticmethod
    def zo_seeds(P, *key):
        return None  # no direction is ever drawn

    @staticmethod
    def clone(params):
        return params

    @staticmethod
    def graph_forward(module, params, x):
        return None, None

    @staticmethod
    def client_activation(module, params, x):
        return None

    @staticmethod
    def probe_plus(module, params, x, seed, lam, direction):
        return None

    probe_minus = probe_plus

    @staticmethod
    def client_zo_update(params, seeds, deltas, lam, lr, direction):
        return None

    @staticmethod
    def server_zo_step(module, params, h, y, seeds, lam, lr, direction, aux=None):
        return float("nan")

    @staticmethod
    def server_fo_step(module, params, h, y, lr, aux=None, momentum=0.0, weight_decay=0.0, buffers=None):
        return float("nan")

    @staticmethod
    def server_gradient(module, params, h, y, aux=None):
        return None, float("nan")

    @staticmethod
    def loss_differences(module, params, pairs, y, aux=None):
        return [float("nan")] * len(pairs)

    @staticmethod
    def server_step(module, params, h, y, cfg, buffers, aux=None):
        return None, float("nan")

    @staticmethod
    def client_backward_step(params, p_leaf, h, dh, cfg, buffers):
        return None

    @staticmethod
    def aggregate(global_params, local, weights, eta_g=1.0):
        return global_params

    @staticmethod
    def check_finite(value, what, **where):
        return None

    @staticmethod
    def check_params(params, what, **where):
        return None

    def evaluate(self, client_params, server_params, x, y, batch_size):
        return self.ctx.timing.evaluate(self.ctx.sim.rounds_done)

    def row(self, table, row):
        return self.ctx.timing.row(table, row)


# --------------------------------------------------------------------------------------------
# The SimPy process
# --------------------------------------------------------------------------------------------
@dataclass
class _ClientRound:
    """What one local iteration of one client did (one row of client_rounds.csv)."""

    round: int
    client: int
    start_s: float
    local_step: int = 0
    tau_used: int = 0
    h_arrival_s: float = float("nan")
    perturbed_arrival_s: float = float("nan")
    server_steps_s: float = 0.0  # busy time of this client's tau local steps
    server_loss_diff_s: float = 0.0  # busy time of the final loss differences (or dL/dh)
    server_queue_s: float = 0.0  # time this client's server jobs waited for a slot
    server_idle_s: float = 0.0  # after the local steps, waiting for the perturbed activations
    client_wait_s: float = 0.0  # client: end of its last probe (or its upload of h) -> answer received
    bytes_up: int = 0
    bytes_down: int = 0
    server_loss: float = float("nan")
    end_s: float = float("nan")

    def row(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RoundsState:
    """What a round-based run carries from one round to the next: plain data, no processes.

    Between rounds (the barrier) this is the whole algorithm: the global parts, V2's shared
    server momentum, the minibatch cursors and the per-iteration records behind the summary.
    """

    round: int
    client_global: Params
    server_global: Params
    batches: ClientBatches
    server_buffers: dict = field(default_factory=dict)  # V2's shared server momentum (persists)
    records: list = field(default_factory=list)  # this round's _ClientRound rows (only where the table is kept)
    finished: "_Finished" = field(default_factory=lambda: _Finished())  # earlier rounds' rows, what the summary sums


#: the _ClientRound fields summary_extra reads (sums, counts), kept per finished local iteration
_SUMMED = ("round", "client", "tau_used", "server_steps_s", "server_loss_diff_s", "server_queue_s",
           "server_idle_s", "client_wait_s", "bytes_up", "bytes_down")


class _Finished:
    """The finished local iterations of earlier rounds, a compact column per field of ``_SUMMED``
    (8 bytes each, in the order they started), so that a long run's memory does not grow by a
    _ClientRound object per local iteration; ``column`` chains this round's own records on."""

    def __init__(self):
        self.cols = {f: array("d" if f.endswith("_s") else "q") for f in _SUMMED}

    def add(self, records: list) -> None:
        for r in records:
            for f, col in self.cols.items():
                col.append(getattr(r, f))

    def column(self, name: str, current: list) -> Iterator:
        """Field ``name`` of every finished local iteration, earlier rounds first, then ``current``."""
        return itertools.chain(self.cols[name], (getattr(r, name) for r in current))


@dataclass
class _Exchange:
    """One local iteration of one client in flight: what the client and server sides share."""

    client: int
    round: int
    step: int  # local iteration k within the round
    server: Params  # the server copy it trains (V2: the shared server model)
    server_buf: dict
    h: torch.Tensor
    y: torch.Tensor
    aux: object
    rec: _ClientRound
    scale: float  # the minibatch's samples / batch_size (scales the priced FLOPs)
    pairs: list = field(default_factory=list)  # (h+_p, h-_p), filled by the client as it probes
    h_arrived: Optional[simpy.Event] = None
    perturbed: tuple = ()  # arrival events of h+_1, h-_1, h+_2, ...
    scalars: Optional[simpy.Event] = None


class SplitRounds:
    """Round-based split learning: MU-SplitFed, splitfed_zo and SplitFed V1/V2.

    ``shared_server``: one server model updated in arrival order (V2) instead of a copy per
    client averaged at round end. ``tau``: server steps per local iteration (int or
    'adaptive'). ``dh_with_step``: a first-order client gets dL/dh from the backward pass of
    the server's (single) step, as SplitFed does; otherwise from the copy after its tau steps.
    ``table``: write client_rounds.csv (one row per local iteration of a client).
    State lives in ``self.state`` (``RoundsState``); the rest is configuration.
    """

    def __init__(self, ctx: RunContext, *, shared_server: bool = False, tau: Union[int, str] = 1, tau_max: int = 1,
                 dh_with_step: bool = False, table: bool = True):
        self.ctx, self.cfg = ctx, ctx.cfg
        cfg = self.cfg
        for part, opt in (("client", cfg.client_optimizer), ("server", cfg.server_optimizer)):
            frozen = [n for n, p in getattr(ctx.parts, part).named_parameters() if not p.requires_grad]
            if opt == "zo" and frozen:  # ZO perturbs every parameter of a part: refuse rather than train frozen ones
                raise UserError(f"{cfg.name} with {part}_optimizer zo trains every {part} parameter, "
                                f"but these are frozen: {frozen[:5]}")
        self.shared_server, self.dh_with_step, self.table = shared_server, dh_with_step, table
        self.tau, self.tau_max = tau, tau_max
        self.state = RoundsState(round=0, client_global=params_of(ctx.parts.client),
                                 server_global=params_of(ctx.parts.server),
                                 batches=ClientBatches(ctx.partitions, cfg.batch_size, ctx.seed))
        self.client_n = num_params(self.state.client_global)
        self.server_n = num_params(self.state.server_global)
        self.t = NoRoundSteps(ctx) if ctx.timing is not None else RoundSteps(ctx)  # the tensor work
        # One FIFO queue per client uplink: a client sends one message at a time.
        self.uplinks = [ctx.sim.slots(1) for _ in range(ctx.num_clients)]
        self._pass_costs: dict = {}  # (n, passes, seeds) -> (FLOPs, rng elements): _pass_cost

    def evaluate(self, x, y, batch_size):
        st = self.state
        return self.t.evaluate(st.client_global, st.server_global, x, y, batch_size)

    # ---- checkpoint and resume (simulator.checkpoint) -----------------------------------------
    def set_timing(self, timing) -> None:
        """Swap the tensor work: no-op steps answering from ``timing``, or (None) training steps."""
        self.ctx.timing = timing
        self.t = NoRoundSteps(self.ctx) if timing is not None else RoundSteps(self.ctx)

    def checkpoint_state(self) -> dict:
        """The state at a round end (the barrier: nothing is in flight), as plain data.

        The per-iteration records are not in it: a resume's replay rebuilds them (their timing
        fields) and summary_extra reads nothing else of them.
        """
        st = self.state
        return {
            "round": st.round,
            "client_global": dict(st.client_global),
            "server_global": dict(st.server_global),
            "server_buffers": dict(st.server_buffers),
            "cursor": {int(k): int(v) for k, v in st.batches.cursor.items()},
        }

    def load_checkpoint_state(self, state: dict) -> None:
        """Put a ``checkpoint_state`` back (in place: the running process holds ``self.state``)."""
        st, dev = self.state, self.ctx.device
        if int(state["round"]) != st.round or state["cursor"] != st.batches.cursor:
            raise RuntimeError(f"resuming: the replay is at round {st.round} with minibatch cursors "
                               f"{st.batches.cursor}, the checkpoint at round {state['round']} with {state['cursor']}")
        st.client_global = {k: v.to(dev) for k, v in state["client_global"].items()}
        st.server_global = {k: v.to(dev) for k, v in state["server_global"].items()}
        st.server_buffers.clear()
        st.server_buffers.update({k: v.to(dev) for k, v in state["server_buffers"].items()})

    def steps_for(self, client: int) -> int:
        """Local iterations of ``client`` per round (local_steps, or local_epochs passes)."""
        return self.cfg.steps_for(self.state.batches.batches_per_epoch(client))

    def _passes(self, n: int, passes: int, seeds: int = 0) -> Work:
        """The work of ``passes`` in-place passes over n parameters, plus the sphere direction's
        norm pass once per new seed (``zo.pass_work``)."""
        return pass_work(n, passes, seeds if self.cfg.zo.direction == "sphere" else 0)

    def _pass_cost(self, n: int, passes: int, seeds: int = 0) -> tuple[float, int]:
        """``(self._zo_flops(w), w.rng)`` of ``w = self._passes(n, passes, seeds)``, computed once
        per run (the per-operation path asks for the same few)."""
        key = (n, passes, seeds)
        cost = self._pass_costs.get(key)
        if cost is None:
            w = self._passes(n, passes, seeds)
            cost = self._pass_costs[key] = (self._zo_flops(w), w.rng)
        return cost

    def _zo_flops(self, w: Work) -> float:
        """FLOP-equivalents of a ZO op's elementwise work (``time.zo_elementwise_flops_per_element``)."""
        return w.flops(self.ctx.scenario.time.zo_elementwise_flops_per_element)

    def _batch(self, c: int):
        """The next minibatch of client c: (x, y, aux, scale of its priced FLOPs)."""
        x, y, aux, n = self.t.next_batch(self.state.batches, c)
        return x, y, aux, n / self.cfg.batch_size

    # ---- timed helpers -----------------------------------------------------------------------
    def _upload(self, c: int, r: int, kind: str, nbytes: int, rec: _ClientRound, arrived: simpy.Event) -> None:
        """From now, in the background: queue on client c's uplink, send, then trigger ``arrived``
        (value: arrival time). No process of its own (``Simulation.send_queued``)."""
        sim = self.ctx.sim

        def done():
            rec.bytes_up += nbytes
            arrived.succeed(sim.now)

        sim.send_queued(self.uplinks[c], c, UPLINK, kind, nbytes, r, done)

    # ---- one client's round ------------------------------------------------------------------
    def client_round(self, c: int, r: int, out: dict):
        cfg, sim, prof = self.cfg, self.ctx.sim, self.ctx.profile
        zo_client = cfg.client_optimizer == "zo"
        steps = self.steps_for(c)
        recs = [_ClientRound(round=r, client=c, start_s=float(sim.now), local_step=k) for k in range(steps)]
        if self.table:  # kept for summary_extra (the rows go to client_rounds.csv at round end)
            self.state.records.extend(recs)

        # Line 1: the client downloads x_c; the Split Server starts its copy x_s,m (V2: shares one).
        yield from sim.send(c, DOWNLINK, "model_down", prof.client_param_bytes, r)
        recs[0].bytes_down += prof.client_param_bytes
        client = self.t.clone(self.state.client_global)
        client_buf: dict = {}
        if self.shared_server:
            server, server_buf = self.state.server_global, self.state.server_buffers
        else:
            server, server_buf = self.t.clone(self.state.server_global), {}

        for k, rec in enumerate(recs):
            rec.start_s = float(sim.now)
            if zo_client:
                yield from self.zo_exchange(c, r, k, client, server, server_buf, rec)
            else:
                yield from self.fo_exchange(c, r, k, client, client_buf, server, server_buf, rec)
            rec.end_s = float(sim.now)

        # Client -> Fed Server: x_c,m (a ZO client's uplink may still be in use: it queues).
        if zo_client:
            up_done = sim.env.event()
            self._upload(c, r, "model_up", prof.client_param_bytes, recs[-1], up_done)
            yield up_done
        else:
            yield from sim.send(c, UPLINK, "model_up", prof.client_param_bytes, r)
            recs[-1].bytes_up += prof.client_param_bytes
        recs[-1].end_s = float(sim.now)
        out[c] = (client, server)
        if self.table:
            for rec in recs:
                sim.recorder.table("client_rounds", self.t.row("client_rounds", rec.row()))

    # ---- a first-order client's local iteration ------------------------------------------------
    def fo_exchange(self, c, r, k, client: Params, client_buf: dict, server: Params, server_buf: dict,
                    rec: _ClientRound):
        """Forward, h up, the server's step(s), dL/dh down, client backward and SGD step."""
        cfg, sim, prof, parts = self.cfg, self.ctx.sim, self.ctx.profile, self.ctx.parts
        x, y, aux, scale = self._batch(c)
        # Client forward on its minibatch.
        yield from sim.compute(c, "client_forward", prof.client_forward_flops * scale, r)
        p, h = self.t.graph_forward(parts.client, client, x)
        # Client -> Split Server: smashed data h and labels.
        nbytes = int((prof.activation_bytes + prof.label_bytes) * scale)
        yield from sim.send(c, UPLINK, "activation", nbytes, r)
        rec.bytes_up += nbytes
        rec.h_arrival_s = float(sim.now)
        fb = (prof.server_forward_flops + prof.server_backward_flops) * scale
        if self.dh_with_step:
            # SplitFed: one server forward/backward (queues for a slot), real step right after.
            busy, queued = yield from sim.serve("server_step", fb, c, r)
            rec.server_steps_s += busy
            rec.server_queue_s += queued
            rec.tau_used = 1
            dh, loss = self.t.server_step(parts.server, server, _detach(h), y, cfg, server_buf, aux)
        else:
            # MU-SplitFed with a first-order client: tau steps, then dL/dh from the updated copy.
            ex = _Exchange(c, r, k, server, server_buf, _detach(h), y, aux, rec, scale)
            yield from self.server_steps(ex)
            busy, queued = yield from sim.serve("server_gradient", fb, c, r)
            rec.server_loss_diff_s += busy
            rec.server_queue_s += queued
            dh, loss = self.t.server_gradient(parts.server, server, h, y, aux)
        rec.server_loss = loss
        self.t.check_finite(loss, "training loss", round=r, local_step=k, party="server", client=c)
        # Split Server -> client: dL/dh.
        up_done = sim.now
        yield from sim.send(c, DOWNLINK, "gradient", int(prof.activation_bytes * scale), r)
        rec.bytes_down += int(prof.activation_bytes * scale)
        rec.client_wait_s = float(sim.now - up_done)
        yield from sim.compute(c, "client_backward", prof.client_backward_flops * scale, r)
        self.t.client_backward_step(client, p, h, dh, cfg, client_buf)

    # ---- a ZO client's local iteration ---------------------------------------------------------
    def zo_exchange(self, c, r, k, client: Params, server: Params, server_buf: dict, rec: _ClientRound):
        """Lines 2-5: h and 2P perturbed activations up, tau server steps, P scalars down, ZO update."""
        ctx, cfg, sim, prof = self.ctx, self.cfg, self.ctx.sim, self.ctx.profile
        env, parts = sim.env, ctx.parts
        P, lam, direction = cfg.zo.perturbations, cfg.zo.lam, cfg.zo.direction

        # Line 2: a minibatch; h at once, then the 2P perturbed activations as they are ready.
        x, y, aux, scale = self._batch(c)
        fwd = prof.client_forward_flops * scale
        act_bytes = int(prof.activation_bytes * scale)

        yield from sim.compute(c, "client_forward", fwd, r)
        h = self.t.client_activation(parts.client, client, x)
        # Arrival events exist up front, so the server side can look at them at any time.
        ex = _Exchange(c, r, k, server, server_buf, h, y, aux, rec, scale, h_arrived=env.event(),
                       perturbed=tuple(env.event() for _ in range(2 * P)), scalars=env.event())
        self._upload(c, r, "activation", act_bytes + int(prof.label_bytes * scale), rec, ex.h_arrived)
        server_proc = env.process(self.server_side(ex))

        n = self.client_n
        seeds = self.t.zo_seeds(P, "client", r, c, k)
        for p in range(P):
            s = seeds[p] if seeds is not None else None
            zo_flops, rng = self._pass_cost(n, 1, 1)
            yield from sim.compute(c, "client_forward_plus", fwd + zo_flops, r, rng_elements=rng)
            hp = self.t.probe_plus(parts.client, client, x, s, lam, direction)
            self._upload(c, r, "activation_plus", act_bytes, rec, ex.perturbed[2 * p])
            zo_flops, rng = self._pass_cost(n, 2)
            yield from sim.compute(c, "client_forward_minus", fwd + zo_flops, r, rng_elements=rng)
            hm = self.t.probe_minus(parts.client, client, x, s, lam, direction)
            self._upload(c, r, "activation_minus", act_bytes, rec, ex.perturbed[2 * p + 1])
            ex.pairs.append((hp, hm))

        # Line 5: wait for the P scalars, then the ZO update.
        probes_done = sim.now
        deltas = yield ex.scalars
        rec.client_wait_s = float(sim.now - probes_done)
        for d in deltas:
            self.t.check_finite(d, "loss difference", round=r, local_step=k, party="server", client=c)
        zo_flops, rng = self._pass_cost(n, P)
        yield from sim.compute(c, "client_zo_update", zo_flops, r, rng_elements=rng)
        self.t.client_zo_update(client, seeds, deltas, lam, cfg.lr_client, direction)
        yield server_proc

    # ---- the Split Server's side of one ZO local iteration ------------------------------------
    def server_side(self, ex: _Exchange):
        cfg, sim, prof = self.cfg, self.ctx.sim, self.ctx.profile
        P, rec = cfg.zo.perturbations, ex.rec
        scale = ex.scale
        rec.h_arrival_s = float((yield ex.h_arrived))

        # Line 3: tau local steps on x_s,m, all reusing (h, y); they start as h arrives.
        yield from self.server_steps(ex)
        steps_end = sim.now

        # Line 4: with the UPDATED copy, once the perturbed activations are in, the P scalars.
        arrivals = yield sim.env.all_of(ex.perturbed)
        rec.perturbed_arrival_s = float(max(arrivals.values()))
        rec.server_idle_s = float(max(0.0, sim.now - steps_end))
        busy, queued = yield from sim.serve("server_loss_diff", 2 * P * prof.server_forward_flops * scale,
                                            ex.client, ex.round)
        rec.server_loss_diff_s += busy
        rec.server_queue_s += queued
        deltas = self.t.loss_differences(self.ctx.parts.server, ex.server, ex.pairs, ex.y, ex.aux)
        yield from sim.send(ex.client, DOWNLINK, "loss_diff", SCALAR_BYTES * P, ex.round)
        rec.bytes_down += SCALAR_BYTES * P
        ex.scalars.succeed(deltas)

    def server_steps(self, ex: _Exchange):
        """Line 3: tau (or adaptive) server steps on (h, y), each one server job."""
        ctx, cfg, sim, prof = self.ctx, self.cfg, self.ctx.sim, self.ctx.profile
        P, lam, rec = cfg.zo.perturbations, cfg.zo.lam, ex.rec
        c, r, k = ex.client, ex.round, ex.step
        scale = ex.scale
        n = self.server_n
        if cfg.server_optimizer == "zo":
            w = step_work(n, P, cfg.zo.direction)
            kind, rng_elements = "server_zo_step", w.rng
            flops = 2 * P * prof.server_forward_flops * scale + self._zo_flops(w)
        else:
            kind, rng_elements = "server_fo_step", 0
            # No dL/dh in a local step (h is a constant there): the params-only backward.
            flops = (prof.server_forward_flops + prof.server_backward_params_flops) * scale + 2 * n
        steps = 0
        while True:
            busy, queued = yield from sim.serve(kind, flops, c, r, rng_elements=rng_elements)
            rec.server_steps_s += busy
            rec.server_queue_s += queued
            if cfg.server_optimizer == "zo":
                seeds = self.t.zo_seeds(P, "server", r, c, k, steps)
                loss = self.t.server_zo_step(ctx.parts.server, ex.server, ex.h, ex.y, seeds, lam, cfg.lr_server,
                                      cfg.zo.direction, ex.aux)
            else:
                loss = self.t.server_fo_step(ctx.parts.server, ex.server, ex.h, ex.y, cfg.lr_server, ex.aux, cfg.momentum,
                                      cfg.weight_decay, ex.server_buf)
            rec.server_loss = loss
            self.t.check_finite(loss, "server training loss", round=r, local_step=k, party="server", client=c)
            steps += 1
            if self.tau == "adaptive":
                if steps >= self.tau_max or all(e.triggered for e in ex.perturbed):
                    break
            elif steps >= self.tau:
                break
        rec.tau_used = steps

    # ---- the run -------------------------------------------------------------------------------
    def process(self):
        ctx, sim, cfg, st = self.ctx, self.ctx.sim, self.cfg, self.state
        while not sim.stopping:
            r = st.round
            clients = select_clients(ctx.seed, r, ctx.num_clients, cfg.participation)
            results: dict = {}
            yield from run_round(sim, [self.client_round(c, r, results) for c in clients])
            st.finished.add(st.records)  # every one finished (the barrier): into the compact columns
            st.records.clear()
            # Line 6: x = x + lr_global * mean_m(x_m - x), Fed Server and Split Server in parallel.
            weights = aggregation_weights(cfg.aggregation, clients, ctx.partitions)
            m = len(clients)
            jobs = [sim.fed("aggregate_client", aggregation_flops(self.client_n, m), r)]
            if not self.shared_server:
                jobs.append(sim.serve("aggregate_server", aggregation_flops(self.server_n, m), None, r))
            yield from run_round(sim, jobs)
            st.client_global = self.t.aggregate(st.client_global, [results[c][0] for c in clients], weights,
                                                cfg.lr_global)
            self.t.check_params(st.client_global, "client model", round=r, party="fed server")
            if not self.shared_server:
                st.server_global = self.t.aggregate(st.server_global, [results[c][1] for c in clients], weights,
                                                    cfg.lr_global)
            self.t.check_params(st.server_global, "server model", round=r, party="split server")
            st.round += 1
            sim.end_round(r)

    def summary_extra(self) -> dict:
        """Totals over every local iteration, under the key ``mu_splitfed`` of summary.json (also for
        splitfed_zo and for SplitFed with ZO clients: the same exchange)."""
        if not self.table:
            return {}
        done = [r for r in self.state.records if r.end_s == r.end_s]  # this round's finished ones (end_s not NaN)
        fin = self.state.finished

        def total(name: str):
            return sum(fin.column(name, done))

        n = len(fin.cols["round"]) + len(done)
        taus = list(fin.column("tau_used", done))
        client_rounds = len(set(zip(fin.column("round", done), fin.column("client", done))))
        return {
            "mu_splitfed": {
                "tau": self.tau,
                "tau_max": self.tau_max if self.tau == "adaptive" else None,
                "client_optimizer": self.cfg.client_optimizer,
                "server_optimizer": self.cfg.server_optimizer,
                "client_rounds": client_rounds,
                "local_iterations": n,
                "mean_tau_used": (sum(taus) / n) if n else None,
                "min_tau_used": min(taus) if taus else None,
                "max_tau_used": max(taus) if taus else None,
                "server_local_steps": sum(taus),
                "server_steps_s": total("server_steps_s"),
                "server_loss_diff_s": total("server_loss_diff_s"),
                "server_queue_s": total("server_queue_s"),
                "server_idle_s": total("server_idle_s"),
                "client_wait_s": total("client_wait_s"),
                "mean_client_wait_s": (total("client_wait_s") / n) if n else None,
                "bytes_up": total("bytes_up"),
                "bytes_down": total("bytes_down"),
            }
        }


def _detach(h):
    """h without its graph (a timing-only run has no h)."""
    return h.detach() if h is not None else None


def build(ctx: RunContext) -> SplitRounds:
    """mu_splitfed (tau from its config) and splitfed_zo (tau 1)."""
    return SplitRounds(ctx, tau=getattr(ctx.cfg, "tau", 1), tau_max=getattr(ctx.cfg, "tau_max", 1))
