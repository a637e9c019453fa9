"""The reject signal: one ZeroMQ PUB message per verdict, for the line's PLC bridge.

The message itself (fields, topics, versioning) is defined in `linewatch_plc.wire`. PUB never blocks: a
subscriber slower than `send_hwm` messages loses messages, which it sees as a gap in `seq` /
`topic_seq`. The counters live in shared memory, so a restarted decide stage continues the sequence
instead of starting over. Messages sent before a subscriber has connected are lost to it.
"""

from __future__ import annotations

import time

import numpy as np
import zmq

from linewatch_plc.wire import VERDICT_NAMES, Heartbeat, Verdict, encode


def bound_socket(ctx: zmq.Context, kind: int, address: str, key: str, options: dict[int, int]) -> zmq.Socket:
    """A socket of `kind` with `options`, bound to `address`; OSError naming the config `key` when it cannot be."""
    sock = ctx.socket(kind)
    for option, value in options.items():
        sock.setsockopt(option, value)
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close()
        ctx.term()
        raise OSError(f"{key} = {address!r}: cannot bind ({exc})") from None
    return sock


class RejectPublisher:
    """PUB socket plus the sequence counters (a view into shared memory: [seq, pass, reject, error])."""

    def __init__(self, address: str, send_hwm: int, run: str, counters: np.ndarray) -> None:
        self.ctx = zmq.Context()
        self.sock = bound_socket(
            self.ctx, zmq.PUB, address, "publisher.address", {zmq.SNDHWM: send_hwm, zmq.LINGER: 1000}
        )
        self.run, self.counters = run, counters

    def next_seqs(self, verdict: str) -> tuple[int, int]:
        """The seq and topic_seq that the next `publish` of a `verdict` will take."""
        return int(self.counters[0]) + 1, int(self.counters[1 + VERDICT_NAMES.index(verdict)]) + 1

    def publish(self, v: Verdict, bundle: str) -> tuple[int, int, bytes]:
        """Send one verdict, decided by the bundle with hash `bundle`; returns its seq, topic_seq and the message
        body (for the spool). Never blocks (a full subscriber queue drops for that subscriber). The counters move
        before the send: a seq that was sent is never given again."""
        seq, topic_seq = self.next_seqs(v.verdict)
        self.counters[0], self.counters[1 + VERDICT_NAMES.index(v.verdict)] = seq, topic_seq
        body = self.body(seq, topic_seq, v, bundle)
        self._send([v.verdict.encode(), body])
        return seq, topic_seq, body

    def body(self, seq: int, topic_seq: int, v: Verdict, bundle: str) -> bytes:
        """The message body of a verdict under the given seqs."""
        return encode(self.run, seq, topic_seq, v, bundle)[1]

    def heartbeat(self, interval_ms: float, problems: tuple[str, ...]) -> None:
        """Say what was published so far and how the pipeline is, so silence never reads as "all parts good"."""
        topic_seqs = {name: int(self.counters[1 + i]) for i, name in enumerate(VERDICT_NAMES)}
        health = "degraded" if problems else "ok"
        beat = Heartbeat(self.run, int(self.counters[0]), topic_seqs, time.time_ns(), interval_ms, health, problems)
        self._send(beat.encode())

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB only raises this when configured to; subscribers see the gap either way

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
