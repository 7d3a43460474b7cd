"""What the algorithms share: run context, parameter dicts, minibatches, SGD, averaging, eval.

Model state is data: a model part is a dict name -> tensor used with
``torch.func.functional_call`` on one module skeleton, so per-client copies are dicts, not
deep-copied modules, and can be saved with ``torch.save``. Nothing here touches the clock.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from simulator import rng
from simulator.errors import Diverged
# The shared configs live in the torch-free configs module; re-exported under their old names.
from simulator.algorithms.configs import RENAMED, RoundConfig, TrainConfig, ZOConfig, refuse  # noqa: F401

if TYPE_CHECKING:  # types only: common.py must not import the runner's world at run time
    from models.profile import CutProfile
    from simulator.engine import Simulation
    from simulator.scenario import Scenario
    from simulator.timing import TimingOnly

Params = dict[str, torch.Tensor]


@dataclass
class RunContext:
    """Everything an algorithm is built from (the runner fills it in)."""

    scenario: "Scenario"
    cfg: TrainConfig  # the algorithm's own config object (a TrainConfig subclass)
    data: Any  # an image or text dataset: x_train, y_train, x_test, y_test, num_classes
    parts: Any  # models.split.SplitModel (text models add ``aux(x)``): .client, .server modules
    profile: "CutProfile"  # measured at the algorithm's batch size
    partitions: list[np.ndarray]  # index arrays, one per client
    sim: "Simulation"
    device: torch.device
    seed: int
    timing: Optional["TimingOnly"] = None  # set: a timing-only run (simulator.timing; docs/timing-only.md)

    @property
    def num_clients(self) -> int:
        return len(self.partitions)


# --------------------------------------------------------------------------------------------
# Parameter dicts
# --------------------------------------------------------------------------------------------
def params_of(module: torch.nn.Module) -> Params:
    """A detached copy of a module's parameters (the initial global model)."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def clone(params: Params) -> Params:
    return {k: v.clone() for k, v in params.items()}


def num_params(params: Params) -> int:
    return sum(v.numel() for v in params.values())


def param_bytes(params: Params) -> int:
    return sum(v.numel() * v.element_size() for v in params.values())


def forward(module: torch.nn.Module, params: Params, *args) -> torch.Tensor:
    """Run a module skeleton with the given parameters."""
    return functional_call(module, params, args)


def aux_of(parts, x: torch.Tensor):
    """The server's side input for a batch (a text model's attention mask), or None."""
    return parts.aux(x) if hasattr(parts, "aux") else None


def server_logits(module: torch.nn.Module, params: Params, h: torch.Tensor, aux=None) -> torch.Tensor:
    """The server part's output on h (with its side input where the model has one)."""
    return forward(module, params, h) if aux is None else forward(module, params, h, aux)


def leaf(params: Params) -> Params:
    """Views of ``params`` that require grad (same storage: later in-place updates land)."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


@torch.no_grad()
def sgd_step(
    params: Params,
    grads: dict,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    buffers: Optional[dict] = None,
    clip_norm: Optional[float] = None,
) -> None:
    """torch.optim.SGD's update (dampening 0, no Nesterov), in place on ``params``."""
    if clip_norm is not None:
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        if total > clip_norm:
            scale = clip_norm / (total + 1e-6)
            grads = {k: g * scale for k, g in grads.items()}
    for k, p in params.items():
        g = grads[k]
        if weight_decay:
            g = g.add(p, alpha=weight_decay)
        if momentum:
            buf = buffers.get(k) if buffers is not None else None
            if buf is None:
                buf = g.clone()
            else:
                buf.mul_(momentum).add_(g)
            if buffers is not None:
                buffers[k] = buf
            g = buf
        p.add_(g, alpha=-lr)


