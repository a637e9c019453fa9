"""Product changeover while a real run replays: refused switches, a switch by `linewatch switch`, the record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from edge.bundle import content_hash, read_bundle_file
from pipeline.app.cli import EXIT_ERROR
from pipeline.app.config import Config
from pipeline.app.ports import free_port
from pipeline.changeover import SwitchOutcome, SwitchRequest, ask_switch
from pipeline.settings import SourceConfig
from pipeline.store.switches import SwitchLog
from pipeline.supervisor import Pipeline
from tests.pipeline.test_runtime import Subscriber, run_config


def tampered_copy(bundle: Path, out: Path) -> Path:
    """The bundle with one tensor changed and its recorded hash kept: what a corrupted copy looks like."""
    raw = torch.load(bundle, weights_only=True)
    name = sorted(raw["tensors"])[0]
    raw["tensors"][name] = raw["tensors"][name].clone() + 1
    torch.save(raw, out)
    return out


def resized_copy(bundle: Path, out: Path, size: int) -> Path:
    """A valid bundle whose manifest says another input size (its hash recomputed to match)."""
    raw = torch.load(bundle, weights_only=True)
    manifest = json.loads(raw["manifest"])
    manifest["preprocessing"]["resize"] = manifest["preprocessing"]["crop"] = [size, size]
    raw["manifest"] = json.dumps(manifest, sort_keys=True)
    raw["hash"] = content_hash(raw["manifest"], raw["tensors"])
    torch.save(raw, out)
    return out


def switch_by_cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipeline.app.cli", "switch", "--address", address, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def changeover_config(port: int, control: str, recipe: Path) -> Config:
    config = run_config(port, max_batch=2, control_address=control, recipes={"grass_product": str(recipe)})
    return config


def test_a_changeover_mid_replay_decides_every_frame_once_by_the_bundle_of_its_time(
    bundle_path: Path, small_category: Path, grass_bundle: Path, grass_category: Path, tmp_path: Path
) -> None:
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    subscriber = Subscriber(f"tcp://127.0.0.1:{port}")
    subscriber.start()
    brick, grass = read_bundle_file(bundle_path)[2], read_bundle_file(grass_bundle)[2]
    sources = (
        # block mode, paced: the switch lands mid-replay and every frame must still get its verdict
        SourceConfig(spec=f"folder:{small_category}", id="top", rate_ppm=900, loop=True, policy="block"),
        SourceConfig(spec=f"folder:{grass_category}", id="side", rate_ppm=900, loop=True, bundle=str(grass_bundle)),
    )
    pipeline = Pipeline(changeover_config(port, control, grass_bundle), bundle_path, sources)
    refusals: list[SwitchOutcome] = []
    marks: dict[str, int] = {}
    cli: list[subprocess.CompletedProcess[str]] = []
    errors: list[BaseException] = []

    def verdicts_of(camera: str) -> int:
        return sum(m["camera_id"] == camera for m in subscriber.messages)

    def wait_for(camera: str, n: int) -> None:
        deadline = time.monotonic() + 120
        while verdicts_of(camera) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def operator() -> None:
        try:
            wait_for("top", 5)
            bad = [
                SwitchRequest("top", bundle=str(tmp_path / "missing.pt"), by="tester"),
                SwitchRequest("top", bundle=str(tampered_copy(grass_bundle, tmp_path / "tampered.pt")), by="tester"),
                SwitchRequest("top", bundle=str(resized_copy(grass_bundle, tmp_path / "r96.pt", 96)), by="tester"),
                SwitchRequest("top", recipe="part_z", by="tester"),
                SwitchRequest("front", recipe="grass_product", by="tester"),
            ]
            refusals.extend(ask_switch(control, r, 30) for r in bad)
            marks["asked_ns"] = time.time_ns()
            cli.append(switch_by_cli(control, "--camera", "top", "--recipe", "grass_product", "--by", "shift-lead"))
            marks["answered_ns"] = time.time_ns()
            wait_for("top", verdicts_of("top") + 8)
            infer = next(st.process for st in pipeline.stages if st.kind == "infer")
            assert infer is not None and infer.pid is not None
            os.kill(infer.pid, signal.SIGKILL)  # its successor loads both bundles of the table again
            wait_for("top", verdicts_of("top") + 8)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)
        finally:
            pipeline.request_stop()

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    summary = pipeline.run(duration_s=240, install_signals=False)
    thread.join(10)
    time.sleep(0.3)
    subscriber.stop()
    assert not errors, errors

    # Refused switches say why and leave the bundle running.
    why = [r.error or "" for r in refusals]
    assert not any(r.switched for r in refusals) and all(r.from_bundle in (brick, None) for r in refusals)
    assert "missing.pt: bundle file does not exist" in why[0]
    assert "tampered.pt: content hash mismatch" in why[1]
    assert "r96.pt: input size 96x96, but this run's bundles take 128x128" in why[2]
    assert "recipe 'part_z': not in pipeline.recipes (grass_product)" in why[3]
    assert "camera 'front': not in this run (cameras: top, side)" in why[4]
    assert cli[0].returncode == 0, cli[0].stderr
    assert f"camera top: bundle switched from {brick[:12]} to {grass[:12]}" in cli[0].stdout

    # Every frame got exactly one verdict, none lost or duplicated, through the switch and the infer restart.
    assert summary.drops == 0 and summary.errors == 0 and summary.verdicts == summary.frames
    assert summary.restarts_by_stage.get("infer") == 1
    for camera in ("top", "side"):
        ids = sorted(m["frame_id"] for m in subscriber.messages if m["camera_id"] == camera)
        assert ids == list(range(summary.cameras[camera]["frames"])), camera
    # Each verdict's bundle is the one of its time: brick until the switch, grass from then on.
    top = sorted((m for m in subscriber.messages if m["camera_id"] == "top"), key=lambda m: m["frame_id"])
    hashes = [m["bundle"] for m in top]
    first_grass = hashes.index(grass)
    assert set(hashes[:first_grass]) == {brick} and set(hashes[first_grass:]) == {grass}
    assert all(m["bundle"] == brick for m in top if m["t_decision_ns"] < marks["asked_ns"])
    assert all(m["bundle"] == grass for m in top if m["t_capture_ns"] > marks["answered_ns"])
    assert len(hashes) - first_grass >= 16
    assert {m["bundle"] for m in subscriber.messages if m["camera_id"] == "side"} == {grass}

    # The store keeps each verdict's bundle and every request, made or refused, with who asked.
    assert pipeline.store is not None
    stored = pipeline.store.range(summary.run_id, 1, summary.verdicts)
    assert len(stored) == summary.verdicts
    by_seq = {m["seq"]: m["bundle"] for m in subscriber.messages}
    assert all(row.bundle == by_seq[row.seq] for row in stored)
    switches = SwitchLog(pipeline.store).recent(run=summary.run_id)
    made = [s for s in switches if s.made]
    assert len(made) == 1 and len(switches) == 5  # the unknown camera is not a camera's record
    assert (made[0].camera_id, made[0].from_bundle, made[0].to_bundle) == ("top", brick, grass)
    assert made[0].recipe == "grass_product" and made[0].requested_by == "shift-lead"
    assert made[0].requested_ns <= made[0].switched_ns  # type: ignore[operator]
    assert sorted(s.refused is not None for s in switches) == [False, True, True, True, True]


def test_switch_cli_without_a_run_fails_with_one_line(tmp_path: Path) -> None:
    result = switch_by_cli(f"tcp://127.0.0.1:{free_port()}", "--camera", "top", "--recipe", "x", "--timeout", "1")
    assert result.returncode == EXIT_ERROR
    assert result.stderr.strip().count("\n") == 0 and "no answer from tcp://127.0.0.1:" in result.stderr


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"nope", "not JSON"),
        (b'{"v": 1, "switch": {"camera": "top"}}', "exactly one of switch.bundle and switch.recipe"),
        (b'{"v": 1, "switch": {"camera": 3, "recipe": "a"}}', "switch.camera = 3: expected a string"),
        (b'{"v": 2, "switch": {}}', "expected {'v': 1"),
    ],
)
def test_a_malformed_request_is_refused_naming_the_field(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace(".", r"\.")):
        SwitchRequest.decode(body)
