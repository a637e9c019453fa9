"""Operator-page benchmark: the history view over a large store, and what an open live view costs the line.

1. History: a store of `--rows` verdicts (default 1,000,000; 4 cameras over 30 days, 2 % rejects) in
   SQLite and, with `--store-url`, PostgreSQL; the page served by uvicorn as `linewatch run` serves it.
   Each search below is loaded `--loads` times over HTTP after one warm-up; printed: p50 and max ms to
   the last byte. With Chromium and chromedriver installed, the browser's own load time of the first
   search too (navigation start to the load event).
2. Live view: a looping replay of `--data` through the pipeline with the store on, at `--rate` parts/s
   (default 100, or half the pipeline's measured throughput when that is lower; the rate used is
   printed), in rounds of page off, page on with headless Chromium on the live view, on, off
   (`--seconds` of replay per setting). Printed: end-to-end p50/p99 each way, the p99's change with a
   90 % bootstrap interval over the runs, and the spread between two halves of the off runs (the box's
   own noise).

    python bench/station_bench.py --bundle B.pt --data FOLDER [--rows 1000000] [--loads 10]
        [--seconds 120] [--rate 100] [--store-url URL] [--skip-history | --skip-live]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from linewatch_plc.wire import Verdict
from pipeline.app.bench import Replay, timed_replay
from pipeline.app.config import Config, load_config, with_overrides
from pipeline.app.ports import free_port
from pipeline.app.store_bench import latency_with_and_without_store, p99_change_interval, p99_spread, rounds_for
from pipeline.station.health import NoRun
from pipeline.station.process import serve
from pipeline.station.settings import StationSettings
from pipeline.store.keys import image_key
from pipeline.store.verdicts import StoredVerdict, VerdictStore

CAMERAS = ("cam0", "cam1", "cam2", "cam3")
DAYS = 30
FILL_BATCH = 20_000
NS_PER_DAY = 86_400 * 10**9


def fill(store: VerdictStore, rows: int, seed: int = 0) -> int:
    """`rows` verdicts of one run, evenly over the last DAYS days; returns the decision time of the first."""
    rng = np.random.default_rng(seed)
    start = time.time_ns() - DAYS * NS_PER_DAY
    step = DAYS * NS_PER_DAY // rows
    for first in range(0, rows, FILL_BATCH):
        batch = []
        for seq in range(first + 1, min(rows, first + FILL_BATCH) + 1):
            t = start + seq * step
            score = float(rng.gamma(4.0, 0.1))
            kind = "reject" if rng.random() < 0.02 else "pass"
            camera = CAMERAS[seq % len(CAMERAS)]
            verdict = Verdict(camera, seq // len(CAMERAS), t - 20_000_000, t, score, 1.0, kind, None)
            key = image_key("bench", seq, camera, t) if kind == "reject" else None
            batch.append(StoredVerdict("bench", seq, seq, verdict, "bench", key))
        store.write(batch)
    return start


@contextmanager
def served(url: str, data: Path) -> Iterator[int]:
    """The page over the store at `url`, in a thread; yields its port."""
    port, stop = free_port(), threading.Event()
    settings = StationSettings(store_url=url, archive=str(data / "images"), data=str(data), port=port,
                               cameras=CAMERAS)  # fmt: skip
    thread = threading.Thread(target=serve, args=(settings, NoRun(), stop.is_set, lambda _: None), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield port
    finally:
        stop.set()
        thread.join(10)


def load_ms(url: str, loads: int) -> np.ndarray:
    urllib.request.urlopen(url, timeout=60).read()  # warm-up: the database's pages in memory
    out = []
    for _ in range(loads):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()
        out.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(out)


def searches(start_ns: int) -> dict[str, str]:
    day = time.strftime("%Y-%m-%dT%H:%M", time.localtime((start_ns + 10 * NS_PER_DAY) / 1e9))
    next_day = time.strftime("%Y-%m-%dT%H:%M", time.localtime((start_ns + 11 * NS_PER_DAY) / 1e9))
    return {
        "newest 100": "/history",
        "rejects": "/history?verdict=reject",
        "one camera's rejects": "/history?camera=cam2&verdict=reject",
        "one day": f"/history?since={day}&until={next_day}",
        "score >= 0.9": "/history?min_score=0.9",
        "page 100": "/history?page=100",
    }


def browser_load_ms(url: str) -> float | None:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        return None
    chrome = _chrome(binary, driver)
    try:
        chrome.get(url)  # warm-up
        chrome.get(url)
        timing = chrome.execute_script("return performance.getEntriesByType('navigation')[0].toJSON()")
        return float(timing["loadEventEnd"] - timing["startTime"])
    finally:
        chrome.quit()


def _chrome(binary: str, driver: str):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def history_bench(url: str, data: Path, rows: int, loads: int, name: str) -> None:
    store = VerdictStore(url)
    t0 = time.perf_counter()
    start = fill(store, rows)
    store.close()
    print(f"{name}: {rows:,} verdicts written in {time.perf_counter() - t0:.0f} s")
    with served(url, data) as port:
        for what, path in searches(start).items():
            ms = load_ms(f"http://127.0.0.1:{port}{path}", loads)
            print(f"  {what:22s} p50 {np.median(ms):7.1f} ms   max {ms.max():7.1f} ms   ({path})")
        in_browser = browser_load_ms(f"http://127.0.0.1:{port}/history")
        if in_browser is not None:
            print(f"  in Chromium, newest 100: {in_browser:.0f} ms from navigation to the load event")


def live_bench(config: Config, bundle: Path, data: Path, seconds: float, rate: float) -> None:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        raise SystemExit("station_bench: the live part needs chromium and chromedriver (apt-get install ...)")
    free = timed_replay(with_overrides(config, {"ui.enabled": False}), bundle, data, 10.0)
    rate = min(rate, free.fps / 2)
    print(f"live view: pipeline alone {free.fps:.1f} parts/s; replay paced at {rate:.1f} parts/s")
    rounds = rounds_for(seconds)

    def replay(page_on: bool, rate_ppm: float) -> Replay:
        port = free_port()
        run = with_overrides(config, {"ui.enabled": page_on, "ui.port": port})
        if not page_on:
            return timed_replay(run, bundle, data, seconds / (2 * rounds), rate_ppm)
        watcher = threading.Thread(target=_watch_live, args=(port, binary, driver, stop := threading.Event()))
        watcher.start()
        try:
            return timed_replay(run, bundle, data, seconds / (2 * rounds), rate_ppm)
        finally:
            stop.set()
            watcher.join(60)

    off, on = latency_with_and_without_store(replay, rate * 60, rounds)
    off_ms, on_ms = np.concatenate([r.e2e_ms for r in off]), np.concatenate([r.e2e_ms for r in on])
    low, high = p99_change_interval([r.e2e_ms for r in off], [r.e2e_ms for r in on])
    p50 = (np.percentile(off_ms, 50), np.percentile(on_ms, 50))
    p99 = (np.percentile(off_ms, 99), np.percentile(on_ms, 99))
    print(f"  page off: p50 {p50[0]:.1f} ms, p99 {p99[0]:.1f} ms ({len(off)} runs, {off_ms.size} verdicts)")
    print(f"  page on, Chromium on the live view: p50 {p50[1]:.1f} ms, p99 {p99[1]:.1f} ms ({on_ms.size} verdicts)")
    print(f"  p99 change {p99[1] / p99[0] - 1:+.1%}, 90 % interval {low:+.1%} to {high:+.1%};"
          f" off runs' halves differ by {p99_spread([r.e2e_ms for r in off]):.1%}")  # fmt: skip


def _watch_live(port: int, binary: str, driver: str, stop: threading.Event) -> None:
    """Headless Chromium on the live view from when the page listens until `stop`."""
    while not stop.is_set():
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=1).read()
            break
        except OSError:
            time.sleep(0.2)
    chrome = _chrome(binary, driver)
    try:
        chrome.get(f"http://127.0.0.1:{port}/")
        stop.wait()
        chrome.get("about:blank")
    finally:
        chrome.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="calibrated bundle (the live part)")
    parser.add_argument("--data", type=Path, help="folder of frames to replay (the live part)")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--loads", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--rate", type=float, default=100.0, help="parts/s of the live part's replay")
    parser.add_argument("--store-url", help="a PostgreSQL database (empty) for the history part too")
    parser.add_argument("--skip-history", action="store_true")
    parser.add_argument("--skip-live", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="linewatch-station-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_history:
            history_bench(f"sqlite:///{work / 'verdicts.sqlite'}", work, args.rows, args.loads, "SQLite")
            if args.store_url:
                history_bench(args.store_url, work, args.rows, args.loads, "PostgreSQL")
        if not args.skip_live:
            if args.bundle is None or args.data is None:
                raise SystemExit("station_bench: the live part needs --bundle and --data (or --skip-live)")
            config = with_overrides(load_config(args.config), {"store.path": str(work / "line")})
            live_bench(config, args.bundle, args.data, args.seconds, args.rate)


if __name__ == "__main__":
    main()