@torch.no_grad()
def aggregate(global_params: Params, local: list[Params], weights: list[float], eta_g: float = 1.0) -> Params:
    """x + eta_g * sum_m w_m (x_m - x), weights normalised to sum 1 (eta_g = 1: plain average)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out = {}
    for k, x in global_params.items():
        delta = torch.zeros_like(x)
        for wm, xm in zip(w, local):
            delta.add_(xm[k] - x, alpha=float(wm))
        out[k] = x + eta_g * delta
    return out


def aggregation_flops(n_params: int, n_models: int) -> int:
    """FLOPs of the weighted average: a multiply-add per parameter per model, plus the step."""
    return 2 * n_params * (n_models + 1)


def aggregation_weights(kind: str, clients: list[int], partitions: list) -> list[float]:
    if kind == "data_size":
        return [float(len(partitions[c])) for c in clients]
    return [1.0] * len(clients)


# --------------------------------------------------------------------------------------------
# Divergence: a NaN or inf stops the run at once (simulator.errors.Diverged)
# --------------------------------------------------------------------------------------------
def check_finite(value: float, what: str, *, round: int, local_step: Optional[int], party: str,
                 client: Optional[int] = None) -> None:
    """Raise ``Diverged`` if a loss (or loss difference) is NaN or inf."""
    if not math.isfinite(value):
        raise Diverged(f"{what} ({value})", round=round, local_step=local_step, party=party, client=client)


@torch.no_grad()
def check_params(params: Params, what: str, *, round: int, party: str, client: Optional[int] = None) -> None:
    """Raise ``Diverged`` if any parameter of a model part is NaN or inf (one pass per tensor)."""
    for k, v in params.items():
        if not bool(torch.isfinite(v).all()):
            raise Diverged(f"{what} parameter {k}", round=round, local_step=None, party=party, client=client)


# --------------------------------------------------------------------------------------------
# The round barrier
# --------------------------------------------------------------------------------------------
def run_round(sim, jobs: list):
    """Start every job (a SimPy generator) as a process, in the given order, and wait for all.

    The one barrier round-based algorithms use (``yield from run_round(sim, jobs)``): processes
    start in list order, so equal-time ties break the same way every run.
    """
    procs = [sim.env.process(job) for job in jobs]
    yield sim.env.all_of(procs)


# --------------------------------------------------------------------------------------------
# Clients and minibatches
# --------------------------------------------------------------------------------------------
def select_clients(seed: int, round: int, num_clients: int, fraction: float) -> list[int]:
    """Clients of a round: round(fraction*K) (at least 1) drawn without replacement, sorted."""
    m = max(1, int(round_half_up(fraction * num_clients)))
    if m >= num_clients:
        return list(range(num_clients))
    chosen = rng.generator(seed, "algo", "select", round).choice(num_clients, m, replace=False)
    return sorted(int(c) for c in chosen)


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass
class ClientBatches:
    """Minibatch k of client c is a pure function of (seed, c, k).

    Each local epoch is a keyed permutation (seed, "data", "batches", c, epoch) of the client's
    indices, cut into floor(n/B) batches (the last partial batch is dropped so every batch has
    B samples and the same priced FLOPs; a client with fewer than B samples uses all of them).
    """

    partitions: list
    batch_size: int
    seed: int
    cursor: dict = field(default_factory=dict)  # client -> batches drawn so far (state is data)
    _perms: dict = field(default_factory=dict, repr=False)  # client -> (epoch, permutation): a cache

    def batches_per_epoch(self, client: int) -> int:
        return max(1, len(self.partitions[client]) // self.batch_size)

    def indices(self, client: int, k: int) -> np.ndarray:
        part = self.partitions[client]
        per = self.batches_per_epoch(client)
        epoch, i = divmod(k, per)
        cached = self._perms.get(client)
        if cached is None or cached[0] != epoch:
            cached = (epoch, rng.generator(self.seed, "data", "batches", client, epoch).permutation(len(part)))
            self._perms[client] = cached
        b = min(self.batch_size, len(part))
        return part[cached[1][i * b : (i + 1) * b]]

    def next(self, client: int) -> np.ndarray:
        k = self.cursor.get(client, 0)
        self.cursor[client] = k + 1
        return self.indices(client, k)

    def next_size(self, client: int) -> int:
        """``len(self.next(client))`` without drawing the indices (a timing-only run prices the
        count only): min(B, n), as ``indices`` cuts every batch."""
        self.cursor[client] = self.cursor.get(client, 0) + 1
        return min(self.batch_size, len(self.partitions[client]))


def batch_tensors(data, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.as_tensor(idx, dtype=torch.long)
    return data.x_train[t].to(device), data.y_train[t].to(device)


# --------------------------------------------------------------------------------------------
# Evaluation (free in simulated time)
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(parts, client_params: Params, server_params: Params, x: torch.Tensor, y: torch.Tensor,
             batch_size: int, device: torch.device) -> tuple[float, float]:
    """Accuracy (fraction) and mean cross-entropy of the global model on (x, y)."""
    correct, loss_sum, n = 0, 0.0, len(y)
    for s in range(0, n, batch_size):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        h = forward(parts.client, client_params, xb)
        logits = server_logits(parts.server, server_params, h, aux_of(parts, xb))
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return correct / n, loss_sum / n
