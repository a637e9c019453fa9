"""Benchmark: product changeover and shadow bundles on a running line.

    python bench/changeover_bench.py [--rate 600] [--switches 6] [--seconds 20] [--rounds 2]

Two bundles are calibrated on generated categories (brick and grass, 128 px). A camera replays brick in a
loop at `--rate` parts per minute while the camera is switched back and forth between the two bundles
(`linewatch switch`'s request); per switch it prints the time from the request to the reply (checking,
loading and warming up the bundle: a bundle the run holds already needs no loading) and to the first
published verdict decided by the new bundle. Then the same paced replay runs without and with a shadow
bundle, alternating, `--rounds` times each for `--seconds`: end-to-end latency p50 / p99 of both, and
the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import zmq

from calibration.calibrate import calibrate
from calibration.datasets import normal_frames
from calibration.synthetic import generate_mvtec_dataset
from edge.bundle import save_bundle
from linewatch_plc.wire import HEARTBEAT_TOPIC, decode
from pipeline.app.config import Config, config_from_dict
from pipeline.app.ports import free_port
from pipeline.changeover import SwitchRequest, ask_switch
from pipeline.settings import SourceConfig
from pipeline.supervisor import Pipeline, RunSummary


def make_bundle(root: Path, family: str, n_train: int) -> tuple[Path, Path]:
    category = generate_mvtec_dataset(root / family, (family,), n_train=n_train, size=128, seed=1)[0]
    config = config_from_dict({"model": {"input_size": 128}, "calibration": {"target_fpr": 0.05, "confidence": 0.9}})
    cal = calibrate(config, normal_frames(category))
    path = root / f"{family}.pt"
    save_bundle(path, cal.fit.model, cal.manifest, cal.golden)
    return category, path


def line_config(port: int, control: str, store: Path) -> Config:
    return config_from_dict(
        {
            "pipeline": {"control_address": control, "max_frame_height": 256, "max_frame_width": 256},
            "publisher": {"address": f"tcp://127.0.0.1:{port}", "replay_address": f"tcp://127.0.0.1:{free_port()}"},
            "metrics": {"enabled": False},
            "store": {"path": str(store)},
            "ui": {"enabled": False},
        }
    )


class FirstOfBundle(threading.Thread):
    """Watches the published verdicts and notes when each bundle hash was first seen after `since`."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVTIMEO, 100)
        self.sock.connect(address)
        self.seen: list[tuple[float, str]] = []  # (time.monotonic() received, bundle)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                frames = self.sock.recv_multipart()
            except zmq.Again:
                continue
            if frames[0] != HEARTBEAT_TOPIC.encode():
                self.seen.append((time.monotonic(), decode(frames)["bundle"]))

    def first(self, bundle: str, since: float, timeout_s: float = 60.0) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t, b in list(self.seen):
                if t >= since and b == bundle:
                    return t
            time.sleep(0.005)
        return None

    def stop(self) -> None:
        self.done.set()
        self.join(5)
        self.sock.close()
        self.ctx.term()


def switch_latencies(root: Path, category: Path, bundles: tuple[Path, Path], rate: float, switches: int) -> None:
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    watcher = FirstOfBundle(f"tcp://127.0.0.1:{port}")
    watcher.start()
    source = SourceConfig(spec=f"folder:{category}", id="top", rate_ppm=rate, loop=True)
    pipeline = Pipeline(line_config(port, control, root / "data-switch"), bundles[0], (source,))
    rows: list[tuple[int, float, float | None, bool]] = []

    def operator() -> None:
        try:
            while not watcher.seen:  # the line is running: the model is loaded and the camera delivers
                time.sleep(0.05)
            time.sleep(2)
            for i in range(switches):
                target = bundles[(i + 1) % 2]
                t0 = time.monotonic()
                outcome = ask_switch(control, SwitchRequest("top", str(target), by="bench"), 300)
                replied = time.monotonic()
                first = watcher.first(outcome.to_bundle or "", t0) if outcome.switched else None
                # Only the first switch loads a bundle; after it the run holds both.
                rows.append((i + 1, (replied - t0) * 1e3, None if first is None else (first - t0) * 1e3, i == 0))
                time.sleep(2)
        finally:
            pipeline.request_stop()

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    summary = pipeline.run(duration_s=600, install_signals=False)
    thread.join(10)
    watcher.stop()
    print(f"\n== switch latency: one camera at {rate:g} parts/min, {summary.frames} frames, {summary.drops} dropped")
    print("switch  bundle loaded before  request->reply ms  request->first verdict on it ms")
    for i, reply_ms, first_ms, first_time in rows:
        first = "-" if first_ms is None else f"{first_ms:.0f}"
        print(f"{i:>6}  {'no' if first_time else 'yes':>20}  {reply_ms:>17.0f}  {first:>31}")
    for label, fresh in (("loaded for the switch", True), ("held already", False)):
        firsts = [f for _, _, f, t in rows if t == fresh and f is not None]
        if firsts:
            print(f"median to first verdict, bundle {label}: {statistics.median(firsts):.0f} ms")


def paced_run(root: Path, category: Path, bundle: Path, shadow: Path | None, rate: float, seconds: float) -> RunSummary:
    port = free_port()
    source = SourceConfig(
        spec=f"folder:{category}",
        id="top",
        rate_ppm=rate,
        loop=True,
        shadow_bundle=None if shadow is None else str(shadow),
    )
    config = line_config(port, f"tcp://127.0.0.1:{free_port()}", root / "data-shadow")
    return Pipeline(config, bundle, (source,)).run(duration_s=seconds, install_signals=False)


def shadow_cost(
    root: Path, category: Path, bundles: tuple[Path, Path], rate: float, seconds: float, rounds: int
) -> None:
    p50: dict[str, list[float]] = {"without": [], "with": []}
    p99: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(rounds):  # alternating: the box's drift during the bench falls on both alike
        for name, shadow in (("without", None), ("with", bundles[1])):
            s = paced_run(root, category, bundles[0], shadow, rate, seconds)
            if s.latency_ms_p50 is not None and s.latency_ms_p99 is not None:
                p50[name].append(s.latency_ms_p50)
                p99[name].append(s.latency_ms_p99)
    print(f"\n== shadow bundle cost: {rate:g} parts/min, {rounds} x {seconds:g} s each, alternating")
    print("shadow    p50 ms   p99 ms")
    for name in ("without", "with"):
        print(f"{name:<8} {statistics.mean(p50[name]):>7.1f} {statistics.mean(p99[name]):>8.1f}")
    ratio = statistics.mean(p99["with"]) / statistics.mean(p99["without"])
    print(f"p99 with / without: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=600.0, help="parts per minute of the replay")
    parser.add_argument("--switches", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each shadow / no-shadow run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        brick, brick_bundle = make_bundle(root, "brick", args.n_train)
        _, grass_bundle = make_bundle(root, "grass", args.n_train)
        bundles = (brick_bundle, grass_bundle)
        switch_latencies(root, brick, bundles, args.rate, args.switches)
        shadow_cost(root, brick, bundles, args.rate, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
