"""The drift watch: silent without drift at its stated false-alarm rate, quick after a real change, and on a
real replay whose frames darken."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.calibrate import calibrate
from calibration.datasets import normal_frames
from edge.bundle import read_bundle_file, save_bundle
from linewatch_plc.wire import VERDICT_NAMES
from pipeline.app.config import config_from_dict, with_overrides
from pipeline.app.ports import free_port
from pipeline.drift import DriftReference, DriftWatch, alarm_level
from pipeline.settings import SourceConfig
from pipeline.supervisor import Pipeline
from tests.conftest import generate_mvtec_dataset
from tests.pipeline.test_runtime import run_config

HORIZON, FALSE_ALARM = 10_000, 0.01


def runs_with_alarm(rng: np.random.Generator, runs: int, n_reference: int, bound: float, quantile: float) -> int:
    """Runs of HORIZON passed parts, with no drift (the parts score like the held-out frames), that alarm."""
    alarms = 0
    for _ in range(runs):
        held_out = np.sort(rng.gamma(4.0, 1.0, n_reference))
        threshold = held_out[int(np.ceil((1 - bound) * n_reference)) - 1]  # an order statistic, as calibrate's
        reference = DriftReference.from_holdout(held_out, threshold, quantile, 0.99)
        assert reference is not None
        watch = DriftWatch(reference, alarm_level(HORIZON, FALSE_ALARM))
        scores = rng.gamma(4.0, 1.0, 3 * HORIZON)
        for s in scores[scores <= threshold][:HORIZON]:  # the stream holds passes only
            watch.observe(float(s))
            if watch.alarm:
                alarms += 1
                break
    return alarms


@pytest.mark.parametrize(("n_reference", "bound", "quantile"), [(40, 0.2, 0.5), (300, 0.01, 0.5), (300, 0.01, 0.9)])
def test_no_drift_stays_silent_over_the_horizon(n_reference: int, bound: float, quantile: float) -> None:
    # The bound: FALSE_ALARM + 1 % for the reference's own bound; 60 runs, so a handful of alarms means broken math.
    assert runs_with_alarm(np.random.default_rng(n_reference), 60, n_reference, bound, quantile) <= 3


def test_the_reference_bounds_the_share_above_its_level() -> None:
    scores = np.arange(1, 311, dtype=np.float64)  # 310 held-out scores, 300 of them below the threshold
    reference = DriftReference.from_holdout(scores, 301.0, 0.9, 0.99)
    assert reference is not None and reference.n == 300 and reference.level == 271.0  # s(271): ceil(0.9 * 301)
    assert 0.10 < reference.exceed_bound < 0.16  # 10 % expected; the bound allows for the draw of 300
    assert DriftReference.from_holdout(scores, 20.0, 0.9, 0.99) is None  # 19 below the threshold: too few


def test_a_shift_of_good_scores_is_found_within_a_few_hundred_parts() -> None:
    rng = np.random.default_rng(5)
    reference = DriftReference.from_holdout(rng.gamma(4.0, 1.0, 300), 11.6, 0.9, 0.99)  # 11.6: the 99th pct
    assert reference is not None
    watch = DriftWatch(reference, alarm_level(HORIZON, FALSE_ALARM))
    for s in rng.gamma(4.0, 1.0, 2000):
        if s < 11.6:
            watch.observe(float(s))
    assert not watch.alarm
    delays = []
    for s in rng.gamma(4.0, 1.0, 2000) * 1.5:  # scores 50 % higher: many more parts above q
        if s < 11.6:  # passes only
            watch.observe(float(s))
        delays.append(watch.alarm)
    assert True in delays and delays.index(True) < 400
    for s in rng.gamma(4.0, 1.0, 3000):  # the change undone: the alarm clears
        if s < 11.6:
            watch.observe(float(s))
    assert not watch.alarm


@pytest.fixture(scope="module")
def drift_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle calibrated as a line's would be (2 % at 90 %, 200 held-out good frames), and its category."""
    root = tmp_path_factory.mktemp("drift")
    category = generate_mvtec_dataset(root, ("brick",), seed=3, n_train=400, n_test_good=24, n_test_per_defect=1)[0]
    calibration = {"target_fpr": 0.02, "confidence": 0.9, "synthetic_per_kind": 0}
    config = config_from_dict({"model": {"input_size": 128}, "calibration": calibration})
    cal = calibrate(config, normal_frames(category))
    path = root / "bundle.pt"
    save_bundle(path, cal.fit.model, cal.manifest)
    return path, category


def replay(folder: Path, category: Path, gains: list[float]) -> Path:
    """Good test frames in order, frame i at brightness gains[i] (1: as photographed)."""
    folder.mkdir()
    frames = [cv2.imread(str(p)) for p in sorted((category / "test" / "good").glob("*.png"))]
    for i, gain in enumerate(gains):
        frame = np.clip(frames[i % len(frames)].astype(np.float32) * gain, 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i:05d}.png"), frame)
    return folder


def run_replay(bundle: Path, folder: Path, caplog: pytest.LogCaptureFixture) -> tuple[list[int], list[int]]:
    """The passed-part counts at which drift alarms began (from the run's log), and the parts rejected."""
    caplog.set_level(logging.WARNING, logger="pipeline.supervisor")
    rejected: list[int] = []

    def on_verdict(rec: np.void) -> None:
        if VERDICT_NAMES[int(rec["verdict"])] == "reject":
            rejected.append(int(rec["source_index"]))

    config = with_overrides(run_config(free_port()), {"store.enabled": False})
    Pipeline(config, bundle, (SourceConfig(spec=f"folder:{folder}"),), on_verdict).run(install_signals=False)
    return [int(m) for m in re.findall(r"after (\d+) passed parts", caplog.text)], rejected


def test_a_darkening_scene_raises_the_drift_alarm_before_the_false_reject_bound_breaks(
    drift_bundle: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """From part 100 the light fades by 0.3 % a part (a lamp failing): the pass scores move up, and the alarm
    says so within 160 parts, while the good parts rejected so far are still within the 2 % bound."""
    bundle, category = drift_bundle
    manifest, _, _ = read_bundle_file(bundle)
    assert len(manifest.holdout_scores() or []) == 200
    steady, ramp = 100, 200
    gains = [1.0] * steady + [1.0 - 0.003 * i for i in range(1, ramp + 1)]
    alarms, rejected = run_replay(bundle, replay(tmp_path / "line", category, gains), caplog)
    assert alarms, "the drift alarm never fired"
    part = alarms[0]  # the alarm's part number: its passed parts plus the rejects among them
    while part < alarms[0] + sum(r < part for r in rejected):
        part = alarms[0] + sum(r < part for r in rejected)
    assert steady < part <= steady + 160, (alarms, rejected[:5])
    rejected_before = sum(steady <= r < part for r in rejected)
    assert rejected_before <= 0.02 * (part - steady), (part, rejected[:5])  # the bound still held


def test_an_unchanged_replay_stays_silent(
    drift_bundle: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle, category = drift_bundle
    alarms, _ = run_replay(bundle, replay(tmp_path / "line", category, [1.0] * 300), caplog)
    assert alarms == []
