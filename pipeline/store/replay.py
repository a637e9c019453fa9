"""The replay endpoint: a ZeroMQ REP socket that sends missed verdicts again, from the store.

A PLC bridge that sees a gap in `seq` (or reconnects) asks for (run, from_seq, to_seq) and gets the
very messages that were published, in seq order (`linewatch_plc.wire.ReplayRequest` and its reply). A reply
holds at most `max_messages`; its header's `to_seq` says where it stopped, so a long gap takes several
requests and no reply grows without bound. A malformed request gets an error reply naming what was wrong;
the endpoint keeps serving. It only reads the store, so it never slows the recorder or the line.
"""

from __future__ import annotations

import logging
import threading

import zmq

from linewatch_plc.wire import ReplayRequest, encode_replay_reply
from pipeline.publisher import bound_socket
from pipeline.store.verdicts import StoreError, VerdictStore

MAX_MESSAGES = 10_000  # per reply: a whole shift's gap is asked for in pieces
POLL_MS = 500  # how often the serving loop looks at its stop event (a request wakes it at once)

log = logging.getLogger(__name__)


class ReplayServer:
    """Serves replay requests on `address` from `store` until `stop()`; `start()` runs it in a thread."""

    def __init__(self, store: VerdictStore, address: str, max_messages: int = MAX_MESSAGES) -> None:
        self.store, self.max_messages = store, max_messages
        self._ctx = zmq.Context()
        self._sock = bound_socket(self._ctx, zmq.REP, address, "publisher.replay_address", {zmq.LINGER: 0})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ReplayServer:
        self._thread = threading.Thread(target=self.serve, name="replay", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(POLL_MS):
                self._sock.send_multipart(self.answer(self._sock.recv_multipart()))

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The reply to one request, an error reply for a bad request or an unreadable store."""
        try:
            request = ReplayRequest.decode(frames)
        except ValueError as exc:
            return encode_replay_reply(None, [], str(exc))
        window = ReplayRequest(
            request.run, request.from_seq, min(request.to_seq, request.from_seq + self.max_messages - 1)
        )
        try:
            stored = self.store.range(window.run, window.from_seq, window.to_seq)
        except StoreError as exc:
            log.error("replay of %s %d-%d: %s", window.run, window.from_seq, window.to_seq, exc)
            return encode_replay_reply(request, [], str(exc))
        return encode_replay_reply(window, [v.message() for v in stored])

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.close()

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()
