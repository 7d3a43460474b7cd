"""SplitFed V1 and V2, first-order (Thapa et al., "SplitFed: When Federated Learning Meets
Split Learning", AAAI 2022, arXiv 2004.12088, and its public code).

Per minibatch: client forward, send h and labels; the Split Server runs forward and backward
on its part and sends dL/dh back; the client backpropagates and steps. Per round every
participating client does ``local_steps`` minibatches (or ``local_epochs`` passes), then the
Fed Server averages the client parts.

- V1: one server copy per client, started from the global server part and averaged at round
  end with the same weights as the client parts. Clients are logically parallel.
- V2: ONE shared server model, updated in the simulated order in which the clients'
  activations reach it (the reference code processes whole clients in a random order; the
  arrival order is what a real server would see). Its momentum persists across rounds.

Choices where the sources are silent (documented in docs/algorithms.md): client and V1
server optimizer state (momentum) restarts each round, since the local copies restart from the
global model; the server step's FLOPs include the loss and dL/dh.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

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
from simulator.config import NonNegFloat, PosFloat, PosInt
from simulator.latency import DOWNLINK, UPLINK


class SplitFedConfig(RoundConfig):
    """First-order SplitFed (shared by V1 and V2)."""

    local_steps: Optional[PosInt] = Field(5, description="Minibatches per client per round (null: use local_epochs).")
    local_epochs: Optional[PosInt] = Field(None, description="Passes over the client's data per round, instead of local_steps.")
    lr_client: PosFloat = Field(0.05, description="Client SGD learning rate.")
    lr_server: PosFloat = Field(0.05, description="Server SGD learning rate.")
    momentum: NonNegFloat = Field(0.0, lt=1, description="SGD momentum (client and server).")
    weight_decay: NonNegFloat = Field(0.0, description="SGD weight decay (client and server).")

    @model_validator(mode="after")
    def _steps(self):
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs (the other to null)")
        return self


class SplitFedV1Config(SplitFedConfig):
    """SplitFed V1: a server copy per client, averaged each round."""

    name: Literal["splitfed_v1"]


class SplitFedV2Config(SplitFedConfig):
    """SplitFed V2: one shared server model, updated in arrival order."""

    name: Literal["splitfed_v2"]


# --------------------------------------------------------------------------------------------
# Pure steps: tensors in, tensors out
# --------------------------------------------------------------------------------------------
def server_step(module, params: Params, h: torch.Tensor, y: torch.Tensor, cfg, buffers: dict,
                aux=None) -> tuple[torch.Tensor, float]:
    """One first-order server step on (h, y): updates ``params`` in place, returns (dL/dh, loss)."""
    h = h.detach().requires_grad_(True)
    p = leaf(params)
    logits = forward(module, p, h) if aux is None else forward(module, p, h, aux)
    loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, [h, *p.values()])
    sgd_step(params, dict(zip(p, grads[1:])), cfg.lr_server, cfg.momentum, cfg.weight_decay, buffers)
    return grads[0], float(loss.detach())


def client_backward_step(params: Params, p_leaf: Params, h: torch.Tensor, dh: torch.Tensor, cfg,
                         buffers: dict) -> None:
    """Backpropagate dL/dh through the client graph that produced h and take an SGD step."""
    grads = torch.autograd.grad(h, list(p_leaf.values()), grad_outputs=dh)
    sgd_step(params, dict(zip(p_leaf, grads)), cfg.lr_client, cfg.momentum, cfg.weight_decay, buffers)


# --------------------------------------------------------------------------------------------
# The SimPy process
# --------------------------------------------------------------------------------------------
class SplitFed:
    """SplitFed V1 (``shared_server=False``) or V2 (``shared_server=True``)."""

    def __init__(self, ctx: RunContext, shared_server: bool):
        self.ctx, self.cfg, self.shared_server = ctx, ctx.cfg, shared_server
        self.client_global: Params = params_of(ctx.parts.client)
        self.server_global: Params = params_of(ctx.parts.server)
        self.server_buffers: dict = {}  # V2's shared server momentum
        self.batches = ClientBatches(ctx.partitions, self.cfg.batch_size, ctx.seed)
        self.round = 0
        prof = ctx.profile
        self.client_model_bytes = prof.client_param_bytes
        self.client_n = num_params(self.client_global)
        self.server_n = num_params(self.server_global)

    def steps_for(self, client: int) -> int:
        if self.cfg.local_steps is not None:
            return self.cfg.local_steps
        return self.cfg.local_epochs * self.batches.batches_per_epoch(client)

    def evaluate(self, x, y, batch_size):
        return evaluate(self.ctx.parts, self.client_global, self.server_global, x, y, batch_size, self.ctx.device)

    # ---- one client's round (Algorithm lines of the SplitFed paper, per client) ------------
    def client_round(self, c: int, r: int, out: dict):
        sim, ctx, cfg, prof = self.ctx.sim, self.ctx, self.cfg, self.ctx.profile
        parts = ctx.parts
        # Fed Server -> client: the global client part.
        yield from sim.send(c, DOWNLINK, "model_down", self.client_model_bytes, r)
        client = clone(self.client_global)
        client_buf: dict = {}
        if self.shared_server:
            server, server_buf = self.server_global, self.server_buffers
        else:
            server, server_buf = clone(self.server_global), {}
        for _ in range(self.steps_for(c)):
            idx = self.batches.next(c)
            scale = len(idx) / cfg.batch_size
            x, y = batch_tensors(ctx.data, idx, ctx.device)
            # Client forward on its minibatch.
            yield from sim.compute(c, "client_forward", prof.client_forward_flops * scale, r)
            p = leaf(client)
            h = forward(parts.client, p, x)
            aux = parts.aux(x) if hasattr(parts, "aux") else None
            # Client -> Split Server: smashed data h and labels.
            yield from sim.send(c, UPLINK, "activation", int((prof.activation_bytes + prof.label_bytes) * scale), r)
            # Split Server forward/backward (queues for a server slot), real step right after.
            yield from sim.serve(
                "server_step", (prof.server_forward_flops + prof.server_backward_flops) * scale, c, r
            )
            dh, _ = server_step(parts.server, server, h.detach(), y, cfg, server_buf, aux)
            # Split Server -> client: dL/dh.
            yield from sim.send(c, DOWNLINK, "gradient", int(prof.activation_bytes * scale), r)
            yield from sim.compute(c, "client_backward", prof.client_backward_flops * scale, r)
            client_backward_step(client, p, h, dh, cfg, client_buf)
        # Client -> Fed Server: the updated client part.
        yield from sim.send(c, UPLINK, "model_up", self.client_model_bytes, r)
        out[c] = (client, server)

    # ---- the run --------------------------------------------------------------------------
    def process(self):
        ctx, sim, cfg = self.ctx, self.ctx.sim, self.cfg
        while not sim.stopping:
            r = self.round
            clients = select_clients(ctx.seed, r, ctx.num_clients, cfg.participation)
            results: dict = {}
            procs = [sim.env.process(self.client_round(c, r, results)) for c in clients]
            yield sim.env.all_of(procs)
            weights = aggregation_weights(cfg.aggregation, clients, ctx.partitions)
            jobs = [sim.env.process(sim.fed("aggregate_client", aggregation_flops(self.client_n, len(clients)), r))]
            if not self.shared_server:
                jobs.append(sim.env.process(
                    sim.serve("aggregate_server", aggregation_flops(self.server_n, len(clients)), None, r)
                ))
            yield sim.env.all_of(jobs)
            self.client_global = aggregate(self.client_global, [results[c][0] for c in clients], weights)
            if not self.shared_server:
                self.server_global = aggregate(self.server_global, [results[c][1] for c in clients], weights)
            self.round += 1
            sim.end_round(r)


def build_v1(ctx: RunContext) -> SplitFed:
    return SplitFed(ctx, shared_server=False)


def build_v2(ctx: RunContext) -> SplitFed:
    return SplitFed(ctx, shared_server=True)
