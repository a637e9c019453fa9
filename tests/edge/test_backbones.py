from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from edge.backbones import BACKBONES, WeightsNotFound, load_backbone, resolve_weights
from edge.efficientnet_lite import EfficientNetLite
from edge.scoring import concat_feature_maps, patch_features

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is in the dev extra")


def _random_frame(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _same_up_to_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal but for float32 rounding: the convolution kernels a CPU picks sum in different orders,
    so the tolerance follows the features' size (tens), not a fixed absolute figure."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def _classify(image: np.ndarray) -> int:
    """Top-1 ImageNet class of an RGB image with the shipped Lite0 weights and Lite0 preprocessing."""
    spec = BACKBONES["efficientnet_lite0"]
    net = EfficientNetLite()
    net.load_state_dict(torch.load(resolve_weights(spec, None), weights_only=True))
    net.eval()
    x = torch.from_numpy(spec.preprocessing(224)(image)).unsqueeze(0)
    with torch.inference_mode():
        return int(net(x).argmax())


def test_lite0_weights_are_the_real_imagenet_ones() -> None:
    assert 281 <= _classify(skimage_data.chelsea()) <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert _classify(skimage_data.coffee()) in (967, 968)  # espresso / cup


def test_lite0_feature_maps_have_strides_8_and_16() -> None:
    bb = load_backbone("efficientnet_lite0").module
    feats = bb(torch.zeros(2, 3, 128, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 40, 16, 12), (2, 112, 8, 6)]
    assert bb.strides == [8, 16] and bb.channels == [40, 112]


@pytest.mark.parametrize("size", [(128, 96), (100, 100)])
def test_grid_size_is_the_finest_feature_map_size(size: tuple[int, int]) -> None:
    bb = load_backbone("efficientnet_lite0").module
    with torch.inference_mode():
        assert tuple(bb(torch.zeros(1, 3, *size))[0].shape[-2:]) == bb.grid_size(size)


def test_border_pad_keeps_output_size_and_changes_edge_features() -> None:
    plain = load_backbone("efficientnet_lite0").module
    padded = load_backbone("efficientnet_lite0", border_pad=16, border_mode="circular").module
    x = _random_frame(1, 3, 64, 64)
    with torch.inference_mode():
        a, b = plain(x), padded(x)
    assert [f.shape for f in a] == [f.shape for f in b]
    # Edge cells differ (no zero padding there any more) ...
    assert not torch.allclose(a[0][..., 0, 0], b[0][..., 0, 0])
    with pytest.raises(ValueError, match="multiple of 16"):
        load_backbone("efficientnet_lite0", border_pad=8)
    with pytest.raises(ValueError, match="border_mode must be one of zeros, circular, reflect, replicate"):
        load_backbone("efficientnet_lite0", border_pad=16, border_mode="mirror")


def test_padded_maps_crop_to_forward_and_modes_differ_only_near_the_edge() -> None:
    wrap = load_backbone("efficientnet_lite0", border_pad=16, border_mode="circular").module
    mirror = load_backbone("efficientnet_lite0", border_pad=16, border_mode="reflect").module
    x = _random_frame(1, 3, 96, 96)
    with torch.inference_mode():
        padded = wrap.padded(x)
        cropped = wrap(x)
        assert [tuple(f.shape[-2:]) for f in padded] == [(16, 16), (8, 8)]  # (96 + 2 * 16) / stride
        for f, c, s in zip(padded, cropped, wrap.strides, strict=True):
            assert torch.equal(wrap.crop(f, s), c)
        a, b = wrap(x)[0], mirror(x)[0]
    assert not torch.allclose(a[..., 0, 0], b[..., 0, 0], atol=1e-3)
    # The centre of a 12x12 stride-8 map is far enough from the padding for both modes to agree.
    assert _same_up_to_rounding(a[..., 5:7, 5:7], b[..., 5:7, 5:7])


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
def test_padded_frame_runs_the_network_in_channels_last(mode: str) -> None:
    # F.pad's circular mode returns NCHW; the CPU convolutions are twice as slow in it.
    bb = load_backbone("efficientnet_lite0", border_pad=16, border_mode=mode).module
    x = _random_frame(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        feats = bb.padded(x)
        reference = bb._features(torch.nn.functional.pad(x, (16, 16, 16, 16), mode=mode))
    for f, r in zip(feats, reference, strict=True):
        assert f.is_contiguous(memory_format=torch.channels_last)
        assert _same_up_to_rounding(f, r)


def test_patch_features_pool_edge_cells_over_the_padding() -> None:
    bb = load_backbone("efficientnet_lite0", border_pad=16, border_mode="circular").module
    x = _random_frame(1, 3, 128, 128)
    with torch.inference_mode():
        ours = patch_features(bb, x, pool=True)
        pooled_after_crop = concat_feature_maps(bb(x), pool=True)
    assert ours.shape == pooled_after_crop.shape == (1, 152, 16, 16)
    # Edge cells differ (their 3x3 window reaches into the padding), interior cells are the same.
    assert not torch.allclose(ours[..., 0, :], pooled_after_crop[..., 0, :], atol=1e-4)
    # (3 cells: the upsampled stride-16 map reaches one coarse cell, i.e. up to 3 fine cells, inward.)
    assert _same_up_to_rounding(ours[..., 3:-3, 3:-3], pooled_after_crop[..., 3:-3, 3:-3])


def test_zeros_border_pools_the_zeros_beyond_the_edge() -> None:
    bb = load_backbone("efficientnet_lite0").module  # the default: zeros, nothing added
    assert bb.border_mode == "zeros" and bb.border_pad == 0 and bb.pools_zeros
    x = _random_frame(1, 3, 128, 128)
    with torch.inference_mode():
        ours = patch_features(bb, x, pool=True)
        inside_only = concat_feature_maps(bb(x), pool=True)
    fine = slice(0, bb.channels[0])  # the stride-8 map, pooled at its own resolution (no upsampling after)
    # A corner window holds 4 of its 9 cells inside the frame, an edge window 6: the rest count as zeros.
    assert _same_up_to_rounding(ours[:, fine, 0, 0], inside_only[:, fine, 0, 0] * 4 / 9)
    assert _same_up_to_rounding(ours[:, fine, 0, 5], inside_only[:, fine, 0, 5] * 6 / 9)
    assert _same_up_to_rounding(ours[..., 3:-3, 3:-3], inside_only[..., 3:-3, 3:-3])


def test_unpadded_frame_runs_channels_last_whatever_the_caller_hands_in() -> None:
    # Offline scoring hands in NCHW frames, the pipeline channels-last ones: both must run the same
    # convolutions (NCHW is 2x slower, and in bf16 it rounds differently).
    bb = load_backbone("efficientnet_lite0", precision="bfloat16").module
    x = _random_frame(1, 3, 64, 64)
    with torch.inference_mode():
        nchw, last = bb.padded(x), bb.padded(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(nchw, last, strict=True):
        assert a.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)


def test_zeros_border_with_padding_fills_zeros() -> None:
    bb = load_backbone("efficientnet_lite0", border_pad=16, border_mode="zeros").module
    x = _random_frame(1, 3, 64, 64)
    with torch.inference_mode():
        feats = bb.padded(x)
        reference = bb._features(torch.nn.functional.pad(x, (16, 16, 16, 16)))
    for f, r in zip(feats, reference, strict=True):
        assert f.is_contiguous(memory_format=torch.channels_last)
        assert _same_up_to_rounding(f, r)


def test_zeros_border_keeps_normal_frames_edges_from_scoring_highest(small_category: Path) -> None:
    """Normal frames' highest-scoring patch lands on the frame's edge ring (a quarter of the cells) about
    as often as chance with the zeros border; pooled over the inside cells only, it always did."""
    from calibration.datasets import MVTecCategory, SkipReport, normal_frames
    from calibration.fit import fit_patchcore, preprocess_samples
    from edge.images import read_image
    from edge.models.patchcore import PatchCoreModel, patchcore_embedding
    from edge.preprocessing import to_rgb8
    from edge.scoring import nearest_neighbor

    pre = BACKBONES["efficientnet_lite0"].preprocessing(128)
    train = preprocess_samples(normal_frames(small_category), pre, False, SkipReport())
    good = [s for s in MVTecCategory(small_category).test if s.label == 0]
    x = torch.stack([torch.from_numpy(pre(to_rgb8(read_image(s.path)))) for s in good])
    on_edge = {}
    for mode in ("zeros", "circular"):  # circular with border_pad 0: nothing added, pooling truncated
        bb = load_backbone("efficientnet_lite0", border_mode=mode).module
        model = PatchCoreModel(bb, fit_patchcore(bb, train, 0.1).memory_bank, (128, 128)).eval()
        with torch.inference_mode():
            emb = patchcore_embedding(bb, x)
            n, c, h, w = emb.shape
            dist, _ = nearest_neighbor(emb.permute(0, 2, 3, 1).reshape(-1, c), model.bank_cols, model.bank_sq)
        edge = torch.ones(h, w, dtype=torch.bool)
        edge[1:-1, 1:-1] = False
        on_edge[mode] = int(edge.view(-1)[dist.view(n, -1).argmax(dim=1)].sum())
    assert len(good) == 4
    assert on_edge["zeros"] <= 1 and on_edge["circular"] >= 3, on_edge


@pytest.mark.parametrize(("name", "channels"), [("resnet18", (128, 256)), ("wide_resnet50_2", (512, 1024))])
def test_torchvision_backbone_from_explicit_path(tmp_path: Path, name: str, channels: tuple[int, int]) -> None:
    weights = tmp_path / f"{name}.pth"
    torch.save(getattr(torchvision.models, name)(weights=None).state_dict(), weights)
    loaded = load_backbone(name, weights=weights)
    feats = loaded.module(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, channels[0], 8, 8), (1, channels[1], 4, 4)]
    assert loaded.module.channels == list(channels)
    assert loaded.weights_path == weights and len(loaded.weights_sha256) == 64


def test_missing_torchvision_weights_say_where_to_put_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFound) as err:
        load_backbone("wide_resnet50_2")
    msg = str(err.value)
    assert "wide_resnet50_2-95faca4d.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(WeightsNotFound, match="does not exist"):
        load_backbone("resnet18", weights=tmp_path / "nope.pth")


