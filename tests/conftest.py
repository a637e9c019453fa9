"""Shared fixtures: a tiny generated MVTec-layout dataset and a fitted bundle, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from calibration.synthetic import generate_mvtec_dataset

torch.set_num_threads(2)

SMALL = {"n_train": 16, "n_test_good": 4, "n_test_per_defect": 2, "size": 128}


@pytest.fixture(scope="session")
def small_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return generate_mvtec_dataset(root, ("brick",), seed=1, **SMALL)[0]


@pytest.fixture(scope="session")
def small_config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text("model:\n  input_size: 128\nfit:\n  batch_size: 8\n")
    return path
