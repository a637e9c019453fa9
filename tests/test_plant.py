"""The plant view: the plant Prometheus's recording rules (unit-tested with promtool), the plant dashboard, and
a plant simulated on this machine (bench/plant_bench.py): four `linewatch run` lines sharing one PostgreSQL,
each scraped by its own Prometheus, federated by the plant's (deploy/plant/prometheus.yml), whose aggregates
must equal the lines' own counters and store rows."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from postgres_server import new_database

from tests.test_bench_scripts import load
from tests.test_deploy import exported_names

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "plant" / "rules.yml"
needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="no prometheus here (apt-get install prometheus; .ci/run does)",
)


def plant_recorded_names() -> set[str]:
    return {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}


@needs_prometheus
def test_the_plant_rules_sum_each_line_and_the_plant_from_the_lines_series(tmp_path: Path) -> None:
    """Four lines (two cameras on line-2, one box per line): a counter rising 60 pass and 6 reject per minute
    per camera; line-4 is not ready; line-5's box cannot be scraped at all, and the plant has lost line box
    box6's Prometheus. The per-line and plant figures and the alert are checked at 10 minutes."""
    series = []
    for n in range(1, 5):
        cameras = ("top", "side") if n == 2 else ("top",)
        for camera in cameras:
            labels = f'plant="plant-a", line="line-{n}", instance="linewatch:9108", job="linewatch", camera="{camera}"'
            series.append({"series": f'linewatch_frames_total{{{labels}, verdict="pass"}}', "values": "0+15x40"})
            series.append({"series": f'linewatch_frames_total{{{labels}, verdict="reject"}}', "values": "0+1.5x40"})
        box = f'plant="plant-a", line="line-{n}", instance="linewatch:9108", job="linewatch"'
        series.append({"series": f"linewatch_up{{{box}}}", "values": "1x40"})
        series.append({"series": f"linewatch_ready{{{box}}}", "values": ("0x40" if n == 4 else "1x40")})
        series.append({"series": f"up{{{box}}}", "values": "1x40"})
    series.append(
        {"series": 'up{plant="plant-a", line="line-5", instance="linewatch:9108", job="linewatch"}', "values": "0x40"}
    )
    series.append({"series": 'up{instance="box6:9090", job="linewatch-federate"}', "values": "0x40"})
    line = {"plant": "plant-a"}
    expected = [
        ("line:linewatch_frames:sum", [({**line, "line": "line-2", "verdict": "pass"}, 1200)]),
        ("plant:linewatch_frames:sum", [({**line, "verdict": "pass"}, 3000), ({**line, "verdict": "reject"}, 300)]),
        ("line:linewatch_parts:rate5m", [({**line, "line": f"line-{n}"}, 2.2 if n == 2 else 1.1) for n in range(1, 5)]),
        ("line:linewatch_reject_ratio:rate5m", [({**line, "line": f"line-{n}"}, 0.1 / 1.1) for n in range(1, 5)]),
        ("plant:linewatch_parts:rate5m", [(line, 5.5)]),
        ("plant:linewatch_lines_ready:sum", [(line, 3)]),
        ("line:linewatch_up:min", [({**line, "line": f"line-{n}"}, 0 if n == 5 else 1) for n in range(1, 6)]),
    ]

    def check(expr: str, wanted: list[tuple[dict[str, str], float]]) -> dict:
        if expr.startswith("line:") and expr.endswith(":sum"):
            expr += '{line="line-2", verdict="pass"}'
        return {
            "expr": expr,
            "eval_time": "10m",
            "exp_samples": [{"labels": _labels(expr.split("{")[0], labels), "value": v} for labels, v in wanted],
        }

    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [check(expr, wanted) for expr, wanted in expected],
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": "LinewatchLineBoxUnreachable",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "instance": "box6:9090",
                                    "job": "linewatch-federate",
                                    "severity": "warning",
                                },
                                "exp_annotations": unreachable_annotations("box6:9090"),
                            }
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "plant_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    proc = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def unreachable_annotations(instance: str) -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "LinewatchLineBoxUnreachable")
    return {k: v.replace("{{ $labels.instance }}", instance) for k, v in rule["annotations"].items()}


def _labels(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def test_the_plant_dashboard_shows_every_line_from_the_plant_rules_and_opens_a_line() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "plant.json").read_text())
    line_dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "linewatch.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert all('plant=~"$plant"' in e and 'line=~"$line"' in e for e in exprs)
    recorded = {m for e in exprs for m in re.findall(r"[a-z]+:linewatch_[a-z0-9_:]+", e)}
    assert recorded and recorded <= plant_recorded_names(), recorded - plant_recorded_names()
    raw = {m for e in exprs for m in re.findall(r"(?<![:a-z])linewatch_[a-z0-9_]+", e)}
    assert raw <= exported_names()
    table = next(p for p in dashboard["panels"] if p["type"] == "table" and p["title"].startswith("Lines"))
    (link,) = table["fieldConfig"]["defaults"]["links"]
    assert link["url"].startswith(f"/d/{line_dashboard['uid']}/") and "var-line=${__data.fields.line}" in link["url"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"plant", "line"}


@pytest.fixture()
def plant_database(postgres_url: str) -> str:
    return new_database(postgres_url, "plant")


@needs_prometheus
def test_four_lines_in_one_store_and_one_prometheus_add_up(
    bundle_path: Path, small_category: Path, plant_database: str, tmp_path: Path
) -> None:
    bench = load("plant_bench")
    images = sorted((small_category / "test").rglob("*.png"))
    result = bench.simulate_plant(bundle_path, images, plant_database, tmp_path, lines=4, frames=30)
    print(bench.report(result))
    assert result.consistent, result.problems
    assert set(result.own) == {f"line-{n}" for n in range(1, 5)}
    assert all(sum(c.values()) > 0 for c in result.own.values())
    assert sum(result.plant.values()) == sum(sum(c.values()) for c in result.own.values())
