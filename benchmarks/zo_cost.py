"""What a ZO step costs on this CPU, and is it priced as it costs? Host-time ratios, side by side.

Three tables, every figure a ratio of medians of alternated repetitions (one run). With one
torch thread the clock is the thread's CPU time (``time.thread_time``), which a shared CPU's
other jobs do not inflate by descheduling us; with more threads it is wall time.

1. **Server ZO step / its 2P server forwards** (``server_zo_step``, directions drawn once and
   kept) next to the regenerating path it replaced (``zo.probe_pair`` then ``zo.zo_update_``,
   four draws per direction; bit-identical results), for AlexNet cut 2 and the small CNN cut 1,
   batch 32 and 64, P = 1 and 4.
2. **Charged vs measured, ZO / first-order**: *charged* is the simulated-time ratio a one-round
   run prices (no delays, one client, one local iteration, tau 1): ``server_zo_step`` over
   ``server_fo_step``, and the client's work per local iteration (ZO: forward, h+, h-, update;
   first-order: forward, backward); *measured* is the host-time ratio of the same step
   functions (``simulator.algorithms.mu_splitfed`` and ``splitfed``). Charged / measured within
   0.75-1.25 is the target.
3. **Per-element prices** (and 4., of the non-matmul ops ``models.profile.NON_MATMUL_FLOPS``
   prices: max-pooling, ReLU and their backwards), in FLOP-equivalents at the FLOP rate of each model's own
   first-order server step: one N(0, 1) float32 draw (``time.zo_rng_flops_per_element``) and
   one elementwise op over the parameters (an add; ``time.zo_elementwise_flops_per_element``).

``--threads-table`` adds the host time of one in-place pass of the client path per element,
with its elementwise ops on slices of 64K values (before) and of ``zo.SERIAL_ELEMENTS``
(after), at 1 and 2 threads. Usage:

    python benchmarks/zo_cost.py [--reps 9] [--threads 1] [--threads-table] [--steps-only | --pricing-only]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.profile import NON_MATMUL_FLOPS, profile_cut  # noqa: E402
from models.split import split  # noqa: E402
from models.zoo import build_model  # noqa: E402
from simulator import zo  # noqa: E402
from simulator.algorithms import mu_splitfed as mu  # noqa: E402
from simulator.algorithms.common import forward, leaf, params_of  # noqa: E402
from simulator.algorithms.splitfed import client_backward_step  # noqa: E402
from simulator.runner import run_scenario  # noqa: E402
from simulator.scenario import ZO_ELEMENTWISE_FLOPS_PER_ELEMENT, ZO_RNG_FLOPS_PER_ELEMENT, validate  # noqa: E402

BATCH = 32
CASES = (("alexnet", 2), ("small_cnn", 1))
#: The first pooling input of each model (its conv1 output) at 28x28, without the batch.
POOL_INPUT = {"alexnet": (32, 28, 28), "small_cnn": (16, 28, 28)}


class _Cfg:
    lr_client, momentum, weight_decay = 1e-3, 0.0, 0.0


def clock():
    """CPU time of this thread when torch runs on it alone (1 thread): what the work costs, not
    how long other jobs on a shared CPU kept it waiting; wall time when torch uses more threads."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def timed(fns: dict, reps: int) -> dict:
    """Median seconds (``clock``) of each function, every function run once per repetition (alternated)."""
    times: dict = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(reps):
        for k, f in fns.items():
            t = clock()
            f()
            times[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _setup(model: str, cut: int, batch: int):
    parts = split(build_model(model, 1, 10, (28, 28), seed=0), cut)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    client, server = params_of(parts.client), params_of(parts.server)
    return parts, x, y, client, server, mu.client_activation(parts.client, client, x)


def server_step_table(reps: int) -> list[str]:
    """Table 1: server ZO step / 2P server forwards, kept directions vs the regenerating path."""
    rows = []
    for model, cut in CASES:
        for batch in (32, 64):
            parts, _, y, _, server, h = _setup(model, cut, batch)
            ps = list(server.values())

            def loss():
                return mu._server_loss(parts.server, server, h, y)

            for P in (1, 4):
                seeds = [zo.zo_seed(0, "bench", p) for p in range(P)]

                def forwards():
                    with torch.no_grad():
                        for _ in range(2 * P):
                            loss()

                def kept():
                    mu.server_zo_step(parts.server, server, h, y, seeds, 0.005, 1e-9, "gaussian")

                def regenerating():  # what server_zo_step ran up to commit c051211
                    coeffs = []
                    for s in seeds:
                        plus, minus = zo.probe_pair(ps, loss, 0.005, s, "gaussian")
                        coeffs.append((float(plus) - float(minus)) / 0.01)
                    zo.zo_update_(ps, seeds, coeffs, 1e-9, "gaussian")

                m = timed({"fwd": forwards, "kept": kept, "regen": regenerating}, reps)
                RATIOS.setdefault("step", []).append(m["kept"] / m["fwd"])
                rows.append(f"| {model} cut {cut} | {batch} | {P} | {m['regen'] / m['fwd']:.2f} | "
                            f"{m['kept'] / m['fwd']:.2f} |")
                print(rows[-1], flush=True)
    return rows


def charged(model: str, cut: int, client_opt: str, server_opt: str) -> dict:
    """Simulated seconds per kind of one local iteration, as the algorithm prices it (defaults)."""
    s = validate({
        "name": "zo-cost", "seed": 0, "threads": 1,
        "data": {"dataset": "fashion_mnist", "num_clients": 1, "train_limit": 64, "test_limit": 32},
        "model": {"name": model, "cut": cut},
        "algorithm": {"name": "mu_splitfed", "batch_size": BATCH, "participation": 1.0, "tau": 1,
                      "local_steps": 1, "client_optimizer": client_opt, "server_optimizer": server_opt},
        "time": {"client": {"flops_per_s": 1e10, "delay_s": 0}, "server": {"flops_per_s": 1e10, "capacity": 1}},
        "eval": {"every_rounds": None}, "stop": {"rounds": 1},
    })
    ev = run_scenario(s).events
    ev = ev.assign(d=ev.end_s - ev.start_s)
    return ev.groupby("kind").d.sum().to_dict()


def measure(model: str, cut: int, reps: int) -> dict:
    """Median host seconds of the ZO and first-order step functions (alternated), and the
    per-element prices at the FLOP rate of the model's first-order server step."""
    parts, x, y, client, server, h = _setup(model, cut, BATCH)
    prof = profile_cut(parts, (1, 28, 28), BATCH)
    lr = 1e-6  # tiny steps: the parameters stay where they are, the work is the same
    ps = list(server.values())
    flats = [p.view(-1) for p in ps]
    ones = [torch.ones_like(f) for f in flats]

    def server_zo():
        mu.server_zo_step(parts.server, server, h, y, [zo.zo_seed(0, "b", 1)], 0.005, lr, "gaussian")

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

    # Table 4: the non-matmul ops FlopCounterMode counts 0, on the model's first pooling input
    # (the client's conv1 output), through the same aten ops autograd runs.
    aten = torch.ops.aten
    pool_in = torch.randn(BATCH, *POOL_INPUT[model], generator=torch.Generator().manual_seed(1))
    pooled, indices = aten.max_pool2d_with_indices(pool_in, [2, 2], [2, 2])
    grad_pooled = torch.randn_like(pooled)

    def pool():
        aten.max_pool2d_with_indices(pool_in, [2, 2], [2, 2])

    def pool_backward():
        aten.max_pool2d_with_indices_backward(grad_pooled, pool_in, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)

    def relu():
        aten.relu(pool_in)

    def relu_backward():
        aten.threshold_backward(pool_in, pool_in, 0)

    def draw():  # generation alone, into kept tensors (the server path's draw)
        zo.draw_direction(ps, 11, "gaussian")

    def add():  # one elementwise op over the parameters
        torch._foreach_add_(flats, ones, alpha=1e-30)

    med = timed({"server_zo": server_zo, "server_fo": server_fo, "client_zo": client_zo, "client_fo": client_fo,
                 "draw": draw, "add": add, "pool": pool, "pool_backward": pool_backward, "relu": relu,
                 "relu_backward": relu_backward}, reps)
    n = prof.server_params
    # FLOP/s of server_fo_step, priced as MU-SplitFed charges it (no dL/dh)
    rate = (prof.server_forward_flops + prof.server_backward_params_flops + 2 * n) / med["server_fo"]
    med["rng_price"] = med["draw"] / n * rate
    med["elementwise_price"] = med["add"] / n * rate
    for op in ("pool", "pool_backward", "relu", "relu_backward"):  # per element of the pooling input
        med[f"{op}_price"] = med[op] / pool_in.numel() * rate
        med[f"{op}_ns"] = med[op] / pool_in.numel() * 1e9
    return med


RATIOS: dict[str, list[float]] = {}  # what the RESULT lines summarise


def pricing_table(reps: int) -> list[str]:
    """Table 2 and the per-element prices (Table 3)."""
    rows, prices, ops = [], [], []
    for model, cut in CASES:
        zo_ = charged(model, cut, "zo", "zo")
        fo = charged(model, cut, "fo", "fo")
        c_server = zo_["server_zo_step"] / charged(model, cut, "zo", "fo")["server_fo_step"]
        c_client = sum(zo_[k] for k in ("client_forward", "client_forward_plus", "client_forward_minus",
                                        "client_zo_update")) / (fo["client_forward"] + fo["client_backward"])
        m = measure(model, cut, reps)
        for side, c, meas in (("server step", c_server, m["server_zo"] / m["server_fo"]),
                              ("client iteration", c_client, m["client_zo"] / m["client_fo"])):
            rows.append(f"| {model} cut {cut} | {side} | {c:.2f} | {meas:.2f} | {c / meas:.2f} |")
            RATIOS.setdefault("pricing", []).append(c / meas)
            print(rows[-1], flush=True)
        prices.append(f"| {model} cut {cut} | {m['rng_price']:.0f} | {m['elementwise_price']:.1f} |")
        ops.append(f"| {model} cut {cut} | " + " | ".join(
            f"{m[op + '_ns']:.2f} ns, {m[op + '_price']:.0f} ({NON_MATMUL_FLOPS[aten_op]})"
            for op, aten_op in (("pool", "max_pool2d_with_indices"),
                                ("pool_backward", "max_pool2d_with_indices_backward"),
                                ("relu", "relu"), ("relu_backward", "threshold_backward"))) + " |")
    return rows + ["", "| model (FLOP rate of its first-order server step) | rng draw (FLOP-eq per element) | "
                       "elementwise op (FLOP-eq per element) |", "|---|---:|---:|"] + prices + [
        "", "Table 4, non-matmul ops per element of the first pooling input: host ns, FLOP-eq at that rate "
            "(models.profile.NON_MATMUL_FLOPS in parentheses)", "",
        "| model | max_pool2d_with_indices | its backward | relu | threshold_backward |",
        "|---|---:|---:|---:|---:|"] + ops


def threads_table(reps: int) -> list[str]:
    """ns per element of one in-place pass, elementwise ops on 64K or SERIAL_ELEMENTS slices."""
    sizes = (1 << 20, 1000, 1 << 18)
    ps = [torch.zeros(n) for n in sizes]
    n = sum(sizes)

    def one_pass(slice_elements: int):
        def run():
            flats = [p.view(-1) for p in ps]
            for i, start, stop, z in zo._draws(sizes, 5, torch.device("cpu")):
                for a, b in zo._blocks(stop - start, slice_elements):
                    flats[i][start + a:start + b].add_(z[a:b].mul_(1e-30))
        return run

    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        m = timed({"64K": one_pass(1 << 16), "serial": one_pass(zo.SERIAL_ELEMENTS)}, reps)
        out.append(f"| {threads} | {m['64K'] / n * 1e9:.1f} | {m['serial'] / n * 1e9:.1f} |")
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--threads-table", action="store_true", help="also time a client pass at 1 and 2 threads")
    ap.add_argument("--steps-only", action="store_true", help="only table 1 (server step / 2P forwards)")
    ap.add_argument("--pricing-only", action="store_true", help="skip table 1: only tables 2-4 (pricing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} clock={'thread CPU' if args.threads == 1 else 'wall'} reps={args.reps} "
          f"time.zo_rng_flops_per_element={ZO_RNG_FLOPS_PER_ELEMENT:g} "
          f"time.zo_elementwise_flops_per_element={ZO_ELEMENTWISE_FLOPS_PER_ELEMENT:g}\n")
    if not args.pricing_only:
        print("| model | batch | P | regenerating step / 2P forwards (before) | kept step / 2P forwards (after) |")
        print("|---|---:|---:|---:|---:|")
        server_step_table(args.reps)
    if args.steps_only:
        _results()
        return
    print("\n| model | side | charged ZO/FO | measured ZO/FO | charged / measured |")
    print("|---|---|---:|---:|---:|")
    rows = pricing_table(args.reps)  # prints the charged/measured rows as they are measured
    print("\n".join(rows[rows.index(""):]))
    if args.threads_table:
        print("\nOne in-place pass of the client path, ns per element:\n")
        print("| threads | ops on 64K slices (before) | ops on SERIAL_ELEMENTS slices (after) |")
        print("|---:|---:|---:|")
        threads_table(args.reps)
        torch.set_num_threads(args.threads)
    _results()


def _results() -> None:
    """The figures benchmarks/all.py collects: the worst case of each table."""
    if RATIOS.get("step"):
        print(f"RESULT zo.server_step_vs_2p_forwards_max = {max(RATIOS['step']):.3f}  kept-direction server ZO step / "
              f"its 2P forwards, worst of {len(RATIOS['step'])} model/batch/P cases")
    if RATIOS.get("pricing"):
        print(f"RESULT zo.charged_vs_measured_min = {min(RATIOS['pricing']):.3f}  charged / measured ZO-vs-FO ratio, "
              f"lowest of {len(RATIOS['pricing'])} (model, side) cases")
        print(f"RESULT zo.charged_vs_measured_max = {max(RATIOS['pricing']):.3f}  the same, highest")


if __name__ == "__main__":
    main()
