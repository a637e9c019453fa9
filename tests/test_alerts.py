"""The alert rules, checked and unit-tested by Prometheus's own promtool (Debian's `prometheus`; .ci/run
installs it): every alert fires on the series that should page someone and stays silent on a healthy line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.app.ports import free_port
from tests.pipeline.test_endpoints import get_or_none, wait_for
from tests.pipeline.test_runtime import write_stream

RULES = Path(__file__).resolve().parents[1] / "deploy" / "alerts.yml"
BOX = {"instance": "box:9108", "job": "linewatch", "line": "line-3"}  # `line` comes from the scrape target

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="no promtool here (apt-get install prometheus; .ci/run does)"
)


def series(name: str, **labels: str) -> str:
    text = ",".join(f'{k}="{v}"' for k, v in {**BOX, **labels}.items())
    return f"{name}{{{text}}}"


def rule(alert: str) -> dict[str, Any]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return next(r for g in groups for r in g["rules"] if r.get("alert") == alert)


def expected(alert: str, **labels: str) -> dict[str, Any]:
    """One firing alert of `alert` with `labels` (besides the box's), its annotations rendered from the rules."""
    r = rule(alert)
    all_labels = {**BOX, **labels, **r["labels"]}
    annotations = {
        k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: all_labels[m.group(1)], v)
        for k, v in r["annotations"].items()
    }
    return {"exp_labels": all_labels, "exp_annotations": annotations}


