"""A gateway: the follower in its own thread, its decisions applied in order to a `LineView` (an OPC UA or
Modbus server) running on asyncio.

The follower's socket loop is synchronous (zmq.Poller); the protocol servers are asyncio. The follower's
`QueueGate` posts typed events into the event loop (`call_soon_threadsafe`), and one consumer applies them in
the order they were decided; a `tick` every TICK_S lets the view time its pulses.

Delivery. The follower's state goes through the same queue (`Checkpoint`). When it comes out, the view marks
what it owes the PLC so far (`mark`: for Modbus, how many rejects each coil had been given); the state is
written once the view has delivered up to that mark (each of those pulses ended). A backlog therefore delays
a checkpoint only until the rejects before it are pulsed, not until the queues run dry. A gateway that
crashes hands on again what it had not delivered (at least once); a stopped one first finishes the pulses
it owes, for up to DRAIN_S.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from linewatch_plc.follower import FollowSettings, emit, follow, prepare
from linewatch_plc.wire import Heartbeat

TICK_S = 0.005  # how often the view's clock runs: pulse lengths are this exact
DRAIN_S = 10.0  # a stopping gateway's longest wait for the pulses it owes


@dataclass(frozen=True)
class Part:
    message: dict[str, Any]  # the verdict message, as published
    replayed: bool  # recovered from the replay endpoint, not live


@dataclass(frozen=True)
class Beat:
    heartbeat: Heartbeat


@dataclass(frozen=True)
class FailSafe:
    active: bool


@dataclass(frozen=True)
class Checkpoint:
    state: dict[str, Any]  # the follower's state once the events before it are handled


@dataclass(frozen=True)
class Done:
    """The follower has stopped: nothing comes after this."""


Event = Part | Beat | FailSafe
Posted = Event | Checkpoint | Done


def shows_newer(shown: tuple[str, int] | None, message: dict[str, Any], replayed: bool, run: str | None) -> bool:
    """Whether a camera's display should move from the verdict `shown` (run, seq) to `message`: a live one
    always; a recovered one when nothing is shown, when it is later in the shown run, or when it belongs to
    the run linewatch's heartbeat names (`run`) and the shown one does not."""
    if not replayed or shown is None:
        return True
    if message["run"] == shown[0]:
        return int(message["seq"]) > shown[1]
    return message["run"] == run


def score_or_nan(message: dict[str, Any]) -> float:
    """The message's score; NaN for a part that could not be scored."""
    return float("nan") if message["score"] is None else float(message["score"])


def trigger_or(message: dict[str, Any], none: int) -> int:
    """The part's trigger / encoder value; `none` when its source has none."""
    return none if message["trigger"] is None else int(message["trigger"])


class LineView(Protocol):
    """What a PLC protocol server shows of the line."""

    async def apply(self, event: Event) -> None:
        """One decision of the follower, in order."""

    async def tick(self, now: float) -> None:
        """The clock (monotonic s), every TICK_S: pulses end on it."""

    def mark(self) -> Any:
        """What has been handed to the view so far, to ask `reached` about later."""

    def reached(self, mark: Any) -> bool:
        """Everything handed to the view up to `mark` has reached the PLC side."""


class QueueGate:
    """The follower's gate and state sink: each call becomes an item on the asyncio loop's queue (thread-safe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Posted]) -> None:
        self.loop, self.queue = loop, queue
        self.posted_state: dict[str, Any] | None = None

    def _post(self, item: Posted) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def part(self, message: dict[str, Any], replayed: bool) -> None:
        self._post(Part(message, replayed))

    def heartbeat(self, hb: Heartbeat) -> None:
        self._post(Beat(hb))

    def failsafe(self, active: bool) -> None:
        self._post(FailSafe(active))

    def save(self, state: dict[str, Any]) -> None:
        if state != self.posted_state:
            self.posted_state = state
            self._post(Checkpoint(state))

    def done(self) -> None:
        self._post(Done())


async def run_gateway(view: LineView, settings: FollowSettings) -> None:
    """Follow linewatch into `view` until SIGTERM/SIGINT (or the duration); the caller has started the server."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Posted] = asyncio.Queue()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    gate = QueueGate(loop, queue)
    follower, end = prepare(settings, follow_all=True, gate=gate)
    failed: list[BaseException] = []

    def follow_until_stopped() -> None:
        try:
            follow(follower, settings.address, settings.replay_address, gate, stop, end)
        except BaseException as exc:  # handed to the loop's thread, which raises it
            failed.append(exc)
        finally:
            gate.done()

    thread = threading.Thread(target=follow_until_stopped, name="follower", daemon=True)
    thread.start()
    try:
        await consume(view, queue, settings)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    if failed:
        raise failed[0]


async def consume(view: LineView, queue: asyncio.Queue[Posted], settings: FollowSettings) -> None:
    """Apply what the follower posts until it is done; write each checkpoint once the view has delivered what
    came before it."""
    pending: deque[tuple[Any, dict[str, Any]]] = deque()  # (view's mark, state), oldest first
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), TICK_S)
        except TimeoutError:
            item = None
        if isinstance(item, Done):
            break
        if isinstance(item, Checkpoint):
            pending.append((view.mark(), item.state))
        elif item is not None:
            await view.apply(item)
        await view.tick(time.monotonic())
        write_reached(view, pending, settings)
    drain_until = time.monotonic() + DRAIN_S
    while pending and time.monotonic() < drain_until:
        await asyncio.sleep(TICK_S)
        await view.tick(time.monotonic())
        write_reached(view, pending, settings)
    if pending:
        emit(["stopped with rejects not yet pulsed: they are handed on again at the next start"])


def write_reached(view: LineView, pending: deque[tuple[Any, dict[str, Any]]], settings: FollowSettings) -> None:
    """Write the newest checkpoint the view has delivered up to, and forget it and the ones before it."""
    reached = None
    while pending and view.reached(pending[0][0]):
        reached = pending.popleft()[1]
    if reached is not None:
        settings.state.save(reached)
