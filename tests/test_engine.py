"""Engine: a golden SplitFed timeline with hand-computed times, server contention, stop rules."""
from __future__ import annotations

import copy
import json

import pytest
import simpy

from simulator.engine import ReferenceSimulation, Simulation
from simulator.latency import build_time_model
from simulator.runner import run_scenario
from simulator.rundir import HOST_TIME_FIELDS
from simulator.scenario import validate
from simulator.trace import Recorder

# MLP on 8x8 digits, cut 1: client = flatten + Linear(64->128) + ReLU; server = Linear(128->64),
# ReLU, Linear(64->10). Batch B = 16. FlopCounterMode's matmuls, plus ReLU priced per element
# (models.profile.NON_MATMUL_FLOPS: 30 forward, 20 backward; since 2026-12-02, which made the
# client backward shorter than the forward, hence BWD below instead of 1.0 s):
#   client forward  = 2*16*64*128 + 30*16*128                 = 323,584 FLOP-eq
#   client backward = weight grad only (no dL/dx) + 20*16*128 = 303,104
#   server forward  = 2*16*128*64 + 2*16*64*10 + 30*16*64     = 313,344
#   server backward = 2 x matmuls (weights + input) + 20*16*64 = 585,728 -> a server step = 899,072
#   client part = 64*128 + 128 = 8,320 params; server part = 128*64 + 64 + 64*10 + 10 = 8,906
CLIENT_FWD = 323_584
CLIENT_BWD = 303_104
SERVER_STEP = 899_072
BWD = CLIENT_BWD / CLIENT_FWD  # client 0's backward: 0.93671... s


def golden(capacity=1, name="splitfed_v1"):
    return validate({
        "name": "golden", "seed": 0, "threads": 1,
        "data": {"dataset": "digits", "num_clients": 2},
        "model": {"name": "mlp", "cut": 1},
        "algorithm": {"name": name, "batch_size": 16, "local_steps": 1},
        "time": {
            # client 0 computes a batch forward in 1.0 s; client 1 (speed x 2/3) in 1.5 s
            "client": {"flops_per_s": CLIENT_FWD, "delay_s": 0,
                       "tiers": [{"name": "slower", "clients": [1], "speed_factor": 2 / 3}]},
            # one server step = 1.0 s
            "server": {"flops_per_s": SERVER_STEP, "capacity": capacity},
            # every message: 0.5 s latency, bandwidth so large that bytes cost ~1e-10 s
            "network": {"uplink": {"bandwidth_mbps": 1e9, "latency_s": 0.5},
                        "downlink": {"bandwidth_mbps": 1e9, "latency_s": 0.5}},
        },
        "eval": {"every_rounds": 1},
        "stop": {"rounds": 1},
    })


def _spans(result, client, kind):
    return [(e.start_s, e.end_s, e.wait_s) for e in result.recorder.events if e.client == client and e.kind == kind]


def test_profile_matches_the_hand_arithmetic():
    """The measured MLP profile is what the golden timeline's comments assume."""
    from models.profile import profile_cut
    from models.split import split
    from models.zoo import build_model

    prof = profile_cut(split(build_model("mlp", 1, 10, (8, 8), seed=0), 1), (1, 8, 8), 16)
    assert prof.client_forward_flops == CLIENT_FWD
    assert prof.client_backward_flops == CLIENT_BWD
    assert prof.server_forward_flops + prof.server_backward_flops == SERVER_STEP
    assert prof.client_params == 8_320 and prof.server_params == 8_906


