"""Example PLC bridge: subscribe to linewatch rejects, log them, and notice every missed message.

    python deploy/plc_bridge.py --address tcp://127.0.0.1:5556 --state /var/lib/linewatch/bridge.json

A real bridge would drive the reject gate where this one logs: at t_capture_ns + conveyor transit
time (or at the trigger/encoder count of the part plus the gate's offset). The last sequence number
seen is kept in --state, so a bridge that restarts reports exactly which messages it missed while it
was away. Subscribing to `reject` only, gaps are checked on `topic_seq` (the per-verdict sequence);
with --all, on `seq`. An `error` verdict means linewatch could not score the part: treat it as a
reject (fail safe), which is why it is subscribed to as well.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import zmq

from pipeline.wire import GapTracker, decode


class Bridge:
    def __init__(self, state_path: Path | None, all_verdicts: bool) -> None:
        self.state_path = state_path
        self.all = all_verdicts
        self.trackers: dict[str, GapTracker] = {}
        if state_path is not None and state_path.is_file():
            saved = json.loads(state_path.read_text())
            for topic, (run, last) in saved.items():
                self.trackers[topic] = GapTracker(self._key(), last, run)

    def _key(self) -> str:
        return "seq" if self.all else "topic_seq"

    def handle(self, frames: list[bytes]) -> list[str]:
        """Lines to log for one message (the reject itself, and a gap before it if any)."""
        try:
            msg = decode(frames)
        except ValueError as exc:
            return [f"ignored message: {exc}"]
        topic = "all" if self.all else msg["verdict"]
        tracker = self.trackers.setdefault(topic, GapTracker(self._key()))
        lines = []
        gap = tracker.see(msg)
        if gap is not None:
            lines.append(f"GAP: missed {topic} messages {gap[0]}..{gap[1]} ({gap[1] - gap[0] + 1}) of run {msg['run']}")
        if msg["verdict"] != "pass":
            latency_ms = (msg["t_decision_ns"] - msg["t_capture_ns"]) / 1e6
            lines.append(
                f"{msg['verdict'].upper()}: camera {msg['camera_id']} frame {msg['frame_id']} trigger {msg['trigger']} "
                f"score {msg['score']} > {msg['threshold']:.4g}, decided {latency_ms:.1f} ms after capture"
            )
        return lines

    def save(self) -> None:
        if self.state_path is None:
            return
        data = {t: (tr.run, tr.last) for t, tr in self.trackers.items()}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.state_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Log linewatch rejects and missed messages.")
    parser.add_argument("--address", default="tcp://127.0.0.1:5556")
    parser.add_argument("--state", type=Path, help="file keeping the last sequence number seen")
    parser.add_argument("--all", action="store_true", help="subscribe to every verdict, not only reject/error")
    parser.add_argument("--duration", type=float, help="exit after this many seconds")
    args = parser.parse_args(argv)
    bridge = Bridge(args.state, args.all)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    for topic in [b""] if args.all else [b"reject", b"error"]:
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.setsockopt(zmq.RCVTIMEO, 200)
    sock.connect(args.address)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    end = time.monotonic() + args.duration if args.duration else None
    try:
        while not stop and (end is None or time.monotonic() < end):
            try:
                frames = sock.recv_multipart()
            except zmq.Again:
                continue
            for line in bridge.handle(frames):
                print(line, flush=True)
            bridge.save()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
