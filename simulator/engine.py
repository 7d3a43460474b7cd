"""The engine: a SimPy environment, the server resource, and the charge/send/serve helpers.

This is the only place where the clock and the latency models meet: ``charge`` prices an
operation, advances simulated time by that much and records the span, in one call, so nothing
is charged that is not in the event log. Algorithms are SimPy processes that ``yield from``
these helpers and run their real tensor steps in between. The engine imposes no rounds:
``end_round`` is a notification an algorithm may send (GAS sends one per global iteration).
The engine never touches tensors.
"""
from __future__ import annotations

import gc
from collections import deque
from heapq import heappop
from typing import Callable, Generator, Optional

import simpy
from simpy.core import EmptySchedule, StopSimulation
from simpy.events import PENDING, URGENT, Event

from simulator.latency import CLIENT_COMPUTE, DOWNLINK, SERVER_COMPUTE, UPLINK, Op, TimeModel
from simulator.trace import Recorder, Span

_PARTY = {CLIENT_COMPUTE: "client", SERVER_COMPUTE: "server", UPLINK: "uplink", DOWNLINK: "downlink"}
_span = tuple.__new__  # Span(*fields) without the NamedTuple's Python-level __new__
# The cyclic garbage collector's first-generation threshold while the event loop runs (Python's
# default: 700). An event loop allocates a few short-lived objects per operation (events,
# generator frames, spans); collecting every 700 allocations cost about 40% of a timing-only
# run with a thousand clients (docs/benchmarks.md, "Control-flow cost").
GC_GEN0_THRESHOLD = 100_000


class _Pricers(dict):
    """category -> ``time_model.pricer(category)``, each built when first asked for."""

    def __init__(self, time_model: TimeModel):
        super().__init__()
        self.time_model = time_model

    def __missing__(self, category: str):
        price = self[category] = self.time_model.pricer(category)
        return price


class Slots:
    """A pool of ``capacity`` slots granted first come, first served: ``simpy.Resource``'s
    schedule, event for event, in fewer Python steps.

    ``with slots.request() as req: yield req`` as with a Resource. What must match, because
    equal-time events run in the order they were scheduled: a request is granted at once (its
    event scheduled now) iff a slot is free and no one waits before it -- more precisely,
    Resource tries the head of its queue, at most one, when a request is made and when a
    release event is processed; a release frees the slot at once and schedules a release event
    now whose processing grants the head of the queue. ``tests/test_engine.py`` runs the
    same request pattern on both and compares the event order.
    """

    __slots__ = ("env", "capacity", "users", "queue")

    def __init__(self, env: simpy.Environment, capacity: int):
        self.env, self.capacity = env, capacity
        self.users = 0  # granted and not yet released
        self.queue: deque = deque()  # waiting requests, oldest first

    @property
    def count(self) -> int:
        return self.users

    def request(self) -> "_SlotRequest":
        return _SlotRequest(self)

    def _grant_head(self, _event=None) -> None:
        if self.queue and self.users < self.capacity:
            req = self.queue.popleft()
            self.users += 1
            req.granted = True
            req.succeed()

    def _release(self, req: "_SlotRequest") -> None:
        if req.granted:
            self.users -= 1
            req.granted = False
        done = Event(self.env)
        done.callbacks.append(self._grant_head)
        done.succeed()


class _SlotRequest(Event):
    """A request for one of ``Slots``' slots (an event: triggered when granted)."""

    def __init__(self, slots: Slots):
        self.env = slots.env
        self.callbacks = []
        self._value = PENDING
        self.slots = slots
        self.granted = False
        slots.queue.append(self)
        slots._grant_head()

    def __enter__(self) -> "_SlotRequest":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if self._value is PENDING:  # never granted: leave the queue
            self.slots.queue.remove(self)
        if exc_type is not GeneratorExit:  # as Resource: a closed generator releases nothing
            self.slots._release(self)


