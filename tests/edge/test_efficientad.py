"""EfficientAD: PDN geometry, teacher weight formats, training, normalisation, checkpoints, bundle, export."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from calibration.datasets import SkipReport, normal_frames
from calibration.efficientad import (
    TrainSettings,
    channel_statistics,
    efficientad_preprocessing,
    fit_efficientad,
    hard_feature_loss,
    map_quantiles,
    new_train_state,
    split_normalisation,
    train_student,
)
from calibration.fit import preprocess_samples
from edge.bundle import build_manifest, load_bundle, save_bundle
from edge.manifest import DatasetRecord
from edge.models.efficientad import (
    PDN_SIZES,
    RECEPTIVE_FIELD,
    EfficientADModel,
    PatchDescriptionNetwork,
    build_networks,
    load_pdn_weights,
)
from pipeline.app.config import Config, with_overrides

SIZE = 64  # smallest input the autoencoder takes: keeps CPU training in tests to seconds


@pytest.fixture(scope="module")
def images(small_category: Path) -> torch.Tensor:
    return preprocess_samples(normal_frames(small_category)[:10], efficientad_preprocessing(SIZE), False, SkipReport())


def tiny_config(**efficientad: object) -> Config:
    base = {"model.name": "efficientad", "model.input_size": SIZE, "model.efficientad.precision": "float32"}
    base |= {"model.efficientad.distill_steps": 3, "model.efficientad.steps": 6}
    return with_overrides(Config(), base | {f"model.efficientad.{k}": v for k, v in efficientad.items()})


@pytest.fixture(scope="module")
def fitted(images: torch.Tensor) -> EfficientADModel:
    pre = efficientad_preprocessing(SIZE)
    return fit_efficientad(tiny_config().model, images, pre, seed=0, data_fingerprint="x").model


@pytest.mark.parametrize("size", PDN_SIZES)
@pytest.mark.parametrize("padding", [False, True])
def test_pdn_output_grid(size: str, padding: bool) -> None:
    teacher, student, autoencoder = build_networks(size, 384, padding, (256, 256))
    x = torch.zeros(1, 3, 256, 256)
    with torch.inference_mode():
        t, s, a = teacher(x), student(x), autoencoder(x)
    grid = 64 if padding else 56  # the paper: 56 x 56 without padding at 256 px
    assert t.shape == (1, 384, grid, grid) and teacher.output_size((256, 256)) == (grid, grid)
    assert s.shape == (1, 768, grid, grid) and a.shape == (1, 384, grid, grid)


@pytest.mark.parametrize("size", PDN_SIZES)
def test_pdn_receptive_field_is_33_pixels(size: str) -> None:
    pdn = PatchDescriptionNetwork(size, 8, padding=False)
    for m in pdn.modules():  # positive weights: every ReLU passes, so the gradient shows the whole field
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 0.01)
            nn.init.constant_(m.bias, 0.1)
    x = torch.zeros(1, 3, 96, 96, requires_grad=True)
    out = pdn(x)
    i = out.shape[-1] // 2
    out[0, 0, i, i].backward()
    rows, cols = torch.nonzero(x.grad[0].abs().sum(0), as_tuple=True)
    assert int(rows.max() - rows.min() + 1) == RECEPTIVE_FIELD == int(cols.max() - cols.min() + 1)
    assert int(rows.min()) == 4 * i  # output cell i sees input pixels 4i .. 4i + 32


def test_published_sequential_teacher_weights_load(tmp_path: Path) -> None:
    ours = PatchDescriptionNetwork("small")
    # The authors publish a plain nn.Sequential state dict: keys 0.weight, 3.weight, 6.weight, 8.weight.
    seq = nn.Sequential(*[m for m in ours.children()])
    authors = OrderedDict((k, torch.randn_like(v)) for k, v in seq.state_dict().items())
    path = tmp_path / "pretrained_teacher_small.pth"
    torch.save(authors, path)
    load_pdn_weights(ours, path)
    seq.load_state_dict(authors)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(ours(x), seq(x))
    with pytest.raises(ValueError, match="do not fit a PDN-M"):
        load_pdn_weights(PatchDescriptionNetwork("medium"), path)
    with pytest.raises(ValueError, match="does not exist"):
        load_pdn_weights(ours, tmp_path / "missing.pth")


def test_hard_feature_loss_keeps_the_top_share() -> None:
    d = torch.arange(1000, dtype=torch.float32).view(1, 10, 10, 10)
    assert float(hard_feature_loss(d, q=0.99)) == pytest.approx(float(torch.arange(990, 1000).float().mean()))


def test_training_loss_decreases(images: torch.Tensor) -> None:
    teacher = PatchDescriptionNetwork("small")
    pre = efficientad_preprocessing(SIZE)
    mean, std = channel_statistics(teacher, images[:8], "cpu", "float32")
    mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def objective(student: nn.Module, autoencoder: nn.Module) -> float:
        """L_hard + L_AE + L_STAE over the training frames, in eval mode (no dropout, no augmentation)."""
        student.eval(), autoencoder.eval()
        with torch.inference_mode():
            y = (teacher(images[:8]) - mean) / std
            s, a = student(images[:8]), autoencoder(images[:8])
            hard = hard_feature_loss((y - s[:, :384]).pow(2))
            return float(hard + (y - a).pow(2).mean() + (a - s[:, 384:]).pow(2).mean())

    settings = TrainSettings(steps=80, precision="float32")
    before = new_train_state("small", False, (SIZE, SIZE), 80, settings.seed, "cpu")
    log: list[dict[str, float]] = []
    state, _, _ = train_student(teacher, images[:8], images[8:], pre, settings, on_step=lambda _, t: log.append(t))
    assert len(log) == 80 and {"hard", "penalty", "ae", "stae"} <= set(log[0])
    assert objective(state.student, state.autoencoder) < 0.9 * objective(before.student, before.autoencoder)


def test_checkpoint_resume_gives_the_uninterrupted_result(images: torch.Tensor, tmp_path: Path) -> None:
    teacher = PatchDescriptionNetwork("small")
    pre = efficientad_preprocessing(SIZE)
    settings = TrainSettings(steps=8, precision="float32", seed=3)
    whole, _, _ = train_student(teacher, images[:6], images[6:], pre, settings)
    ckpt = tmp_path / "run.ckpt"
    train_student(teacher, images[:6], images[6:], pre, settings, checkpoint=ckpt, checkpoint_every=2, stop_after=5)
    assert torch.load(ckpt, weights_only=True)["step"] == 5  # the interruption left step 5 on disk
    resumed, _, _ = train_student(teacher, images[:6], images[6:], pre, settings, checkpoint=ckpt, checkpoint_every=2)
    for a, b in zip(whole.student.state_dict().values(), resumed.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = dataclasses.replace(settings, seed=4)
    with pytest.raises(ValueError, match="other settings or data"):
        train_student(teacher, images[:6], images[6:], pre, other, checkpoint=ckpt)


def test_normalisation_uses_only_frames_kept_out_of_training(images: torch.Tensor, fitted: EfficientADModel) -> None:
    train_idx, norm_idx = split_normalisation(len(images), 0.1, seed=0)
    assert set(train_idx).isdisjoint(norm_idx) and len(train_idx) + len(norm_idx) == len(images)
    m = fitted
    expected = map_quantiles(m.teacher, m.student, m.autoencoder, m.teacher_mean, m.teacher_std, images[norm_idx])
    assert torch.allclose(m.quantiles, expected, rtol=1e-5, atol=0)  # up to the conv layout's rounding
    trained_on = map_quantiles(m.teacher, m.student, m.autoencoder, m.teacher_mean, m.teacher_std, images[train_idx])
    assert not torch.allclose(m.quantiles, trained_on, rtol=1e-2, atol=0)


def test_bundle_round_trip_gives_identical_maps(images: torch.Tensor, fitted: EfficientADModel, tmp_path: Path) -> None:
    pre = efficientad_preprocessing(SIZE)
    manifest = build_manifest(fitted, pre, "", DatasetRecord(1, "f"), {})
    assert manifest.backbone is None and manifest.model_params["size"] == "small"
    save_bundle(tmp_path / "ead.pt", fitted, manifest)
    loaded = load_bundle(tmp_path / "ead.pt")
    with torch.inference_mode():
        a, b = fitted(images[:3]), loaded.model(images[:3])
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)
    assert a.maps.shape == (3, SIZE, SIZE)


def test_unnormalised_model_is_refused() -> None:
    t, s, a = build_networks("small", 384, False, (SIZE, SIZE))
    with pytest.raises(ValueError, match="not set: fit the model first"):
        EfficientADModel(t, s, a, torch.zeros(384), torch.ones(384), torch.full((4,), float("nan")), (SIZE, SIZE))