def promtool_test(tmp_path: Path, inputs: dict[str, str], checks: list[tuple[str, str, list[dict]]]) -> None:
    """Feed `inputs` (series -> promtool value notation, one sample per 15 s) to the rules and check that at each
    (time, alert) exactly the expected alerts fire."""
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [{"series": s, "values": v} for s, v in inputs.items()],
                "alert_rule_test": [
                    {"eval_time": at, "alertname": alert, "exp_alerts": alerts} for at, alert, alerts in checks
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    proc = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_pass_promtool_check() -> None:
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def frames(camera: str, verdict: str) -> str:
    return series("linewatch_frames_total", camera=camera, verdict=verdict)


def test_reject_rate_alert_is_a_binomial_test_against_the_calibrated_bound(tmp_path: Path) -> None:
    """Bound 5 %, 150 parts per 15 s. cam0 rejects 5.3 % (within chance of the bound), then 13 % from minute
    15; cam1 rejects nothing; cam2 rejects 6 % of only 2 parts per 15 s, too few to judge at all."""
    inputs = {
        **{series("linewatch_false_reject_bound", camera=cam): "0.05x120" for cam in ("cam0", "cam1", "cam2")},
        frames("cam0", "pass"): "0+142x60 8520+130x60",
        frames("cam0", "reject"): "0+8x60 480+20x60",
        frames("cam1", "pass"): "0+150x120",
        frames("cam1", "reject"): "0x120",
        frames("cam2", "pass"): "0+2x120",
        frames("cam2", "reject"): "0+0.12x120",
    }
    fired = [expected("LinewatchRejectRateAboveBound", camera="cam0")]
    checks = [
        ("14m", "LinewatchRejectRateAboveBound", []),
        ("16m", "LinewatchRejectRateAboveBound", []),  # over the bound, but not yet for 5 minutes
        ("28m", "LinewatchRejectRateAboveBound", fired),
    ]
    promtool_test(tmp_path, inputs, checks)


def test_error_verdicts_and_drops_alert_while_shutdown_drops_do_not(tmp_path: Path) -> None:
    inputs = {
        frames("cam0", "error"): "0x20 1 2 3 3x20",
        frames("cam1", "error"): "0x45",
        series("linewatch_dropped_frames_total", camera="cam0", reason="ring_full"): "0x20 4 9 9x20",
        series("linewatch_dropped_frames_total", camera="cam1", reason="shutdown"): "0x20 4 9 9x20",
    }
    checks = [
        ("4m", "LinewatchErrorVerdicts", []),
        ("6m", "LinewatchErrorVerdicts", [expected("LinewatchErrorVerdicts", camera="cam0")]),
        ("6m", "LinewatchFramesDropped", [expected("LinewatchFramesDropped", camera="cam0")]),
        ("11m", "LinewatchErrorVerdicts", []),  # 5 minutes without a new error: resolved
    ]
    promtool_test(tmp_path, inputs, checks)


def test_restart_and_heartbeat_alerts(tmp_path: Path) -> None:
    inputs = {
        series("linewatch_stage_restarts_total", stage="infer"): "0x20 1x40",
        series("linewatch_stage_restarts_total", stage="decide"): "0x60",
        series("linewatch_stage_heartbeat_age_seconds", stage="decide"): "0.05x20 15x10",
        series("linewatch_stage_heartbeat_age_seconds", stage="recorder"): "30x30",  # off the verdict path
    }
    checks = [
        ("4m", "LinewatchStageRestarted", []),
        ("6m", "LinewatchStageRestarted", [expected("LinewatchStageRestarted", stage="infer")]),
        ("4m", "LinewatchHeartbeatStale", []),
        ("5m15s", "LinewatchHeartbeatStale", []),  # stale, not yet for 30 s
        ("6m", "LinewatchHeartbeatStale", [expected("LinewatchHeartbeatStale", stage="decide")]),
    ]
    promtool_test(tmp_path, inputs, checks)


def test_drift_alert_fires_at_the_alarm_level(tmp_path: Path) -> None:
    inputs = {
        series("linewatch_drift_alarm_level"): "1e6x100",
        series("linewatch_drift_statistic", camera="cam0"): "0.5x10 1e3x10 2e6x10 9e5 2e6x4 10x60",
        series("linewatch_drift_statistic", camera="cam1"): "3x100",
    }
    fired = [expected("LinewatchScoresDrifted", camera="cam0")]
    checks = [
        ("4m", "LinewatchScoresDrifted", []),
        ("5m30s", "LinewatchScoresDrifted", fired),
        ("8m15s", "LinewatchScoresDrifted", fired),  # a dip under the level: still one alert
        ("15m", "LinewatchScoresDrifted", fired),  # back in line, kept firing for 10 minutes
        ("20m", "LinewatchScoresDrifted", []),
    ]
    promtool_test(tmp_path, inputs, checks)


def test_camera_disconnected_and_no_verdicts_while_connected(tmp_path: Path) -> None:
    """cam0 unplugged at minute 2; cam1 connected but its counts stop at minute 2; cam2 healthy."""
    inputs = {
        series("linewatch_camera_connected", camera="cam0"): "1x8 0x40",
        series("linewatch_camera_connected", camera="cam1"): "1x48",
        series("linewatch_camera_connected", camera="cam2"): "1x48",
        frames("cam0", "pass"): "0+10x8 80x40",
        frames("cam1", "pass"): "0+10x8 80x40",
        frames("cam2", "pass"): "0+10x48",
    }
    checks = [
        ("2m15s", "LinewatchCameraDisconnected", []),  # down, but not for 30 s yet
        ("3m", "LinewatchCameraDisconnected", [expected("LinewatchCameraDisconnected", camera="cam0")]),
        ("3m", "LinewatchNoVerdicts", []),
        ("7m", "LinewatchNoVerdicts", [expected("LinewatchNoVerdicts", camera="cam1")]),
    ]
    promtool_test(tmp_path, inputs, checks)


def test_store_alerts_and_box_liveness(tmp_path: Path) -> None:
    inputs = {
        series("linewatch_store_backlog"): "0x4 0+20x80",
        series("linewatch_store_lost_total"): "0x30 5x10",
        series("linewatch_up"): "1x20 0x5",
        series("up"): "1x20 0x10",
    }
    checks = [
        ("4m", "LinewatchStoreBacklogGrowing", []),  # growing, but not for 10 minutes yet
        ("19m", "LinewatchStoreBacklogGrowing", [expected("LinewatchStoreBacklogGrowing")]),
        ("6m", "LinewatchVerdictsNotRecorded", []),
        ("8m", "LinewatchVerdictsNotRecorded", [expected("LinewatchVerdictsNotRecorded")]),
        ("4m", "LinewatchSupervisorStalled", []),
        ("5m15s", "LinewatchSupervisorStalled", [expected("LinewatchSupervisorStalled")]),
        ("5m30s", "LinewatchDown", []),  # down, not yet for a minute
        ("6m30s", "LinewatchDown", [expected("LinewatchDown")]),
    ]
    promtool_test(tmp_path, inputs, checks)


def test_a_failed_self_test_alerts_at_once_and_clears_when_one_passes(tmp_path: Path) -> None:
    inputs = {series("linewatch_selftest_passed", camera="cam0"): "1x10 0x10 1x10"}
    fired = [expected("LinewatchSelfTestFailed", camera="cam0")]
    checks = [("1m", "LinewatchSelfTestFailed", []), ("3m", "LinewatchSelfTestFailed", fired),
              ("6m", "LinewatchSelfTestFailed", [])]  # fmt: skip
    promtool_test(tmp_path, inputs, checks)


def test_a_healthy_line_raises_no_alert(tmp_path: Path) -> None:
    inputs = {
        series("linewatch_false_reject_bound", camera="cam0"): "0.01x120",
        frames("cam0", "pass"): "0+99x120",
        frames("cam0", "reject"): "0+1x120",
        frames("cam0", "error"): "0x120",
        series("linewatch_dropped_frames_total", camera="cam0", reason="ring_full"): "0x120",
        series("linewatch_stage_restarts_total", stage="infer"): "0x120",
        series("linewatch_stage_heartbeat_age_seconds", stage="infer"): "0.05x120",
        series("linewatch_camera_connected", camera="cam0"): "1x120",
        series("linewatch_store_backlog"): "3x120",
        series("linewatch_drift_statistic", camera="cam0"): "2x120",
        series("linewatch_selftest_passed", camera="cam0"): "1x120",
        series("linewatch_drift_alarm_level"): "1e6x120",
        series("linewatch_store_lost_total"): "0x120",
        series("linewatch_up"): "1x120",
        series("up"): "1x120",
    }
    alerts = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    promtool_test(tmp_path, inputs, [(at, a, []) for a in alerts for at in ("10m", "29m")])


def test_a_real_prometheus_sees_the_camera_unplugged(bundle_path: Path, small_category: Path, tmp_path: Path) -> None:
    """Prometheus scrapes a running `linewatch run` on loopback with the real rule file; the camera is then
    unplugged, and the camera-disconnected alert goes to firing in Prometheus's own API."""
    assert shutil.which("prometheus") is not None, "Debian's prometheus package ships promtool with the server"
    stream = tmp_path / "camera.avi"  # a file opened as a camera: deleting it unplugs the camera for good
    write_stream(small_category, stream, passes=20)
    metrics_port, prom_port = free_port(), free_port()
    env = {
        **os.environ,
        "LINEWATCH_METRICS__PORT": str(metrics_port),
        "LINEWATCH_UI__ENABLED": "false",
        "LINEWATCH_STORE__ENABLED": "false",
        "LINEWATCH_PUBLISHER__ADDRESS": f"tcp://127.0.0.1:{free_port()}",
        "LINEWATCH_PIPELINE__SOURCES": f'[{{spec: "camera:{stream}", id: top, reconnect_max_s: 0.5}}]',
    }
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "linewatch",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"line": "line-7"}}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    box = subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "run", "--bundle", str(bundle_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
        + [f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        wait_for(lambda: get_or_none(f"http://127.0.0.1:{metrics_port}/readyz") == (200, "ok\n"), 120, "not ready")
        wait_for(lambda: query(api, "linewatch_up") == [("line-7", "1")], 60, "Prometheus never scraped the box")
        assert "LinewatchCameraDisconnected" not in firing(api)
        stream.unlink()
        wait_for(lambda: "LinewatchCameraDisconnected" in firing(api), 120, "the alert never fired")
        alert = firing(api)["LinewatchCameraDisconnected"]
        assert alert["camera"] == "top" and alert["line"] == "line-7" and alert["severity"] == "critical"
    finally:
        for proc in (box, prometheus):
            proc.terminate()
        for proc in (box, prometheus):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def query(api: str, expr: str) -> list[tuple[str, str]] | None:
    answer = get_or_none(f"{api}/query?query={expr}")
    if answer is None or answer[0] != 200:
        return None
    return [(r["metric"].get("line", ""), r["value"][1]) for r in json.loads(answer[1])["data"]["result"]]


def firing(api: str) -> dict[str, dict[str, str]]:
    """Alerts in state firing, by name: their labels."""
    answer = get_or_none(f"{api}/alerts")
    if answer is None or answer[0] != 200:
        return {}
    alerts = json.loads(answer[1])["data"]["alerts"]
    return {a["labels"]["alertname"]: a["labels"] for a in alerts if a["state"] == "firing"}