def test_golden_timeline_v1_with_server_contention():
    """SplitFed V1, 2 clients, 1 step, a 1-slot server: every span matches hand arithmetic."""
    r = run_scenario(golden())
    ap = pytest.approx
    # client 0: model_down 0->0.5, forward 0.5->1.5, uplink 1.5->2.0, server 2.0->3.0,
    #           downlink 3.0->3.5, backward 3.5->3.5+BWD, model_up ->4.0+BWD
    assert _spans(r, 0, "client_forward") == [ap((0.5, 1.5, 0.0))]
    assert _spans(r, 0, "server_step") == [ap((2.0, 3.0, 0.0))]
    assert _spans(r, 0, "model_up") == [ap((3.5 + BWD, 4.0 + BWD, 0.0))]
    # client 1: forward 0.5->2.0, uplink 2.0->2.5, WAITS for the server 2.5->3.0 (client 0's
    #           step), server 3.0->4.0, downlink 4.0->4.5, backward 4.5->4.5+1.5*BWD, model_up +0.5
    assert _spans(r, 1, "client_forward") == [ap((0.5, 2.0, 0.0))]
    assert _spans(r, 1, "server_step") == [ap((3.0, 4.0, 0.5))]
    assert _spans(r, 1, "client_backward") == [ap((4.5, 4.5 + 1.5 * BWD, 0.0))]
    last_up = 5.0 + 1.5 * BWD  # 6.40506...
    assert _spans(r, 1, "model_up") == [ap((4.5 + 1.5 * BWD, last_up, 0.0))]
    # Round end: both averages start at last_up. Fed Server: 2*8320*(2+1) = 49,920 FLOPs;
    # Split Server: 2*8906*3 = 53,436 FLOPs, the longer: the round ends at last_up + 53,436 / SERVER_STEP.
    end = last_up + 53_436 / SERVER_STEP
    assert r.summary["sim_time_s"] == ap(end)
    assert r.recorder.metrics[-1]["sim_time_s"] == ap(end)
    assert r.recorder.metrics[-1]["round"] == 1
    # server busy: 2.0->4.0 and 6.5->end
    assert r.summary["server_busy_s"] == ap(2.0 + 53_436 / SERVER_STEP)


def test_golden_timeline_unlimited_server():
    """With an unlimited server nobody waits: client 1's step runs 2.5->3.5 and the round is shorter."""
    r = run_scenario(golden(capacity=None))
    assert _spans(r, 1, "server_step") == [pytest.approx((2.5, 3.5, 0.0))]
    # downlink 3.5->4.0, backward 4.0->4.0+1.5*BWD, model_up +0.5, Split Server average
    assert r.summary["sim_time_s"] == pytest.approx(4.5 + 1.5 * BWD + 53_436 / SERVER_STEP)


def test_golden_timeline_v2_has_no_server_average():
    """SplitFed V2 keeps one server model: the round ends after the Fed Server's average only."""
    r = run_scenario(golden(name="splitfed_v2"))
    assert not _spans(r, None, "aggregate_server")
    assert r.summary["sim_time_s"] == pytest.approx(5.0 + 1.5 * BWD + 49_920 / SERVER_STEP)


def test_v2_server_steps_follow_arrival_order():
    """In V2 the real server steps happen in simulated arrival order (client 0 first here)."""
    r = run_scenario(golden(name="splitfed_v2"))
    steps = [(e.start_s, e.client) for e in r.recorder.events if e.kind == "server_step"]
    assert [c for _, c in sorted(steps)] == [0, 1]


def test_charge_records_exactly_what_it_charges(tiny_raw):
    """Every charge is one span; sequence numbers count per (client, category)."""
    s = validate(tiny_raw)
    rec = Recorder()
    sim = Simulation(build_time_model(s.time, 4, 0), rec, 1)

    def proc():
        yield from sim.compute(0, "a", 1e6)
        yield from sim.compute(0, "b", 1e6)
        yield from sim.send(0, "uplink", "m", 1000)
        yield from sim.serve("s", 1e6, 0)

    sim.env.process(proc())
    sim.env.run()
    kinds = [(e.client, e.kind, e.seq) for e in rec.events]
    assert kinds == [(0, "a", 0), (0, "b", 1), (0, "m", 0), (0, "s", 0)]
    assert rec.events[-1].end_s == pytest.approx(sim.now)
    with pytest.raises(ValueError):
        next(sim.send(0, "sideways", "m", 1))


def test_stop_reason_first_wins(tiny_raw):
    """sim.stop keeps the first reason."""
    s = validate(tiny_raw)
    sim = Simulation(build_time_model(s.time, 4, 0), Recorder(), None)
    sim.stop("a")
    sim.stop("b")
    assert sim.stop_reason == "a" and sim.stopping
    assert isinstance(sim.env, simpy.Environment)