def test_weights_for_another_network_are_refused(tmp_path: Path) -> None:
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    with pytest.raises(WeightsNotFound, match="does not fit efficientnet_lite0"):
        load_backbone("efficientnet_lite0", weights=weights)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFound, match="could not be read"):
        load_backbone("resnet18", weights=garbage)


def test_unknown_layer_and_backbone() -> None:
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        load_backbone("efficientnet_lite0", layers=("layer9",))
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("vgg")


def _randomise_batchnorm(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so folding them is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)


def test_lite0_with_folded_batchnorm_gives_the_same_features() -> None:
    net = EfficientNetLite()
    _randomise_batchnorm(net)
    net.eval()
    x = _random_frame(2, 3, 96, 80)
    with torch.inference_mode():
        before = net.forward_blocks(x, 10)
        logits = net(x)
        net.fold_batchnorm()
        after = net.forward_blocks(x, 10)
        folded_logits = net(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    for a, b in zip(before, after, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert torch.allclose(logits, folded_logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max()))


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_resnet_with_folded_batchnorm_gives_the_same_features(tmp_path: Path, name: str) -> None:
    net = getattr(torchvision.models, name)(weights=None)
    _randomise_batchnorm(net)
    weights = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), weights)
    folded = load_backbone(name, weights=weights).module
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = _random_frame(1, 3, 64, 64)
    net.eval()
    with torch.inference_mode():
        x1 = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))
        expected = [net.layer2(x1)]
        expected.append(net.layer3(expected[0]))
        got = folded(x)
    for a, b in zip(expected, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


@pytest.mark.parametrize(
    ("kernel", "stride", "size"),
    [(3, 1, 17), (5, 1, 16), (3, 2, 16), (5, 2, 16), (3, 2, 15), (3, 2, (16, 15)), (5, 2, (15, 18))],
)
@pytest.mark.parametrize("groups", [4, 1])  # depthwise (padding folded into the kernel) and dense (padded copy)
def test_same_conv_matches_tensorflow_same_padding(
    kernel: int, stride: int, size: int | tuple[int, int], groups: int
) -> None:
    from edge.efficientnet_lite import SameConv2d

    torch.manual_seed(0)
    conv = SameConv2d(4, 4, kernel, stride=stride, groups=groups, bias=True)
    h, w = (size, size) if isinstance(size, int) else size
    x = _random_frame(1, 4, h, w)
    # TensorFlow SAME: output ceil(size / stride); the extra padding (if odd) goes right/bottom.
    out_hw = [-(-n // stride) for n in (h, w)]
    total = [max((o - 1) * stride + kernel - n, 0) for o, n in zip(out_hw, (h, w), strict=True)]
    pads = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    padded = torch.nn.functional.pad(x, pads)
    expected = torch.nn.functional.conv2d(padded, conv.weight, conv.bias, stride, 0, 1, groups)
    with torch.inference_mode():
        got = conv(x)
    assert got.shape == expected.shape == (1, 4, *out_hw)
    assert torch.allclose(got, expected, atol=1e-5)


def test_bfloat16_backbone_gives_float32_maps_close_to_the_float32_ones() -> None:
    exact = load_backbone("efficientnet_lite0").module
    fast = load_backbone("efficientnet_lite0", precision="bfloat16").module
    assert exact.net_bfloat16 is None and fast.net_bfloat16 is not None
    assert all(p.dtype == torch.float32 for p in fast.net.parameters())  # the float32 net is kept for GPUs
    x = torch.from_numpy(BACKBONES["efficientnet_lite0"].preprocessing(128)(skimage_data.chelsea())).unsqueeze(0)
    with torch.inference_mode():
        a, b = exact(x), fast(x)
    for f32, f16 in zip(a, b, strict=True):
        assert f16.dtype == torch.float32 and f16.shape == f32.shape
        rel = float((f16 - f32).norm() / f32.norm())
        assert 1e-4 < rel < 0.06  # rounded (so the bf16 net ran), yet within bf16's few percent
    assert fast.arithmetic(torch.device("cpu")) == "bfloat16"
    assert fast.arithmetic(torch.device("cuda")) == "bfloat16"  # asked for explicitly: everywhere
    with pytest.raises(ValueError, match="backbone_precision must be one of"):
        load_backbone("efficientnet_lite0", precision="half")
