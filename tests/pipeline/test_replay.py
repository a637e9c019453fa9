"""The replay endpoint over a real ZeroMQ REQ/REP pair and a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from test_store import verdicts

from linewatch_plc.wire import ReplayRequest, decode, decode_replay_reply, reply_holes
from pipeline.app.ports import free_port
from pipeline.store.replay import ReplayServer
from pipeline.store.verdicts import VerdictStore


@pytest.fixture()
def endpoint(store_url: str) -> Iterator[tuple[VerdictStore, str]]:
    store = VerdictStore(store_url)
    store.write(verdicts("run-a", 120))
    address = f"tcp://127.0.0.1:{free_port()}"
    server = ReplayServer(store, address, max_messages=50).start()
    yield store, address
    server.stop()
    store.close()


def ask(address: str, frames: list[bytes]) -> list[bytes]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        return sock.recv_multipart()
    finally:
        sock.close()
        ctx.term()


def test_a_missed_range_comes_back_as_the_published_messages(endpoint: tuple[VerdictStore, str]) -> None:
    _, address = endpoint
    published = {v.seq: decode(v.message()) for v in verdicts("run-a", 120)}
    got, start = [], 11
    while start <= 117:  # a bridge's loop: the endpoint answers 50 at most, the header says where it stopped
        header, messages = decode_replay_reply(ask(address, ReplayRequest("run-a", start, 117).encode()))
        assert header["from_seq"] == start and header["count"] == len(messages) <= 50
        got += messages
        start = header["to_seq"] + 1
    assert [m["seq"] for m in got] == list(range(11, 118))
    assert got == [published[s] for s in range(11, 118)]


def test_beyond_the_stored_run_and_another_run_come_back_empty(endpoint: tuple[VerdictStore, str]) -> None:
    _, address = endpoint
    header, messages = decode_replay_reply(ask(address, ReplayRequest("run-a", 121, 130).encode()))
    assert messages == [] and header["to_seq"] == 130 and header["error"] is None
    assert decode_replay_reply(ask(address, ReplayRequest("run-b", 1, 10).encode()))[1] == []


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([b"not json"], "replay request: not JSON"),
        ([b'{"v": 1, "run": "run-a", "from_seq": 0, "to_seq": 5}'], "replay request from_seq = 0: expected"),
        (
            [b'{"v": 1, "run": "run-a", "from_seq": 9, "to_seq": 5}'],
            "replay request to_seq = 5: expected a value >= from_seq (9)",
        ),
        (
            [b'{"v": 2, "run": "run-a", "from_seq": 1, "to_seq": 5}'],
            "replay request: expected a JSON object with v = 1",
        ),
        ([b"{}", b"{}"], "replay request: expected one frame, got 2"),
    ],
)
def test_a_bad_request_gets_an_error_reply_and_the_endpoint_keeps_serving(
    endpoint: tuple[VerdictStore, str], frames: list[bytes], error: str
) -> None:
    _, address = endpoint
    with pytest.raises(ValueError, match="^" + re.escape(f"replay refused: {error}")):
        decode_replay_reply(ask(address, frames))
    assert len(decode_replay_reply(ask(address, ReplayRequest("run-a", 1, 3).encode()))[1]) == 3


def test_a_taken_address_is_refused_in_one_line(endpoint: tuple[VerdictStore, str]) -> None:
    store, address = endpoint
    with pytest.raises(OSError, match=rf"^publisher.replay_address = '{address}': cannot bind \(Address already"):
        ReplayServer(store, address)


def test_an_unreadable_store_gets_an_error_reply_and_the_endpoint_keeps_serving(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = VerdictStore(f"sqlite:///{path}")
    store.write(verdicts("run-a", 5))
    address = f"tcp://127.0.0.1:{free_port()}"
    server = ReplayServer(store, address).start()
    try:
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE verdicts RENAME TO verdicts_moved")  # the store breaks under the endpoint
        with pytest.raises(ValueError, match=r"^replay refused: .*store.db: read failed \(no such table: verdicts\)"):
            decode_replay_reply(ask(address, ReplayRequest("run-a", 1, 5).encode()))
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE verdicts_moved RENAME TO verdicts")
        assert len(decode_replay_reply(ask(address, ReplayRequest("run-a", 1, 5).encode()))[1]) == 5
    finally:
        server.stop()
        store.close()


def test_the_holes_of_a_reply_are_the_seqs_not_stored(tmp_path: Path) -> None:
    store = VerdictStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.write([v for v in verdicts("run-a", 10) if v.seq not in (4, 5, 9)])  # the recorder is behind on these
    address = f"tcp://127.0.0.1:{free_port()}"
    server = ReplayServer(store, address, max_messages=12).start()
    try:
        header, messages = decode_replay_reply(ask(address, ReplayRequest("run-a", 2, 20).encode()))
        assert header["to_seq"] == 13 and reply_holes(header, messages) == [(4, 5), (9, 9), (11, 13)]
        header, messages = decode_replay_reply(ask(address, ReplayRequest("run-a", 6, 8).encode()))
        assert reply_holes(header, messages) == []
    finally:
        server.stop()
        store.close()
