"""The deploy files agree with the code: dashboard queries name real metrics, ports match the config.

The PLC side (linewatch_plc) has its own tests in tests/plc."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from pipeline.app.config import load_config
from pipeline.endpoints import RunProbe
from pipeline.metrics import PipelineMetrics
from pipeline.settings import PipelineConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def exported_names() -> set[str]:
    metrics = PipelineMetrics(["cam0"], ["infer"], RunProbe(10.0))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",), "gauge": ("",)}
    return {f.name + s for f in metrics.registry.collect() for s in suffixes[f.type]}


def recorded_names() -> set[str]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def test_dashboard_queries_use_exported_metrics_only() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "linewatch.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"linewatch_[a-z0-9_]+", e)}
    assert used and used <= exported_names(), used - exported_names()
    recorded = {m for e in exprs for m in re.findall(r"linewatch:[a-z0-9_:]+", e)}
    assert recorded and recorded <= recorded_names(), recorded - recorded_names()
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("throughput", "latency", "reject rate", "dropped", "queue depth", "alerts firing", "store backlog"):
        assert needed in titles


def test_dashboard_filters_by_line_box_and_camera_and_turns_red() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "linewatch.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"line", "instance", "camera"}
    assert all(v["multi"] and v["includeAll"] and v["allValue"] == ".*" for v in variables.values())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:  # every query follows the Line and Box choice
            assert 'instance=~"$instance"' in target["expr"] and 'line=~"$line"' in target["expr"], panel["title"]
            if "camera" in target["expr"] and "ALERTS" not in target["expr"]:
                assert 'camera=~"$camera"' in target["expr"], panel["title"]
    reds = [
        p["title"] for p in dashboard["panels"] if "red" in json.dumps(p["fieldConfig"]["defaults"].get("thresholds"))
    ]
    for title in ("Box up", "Camera connected", "Rejects above the bound", "Dropped frames", "Errors"):
        assert any(r.startswith(title) for r in reds), title
    alerts = next(p for p in dashboard["panels"] if p["title"] == "Alerts firing")
    assert alerts["targets"][0]["expr"].startswith('ALERTS{alertstate="firing"')


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` tag (an override file's way to drop a key)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    return yaml.load((DEPLOY / name).read_text(), Loader=ComposeLoader)


def dockerfile_env(name: str) -> dict[str, str]:
    """The ENV assignments of a Dockerfile (continuation lines joined)."""
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    pairs = [p for line in text.splitlines() if line.startswith("ENV ") for p in shlex.split(line[4:])]
    return dict(p.split("=", 1) for p in pairs)


def unit_settings(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().replace("\\\n", " ").splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_images_run_as_a_line_box_needs(name: str) -> None:
    text = (DEPLOY / name).read_text()
    env = dockerfile_env(name)
    config = load_config(None, {k: v for k, v in env.items() if k != "LINEWATCH_CONFIG"})  # valid overrides
    assert config.metrics.host == "0.0.0.0" and config.ui.host == "0.0.0.0"
    assert config.publisher.address.startswith("tcp://0.0.0.0:")
    assert env["LINEWATCH_CONFIG"] == "/config/config.yaml"
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users == ["linewatch"] and "--groups video linewatch" in text  # not root; may open cameras
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD (.*)$", text, re.M)
    assert health is not None and f"127.0.0.1:{config.metrics.port}/healthz" in health.group(1)
    # Dependencies are installed (pinned) before the code is copied: a code change rebuilds only the last layers.
    install = text.index("-c constraints.txt" if name == "Dockerfile" else "-c /tmp/constraints-vendor.txt")
    assert install < text.index("COPY pipeline pipeline") < text.index("--no-deps .")
    ignored = (Path(__file__).resolve().parents[1] / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "test-artifacts"} <= set(ignored)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()}  # type: ignore[union-attr]
    assert {config.metrics.port, config.ui.port, 5556, 5557} <= exposed


def test_gpu_image_keeps_the_vendor_torch_and_adds_tensorrt() -> None:
    text = (DEPLOY / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG BASE=\S*cuda\S*$", text, re.M) and "FROM ${BASE}" in text
    assert "grep -v -E '^(torch|torchvision)==' constraints.txt" in text and "'.[opencv,tensorrt,plc]'" in text
    env = dockerfile_env("Dockerfile.gpu")
    assert env["LINEWATCH_PIPELINE__DEVICE"] == "cuda" and env["LINEWATCH_PIPELINE__BACKEND"] == "tensorrt"


def test_compose_gives_the_gpu_writable_volumes_and_the_camera() -> None:
    services = compose()["services"]
    box = services["linewatch"]
    assert box["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    gpu = box["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert any(d.startswith("/dev/video") for d in box["devices"])
    mounts = {v.split(":")[1]: v for v in box["volumes"]}
    env = dockerfile_env("Dockerfile.gpu")
    store, engines = env["LINEWATCH_STORE__PATH"], env["LINEWATCH_PIPELINE__ENGINE_CACHE"]
    for path in (store, f"{store}/images", engines):  # the store, the image archive, the engine cache
        assert path in mounts and not mounts[path].endswith(":ro"), path
        assert not mounts[path].startswith(("/", ".")), "a named volume, not a host folder"
    config = load_config(None, {k: v for k, v in env.items() if k != "LINEWATCH_CONFIG"})
    published = {int(p.split(":")[1]) for p in box["ports"]}
    assert published == {int(config.publisher.address.rsplit(":", 1)[1]), 5557, config.ui.port}
    assert box["ulimits"]["rtprio"] >= PipelineConfig().decide_priority
    # Prometheus: scrapes the port the image serves, loads the alert rules, keeps its data on a volume.
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == [f"linewatch:{config.metrics.port}"]
    assert prom["rule_files"] == ["alerts.yml"]
    p = services["prometheus"]
    assert "./alerts.yml:/etc/prometheus/alerts.yml:ro" in p["volumes"]
    assert any(v.endswith(":/prometheus") and not v.startswith(("/", ".")) for v in p["volumes"])
    assert any(c.startswith("--storage.tsdb.retention.time=") for c in p["command"])
    # Grafana: no anonymous access, no default admin password.
    g = services["grafana"]
    assert g["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in g["environment"]
    assert g["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert compose()["secrets"]["grafana_admin_password"]["file"] == "./grafana_admin_password"


def test_cpu_override_drops_the_gpu_and_camera() -> None:
    box = compose("docker-compose.cpu.yml")["services"]["linewatch"]
    assert box["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "deploy" in box and box["deploy"] is None and box["devices"] is None  # `!reset`


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (apt-get install prometheus)")
def test_prometheus_config_passes_promtool() -> None:
    proc = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze (apt-get install systemd)")
@pytest.mark.parametrize("name", ["linewatch.service", "linewatch-plc@modbus.service"])
def test_systemd_units_verify(name: str, tmp_path: Path) -> None:
    # ExecStart's program exists only on a line box: verify the rest of the unit against /bin/true.
    source = DEPLOY / re.sub(r"@.+\.service$", "@.service", name)  # an instance of a template
    text = re.sub(r"^ExecStart=(.*\\\n)*.*$", "ExecStart=/bin/true", source.read_text(), flags=re.M)
    (tmp_path / source.name).write_text(text)
    if source.name != name:
        (tmp_path / name).symlink_to(source.name)
    proc = subprocess.run(["systemd-analyze", "verify", name], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_the_line_box_unit_is_watched_and_hardened() -> None:
    unit = unit_settings("linewatch.service")
    assert unit["Type"] == ["notify"] and unit["WatchdogSec"] == ["30s"] and unit["User"] == ["linewatch"]
    assert unit["SupplementaryGroups"] == ["video"] and unit["KillSignal"] == ["SIGTERM"]
    assert "linewatch run --config" in unit["ExecStart"][0] and unit["Restart"] == ["on-failure"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes")):
        assert unit[key] == [value]
    assert "PrivateDevices" not in unit and "RestrictRealtime" not in unit  # cameras, GPUs and SCHED_FIFO
    assert int(unit["LimitRTPRIO"][0]) >= PipelineConfig().decide_priority
    env = dict(e.split("=", 1) for e in unit["Environment"])
    assert unit["ReadWritePaths"][0].split() == [env["LINEWATCH_STORE__PATH"], "/var/cache/linewatch"]
    assert env["LINEWATCH_PIPELINE__ENGINE_CACHE"].startswith("/var/cache/linewatch/")
    plc = unit_settings("linewatch-plc@.service")
    assert "linewatch-plc %i --state /var/lib/linewatch-plc/%i.json" in plc["ExecStart"][0]
    assert plc["Restart"] == ["always"] and plc["User"] == ["linewatch-plc"] and plc["NoNewPrivileges"] == ["yes"]
    assert plc["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]  # Modbus's port 502, and nothing else


def test_installs_use_the_constraints_that_the_ranges_admit() -> None:
    root = Path(__file__).resolve().parents[1]
    pins = {
        Requirement(line).name.lower(): Requirement(line)
        for line in (root / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    ranges = [Requirement(r) for r in project["dependencies"]]
    ranges += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for wanted in ranges:
        if wanted.name == "linewatch":
            continue
        assert wanted.name.lower() in pins or wanted.name == "torch-tensorrt", f"{wanted.name} is not pinned"
        if wanted.name.lower() in pins:
            pinned = next(iter(pins[wanted.name.lower()].specifier)).version
            assert wanted.specifier.contains(pinned, prereleases=True), f"{wanted} does not admit {pinned}"
    assert "opencv-python-headless" not in " ".join(project["dependencies"])  # an extra: a box's own cv2 stays
    quickstart = (root / "README.md").read_text()
    assert "pip install -c constraints.txt -e '.[demo,dev]'" in quickstart
    assert "pip install -q -c constraints.txt -e '.[demo,dev]'" in (root / ".ci" / "run").read_text()
