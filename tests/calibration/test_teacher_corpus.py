"""The teacher corpus: seeded, varied, never flat, photographs only when installed."""

import numpy as np
import pytest

from calibration.teacher_corpus import PROCEDURAL, TeacherCorpus, packaged_photos, spectral_field


def test_image_i_depends_on_seed_stream_and_index_alone() -> None:
    a, b = TeacherCorpus(3, 64), TeacherCorpus(3, 64)
    assert all(np.array_equal(a.image(i), b.image(i)) for i in (0, 7, 41))
    assert np.array_equal(a.batch(5, 3)[1], b.image(6))
    assert not np.array_equal(a.image(0), a.image(1))
    assert not np.array_equal(a.image(0), TeacherCorpus(4, 64).image(0))
    assert not np.array_equal(a.image(0), TeacherCorpus(3, 64, stream=1).image(0))


def test_every_kind_appears_and_no_image_is_flat() -> None:
    corpus = TeacherCorpus(0, 64)
    kinds = [corpus.kind(i) for i in range(120)]
    assert set(kinds) == set(PROCEDURAL)  # no photographs given: none drawn
    for i in range(120):
        image = corpus.image(i)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert image.std() >= 0.03 * 255 - 1, (i, kinds[i])


def test_photographs_join_when_given() -> None:
    rng = np.random.default_rng(0)
    photo = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    corpus = TeacherCorpus(0, 64, (photo,))
    share = np.mean([corpus.kind(i) == "photo" for i in range(400)])
    assert 0.25 < share < 0.45


def test_packaged_photos_are_rgb_by_name() -> None:
    photos = packaged_photos()
    assert photos  # sklearn and matplotlib ship some even without scikit-image
    assert all(p.ndim == 3 and p.shape[2] == 3 and p.dtype == np.uint8 for p in photos.values())


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.0])
def test_spectral_field_power_falls_as_one_over_f_to_the_exponent(exponent: float) -> None:
    side = 256
    field = spectral_field(np.random.default_rng(1), side, exponent)
    power = np.abs(np.fft.fft2(field - field.mean())) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side)))
    bands = np.geomspace(4 / side, 0.25, 12)
    centres = np.sqrt(bands[:-1] * bands[1:])
    mean_power = [power[(f >= lo) & (f < hi)].mean() for lo, hi in zip(bands[:-1], bands[1:], strict=True)]
    slope = np.polyfit(np.log(centres), np.log(mean_power), 1)[0]
    assert slope == pytest.approx(-exponent, abs=0.35)  # clipping the 1 % tails bends it a little
