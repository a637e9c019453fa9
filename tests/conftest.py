"""Shared fixtures: a tiny generated MVTec-layout dataset, a config, a calibrated bundle of it, and store databases
(SQLite, PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from postgres_server import new_database, postgres_server, server_binaries

from calibration.calibrate import calibrate
from calibration.datasets import normal_frames
from calibration.synthetic import generate_mvtec_dataset
from edge.bundle import save_bundle
from pipeline.app.config import config_from_dict

torch.set_num_threads(2)

SMALL = {"n_train": 16, "n_test_good": 4, "n_test_per_defect": 2, "size": 128}
LOOSE = {"target_fpr": 0.2, "confidence": 0.8, "synthetic_per_kind": 0}


@pytest.fixture(scope="session")
def small_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return generate_mvtec_dataset(root, ("brick",), seed=1, **SMALL)[0]


@pytest.fixture(scope="session")
def bundle_path(small_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated PatchCore bundle of `small_category` at input 128 (threshold at 20 % FPR, 80 % confidence)."""
    config = config_from_dict({"model": {"input_size": 128}, "calibration": LOOSE})
    cal = calibrate(config, normal_frames(small_category))
    path = tmp_path_factory.mktemp("run") / "bundle.pt"
    save_bundle(path, cal.fit.model, cal.manifest, cal.golden)
    return path


@pytest.fixture(scope="session")
def grass_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second camera's view: a texture nothing like the brick of `small_category`."""
    return generate_mvtec_dataset(tmp_path_factory.mktemp("grass"), ("grass",), seed=2, **SMALL)[0]


@pytest.fixture(scope="session")
def grass_bundle(grass_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated bundle of `grass_category`, as `bundle_path` is of `small_category`."""
    config = config_from_dict({"model": {"input_size": 128}, "calibration": LOOSE})
    cal = calibrate(config, normal_frames(grass_category))
    path = tmp_path_factory.mktemp("grass-run") / "grass.pt"
    save_bundle(path, cal.fit.model, cal.manifest, cal.golden)
    return path


@pytest.fixture(scope="session")
def small_config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text("model:\n  input_size: 128\nfit:\n  batch_size: 8\n")
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A running PostgreSQL server for the session (.ci/run installs Debian's `postgresql`)."""
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server installed here (apt-get install postgresql; .ci/run does)")
    with postgres_server(bin_dir) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store database of each kind: a new SQLite file, or a new database on the server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return new_database(request.getfixturevalue("postgres_url"), "store")
