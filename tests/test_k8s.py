"""deploy/k8s: every overlay renders with kustomize (`kubectl kustomize`), validates strictly against the
Kubernetes API schemas of a stated version (kubernetes-validate), and says what a line needs: its node, the
GPU, probes on linewatch's health endpoints, the settings as config keys linewatch accepts, and a bundle
named by hash whose change alone rolls the line."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pipeline.app.config import environment_overrides, load_config

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
KUBERNETES = "1.32"  # the API version the manifests are written for and validated against
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
HASH_REFERENCE = re.compile(r"^sha256:[0-9a-f]{64}$")


def kustomize_available() -> bool:
    if shutil.which("kubectl") is None:
        return False
    version = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True).stdout
    found = re.search(r"Kustomize Version: v(\d+)", version)
    return found is not None and int(found[1]) >= 5  # labels with includeTemplates, components


needs_kustomize = pytest.mark.skipif(not kustomize_available(), reason="no kubectl with kustomize v5 here")


def render(folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The object `name`; a name ending in "-" is a generated one's prefix (its hash suffix follows)."""

    def named(d: dict[str, Any]) -> bool:
        given = d["metadata"]["name"]
        return given.startswith(name) and given.count("-") == name.count("-") if name.endswith("-") else given == name

    (found,) = [d for d in docs if d["kind"] == kind and named(d)]
    return found


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap", "linewatch-env-")["data"]


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_every_object_validates_strictly(overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):  # a CRD's kind: checked below
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {f"linewatch-{overlay}"}


def test_the_validator_refuses_a_misspelt_field() -> None:
    deployment = yaml.safe_load((K8S / "base" / "linewatch.yaml").read_text().split("\n---\n")[0])
    deployment["spec"]["template"]["spec"]["nodeSelectr"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_line_box_runs_on_its_lines_gpu_node_with_probes_on_the_health_endpoints(overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    box = one(docs, "Deployment", "linewatch")
    spec, main = box["spec"]["template"]["spec"], container(box, "linewatch")
    assert spec["nodeSelector"] == {"linewatch.io/line": overlay}
    assert box["spec"]["template"]["metadata"]["labels"]["linewatch.io/line"] == overlay
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1 and box["spec"]["replicas"] == 1
    assert box["spec"]["strategy"]["type"] == "Recreate"  # never two runs of one line
    config = load_config(None, {"LINEWATCH_CONFIG": "", **env_of(docs)})
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["metrics"] == config.metrics.port
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz" and main["readinessProbe"]["httpGet"]["path"] == (
        "/readyz"
    )
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"  # the frame rings
    service = one(docs, "Service", "linewatch")
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(config.metrics.port)
    assert service["metadata"]["labels"]["linewatch.io/line"] == overlay


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_settings_are_config_keys_linewatch_accepts_and_the_bundle_is_named_by_hash(overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    env = env_of(docs)
    assert environment_overrides(env)  # every variable is read as a setting ...
    config_file = one(docs, "ConfigMap", "linewatch-config-")["data"]["config.yaml"]
    config = load_config(None, {"LINEWATCH_CONFIG": "", **env})  # ... and validates like the file
    assert yaml.safe_load(config_file)["store"]["path"] == "/var/lib/linewatch"
    assert HASH_REFERENCE.match(config.pipeline.bundle or "") and config.pipeline.bundle_library == "/bundles"
    assert [s.id for s in config.pipeline.sources] and config.store.line == overlay  # its rows in a plant store
    box = one(docs, "Deployment", "linewatch")
    mounts = {m["mountPath"]: m for m in container(box, "linewatch")["volumeMounts"]}
    assert mounts["/bundles"]["readOnly"] is True


@needs_kustomize
def test_rolling_a_line_to_another_bundle_and_back_is_one_changed_line(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / "overlays" / "line-1" / "kustomization.yaml"
    before = render(kustomization.parent)
    old = env_of(before)["LINEWATCH_PIPELINE__BUNDLE"]
    new = "sha256:" + "ab" * 32
    text = kustomization.read_text()
    kustomization.write_text(text.replace(old, new))
    assert sum(a != b for a, b in zip(text.splitlines(), kustomization.read_text().splitlines(), strict=True)) == 1
    after = render(kustomization.parent)
    assert env_of(after)["LINEWATCH_PIPELINE__BUNDLE"] == new
    env_name = one(after, "ConfigMap", "linewatch-env-")["metadata"]["name"]
    assert env_name != one(before, "ConfigMap", "linewatch-env-")["metadata"]["name"]  # the pod template changes
    box = one(after, "Deployment", "linewatch")
    assert container(box, "linewatch")["envFrom"] == [{"configMapRef": {"name": env_name}}]
    kustomization.write_text(text)  # and back
    assert render(kustomization.parent) == before


@needs_kustomize
def test_the_plc_gateways_follow_the_line_box_and_the_modbus_blocks_are_the_lines_cameras() -> None:
    docs = render(K8S / "overlays" / "line-1")
    gateways = one(docs, "Deployment", "linewatch-plc")
    config = load_config(None, {"LINEWATCH_CONFIG": "", **env_of(docs)})
    modbus = container(gateways, "modbus")["args"]
    cameras = [modbus[i + 1] for i, a in enumerate(modbus) if a == "--camera"]
    assert cameras == [s.id for s in config.pipeline.sources]
    assert modbus[modbus.index("--address") + 1] == "tcp://linewatch:5556"
    service = one(docs, "Service", "linewatch-plc")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"opcua": 4840, "modbus": 502}
    monitor = [d for d in render(K8S / "overlays" / "line-2") if d["kind"] == "ServiceMonitor"]
    assert monitor and monitor[0]["spec"]["endpoints"][0]["port"] == "metrics"
