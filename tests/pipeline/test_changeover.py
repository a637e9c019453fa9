"""Product changeover while a real run replays: refused switches, a switch by `linewatch switch`, the record."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
import torch

from edge.bundle import content_hash, read_bundle_file
from pipeline.app.cli import EXIT_ERROR
from pipeline.app.config import Config, with_overrides
from pipeline.app.ports import free_port
from pipeline.changeover import SwitchOutcome, SwitchRequest, ask_switch
from pipeline.settings import SourceConfig
from pipeline.store.reviews import Reviews
from pipeline.store.switches import SwitchLog
from pipeline.supervisor import Pipeline, RunSummary
from tests.pipeline.test_runtime import Subscriber, run_config
from tests.pipeline.test_station import PASSWORD, csrf_of, log_in


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


def other_weights_copy(bundle: Path, out: Path) -> Path:
    """A valid bundle that says it was fitted with other backbone weights than this box has."""
    raw = torch.load(bundle, weights_only=True)
    manifest = json.loads(raw["manifest"])
    manifest["backbone"]["weights_sha256"] = "0" * 64
    raw["manifest"] = json.dumps(manifest, sort_keys=True)
    raw["hash"] = content_hash(raw["manifest"], raw["tensors"])
    torch.save(raw, out)
    return out


def switch_on_the_page(site: str, camera: str, recipe: str) -> int:
    """Log in to the operator page as alice and ask for `recipe` on `camera`, as a shift lead would."""
    with httpx2.Client(base_url=site, follow_redirects=False, timeout=150) as page:
        assert log_in(page) == 303  # type: ignore[arg-type]
        model = page.get("/model").text
        assert 'action="/model/switch"' in model and "<option>brick_product</option>" in model
        form = {"csrf": csrf_of(model), "camera": camera, "recipe": recipe}
        return page.post("/model/switch", data=form).status_code


def switch_by_cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipeline.app.cli", "switch", "--address", address, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def run_operated(pipeline: Pipeline, subscriber: Subscriber, operator: Callable[[], None]) -> RunSummary:
    """Run `pipeline` while `operator` works beside it in a thread; the run stops when the operator is done
    (or fails: its exception is raised here once the run has drained)."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            operator()
        except BaseException as exc:  # noqa: BLE001 - raised in the test's thread below
            errors.append(exc)
        finally:
            pipeline.request_stop()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    summary = pipeline.run(duration_s=240, install_signals=False)
    thread.join(10)
    time.sleep(0.3)  # the last messages reach the subscriber
    subscriber.stop()
    if errors:
        raise errors[0]
    return summary


