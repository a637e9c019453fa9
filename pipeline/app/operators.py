"""`linewatch user` and `linewatch station`: who may review on the operator page, and the page without a run.

`user add` creates a reviewer (or gives one a new password) in the store the page reads; the password is
asked twice on the terminal, or read as one line from stdin (`--password-stdin`, for provisioning scripts).
`station` serves the operator page over a store and its image archive with no run on this box: a review
after the shift, or a QA office's view of a plant database.
"""

from __future__ import annotations

import getpass
import sys
import time
from pathlib import Path

from edge.bundle import read_bundle_file
from pipeline.app.history import StoreLocation
from pipeline.settings import UiConfig
from pipeline.station.health import NoRun
from pipeline.station.settings import BundleSummary, StationSettings, bundle_summary
from pipeline.store.reviews import Reviews
from pipeline.store.verdicts import VerdictStore


def read_password(from_stdin: bool) -> str:
    """The new password: one line of stdin, or typed twice at the terminal; ValueError when they differ."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ; nothing was changed")
    return first


def add_user(location: StoreLocation, name: str, password: str) -> bool:
    """Create `name` (True) or set its password (False) in the store at `location`, creating the store if new."""
    if location.url.startswith("sqlite:///"):
        Path(location.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    store = VerdictStore(location.url, line=location.line)
    try:
        return Reviews(store).set_user(name, password, time.time_ns())
    finally:
        store.close()


def list_users(location: StoreLocation) -> list[str]:
    store = VerdictStore(location.url, create=False, line=location.line)
    try:
        return Reviews(store).user_names()
    finally:
        store.close()


def station_settings(location: StoreLocation, ui: UiConfig, bundle: Path | None) -> StationSettings:
    """The page over the store at `location` alone (no live feed, no run); ValueError without a data folder."""
    if location.images is None:
        raise ValueError("--data: the operator page needs the data folder (its images/ and its session key)")
    summary: BundleSummary | None = None
    if bundle is not None:
        manifest, _, digest = read_bundle_file(bundle)
        summary = bundle_summary(bundle, manifest, digest)
    return StationSettings(
        store_url=location.url,
        store_line=location.line,
        archive=str(location.images),
        data=str(location.images.parent),
        host=ui.host,
        port=ui.port,
        window_min=ui.window_min,
        bundle=summary,
    )


def serve_station(settings: StationSettings) -> None:
    """Serve until Ctrl-C or SIGTERM."""
    import signal

    from pipeline.station.process import serve

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    VerdictStore(
        settings.store_url, create=False, line=settings.store_line
    ).close()  # a missing or foreign store: one line, now
    serve(settings, NoRun(), lambda: stopping, lambda port: print(f"operator page on http://{settings.host}:{port}/"))
