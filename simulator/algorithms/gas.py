"""GAS: generative activation-aided asynchronous split federated learning.

Jiarong Yang and Yuan Liu, "GAS: Generative Activation-Aided Asynchronous Split Federated
Learning", AAAI 2025 (arXiv 2409.01251), and its public code (github.com/eejiarong/GAS,
``GAS_main.py``). What follows is algorithms.md's "GAS" section, line by line:

- K clients, C of them active. Each active client loops E times (code: 20): minibatch ->
  forward -> send h and labels -> the Split Server at once computes dL/dh with its CURRENT model
  and the client's logit-adjusted loss CE(s + log p_k(y), y) -> client backward and step. Then
  the client uploads its model and is replaced by a client drawn uniformly from the inactive
  ones. There is no round barrier: every slot is its own SimPy process.
- Activation buffer: each arriving (h, y) is stored with a weight that grows with training
  progress. When Q_s minibatches are in it, the server (a) merges per-class Gaussian statistics
  of the flattened activations, (b) tops up every class with fewer than B real activations to
  B with samples from its Gaussian (once every class has statistics), (c) takes ONE SGD step
  with plain CE on real + generated activations, (d) clears the buffer.
- Model buffer: when Q_c client models have arrived, the global client model becomes their
  average; that is one global iteration (``sim.end_round``; the runner evaluates there).

Quirks of the public code, each an option; the default follows the paper where they disagree
(docs/gas.md has the table): ``client_momentum`` (code: all clients share ONE momentum buffer),
``weight_growth`` (code: the base weight of a new client grows by the cumulative number of server
updates at every global iteration, faster than the paper's s(n) = n), ``merge_ridge`` (code: 1e-5
I added at every merge), ``aggregation`` (code: equal weights; paper: data size),
``truncate_to_batch`` (code: classes with more than B real activations are cut to B when
generating; algorithms.md and the paper describe only the top-up).

Choices where the sources are silent: an activation's weight in ``paper`` mode is n = the
1-based index of the server update whose buffer it joins; the server's statistics merge and
generation run when the buffer fills (they depend on nothing the clock could change) and are
charged with the server step that uses them; with ``generate: false`` no statistics are kept
(the code computes them and never uses them); a client starting (or restarting) takes the
global client model as it is when its download starts, with fresh momentum in ``per_client``
mode. The engine is the only place that knows the clock; this module never prices anything.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from simulator import rng, zo
from simulator.algorithms.common import (
    ClientBatches,
    Params,
    RunContext,
    aggregate,
    aggregation_flops,
    batch_tensors,
    check_finite,
    check_params,
    clone,
    evaluate,
    forward,
    leaf,
    num_params,
    params_of,
    sgd_step,
)
from simulator.algorithms.configs import GASConfig  # noqa: F401
from simulator.errors import ScenarioError
from simulator.gaussian_stats import ClassGaussian, GaussianStats, top_up_counts
from simulator.latency import DOWNLINK, UPLINK

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Pure steps: tensors in, tensors out
# --------------------------------------------------------------------------------------------
def label_log_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log p_k(y) of a client's labels, as the code: log(frequency + 1e-12) (tau = 1)."""
    counts = torch.bincount(labels.reshape(-1).cpu(), minlength=num_classes).to(torch.float64)
    return torch.log(counts / counts.sum() + 1e-12).to(torch.float32)


