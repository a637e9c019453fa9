"""The recorder's live feed: the verdicts it has just stored, for readers that show the line as it runs.

A ZeroMQ PUB socket on `ui.feed_address`. After each committed batch the recorder sends one message,
`[b"stored", JSON list]`, each item a row's v1 message body plus its `image_key` (null when no image was
kept). A row is announced only once it is in the store and its images are on disk, so a reader can show
both at once. Delivery is PUB/SUB's: a reader that was not connected misses what was sent meanwhile (it
reads the store for that), and one that falls HWM messages behind loses the oldest; the recorder never
waits for a reader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import zmq

from pipeline.publisher import bound_socket
from pipeline.store.verdicts import StoredVerdict

FEED_TOPIC = b"stored"
FEED_HWM = 1000  # batches held for a slow reader: at 100 parts/s and one batch per 50 ms, 50 s of the line


def feed_item(row: StoredVerdict) -> dict[str, Any]:
    """What the feed says of one stored row: its message body and its image key."""
    return {**json.loads(row.message()[1]), "image_key": row.image_key}


class StoredFeed:
    """The recorder's end: announces committed rows on `address`."""

    def __init__(self, address: str) -> None:
        self._ctx = zmq.Context()
        self._sock = bound_socket(self._ctx, zmq.PUB, address, "ui.feed_address", {zmq.SNDHWM: FEED_HWM, zmq.LINGER: 0})

    def announce(self, rows: Sequence[StoredVerdict]) -> None:
        if not rows:
            return
        body = json.dumps([feed_item(r) for r in rows], separators=(",", ":")).encode()
        try:
            self._sock.send_multipart([FEED_TOPIC, body], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # no reader keeps up (or the socket is closing): readers read the store; the rows are stored

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()


def decode_feed(frames: list[bytes]) -> list[dict[str, Any]]:
    """The items of one feed message; ValueError for anything else."""
    if len(frames) != 2 or frames[0] != FEED_TOPIC:
        raise ValueError("not a stored-verdicts feed message")
    items = json.loads(frames[1])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError("stored-verdicts feed message: expected a JSON list of objects")
    return items
