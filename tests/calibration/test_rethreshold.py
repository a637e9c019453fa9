"""Re-choosing a calibrated bundle's threshold on frames the line passed: scores, skips, refusals, the manifest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.calibrate import score_images
from calibration.rethreshold import LineFrame, rethreshold
from calibration.settings import CalibrationConfig, OfflineConfig
from calibration.threshold import InsufficientCalibrationData, choose_threshold
from edge.bundle import Bundle, load_bundle
from edge.images import list_images, read_image
from edge.precision import native_bfloat16_matmul
from edge.preprocessing import to_rgb8

LOOSE = OfflineConfig(calibration=CalibrationConfig(target_fpr=0.2, confidence=0.8))  # needs 8 frames
OTHER = "ab" * 32


@pytest.fixture(scope="module")
def bundle(bundle_path: Path) -> Bundle:
    return load_bundle(bundle_path)


@pytest.fixture(scope="module")
def good_frames(small_category: Path, bundle: Bundle) -> list[np.ndarray]:
    """The category's 20 good frames (train and test) as the model sees them."""
    paths = list_images(small_category / "train" / "good") + list_images(small_category / "test" / "good")
    return [bundle.preprocessing.geometry(to_rgb8(read_image(p))) for p in paths]


def test_the_threshold_is_chosen_on_the_frames_at_input_size_and_the_rest_counted(
    bundle: Bundle, good_frames: list[np.ndarray]
) -> None:
    small = [cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in good_frames[:3]]
    frames = [LineFrame(f, bundle.hash) for f in good_frames[:12]] + [LineFrame(f, OTHER) for f in small]
    frames += [LineFrame(f, OTHER) for f in good_frames[12:]]
    source = {"source": "test", "where": "here"}
    r = rethreshold(bundle, frames, LOOSE, source)
    expected = np.asarray([s for s, _ in score_images(bundle.model, bundle.preprocessing, good_frames, 4)])
    np.testing.assert_array_equal(r.scores, expected)
    assert r.choice == choose_threshold(expected, 0.2, 0.8)
    assert (r.skipped, r.by_bundle, r.previous_threshold) == (3, {OTHER: 8, bundle.hash: 12}, bundle.threshold)
    m = r.manifest
    assert m.threshold is not None and m.threshold.value == r.choice.threshold
    # What `auto` runs on this CPU: bf16 with AVX512-BF16 or AMX, float32 otherwise.
    arithmetic = "bfloat16" if native_bfloat16_matmul() else "float32"
    assert m.threshold.backbone_arithmetic == arithmetic and m.threshold.choice == r.choice.to_dict()
    assert m.normalization == {
        "method": "holdout_median_to_threshold",
        "center": float(np.median(expected)),
        "scale": r.choice.threshold - float(np.median(expected)),
    }
    cal = m.calibration or {}
    assert list(cal)[:2] == ["source", "where"]  # the caller's record of where the frames came from opens it
    assert {k: cal[k] for k in ("frames", "skipped", "bundle_of_frames", "previous_threshold", "previous_bundle")} == {
        "frames": 20,
        "skipped": 3,
        "bundle_of_frames": {OTHER: 8, bundle.hash: 12},
        "previous_threshold": bundle.threshold,
        "previous_bundle": bundle.hash,
    }
    assert cal["config"] == {"target_fpr": 0.2, "confidence": 0.8, "allow_weak_bound": False}
    # The model is the bundle's: everything but the threshold, its normalisation and the record is kept.
    assert replace(m, threshold=None, normalization=None, calibration=None) == replace(
        bundle.manifest, threshold=None, normalization=None, calibration=None
    )


def test_too_few_frames_are_refused_with_the_counts_unless_a_weak_bound_is_allowed(
    bundle: Bundle, good_frames: list[np.ndarray]
) -> None:
    frames = [LineFrame(f, bundle.hash) for f in good_frames[:5]]
    frames.append(LineFrame(good_frames[5][:64], bundle.hash))  # another size: not counted as a frame
    with pytest.raises(InsufficientCalibrationData) as refused:
        rethreshold(bundle, frames, LOOSE, {})
    assert str(refused.value).startswith(
        "5 passed frames at the model's input size 128x128 (1 of another size skipped): bounding the false-reject "
        "rate at 0.2 with 80% confidence needs at least 8"
    )
    assert str(refused.value).endswith("or pass --allow-weak-bound)")
    weak = replace(LOOSE, calibration=replace(LOOSE.calibration, allow_weak_bound=True))
    with pytest.raises(InsufficientCalibrationData, match=r"^0 passed frames .* lower confidence\)$"):
        rethreshold(bundle, [], weak, {})
    r = rethreshold(bundle, frames, weak, {})
    assert (r.choice.method, r.choice.n, r.choice.threshold) == ("max_score_weak", 5, float(r.scores.max()))


def test_a_bundle_without_threshold_and_a_frame_that_is_not_rgb8_are_refused(
    bundle: Bundle, good_frames: list[np.ndarray]
) -> None:
    uncalibrated = replace(bundle, manifest=replace(bundle.manifest, threshold=None))
    with pytest.raises(ValueError, match="has no threshold to re-choose"):
        rethreshold(uncalibrated, [LineFrame(good_frames[0], bundle.hash)], LOOSE, {})
    with pytest.raises(ValueError, match=r"expected an \(h, w, 3\) uint8 RGB array, got \(128, 128, 3\) float32"):
        rethreshold(bundle, [LineFrame(good_frames[0].astype(np.float32), bundle.hash)], LOOSE, {})