def la_gradient(module, params: Params, h: torch.Tensor, y: torch.Tensor,
                log_prior: Optional[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """dL/dh of L = mean CE(server(h) + log_prior, y) at the given (unchanged) server params."""
    h = h.detach().requires_grad_(True)
    logits = forward(module, params, h)
    if log_prior is not None:
        logits = logits + log_prior.to(logits.device)
    loss = F.cross_entropy(logits, y)
    (dh,) = torch.autograd.grad(loss, h)
    return dh, float(loss.detach())


def la_loss(module, params: Params, h: torch.Tensor, y: torch.Tensor, log_prior: Optional[torch.Tensor]) -> float:
    """The client's logit-adjusted loss at h (no graph): used by ZO client steps."""
    with torch.no_grad():
        logits = forward(module, params, h)
        if log_prior is not None:
            logits = logits + log_prior.to(logits.device)
        return float(F.cross_entropy(logits, y))


def client_fo_step(params: Params, p_leaf: Params, h: torch.Tensor, dh: torch.Tensor, cfg, buffers: dict) -> None:
    """Backpropagate dL/dh through the client graph that made h; clipped SGD step in place."""
    grads = torch.autograd.grad(h, list(p_leaf.values()), grad_outputs=dh)
    sgd_step(params, dict(zip(p_leaf, grads)), cfg.lr_client, cfg.momentum, cfg.weight_decay, buffers,
             clip_norm=cfg.clip_norm)


def server_sgd_step(module, params: Params, h: torch.Tensor, y: torch.Tensor, cfg, buffers: dict) -> float:
    """ONE server step with plain CE on (h, y) (real + generated); returns the loss."""
    p = leaf(params)
    loss = F.cross_entropy(forward(module, p, h.detach()), y)
    grads = torch.autograd.grad(loss, list(p.values()))
    sgd_step(params, dict(zip(p, grads)), cfg.lr_server, cfg.momentum, cfg.weight_decay, buffers,
             clip_norm=cfg.clip_norm)
    return float(loss.detach())


@dataclass
class TopUp:
    """A server batch after the top-up: activations, labels and what was generated."""

    h: torch.Tensor
    y: torch.Tensor
    real: int
    generated: int
    factor_attempts: int = 0
    jitter_max: float = 0.0
    factorised: list = field(default_factory=list)


def top_up(h: torch.Tensor, y: torch.Tensor, stats: GaussianStats, batch_size: int, seed: int, step: int,
           truncate: bool = False) -> TopUp:
    """Fill every class below ``batch_size`` real activations with draws from its Gaussian.

    Classes at or above B keep all their real activations (``truncate``: the code's first B of
    them). Real activations come first, in buffer order; then, class by class, the generated
    ones, drawn with the keyed generator (seed, "algo", "gas_generate", step, class). Needs
    statistics for every class that gets samples.
    """
    shape = h.shape[1:]
    keep, needs = top_up_plan(y, stats.num_classes, batch_size, truncate)
    parts_h, parts_y = [h[keep]], [y[keep]]
    out = TopUp(h, y, int(keep.sum()), 0)
    for c, need in enumerate(needs):
        if need == 0:
            continue
        g = rng.torch_generator(seed, "algo", "gas_generate", step, c)
        sampled, report = stats.sample(c, need, g)
        if report is not None:
            out.factor_attempts += report.attempts
            out.jitter_max = max(out.jitter_max, report.jitter)
            out.factorised.append(c)
        parts_h.append(sampled.to(h.dtype).reshape(need, *shape).to(h.device))
        parts_y.append(torch.full((need,), c, dtype=y.dtype, device=y.device))
        out.generated += need
    out.h, out.y = torch.cat(parts_h), torch.cat(parts_y)
    return out


def top_up_plan(y: torch.Tensor, num_classes: int, batch_size: int, truncate: bool) -> tuple[torch.Tensor, list[int]]:
    """Which real activations a top-up keeps (a mask) and how many it draws per class: labels only."""
    counts = torch.bincount(y.cpu(), minlength=num_classes).tolist()
    keep = torch.ones(len(y), dtype=torch.bool)
    if truncate:
        for c, n in enumerate(counts):
            if n > batch_size:
                idx = torch.nonzero(y.cpu() == c).flatten()
                keep[idx[batch_size:]] = False
    return keep.to(y.device), top_up_counts(counts, batch_size)


def _module_function(name: str):
    """A steps method that calls this module's function ``name`` as it is when called (so a test
    that patches the module's function patches the training run's step too)."""
    def call(self, *args, **kwargs):
        return globals()[name](*args, **kwargs)

    call.__name__ = name
    return call


# --------------------------------------------------------------------------------------------
# The tensor work, as one replaceable object (timing-only runs swap it)
# --------------------------------------------------------------------------------------------
class GASSteps:
    """Every tensor operation the GAS processes run, behind one object (a training run).

    ``NoGASSteps`` replaces it in a timing-only run: the same processes, no tensors.
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    clone = _module_function("clone")
    la_gradient = _module_function("la_gradient")
    client_fo_step = _module_function("client_fo_step")
    server_sgd_step = _module_function("server_sgd_step")
    top_up = _module_function("top_up")
    aggregate = _module_function("aggregate")
    check_finite = _module_function("check_finite")
    check_params = _module_function("check_params")

    def batch(self, idx):
        return batch_tensors(self.ctx.data, idx, self.ctx.device)

    @staticmethod
    def graph_forward(module, params: Params, x):
        p = leaf(params)
        return p, forward(module, p, x)

    @staticmethod
    @torch.no_grad()
    def activation(module, params: Params, x):
        return forward(module, params, x)

    @staticmethod
    def cat(tensors: list):
        return torch.cat(tensors)

    @staticmethod
    def stats_update(stats: GaussianStats, h, y, w) -> list[int]:
        return stats.update(h.reshape(len(y), -1), y, w.to(h.device))

    @staticmethod
    def zo_probes(params: Params, loss_fn, lam: float, seeds: list[int], direction: str) -> list[float]:
        tensors = list(params.values())
        return [zo.zo_probe(tensors, loss_fn, lam, s, direction) for s in seeds]

    @staticmethod
    def zo_update(params: Params, seeds: list[int], coefficients: list[float], lr: float, direction: str) -> None:
        zo.zo_update_(list(params.values()), seeds, coefficients, lr, direction)

    def evaluate(self, client_params: Params, server_params: Params, x, y, batch_size: int):
        return evaluate(self.ctx.parts, client_params, server_params, x, y, batch_size, self.ctx.device)

    @staticmethod
    def row(table: str, row: dict) -> dict:
        return row


class NoGASSteps(GASSteps):
    """``GASSteps`` with no tensor work (a timing-only run, ``ctx.timing``).

    Minibatches are their labels; the statistics keep only which classes have statistics and
    whose factor is stale, so the top-up draws the same counts and prices the same
    factorisations. One value-dependence is left out: a factorisation that needs jitter
    retries is priced per attempt in training; here each succeeds at its first attempt.
    """

    def batch(self, idx):
        return None, self.ctx.data.y_train[torch.as_tensor(idx, dtype=torch.long)]

    @staticmethod
    def clone(params):
        return params

    @staticmethod
    def graph_forward(module, params, x):
        return None, None

    @staticmethod
    def activation(module, params, x):
        return None

    @staticmethod
    def la_gradient(module, params, h, y, log_prior):
        return None, float("nan")

    @staticmethod
    def client_fo_step(params, p_leaf, h, dh, cfg, buffers):
        return None

    @staticmethod
    def server_sgd_step(module, params, h, y, cfg, buffers):
        return float("nan")

    @staticmethod
    def cat(tensors):
        return None

    @staticmethod
    def stats_update(stats: GaussianStats, h, y, w) -> list[int]:
        """Mark the classes of ``y`` as having statistics, their factors stale (as ``stats.update``)."""
        updated = sorted(int(v) for v in torch.unique(y))
        for c in updated:
            g = stats.classes.get(c)
            if g is None:
                stats.classes[c] = ClassGaussian(None, None, 0.0)
            else:
                g.merges += 1
                g.factor = None
        return updated

    def top_up(self, h, y, stats: GaussianStats, batch_size, seed, step, truncate=False) -> TopUp:
        """The top-up's labels and counts, and the factorisations it would need: one attempt each,
        unless ``ctx.timing`` knows the run's count (a resume's replay); the jitter is unknown (NaN)."""
        keep, needs = top_up_plan(y, stats.num_classes, batch_size, truncate)
        parts_y = [y[keep]]
        out = TopUp(None, y, int(keep.sum()), 0)
        for c, need in enumerate(needs):
            if need == 0:
                continue
            if stats.needs_factor(c):
                stats.factorisations += 1
                stats.classes[c].factor = True  # fresh until the class's next merge
                out.factor_attempts += 1
                out.factorised.append(c)
            parts_y.append(torch.full((need,), c, dtype=y.dtype, device=y.device))
            out.generated += need
        out.y = torch.cat(parts_y)
        if out.factorised:
            out.jitter_max = float("nan")
            known = getattr(self.ctx.timing, "factor_attempts", None)
            attempts = known(step) if known is not None else None
            if attempts is not None:
                out.factor_attempts = attempts
        return out

    @staticmethod
    def zo_probes(params, loss_fn, lam, seeds, direction):
        return [float("nan")] * len(seeds)

    @staticmethod
    def zo_update(params, seeds, coefficients, lr, direction):
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


def _detach(h):
    return h.detach() if h is not None else None


# --------------------------------------------------------------------------------------------
# State (data) and the SimPy processes
# --------------------------------------------------------------------------------------------
@dataclass
class ServerJob:
    """A full activation buffer, prepared (statistics merged, top-up drawn) and waiting to run."""

    step: int
    trigger_s: float
    h: torch.Tensor
    y: torch.Tensor
    real: int
    generated: int
    stats_flops: float
    classes_updated: int
    factorisations: int
    factor_attempts: int
    jitter_max: float
    weight_min: float
    weight_max: float
    clients: str
    stats_classes: int


@dataclass
class Slot:
    """Slot j: its client, the client model it trains, and the local iteration in flight.

    The slot's process keeps no tensor in local variables across a yield: what is in flight is
    here, so a checkpoint can take it and a resume put it back (``GAS.load_checkpoint_state``).
    ``phase`` says what is in flight: ``idle`` (between iterations), ``batch`` (a minibatch
    drawn), ``forward`` (h computed), ``gradient`` (a first-order client: dL/dh back; a ZO
    client: the loss differences back).
    """

    client: int
    params: Optional[Params] = None  # the client model being trained (a copy of the global one)
    buffers: dict = field(default_factory=dict)  # its momentum (client_momentum: per_client)
    phase: str = "idle"
    idx: Optional[torch.Tensor] = None  # the minibatch in flight (sample indices)
    x: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    p: Optional[Params] = None  # first-order: the leaf views h was computed from (its graph)
    h: Optional[torch.Tensor] = None
    dh: Optional[torch.Tensor] = None  # first-order: dL/dh from the server
    diffs: Optional[list] = None  # zeroth-order: the P loss differences from the server

    def settle(self) -> None:
        """The local iteration is over: nothing in flight."""
        self.phase, self.idx, self.x, self.y, self.p, self.h, self.dh, self.diffs = ("idle",) + (None,) * 7


@dataclass
class GASState:
    """Everything GAS carries through time: plain data (the models, buffers and counters).

    ``active`` lists the client of each slot; ``slots`` what each slot has in flight;
    ``jobs`` the server updates prepared and not yet run, by step.
    """

    client_global: Params
    server: Params
    batches: ClientBatches
    stats: GaussianStats
    server_buffers: dict = field(default_factory=dict)
    shared_client_buffers: dict = field(default_factory=dict)
    act_buffer: list = field(default_factory=list)  # (h, y, weight, client), in arrival order
    model_buffer: list = field(default_factory=list)  # (client, params, iteration the client started from)
    iteration: int = 0  # global iterations done
    updates_triggered: int = 0  # server updates whose buffer has filled
    updates_done: int = 0
    client_iterations: int = 0
    replacements: int = 0
    real_total: int = 0
    generated_total: int = 0
    total_weight: float = 1.0  # the code's total_weight_count (weight_growth: code)
    active: list = field(default_factory=list)
    server_losses: list = field(default_factory=list)
    slots: list = field(default_factory=list)  # Slot per active slot
    jobs: dict = field(default_factory=dict)  # step -> ServerJob prepared, not yet run
    factor_attempts: dict = field(default_factory=dict)  # step -> attempts, where a factorisation retried


class GAS:
    """GAS as SimPy processes: one per active slot, one per server update, no rounds."""

    def __init__(self, ctx: RunContext):
        self.ctx, self.cfg = ctx, ctx.cfg
        cfg, parts, prof = ctx.cfg, ctx.parts, ctx.profile
        k = ctx.num_clients
        if cfg.active_clients > k:
            raise ScenarioError("algorithm.active_clients",
                                f"{cfg.active_clients} active clients but data.num_clients is {k}")
        if hasattr(parts, "aux"):
            raise ScenarioError("algorithm.name", "gas needs a model whose server part takes only h "
                                "(generated activations carry no auxiliary inputs)")
        self.q_s = cfg.activation_buffer or cfg.active_clients
        self.q_c = cfg.model_buffer or cfg.active_clients
        self.num_classes = int(ctx.data.num_classes)
        y_train = ctx.data.y_train
        self.log_priors = [
            label_log_prior(y_train[torch.as_tensor(p, dtype=torch.long)], self.num_classes).to(ctx.device)
            if cfg.logit_adjustment else None
            for p in ctx.partitions
        ]
        self.sizes = [len(p) for p in ctx.partitions]
        self.act_shape = tuple(prof.activation_shape[1:])
        self.dim = int(math.prod(self.act_shape))
        dtype = torch.float64 if cfg.stats_dtype == "float64" else torch.float32
        if cfg.generate and cfg.covariance == "full":
            gib = 2 * self.num_classes * self.dim**2 * dtype.itemsize / 2**30  # covariances + factors
            if gib > 2:
                log.warning("gas: full covariances of %d features for %d classes need about %.1f GiB; "
                            "consider algorithm.covariance=diagonal", self.dim, self.num_classes, gib)
        self.state = GASState(
            client_global=params_of(parts.client), server=params_of(parts.server),
            batches=ClientBatches(ctx.partitions, cfg.batch_size, ctx.seed),
            stats=GaussianStats(self.num_classes, self.dim, cfg.covariance, dtype, cfg.merge_ridge),
        )
        self.client_n = num_params(self.state.client_global)
        self.t = NoGASSteps(ctx) if ctx.timing is not None else GASSteps(ctx)  # the tensor work

    # ---- evaluation (free) ------------------------------------------------------------------
    def evaluate(self, x, y, batch_size):
        return self.t.evaluate(self.state.client_global, self.state.server, x, y, batch_size)

    # ---- checkpoint and resume (simulator.checkpoint) -----------------------------------------
    def set_timing(self, timing) -> None:
        """Swap the tensor work: no-op steps answering from ``timing``, or (None) training steps."""
        self.ctx.timing = timing
        self.t = NoGASSteps(self.ctx) if timing is not None else GASSteps(self.ctx)

    def checkpoint_state(self) -> dict:
        """The state at the end of a global iteration, as plain data: the global models, every
        slot's client model and iteration in flight, both buffers, the prepared server updates,
        the statistics and the counters. (A first-order slot's h is recomputed on resume: its
        graph cannot be saved, and its client model has not changed since the forward.)"""
        st = self.state

        def tensors(d):
            return {k: v for k, v in d.items()} if d is not None else None

        return {
            "iteration": st.iteration,
            "cursor": {int(k): int(v) for k, v in st.batches.cursor.items()},
            "client_global": tensors(st.client_global),
            "server": tensors(st.server),
            "server_buffers": tensors(st.server_buffers),
            "shared_client_buffers": tensors(st.shared_client_buffers),
            "act_buffer": [(_detach(h), y) for h, y, _, _ in st.act_buffer],
            "model_buffer": [tensors(p) for _, p, _ in st.model_buffer],
            "slots": [{"client": sl.client, "phase": sl.phase, "params": tensors(sl.params),
                       "buffers": tensors(sl.buffers), "idx": sl.idx, "h": _detach(sl.h), "dh": sl.dh,
                       "diffs": sl.diffs} for sl in st.slots],
            "jobs": {int(k): {"h": j.h, "y": j.y, "jitter_max": j.jitter_max} for k, j in st.jobs.items()},
            "factor_attempts": {int(k): int(v) for k, v in st.factor_attempts.items()},
            "stats": {"factorisations": st.stats.factorisations, "failed_factorisations": st.stats.failed_factorisations,
                      "classes": {int(c): dict(vars(g)) for c, g in st.stats.classes.items()}},
            "server_losses": list(st.server_losses),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        """Put a ``checkpoint_state`` back into the running processes' state (in place)."""
        st, dev, parts = self.state, self.ctx.device, self.ctx.parts
        if int(state["iteration"]) != st.iteration or state["cursor"] != st.batches.cursor or \
                [s["client"] for s in state["slots"]] != [sl.client for sl in st.slots] or \
                [s["phase"] for s in state["slots"]] != [sl.phase for sl in st.slots] or \
                sorted(state["jobs"]) != sorted(st.jobs):
            raise RuntimeError(f"resuming: the replay's GAS state at global iteration {st.iteration} is not the "
                               f"checkpoint's (iteration {state['iteration']}): the timelines differ")

        def on(d):
            return {k: v.to(dev) for k, v in d.items()} if d is not None else None

        st.client_global, st.server = on(state["client_global"]), on(state["server"])
        for name in ("server_buffers", "shared_client_buffers"):
            buf = getattr(st, name)
            buf.clear()
            buf.update(on(state[name]))
        st.act_buffer = [(h.to(dev), y.to(dev), w, c)
                         for (h, y), (_, _, w, c) in zip(state["act_buffer"], st.act_buffer, strict=True)]
        st.model_buffer = [(c, on(p), s) for p, (c, _, s) in zip(state["model_buffer"], st.model_buffer, strict=True)]
        steps = GASSteps(self.ctx)
        for sl, saved in zip(st.slots, state["slots"]):
            sl.params, sl.buffers = on(saved["params"]), on(saved["buffers"])
            if sl.phase == "idle":
                continue
            sl.x, sl.y = steps.batch(saved["idx"].numpy())
            if self.cfg.client_optimizer == "zo":
                sl.h = saved["h"].to(dev) if saved["h"] is not None else None
            elif sl.phase in ("forward", "gradient"):
                sl.p, sl.h = steps.graph_forward(parts.client, sl.params, sl.x)  # its graph, as it was
            sl.dh = saved["dh"].to(dev) if saved["dh"] is not None else None
            sl.diffs = saved["diffs"]
        for k, job in st.jobs.items():
            saved = state["jobs"][k]
            job.h, job.y, job.jitter_max = saved["h"].to(dev), saved["y"].to(dev), saved["jitter_max"]
        st.factor_attempts = dict(state["factor_attempts"])
        saved = state["stats"]
        st.stats.factorisations = saved["factorisations"]
        st.stats.failed_factorisations = saved["failed_factorisations"]
        st.stats.classes = {c: ClassGaussian(**{k: (v.to(dev) if isinstance(v, torch.Tensor) else v)
                                                for k, v in g.items()}) for c, g in saved["classes"].items()}
        st.server_losses = list(state["server_losses"])

    # ---- the run ------------------------------------------------------------------------------
    def process(self):
        """Draw the first C clients and start one process per slot, in sorted order."""
        ctx, sim, cfg = self.ctx, self.ctx.sim, self.cfg
        first = rng.generator(ctx.seed, "algo", "gas_initial").choice(ctx.num_clients, cfg.active_clients, replace=False)
        self.state.active = sorted(int(c) for c in first)
        self.state.slots = [Slot(c) for c in self.state.active]
        for j in range(len(self.state.slots)):
            sim.env.process(self.client_slot(j))
        yield sim.stopped

    def client_slot(self, j: int):
        """Slot j: its client runs E local iterations, uploads, and is replaced; forever."""
        sim, cfg = self.ctx.sim, self.cfg
        prof = self.ctx.profile
        slot = self.state.slots[j]
        weight = 1.0  # the code's per-client counter; the first clients start at 1
        while not sim.stopping:
            client = slot.client
            start_it = self.state.iteration
            slot.params = self.t.clone(self.state.client_global)  # what the server sends when the download starts
            slot.buffers = {}  # fresh momentum (per_client; shared: state.shared_client_buffers)
            # Fed Server -> client: the global client model.
            yield from sim.send(client, DOWNLINK, "model_down", prof.client_param_bytes, start_it)
            for _ in range(cfg.steps_for(self.state.batches.batches_per_epoch(client))):
                if sim.stopping:
                    return
                if cfg.client_optimizer == "zo":
                    yield from self.zo_iteration(slot, weight)
                else:
                    yield from self.fo_iteration(slot, weight)
                weight += 1.0
                self.state.client_iterations += 1
            # Client -> Fed Server: the updated client model, into the model buffer.
            yield from sim.send(client, UPLINK, "model_up", prof.client_param_bytes, self.state.iteration)
            self.state.model_buffer.append((client, slot.params, start_it))
            slot.params = None
            if len(self.state.model_buffer) >= self.q_c:
                yield from self.aggregate()
            if sim.stopping:
                return
            slot.client = self.replace(j, client)
            weight = self.state.total_weight

    def _client_buffers(self, slot: Slot) -> dict:
        return self.state.shared_client_buffers if self.cfg.client_momentum == "shared" else slot.buffers

    # ---- one local iteration, first-order (GAS) -----------------------------------------------
    def _draw_batch(self, slot: Slot) -> float:
        """Slot's next minibatch into the slot; returns the scale of its priced FLOPs."""
        idx = self.state.batches.next(slot.client)
        slot.idx = torch.as_tensor(idx, dtype=torch.long)
        slot.x, slot.y = self.t.batch(idx)
        slot.phase = "batch"
        return len(idx) / self.cfg.batch_size

    def fo_iteration(self, slot: Slot, weight: float):
        """Forward, h up, dL/dh down at once, client backward and step (tensors in the slot)."""
        ctx, sim, cfg, prof = self.ctx, self.ctx.sim, self.cfg, self.ctx.profile
        client = slot.client
        scale = self._draw_batch(slot)
        it = self.state.iteration
        yield from sim.compute(client, "client_forward", prof.client_forward_flops * scale, it)
        slot.p, slot.h = self.t.graph_forward(ctx.parts.client, slot.params, slot.x)
        slot.phase = "forward"
        # Client -> Split Server: h and labels.
        yield from sim.send(client, UPLINK, "activation", int((prof.activation_bytes + prof.label_bytes) * scale), it)
        # The server computes dL/dh at once with its CURRENT model (it competes with updates).
        yield from sim.serve("server_gradient",
                             (prof.server_forward_flops + prof.server_backward_flops) * scale, client, it)
        slot.dh, loss = self.t.la_gradient(ctx.parts.server, self.state.server, _detach(slot.h), slot.y,
                                           self.log_priors[client])
        slot.phase = "gradient"
        self.t.check_finite(loss, "client training loss", round=it, local_step=self.state.client_iterations, party="server",
                     client=client)
        self.store(_detach(slot.h), slot.y, weight, client)
        # Split Server -> client: dL/dh; client backward and step.
        yield from sim.send(client, DOWNLINK, "gradient", int(prof.activation_bytes * scale), it)
        yield from sim.compute(client, "client_backward", prof.client_backward_flops * scale, it)
        self.t.client_fo_step(slot.params, slot.p, slot.h, slot.dh, cfg, self._client_buffers(slot))
        slot.settle()

    # ---- one local iteration, zeroth-order (MU-SplitFed's GAS variant) ------------------------
    def zo_iteration(self, slot: Slot, weight: float):
        """h, then P pairs h(x +- lam u) on the same batch; the server returns P loss differences.

        The server evaluates the client's logit-adjusted loss at the perturbed activations with
        its current model; the client steps x -= lr * (1/P) sum_p (f+ - f-)/(2 lam) u_p. Plain
        ZO-SGD (no momentum, weight decay or clipping on the client), as MU-SplitFed runs it.
        """
        ctx, sim, cfg, prof = self.ctx, self.ctx.sim, self.cfg, self.ctx.profile
        client = slot.client
        scale = self._draw_batch(slot)
        it = self.state.iteration
        n_p, lam, direction = cfg.zo.perturbations, cfg.zo.lam, cfg.zo.direction
        n, ew = self.client_n, ctx.scenario.time.zo_elementwise_flops_per_element
        k = self.state.client_iterations
        yield from sim.compute(client, "client_forward", prof.client_forward_flops * scale, it)
        slot.h = self.t.activation(ctx.parts.client, slot.params, slot.x)
        slot.phase = "forward"
        # P probes of 3 in-place passes each (+lam, -2 lam, +lam), plus the sphere's norm pass per seed.
        w = zo.pass_work(n, 3 * n_p, n_p if direction == "sphere" else 0)
        yield from sim.compute(client, "client_zo_probe", 2 * n_p * prof.client_forward_flops * scale + w.flops(ew), it,
                               rng_elements=w.rng)
        yield from sim.send(client, UPLINK, "activation",
                            int(((1 + 2 * n_p) * prof.activation_bytes + prof.label_bytes) * scale), it)
        # The server evaluates the loss at the 2P perturbed activations with its current model.
        yield from sim.serve("server_zo_eval", 2 * n_p * prof.server_forward_flops * scale, client, it)
        self.store(slot.h, slot.y, weight, client)
        server, prior, parts = self.state.server, self.log_priors[client], ctx.parts
        params, x, y = slot.params, slot.x, slot.y  # no yield until the probes are done

        def loss_fn() -> float:  # the split forward: client part on x, server loss on its output
            return la_loss(parts.server, server, forward(parts.client, params, x), y, prior)

        seeds = [zo.zo_seed(ctx.seed, "gas", client, k, p) for p in range(n_p)]
        slot.diffs = self.t.zo_probes(params, loss_fn, lam, seeds, direction)
        slot.phase = "gradient"
        for d in slot.diffs:
            self.t.check_finite(d, "loss difference", round=it, local_step=k, party="server", client=client)
        # Split Server -> client: P scalars (fp32); the client regenerates u_p and steps.
        yield from sim.send(client, DOWNLINK, "zo_scalars", 4 * n_p, it)
        w = zo.pass_work(n, n_p)
        yield from sim.compute(client, "client_zo_update", w.flops(ew), it, rng_elements=w.rng)
        self.t.zo_update(slot.params, seeds, [d / (2 * lam) for d in slot.diffs], cfg.lr_client, direction)
        slot.settle()

    # ---- the activation buffer -----------------------------------------------------------------
    def activation_weight(self, weight: float) -> float:
        """paper: s(n) = n, n = 1-based index of the server update this buffer feeds."""
        return float(self.state.updates_triggered + 1) if self.cfg.weight_growth == "paper" else float(weight)

    def store(self, h: torch.Tensor, y: torch.Tensor, weight: float, client: int) -> None:
        """Put (h, y, weight) in the buffer; a full buffer is prepared and its update started."""
        self.state.act_buffer.append((h, y, self.activation_weight(weight), client))
        if len(self.state.act_buffer) >= self.q_s:
            entries, self.state.act_buffer = self.state.act_buffer, []
            job = self.prepare(entries)
            self.state.jobs[job.step] = job
            self.ctx.sim.env.process(self.server_update(job))

    def prepare(self, entries: list) -> ServerJob:
        """(a) merge statistics, (b) top up classes below B: real work, priced in the job."""
        cfg = self.cfg
        self.state.updates_triggered += 1
        step = self.state.updates_triggered
        h = self.t.cat([e[0] for e in entries])
        y = torch.cat([e[1] for e in entries])
        w = torch.cat([torch.full((len(e[1]),), e[2], dtype=torch.float64) for e in entries])
        flops, updated, generated = 0.0, [], None
        if cfg.generate:
            counts = torch.bincount(y.cpu(), minlength=self.num_classes).tolist()
            updated = self.t.stats_update(self.state.stats, h, y, w)
            flops += sum(self.state.stats.update_flops(counts[c]) for c in updated)
            if self.state.stats.all_ready():
                generated = self.t.top_up(h, y, self.state.stats, cfg.batch_size, self.ctx.seed, step, cfg.truncate_to_batch)
                if generated.factor_attempts != len(generated.factorised):  # retries: a replay must know them
                    self.state.factor_attempts[step] = generated.factor_attempts
                flops += generated.factor_attempts * self.state.stats.factor_flops()
                flops += self.state.stats.sample_flops(generated.generated)
        if generated is None:
            generated = TopUp(h, y, len(y), 0)
        self.state.real_total += generated.real
        self.state.generated_total += generated.generated
        return ServerJob(
            step=step, trigger_s=float(self.ctx.sim.now), h=generated.h, y=generated.y,
            real=generated.real, generated=generated.generated, stats_flops=flops,
            classes_updated=len(updated), factorisations=len(generated.factorised),
            factor_attempts=generated.factor_attempts, jitter_max=generated.jitter_max,
            weight_min=float(w.min()), weight_max=float(w.max()),
            clients=" ".join(str(e[3]) for e in entries), stats_classes=len(self.state.stats.classes),
        )

    def server_update(self, job: ServerJob):
        """(c) ONE server SGD step on real + generated, queued for the server like any job."""
        sim, cfg, prof = self.ctx.sim, self.cfg, self.ctx.profile
        n = len(job.y)
        # server_sgd_step differentiates w.r.t. the server parameters only (h detached): no dL/dh.
        sgd_flops = (prof.server_forward_flops + prof.server_backward_params_flops) * n / cfg.batch_size
        start = sim.now
        yield from sim.serve("server_update", job.stats_flops + sgd_flops, None, self.state.iteration)
        loss = self.t.server_sgd_step(self.ctx.parts.server, self.state.server, job.h, job.y, cfg,
                                      self.state.server_buffers)
        self.t.check_finite(loss, "server training loss", round=self.state.iteration, local_step=None, party="server")
        self.state.updates_done += 1
        self.state.server_losses.append(loss)
        del self.state.jobs[job.step]
        sim.recorder.table("gas_server_steps", self.t.row("gas_server_steps", {
            "step": job.step, "trigger_s": job.trigger_s, "start_s": start, "end_s": float(sim.now),
            "iteration": self.state.iteration, "clients": job.clients, "real": job.real,
            "generated": job.generated, "stats_classes": job.stats_classes, "classes_updated": job.classes_updated,
            "factorisations": job.factorisations, "factor_attempts": job.factor_attempts,
            "jitter_max": job.jitter_max, "weight_min": job.weight_min, "weight_max": job.weight_max,
            "stats_flops": job.stats_flops, "loss": loss,
        }))

    # ---- the model buffer and replacement --------------------------------------------------------
    def aggregate(self):
        """Q_c models are in: the global client model becomes their average (one global iteration)."""
        sim, cfg = self.ctx.sim, self.cfg
        entries, self.state.model_buffer = self.state.model_buffer[: self.q_c], self.state.model_buffer[self.q_c:]
        it = self.state.iteration
        yield from sim.fed("aggregate_client", aggregation_flops(self.client_n, len(entries)), it)
        if cfg.aggregation == "data_size":
            weights = [float(self.sizes[c]) for c, _, _ in entries]
        else:
            weights = [1.0] * len(entries)
        self.state.client_global = self.t.aggregate(self.state.client_global, [p for _, p, _ in entries], weights,
                                                    cfg.lr_global)
        self.t.check_params(self.state.client_global, "client model", round=it, party="fed server")
        if cfg.weight_growth == "code":
            self.state.total_weight += self.state.updates_triggered  # code: total_weight_count += local_epoch
        self.state.iteration += 1
        staleness = [it - s for _, _, s in entries]
        sim.recorder.table("gas_iterations", {
            "iteration": it, "sim_time_s": float(sim.now), "clients": " ".join(str(c) for c, _, _ in entries),
            "mean_staleness": sum(staleness) / len(staleness), "max_staleness": max(staleness),
            "server_updates_done": self.state.updates_done, "server_updates_triggered": self.state.updates_triggered,
            "client_iterations": self.state.client_iterations, "real_total": self.state.real_total,
            "generated_total": self.state.generated_total, "replacements": self.state.replacements,
        })
        sim.end_round(it)

    def replace(self, j: int, client: int) -> int:
        """A client drawn uniformly from the inactive ones takes slot j (the same one if none)."""
        active = set(self.state.active)  # a set: the list's membership test cost O(C) per client
        inactive = [c for c in range(self.ctx.num_clients) if c not in active]
        if inactive:
            g = rng.generator(self.ctx.seed, "algo", "gas_replace", self.state.replacements)
            client = inactive[int(g.integers(len(inactive)))]
        self.state.replacements += 1
        self.state.active[j] = client
        return client

    # ---- the run's summary ---------------------------------------------------------------------
    def summary_extra(self) -> dict:
        s = self.state.stats
        return {"gas": {
            "global_iterations": self.state.iteration,
            "server_updates_done": self.state.updates_done,
            "server_updates_triggered": self.state.updates_triggered,
            "client_iterations": self.state.client_iterations,
            "replacements": self.state.replacements,
            "real_activations": self.state.real_total,
            "generated_activations": self.state.generated_total,
            "factorisations": s.factorisations,
            "failed_factorisations": s.failed_factorisations,
            "classes_with_statistics": len(s.classes),
            "activation_dim": self.dim,
            "activation_buffer": self.q_s,
            "model_buffer": self.q_c,
            "last_server_loss": self.state.server_losses[-1] if self.state.server_losses else None,
        }}


def build(ctx: RunContext) -> GAS:
    return GAS(ctx)
