"""Latency models: the price, in simulated seconds, of one operation.

A latency model sees an ``Op`` record (who, what kind, FLOPs, bytes, sequence number) and the
current simulated time, and returns a duration. It never sees tensors and never advances the
clock (the engine does that). Base models price one category of work; modifiers wrap any model
and change its answer inside a time window (slowdowns, outages, bandwidth drops, trace tables).
All random values come from keyed generators (stream ``time``), so every algorithm run on the
same scenario and seed sees the same device speeds and the same k-th delay of each client.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Protocol, Sequence

import numpy as np

from simulator import rng
from simulator.config import (
    MAX_NUMBER, MIN_BANDWIDTH_MBPS, MIN_FLOPS_PER_S, Distribution, Exponential, LogNormal, ShiftedExponential, Uniform,
    as_distribution,
)
from simulator.errors import CostError, ScenarioError

#: Operation categories. ``category_of(kind)`` maps every op kind to one of these.
CLIENT_COMPUTE = "client_compute"
SERVER_COMPUTE = "server_compute"
UPLINK = "uplink"
DOWNLINK = "downlink"


class Op(NamedTuple):
    """One priced operation. ``seq`` is the k-th op of this (client, category).

    Immutable, read by name. A NamedTuple rather than a frozen dataclass: the engine builds one
    per operation on the generic pricing path, and a tuple costs a quarter of the time.
    """

    category: str  # client_compute | server_compute | uplink | downlink
    kind: str  # e.g. client_forward, server_step, activation, model_down, aggregate
    client: Optional[int] = None
    flops: float = 0.0
    nbytes: int = 0
    seq: int = 0
    round: Optional[int] = None
    rng_elements: int = 0  # random numbers a ZO direction regenerates in this op (priced per element)


class LatencyModel(Protocol):
    """Anything with ``duration(op, now) -> seconds``."""

    def duration(self, op: Op, now: float) -> float: ...


# --------------------------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------------------------
#: Delays are drawn in blocks: the k-th delay of client c is element k % DELAY_BLOCK of the
#: block drawn from the generator keyed (seed, "time", "delay", c, k // DELAY_BLOCK). Still a
#: pure function of (seed, c, k), but one generator per block instead of one per operation.
DELAY_BLOCK = 256


def draw_block(dist: Distribution, g: np.random.Generator, n: int) -> list[float]:
    """``[dist.sample(g) for _ in range(n)]``, the same floats, in one numpy call where the
    distribution allows it: numpy draws a vector of exponential, uniform or lognormal values
    from the same stream positions as n scalar draws (``tests/test_latency.py`` checks each
    family). The truncated normal redraws non-positive values, so it stays one draw at a time.
    """
    if isinstance(dist, Exponential):
        return g.exponential(dist.mean_, n).tolist()
    if isinstance(dist, ShiftedExponential):
        return (dist.shift + g.exponential(dist.mean_, n)).tolist()
    if isinstance(dist, Uniform):
        return g.uniform(dist.low, dist.high, n).tolist()
    if isinstance(dist, LogNormal):
        return g.lognormal(np.log(dist.median), dist.sigma, n).tolist()
    return [dist.sample(g) for _ in range(n)]


@dataclass
class ClientCompute:
    """FLOPs / device speed, plus a random delay drawn per operation.

    ``speeds[c]`` is client c's FLOP/s. The k-th delay of client c depends only on
    (seed, c, k) (see ``DELAY_BLOCK``), whatever algorithm asks for it.
    """

    speeds: Sequence[float]
    delay: Distribution
    seed: int
    rng_flops_per_element: float = 0.0  # FLOP-equivalents of one regenerated direction element
    _blocks: dict = field(default_factory=dict, repr=False, compare=False)

    def delay_of(self, client: int, k: int) -> float:
        """The k-th random delay of ``client`` (seconds)."""
        block, i = divmod(k, DELAY_BLOCK)
        cached = self._blocks.get(client)
        if cached is None or cached[0] != block:
            g = rng.generator(self.seed, "time", "delay", client, block)
            cached = (block, draw_block(self.delay, g, DELAY_BLOCK))
            self._blocks[client] = cached
        return cached[1][i]

    def duration(self, op: Op, now: float) -> float:
        speed = self.speeds[op.client]
        if not speed > 0:
            raise CostError(f"client {op.client} has device speed {speed} FLOP/s; cannot price {op.kind}")
        d = (op.flops + op.rng_elements * self.rng_flops_per_element) / speed
        if not _is_zero(self.delay):
            d += self.delay_of(op.client, op.seq)
        return d


@dataclass
class ServerCompute:
    """FLOPs / server speed (queueing for a free slot is the engine's job, not priced here)."""

    flops_per_s: float
    rng_flops_per_element: float = 0.0  # FLOP-equivalents of one regenerated direction element

    def duration(self, op: Op, now: float) -> float:
        if not self.flops_per_s > 0:
            raise CostError(f"server speed is {self.flops_per_s} FLOP/s; cannot price {op.kind}")
        return (op.flops + op.rng_elements * self.rng_flops_per_element) / self.flops_per_s


@dataclass
class Link:
    """latency_s + 8 * bytes / bandwidth_bps, per client, for one direction."""

    bandwidth_bps: Sequence[float]
    latency_s: Sequence[float]

    def duration(self, op: Op, now: float) -> float:
        bw = self.bandwidth_bps[op.client]
        if not bw > 0:
            raise CostError(f"client {op.client} has bandwidth {bw} bit/s; cannot price {op.kind}")
        return self.latency_s[op.client] + 8.0 * op.nbytes / bw


# --------------------------------------------------------------------------------------------
# Modifiers: wrap any model, act on some clients inside [start_s, end_s)
# --------------------------------------------------------------------------------------------
@dataclass
class Slowdown:
    """Operations of ``clients`` that START inside the window take ``factor`` times longer."""

    base: LatencyModel
    clients: frozenset
    factor: float
    start_s: float = 0.0
    end_s: float = math.inf

    def duration(self, op: Op, now: float) -> float:
        d = self.base.duration(op, now)
        if op.client in self.clients and self.start_s <= now < self.end_s:
            d *= self.factor
        return d


@dataclass
class Unreachable:
    """A message of ``clients`` that starts inside the window waits for its end, then goes."""

    base: LatencyModel
    clients: frozenset
    start_s: float
    end_s: float

    def duration(self, op: Op, now: float) -> float:
        if op.client in self.clients and self.start_s <= now < self.end_s:
            return (self.end_s - now) + self.base.duration(op, self.end_s)
        return self.base.duration(op, now)


@dataclass
class BandwidthChange:
    """Inside the window, messages of ``clients`` use ``bandwidth_bps`` (latency unchanged).

    Changes stack: a later one wraps an earlier one and wins where their windows overlap.
    """

    base: LatencyModel
    clients: frozenset
    bandwidth_bps: float
    latency_s: Sequence[float]
    start_s: float = 0.0
    end_s: float = math.inf

    def duration(self, op: Op, now: float) -> float:
        if op.client in self.clients and self.start_s <= now < self.end_s:
            return self.latency_s[op.client] + 8.0 * op.nbytes / self.bandwidth_bps
        return self.base.duration(op, now)


@dataclass
class TraceSpeed:
    """Measured device behaviour: compute of a client inside a trace row's window is divided
    by the row's ``speed_factor``. ``rows`` holds (client, start_s, end_s, speed_factor)."""

    base: LatencyModel
    rows: list = field(default_factory=list)

    def duration(self, op: Op, now: float) -> float:
        d = self.base.duration(op, now)
        for c, start, end, factor in self.rows:
            if c == op.client and start <= now < end:
                return d / factor
        return d


@dataclass
class TraceBandwidth:
    """Measured network: inside a trace row's window a client's messages use the row's
    bandwidth. ``rows`` holds (client, start_s, end_s, bandwidth_bps)."""

    base: LatencyModel
    rows: list
    latency_s: Sequence[float]

    def duration(self, op: Op, now: float) -> float:
        for c, start, end, bps in self.rows:
            if c == op.client and start <= now < end:
                return self.latency_s[op.client] + 8.0 * op.nbytes / bps
        return self.base.duration(op, now)


#: Registry of latency models; the contract test runs every entry.
LATENCY_MODELS = {
    "client_compute": ClientCompute,
    "server_compute": ServerCompute,
    "link": Link,
    "slowdown": Slowdown,
    "unreachable": Unreachable,
    "bandwidth_change": BandwidthChange,
    "trace_speed": TraceSpeed,
    "trace_bandwidth": TraceBandwidth,
}


def _is_zero(d) -> bool:
    return getattr(d, "dist", None) == "constant" and d.value == 0


# --------------------------------------------------------------------------------------------
# Building the time model of a scenario
# --------------------------------------------------------------------------------------------
@dataclass
class TimeModel:
    """One latency model per category, plus what was drawn (for the run's summary)."""

    models: dict
    client_speeds: list
    uplink_bps: list
    downlink_bps: list
    tiers: list

    def duration(self, op: Op, now: float) -> float:
        d = self.models[op.category].duration(op, now)
        if not (d >= 0 and math.isfinite(d)):
            raise _bad_duration(op.kind, op.client, d)
        return d

    def pricer(self, category: str) -> "Pricer":
        """A function ``(kind, client, flops, nbytes, seq, round, rng_elements, now) -> seconds``
        that returns exactly (bit for bit) what ``duration(Op(category, ...), now)`` returns.

        The engine's hot path: where the category's model is a bare base model (no episode, no
        trace wraps it) the formula is evaluated on constants taken from the model now, with
        no ``Op`` built and no call through the model. Anything else (modifiers, a speed or
        bandwidth that is not positive, whose ``CostError`` the model raises) goes through
        ``model.duration(Op(...), now)``. The model must not change after this is called.
        """
        return _pricer(category, self.models[category])


#: The engine's pricing function for one category (see ``TimeModel.pricer``).
Pricer = Callable[[str, Optional[int], float, int, int, Optional[int], int, float], float]


def _bad_duration(kind: str, client: Optional[int], d: float) -> CostError:
    return CostError(f"{kind} of client {client} priced at {d!r} s; durations must be finite and >= 0")


def _pricer(category: str, model: LatencyModel) -> Pricer:
    """``TimeModel.pricer`` for one model: each branch is the model's ``duration`` formula,
    written with the same operations in the same order, so the floats are identical (the
    test suite checks this on random operations against the generic path)."""
    inf = math.inf
    kind_of = type(model)
    if kind_of is ClientCompute and all(s > 0 for s in model.speeds):
        speeds, rfe = tuple(model.speeds), model.rng_flops_per_element
        if _is_zero(model.delay):
            def price(kind, client, flops, nbytes, seq, round, rng_elements, now):
                d = (flops + rng_elements * rfe) / speeds[client]
                if d >= 0 and d < inf:  # for d >= 0, d < inf is math.isfinite(d); NaN fails d >= 0
                    return d
                raise _bad_duration(kind, client, d)
            return price
        blocks, delay_of = model._blocks, model.delay_of

        def price(kind, client, flops, nbytes, seq, round, rng_elements, now):
            d = (flops + rng_elements * rfe) / speeds[client]
            block, i = divmod(seq, DELAY_BLOCK)
            cached = blocks.get(client)  # the block cache of ClientCompute.delay_of, inlined
            d += cached[1][i] if cached is not None and cached[0] == block else delay_of(client, seq)
            if d >= 0 and d < inf:
                return d
            raise _bad_duration(kind, client, d)
        return price
    if kind_of is ServerCompute and model.flops_per_s > 0:
        fps, rfe = model.flops_per_s, model.rng_flops_per_element

        def price(kind, client, flops, nbytes, seq, round, rng_elements, now):
            d = (flops + rng_elements * rfe) / fps
            if d >= 0 and d < inf:
                return d
            raise _bad_duration(kind, client, d)
        return price
    if kind_of is Link and all(b > 0 for b in model.bandwidth_bps):
        bw, lat = tuple(model.bandwidth_bps), tuple(model.latency_s)

        def price(kind, client, flops, nbytes, seq, round, rng_elements, now):
            d = lat[client] + 8.0 * nbytes / bw[client]
            if d >= 0 and d < inf:
                return d
            raise _bad_duration(kind, client, d)
        return price
    duration = model.duration

    def price(kind, client, flops, nbytes, seq, round, rng_elements, now):
        d = duration(Op(category, kind, client, flops, nbytes, seq, round, rng_elements), now)
        if d >= 0 and d < inf:
            return d
        raise _bad_duration(kind, client, d)
    return price


def draw_client_speeds(time_cfg, num_clients: int, seed: int) -> tuple[list[float], list[str]]:
    """Device FLOP/s per client: a draw per client, times its tier's speed factor."""
    dist = _speed_distribution(time_cfg)
    speeds = [dist.sample(rng.generator(seed, "time", "speed", c)) for c in range(num_clients)]
    tier_of = assign_tiers(time_cfg.client.tiers, num_clients, seed)
    factors = {t.name: t.speed_factor for t in time_cfg.client.tiers}
    out = [s * factors.get(tier_of[c], 1.0) for c, s in enumerate(speeds)]
    return out, tier_of


def assign_tiers(tiers, num_clients: int, seed: int) -> list[str]:
    """Tier name per client ('' = no tier). Explicit client lists first; shares fill the rest.

    Shares become counts by largest remainder over ALL clients; which clients get them is a
    keyed permutation (seed, "time", "tiers"), so it is the same for every algorithm.
    """
    tier_of = [""] * num_clients
    for t in tiers:
        for c in t.clients or []:
            tier_of[c] = t.name
    share_tiers = [t for t in tiers if t.share is not None]
    if share_tiers:
        raw = np.array([t.share * num_clients for t in share_tiers])
        counts = np.floor(raw).astype(int)
        remainders = raw - counts
        budget = int(round(sum(t.share for t in share_tiers) * num_clients)) - counts.sum()
        for i in np.argsort(-remainders, kind="stable")[: max(0, budget)]:
            counts[i] += 1
        free = [c for c in rng.generator(seed, "time", "tiers").permutation(num_clients) if tier_of[c] == ""]
        pos = 0
        for t, n in zip(share_tiers, counts):
            for c in free[pos : pos + n]:
                tier_of[int(c)] = t.name
            pos += n
    return tier_of


def _per_client(value, num_clients: int, seed: int, what: str) -> list[float]:
    dist = as_distribution(value)
    return [dist.sample(rng.generator(seed, "time", what, c)) for c in range(num_clients)]


#: The columns a trace CSV may have: the first three always, then one or both of the last two.
TRACE_COLUMNS = ("client", "start_s", "end_s", "speed_factor", "bandwidth_mbps")


def read_trace_csv(path: str, num_clients: int, speeds: Optional[Sequence[float]] = None) -> list[tuple]:
    """Rows (client, start_s, end_s, speed_factor, bandwidth_bps) from a trace CSV.

    Strict, so that no row is lost and none is misread: UTF-8 text; a header of
    ``TRACE_COLUMNS`` names (client, start_s, end_s and at least one of speed_factor,
    bandwidth_mbps; nothing else, none twice); every row as many cells as the header;
    ``client`` an integer in [0, num_clients); times finite, ``0 <= start_s < end_s`` (an
    empty end_s: until the run ends); factors finite and > 0, bandwidths at least
    MIN_BANDWIDTH_MBPS; a row sets speed_factor or bandwidth_mbps (or both). Blank lines are
    skipped. With the clients' device ``speeds``, a speed_factor must also leave the device
    at least MIN_FLOPS_PER_S. The first bad cell is a ScenarioError on ``time.trace_csv``
    naming the file, the line and the column. speed_factor or bandwidth is NaN in a row that
    leaves it empty.
    """
    key = "time.trace_csv"
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(key, f"file not found: {p}" + (" (relative paths are read from the working folder "
                                                          f"{Path.cwd()})" if not p.is_absolute() else ""))
    try:
        data = p.read_bytes()
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ScenarioError(key, f"{p} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    except OSError as e:
        raise ScenarioError(key, f"{p}: cannot read ({e.strerror})") from None

    def bad(line: int, column: str | None, what: str) -> ScenarioError:
        where = f"{p} line {line}" + (f", column {column}" if column else "")
        return ScenarioError(key, f"{where}: {what}")

    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise bad(1, None, f"empty file; expected a header {','.join(TRACE_COLUMNS)}")
        header = [h.strip() for h in header]
        for h in header:
            if h not in TRACE_COLUMNS:
                raise bad(1, h or "(empty)", f"unknown column; expected client, start_s, end_s and speed_factor "
                                             f"and/or bandwidth_mbps")
            if header.count(h) > 1:
                raise bad(1, h, "column appears twice")
        missing = [c for c in TRACE_COLUMNS[:3] if c not in header]
        if missing or not {"speed_factor", "bandwidth_mbps"} & set(header):
            need = ", ".join(missing) if missing else "speed_factor or bandwidth_mbps"
            raise bad(1, None, f"the header lacks {need} (columns: client, start_s, end_s and speed_factor "
                               f"and/or bandwidth_mbps)")
        rows = []
        for row in reader:
            n = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise bad(n, None, f"{len(row)} cells, expected {len(header)} ({','.join(header)})")
            cell = dict(zip(header, (c.strip() for c in row)))

            def number(col: str, *, empty=None, low=None, above=None) -> float:
                raw = cell.get(col, "")
                if raw == "":
                    if empty is None:
                        raise bad(n, col, "empty; a number is needed")
                    return empty
                try:
                    v = float(raw)
                except ValueError:
                    raise bad(n, col, f"{raw!r} is not a number") from None
                if not math.isfinite(v):
                    raise bad(n, col, f"{raw!r} is not a finite number")
                if low is not None and v < low:
                    raise bad(n, col, f"{raw} is below {low:g}")
                if above is not None and not v > above:
                    raise bad(n, col, f"{raw} must be greater than {above:g}")
                if abs(v) > MAX_NUMBER:
                    raise bad(n, col, f"{raw} is more than {MAX_NUMBER:g}")
                return v

            raw_client = cell["client"]
            try:
                c = int(raw_client)
            except ValueError:
                raise bad(n, "client", f"{raw_client!r} is not a client number (an integer)") from None
            if not 0 <= c < num_clients:
                raise bad(n, "client", f"{c} is not a client: data.num_clients is {num_clients} (ids 0..{num_clients - 1})")
            s = number("start_s", low=0.0)
            e = number("end_s", empty=math.inf, above=s)
            sf = number("speed_factor", empty=math.nan, above=0.0)
            bw = number("bandwidth_mbps", empty=math.nan, low=MIN_BANDWIDTH_MBPS)
            if math.isnan(sf) and math.isnan(bw):
                raise bad(n, None, "sets neither speed_factor nor bandwidth_mbps; the row would do nothing")
            if speeds is not None and not math.isnan(sf) and not speeds[c] * sf >= MIN_FLOPS_PER_S:
                raise bad(n, "speed_factor", f"{sf:g} makes client {c} compute at {speeds[c] * sf:.3g} FLOP/s; "
                                             f"at least {MIN_FLOPS_PER_S:g} FLOP/s")
            rows.append((c, s, e, sf, bw * 1e6))
    except csv.Error as ex:
        raise bad(reader.line_num, None, f"not valid CSV ({ex})") from None
    return rows


# --------------------------------------------------------------------------------------------
# The gas_wireless preset: the clock of the GAS public code (Yang & Liu, AAAI 2025)
# --------------------------------------------------------------------------------------------
#: GAS_main.py: W = 10 MHz, P = 0.2 W, N0 = 3.981e-21 W/Hz, d ~ U(0.1, 1) km, FLOP/s ~ U(1e9, 1e10).
GAS_WIRELESS = {
    "bandwidth_hz": 1e7, "power_w": 0.2, "noise_w_per_hz": 3.981e-21,
    "distance_km": (0.1, 1.0), "flops_per_s": (1e9, 1e10),
}


def path_loss_db(distance_km: float) -> float:
    """128.1 + 37.6 log10(d / km): the urban macro-cell path loss the GAS code uses."""
    return 128.1 + 37.6 * math.log10(distance_km)


def shannon_rate_bps(distance_km: float, bandwidth_hz: float = 1e7, power_w: float = 0.2,
                     noise_w_per_hz: float = 3.981e-21) -> float:
    """W log2(1 + P g / (W N0)), g = 10^(-PL/10): GAS_main.py's ``rates`` (the noise power is N0 W)."""
    gain = 10.0 ** (-path_loss_db(distance_km) / 10.0)
    return bandwidth_hz * math.log2(1.0 + power_w * gain / (bandwidth_hz * noise_w_per_hz))


def gas_wireless_distances(num_clients: int, seed: int) -> list[float]:
    """Client distances to the base station in km, U(0.1, 1), keyed (seed, "time", "gas_distance", c)."""
    lo, hi = GAS_WIRELESS["distance_km"]
    return [float(rng.generator(seed, "time", "gas_distance", c).uniform(lo, hi)) for c in range(num_clients)]


def gas_wireless_rates(num_clients: int, seed: int) -> list[float]:
    """Per-client link rate (bit/s) of the gas_wireless preset, used for uplink and downlink."""
    p = GAS_WIRELESS
    return [shannon_rate_bps(d, p["bandwidth_hz"], p["power_w"], p["noise_w_per_hz"])
            for d in gas_wireless_distances(num_clients, seed)]


def _speed_distribution(time_cfg) -> Distribution:
    """time.client.flops_per_s, or U(1e9, 1e10) under the gas_wireless preset (which owns it)."""
    user = as_distribution(time_cfg.client.flops_per_s)
    if getattr(time_cfg.network, "preset", None) != "gas_wireless":
        return user
    default = as_distribution(type(time_cfg.client).model_fields["flops_per_s"].default)
    if user != default:
        raise ScenarioError("time.client.flops_per_s", "the gas_wireless preset draws device speeds "
                            "(U(1e9, 1e10) FLOP/s); remove flops_per_s or the preset (tiers still apply)")
    lo, hi = GAS_WIRELESS["flops_per_s"]
    return Uniform(dist="uniform", low=lo, high=hi)


def check_draws(time_cfg, speeds: Sequence[float], tier_of: Sequence[str], up_bps: Sequence[float],
                down_bps: Sequence[float]) -> None:
    """Every drawn device speed at least MIN_FLOPS_PER_S and bandwidth at least
    MIN_BANDWIDTH_MBPS, all finite: a ScenarioError naming the key and the client otherwise."""
    for c, speed in enumerate(speeds):
        if not (MIN_FLOPS_PER_S <= speed <= MAX_NUMBER):
            tier = f" (times tier {tier_of[c]!r}'s speed_factor)" if tier_of[c] else ""
            raise ScenarioError("time.client.flops_per_s", f"client {c} drew a device speed of {speed:.3g} FLOP/s"
                                f"{tier}; every speed must be in [{MIN_FLOPS_PER_S:g}, {MAX_NUMBER:g}] FLOP/s")
    for direction, bps in (("uplink", up_bps), ("downlink", down_bps)):
        for c, b in enumerate(bps):
            if not (MIN_BANDWIDTH_MBPS * 1e6 <= b <= MAX_NUMBER * 1e6):
                raise ScenarioError(f"time.network.{direction}.bandwidth_mbps",
                                    f"client {c} drew a bandwidth of {b / 1e6:.3g} Mbit/s; every bandwidth must be "
                                    f"in [{MIN_BANDWIDTH_MBPS:g}, {MAX_NUMBER:g}] Mbit/s")


def build_time_model(time_cfg, num_clients: int, seed: int) -> TimeModel:
    """Base models from the scenario's ``time`` section, wrapped by its episodes and trace."""
    speeds, tier_of = draw_client_speeds(time_cfg, num_clients, seed)
    up_bps = [m * 1e6 for m in _per_client(time_cfg.network.uplink.bandwidth_mbps, num_clients, seed, "uplink_bw")]
    down_bps = [m * 1e6 for m in _per_client(time_cfg.network.downlink.bandwidth_mbps, num_clients, seed, "downlink_bw")]
    up_lat = _per_client(time_cfg.network.uplink.latency_s, num_clients, seed, "uplink_latency")
    down_lat = _per_client(time_cfg.network.downlink.latency_s, num_clients, seed, "downlink_latency")
    if getattr(time_cfg.network, "preset", None) == "gas_wireless":
        up_bps = gas_wireless_rates(num_clients, seed)
        down_bps = list(up_bps)
        up_lat = [0.0] * num_clients
        down_lat = [0.0] * num_clients
    check_draws(time_cfg, speeds, tier_of, up_bps, down_bps)

    rng_cost = float(time_cfg.zo_rng_flops_per_element)
    compute: LatencyModel = ClientCompute(speeds, as_distribution(time_cfg.client.delay_s), seed, rng_cost)
    uplink: LatencyModel = Link(up_bps, up_lat)
    downlink: LatencyModel = Link(down_bps, down_lat)
    # Order of wrapping: bandwidth changes and trace rows act on the link itself; outages wrap
    # everything (a message waits for the outage to end, then is priced as usual).
    for ep in time_cfg.episodes:
        clients = frozenset(ep.clients)
        end = math.inf if ep.end_s is None else ep.end_s
        if ep.kind == "slowdown":
            compute = Slowdown(compute, clients, ep.factor, ep.start_s, end)
        elif ep.kind == "bandwidth":
            bps = ep.bandwidth_mbps * 1e6
            if ep.direction in ("uplink", "both"):
                uplink = BandwidthChange(uplink, clients, bps, up_lat, ep.start_s, end)
            if ep.direction in ("downlink", "both"):
                downlink = BandwidthChange(downlink, clients, bps, down_lat, ep.start_s, end)
    if time_cfg.trace_csv:
        rows = read_trace_csv(time_cfg.trace_csv, num_clients, speeds)
        speed_rows = [(c, s, e, f) for c, s, e, f, _ in rows if not math.isnan(f)]
        bw_rows = [(c, s, e, b) for c, s, e, _, b in rows if not math.isnan(b)]
        if speed_rows:
            compute = TraceSpeed(compute, speed_rows)
        if bw_rows:
            uplink = TraceBandwidth(uplink, bw_rows, up_lat)
            downlink = TraceBandwidth(downlink, bw_rows, down_lat)
    for ep in time_cfg.episodes:
        if ep.kind == "unreachable":
            clients = frozenset(ep.clients)
            uplink = Unreachable(uplink, clients, ep.start_s, ep.end_s)
            downlink = Unreachable(downlink, clients, ep.start_s, ep.end_s)
    models = {
        CLIENT_COMPUTE: compute,
        SERVER_COMPUTE: ServerCompute(time_cfg.server.flops_per_s, rng_cost),
        UPLINK: uplink,
        DOWNLINK: downlink,
    }
    return TimeModel(models, speeds, up_bps, down_bps, tier_of)
