"""Engine: a golden SplitFed timeline with hand-computed times, server contention, stop rules."""
from __future__ import annotations

import pytest
import simpy

from simulator.engine import Simulation
from simulator.latency import build_time_model
from simulator.runner import run_scenario
from simulator.scenario import validate
from simulator.trace import Recorder

# MLP on 8x8 digits, cut 1: client = flatten + Linear(64->128) + ReLU; server = Linear(128->64),
# ReLU, Linear(64->10). Batch B = 16. FlopCounterMode counts matmuls only:
#   client forward  = 2*16*64*128                  = 262,144 FLOPs
#   client backward = weight grad only (no dL/dx)  = 262,144
#   server forward  = 2*16*128*64 + 2*16*64*10     = 282,624
#   server backward = 2 x forward (weights + input) = 565,248  -> a server step = 847,872
#   client part = 64*128 + 128 = 8,320 params; server part = 128*64 + 64 + 64*10 + 10 = 8,906
CLIENT_FWD = 262_144
SERVER_STEP = 847_872


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
    assert prof.client_backward_flops == CLIENT_FWD
    assert prof.server_forward_flops + prof.server_backward_flops == SERVER_STEP
    assert prof.client_params == 8_320 and prof.server_params == 8_906


def test_golden_timeline_v1_with_server_contention():
    """SplitFed V1, 2 clients, 1 step, a 1-slot server: every span matches hand arithmetic."""
    r = run_scenario(golden())
    ap = pytest.approx
    # client 0: model_down 0->0.5, forward 0.5->1.5, uplink 1.5->2.0, server 2.0->3.0,
    #           downlink 3.0->3.5, backward 3.5->4.5, model_up 4.5->5.0
    assert _spans(r, 0, "client_forward") == [ap((0.5, 1.5, 0.0))]
    assert _spans(r, 0, "server_step") == [ap((2.0, 3.0, 0.0))]
    assert _spans(r, 0, "model_up") == [ap((4.5, 5.0, 0.0))]
    # client 1: forward 0.5->2.0, uplink 2.0->2.5, WAITS for the server 2.5->3.0 (client 0's
    #           step), server 3.0->4.0, downlink 4.0->4.5, backward 4.5->6.0, model_up 6.0->6.5
    assert _spans(r, 1, "client_forward") == [ap((0.5, 2.0, 0.0))]
    assert _spans(r, 1, "server_step") == [ap((3.0, 4.0, 0.5))]
    assert _spans(r, 1, "client_backward") == [ap((4.5, 6.0, 0.0))]
    assert _spans(r, 1, "model_up") == [ap((6.0, 6.5, 0.0))]
    # Round end: both averages start at 6.5. Fed Server: 2*8320*(2+1) = 49,920 FLOPs -> 0.058877 s;
    # Split Server: 2*8906*3 = 53,436 FLOPs -> 0.063023 s. The round ends at 6.5 + 0.063023.
    end = 6.5 + 53_436 / SERVER_STEP
    assert r.summary["sim_time_s"] == ap(end)
    assert r.recorder.metrics[-1]["sim_time_s"] == ap(end)
    assert r.recorder.metrics[-1]["round"] == 1
    # server busy: 2.0->4.0 and 6.5->end
    assert r.summary["server_busy_s"] == ap(2.0 + 53_436 / SERVER_STEP)


def test_golden_timeline_unlimited_server():
    """With an unlimited server nobody waits: client 1's step runs 2.5->3.5 and the round is shorter."""
    r = run_scenario(golden(capacity=None))
    assert _spans(r, 1, "server_step") == [pytest.approx((2.5, 3.5, 0.0))]
    # downlink 3.5->4.0, backward 4.0->5.5, model_up 5.5->6.0, server average +0.063023
    assert r.summary["sim_time_s"] == pytest.approx(6.0 + 53_436 / SERVER_STEP)


def test_golden_timeline_v2_has_no_server_average():
    """SplitFed V2 keeps one server model: the round ends after the Fed Server's average only."""
    r = run_scenario(golden(name="splitfed_v2"))
    assert not _spans(r, None, "aggregate_server")
    assert r.summary["sim_time_s"] == pytest.approx(6.5 + 49_920 / SERVER_STEP)


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
