"""The reject signal: one ZeroMQ PUB message per verdict, for the line's PLC bridge.

The message itself (fields, topics, versioning) is defined in `pipeline.wire`. PUB never blocks: a
subscriber slower than `send_hwm` messages loses messages, which it sees as a gap in `seq` /
`topic_seq`. The counters live in shared memory, so a restarted decide stage continues the sequence
instead of starting over. Messages sent before a subscriber has connected are lost to it.
"""

from __future__ import annotations

import numpy as np
import zmq

from pipeline.wire import VERDICT_NAMES, Verdict, encode


class RejectPublisher:
    """PUB socket plus the sequence counters (a view into shared memory: [seq, pass, reject, error])."""

    def __init__(self, address: str, send_hwm: int, run: str, bundle: str, counters: np.ndarray) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, send_hwm)
        self.sock.setsockopt(zmq.LINGER, 1000)
        try:
            self.sock.bind(address)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"publisher.address = {address!r}: cannot bind ({exc})") from None
        self.run, self.bundle, self.counters = run, bundle, counters

    def publish(self, v: Verdict) -> int:
        """Send one verdict; returns its seq. Never blocks (a full subscriber queue drops for that subscriber)."""
        self.counters[0] += 1
        topic = 1 + VERDICT_NAMES.index(v.verdict)
        self.counters[topic] += 1
        seq, topic_seq = int(self.counters[0]), int(self.counters[topic])
        try:
            self.sock.send_multipart(encode(self.run, seq, topic_seq, v, self.bundle), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB only raises this when configured to; subscribers see the gap either way
        return seq

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
