"""Memory, drift and cost of the in-place ZO steps of simulator.zo (the MeZO trick), measured.

For each model part it runs, under a TorchDispatchMode that counts the bytes of tensor
storages created during the step and still alive (parameters and inputs excluded):

- ``zo client step``: h, then per perturbation h+ and h- (in place: +lam u, -2 lam u, +lam u)
  and the ZO update, exactly as MU-SplitFed's client does it (``gaussian`` and ``sphere``);
- ``zo server step``: one ZO-SGD step on the server part (two forwards and the update);
- ``fo step``: forward, backward and the gradients of the same part, for comparison.

It also measures what a probe leaves behind (``zo.restore_drift``: the fraction of
elements not restored bit for bit and the largest change against the rounding bound) and the
host time of one in-place pass (regenerating u) per million parameters.

    python benchmarks/zo_memory.py            # AlexNet-style network of the papers, cut 2
    python benchmarks/zo_memory.py --cut 1 --batch 32

Numbers are exact for tensor storages on CPU; memory that is not a tensor (allocator slack,
kernel scratch, the Python heap) is not seen.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.split import split  # noqa: E402
from models.zoo import build_model  # noqa: E402
from simulator import rng, zo  # noqa: E402
from simulator.algorithms import mu_splitfed as mu  # noqa: E402
from simulator.algorithms.common import forward, params_of  # noqa: E402
from simulator.memory import NewStorageTracker  # noqa: E402




def _mib(n: float) -> str:
    return f"{n / 2**20:8.3f}"


def measure(cut: int, batch: int, P: int) -> list[tuple]:
    parts = split(build_model("alexnet", 1, 10, (28, 28), seed=0), cut)
    client, server = params_of(parts.client), params_of(parts.server)
    g = rng.torch_generator(0, "bench", "batch")
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    h = mu.client_activation(parts.client, client, x)
    rows = []

    for direction in ("gaussian", "sphere"):
        seeds = [zo.zo_seed(0, "bench", direction, p) for p in range(P)]
        meter = NewStorageTracker(list(client.values()) + [x])
        with meter:
            hh = mu.client_activation(parts.client, client, x)
            pairs = [(mu.probe_plus(parts.client, client, x, s, 0.005, direction),
                      mu.probe_minus(parts.client, client, x, s, 0.005, direction)) for s in seeds]
            mu.client_zo_update(client, seeds, [0.01] * P, 0.005, 0.005, direction)
        del hh, pairs
        rows.append((f"zo client step ({direction}, P={P})", client, meter))

        meter = NewStorageTracker(list(server.values()) + [h, y])
        with meter:
            mu.server_zo_step(parts.server, server, h, y, seeds, 0.005, 1e-4, direction)
        rows.append((f"zo server step ({direction}, P={P})", server, meter))

    for name, part, inp, params in (("client", parts.client, x, client), ("server", parts.server, h, server)):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        meter = NewStorageTracker(list(params.values()) + [inp, y])
        with meter:
            out = forward(part, leaves, inp)
            loss = F.cross_entropy(out, y) if name == "server" else out.square().mean()
            grads = torch.autograd.grad(loss, list(leaves.values()))
        del grads
        rows.append((f"fo {name} step (forward+backward)", params, meter))
    return rows


def drift_and_cost(cut: int) -> list[str]:
    parts = split(build_model("alexnet", 1, 10, (28, 28), seed=0), cut)
    out = []
    for name, params in (("client", params_of(parts.client)), ("server", params_of(parts.server))):
        ps = list(params.values())
        n = sum(p.numel() for p in ps)
        for direction in ("gaussian", "sphere"):
            d = zo.restore_drift(ps, 0.005, 7, direction)
            t0 = time.perf_counter()
            reps = 5
            for i in range(reps):
                zo.perturb_(ps, 1000 + i, 1e-3, direction)  # new seeds: sphere pays its norm pass
            per_m = (time.perf_counter() - t0) / reps / (n / 1e6)
            out.append(f"| {name} | {n:,} | {direction} | {d['changed_fraction']:.3f} | {d['max_abs']:.2e} "
                       f"| {d['max_over_bound']:.3f} | {1e3 * per_m:.1f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--perturbations", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"AlexNet-style network, cut {args.cut}, batch {args.batch}, torch {torch.__version__}, "
          f"chunk {zo.CHUNK_ELEMENTS} elements ({zo.CHUNK_ELEMENTS * 4 // 1024} KiB)\n")
    print("| step | parameters (MiB) | peak new live tensors (MiB) | largest new tensor (MiB) |")
    print("|---|---:|---:|---:|")
    for name, params, m in measure(args.cut, args.batch, args.perturbations):
        pb = sum(p.nbytes for p in params.values())
        print(f"| {name} | {_mib(pb)} | {_mib(m.peak)} | {_mib(m.largest)} |")
    print("\nRestore after a probe (+lam u, -2 lam u, +lam u; lam = 0.005) and cost of one in-place pass:\n")
    print("| part | parameters | direction | elements not bit-exact | largest change | largest change / bound "
          "| ms per pass per M params |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for line in drift_and_cost(args.cut):
        print(line)


if __name__ == "__main__":
    main()
