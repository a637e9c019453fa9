"""Fixtures of the runtime tests: a calibrated bundle of the small generated category."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration.calibrate import calibrate
from calibration.datasets import normal_frames
from edge.bundle import save_bundle
from pipeline.app.config import config_from_dict

LOOSE = {"target_fpr": 0.2, "confidence": 0.8, "synthetic_per_kind": 0}


@pytest.fixture(scope="session")
def bundle_path(small_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = config_from_dict({"model": {"input_size": 128}, "calibration": LOOSE})
    cal = calibrate(config, normal_frames(small_category))
    path = tmp_path_factory.mktemp("run") / "bundle.pt"
    save_bundle(path, cal.fit.model, cal.manifest)
    return path
