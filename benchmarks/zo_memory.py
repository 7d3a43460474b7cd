"""Memory, drift and cost of the in-place ZO steps of simulator.zo (the MeZO trick), measured.

For each model part it runs the algorithms' own step functions under
``simulator.measure.memory.StorageTracker``, which counts the bytes of tensor storages
created during the step and still alive (parameters and inputs excluded):

- ``zo client step``: MU-SplitFed's ``client_activation`` (h), then per perturbation
  ``probe_plus`` (h+) and ``probe_minus`` (h-, in place: +lam u, -2 lam u, +lam u) and
  ``client_zo_update`` (``gaussian`` and ``sphere``);
- ``zo server step``: MU-SplitFed's ``server_zo_step`` (two forwards per direction and the update;
  each direction drawn once and kept for the step: ``(P + 1) * d`` float32 values);
- ``fo client step``: SplitFed's client: forward, then ``client_backward_step`` (backward of a
  dL/dh, SGD step), for comparison;
- ``fo server step``: SplitFed's ``server_step`` (forward, backward, dL/dh, SGD step).

It also measures what a probe leaves behind (``zo.restore_drift``: the fraction of
elements not restored bit for bit and the largest change against the rounding bound) and the
host time of one in-place pass of the client path (regenerating u) per million parameters.

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
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.split import split  # noqa: E402
from models.zoo import build_model  # noqa: E402
from simulator import rng, zo  # noqa: E402
from simulator.algorithms import mu_splitfed as mu  # noqa: E402
from simulator.algorithms import splitfed  # noqa: E402
from simulator.algorithms.common import forward, leaf, params_of  # noqa: E402
from simulator.measure.memory import StorageTracker  # noqa: E402

# Step sizes of the first-order steps (plain SGD: the values do not change memory).
FO_CFG = SimpleNamespace(lr_client=1e-4, lr_server=1e-4, momentum=0.0, weight_decay=0.0)


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
        meter = StorageTracker(list(client.values()) + [x])
        with meter:
            hh = mu.client_activation(parts.client, client, x)
            pairs = [(mu.probe_plus(parts.client, client, x, s, 0.005, direction),
                      mu.probe_minus(parts.client, client, x, s, 0.005, direction)) for s in seeds]
            mu.client_zo_update(client, seeds, [0.01] * P, 0.005, 0.005, direction)
        del hh, pairs
        rows.append((f"zo client step ({direction}, P={P})", client, meter))

        meter = StorageTracker(list(server.values()) + [h, y])
        with meter:
            mu.server_zo_step(parts.server, server, h, y, seeds, 0.005, 1e-4, direction)
        rows.append((f"zo server step ({direction}, P={P})", server, meter))

    meter = StorageTracker(list(client.values()) + [x])
    with meter:
        p = leaf(client)
        hc = forward(parts.client, p, x)
        splitfed.client_backward_step(client, p, hc, torch.full_like(hc, 1e-3), FO_CFG, {})
    del p, hc
    rows.append(("fo client step (forward, backward of dL/dh, SGD)", client, meter))

    meter = StorageTracker(list(server.values()) + [h, y])
    with meter:
        dh, _ = splitfed.server_step(parts.server, server, h, y, FO_CFG, {})
    del dh
    rows.append(("fo server step (forward, backward, SGD; returns dL/dh)", server, meter))
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
