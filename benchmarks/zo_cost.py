"""Is a ZO step priced as it costs? Charged vs measured host ratio, ZO step / first-order step.

For each model (AlexNet cut 2 and the small CNN cut 1 on Fashion-MNIST-shaped input, batch 32):

- **charged**: a one-round simulated run per optimizer (no delays, one client, one local
  iteration, tau 1) gives the simulated duration of the server step (``server_zo_step`` vs
  ``server_fo_step``) and of the client's work per local iteration (ZO: forward, h+, h-,
  update; first-order: forward, backward), exactly as the algorithms price them;
- **measured**: the same step functions (``simulator.algorithms.mu_splitfed`` and
  ``splitfed``) timed on this machine, ZO and first-order alternated, medians of ``--reps``.

It also calibrates ``time.zo_rng_flops_per_element``: host seconds of one in-place
regenerate-and-add pass per parameter, converted to FLOP-equivalents with the measured
FLOP rate of the model's own first-order server step. Usage:

    python benchmarks/zo_cost.py [--reps 9] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.profile import profile_cut
from models.split import split
from models.zoo import build_model
from simulator.algorithms import mu_splitfed as mu
from simulator.algorithms.common import forward, leaf, params_of
from simulator.algorithms.splitfed import client_backward_step
from simulator.runner import run_scenario
from simulator.scenario import ZO_RNG_FLOPS_PER_ELEMENT, validate
from simulator.zo import perturb_, zo_seed

BATCH = 32
CASES = (("alexnet", 2), ("small_cnn", 1))


class _Cfg:
    lr_client, momentum, weight_decay = 1e-3, 0.0, 0.0


def charged(model: str, cut: int, client_opt: str, server_opt: str, rng_cost: float) -> dict:
    """Simulated seconds per kind of one local iteration, as the algorithm prices it."""
    s = validate({
        "name": "zo-cost", "seed": 0, "threads": 1,
        "data": {"dataset": "fashion_mnist", "num_clients": 1, "train_limit": 64, "test_limit": 32},
        "model": {"name": model, "cut": cut},
        "algorithm": {"name": "mu_splitfed", "batch_size": BATCH, "participation": 1.0, "tau": 1,
                      "local_steps": 1, "client_optimizer": client_opt, "server_optimizer": server_opt},
        "time": {"client": {"flops_per_s": 1e10, "delay_s": 0}, "server": {"flops_per_s": 1e10, "capacity": 1},
                 "zo_rng_flops_per_element": rng_cost},
        "eval": {"every_rounds": None}, "stop": {"rounds": 1},
    })
    ev = run_scenario(s).events
    ev = ev.assign(d=ev.end_s - ev.start_s)
    return ev.groupby("kind").d.sum().to_dict()


def measure(model: str, cut: int, reps: int) -> dict:
    """Median host seconds of the ZO and first-order step functions, alternated."""
    parts = split(build_model(model, 1, 10, (28, 28), seed=0), cut)
    prof = profile_cut(parts, (1, 28, 28), BATCH)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    client, server = params_of(parts.client), params_of(parts.server)
    h = mu.client_activation(parts.client, client, x)
    lr = 1e-6  # tiny steps: the parameters stay where they are, the work is the same

    def server_zo():
        mu.server_zo_step(parts.server, server, h, y, [zo_seed(0, "b", 1)], 0.005, lr, "gaussian")

    def server_fo():
        mu.server_fo_step(parts.server, server, h, y, lr)

    def client_zo():
        mu.client_activation(parts.client, client, x)
        hp = mu.probe_plus(parts.client, client, x, 7, 0.005, "gaussian")
        hm = mu.probe_minus(parts.client, client, x, 7, 0.005, "gaussian")
        mu.client_zo_update(client, [7], [float((hp - hm).sum()) * 0.0], 0.005, lr, "gaussian")

    def client_fo():
        p = leaf(client)
        hh = forward(parts.client, p, x)
        client_backward_step(client, p, hh, torch.ones_like(hh) * 1e-3, _Cfg, {})

    ps = list(server.values())

    def server_pass():
        perturb_(ps, 11, 1e-9, "gaussian")

    fns = {"server_zo": server_zo, "server_fo": server_fo, "client_zo": client_zo, "client_fo": client_fo,
           "server_pass": server_pass}
    times: dict = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(reps):
        for k, f in fns.items():  # alternate every kind within each repetition
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    fo_flops = prof.server_forward_flops + prof.server_backward_flops + 2 * prof.server_params
    med["rng_flops_per_element"] = med["server_pass"] / prof.server_params * fo_flops / med["server_fo"] - 2
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cost = ZO_RNG_FLOPS_PER_ELEMENT
    print(f"threads={args.threads} reps={args.reps} time.zo_rng_flops_per_element={cost:g}")
    print("| model | side | charged ZO/FO | measured ZO/FO | charged / measured | rng FLOP-equiv per element (measured) |")
    print("|---|---|---|---|---|---|")
    for model, cut in CASES:
        zo = charged(model, cut, "zo", "zo", cost)
        fo = charged(model, cut, "fo", "fo", cost)
        m = measure(model, cut, args.reps)
        c_server = zo["server_zo_step"] / charged(model, cut, "zo", "fo", cost)["server_fo_step"]
        c_client = sum(zo[k] for k in ("client_forward", "client_forward_plus", "client_forward_minus",
                                       "client_zo_update")) / (fo["client_forward"] + fo["client_backward"])
        for side, c, meas in (("server step", c_server, m["server_zo"] / m["server_fo"]),
                              ("client iteration", c_client, m["client_zo"] / m["client_fo"])):
            print(f"| {model} cut {cut} | {side} | {c:.2f} | {meas:.2f} | {c / meas:.2f} | "
                  f"{m['rng_flops_per_element']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
