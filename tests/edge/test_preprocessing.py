import numpy as np
import pytest
import torch

from edge.backbones import BACKBONES
from edge.preprocessing import Preprocessing, to_rgb8


def test_grayscale_16bit_rgba_and_float_are_converted() -> None:
    gray = np.full((4, 5), 7, np.uint8)
    assert to_rgb8(gray).shape == (4, 5, 3) and (to_rgb8(gray) == 7).all()
    mono16 = np.full((4, 5), 65535, np.uint16)
    assert (to_rgb8(mono16) == 255).all()
    assert (to_rgb8(np.full((4, 5), 257 * 100, np.uint16)) == 100).all()
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 9
    assert to_rgb8(rgba).shape == (4, 5, 3) and (to_rgb8(rgba)[..., 0] == 9).all()
    assert (to_rgb8(np.full((2, 2, 3), 0.5, np.float32)) == 128).all()


def test_bad_images_are_rejected_with_shape_or_dtype() -> None:
    with pytest.raises(ValueError, match=r"got \(4, 5, 2\)"):
        to_rgb8(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(ValueError, match="int32"):
        to_rgb8(np.zeros((4, 5), np.int32))


def test_preprocessing_resize_crop_normalise() -> None:
    pre = Preprocessing(resize=(40, 40), crop=(32, 32), mean=(127.0,) * 3, std=(128.0,) * 3)
    out = pre(np.full((80, 60, 3), 255, np.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert np.allclose(out, (255 - 127) / 128)
    mask = np.zeros((80, 60), bool)
    mask[:40] = True
    m = pre.mask(mask)
    assert m.dtype == bool and m.shape == (32, 32) and m[0].all() and not m[-1].any()
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    with pytest.raises(ValueError, match="larger than resize"):
        Preprocessing(resize=(30, 30), crop=(32, 32), mean=(0.0,) * 3, std=(1.0,) * 3)


def test_gray_and_rgb_of_same_content_give_same_tensor() -> None:
    pre = BACKBONES["efficientnet_lite0"].preprocessing(32)
    gray = np.random.default_rng(0).integers(0, 255, (50, 50), dtype=np.uint8)
    assert np.array_equal(pre(gray), pre(np.repeat(gray[:, :, None], 3, axis=2)))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU box)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_batched_normalisation_is_the_per_frame_one_bit_for_bit(device: str) -> None:
    pre = Preprocessing(resize=(24, 20), crop=(24, 20), mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
    rgb8 = np.random.default_rng(3).integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    expected = torch.from_numpy(np.stack([pre.normalize(f) for f in rgb8])).to(device)
    out = pre.normalize_batch(torch.from_numpy(rgb8).to(device))
    assert out.shape == (3, 3, 24, 20) and out.is_contiguous(memory_format=torch.channels_last)
    assert out.device == expected.device and torch.equal(out, expected)
    # A strided view (every other frame of a mirrored copy) gives the same values as its contiguous copy.
    view = torch.from_numpy(rgb8).to(device).flip(2)[::2]
    assert torch.equal(pre.normalize_batch(view), pre.normalize_batch(view.contiguous()))
    assert torch.equal(pre.normalize_batch(view)[1], expected[2].flip(2))
    # Float frames (already in 0-255) give the same values, and the caller's tensor is left as it was.
    floats = torch.from_numpy(rgb8).to(device, torch.float32)
    assert torch.equal(pre.normalize_batch(floats), expected)
    assert torch.equal(floats, torch.from_numpy(rgb8).to(device, torch.float32))
