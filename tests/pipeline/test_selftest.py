"""The golden-sample self-test: frames kept by calibrate, pushed through a real run, judged; a wrong bundle fails it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from edge.bundle import content_hash, load_bundle
from edge.golden import DEFECT, GOOD, GoldenSet
from pipeline.app.cli import EXIT_SELFTEST_FAILED
from pipeline.app.config import with_overrides
from pipeline.app.ports import free_port
from pipeline.settings import SourceConfig
from pipeline.store.selftests import SelfTestLog
from pipeline.supervisor import Pipeline
from tests.pipeline.test_changeover import run_operated
from tests.pipeline.test_endpoints import get_or_none
from tests.pipeline.test_runtime import Subscriber, run_config


def test_golden_frames_are_clear_cases_on_their_side_of_the_threshold() -> None:
    frame = np.zeros((4, 4, 3), np.uint8)
    good = [(s, "held-out good", frame + i) for i, s in enumerate((1.0, 7.0, 9.5, 3.0))]
    defects = [(s, "synthetic crack", frame) for s in (10.5, 30.0, 12.0)]
    chosen = GoldenSet.choose(good, defects, threshold=10.0, per_kind=2)
    assert chosen is not None
    # good ones at most 0.9 x threshold, lowest first; defects at least 1.1 x threshold, highest first
    assert chosen.scores == (1.0, 3.0, 30.0, 12.0) and chosen.labels == (GOOD, GOOD, DEFECT, DEFECT)
    assert chosen.frames.shape == (4, 4, 4, 3) and chosen.frames[1, 0, 0, 0] == 3
    assert GoldenSet.choose([(9.5, "g", frame)], [(10.5, "d", frame)], threshold=10.0) is None
    # At a threshold re-chosen lower, the good frame at 7 is no longer a clear pass (7 > 0.9 x 7.5).
    again = GoldenSet.choose(good, defects, threshold=10.0, per_kind=3)
    assert again is not None and again.scores == (1.0, 3.0, 7.0, 30.0, 12.0)
    lower = again.clear_at(7.5)
    assert lower is not None and lower.scores == (1.0, 3.0, 30.0, 12.0) and len(lower.frames) == 4


def test_calibrate_keeps_golden_frames_in_the_bundle_as_the_model_scored_them(bundle_path: Path) -> None:
    bundle = load_bundle(bundle_path)
    golden = bundle.golden
    # The fixture's calibration draws no synthetic defects: its golden frames are good ones only.
    assert golden is not None and len(golden) >= 2 and GOOD in golden.labels
    assert golden.frames.shape[1:] == (128, 128, 3) and golden.frames.dtype == np.uint8
    assert bundle.threshold is not None
    x = bundle.preprocessing.normalize_batch(torch.from_numpy(golden.frames))
    with torch.inference_mode():
        scores = bundle.model(x).scores.float().tolist()
    assert np.allclose(scores, golden.scores, rtol=0.05)
    assert all((s > bundle.threshold) == (label == DEFECT) for s, label in zip(scores, golden.labels, strict=True))


def with_foreign_golden(bundle: Path, donor: Path, out: Path) -> Path:
    """`bundle` carrying `donor`'s golden frames and record: a bundle that cannot pass its own self-test."""
    raw, other = torch.load(bundle, weights_only=True), torch.load(donor, weights_only=True)
    manifest, donor_manifest = json.loads(raw["manifest"]), json.loads(other["manifest"])
    manifest["golden"] = donor_manifest["golden"]
    raw["tensors"]["golden.frames"] = other["tensors"]["golden.frames"]
    raw["manifest"] = json.dumps(manifest, sort_keys=True)
    raw["hash"] = content_hash(raw["manifest"], raw["tensors"])
    torch.save(raw, out)
    return out


