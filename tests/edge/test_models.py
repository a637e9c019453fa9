from pathlib import Path

import numpy as np
import pytest
import torch

from calibration.datasets import MVTecCategory, SkipReport, normal_frames
from calibration.fit import FrameStack, fit_padim, fit_patchcore, load_frames, preprocess_samples
from edge.backbones import get_spec, load_backbone
from edge.models.padim import PadimModel
from edge.models.patchcore import PatchCoreModel, patchcore_embedding


@pytest.fixture(scope="module")
def images(small_category: Path) -> torch.Tensor:
    pre = get_spec("efficientnet_lite0").preprocessing(128)
    return preprocess_samples(normal_frames(small_category), pre, False, SkipReport())


@pytest.fixture(scope="module")
def defect_images(small_category: Path) -> torch.Tensor:
    pre = get_spec("efficientnet_lite0").preprocessing(128)
    anomalous = [s for s in MVTecCategory(small_category).test if s.label == 1]
    return preprocess_samples(anomalous, pre, False, SkipReport())


@pytest.mark.parametrize(("precision", "map_zero"), [("float32", 0.1), ("bfloat16", 0.3)])
def test_patchcore_full_bank_scores_training_images_zero(images: torch.Tensor, precision: str, map_zero: float) -> None:
    bb = load_backbone("efficientnet_lite0").module
    model = fit_patchcore(bb, images[:4], coreset_ratio=1.0, search_precision=precision).eval()
    with torch.inference_mode():
        out = model(images[:2])
    assert out.scores.shape == (2,) and out.maps.shape == (2, 128, 128)
    # Zero up to float32 cancellation in |q|^2 - 2 q.b + |b|^2 (|q|^2 ~ 2500): sqrt(~1e-3) ~ 0.03,
    # against unseen-normal patch distances of ~20-40. The bf16 search rounds a training patch and its bank
    # row alike; what is left is the bf16 norms' cancellation, ~0.2 after the square root. The image score
    # is searched exactly.
    assert float(out.maps.abs().max()) < map_zero and float(out.scores.abs().max()) < 0.1


def test_patchcore_reweighting_matches_paper_formula(images: torch.Tensor) -> None:
    bb = load_backbone("efficientnet_lite0").module
    model = fit_patchcore(bb, images[:6], coreset_ratio=0.5, num_neighbors=3).eval()
    x = images[6:8]
    with torch.inference_mode():
        emb = patchcore_embedding(bb, x)
        patches = emb.permute(0, 2, 3, 1).reshape(2, -1, emb.shape[1])
        bank = model.memory_bank
        for i in range(2):
            d = torch.cdist(patches[i], bank)
            patch_scores = d.min(dim=1).values
            p = int(patch_scores.argmax())
            s_star = patch_scores[p]
            m_star = int(d[p].argmin())
            support = torch.cdist(bank[m_star : m_star + 1], bank)[0].topk(3, largest=False).indices
            dist = torch.cdist(patches[i][p : p + 1], bank[support])[0].double()
            w = 1 - torch.exp(dist[0]) / torch.exp(dist).sum()
            assert float(model(x[i : i + 1]).scores[0]) == pytest.approx(float(w * s_star), rel=1e-4)


def test_patchcore_scores_defects_above_normals(images: torch.Tensor, defect_images: torch.Tensor) -> None:
    bb = load_backbone("efficientnet_lite0").module
    model = fit_patchcore(bb, images[:12], coreset_ratio=0.2).eval()
    with torch.inference_mode():
        normal = model(images[12:]).scores
        defect = model(defect_images).scores
    assert float(defect.median()) > float(normal.max())


def test_patchcore_refuses_empty_or_mismatched_bank() -> None:
    bb = load_backbone("efficientnet_lite0").module
    with pytest.raises(ValueError, match="memory bank is empty"):
        PatchCoreModel(bb, torch.zeros(0, 152), (64, 64))
    with pytest.raises(ValueError, match="152"):
        PatchCoreModel(bb, torch.zeros(10, 9), (64, 64))