# --------------------------------------------------------------------------------------------
# The fast charge path against its plain-reading specification (ReferenceSimulation)
# --------------------------------------------------------------------------------------------
_TRACE = "client,start_s,end_s,speed_factor,bandwidth_mbps\n0,0,3,0.5,\n1,1,6,,0.5\n2,0.5,,2,\n"
_GAS = {"name": "gas", "batch_size": 16, "active_clients": 2, "local_steps": 2, "activation_buffer": 2,
        "model_buffer": 2, "lr_client": 0.05, "lr_server": 0.05}
_TIES = {"algorithm": {"name": "mu_splitfed", "batch_size": 16, "local_steps": 2, "tau": 2,
                       "client_optimizer": "zo", "server_optimizer": "fo", "zo": {"perturbations": 2}},
         "time.client.flops_per_s": 2.0e6, "time.client.delay_s": 0, "time.server.capacity": 2}
_SCENARIOS = {
    # stragglers: a slowdown, a bandwidth drop and an outage, drawn per-client bandwidths
    "episodes": {"time.episodes": [
        {"kind": "slowdown", "clients": [0, 2], "factor": 3, "start_s": 0.2, "end_s": 4},
        {"kind": "bandwidth", "clients": [1], "bandwidth_mbps": 0.2, "direction": "both", "start_s": 0.1},
        {"kind": "unreachable", "clients": [3], "start_s": 0.3, "end_s": 1.5}],
        "time.network": {"uplink": {"bandwidth_mbps": 5, "latency_s": 0.01},
                         "downlink": {"bandwidth_mbps": {"dist": "uniform", "low": 2, "high": 9}, "latency_s": 0.02}}},
    "tiers": {"time.client.tiers": [{"name": "slow", "share": 0.5, "speed_factor": 0.25},
                                    {"name": "fast", "clients": [3], "speed_factor": 3}]},
    "trace": {"time.trace_csv": "TRACE"},
    "v2_capacity_2": {"algorithm.name": "splitfed_v2", "time.server.capacity": 2},
    "unlimited_server": {"time.server.capacity": None},
    "gas": {"algorithm": _GAS},
    "mu_splitfed_zo": {"algorithm": {"name": "mu_splitfed", "batch_size": 16, "local_steps": 2, "tau": 2,
                                     "client_optimizer": "zo", "server_optimizer": "zo", "zo": {"perturbations": 2}},
                       "time.zo_rng_flops_per_element": 3.0},
    "mu_splitfed_adaptive": {"algorithm": {"name": "mu_splitfed", "batch_size": 16, "local_steps": 2,
                                           "tau": "adaptive", "tau_max": 4},
                             "time.episodes": [{"kind": "slowdown", "clients": [1], "factor": 5}],
                             "time.client.delay_s": {"dist": "lognormal", "median": 0.05, "sigma": 0.5}},
    "eval_by_sim_time": {"eval": {"every_sim_s": 0.7}, "stop": {"sim_time_s": 3.0, "rounds": None}},
    # Identical clients, no delays: equal-time events everywhere, so the event loop, the server's
    # and the uplinks' slot pools must keep SimPy's order of equal-time events exactly.
    "ties": _TIES,
    "ties_timing_only": {**_TIES, "timing_only": True},
    "ties_gas_timing_only": {"algorithm": {**_GAS, "covariance": "diagonal"}, "time.client.flops_per_s": 2.0e6,
                             "time.client.delay_s": 0, "timing_only": True},
}


def _with(raw: dict, changes: dict, trace_path) -> dict:
    raw = copy.deepcopy(raw)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        d = raw
        for p in path:
            d = d.setdefault(p, {})
        d[last] = str(trace_path) if value == "TRACE" else value
    return raw


def _outputs(folder) -> dict:
    """Every CSV of a run folder as bytes, and summary.json without its host-time field."""
    out = {p.name: p.read_bytes() for p in sorted(folder.glob("*.csv"))}
    summary = json.loads((folder / "summary.json").read_text())
    for k in HOST_TIME_FIELDS:
        summary.pop(k)
    out["summary.json"] = summary
    return out


