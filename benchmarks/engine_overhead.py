"""How much host time does the simulator add around the real training steps, and what does
one charged operation cost?

Runs the same SplitFed V1 work on real Fashion-MNIST data, the five runs below interleaved
``--repeat`` times, and prints medians and ratios measured side by side in this one run:
  (a) bare: the same pure step functions (client forward, server step, client backward, SGD,
      round-end averaging) called in a plain Python loop, client after client, no SimPy, no
      pricing, no recording;
  (b) bare, lock-step: the same loop with the clients advancing one local step at a time, as
      they do inside the simulator (every client's copy is live at once, so the tensor work
      itself touches more memory than in (a));
  (c) simulated: the SplitFed V1 SimPy process on a ``Simulation``, exactly as
      ``run_scenario`` runs it (pricing, server queueing, span recording), without evaluation;
  (d) simulated on ``ReferenceSimulation``: the engine's plain-reading charge path (the
      engine before its per-operation cost was cut), the same outputs;
  (e) simulated on a null engine: every charge is a fixed 1 ms timeout, nothing priced or
      recorded. Not a valid simulation (the schedule differs); it is the floor any engine
      change can reach, so (c) / (e) is what pricing and recording still cost in the run.
Then the engine alone, with no tensor work: the operations of SplitFed V1 (forward, uplink,
server step, downlink, backward per local step) charged by one SimPy process per client, on
the fast and on the reference charge path, alternated the same way: microseconds per charged
operation and simulated operations per host second.

Times are thread CPU seconds (``time.thread_time``; torch runs on this one thread) so that
other processes on a shared machine count less; wall-clock ratios are printed too. Usage:

    python benchmarks/engine_overhead.py [--model mlp|small_cnn|alexnet] [--rounds 5] [--repeat 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from simulator.algorithms.common import (  # noqa: E402
    ClientBatches, aggregate, batch_tensors, clone, forward, leaf, params_of, select_clients,
)
from simulator.algorithms.splitfed import client_backward_step, server_step  # noqa: E402
from simulator.runner import build_context  # noqa: E402
from simulator.scenario import validate  # noqa: E402


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


class _Clock:
    """Thread CPU and wall seconds since construction."""

    def __init__(self):
        self.cpu, self.wall = time.thread_time(), time.perf_counter()

    def read(self) -> tuple[float, float]:
        return time.thread_time() - self.cpu, time.perf_counter() - self.wall


def bare(s, lockstep: bool = False) -> tuple[float, float]:
    """The same real work as SplitFed V1, without the simulator. Returns (cpu, wall) seconds."""
    ctx = build_context(s, sim=None, device=torch.device("cpu"))
    cfg = s.algorithm
    client_g, server_g = params_of(ctx.parts.client), params_of(ctx.parts.server)
    batches = ClientBatches(ctx.partitions, cfg.batch_size, s.seed)

    def step(c, client, server, cbuf, sbuf):
        x, y = batch_tensors(ctx.data, batches.next(c), ctx.device)
        p = leaf(client)
        h = forward(ctx.parts.client, p, x)
        dh, _ = server_step(ctx.parts.server, server, h.detach(), y, cfg, sbuf)
        client_backward_step(client, p, h, dh, cfg, cbuf)

    clock = _Clock()
    for r in range(s.stop.rounds):
        clients = select_clients(s.seed, r, len(ctx.partitions), cfg.participation)
        if lockstep:
            states = [(c, clone(client_g), clone(server_g), {}, {}) for c in clients]
            for _ in range(cfg.local_steps):
                for st in states:
                    step(*st)
            results = [(client, server) for _, client, server, _, _ in states]
        else:
            results = []
            for c in clients:
                client, server, cbuf, sbuf = clone(client_g), clone(server_g), {}, {}
                for _ in range(cfg.local_steps):
                    step(c, client, server, cbuf, sbuf)
                results.append((client, server))
        w = [1.0] * len(clients)
        client_g = aggregate(client_g, [a for a, _ in results], w)
        server_g = aggregate(server_g, [b for _, b in results], w)
    return clock.read()


def _null_simulation_class():
    from simulator.engine import Simulation

    class NullSimulation(Simulation):
        """Every charge a fixed 1 ms timeout: no pricing, no sequence numbers, no span."""

        def _charge(self, category, party, kind, client, flops, nbytes, round, wait_s, rng_elements):
            yield self.env.timeout(0.001)
            return 0.001, 0.0

    return NullSimulation


def _simulation(s, reference, out_dir=None):
    """A Simulation (``reference``: False, True for ReferenceSimulation, or "null")."""
    from simulator.engine import ReferenceSimulation, Simulation
    from simulator.latency import build_time_model
    from simulator.trace import Recorder

    cls = _null_simulation_class() if reference == "null" else ReferenceSimulation if reference else Simulation
    rec = Recorder(out_dir)
    return cls(build_time_model(s.time, s.data.num_clients, s.seed), rec, s.time.server.capacity), rec


def simulated(s, reference=False) -> tuple[float, float, dict]:
    """The same work as a SimPy run (pricing, queueing, recording). Returns (cpu, wall, facts)."""
    from simulator.algorithms import ALGORITHMS

    sim, rec = _simulation(s, reference)
    ctx = build_context(s, sim, torch.device("cpu"))
    algo = ALGORITHMS[s.algorithm.name].build(ctx)
    sim.on_round(lambda r: sim.stop("rounds") if r + 1 >= s.stop.rounds else None)
    clock = _Clock()
    sim.env.process(algo.process())
    sim.run()  # the event loop as run_scenario runs it (inlined loop, collector settings)
    cpu, wall = clock.read()
    return cpu, wall, {"events": rec.event_count, "sim_time_s": sim.now}


def engine_only(s, reference: bool = False, out_dir=None) -> tuple[float, float, int]:
    """SplitFed V1's charges with no tensor work, events.csv written into ``out_dir`` (flushed
    at every round end, as a run does) where one is given. Returns (cpu, wall, operations)."""
    from simulator.latency import DOWNLINK, UPLINK

    sim, rec = _simulation(s, reference, out_dir)
    done = [0] * s.stop.rounds
    cfg, m = s.algorithm, s.data.num_clients

    def client(c):
        for r in range(s.stop.rounds):
            yield from sim.send(c, DOWNLINK, "model_down", 400_000, r)
            for _ in range(cfg.local_steps):
                yield from sim.compute(c, "client_forward", 6.4e6, r)
                yield from sim.send(c, UPLINK, "activation", 16_640, r)
                yield from sim.serve("server_step", 1.3e6, c, r)
                yield from sim.send(c, DOWNLINK, "gradient", 16_384, r)
                yield from sim.compute(c, "client_backward", 6.4e6, r)
            yield from sim.send(c, UPLINK, "model_up", 400_000, r)
            done[r] += 1
            if done[r] == m:
                rec.flush()  # the runner flushes the recorder at every round end

    for c in range(m):
        sim.env.process(client(c))
    clock = _Clock()
    sim.env.run()
    rec.close()
    cpu, wall = clock.read()
    return cpu, wall, rec.event_count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7, help="alternations of the runs (medians are printed)")
    ap.add_argument("--engine-rounds", type=int, default=40, help="rounds of the engine-only measurement")
    a = ap.parse_args()
    s = scenario(a.model, a.rounds, a.threads, a.clients, a.steps)
    torch.set_num_threads(a.threads)
    names = ("bare", "bare_lockstep", "simulated", "simulated_reference", "simulated_null_engine")
    runs = {
        "bare": lambda: bare(s),
        "bare_lockstep": lambda: bare(s, lockstep=True),
        "simulated": lambda: simulated(s)[:2],
        "simulated_reference": lambda: simulated(s, reference=True)[:2],
        "simulated_null_engine": lambda: simulated(s, reference="null")[:2],
    }
    for n in names:  # warm-up: data cache, first-call costs
        runs[n]()
    cpu: dict = {n: [] for n in names}
    wall: dict = {n: [] for n in names}
    for _ in range(a.repeat):
        for n in names:
            c, w = runs[n]()
            cpu[n].append(c)
            wall[n].append(w)
    facts = simulated(s)[2]
    med = {n: statistics.median(cpu[n]) for n in names}
    wmed = {n: statistics.median(wall[n]) for n in names}

    es = scenario(a.model, a.engine_rounds, a.threads, a.clients, a.steps)
    eng: dict = {"fast": [], "reference": []}
    ops = 0
    engine_only(es), engine_only(es, reference=True)
    for _ in range(a.repeat):
        for n in eng:
            c, _, ops = engine_only(es, reference=n == "reference")
            eng[n].append(c)
    us = {n: 1e6 * statistics.median(eng[n]) / ops for n in eng}

    steps = a.rounds * a.clients * a.steps
    print(f"model={a.model} rounds={a.rounds} clients={a.clients} local_steps={a.steps} threads={a.threads} "
          f"repeat={a.repeat} (medians of thread CPU seconds, runs alternated)")
    print(f"{'run':24s} {'cpu s':>8s} {'/ bare':>7s} {'/ lockstep':>10s} {'/ null engine':>13s} {'wall / bare':>11s}")
    for n in names:
        print(f"{n:24s} {med[n]:8.3f} {med[n] / med['bare']:7.3f} {med[n] / med['bare_lockstep']:10.3f} "
              f"{med[n] / med['simulated_null_engine']:13.3f} {wmed[n] / wmed['bare']:11.3f}")
    ev = facts["events"]
    print(f"events recorded: {ev}; host CPU added per event: "
          f"{1e6 * (med['simulated'] - med['bare']) / ev:.1f} us over bare, "
          f"{1e6 * (med['simulated'] - med['bare_lockstep']) / ev:.1f} us over lock-step "
          f"(reference engine: {1e6 * (med['simulated_reference'] - med['bare_lockstep']) / ev:.1f} us)")
    print(f"simulated client steps per host second: {steps / med['simulated']:.1f}; "
          f"simulated seconds per host second: {facts['sim_time_s'] / med['simulated']:.1f}")
    print(f"engine alone ({ops} operations, no tensor work): {us['fast']:.2f} us per operation "
          f"({1e6 / us['fast']:,.0f} simulated operations per host second); reference charge path "
          f"{us['reference']:.2f} us ({us['reference'] / us['fast']:.2f}x)")
    print(f"RESULT engine.{'tiny_mlp' if a.model == 'mlp' else a.model}_overhead = {med['simulated'] / med['bare']:.3f}  "
          f"simulated run / bare PyTorch loop, thread CPU ({a.model})")
    print(f"RESULT engine.us_per_op_ratio = {us['fast'] / us['reference']:.3f}  engine alone: us per operation, "
          f"fast path / the earlier charge path (ReferenceSimulation), SimPy included")


if __name__ == "__main__":
    main()
