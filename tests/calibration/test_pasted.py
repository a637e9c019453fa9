import cv2
import numpy as np
import pytest

from calibration.pasted import PASTED_KINDS, PastedDefects
from calibration.photos import load_photo
from calibration.synthetic import normal_tile

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def defects() -> PastedDefects:
    return PastedDefects([load_photo("coffee"), load_photo("moon")])


@pytest.mark.parametrize("grey", [True, False])
@pytest.mark.parametrize("kind", PASTED_KINDS)
def test_pasted_defect_changes_the_tile_inside_its_mask(defects: PastedDefects, kind: str, grey: bool) -> None:
    changed_inside, changed_outside = [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        tile = normal_tile(load_photo("ihc", grey=grey), 128, rng)
        out, mask = defects.kinds()[kind](tile, rng)
        assert out.shape == tile.shape and out.dtype == np.uint8 and mask.shape == tile.shape[:2]
        assert mask.dtype == bool and 0.001 < mask.mean() < 0.3
        diff = np.abs(out.astype(int) - tile.astype(int))
        diff = diff.max(axis=2) if diff.ndim == 3 else diff
        rim = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        changed_inside.append(float((diff[mask] > 8).mean()))
        changed_outside.append(float((diff[~rim] > 2).mean()))
    # Most of the mask is visibly changed (a blur leaves flat spots, a hairline's brush is wider than the
    # crack), and away from the mask's soft rim nothing is.
    assert np.mean(changed_inside) > (0.25 if kind in ("blur", "hairline") else 0.5)
    assert max(changed_outside) == 0.0


def test_pasted_defects_are_reproducible_and_vary_with_the_seed(defects: PastedDefects) -> None:
    tile = normal_tile(load_photo("grass"), 96, np.random.default_rng(0))
    a = defects.patch(tile, np.random.default_rng(3))
    b = defects.patch(tile, np.random.default_rng(3))
    c = defects.patch(tile, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_patch_brings_in_the_donors_material() -> None:
    # A black tile patched from a white donor: the masked pixels turn white, the rest stay black.
    defects = PastedDefects([np.full((200, 300, 3), 255, np.uint8)])
    out, mask = defects.patch(np.zeros((64, 64, 3), np.uint8), np.random.default_rng(0))
    assert out[mask].min() >= 127 and out[~mask].max() <= 127
    with pytest.raises(ValueError, match="at least one donor"):
        PastedDefects([])