def test_padim_mahalanobis_matches_numpy(images: torch.Tensor) -> None:
    bb = load_backbone("efficientnet_lite0").module
    model = fit_padim(bb, images[:12], n_features=20, sigma=0.0).eval()
    assert isinstance(model, PadimModel)
    with torch.inference_mode():
        out = model(images[12:13])
        emb = torch.cat(
            [
                bb(images[12:13])[0],
                torch.nn.functional.interpolate(
                    bb(images[12:13])[1], size=(16, 16), mode="bilinear", align_corners=False
                ),
            ],
            dim=1,
        )
    e = emb[0, model.channel_idx].reshape(20, -1).T.double().numpy()  # (P, d)
    delta = e - model.mean.double().numpy()
    m = np.sqrt(np.einsum("pi,pij,pj->p", delta, model.inv_cov.double().numpy(), delta)).reshape(16, 16)
    assert np.allclose(model.distance_map(images[12:13])[0].numpy(), m, rtol=1e-3)
    assert out.maps.shape == (1, 128, 128)
    assert float(out.scores[0]) == pytest.approx(float(out.maps[0].max()))


def test_padim_fit_needs_two_images(images: torch.Tensor) -> None:
    from calibration.datasets import DatasetError

    with pytest.raises(DatasetError, match="at least 2"):
        fit_padim(load_backbone("efficientnet_lite0").module, images[:1])


def test_patchcore_bfloat16_search_gives_the_float32_scores(images: torch.Tensor, defect_images: torch.Tensor) -> None:
    bb = load_backbone("efficientnet_lite0").module
    exact = fit_patchcore(bb, images[:12], coreset_ratio=0.2).eval()
    exact = PatchCoreModel(bb, exact.memory_bank, (128, 128), search_precision="float32").eval()
    fast = PatchCoreModel(bb, exact.memory_bank, (128, 128), search_precision="bfloat16").eval()
    x = torch.cat([images[12:], defect_images])
    with torch.inference_mode():
        a, b = exact(x), fast(x)
    # Image scores come from the float32 re-search of the top patches: the float32 ones.
    assert torch.allclose(a.scores, b.scores, rtol=1e-5)
    # The rest of the map carries the bf16 search's small error.
    assert float(((a.maps - b.maps).abs() / a.maps.abs().clamp_min(1e-3)).max()) < 5e-3
    assert not torch.equal(a.maps, b.maps)
    assert fast.params()["search_precision"] == "bfloat16" and fast.search == "bfloat16"
    assert exact.search == "float32"
    with pytest.raises(ValueError, match="search_precision must be one of float32, bfloat16, auto"):
        PatchCoreModel(bb, exact.memory_bank, (128, 128), search_precision="float16")


def test_patchcore_bank_cap(images: torch.Tensor) -> None:
    bb = load_backbone("efficientnet_lite0").module
    capped = fit_patchcore(bb, images[:4], coreset_ratio=0.5, max_bank=40)
    uncapped = fit_patchcore(bb, images[:4], coreset_ratio=0.01, max_bank=4000)
    assert capped.memory_bank.shape[0] == 40  # 0.5 x 4 x 256 patches would be 512
    assert uncapped.memory_bank.shape[0] == round(0.01 * 4 * 256)  # the cap only ever lowers the size


def test_uint8_frame_stack_fits_exactly_what_the_float_stack_fits(small_category: Path, images: torch.Tensor) -> None:
    pre = get_spec("efficientnet_lite0").preprocessing(128)
    samples = normal_frames(small_category)
    frames = load_frames(samples, pre, False, SkipReport())
    assert frames.rgb8.dtype == torch.uint8 and frames.shape == images.shape and len(frames) == len(images)
    assert torch.equal(frames[2:5], images[2:5])  # the pipeline's normalize_batch, bit for bit
    bb = load_backbone("efficientnet_lite0").module
    a = fit_patchcore(bb, frames[:6], coreset_ratio=0.2)
    b = fit_patchcore(bb, FrameStack(frames.rgb8[:6], pre), coreset_ratio=0.2, batch_size=4)  # 4 + a partial 2
    assert torch.equal(a.memory_bank, b.memory_bank)
    p, q = fit_padim(bb, images[:6], n_features=20), fit_padim(bb, FrameStack(frames.rgb8[:6], pre), n_features=20)
    assert torch.equal(p.mean, q.mean) and torch.equal(p.inv_cov, q.inv_cov)
    with pytest.raises(ValueError, match="expected uint8 frames"):
        FrameStack(images[:2], pre)


def test_load_frames_skips_or_names_an_unreadable_file(small_category: Path, tmp_path: Path) -> None:
    from calibration.datasets import DatasetError, Sample

    pre = get_spec("efficientnet_lite0").preprocessing(128)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    samples = [*normal_frames(small_category)[:3], Sample(bad, 0, "good")]
    report = SkipReport()
    assert len(load_frames(samples, pre, True, report)) == 3 and [p for p, _ in report.skipped] == [bad]
    with pytest.raises(DatasetError, match="broken.png"):
        load_frames(samples, pre, False, SkipReport())
