"""What TensorRT compiles is what `torch.export` captures: export the exact scoring modules on CPU."""

from pathlib import Path

import pytest
import torch

from calibration.datasets import SkipReport, normal_frames
from calibration.fit import fit_padim, fit_patchcore, preprocess_samples
from edge.backbones import get_spec, load_backbone
from edge.models.efficientad import EfficientADModel, build_networks
from edge.models.patchcore import PatchCoreModel


@pytest.fixture(scope="module")
def images(small_category: Path) -> torch.Tensor:
    pre = get_spec("efficientnet_lite0").preprocessing(128)
    return preprocess_samples(normal_frames(small_category)[:8], pre, False, SkipReport())


@pytest.mark.parametrize(
    "variant", ["patchcore-float32", "patchcore-bfloat16", "patchcore-bfloat16-backbone", "padim", "efficientad"]
)
def test_exported_model_equals_eager(images: torch.Tensor, variant: str) -> None:
    if variant.endswith("-backbone"):  # also the padded frame path (F.pad's circular mode), not the default
        backbone = load_backbone("efficientnet_lite0", border_pad=16, border_mode="circular", precision="bfloat16")
    else:
        backbone = load_backbone("efficientnet_lite0")
    backbone = backbone.module
    if variant == "efficientad":
        teacher, student, autoencoder = build_networks("small", 384, False, (128, 128))
        stats = torch.tensor([0.0, 1.0, 0.0, 2.0])
        model = EfficientADModel(teacher, student, autoencoder, torch.zeros(384), torch.ones(384), stats, (128, 128))
    elif variant == "padim":
        model = fit_padim(backbone, images[:6], n_features=50)
    else:
        fitted = fit_patchcore(backbone, images[:6], coreset_ratio=0.1)
        model = PatchCoreModel(backbone, fitted.memory_bank, (128, 128), search_precision=variant.split("-")[1])
    model.eval()
    batch = images[6:8].contiguous(memory_format=torch.channels_last)  # (max_batch, 3, H, W) as infer sends
    exported = torch.export.export(model, (batch,))
    with torch.inference_mode():
        eager, graph = model(batch), exported.module()(batch)
    assert torch.allclose(eager.scores, graph.scores, rtol=1e-5, atol=1e-5)
    assert torch.allclose(eager.maps, graph.maps, rtol=1e-5, atol=1e-4)