def test_a_bundle_that_fails_its_golden_frames_keeps_readyz_failing_and_is_recorded(
    bundle_path: Path, small_category: Path, grass_bundle: Path, grass_category: Path, tmp_path: Path
) -> None:
    """`top` runs its own bundle and passes; `side` runs the brick model with grass's golden frames and records,
    so it fails: /readyz names it, the heartbeat says degraded, the metric reads 0, the store has both
    outcomes; `linewatch selftest` runs it again on demand and exits 1. The line goes on deciding."""
    wrong = with_foreign_golden(bundle_path, grass_bundle, tmp_path / "wrong.pt")
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    subscriber = Subscriber(f"tcp://127.0.0.1:{port}")
    subscriber.start()
    config = run_config(port, max_batch=2, control_address=control)
    sources = (
        SourceConfig(spec=f"folder:{small_category}", id="top", rate_ppm=600, loop=True),
        SourceConfig(spec=f"folder:{grass_category}", id="side", rate_ppm=600, loop=True, bundle=str(wrong)),
    )
    pipeline = Pipeline(config, bundle_path, sources)
    seen: dict[str, object] = {}

    def operator() -> None:
        subscriber.wait_for(10)
        base = f"http://127.0.0.1:{pipeline.metrics_port}"
        seen["readyz"] = get_or_none(f"{base}/readyz")
        seen["metrics"] = get_or_none(f"{base}/metrics")
        command = [sys.executable, "-m", "pipeline.app.cli", "selftest", "--address", control]
        seen["cli"] = subprocess.run(command, capture_output=True, text=True, timeout=180)

    summary = run_operated(pipeline, subscriber, operator)

    readyz = seen["readyz"]
    assert readyz is not None and readyz[0] == 503, readyz  # type: ignore[index]
    assert "camera side: golden self-test of wrong.pt failed: frame 0 (held-out good): reject at score" in readyz[1]  # type: ignore[index]
    assert "camera top" not in readyz[1]  # type: ignore[index]
    metrics = seen["metrics"][1]  # type: ignore[index]
    assert 'linewatch_selftest_passed{camera="top"} 1.0' in metrics
    assert 'linewatch_selftest_passed{camera="side"} 0.0' in metrics
    cli = seen["cli"]
    assert cli.returncode == EXIT_SELFTEST_FAILED, cli.stderr  # type: ignore[attr-defined]
    assert "bundle.pt (bundle" in cli.stdout and ": passed" in cli.stdout  # type: ignore[attr-defined]
    assert "wrong.pt (bundle" in cli.stdout and ": FAILED" in cli.stdout  # type: ignore[attr-defined]
    assert any("golden self-test failed" in p for b in subscriber.heartbeats for p in b.problems)
    # The line was never stopped for it, and golden frames were never published.
    assert summary.verdicts == summary.frames > 20 and summary.drops == 0
    assert {m["camera_id"] for m in subscriber.messages} == {"top", "side"}
    assert pipeline.store is not None
    outcomes = [(Path(r.path).name, r.why, r.passed) for _, r in SelfTestLog(pipeline.store).recent(run=summary.run_id)]
    assert sorted(outcomes) == sorted(
        [("bundle.pt", "start", True), ("wrong.pt", "start", False),
         ("bundle.pt", "on demand", True), ("wrong.pt", "on demand", False)]
    )  # fmt: skip


def test_the_self_test_runs_again_every_golden_every_h(bundle_path: Path, small_category: Path) -> None:
    config = with_overrides(run_config(free_port()), {"golden.every_h": 0.0005})  # every 1.8 s
    source = SourceConfig(spec=f"folder:{small_category}", rate_ppm=600, loop=True)
    pipeline = Pipeline(config, bundle_path, (source,))
    summary = pipeline.run(duration_s=8, install_signals=False)
    assert pipeline.store is not None
    why = [r.why for _, r in reversed(SelfTestLog(pipeline.store).recent(run=summary.run_id))]
    assert why[0] == "start" and 2 <= why.count("scheduled") <= 5 and set(why) == {"start", "scheduled"}
    assert all(r.passed for _, r in SelfTestLog(pipeline.store).recent(run=summary.run_id))
