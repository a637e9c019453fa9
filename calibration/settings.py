"""Settings of fitting and calibrating: the model, the fit run, the threshold.

The application shell fills these from `config.yaml` (sections `model`, `fit`, `calibration`) and
passes them down; nothing here reads a file. Field metadata states what each value may be.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.backbones import BACKBONES, BORDER_MODES, resolve_border
from edge.models import MODELS
from edge.models.efficientad import PDN_SIZES
from edge.precision import PRECISIONS
from edge.settings import bounded, one_of


@dataclass(frozen=True)
class PatchCoreConfig:
    coreset_ratio: float = field(default=0.1, metadata=bounded(0.0, 1.0, lo_open=True))
    """Fraction of training patches kept in the memory bank (paper: 0.1 or 0.01)."""
    max_bank: int | None = field(default=None, metadata=bounded(1))
    """Upper limit on memory-bank rows whatever coreset_ratio gives (bounds memory and search time)."""
    projection_dim: int = field(default=128, metadata=bounded(0))
    """Random-projection dimension used only to select the coreset; 0 = no projection."""
    num_neighbors: int = field(default=9, metadata=bounded(1))
    """b in the paper's image-score reweighting."""
    search_precision: str = field(default="auto", metadata=one_of(PRECISIONS))
    """Nearest-neighbour search: float32 (exact), bfloat16 (one bf16 matmul, maps to ~2.5e-3, the top
    patches of each image searched again in float32 so image scores stay the float32 ones), or auto
    (bfloat16 where the CPU has AMX / AVX512-BF16, else float32). See docs/speed.md."""


@dataclass(frozen=True)
class PadimConfig:
    n_features: int = field(default=100, metadata=bounded(1))
    """Random subset of feature channels modelled per position (paper: 100 for ResNet18)."""


@dataclass(frozen=True)
class EfficientADConfig:
    size: str = field(default="small", metadata=one_of(PDN_SIZES))
    """PDN-S (EfficientAD-S) or PDN-M (EfficientAD-M) for teacher and student."""
    teacher: str | None = None
    """Teacher PDN weights (.pth state dict: the authors' pretrained_teacher_small.pth, anomalib's, or one
    saved by linewatch); null = distil one here from model.backbone."""
    distill_images: str | None = None
    """Folder of generic images for distillation and the penalty term; null = the fit images plus
    scikit-image's sample photos when installed."""
    distill_steps: int | None = field(default=None, metadata=bounded(0))
    """Teacher distillation steps (batch 4); null = 400 on a CPU, 20000 on CUDA. Ignored with a teacher file."""
    steps: int | None = field(default=None, metadata=bounded(1))
    """Student/autoencoder training steps (batch 1); null = 2000 on a CPU, 70000 on CUDA (the paper)."""
    learning_rate: float | None = field(default=None, metadata=bounded(0.0, 1.0, lo_open=True))
    """Adam rate of student and autoencoder (divided by 10 for the last 5 % of steps); null = the paper's
    1e-4 (5e-4 with the CPU step count lowered grass AUROC from 0.90 to 0.88)."""
    norm_fraction: float = field(default=0.1, metadata=bounded(0.0, 0.5, lo_open=True))
    """Share of the fit frames kept out of training to set the map quantiles (paper: 10 %)."""
    padding: bool = False
    """Pad the PDN convolutions (64 x 64 maps at 256 px); the paper times the unpadded networks."""
    device: str | None = None
    """Where distillation and training run: cpu, cuda, cuda:1, ...; null = fit.device."""
    precision: str = field(default="auto", metadata=one_of(PRECISIONS))
    """Training arithmetic: auto = bf16 autocast on CPUs with native bf16 (AMX/AVX512-BF16), else float32."""
    checkpoint: str | None = None
    """Training checkpoint file: resumed when it exists (same settings and data), rewritten every
    checkpoint_every steps; null = no checkpoint."""
    checkpoint_every: int = field(default=200, metadata=bounded(1))


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(default="patchcore", metadata=one_of(tuple(MODELS)))
    backbone: str = field(default="efficientnet_lite0", metadata=one_of(tuple(BACKBONES)))
    """Feature extractor (PatchCore, PaDiM) or the network EfficientAD's teacher is distilled from."""
    backbone_weights: str | None = None
    """Path to the backbone's .pth; default: the weights package (Lite0) or the torch hub cache."""
    layers: tuple[str, ...] | None = field(default=None, metadata={"nonempty": True})
    """Feature layers; default stride 8 and 16 of the backbone."""
    input_size: int = field(default=256, metadata=bounded(32, 2048))
    crop_size: int | None = field(default=None, metadata=bounded(32, 2048))
    border_mode: str | None = field(default=None, metadata=one_of(BORDER_MODES))
    """What surrounds the frame: zeros (the CNN's own padding; PatchCore's pooling counts them too), or
    `border_pad` pixels filled by circular (wrapping the opposite edge), reflect or replicate. null: the
    model's own, PatchCore zeros and PaDiM circular (docs/speed.md, "Frame border")."""
    border_pad: int | None = field(default=None, metadata=bounded(0, 256))
    """Pixels added around the frame before the backbone (multiple of its largest stride). null: none
    for zeros, 16 for the other modes."""
    backbone_precision: str = field(default="auto", metadata=one_of(PRECISIONS))
    """Arithmetic of the backbone (PatchCore, PaDiM): float32, bfloat16, or auto (bfloat16 on CPUs with
    AMX / AVX512-BF16, float32 elsewhere and on GPUs). Fit, calibration and scoring use the same one, so
    calibrate on the kind of box the line runs on. See docs/speed.md."""
    sigma: float = field(default=4.0, metadata=bounded(0.0, 64.0))
    """Gaussian smoothing of the anomaly map, in input pixels; 0 = none."""
    patchcore: PatchCoreConfig = PatchCoreConfig()
    padim: PadimConfig = PadimConfig()
    efficientad: EfficientADConfig = EfficientADConfig()

    def border(self) -> tuple[str, int]:
        """(border_mode, border_pad), with what this config leaves open filled in for its model."""
        return resolve_border(self.name, self.border_mode, self.border_pad)


