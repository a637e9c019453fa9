"""The operator page as a person sees it: headless Chromium (Debian's `chromium` + `chromium-driver`, which
.ci/run installs) driven by selenium against a real run replaying a folder.

Screenshots of the live view and of a part's page are written to test-artifacts/ (or $LINEWATCH_TEST_ARTIFACTS).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_runtime import Subscriber

from pipeline.app.cli import main
from pipeline.app.config import config_from_dict
from pipeline.app.ports import free_port
from pipeline.settings import SourceConfig
from pipeline.store.reviews import Reviews
from pipeline.store.verdicts import VerdictStore
from pipeline.supervisor import Pipeline

ARTIFACTS = Path(os.environ.get("LINEWATCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
LIVE_WITHIN_MS = 1000  # a reject is on the page this soon after its ZeroMQ message's t_decision_ns
REJECTS_TIMED = 5


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no chromium + chromedriver here (apt-get install chromium chromium-driver; .ci/run does)")
    options = Options()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the operator page never listened on port {port}")


def until(browser: webdriver.Chrome, css: str, timeout_s: float = 10) -> Any:
    return WebDriverWait(browser, timeout_s).until(lambda b: b.find_element(By.CSS_SELECTOR, css))


def post(url: str, fields: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_reject_is_on_the_live_page_within_a_second_and_a_reviewer_labels_it(
    browser: webdriver.Chrome, bundle_path: Path, small_category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, port = tmp_path / "data", free_port()
    config = config_from_dict(
        {
            "pipeline": {"max_frame_height": 256, "max_frame_width": 256},
            "publisher": {
                "address": f"tcp://127.0.0.1:{free_port()}",
                "replay_address": f"tcp://127.0.0.1:{free_port()}",
                "heartbeat_ms": 100,
            },
            "metrics": {"port": 0},
            "store": {"path": str(data)},
            "ui": {"port": port, "feed_address": f"tcp://127.0.0.1:{free_port()}"},
        }
    )
    # The reviewer, made with the real command before the run.
    monkeypatch.setattr("sys.stdin", io.StringIO("quality-gate-7\n"))
    assert main(["user", "add", "alice", "--password-stdin", "--data", str(data)]) == 0
    rejects = Subscriber(config.publisher.address, b"reject")
    rejects.start()
    source = SourceConfig(spec=f"folder:{small_category}", rate_ppm=240, loop=True)  # 4 parts/s, until stopped
    pipeline = Pipeline(config, bundle_path, (source,))
    runner = threading.Thread(target=pipeline.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    site = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, 120)
        browser.get(site + "/")
        until(browser, "#heartbeat", 30)  # the first status arrived: the live feed is open
        page_ready_ms = browser.execute_script("return Date.now()")
        timed = wait_for_rejects(rejects, page_ready_ms, REJECTS_TIMED)
        delays = []
        for message in timed:
            card = until(browser, f"#reject-{message['run']}-{message['seq']}", 10)
            delays.append(int(card.get_attribute("data-shown-ms")) - message["t_decision_ns"] / 1e6)
        assert max(delays) < LIVE_WITHIN_MS, f"live view delays {delays} ms"
        newest = timed[-1]
        check_overlay(browser, site, data, newest)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "station-live.png"))
        review(browser, site, data, newest)
        browser.save_screenshot(str(ARTIFACTS / "station-part.png"))
    finally:
        browser.get("about:blank")  # closes the live feed's connection before the run stops
        pipeline.request_stop()
        runner.join(120)
        rejects.stop()
    assert not runner.is_alive()


def wait_for_rejects(listener: Subscriber, after_ms: float, n: int) -> list[dict[str, Any]]:
    """The first `n` reject messages decided once the page was open."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        fresh = [m for m in list(listener.messages) if m["t_decision_ns"] / 1e6 > after_ms + 50]
        if len(fresh) >= n:
            return fresh[:n]
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} rejects in 120 s")


def check_overlay(browser: webdriver.Chrome, site: str, data: Path, message: dict[str, Any]) -> None:
    """The reject card's image has loaded, and it is the archived overlay of that verdict."""
    store = VerdictStore(f"sqlite:///{data / 'verdicts.sqlite'}", create=False)
    (row,) = store.range(message["run"], message["seq"], message["seq"])
    store.close()
    image = until(browser, f"#reject-{message['run']}-{message['seq']} img")
    WebDriverWait(browser, 10).until(lambda b: b.execute_script("return arguments[0].naturalWidth", image) > 0)
    src = image.get_attribute("src")
    assert src == f"{site}/image/{row.image_key}?kind=overlay"
    with urllib.request.urlopen(src, timeout=10) as response:
        served = response.read()
    assert served == (data / "images" / f"{row.image_key}.overlay.jpg").read_bytes()
    width = browser.execute_script("return arguments[0].naturalWidth", image)
    assert width == 128  # the bundle's input size: the archived frame's


def review(browser: webdriver.Chrome, site: str, data: Path, message: dict[str, Any]) -> None:
    run, seq = message["run"], message["seq"]
    part = f"{site}/part/{run}/{seq}"
    url = f"sqlite:///{data / 'verdicts.sqlite'}"
    browser.get(part)
    until(browser, "#part-overlay")
    with pytest.raises(NoSuchElementException):
        browser.find_element(By.ID, "review")  # anonymous: no review form...
    assert post(f"{part}/label", {"label": "false_reject", "note": "forged"}) == 403  # ...and no way around it
    browser.get(f"{site}/login?next=/part/{run}/{seq}")
    until(browser, "#login-user").send_keys("alice")
    browser.find_element(By.ID, "login-password").send_keys("quality-gate-7")
    browser.find_element(By.ID, "login-submit").click()
    until(browser, "#review").find_element(By.ID, "review-note").send_keys("dust on the lens")
    before = time.time_ns()
    browser.find_element(By.ID, "label-false_reject").click()
    until(browser, "#labels")
    after = time.time_ns()
    store = VerdictStore(url, create=False)
    labels = Reviews(store).labels_of(run, seq)
    store.close()
    assert [(lb.label, lb.note, lb.user) for lb in labels] == [("false_reject", "dust on the lens", "alice")]
    assert before <= labels[0].t_ns <= after
    assert browser.find_element(By.ID, "user").text == "alice"
