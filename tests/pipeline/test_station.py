"""The operator page through its HTTP interface: history, part view, images, export, login, review, access.

The pages run on a real store (SQLite; the reviews also on PostgreSQL) and a real image archive; what a
person sees in a browser is tested in test_station_browser.py.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient
from test_recording import store_config
from test_store import verdicts

from calibration.datasets import MVTecCategory
from pipeline.app.cli import main
from pipeline.app.config import with_overrides
from pipeline.app.ports import free_port
from pipeline.selftest import SelfTestResult
from pipeline.settings import SourceConfig
from pipeline.state import STORE_WRITTEN, RunState
from pipeline.station.app import create_app
from pipeline.station.health import NoRun, RunHealth, StageSlot
from pipeline.station.live import RECENT_PER_CAMERA, LiveHub
from pipeline.station.process import serve
from pipeline.station.settings import BundleSummary, StationSettings
from pipeline.store.archive import ImageArchive
from pipeline.store.feed import StoredFeed, decode_feed
from pipeline.store.records import FIELDS
from pipeline.store.reviews import Label, ReviewError, Reviews, hash_password, verify_password
from pipeline.store.selftests import SelfTestLog
from pipeline.store.switches import BundleSwitch, SwitchLog
from pipeline.store.verdicts import StoredVerdict, VerdictStore
from pipeline.supervisor import Pipeline

PASSWORD = "line-3-quality"
BUNDLE = BundleSummary(
    path="/srv/line3/bundle.pt",
    hash="c0ffee" * 10 + "abcd",
    model="patchcore",
    backbone="efficientnet_lite0",
    created="2026-12-01T08:00:00+00:00",
    threshold=25.49,
    choice={"target_fpr": 0.01, "confidence": 0.95, "n": 400, "fpr_bound": 0.0074},
)


@pytest.fixture()
def line(tmp_path: Path) -> Iterator[tuple[VerdictStore, list[StoredVerdict], Path]]:
    """A store of 60 verdicts of one run whose rejects have archived images, and a reviewer."""
    data = tmp_path / "data"
    archive = ImageArchive(data / "images", 10**9, 90)
    rng = np.random.default_rng(0)
    rows = []
    for v in verdicts("run-a", 60):
        if v.verdict.verdict == "reject":
            frame = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            heat = rng.integers(0, 255, (64, 64), dtype=np.uint8)
            key = archive.save(v.run, v.seq, v.verdict.camera_id, v.verdict.t_capture_ns, frame, heat)
            v = StoredVerdict(v.run, v.seq, v.topic_seq, v.verdict, v.bundle, key)
        rows.append(v)
    store = VerdictStore(f"sqlite:///{data / 'verdicts.sqlite'}")
    store.write(rows)
    Reviews(store).set_user("alice", PASSWORD, time.time_ns())
    yield store, rows, data
    store.close()


def client_for(store: VerdictStore, data: Path, host: str = "127.0.0.1") -> TestClient:
    settings = StationSettings(
        store_url=store.url, archive=str(data / "images"), data=str(data), host=host, bundle=BUNDLE,
        cameras=("cam0", "cam1"),
    )  # fmt: skip
    return TestClient(create_app(settings, store, None, NoRun()), follow_redirects=False)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF field in the page"
    return found[1]


def log_in(client: TestClient, password: str = PASSWORD) -> int:
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"user": "alice", "password": password, "csrf": token, "next": "/"}).status_code


def test_history_lists_and_filters_the_store(line: tuple[VerdictStore, list[StoredVerdict], Path]) -> None:
    store, rows, data = line
    client = client_for(store, data)
    page = client.get("/history?verdict=reject&camera=cam1")
    assert page.status_code == 200
    wanted = [r for r in rows if r.verdict.verdict == "reject" and r.verdict.camera_id == "cam1"]
    linked = re.findall(r'href="/part/(run-a)/(\d+)"', page.text)
    assert sorted(int(seq) for _, seq in linked) == sorted(r.seq for r in wanted)
    assert f"{len(wanted)} parts" in page.text
    everything = client.get("/history?min_score=3")
    seqs = {int(s) for _, s in re.findall(r'href="/part/(run-a)/(\d+)"', everything.text)}
    assert seqs == {r.seq for r in rows if r.verdict.score is not None and r.verdict.score >= 3}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("verdict=maybe", "verdict: expected one of pass, reject, error, got &#39;maybe&#39;"),
        ("min_score=high", "min_score: expected a number, got &#39;high&#39;"),
        ("since=yesterday", "since &#39;yesterday&#39;: expected an ISO 8601 time"),
        ("page=0", "page: expected a whole number from 1, got &#39;0&#39;"),
    ],
)
def test_a_bad_history_parameter_is_refused_naming_it(
    line: tuple[VerdictStore, list[StoredVerdict], Path], query: str, message: str
) -> None:
    store, _, data = line
    page = client_for(store, data).get(f"/history?{query}")
    assert page.status_code == 400 and message in page.text


def test_history_pages_hold_100_rows_newest_first(tmp_path: Path) -> None:
    store = VerdictStore(f"sqlite:///{tmp_path / 'v.sqlite'}")
    store.write(verdicts("run-a", 250))
    client = client_for(store, tmp_path)
    pages = [re.findall(r'href="/part/run-a/(\d+)"', client.get(f"/history?page={p}").text) for p in (1, 2, 3)]
    assert [len(p) for p in pages] == [100, 100, 50]
    assert [int(s) for p in pages for s in p] == list(range(250, 0, -1))
    assert "page 1 of 3" in client.get("/history").text
    store.close()


def test_a_part_shows_its_facts_and_archived_images(line: tuple[VerdictStore, list[StoredVerdict], Path]) -> None:
    store, rows, data = line
    client = client_for(store, data)
    reject = next(r for r in rows if r.image_key)
    page = client.get(f"/part/run-a/{reject.seq}")
    assert page.status_code == 200
    assert f"{reject.verdict.score:.5g}" in page.text and "25.49" in page.text
    for kind in ("frame", "overlay"):
        assert f'src="/image/{reject.image_key}?kind={kind}"' in page.text
        image = client.get(f"/image/{reject.image_key}?kind={kind}")
        suffix = ".jpg" if kind == "frame" else ".overlay.jpg"
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert image.content == (data / "images" / f"{reject.image_key}{suffix}").read_bytes()
    assert client.get("/part/run-a/9999").status_code == 404


def test_image_routes_cannot_leave_the_archive(
    line: tuple[VerdictStore, list[StoredVerdict], Path], tmp_path: Path
) -> None:
    store, rows, data = line
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"not for the page")
    day = data / "images" / "2025-12-03"
    (day / "link").symlink_to(tmp_path, target_is_directory=True)  # a link out of the archive
    client = client_for(store, data)
    for path in (
        "/image/../secret?kind=frame",
        "/image/%2e%2e/%2e%2e/secret",
        "/image/2025-12-03/link/secret",
        "/image//etc/passwd",
        "/image/2025-12-03/cam1/run-a-0000000002?kind=../../x",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert b"not for the page" not in response.content


def test_csv_and_zip_export_the_current_search(line: tuple[VerdictStore, list[StoredVerdict], Path]) -> None:
    store, rows, data = line
    client = client_for(store, data)
    exported = client.get("/history.csv?verdict=reject")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert tuple(table[0].keys()) == FIELDS
    assert sorted(int(r["seq"]) for r in table) == sorted(r.seq for r in rows if r.verdict.verdict == "reject")
    bundle = zipfile.ZipFile(io.BytesIO(client.get("/history.zip?verdict=reject&camera=cam0").content))
    wanted = [r for r in rows if r.verdict.verdict == "reject" and r.verdict.camera_id == "cam0"]
    names = set(bundle.namelist())
    assert "verdicts.csv" in names
    for r in wanted:
        assert (
            bundle.read(f"images/{r.image_key}.overlay.jpg")
            == (data / "images" / f"{r.image_key}.overlay.jpg").read_bytes()
        )
    assert len(names) == 1 + 2 * len(wanted)


def test_reviewing_needs_a_logged_in_user_and_a_csrf_token_and_keeps_every_label(
    line: tuple[VerdictStore, list[StoredVerdict], Path],
) -> None:
    store, rows, data = line
    client = client_for(store, data)
    reject = next(r for r in rows if r.verdict.verdict == "reject")
    url = f"/part/run-a/{reject.seq}"
    anonymous = client.get(url).text
    assert 'id="review"' not in anonymous
    token = csrf_of(client.get("/login").text)  # a valid token of this session, without a user
    refused = client.post(f"{url}/label", data={"label": "false_reject", "note": "", "csrf": token})
    assert refused.status_code == 403 and "log in" in refused.text
    assert log_in(client, "wrong password") == 401
    assert log_in(client) == 303
    page = client.get(url).text
    assert 'id="review"' in page and 'id="label-missed_defect"' not in page  # a reject is not a missed defect
    token = csrf_of(page)
    assert client.post(f"{url}/label", data={"label": "false_reject", "note": "x"}).status_code == 403  # no token
    assert client.post(f"{url}/label", data={"label": "false_reject", "csrf": "forged"}).status_code == 403
    before = time.time_ns()
    done = client.post(f"{url}/label", data={"label": "false_reject", "note": "scratch is dust", "csrf": token})
    assert done.status_code == 303 and done.headers["location"] == url
    again = client.post(f"{url}/label", data={"label": "confirmed_defect", "note": "", "csrf": token})
    assert again.status_code == 303
    labels = Reviews(store).labels_of("run-a", reject.seq)
    assert [(lb.label, lb.note, lb.user) for lb in labels] == [
        ("false_reject", "scratch is dust", "alice"),
        ("confirmed_defect", "", "alice"),
    ]
    assert before <= labels[0].t_ns <= labels[1].t_ns <= time.time_ns()
    shown = client.get(url).text
    assert shown.index("false reject") < shown.index("confirmed defect")  # the audit trail, oldest first
    wrong = client.post(f"{url}/label", data={"label": "missed_defect", "csrf": token})
    assert wrong.status_code == 400 and "applies to a pass" in wrong.text
    assert len(Reviews(store).labels_of("run-a", reject.seq)) == 2


def test_beyond_localhost_every_page_needs_a_login(line: tuple[VerdictStore, list[StoredVerdict], Path]) -> None:
    store, rows, data = line
    client = client_for(store, data, host="0.0.0.0")
    reject = next(r for r in rows if r.image_key)
    assert client.get("/", headers={"accept": "text/html"}).status_code == 303
    for path in ("/history", f"/image/{reject.image_key}", "/history.csv", "/api/status", "/model"):
        assert client.get(path).status_code == 401, path
    assert client.get("/login").status_code == 200
    assert log_in(client) == 303
    assert client.get(f"/image/{reject.image_key}").status_code == 200
    assert client.get("/history").status_code == 200


def test_the_model_page_names_what_is_deciding(line: tuple[VerdictStore, list[StoredVerdict], Path]) -> None:
    store, _, data = line
    page = client_for(store, data).get("/model").text
    assert BUNDLE.hash in page and "patchcore" in page and "1 % false rejects with 95 % confidence" in page


def test_the_model_page_shows_each_cameras_bundle_and_the_changeovers(
    line: tuple[VerdictStore, list[StoredVerdict], Path],
) -> None:
    store, _, data = line
    other = "beef" * 16
    switches = SwitchLog(store)
    asked = 1_765_000_000_000_000_000
    made = BundleSwitch("run-a", "cam1", asked, "plc", "/srv/b.pt", BUNDLE.hash, other, "part_b", asked + 10**9)
    switches.record(made)
    shadow = BundleSwitch("run-a", "cam0", asked + 2 * 10**9, "qa", "/srv/d.pt", "", other, None, asked, shadow=True)
    switches.record(shadow)  # a shadow does not decide: cam0 still runs its start bundle
    refusal = "/srv/c.pt: content hash mismatch (recorded 1, actual 2): the file is corrupt or was modified"
    switches.record(BundleSwitch("run-a", "cam0", asked + 5 * 10**9, "alice", "/srv/c.pt", BUNDLE.hash, None,
                                 refused=refusal))  # fmt: skip
    settings = StationSettings(
        store_url=store.url, archive=str(data / "images"), data=str(data), bundle=BUNDLE, cameras=("cam0", "cam1"),
        run="run-a", camera_bundles={"cam0": BUNDLE, "cam1": BUNDLE},
    )  # fmt: skip
    page = TestClient(create_app(settings, store, None, NoRun())).get("/model").text
    cameras = page[page.index('id="cameras"') : page.index("</table>", page.index('id="cameras"'))]
    assert re.search(rf"cam0</td><td><code>{BUNDLE.hash[:16]}</code> {re.escape(BUNDLE.path)}", cameras)
    assert re.search(rf"cam1</td><td><code>{other[:16]}</code> \(switched during this run\)", cameras)
    assert "No golden self-test recorded." in page
    failed = SelfTestResult(
        BUNDLE.hash, BUNDLE.path, asked, 3, ("frame 0 (held-out good): reject at score 40",), "start"
    )
    SelfTestLog(store).record("run-a", failed)
    tests = TestClient(create_app(settings, store, None, NoRun())).get("/model").text
    assert "FAILED: frame 0 (held-out good): reject at score 40" in tests[tests.index('id="selftests"') :]
    listed = page[page.index('id="switches"') : page.index("Golden self-tests")]
    assert listed.index("alice") < listed.index("plc")  # newest first
    assert "part_b" in listed and "refused: /srv/c.pt: content hash mismatch" in listed
    assert listed.count('class="switched"') == 2 and listed.count('class="refused"') == 1
    assert "<td>cam0 (shadow)</td>" in listed


def test_status_counts_the_window_per_camera(tmp_path: Path) -> None:
    store = VerdictStore(f"sqlite:///{tmp_path / 'v.sqlite'}")
    now = time.time_ns()
    recent = [
        StoredVerdict("r", i, i, v.verdict.__class__(**{**vars(v.verdict), "t_decision_ns": now - i * 10**9}), "b")
        for i, v in enumerate(verdicts("r", 30), start=1)
    ]
    old = [
        StoredVerdict(
            "r", 100 + i, i, v.verdict.__class__(**{**vars(v.verdict), "t_decision_ns": now - 3600 * 10**9}), "b"
        )
        for i, v in enumerate(verdicts("r", 10))
    ]
    store.write(recent + old)
    status = client_for(store, tmp_path).get("/api/status").json()
    for camera in ("cam0", "cam1"):
        mine = [r for r in recent if r.verdict.camera_id == camera]
        counts = status["counts"][camera]
        assert counts["total"] == len(mine)
        assert counts["reject"] == sum(r.verdict.verdict == "reject" for r in mine)
        assert counts["reject_rate"] == pytest.approx(counts["reject"] / len(mine))
    assert status["target_fpr"] == 0.01 and status["health"] is None
    store.close()


def test_reviews_in_the_store(store_url: str) -> None:
    store = VerdictStore(store_url)
    store.write(verdicts("run-a", 6))
    reviews = Reviews(store)
    assert reviews.set_user("bob", "long enough", 1) is True
    assert reviews.set_user("bob", "another one", 2) is False  # a new password, same user
    assert reviews.authenticate("bob", "another one") and not reviews.authenticate("bob", "long enough")
    assert not reviews.authenticate("nobody", "another one")
    with pytest.raises(ReviewError, match="password of carol: expected at least 8 characters"):
        reviews.set_user("carol", "short", 3)
    with pytest.raises(ReviewError, match="user name 'a b'"):
        reviews.set_user("a b", "long enough", 3)
    with pytest.raises(ReviewError, match="verdict run-a/99: not in the store"):
        reviews.add_label("run-a", 99, "false_reject", "", "bob", 4)
    with pytest.raises(ReviewError, match="label 'bad': expected one of false_reject, confirmed_defect"):
        reviews.add_label("run-a", 1, "bad", "", "bob", 4)
    reviews.add_label("run-a", 1, "false_reject", "dust", "bob", 5)  # seq 1 is a reject (seq % 3 == 1)
    reviews.add_label("run-a", 4, "false_reject", "", "bob", 6)
    reviews.add_label("run-a", 4, "confirmed_defect", "looked again", "bob", 7)
    reviews.add_label("run-a", 3, "missed_defect", "", "bob", 8)  # seq 3 is a pass
    assert reviews.labels_of("run-a", 4) == [
        Label("run-a", 4, "false_reject", "", "bob", 6),
        Label("run-a", 4, "confirmed_defect", "looked again", "bob", 7),
    ]
    assert [v.seq for v in reviews.labelled("false_reject")] == [1]  # seq 4's current label is confirmed_defect
    assert [v.seq for v in reviews.labelled("confirmed_defect")] == [4]
    assert [v.seq for v in reviews.labelled("missed_defect")] == [3]
    store.close()


def test_password_hashes_are_salted_scrypt() -> None:
    one, two = hash_password("same password"), hash_password("same password")
    assert one != two and one.startswith("scrypt$16384$8$1$")
    assert verify_password("same password", one) and verify_password("same password", two)
    assert not verify_password("Same password", one)
    assert not verify_password("same password", "md5$abc") and not verify_password("x", "garbage")


def test_health_reads_the_run_state() -> None:
    state = RunState.create(cameras=1, processes=3)
    try:
        slots = (
            StageSlot("capture:cam0", 0, timeout_s=2, camera=0),
            StageSlot("infer", 1, timeout_s=30),
            StageSlot("decide", 2, timeout_s=2),
        )
        now = time.monotonic_ns()
        state.heartbeat_ns[:] = [now, now, now - 60 * 10**9]  # decide silent for a minute
        state.ready[:] = [0, 1, 1]
        state.restarts[2] = 2
        state.connected[0], state.captured[0] = 1, 40
        state.drop(0, "ring_full", 3)
        state.publisher[0], state.store[STORE_WRITTEN] = 37, 30
        health = RunHealth(state.spec, slots, ("cam0",)).snapshot()
        assert health is not None
        assert [(s["name"], s["state"], s["restarts"]) for s in health["stages"]] == [
            ("capture:cam0", "up", 0),
            ("infer", "up", 0),
            ("decide", "down", 2),
        ]
        assert health["cameras"] == [{"id": "cam0", "connected": True, "captured": 40, "drops": 3, "done": False}]
        assert health["store_backlog"] == 7 and health["store_failing"] is False
        state.done[0] = 1
        after = RunHealth(state.spec, slots, ("cam0",)).snapshot()
        assert after is not None and after["stages"][0]["state"] == "finished"
    finally:
        state.close()


def test_a_taken_port_costs_the_page_not_the_line(
    bundle_path: Path, small_category: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = store_config(tmp_path / "data")
        config = with_overrides(config, {"ui.port": port, "ui.feed_address": f"tcp://127.0.0.1:{free_port()}"})
        summary = Pipeline(config, bundle_path, (SourceConfig(spec=f"folder:{small_category}"),)).run(
            install_signals=False
        )
    n = len(MVTecCategory(small_category).test)
    assert summary.verdicts == n and summary.stored == n and summary.restarts == 0
    assert f"ui.host/ui.port = 127.0.0.1:{port}: cannot listen" in capfd.readouterr().err


def test_user_commands_add_list_and_refuse_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    monkeypatch.setattr("sys.stdin", io.StringIO("a long password\n"))
    assert main(["user", "add", "carol", "--password-stdin", "--data", str(data)]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["user", "add", "dave", "--password-stdin", "--data", str(data)]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("another long one\n"))
    assert main(["user", "add", "carol", "--password-stdin", "--data", str(data)]) == 0
    out, err = capsys.readouterr()
    assert "user carol: added in" in out and "user carol: password changed in" in out
    assert err.strip() == "linewatch: error: password of dave: expected at least 8 characters"
    assert main(["user", "list", "--data", str(data)]) == 0
    assert capsys.readouterr().out.split() == ["carol"]
    store = VerdictStore(f"sqlite:///{data / 'verdicts.sqlite'}")
    assert Reviews(store).authenticate("carol", "another long one")
    store.close()
    assert main(["user", "list", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no verdict store here" in capsys.readouterr().err


def test_the_station_command_serves_a_store_until_sigterm(line: tuple[VerdictStore, list[StoredVerdict], Path]) -> None:
    store, rows, data = line
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "station", "--data", str(data), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"operator page on http://127.0.0.1:{port}/"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/history?verdict=reject", timeout=10) as page:
            text = page.read().decode()
        assert sorted(int(s) for s in re.findall(r'href="/part/run-a/(\d+)"', text)) == sorted(
            r.seq for r in rows if r.verdict.verdict == "reject"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        proc.wait()


def test_the_recorders_feed_reaches_the_live_hub_with_image_keys(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    feed = StoredFeed(address)
    hub = LiveHub(address.replace("127.0.0.1", "*"), None).start()  # a wildcard bind address is connectable
    try:
        rows = [
            StoredVerdict(v.run, v.seq, v.topic_seq, v.verdict, v.bundle, f"k{v.seq}") for v in verdicts("run-a", 200)
        ]
        deadline = time.monotonic() + 10
        while not hub.snapshot() and time.monotonic() < deadline:  # PUB/SUB: sent before the join is lost
            feed.announce(rows[:1])
            time.sleep(0.05)
        feed.announce(rows[1:])
        while len(hub.snapshot()) < 2 * RECENT_PER_CAMERA and time.monotonic() < deadline:
            time.sleep(0.05)
        parts = hub.snapshot()
        assert len(parts) == 2 * RECENT_PER_CAMERA  # the newest of each camera
        assert {p["seq"] for p in parts} == {r.seq for r in rows[-2 * RECENT_PER_CAMERA :]}
        assert all(p["image_key"] == f"k{p['seq']}" for p in parts)
        assert parts == sorted(parts, key=lambda p: p["t_decision_ns"])
    finally:
        hub.stop()
        feed.close()
    with pytest.raises(ValueError, match="not a stored-verdicts feed message"):
        decode_feed([b"reject", b"{}"])
    with pytest.raises(ValueError, match="expected a JSON list of objects"):
        decode_feed([b"stored", b'{"seq": 1}'])


def test_a_reviewers_note_is_shown_as_text(line: tuple[VerdictStore, list[StoredVerdict], Path]) -> None:
    store, rows, data = line
    reject = next(r for r in rows if r.verdict.verdict == "reject")
    Reviews(store).add_label("run-a", reject.seq, "confirmed_defect", "<script>alert(1)</script>", "alice", 1)
    page = client_for(store, data).get(f"/part/run-a/{reject.seq}").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_stopping_the_page_ends_open_live_views_cleanly(
    line: tuple[VerdictStore, list[StoredVerdict], Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, _, data = line
    port, stop = free_port(), threading.Event()
    settings = StationSettings(
        store_url=f"sqlite:///{data / 'verdicts.sqlite'}", archive=str(data / "images"), data=str(data), port=port
    )
    listening = threading.Event()
    server = threading.Thread(target=serve, args=(settings, NoRun(), stop.is_set, lambda _: listening.set()))
    server.start()
    assert listening.wait(10)
    stream = urllib.request.urlopen(f"http://127.0.0.1:{port}/live/events", timeout=10)
    assert stream.readline() == b"event: snapshot\n"
    stopped_at = time.monotonic()
    stop.set()
    server.join(10)
    assert not server.is_alive() and time.monotonic() - stopped_at < 3
    rest = stream.read()  # the stream was ended by the page, not cut
    assert rest.endswith(b"\n\n")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
