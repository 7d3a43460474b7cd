"""How much host time does the simulator add around the real training steps?

Runs the same SplitFed V1 work twice on real Fashion-MNIST data:
  (a) bare: the same pure step functions (client forward, server step, client backward, SGD,
      round-end averaging) called in a plain Python loop, no SimPy, no pricing, no recording;
  (b) simulated: the SplitFed V1 SimPy process on a Simulation, exactly as ``run_scenario``
      runs it (pricing, server queueing, span recording), without evaluation.
and prints the ratio of host times (the engine's overhead) and simulated client steps per
host second. Usage:

    python benchmarks/engine_overhead.py [--model small_cnn|alexnet|mlp] [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from simulator.algorithms.common import (
    ClientBatches, aggregate, batch_tensors, clone, forward, leaf, params_of, select_clients,
)
from simulator.algorithms.splitfed import client_backward_step, server_step
from simulator.runner import build_context
from simulator.scenario import validate


def scenario(model: str, rounds: int, threads: int, clients: int, steps: int):
    return validate({
        "name": f"overhead-{model}", "seed": 0, "threads": threads,
        "data": {"dataset": "fashion_mnist", "num_clients": clients, "test_limit": 1000},
        "model": {"name": model, "cut": 1},
        "algorithm": {"name": "splitfed_v1", "batch_size": 32, "local_steps": steps, "momentum": 0.9},
        "time": {"client": {"flops_per_s": {"dist": "uniform", "low": 1e9, "high": 4e9},
                            "delay_s": {"dist": "exponential", "mean": 0.05}},
                 "server": {"capacity": 1}},
        "eval": {"every_rounds": None},
        "stop": {"rounds": rounds},
    })


def bare(s) -> float:
    """The same real work as SplitFed V1, without the simulator. Returns host seconds."""
    ctx = build_context(s, sim=None, device=torch.device("cpu"))
    cfg = s.algorithm
    client_g, server_g = params_of(ctx.parts.client), params_of(ctx.parts.server)
    batches = ClientBatches(ctx.partitions, cfg.batch_size, s.seed)
    t0 = time.perf_counter()
    for r in range(s.stop.rounds):
        clients = select_clients(s.seed, r, len(ctx.partitions), cfg.participation)
        results = []
        for c in clients:
            client, server, cbuf, sbuf = clone(client_g), clone(server_g), {}, {}
            for _ in range(cfg.local_steps):
                x, y = batch_tensors(ctx.data, batches.next(c), ctx.device)
                p = leaf(client)
                h = forward(ctx.parts.client, p, x)
                dh, _ = server_step(ctx.parts.server, server, h.detach(), y, cfg, sbuf)
                client_backward_step(client, p, h, dh, cfg, cbuf)
            results.append((client, server))
        w = [1.0] * len(clients)
        client_g = aggregate(client_g, [a for a, _ in results], w)
        server_g = aggregate(server_g, [b for _, b in results], w)
    return time.perf_counter() - t0


def simulated(s) -> tuple[float, dict]:
    """The same work as a SimPy run (pricing, queueing, recording). Returns host seconds."""
    from simulator.algorithms import ALGORITHMS
    from simulator.engine import Simulation
    from simulator.latency import build_time_model
    from simulator.trace import Recorder

    rec = Recorder()
    sim = Simulation(build_time_model(s.time, s.data.num_clients, s.seed), rec, s.time.server.capacity)
    ctx = build_context(s, sim, torch.device("cpu"))
    algo = ALGORITHMS[s.algorithm.name].build(ctx)
    sim.on_round(lambda r: sim.stop("rounds") if r + 1 >= s.stop.rounds else None)
    t0 = time.perf_counter()
    sim.env.process(algo.process())
    sim.env.run(until=sim.stopped)
    host = time.perf_counter() - t0
    return host, {"events": len(rec.events), "sim_time_s": sim.now}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    s = scenario(a.model, a.rounds, a.threads, a.clients, a.steps)
    torch.set_num_threads(a.threads)
    bare(s)  # warm-up (data cache, first-call costs)
    bares, sims = [], []
    for _ in range(a.repeat):
        bares.append(bare(s))
        t, summary = simulated(s)
        sims.append(t)
    b, m = min(bares), min(sims)
    steps = a.rounds * a.clients * a.steps
    print(f"model={a.model} rounds={a.rounds} clients={a.clients} local_steps={a.steps} threads={a.threads}")
    print(f"bare PyTorch loop:      {b:8.3f} s (best of {a.repeat})")
    print(f"inside the simulator:   {m:8.3f} s (best of {a.repeat})")
    print(f"overhead:               {100 * (m / b - 1):+8.1f} %")
    print(f"events recorded:        {summary['events']}")
    print(f"simulated client steps per host second: {steps / m:8.1f}")
    print(f"simulated seconds per host second:      {summary['sim_time_s'] / m:8.1f}")


if __name__ == "__main__":
    main()
