from pathlib import Path

import numpy as np
import pytest

from calibration.datasets import MVTecCategory
from calibration.evaluate import ScoredSet
from calibration.pasted import PASTED_KINDS
from calibration.photos import PHOTOS, load_photo
from calibration.quality_sets import QualitySetSize, generator_of, quality_figures, write_quality_category
from calibration.synthetic import DEFECT_KINDS

pytest.importorskip("skimage")

SMALL = QualitySetSize(n_train=4, n_test_good=5, n_test_per_generator=10, size=64)


@pytest.mark.parametrize("name", list(PHOTOS))
def test_every_photograph_loads_offline(name: str) -> None:
    image = load_photo(name)
    assert image.dtype == np.uint8 and min(image.shape[:2]) >= 300 and image.ndim in (2, 3)
    assert load_photo(name, grey=True).ndim == 2


def test_unknown_photograph_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown photograph 'lena': expected one of brick, grass"):
        load_photo("lena")


def test_quality_category_is_mvtec_layout_with_both_generators(tmp_path: Path) -> None:
    folder = write_quality_category(tmp_path, "coffee", seed=1, size=SMALL)
    assert folder == tmp_path / "coffee-s1"
    category = MVTecCategory(folder)
    assert len(category.train) == 4 and category.has_masks
    kinds = [s.defect_type for s in category.test]
    assert kinds.count("good") == 5
    expected = {f"drawn_{k}" for k in DEFECT_KINDS} | {f"pasted_{k}" for k in PASTED_KINDS}
    assert set(kinds) - {"good"} == expected
    assert sum(generator_of(k) == "drawn" for k in kinds) == sum(generator_of(k) == "pasted" for k in kinds) == 10
    image = np.asarray(__import__("cv2").imread(str(category.test[0].path)))
    assert image.shape == (64, 64, 3)  # a colour photograph gives colour tiles


def test_quality_category_depends_on_family_and_seed_only(tmp_path: Path) -> None:
    def tiles(root: Path, seed: int) -> list[bytes]:
        folder = write_quality_category(root, "moon", seed=seed, size=SMALL)
        return [p.read_bytes() for p in sorted(folder.rglob("*.png"))]

    first = tiles(tmp_path / "a", 0)
    assert tiles(tmp_path / "b", 0) == first
    assert tiles(tmp_path / "c", 1) != first


def test_quality_figures_split_by_generator() -> None:
    # Drawn defects score above every good tile, pasted ones among them (above 2 and 3 of the 4).
    kinds = ["good"] * 4 + ["drawn_scratch", "drawn_stain", "pasted_blur", "pasted_patch"]
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.25, 0.35])
    masks = np.zeros((8, 4, 4), bool)
    masks[4:, 0, 0] = True
    maps = np.zeros((8, 4, 4), np.float32)
    maps[4:6, 0, 0] = 1.0
    scored = ScoredSet(labels, scores, maps, masks, np.ones(8), kinds)
    figures = quality_figures(scored)
    assert figures["image_auroc_drawn"] == 1.0
    assert figures["image_auroc_pasted"] == pytest.approx(5 / 8)
    assert figures["image_auroc"] == pytest.approx((8 + 5) / 16)
    assert 0.5 < figures["pixel_auroc"] < 1.0 and "pro" in figures