@dataclass(frozen=True)
class FitConfig:
    batch_size: int = field(default=4, metadata=bounded(1, 1024))
    """Frames per feature-extraction batch in fit and calibrate. 4 on CPUs: on the 2-core dev box batch 16
    took twice as long per frame (activations fall out of cache); raise it on a GPU."""
    seed: int = field(default=0, metadata=bounded(0))
    threads: int = field(default=0, metadata=bounded(0, 1024))
    """torch CPU threads; 0 = torch's default (one per core)."""
    device: str = "cpu"
    """Where fit and calibrate run (features, coreset, EfficientAD training, threshold scoring): cpu, cuda,
    cuda:1, ... The threshold is chosen on scores computed here: calibrate on the device the line runs on."""


@dataclass(frozen=True)
class CalibrationConfig:
    target_fpr: float = field(default=0.01, metadata=bounded(0.0, 0.5, lo_open=True))
    """False-reject rate the threshold must stay under (fraction of good parts rejected)."""
    confidence: float = field(default=0.95, metadata=bounded(0.5, 0.9999))
    """Probability that the true false-reject rate is at or under target_fpr."""
    holdout_fraction: float = field(default=0.5, metadata=bounded(0.0, 0.95, lo_open=True))
    """Share of the normal frames held out from fitting to choose the threshold."""
    seed: int = field(default=0, metadata=bounded(0))
    """Seed of the fit/held-out split and of the synthetic defects."""
    synthetic_per_kind: int = field(default=40, metadata=bounded(0, 100000))
    """Held-out frames given each synthetic defect kind for the recall estimate; 0 = skip."""
    allow_weak_bound: bool = False
    """Use the largest held-out score when there are too few frames for the bound (and say so)."""


@dataclass(frozen=True)
class OfflineConfig:
    """What fitting and calibration read: the `model`, `fit` and `calibration` sections."""

    model: ModelConfig = ModelConfig()
    fit: FitConfig = FitConfig()
    calibration: CalibrationConfig = CalibrationConfig()
