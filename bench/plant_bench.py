"""A plant on one machine: N line processes, each `linewatch run` with its own `store.line`, writing to one
PostgreSQL. Each line has its own Prometheus (deploy/prometheus.yml), and the plant's Prometheus
(deploy/plant/prometheus.yml, with its recording rules) federates them all.

Each line replays a video of `--frames` frames as its camera. The file is deleted once the line reads it, so
every line ends up with a fixed count and its camera unplugged while the process stays up. Then three
figures are compared, per line and verdict:
- the line's own counters (its /metrics);
- its rows in the shared store;
- the plant Prometheus's per-line aggregate, and the plant total against the sum of the lines, as federated.

    python bench/plant_bench.py --bundle line.pt --images DIR \\
        --store-url postgresql+psycopg://linewatch@127.0.0.1/linewatch --lines 4

Needs Debian's `prometheus` (the server) and a PostgreSQL the bench may write to.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import sqlalchemy
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipeline.app.ports import free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
LINE_CONFIG, PLANT_CONFIG = DEPLOY / "prometheus.yml", DEPLOY / "plant" / "prometheus.yml"
PLANT = "plant-sim"
VERDICTS = ("pass", "reject", "error")


@dataclass
class LineBox:
    line: str
    metrics_port: int
    video: Path
    proc: subprocess.Popen[bytes]

    def counters(self) -> Counter[str]:
        """Verdicts by kind, summed over cameras, from the line's own /metrics; empty while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as reply:
                text = reply.read().decode()
        except OSError:
            return Counter()
        counts: Counter[str] = Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "linewatch_frames_total":
                    counts[sample.labels["verdict"]] += int(sample.value)
        return counts


@dataclass
class PlantResult:
    own: dict[str, Counter[str]]  # line -> verdict -> count, from the line's /metrics
    stored: dict[str, Counter[str]]  # from the shared store's rows
    per_line: dict[str, Counter[str]]  # the plant Prometheus's line:linewatch_frames:sum
    plant: Counter[str]  # its plant:linewatch_frames:sum
    seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.problems


