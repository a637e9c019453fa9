"""The deploy files agree with the code: dashboard queries name real metrics, ports match the config.

The example PLC bridge has its own tests in test_plc_bridge.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from pipeline.endpoints import RunProbe
from pipeline.metrics import PipelineMetrics
from pipeline.settings import MetricsConfig, PipelineConfig

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


def test_prometheus_and_compose_point_at_the_metrics_port() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"linewatch:{MetricsConfig().port}"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"linewatch", "prometheus", "grafana"} <= set(compose["services"])
    assert (DEPLOY / "Dockerfile").read_text().count("ENTRYPOINT") == 1
    unit = (DEPLOY / "linewatch.service").read_text()
    assert "ExecStart=" in unit and "linewatch run --config" in unit and "KillSignal=SIGTERM" in unit


def test_deploys_allow_the_decide_stages_real_time_priority() -> None:
    wanted = PipelineConfig().decide_priority
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["linewatch"]["ulimits"]["rtprio"] >= wanted
    unit = (DEPLOY / "linewatch.service").read_text()
    limit = re.search(r"^LimitRTPRIO=(\d+)$", unit, re.M)
    assert limit is not None and int(limit.group(1)) >= wanted
