"""A gateway: the follower in its own thread, its decisions applied in order to a `LineView` (an OPC UA or
Modbus server) running on asyncio.

The follower's socket loop is synchronous (zmq.Poller); the protocol servers are asyncio. The follower's
`QueueGate` posts typed events into the event loop (`call_soon_threadsafe`), one consumer applies them in
the order they were decided, and a `tick` every TICK_S lets the view time pulses.
"""

from __future__ import annotations

import asyncio
import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from linewatch_plc.follower import Follower, StateFile, Watchdog, emit, follow, resume
from linewatch_plc.wire import Heartbeat

TICK_S = 0.005  # how often the view's clock runs: pulse lengths are this exact


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


Event = Part | Beat | FailSafe


class LineView(Protocol):
    """What a PLC protocol server shows of the line."""

    async def apply(self, event: Event) -> None:
        """One decision of the follower, in order."""

    async def tick(self, now: float) -> None:
        """The clock (monotonic s), every TICK_S: pulses end on it."""


class QueueGate:
    """The follower's gate: each call becomes an event on the asyncio loop's queue (thread-safe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Event]) -> None:
        self.loop, self.queue = loop, queue

    def _post(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def part(self, message: dict[str, Any], replayed: bool) -> None:
        self._post(Part(message, replayed))

    def heartbeat(self, hb: Heartbeat) -> None:
        self._post(Beat(hb))

    def failsafe(self, active: bool) -> None:
        self._post(FailSafe(active))


@dataclass(frozen=True)
class FollowSettings:
    """Where linewatch is, and how the follower behaves (the options every gateway shares)."""

    address: str
    replay_address: str
    state: StateFile
    failsafe_after: int
    failsafe: str  # hold | reject
    duration_s: float | None = None


async def run_gateway(view: LineView, settings: FollowSettings) -> None:
    """Follow linewatch into `view` until SIGTERM/SIGINT (or the duration); the caller has started the server."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    now = time.monotonic()
    watchdog = Watchdog(settings.failsafe_after, settings.failsafe, now)
    follower = Follower(True, bool(settings.replay_address), watchdog, gate=QueueGate(loop, queue))
    emit(resume(follower, settings.state, now))
    end = now + settings.duration_s if settings.duration_s else math.inf
    failed: list[BaseException] = []

    def follow_until_stopped() -> None:
        try:
            follow(follower, settings.address, settings.replay_address, settings.state, stop, end)
        except BaseException as exc:  # handed to the loop's thread, which raises it
            failed.append(exc)

    thread = threading.Thread(target=follow_until_stopped, name="follower", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not queue.empty():
            try:
                event = await asyncio.wait_for(queue.get(), TICK_S)
            except TimeoutError:
                pass
            else:
                await view.apply(event)
            await view.tick(time.monotonic())
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    if failed:
        raise failed[0]
