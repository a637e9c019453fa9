"""The live side of the operator page: what the recorder just stored, and the publisher's heartbeat.

A thread reads two ZeroMQ SUB sockets: the recorder's feed (`pipeline.store.feed`: rows once stored, with
their image keys) and the publisher's `heartbeat` topic (what a PLC sees). It keeps the latest parts per
camera for a browser that opens the page, and hands every new batch to each open live view's queue. A
browser too slow to take its queue loses batches, never slows the thread; the counts it shows come from
the store anyway.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from linewatch_plc.wire import HEARTBEAT_TOPIC, Heartbeat
from pipeline.store.feed import decode_feed

RECENT_PER_CAMERA = 60  # parts a new live view starts with, per camera
CLIENT_QUEUE = 200  # batches waiting for one browser before it loses some
POLL_MS = 200

log = logging.getLogger(__name__)


def connectable(address: str) -> str:
    """A bound address as a client connects to it (a wildcard host means this box)."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if address.startswith(wildcard):
            return "tcp://127.0.0.1:" + address.removeprefix(wildcard)
    return address


@dataclass
class _Client:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[list[dict[str, Any]]]


class LiveHub:
    """Reads the feed and heartbeats until `stop()`; `subscribe()` gives a live view its queue."""

    def __init__(self, feed_address: str | None, heartbeat_address: str | None) -> None:
        self.recent: dict[str, deque[dict[str, Any]]] = {}
        self.heartbeat: Heartbeat | None = None
        self.heartbeat_seen_ns: int | None = None  # when the last heartbeat arrived here (monotonic)
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        for address, topic in ((feed_address, b""), (heartbeat_address, HEARTBEAT_TOPIC.encode())):
            if address:
                sock = self._ctx.socket(zmq.SUB)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SUBSCRIBE, topic)
                sock.connect(connectable(address))
                self._sockets.append(sock)
        self._thread = threading.Thread(target=self._serve, name="live-feed", daemon=True)

    def start(self) -> LiveHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for sock in self._sockets:
            sock.close()
        self._ctx.term()

    def subscribe(self) -> asyncio.Queue[list[dict[str, Any]]]:
        client = _Client(asyncio.get_running_loop(), asyncio.Queue(CLIENT_QUEUE))
        with self._lock:
            self._clients.append(client)
        return client.queue

    def unsubscribe(self, queue: asyncio.Queue[list[dict[str, Any]]]) -> None:
        with self._lock:
            self._clients = [c for c in self._clients if c.queue is not queue]

    def snapshot(self) -> list[dict[str, Any]]:
        """The latest parts of every camera, oldest first."""
        with self._lock:
            items = [item for parts in self.recent.values() for item in parts]
        return sorted(items, key=lambda i: (i["t_decision_ns"], i["run"], i["seq"]))

    def heartbeat_age_s(self) -> float | None:
        if self.heartbeat_seen_ns is None:
            return None
        return (time.monotonic_ns() - self.heartbeat_seen_ns) / 1e9

    def take(self, items: list[dict[str, Any]]) -> None:
        """New stored rows: remembered and handed to every live view."""
        with self._lock:
            for item in items:
                camera = str(item.get("camera_id"))
                self.recent.setdefault(camera, deque(maxlen=RECENT_PER_CAMERA)).append(item)
            clients = list(self._clients)
        for client in clients:
            client.loop.call_soon_threadsafe(_offer, client.queue, items)

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in self._sockets:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(POLL_MS):
                frames = sock.recv_multipart()
                try:
                    if frames[0] == HEARTBEAT_TOPIC.encode():
                        self.heartbeat = Heartbeat.decode(frames)
                        self.heartbeat_seen_ns = time.monotonic_ns()
                    else:
                        self.take(decode_feed(frames))
                except ValueError as exc:
                    log.warning("live feed: %s", exc)


def _offer(queue: asyncio.Queue[list[dict[str, Any]]], items: list[dict[str, Any]]) -> None:
    try:
        queue.put_nowait(items)
    except asyncio.QueueFull:
        pass  # a browser that does not keep up loses live parts; its counts come from the store