class _QueuedSend:
    """``Simulation.send_queued`` as callbacks on the events a process would wait for."""

    __slots__ = ("sim", "slots", "client", "direction", "kind", "nbytes", "round", "done", "req", "start", "seq")

    def __init__(self, sim, slots, client, direction, kind, nbytes, round, done):
        self.sim, self.slots, self.client, self.direction = sim, slots, client, direction
        self.kind, self.nbytes, self.round, self.done = kind, int(nbytes), round, done
        env = sim.env
        begin = Event(env)  # a process's Initialize event: URGENT, now
        begin._ok, begin._value = True, None
        begin.callbacks.append(self._begin)
        env.schedule(begin, URGENT)

    def _begin(self, _event) -> None:
        self.req = req = self.slots.request()
        req.callbacks.append(self._granted)

    def _granted(self, _event) -> None:
        # Simulation._charge up to its timeout.
        sim, key = self.sim, (self.client, self.direction)
        seqs = sim._seq
        self.seq = seq = seqs.get(key, 0)
        seqs[key] = seq + 1
        env = sim.env
        self.start = start = float(env.now)
        env.timeout(sim._pricers[self.direction](self.kind, self.client, 0.0, self.nbytes, seq, self.round, 0,
                                                 start)).callbacks.append(self._sent)

    def _sent(self, _event) -> None:
        # Simulation._charge after its timeout, the end of the ``with`` block, then ``done``.
        sim = self.sim
        sim.recorder.add_span(_span(Span, (self.client, self.direction, self.kind, self.round, self.seq, self.start,
                                           sim.env.now, 0.0, 0.0, self.nbytes, 0)))
        self.req.__exit__(None, None, None)
        self.done()


