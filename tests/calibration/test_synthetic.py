from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.synthetic import DEFECT_KINDS, add_defect, normal_tile, texture_photo

pytest.importorskip("skimage")


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_changes_pixels_inside_its_mask_only(kind: str) -> None:
    rng = np.random.default_rng(0)
    tile = normal_tile(texture_photo("gravel"), 128, rng)
    out, mask = add_defect(tile, kind, rng)
    assert out.shape == tile.shape and out.dtype == np.uint8 and mask.dtype == bool
    assert 0.002 < mask.mean() < 0.25
    diff = np.abs(out.astype(int) - tile.astype(int))
    assert diff[mask].mean() > 20
    # Outside the mask (away from its anti-aliased rim) nothing changes.
    rim = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    assert diff[~rim].max() <= 3 if kind != "stain" else diff[~rim].mean() < 1


def test_defect_on_colour_image() -> None:
    rng = np.random.default_rng(0)
    tile = np.repeat(normal_tile(texture_photo("brick"), 64, rng)[:, :, None], 3, axis=2)
    out, mask = add_defect(tile, "missing", rng)
    assert out.shape == (64, 64, 3) and mask.shape == (64, 64)


def test_generated_layout(small_category: Path) -> None:
    assert len(list((small_category / "train" / "good").glob("*.png"))) == 16
    for kind in DEFECT_KINDS:
        images = sorted((small_category / "test" / kind).glob("*.png"))
        masks = sorted((small_category / "ground_truth" / kind).glob("*_mask.png"))
        assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
    with pytest.raises(ValueError, match="unknown defect kind"):
        add_defect(np.zeros((8, 8), np.uint8), "dent", np.random.default_rng(0))