@pytest.mark.parametrize("name", sorted(_SCENARIOS))
def test_fast_charge_path_writes_what_the_reference_writes(name, tiny_raw, tmp_path, monkeypatch):
    """events.csv, metrics.csv, the algorithm tables and summary.json (host time aside) are the
    same bytes whether the run charges through Simulation or through ReferenceSimulation."""
    import simulator.runner as runner_mod

    trace = tmp_path / "trace.csv"
    trace.write_text(_TRACE)
    s = validate(_with(tiny_raw, _SCENARIOS[name], trace))
    run_scenario(s, tmp_path / "fast")
    monkeypatch.setattr(runner_mod, "Simulation", ReferenceSimulation)
    run_scenario(s, tmp_path / "reference")
    fast, ref = _outputs(tmp_path / "fast"), _outputs(tmp_path / "reference")
    assert fast.keys() == ref.keys() and {"events.csv", "metrics.csv"} <= fast.keys()
    for f in fast:
        assert fast[f] == ref[f], f"{name}: {f} differs between the fast and the reference charge path"
    assert fast["events.csv"].count(b"\n") > 20


def test_reference_simulation_is_a_different_code_path(tiny_raw, monkeypatch):
    """The comparison above can fail: a fast path that prices differently is caught."""
    import simulator.latency as L

    s = validate(tiny_raw)
    fast = run_scenario(s).recorder.events_csv_text()
    real = L._pricer

    def off_by_a_bit(category, model):
        price = real(category, model)
        return lambda *a: price(*a) * (1 + 1e-15) if category == L.CLIENT_COMPUTE else price(*a)

    monkeypatch.setattr(L, "_pricer", off_by_a_bit)
    assert run_scenario(s).recorder.events_csv_text() != fast


def test_events_are_on_disk_at_every_round_end(tiny_raw, tmp_path, monkeypatch):
    """Crash safety: when a round ends, events.csv on disk holds every span recorded so far
    (and, streamed, nothing is left in memory); they are the spans of the same run kept in memory."""
    import simulator.runner as runner_mod
    from simulator.trace import EVENT_COLUMNS

    seen = []
    original = runner_mod._Controller.on_round

    def on_round(self, r):
        original(self, r)
        rec = self.sim.recorder
        rows = (rec.out_dir / "events.csv").read_text().splitlines()  # the folder the run writes into
        assert rows[0] == ",".join(EVENT_COLUMNS)
        seen.append((rows[1:], rec.event_count, len(rec._spans)))

    monkeypatch.setattr(runner_mod._Controller, "on_round", on_round)
    scenario = validate({**tiny_raw, "stop": {"rounds": 3}})
    run_scenario(scenario, tmp_path / "run")
    monkeypatch.undo()
    kept = run_scenario(scenario).recorder.events_csv_text().splitlines()[1:]
    assert len(seen) == 3
    for on_disk, count, in_memory in seen:
        assert on_disk == kept[:count] and count > 0 and in_memory == 0
    assert seen[-1][1] == len(kept)


def _slot_trace(make_pool, seed: int) -> list:
    """Grant and release times of a random request pattern with many equal-time events."""
    import random

    rnd = random.Random(seed)
    env = simpy.Environment()
    pools = [make_pool(env, cap) for cap in (1, 2, 3)]
    log = []

    def user(i):
        for j in range(4):
            yield env.timeout(rnd.choice((0, 0, 1, 2)))
            pool = rnd.choice(pools)
            with pool.request() as req:
                yield req
                log.append((env.now, "granted", i, j))
                yield env.timeout(rnd.choice((0, 1, 1, 3)))
            log.append((env.now, "released", i, j))
            if rnd.random() < 0.3:  # a request given up before it is granted (or just after)
                with pool.request():
                    yield env.timeout(rnd.choice((0, 1)))
                log.append((env.now, "gave up", i, j))

    for i in range(12):
        env.process(user(i))
    env.run()
    return log


@pytest.mark.parametrize("seed", range(20))
def test_slots_grant_in_simpy_resource_order(seed):
    """Slots (the run's server and uplinks) schedules what simpy.Resource schedules: the same
    grants at the same times in the same order, equal-time events included."""
    from simulator.engine import Slots

    ref = _slot_trace(lambda env, cap: simpy.Resource(env, capacity=cap), seed)
    fast = _slot_trace(Slots, seed)
    assert len(ref) > 50 and fast == ref


def test_the_run_loop_restores_the_garbage_collector(tiny_raw):
    """Simulation.run raises the collector's threshold and freezes older objects only while
    the event loop runs."""
    import gc

    before = gc.get_threshold(), gc.get_freeze_count()
    run_scenario(validate(tiny_raw))
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