def changeover_config(port: int, control: str, recipes: dict[str, str], ui_port: int) -> Config:
    config = run_config(port, max_batch=2, control_address=control, recipes=recipes)
    return with_overrides(config, {"ui.port": ui_port, "ui.feed_address": f"tcp://127.0.0.1:{free_port()}"})


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
    ui_port = free_port()
    recipes = {"grass_product": str(grass_bundle), "brick_product": str(bundle_path)}
    pipeline = Pipeline(changeover_config(port, control, recipes, ui_port), bundle_path, sources)
    assert pipeline.store is not None
    Reviews(pipeline.store).set_user("alice", PASSWORD, time.time_ns())
    refusals: list[SwitchOutcome] = []
    marks: dict[str, int] = {}
    cli: list[subprocess.CompletedProcess[str]] = []

    def operator() -> None:
        subscriber.wait_for(5, "top")
        bad = [
            SwitchRequest("top", bundle=str(tmp_path / "missing.pt"), by="tester"),
            SwitchRequest("top", bundle=str(tampered_copy(grass_bundle, tmp_path / "tampered.pt")), by="tester"),
            SwitchRequest("top", bundle=str(resized_copy(grass_bundle, tmp_path / "r96.pt", 96)), by="tester"),
            SwitchRequest("top", recipe="part_z", by="tester"),
            SwitchRequest("front", recipe="grass_product", by="tester"),
            SwitchRequest("top", bundle=str(other_weights_copy(grass_bundle, tmp_path / "other.pt")), by="tester"),
            SwitchRequest("top", bundle=str(tmp_path / ("x" * 5000)), by="tester"),  # a name no file system takes
        ]
        refusals.extend(ask_switch(control, r, 30) for r in bad)
        marks["asked_ns"] = time.time_ns()
        cli.append(switch_by_cli(control, "--camera", "top", "--recipe", "grass_product", "--by", "shift-lead"))
        marks["answered_ns"] = time.time_ns()
        subscriber.wait_for(subscriber.verdicts("top") + 8, "top")
        infer = next(st.process for st in pipeline.stages if st.kind == "infer")
        assert infer is not None and infer.pid is not None
        os.kill(infer.pid, signal.SIGKILL)  # its successor loads both bundles of the table again
        subscriber.wait_for(subscriber.verdicts("top") + 8, "top")
        marks["page_asked_ns"] = time.time_ns()
        marks["page"] = switch_on_the_page(f"http://127.0.0.1:{ui_port}", "top", "brick_product")
        marks["page_answered_ns"] = time.time_ns()
        subscriber.wait_for(subscriber.verdicts("top") + 8, "top")

    summary = run_operated(pipeline, subscriber, operator)

    # Refused switches say why and leave the bundle running.
    why = [r.error or "" for r in refusals]
    assert not any(r.switched for r in refusals) and all(r.from_bundle in (brick, None) for r in refusals)
    assert "missing.pt: bundle file does not exist" in why[0]
    assert "tampered.pt: content hash mismatch" in why[1]
    assert "r96.pt: input size 96x96, but this run's bundles take 128x128" in why[2]
    assert "recipe 'part_z': not in pipeline.recipes (brick_product, grass_product)" in why[3]
    assert "camera 'front': not in this run (cameras: top, side)" in why[4]
    assert "other.pt: cannot be loaded here: " in why[5] and "differ from those the model was fitted with" in why[5]
    assert "xxx: cannot be read (File name too long)" in why[6]
    assert cli[0].returncode == 0, cli[0].stderr
    assert f"camera top: bundle switched from {brick[:12]} to {grass[:12]}" in cli[0].stdout

    # Every frame got exactly one verdict, none lost or duplicated, through the switch and the infer restart.
    assert summary.drops == 0 and summary.errors == 0 and summary.verdicts == summary.frames
    assert summary.restarts_by_stage.get("infer") == 1
    for camera in ("top", "side"):
        ids = sorted(m["frame_id"] for m in subscriber.messages if m["camera_id"] == camera)
        assert ids == list(range(summary.cameras[camera]["frames"])), camera
    # Each verdict's bundle is the one of its time: brick until the switch, grass until the page's switch back.
    assert marks["page"] == 303
    top = sorted((m for m in subscriber.messages if m["camera_id"] == "top"), key=lambda m: m["frame_id"])
    runs = [(bundle, len(list(group))) for bundle, group in itertools.groupby(m["bundle"] for m in top)]
    assert [bundle for bundle, _ in runs] == [brick, grass, brick] and runs[1][1] >= 16
    assert all(m["bundle"] == brick for m in top if m["t_decision_ns"] < marks["asked_ns"])
    asked, answered = marks["page_asked_ns"], marks["page_answered_ns"]
    assert all(
        m["bundle"] == grass for m in top if marks["answered_ns"] < m["t_capture_ns"] and m["t_decision_ns"] < asked
    )
    assert all(m["bundle"] == brick for m in top if m["t_capture_ns"] > answered)
    assert {m["bundle"] for m in subscriber.messages if m["camera_id"] == "side"} == {grass}

    # The store keeps each verdict's bundle and every request, made or refused, with who asked.
    assert pipeline.store is not None
    stored = pipeline.store.range(summary.run_id, 1, summary.verdicts)
    assert len(stored) == summary.verdicts
    by_seq = {m["seq"]: m["bundle"] for m in subscriber.messages}
    assert all(row.bundle == by_seq[row.seq] for row in stored)
    switches = SwitchLog(pipeline.store).recent(run=summary.run_id)
    made = [s for s in reversed(switches) if s.made]
    assert len(switches) == 8  # the unknown camera is not a camera's record
    assert [(s.camera_id, s.from_bundle, s.to_bundle, s.recipe, s.requested_by) for s in made] == [
        ("top", brick, grass, "grass_product", "shift-lead"),
        ("top", grass, brick, "brick_product", "operator:alice"),
    ]
    assert all(s.requested_ns <= s.switched_ns for s in made)  # type: ignore[operator]
    assert sum(s.refused is not None for s in switches) == 6


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
