"""SplitFed V1 and V2 (Thapa et al., "SplitFed: When Federated Learning Meets Split Learning",
AAAI 2022, arXiv 2004.12088, and its public code).

Per minibatch: client forward, send h and labels; the Split Server runs forward and backward
on its part and sends dL/dh back; the client backpropagates and steps. Per round every
participating client does ``local_steps`` minibatches (or ``local_epochs`` passes), then the
Fed Server averages the client parts.

- V1: one server copy per client, started from the global server part and averaged at round
  end with the same weights as the client parts. Clients are logically parallel.
- V2: ONE shared server model, updated in the simulated order in which the clients'
  activations reach it (the reference code processes whole clients in a random order; the
  arrival order is what a real server would see). Its momentum persists across rounds.

``client_optimizer: zo`` gives the MU-SplitFed paper's "ZO baselines": the client sends h and
2P perturbed activations, the server takes its one step on h (first-order or ZO) and returns
P loss differences computed with the updated copy (the exchange of ``mu_splitfed`` with tau 1,
which is the code that runs it). A ZO server with a first-order client is refused: the client
needs dL/dh, which a ZO server does not compute.

Choices where the sources are silent (documented in docs/algorithms.md): client and V1
server optimizer state (momentum) restarts each round, since the local copies restart from the
global model; the server step's FLOPs include the loss and dL/dh. The exchange itself lives in
``simulator.algorithms.mu_splitfed.SplitRounds``; this module holds the first-order step
functions and the builders (its configs are in ``simulator.algorithms.configs``, re-exported here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simulator.algorithms.common import Params, RunContext, leaf, server_logits, sgd_step
from simulator.algorithms.configs import SplitFedConfig, SplitFedV1Config, SplitFedV2Config  # noqa: F401


# --------------------------------------------------------------------------------------------
# Pure steps: tensors in, tensors out
# --------------------------------------------------------------------------------------------
def server_step(module, params: Params, h: torch.Tensor, y: torch.Tensor, cfg, buffers: dict,
                aux=None) -> tuple[torch.Tensor, float]:
    """One first-order server step on (h, y): updates ``params`` in place, returns (dL/dh, loss)."""
    h = h.detach().requires_grad_(True)
    p = leaf(params)
    logits = server_logits(module, p, h, aux)
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
# Builders: the round-based exchange with SplitFed's settings
# --------------------------------------------------------------------------------------------
def _build(ctx: RunContext, shared_server: bool):
    from simulator.algorithms.mu_splitfed import SplitRounds

    return SplitRounds(ctx, shared_server=shared_server, tau=1, tau_max=1, dh_with_step=True,
                       table=ctx.cfg.client_optimizer == "zo")


def build_v1(ctx: RunContext):
    return _build(ctx, shared_server=False)


def build_v2(ctx: RunContext):
    return _build(ctx, shared_server=True)
