import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.datasets import (
    DatasetError,
    MVTecCategory,
    SkipReport,
    iter_loaded,
    normal_frames,
)
from edge.images import read_image


@pytest.fixture()
def category(small_category: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "brick"
    shutil.copytree(small_category, dst)
    return dst


def test_mvtec_layout_is_listed(category: Path) -> None:
    cat = MVTecCategory(category)
    assert len(cat.train) == 16 and cat.has_masks
    kinds = {s.defect_type for s in cat.test}
    assert kinds == {"good", "scratch", "stain", "crack", "missing", "twist"}
    for s in cat.test:
        if s.label:
            assert s.mask_path == category / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"
        else:
            assert s.mask_path is None
    loaded = list(iter_loaded(cat.test, False, SkipReport()))
    assert all(item.mask is not None and item.mask.any() for item in loaded if item.sample.label)


def test_category_without_masks_is_fine(category: Path) -> None:
    shutil.rmtree(category / "ground_truth")
    cat = MVTecCategory(category)
    assert not cat.has_masks and all(s.mask_path is None for s in cat.test)


def test_not_a_category(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="expected a folder .*train/good"):
        MVTecCategory(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        MVTecCategory(tmp_path)


def test_corrupt_image_names_the_file_or_is_skipped(category: Path) -> None:
    bad = category / "train" / "good" / "003.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    samples = normal_frames(category)
    with pytest.raises(DatasetError, match=r"003\.png: cannot be decoded"):
        list(iter_loaded(samples, False, SkipReport()))
    report = SkipReport()
    kept = list(iter_loaded(samples, True, report))
    assert len(kept) == 15 and [p for p, _ in report.skipped] == [bad]


def test_missing_and_mismatched_masks(category: Path) -> None:
    (category / "ground_truth" / "crack" / "000_mask.png").unlink()
    cat = MVTecCategory(category)
    with pytest.raises(DatasetError, match=r"crack/000\.png: missing ground-truth mask"):
        cat.check_masks(False, SkipReport())
    report = SkipReport()
    cat.check_masks(True, report)
    assert len(report.skipped) == 1
    cv2.imwrite(str(category / "ground_truth" / "stain" / "001_mask.png"), np.zeros((10, 10), np.uint8))
    cat = MVTecCategory(category)
    with pytest.raises(DatasetError, match=r"001_mask\.png: mask is 10x10 but its image is 128x128"):
        list(iter_loaded([s for s in cat.test if s.defect_type == "stain"], False, SkipReport()))


def test_plain_folder_of_frames_recursive(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "a" / "1.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "a" / "b" / "2.jpg"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("x")
    assert [s.path.name for s in normal_frames(tmp_path)] == ["1.png", "2.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no images found"):
        normal_frames(tmp_path / "empty")
    with pytest.raises(DatasetError, match="nothing: data folder does not exist"):
        normal_frames(tmp_path / "nothing")


def test_16bit_image_is_read_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "m16.png"
    cv2.imwrite(str(path), np.full((4, 4), 40000, np.uint16))
    image = read_image(path)
    assert image.dtype == np.uint16 and image.shape == (4, 4)