class Simulation:
    """Simulated time for one run: charges operations and tells listeners about rounds."""

    def __init__(self, time_model: TimeModel, recorder: Recorder, server_capacity: Optional[int] = 1):
        self.env = simpy.Environment()
        self._time_model = time_model
        self.recorder = recorder
        # capacity None = unlimited: server jobs never queue.
        self.server = self.slots(server_capacity) if server_capacity else None
        self.server_capacity = server_capacity
        self.stopped = self.env.event()
        self.stop_reason: Optional[str] = None
        self.rounds_done = 0
        self._seq: dict = {}
        self._pricers = _Pricers(time_model)  # category -> TimeModel.pricer(category), built on first use
        self._round_listeners: list[Callable[[int], None]] = []

    def slots(self, capacity: int) -> Slots:
        """A FIFO pool of ``capacity`` slots on this run's clock (a client's uplink, say)."""
        return Slots(self.env, capacity)

    @property
    def time_model(self) -> TimeModel:
        """The run's time model (fixed for the run: its pricing functions are cached)."""
        return self._time_model

    @property
    def now(self) -> float:
        return self.env.now

    # -- charging ------------------------------------------------------------------------
    def charge(
        self,
        category: str,
        kind: str,
        *,
        client: Optional[int] = None,
        flops: float = 0.0,
        nbytes: int = 0,
        round: Optional[int] = None,
        wait_s: float = 0.0,
        party: Optional[str] = None,
        rng_elements: int = 0,
    ) -> Generator:
        """Price one operation, let that much simulated time pass, and record the span.

        Returns (``yield from``) ``(busy_s, wait_s)``: the span's duration and the seconds it
        waited for a server slot before it started.
        """
        return self._charge(category, party or _PARTY[category], kind, client, flops, nbytes, round, wait_s,
                            rng_elements)

    def _charge(self, category, party, kind, client, flops, nbytes, round, wait_s, rng_elements) -> Generator:
        """``charge`` with every argument given, in order: the per-operation hot path.

        One dict update for the sequence number, one call to the category's cached pricing
        function (``TimeModel.pricer``), one SimPy timeout, one tuple handed to the recorder.
        ``ReferenceSimulation`` does the same operation written plainly; both must
        write the same outputs (docs/benchmarks.md, "Engine cost per operation").
        """
        key = (client, category)
        seqs = self._seq
        seq = seqs.get(key, 0)
        seqs[key] = seq + 1
        env = self.env
        flops, nbytes, rng_elements = float(flops), int(nbytes), int(rng_elements)
        start = float(env.now)
        yield env.timeout(self._pricers[category](kind, client, flops, nbytes, seq, round, rng_elements, start))
        end = env.now
        self.recorder.add_span(_span(Span, (client, party, kind, round, seq, start, end, wait_s, flops, nbytes,
                                            rng_elements)))
        return end - start, wait_s

    def compute(self, client: int, kind: str, flops: float, round: Optional[int] = None,
                rng_elements: int = 0) -> Generator:
        """Client ``client`` computes ``flops`` (its speed, slowdowns and delay apply).

        ``rng_elements``: random numbers a ZO direction regenerates in this op, priced at
        ``time.zo_rng_flops_per_element`` FLOP-equivalents each.
        """
        return self._charge(CLIENT_COMPUTE, "client", kind, client, flops, 0, round, 0.0, rng_elements)

    def send(self, client: int, direction: str, kind: str, nbytes: int, round: Optional[int] = None) -> Generator:
        """A message of ``nbytes`` between client ``client`` and the servers."""
        if direction not in (UPLINK, DOWNLINK):
            raise ValueError(f"direction must be {UPLINK!r} or {DOWNLINK!r}, got {direction!r}")
        return self._charge(direction, direction, kind, client, 0.0, nbytes, round, 0.0, 0)

    def serve(self, kind: str, flops: float, client: Optional[int] = None, round: Optional[int] = None,
              rng_elements: int = 0) -> Generator:
        """Split Server work: wait for a free server slot, then compute ``flops``.

        The caller runs the real step right after this returns, before any other process
        resumes, so real server steps happen in the order their charges complete. Returns
        ``(busy_s, wait_s)`` like ``charge``.
        """
        if self.server is None:
            return (yield from self._charge(SERVER_COMPUTE, "server", kind, client, flops, 0, round, 0.0, rng_elements))
        with self.server.request() as req:
            asked = self.env.now
            yield req
            return (yield from self._charge(SERVER_COMPUTE, "server", kind, client, flops, 0, round,
                                            self.env.now - asked, rng_elements))

    def fed(self, kind: str, flops: float, round: Optional[int] = None) -> Generator:
        """Fed Server work (averaging client parts): priced at server speed, its own machine."""
        return self._charge(SERVER_COMPUTE, "fed", kind, None, flops, 0, round, 0.0, 0)

    def send_queued(self, slots, client: int, direction: str, kind: str, nbytes: int, round: Optional[int],
                    done: Callable[[], None]) -> None:
        """In the background, from now: take one of ``slots`` (a client's uplink), ``send``, give
        the slot back, then call ``done()``.

        What ``env.process`` of this generator would do, with no process::

            with slots.request() as req:
                yield req
                yield from self.send(client, direction, kind, nbytes, round)
            done()

        The same live events are scheduled in the same order (the process's start as an URGENT
        event now, the grant, the transfer's timeout, the release); the process's own end,
        which nothing waits for, is not. ``ReferenceSimulation`` runs it as that process.
        """
        if direction not in (UPLINK, DOWNLINK):
            raise ValueError(f"direction must be {UPLINK!r} or {DOWNLINK!r}, got {direction!r}")
        _QueuedSend(self, slots, client, direction, kind, nbytes, round, done)

    def run(self) -> None:
        """Run the event loop until ``stop`` (or until no event is left).

        While it runs, the objects that exist before it (the model, the data, the modules) are
        frozen out of the cyclic garbage collector (``gc.freeze``: full collections do not
        walk them again and again) and the collector runs every ``GC_GEN0_THRESHOLD``
        allocations instead of every 700. Reference counting still frees everything acyclic at
        once; cycles (finished SimPy processes) wait for the next collection. Both settings are
        restored when the loop ends, however it ends. Outputs do not depend on the collector.
        """
        old = gc.get_threshold()
        freeze = gc.get_freeze_count() == 0  # someone else's frozen objects are theirs to thaw
        if freeze:
            gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, *old[1:])
        try:
            self._loop()
        finally:
            gc.set_threshold(*old)
            if freeze:
                gc.unfreeze()

    def _loop(self) -> None:
        """``env.run(until=self.stopped)``, with ``Environment.step`` inlined (simpy 4.1's code:
        the same events in the same order, one Python call fewer per event)."""
        env, until = self.env, self.stopped
        if until.callbacks is None:  # already processed
            return
        until.callbacks.append(StopSimulation.callback)
        queue = env._queue
        try:
            while True:
                try:
                    env._now, _, _, event = heappop(queue)
                except IndexError:
                    raise EmptySchedule from None
                callbacks, event.callbacks = event.callbacks, None
                try:
                    for callback in callbacks:
                        callback(event)
                except StopSimulation:
                    event.callbacks = callbacks[callbacks.index(callback) + 1:]
                    env.schedule(event, -1)
                    raise
                if not event._ok and not hasattr(event, "_defused"):
                    exc = type(event._value)(*event._value.args)
                    exc.__cause__ = event._value
                    raise exc
        except StopSimulation:
            return
        except EmptySchedule:
            raise RuntimeError(f'No scheduled events left but "until" event was not triggered: {until}') from None

    # -- rounds and stopping --------------------------------------------------------------
    def on_round(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(round)`` whenever an algorithm reports the end of a round."""
        self._round_listeners.append(listener)

    def end_round(self, round: int) -> None:
        """An algorithm finished round (or global iteration) ``round`` (0-based)."""
        self.rounds_done = round + 1
        for listener in self._round_listeners:
            listener(round)

    def stop(self, reason: str) -> None:
        """Ask the run to stop now; the first reason wins."""
        if not self.stopped.triggered:
            self.stop_reason = reason
            self.stopped.succeed(reason)

    @property
    def stopping(self) -> bool:
        return self.stopped.triggered


class ReferenceSimulation(Simulation):
    """``Simulation`` with its charging written the plain way: the executable specification
    of the hot path.

    ``compute``/``send``/``serve``/``fed`` go through ``charge`` by keyword, which builds the
    ``Op``, asks ``TimeModel.duration`` through the latency models, waits with
    ``env.timeout`` and records through ``Recorder.span``: the engine as it was before its
    per-operation cost was cut; its server and the clients' uplinks are ``simpy.Resource``
    (not ``Slots``) and its event loop is ``env.run`` (not the inlined one). Every run must give the same outputs with either class
    (``tests/test_engine.py`` runs scenarios with both and compares the files byte for byte);
    ``benchmarks/engine_overhead.py`` measures the two side by side. Not used by runs.
    """

    def slots(self, capacity: int) -> simpy.Resource:
        """``simpy.Resource`` itself (what ``Slots`` must match event for event)."""
        return simpy.Resource(self.env, capacity=capacity)

    def _loop(self) -> None:
        """SimPy's own ``Environment.run`` (what the inlined loop must match)."""
        if not self.stopping:
            self.env.run(until=self.stopped)

    def send_queued(self, slots, client, direction, kind, nbytes, round, done) -> None:
        def queued():
            with slots.request() as req:
                yield req
                yield from self.send(client, direction, kind, nbytes, round)
            done()

        self.env.process(queued())

    def _charge(self, category, party, kind, client, flops, nbytes, round, wait_s, rng_elements) -> Generator:
        key = (client, category)
        seq = self._seq.get(key, 0)
        self._seq[key] = seq + 1
        op = Op(category, kind, client, float(flops), int(nbytes), seq, round, int(rng_elements))
        start = float(self.env.now)
        duration = self.time_model.duration(op, start)
        yield self.env.timeout(duration)
        self.recorder.span(
            client=client,
            party=party,
            kind=kind,
            round=round,
            seq=seq,
            start_s=start,
            end_s=self.env.now,
            wait_s=wait_s,
            flops=op.flops,
            nbytes=op.nbytes,
            rng_elements=op.rng_elements,
        )
        return self.env.now - start, wait_s

    def compute(self, client, kind, flops, round=None, rng_elements=0) -> Generator:
        return self.charge(CLIENT_COMPUTE, kind, client=client, flops=flops, round=round, rng_elements=rng_elements)

    def send(self, client, direction, kind, nbytes, round=None) -> Generator:
        if direction not in (UPLINK, DOWNLINK):
            raise ValueError(f"direction must be {UPLINK!r} or {DOWNLINK!r}, got {direction!r}")
        return self.charge(direction, kind, client=client, nbytes=nbytes, round=round)

    def serve(self, kind, flops, client=None, round=None, rng_elements=0) -> Generator:
        if self.server is None:
            return (yield from self.charge(SERVER_COMPUTE, kind, client=client, flops=flops, round=round,
                                           rng_elements=rng_elements))
        with self.server.request() as req:
            asked = self.env.now
            yield req
            return (yield from self.charge(SERVER_COMPUTE, kind, client=client, flops=flops, round=round,
                                           wait_s=self.env.now - asked, rng_elements=rng_elements))

    def fed(self, kind, flops, round=None) -> Generator:
        return self.charge(SERVER_COMPUTE, kind, flops=flops, round=round, party="fed")