def write_video(images: Sequence[Path], path: Path, frames: int) -> None:
    pictures = [cv2.imread(str(p)) for p in images]
    h, w = pictures[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    for i in range(frames):
        writer.write(cv2.resize(pictures[i % len(pictures)], (w, h)))
    writer.release()


def start_line(index: int, bundle: Path, video: Path, store_url: str, workdir: Path) -> LineBox:
    line, port = f"line-{index + 1}", free_port()
    env = {
        **os.environ,
        "LINEWATCH_PIPELINE__BUNDLE": str(bundle),
        "LINEWATCH_PIPELINE__SOURCES": f'[{{spec: "camera:{video}", id: top, reconnect_max_s: 0.5}}]',
        "LINEWATCH_PIPELINE__CONTROL_ADDRESS": "null",
        "LINEWATCH_STORE__URL": store_url,
        "LINEWATCH_STORE__PATH": str(workdir / line),
        "LINEWATCH_STORE__LINE": line,
        "LINEWATCH_METRICS__PORT": str(port),
        "LINEWATCH_UI__ENABLED": "false",
        "LINEWATCH_GOLDEN__ENABLED": "false",
        "LINEWATCH_PUBLISHER__ADDRESS": f"tcp://127.0.0.1:{free_port()}",
        "LINEWATCH_PUBLISHER__REPLAY_ADDRESS": f"tcp://127.0.0.1:{free_port()}",
    }
    log = (workdir / f"{line}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return LineBox(line, port, video, proc)


def start_prometheus(name: str, config: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A Prometheus server of its own folder; returns it and its address (host:port)."""
    folder, port = workdir / name, free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}"]
        + [f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"127.0.0.1:{port}"


def line_prometheus(box: LineBox, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The line box's own Prometheus, as deploy/prometheus.yml sets it up: its target with plant and line."""
    config = yaml.safe_load(LINE_CONFIG.read_text())
    config["global"] |= {"scrape_interval": "1s", "external_labels": {"plant": PLANT, "line": box.line}}
    config["rule_files"] = []
    target = {"targets": [f"127.0.0.1:{box.metrics_port}"], "labels": {"plant": PLANT, "line": box.line}}
    (job,) = config["scrape_configs"]
    job["static_configs"] = [target]
    return start_prometheus(f"prometheus-{box.line}", config, workdir)


def plant_prometheus(line_servers: Sequence[str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """deploy/plant/prometheus.yml itself, federating the line boxes' Prometheus servers (1 s instead of 15 s)."""
    config = yaml.safe_load(PLANT_CONFIG.read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s", "external_labels": {"plant": PLANT}}
    config["rule_files"] = [str((PLANT_CONFIG.parent / f).resolve()) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": list(line_servers)}]
    return start_prometheus("prometheus-plant", config, workdir)


def query(api: str, expr: str) -> list[tuple[dict[str, str], float]]:
    try:
        url = f"{api}/query?query={urllib.parse.quote(expr)}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            result = json.loads(reply.read())["data"]["result"]
    except OSError:
        return []
    return [(r["metric"], float(r["value"][1])) for r in result]


def prometheus_figures(api: str) -> tuple[dict[str, Counter[str]], Counter[str]]:
    per_line: dict[str, Counter[str]] = {}
    for labels, value in query(api, f'line:linewatch_frames:sum{{plant="{PLANT}"}}'):
        per_line.setdefault(labels["line"], Counter())[labels["verdict"]] = int(value)
    plant = Counter(
        {labels["verdict"]: int(v) for labels, v in query(api, f'plant:linewatch_frames:sum{{plant="{PLANT}"}}')}
    )
    return per_line, plant


def stored_counts(store_url: str) -> dict[str, Counter[str]]:
    engine = sqlalchemy.create_engine(store_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text("SELECT line_id, verdict, count(*) FROM verdicts GROUP BY 1, 2"))
            found: dict[str, Counter[str]] = {}
            for line, verdict, n in rows:
                found.setdefault(line, Counter())[verdict] = int(n)
    finally:
        engine.dispose()
    return found


def wait_until(what: str, done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:.0f} s")
        time.sleep(0.5)


def settled(lines: Sequence[LineBox], quiet_s: float = 3.0) -> Callable[[], bool]:
    """True once every line's counters have stayed the same for quiet_s (its camera is gone for good)."""
    last: dict[str, tuple[Counter[str], float]] = {}

    def check() -> bool:
        now, still = time.monotonic(), True
        for box in lines:
            counts = box.counters()
            seen = last.get(box.line)
            if not counts or seen is None or seen[0] != counts:
                last[box.line] = (counts, now)
                still = False
            elif now - seen[1] < quiet_s:
                still = False
        return still

    return check


def compare(result: PlantResult) -> None:
    for line, own in sorted(result.own.items()):
        if result.stored.get(line, Counter()) != own:
            result.problems.append(f"{line}: store {dict(result.stored.get(line, {}))} != own {dict(own)}")
        if result.per_line.get(line, Counter()) != own:
            result.problems.append(f"{line}: plant view {dict(result.per_line.get(line, {}))} != own {dict(own)}")
    total = sum(result.own.values(), Counter())
    if result.plant != total:
        result.problems.append(f"plant total {dict(result.plant)} != sum of lines {dict(total)}")


def simulate_plant(
    bundle: Path, images: Sequence[Path], store_url: str, workdir: Path, lines: int = 4, frames: int = 40
) -> PlantResult:
    t0 = time.monotonic()
    boxes: list[LineBox] = []
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(lines):
            video = workdir / f"line-{i + 1}.avi"
            write_video(images, video, frames)
            boxes.append(start_line(i, bundle, video, store_url, workdir))
        line_servers = [line_prometheus(box, workdir) for box in boxes]
        plant, address = plant_prometheus([a for _, a in line_servers], workdir)
        servers = [p for p, _ in line_servers] + [plant]
        api = f"http://{address}/api/v1"
        for box in boxes:  # once a line reads its video, the file goes: it plays to the end, then stays unplugged
            wait_until(f"verdict from {box.line}", lambda b=box: sum(b.counters().values()) > 0, 300)
            box.video.unlink()
        wait_until("quiet lines", settled(boxes), 300)
        own = {box.line: box.counters() for box in boxes}
        wait_until("store rows", lambda: stored_counts(store_url) == own, 60)
        wait_until("plant figures", lambda: prometheus_figures(api)[0] == own, 60)
        per_line, plant = prometheus_figures(api)
        result = PlantResult(own, stored_counts(store_url), per_line, plant, time.monotonic() - t0)
        compare(result)
        return result
    finally:
        procs = [b.proc for b in boxes] + servers
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def report(result: PlantResult) -> str:
    rows = [f"{'line':10} {'figure':22} " + " ".join(f"{v:>7}" for v in VERDICTS)]
    for line in sorted(result.own):
        for name, counts in (
            ("own /metrics", result.own),
            ("store rows", result.stored),
            ("plant view", result.per_line),
        ):
            got = counts.get(line, Counter())
            rows.append(f"{line:10} {name:22} " + " ".join(f"{got[v]:>7}" for v in VERDICTS))
    total = sum(result.own.values(), Counter())
    rows.append(f"{'plant':10} {'sum of lines':22} " + " ".join(f"{total[v]:>7}" for v in VERDICTS))
    rows.append(f"{'plant':10} {'plant:..._frames:sum':22} " + " ".join(f"{result.plant[v]:>7}" for v in VERDICTS))
    verdict = "equal" if result.consistent else "DIFFERENT: " + "; ".join(result.problems)
    rows.append(f"{len(result.own)} lines, {result.seconds:.0f} s; plant aggregates against the lines' own: {verdict}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="calibrated bundle every line runs")
    parser.add_argument("--images", type=Path, required=True, help="folder of images the lines' videos are made of")
    parser.add_argument("--store-url", required=True, help="PostgreSQL the lines share (the bench writes to it)")
    parser.add_argument("--lines", type=int, default=4)
    parser.add_argument("--frames", type=int, default=40, help="frames each line's camera delivers")
    parser.add_argument("--workdir", type=Path, default=Path("plant-bench"))
    args = parser.parse_args(argv)
    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    if not images:
        parser.error(f"--images {args.images}: no image files in it")
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = simulate_plant(args.bundle, images, args.store_url, args.workdir, args.lines, args.frames)
    print(report(result))
    return 0 if result.consistent else 1


if __name__ == "__main__":
    sys.exit(main())
