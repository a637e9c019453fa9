"""Fitting EfficientAD offline: teacher distillation, student + autoencoder training, map quantiles.

- Teacher T: loaded from a file (the authors' published PDN weights, anomalib's, or one written here)
  or distilled locally: T is trained so that a 1x1 read-out of its output matches the pretrained
  backbone's locally aware features (the PatchCore embedding, per-channel standardised) of the same
  image at twice the size, which puts the backbone's stride 8 on the PDN's stride 4. Images: the fit
  images plus generic images (a folder, or scikit-image's sample photos when installed), with random
  crops, flips and quarter turns. The read-out is thrown away.
- Student S and autoencoder A: the paper's algorithm 1, i.e. the hard-feature loss (mean of the
  squared T-S differences at or above their 0.999 quantile), the penalty mean S_st(P)^2 on a generic
  image P, the autoencoder losses on a colour-jittered copy, Adam (lr 1e-4, weight decay 1e-5) with
  the rate divided by 10 for the last 5 % of steps, batch 1.
- Normalisation: the 0.9 / 0.995 quantiles of M_ST and M_AE over normal frames that were not trained on.

Training is seeded, shows a progress bar, and writes a checkpoint every `checkpoint_every` steps from
which an interrupted run resumes to the same result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibration.datasets import DatasetError, Sample, SkipReport, iter_loaded
from calibration.progress import Progress
from calibration.settings import ModelConfig
from edge.backbones import IMAGENET_MEAN, IMAGENET_STD, FeatureBackbone, file_sha256, get_spec, load_backbone
from edge.backends import require_device
from edge.images import list_images
from edge.models.efficientad import (
    QUANTILE_A,
    QUANTILE_B,
    TEACHER_CHANNELS,
    Autoencoder,
    EfficientADModel,
    PatchDescriptionNetwork,
    build_networks,
    disagreement_maps,
    load_pdn_weights,
)
from edge.precision import bfloat16_on, resolve_precision
from edge.preprocessing import Preprocessing
from edge.scoring import concat_feature_maps

HARD_QUANTILE = 0.999  # q_hard in the paper
LEARNING_RATE = 1e-4  # the paper's, for its 70,000 steps
WEIGHT_DECAY = 1e-5
LR_DROP_AT = 0.95  # fraction of the steps after which the rate is divided by 10
PENALTY_GRAYSCALE_P = 0.3  # share of penalty images turned grey (the authors' training code)
AE_JITTER = 0.2  # brightness, contrast or saturation factor drawn from [0.8, 1.2]
CHECKPOINT_FORMAT = "linewatch-efficientad-checkpoint"


@dataclass(frozen=True)
class TrainSettings:
    """What a training run depends on; a checkpoint is resumed only under the same settings and data."""

    teacher: str = ""  # where the teacher came from (file hash or distillation settings)
    size: str = "small"
    padding: bool = False
    steps: int = 2000
    seed: int = 0
    precision: str = "float32"  # resolved: float32 or bfloat16
    device: str = "cpu"
    learning_rate: float = LEARNING_RATE

    def key(self, data_fingerprint: str) -> str:
        text = json.dumps({**asdict(self), "data": data_fingerprint}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_train_precision(precision: str, device: str) -> str:
    """`auto` trains under bf16 autocast where the CPU multiplies bf16 natively (4x faster here), else float32."""
    resolved = resolve_precision(precision, "model.efficientad.precision")
    return "bfloat16" if bfloat16_on(precision, resolved, torch.device(device)) else "float32"


def train_autocast(device: str, precision: str) -> torch.autocast:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bfloat16")


# ---------------------------------------------------------------------------------------------- images


class ImageSpace:
    """Moves batches between a model's normalised inputs and 0..1 RGB, where augmentations are defined."""

    def __init__(self, pre: Preprocessing, device: str) -> None:
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) / 255.0
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) / 255.0

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def from_unit(self, rgb: torch.Tensor) -> torch.Tensor:
        return (rgb - self.mean) / self.std


def random_view(rgb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random square crop (50-100 % of the side), resized back, flipped and turned by a random quarter."""
    n, _, h, w = rgb.shape
    side = int(min(h, w) * float(torch.empty(1).uniform_(0.5, 1.0, generator=gen)))
    top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
    out = rgb[:, :, top : top + side, left : left + side]
    if side != h or side != w:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    if bool(torch.randint(0, 2, (1,), generator=gen)):
        out = out.flip(3)
    turns = int(torch.randint(0, 4, (1,), generator=gen))
    return out.rot90(turns, dims=(2, 3)) if h == w and turns else out


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grey level of 0..1 RGB (ITU-R 601 weights)."""
    return 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]


def colour_jitter(rgb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The autoencoder's augmentation: one of brightness, contrast or saturation by a factor in [0.8, 1.2]."""
    factor = float(torch.empty(1).uniform_(1 - AE_JITTER, 1 + AE_JITTER, generator=gen))
    kind = int(torch.randint(0, 3, (1,), generator=gen))
    grey = luma(rgb)
    if kind == 0:
        out = rgb * factor
    elif kind == 1:
        out = (rgb - grey.mean(dim=(1, 2, 3), keepdim=True)) * factor + grey.mean(dim=(1, 2, 3), keepdim=True)
    else:
        out = (rgb - grey) * factor + grey
    return out.clamp(0.0, 1.0)


def random_grayscale(rgb: torch.Tensor, gen: torch.Generator, p: float = PENALTY_GRAYSCALE_P) -> torch.Tensor:
    if float(torch.rand(1, generator=gen)) >= p:
        return rgb
    return luma(rgb).expand_as(rgb).contiguous()


# ---------------------------------------------------------------------------------------------- teacher


class DistillationTarget(nn.Module):
    """Backbone features at the PDN's grid: x2 upsampled frame -> 3x3-pooled stride-8 (+ coarser) maps.

    Channels above 384 are averaged down in groups (as PatchCore reduces WRN features); the result is
    standardised per channel with statistics set by `fit_statistics`.
    """

    def __init__(self, backbone: FeatureBackbone, out_grid: tuple[int, int], max_channels: int = TEACHER_CHANNELS):
        super().__init__()
        self.backbone = backbone
        self.out_grid = out_grid
        self.channels = min(sum(backbone.channels), max_channels)
        self.register_buffer("mean", torch.zeros(1, self.channels, 1, 1))
        self.register_buffer("std", torch.ones(1, self.channels, 1, 1))

    def raw(self, x_backbone: torch.Tensor) -> torch.Tensor:
        big = F.interpolate(x_backbone, scale_factor=2.0, mode="bilinear", align_corners=False)
        f = concat_feature_maps(self.backbone(big), pool=True)  # (N, C, H/4, W/4)
        if f.shape[1] > self.channels:
            n, c, h, w = f.shape
            f = F.adaptive_avg_pool1d(f.permute(0, 2, 3, 1).reshape(-1, 1, c), self.channels)
            f = f.view(n, h, w, self.channels).permute(0, 3, 1, 2)
        dh = (f.shape[2] - self.out_grid[0]) // 2
        dw = (f.shape[3] - self.out_grid[1]) // 2
        return f[:, :, dh : dh + self.out_grid[0], dw : dw + self.out_grid[1]].float()

    def forward(self, x_backbone: torch.Tensor) -> torch.Tensor:
        return (self.raw(x_backbone) - self.mean) / self.std

    def fit_statistics(self, batches: list[torch.Tensor]) -> None:
        feats = torch.cat([self.raw(b).transpose(0, 1).flatten(1) for b in batches], dim=1)
        self.mean.copy_(feats.mean(dim=1).view(1, -1, 1, 1))
        self.std.copy_(feats.std(dim=1).clamp_min(1e-6).view(1, -1, 1, 1))


def distill_teacher(
    backbone: FeatureBackbone,
    backbone_pre: Preprocessing,
    pre: Preprocessing,
    images: torch.Tensor,
    size: str = "small",
    padding: bool = False,
    steps: int = 1000,
    batch_size: int = 4,
    seed: int = 0,
    device: str = "cpu",
    precision: str = "float32",
    progress: bool = False,
    learning_rate: float = 1e-3,
) -> tuple[PatchDescriptionNetwork, list[float]]:
    """Teacher PDN distilled from `backbone` on `images` (N, 3, H, W, normalised by `pre`); and the losses.

    A few thousand CPU steps on a hundred images are a far smaller budget than the paper's 60,000
    ImageNet batches, so the rate is 10x the paper's with cosine decay; GPU defaults use more steps.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    h, w = images.shape[-2:]
    teacher = PatchDescriptionNetwork(size, TEACHER_CHANNELS, padding).to(device)
    target = DistillationTarget(backbone, teacher.output_size((h, w))).to(device).eval()
    readout = nn.Conv2d(TEACHER_CHANNELS, target.channels, 1).to(device)
    space, bb_space = ImageSpace(pre, device), ImageSpace(backbone_pre, device)
    with torch.inference_mode(), train_autocast(device, precision):
        target.fit_statistics(
            [bb_space.from_unit(space.to_unit(images[i : i + 8].to(device))) for i in range(0, len(images), 8)]
        )
    params = list(teacher.parameters()) + list(readout.parameters())
    opt = torch.optim.Adam(params, lr=learning_rate, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    losses = []
    teacher.train()
    with Progress("distil teacher", steps, enabled=progress) as bar:
        for _ in range(steps):
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            rgb = random_view(space.to_unit(images[idx].to(device)), gen)
            with torch.no_grad(), train_autocast(device, precision):
                y = target(bb_space.from_unit(rgb))
            with train_autocast(device, precision):
                out = readout(teacher(space.from_unit(rgb).contiguous(memory_format=torch.channels_last)))
            loss = F.mse_loss(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update()
    return teacher.eval(), losses


def channel_statistics(
    teacher: nn.Module, images: torch.Tensor, device: str, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) of T's output over all positions of `images`: mu and sigma in the paper."""
    s1 = s2 = None
    count = 0
    with torch.inference_mode():
        for i in range(0, len(images), 4):
            with train_autocast(device, precision):
                y = teacher(images[i : i + 4].to(device).contiguous(memory_format=torch.channels_last))
            y = y.double().transpose(0, 1).flatten(1)
            s1 = y.sum(dim=1) if s1 is None else s1 + y.sum(dim=1)
            s2 = (y * y).sum(dim=1) if s2 is None else s2 + (y * y).sum(dim=1)
            count += y.shape[1]
    assert s1 is not None and s2 is not None
    mean = s1 / count
    std = (s2 / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float().cpu(), std.float().cpu()


# ---------------------------------------------------------------------------------------------- student


def hard_feature_loss(diff_sq: torch.Tensor, q: float = HARD_QUANTILE) -> torch.Tensor:
    """L_hard: mean of the squared differences (N, C, h, w) at or above their q-quantile (paper eq. 1-2)."""
    flat = diff_sq.flatten()
    k = max(1, int(round((1 - q) * flat.numel())))
    return flat.topk(k).values.mean()


@dataclass
class TrainState:
    """Everything a training run changes; saved in a checkpoint so an interrupted run resumes exactly."""

    student: PatchDescriptionNetwork
    autoencoder: Autoencoder
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    step: int = 0


def training_step(
    teacher: nn.Module,
    state: TrainState,
    mean: torch.Tensor,
    std: torch.Tensor,
    image: torch.Tensor,
    penalty_image: torch.Tensor | None,
    space: ImageSpace,
    device: str,
    precision: str,
) -> dict[str, float]:
    """One step of algorithm 1 on one image (1, 3, H, W) and one generic image; returns the loss terms.

    Without generic images (`penalty_image` None) the penalty term is left out.
    """
    gen = state.generator
    c = TEACHER_CHANNELS
    x = image.contiguous(memory_format=torch.channels_last)
    x_ae = space.from_unit(colour_jitter(space.to_unit(image), gen)).contiguous(memory_format=torch.channels_last)
    inputs = [x, x_ae]
    if penalty_image is not None:
        p = space.from_unit(random_grayscale(space.to_unit(penalty_image), gen))
        inputs.append(p.contiguous(memory_format=torch.channels_last))
    with torch.no_grad(), train_autocast(device, precision):
        y = teacher(torch.cat([x, x_ae]))
    y = (y.float() - mean) / std
    y_st, y_ae = y[:1], y[1:]
    with train_autocast(device, precision):
        s = state.student(torch.cat(inputs))
        a = state.autoencoder(x_ae)
    s, a = s.float(), a.float()
    loss_hard = hard_feature_loss((y_st - s[:1, :c]).pow(2))
    loss_penalty = s[2:, :c].pow(2).mean() if penalty_image is not None else s.new_zeros(())
    loss_ae = (y_ae - a).pow(2).mean()
    loss_stae = (a - s[1:2, c:]).pow(2).mean()
    loss = loss_hard + loss_penalty + loss_ae + loss_stae
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    terms = {"loss": loss, "hard": loss_hard, "penalty": loss_penalty, "ae": loss_ae, "stae": loss_stae}
    return {k: float(v.detach()) for k, v in terms.items()}


def new_train_state(
    size: str,
    padding: bool,
    input_size: tuple[int, int],
    steps: int,
    seed: int,
    device: str,
    learning_rate: float = LEARNING_RATE,
) -> TrainState:
    torch.manual_seed(seed)
    _, student, autoencoder = build_networks(size, TEACHER_CHANNELS, padding, input_size)
    student, autoencoder = student.to(device).train(), autoencoder.to(device).train()
    student = student.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(
        list(student.parameters()) + list(autoencoder.parameters()), lr=learning_rate, weight_decay=WEIGHT_DECAY
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(LR_DROP_AT * steps)), gamma=0.1)
    return TrainState(student, autoencoder, opt, sched, torch.Generator().manual_seed(seed + 1))


def save_checkpoint(
    path: Path, state: TrainState, key: str, teacher: nn.Module, mean: torch.Tensor, std: torch.Tensor
) -> None:
    """Atomic write (temp + rename): a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "key": key,
            "step": state.step,
            "student": state.student.state_dict(),
            "autoencoder": state.autoencoder.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "generator": state.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "teacher": teacher.state_dict(),
            "teacher_mean": mean,
            "teacher_std": std,
        },
        tmp,
    )
    tmp.replace(path)


def load_checkpoint(path: Path, state: TrainState, key: str, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Restore `state` and `teacher` from `path`; refuses a checkpoint of another run. Returns (mean, std)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not an EfficientAD checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an EfficientAD checkpoint")
    if raw["key"] != key:
        raise ValueError(
            f"{path}: checkpoint was written by a run with other settings or data (key {raw['key']}, this run "
            f"{key}); delete it or point model.efficientad.checkpoint elsewhere"
        )
    state.student.load_state_dict(raw["student"])
    state.autoencoder.load_state_dict(raw["autoencoder"])
    state.optimizer.load_state_dict(raw["optimizer"])
    state.scheduler.load_state_dict(raw["scheduler"])
    state.generator.set_state(raw["generator"])
    torch.set_rng_state(raw["torch_rng"])
    teacher.load_state_dict(raw["teacher"])
    state.step = int(raw["step"])
    return raw["teacher_mean"], raw["teacher_std"]


def train_student(
    teacher: PatchDescriptionNetwork,
    images: torch.Tensor,
    generic: torch.Tensor,
    pre: Preprocessing,
    settings: TrainSettings,
    data_fingerprint: str = "",
    checkpoint: Path | None = None,
    checkpoint_every: int = 500,
    progress: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop_after: int | None = None,
) -> tuple[TrainState, torch.Tensor, torch.Tensor]:
    """Train S and A against the frozen `teacher` on normal `images`; returns (state, mu, sigma).

    `generic` (M, 3, H, W) are the penalty images (may be empty: no penalty term).
    With `checkpoint`, an existing file of the same run is resumed and a new one written every
    `checkpoint_every` steps and at the end. `stop_after` ends the run early at that step (tests use
    it to simulate an interruption).
    """
    dev, precision = settings.device, settings.precision
    teacher = teacher.to(dev).eval().to(memory_format=torch.channels_last)
    for p_ in teacher.parameters():
        p_.requires_grad_(False)
    size = tuple(images.shape[-2:])
    state = new_train_state(
        settings.size, settings.padding, size, settings.steps, settings.seed, dev, settings.learning_rate
    )
    key = settings.key(data_fingerprint)
    if checkpoint is not None and checkpoint.is_file():
        mean, std = load_checkpoint(checkpoint, state, key, teacher)
    else:
        mean, std = channel_statistics(teacher, images, dev, precision)
    mean_b, std_b = mean.to(dev).view(1, -1, 1, 1), std.to(dev).view(1, -1, 1, 1)
    space = ImageSpace(pre, dev)
    last = settings.steps if stop_after is None else min(stop_after, settings.steps)
    with Progress("train student", settings.steps, enabled=progress) as bar:
        bar.update(state.step)
        while state.step < last:
            gen = state.generator
            i = int(torch.randint(0, len(images), (1,), generator=gen))
            penalty = None
            if len(generic):
                j = int(torch.randint(0, len(generic), (1,), generator=gen))
                penalty = generic[j : j + 1].to(dev)
            terms = training_step(
                teacher, state, mean_b, std_b, images[i : i + 1].to(dev), penalty, space, dev, precision
            )
            if on_step is not None:
                on_step(state.step, terms)
            if checkpoint is not None and (state.step % checkpoint_every == 0 or state.step == last):
                save_checkpoint(checkpoint, state, key, teacher, mean, std)
            bar.update()
    state.student.eval()
    state.autoencoder.eval()
    return state, mean, std


def map_quantiles(
    teacher: nn.Module,
    student: nn.Module,
    autoencoder: nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor,
    images: torch.Tensor,
    device: str = "cpu",
) -> torch.Tensor:
    """q_a^ST, q_b^ST, q_a^AE, q_b^AE (4,): the 0.9 / 0.995 quantiles of M_ST and M_AE over `images`.

    `images` must be normal frames the student was not trained on (the paper's validation set); the
    quantiles are taken in float32, as the model scores.
    """
    st, ae = [], []
    m, s = mean.to(device).view(1, -1, 1, 1), std.to(device).view(1, -1, 1, 1)
    with torch.inference_mode():
        for i in range(0, len(images), 4):
            a, b = disagreement_maps(teacher, student, autoencoder, m, s, images[i : i + 4].to(device))
            st.append(a.flatten().cpu())
            ae.append(b.flatten().cpu())
    q = torch.tensor([QUANTILE_A, QUANTILE_B])
    return torch.cat(
        [torch.quantile(torch.cat(st).double(), q.double()), torch.quantile(torch.cat(ae).double(), q.double())]
    ).float()


def build_model(
    teacher: PatchDescriptionNetwork,
    state: TrainState,
    mean: torch.Tensor,
    std: torch.Tensor,
    norm_images: torch.Tensor,
    sigma: float,
    teacher_source: str,
    device: str = "cpu",
) -> EfficientADModel:
    """The scoring module, normalised on `norm_images`, on the CPU in eval mode."""
    nets = (teacher, state.student, state.autoencoder)
    teacher, student, autoencoder = (m.to(device, memory_format=torch.contiguous_format).eval() for m in nets)
    quantiles = map_quantiles(teacher, student, autoencoder, mean, std, norm_images, device)
    model = EfficientADModel(
        teacher.cpu(),
        student.cpu(),
        autoencoder.cpu(),
        mean,
        std,
        quantiles,
        tuple(norm_images.shape[-2:]),
        sigma=sigma,
        teacher_source=teacher_source,
    )
    for p_ in model.parameters():
        p_.requires_grad_(False)
    return model.eval()


def generic_images(folder: str | Path | None, pre: Preprocessing) -> torch.Tensor:
    """Generic (non-line) images, preprocessed like the fit images: for distillation and the penalty.

    From `folder` when given; otherwise scikit-image's sample photographs when it is installed (the
    paper uses ImageNet, which is not on the box); possibly none.
    """
    arrays: list[np.ndarray] = []
    if folder is not None:
        if not Path(folder).is_dir():
            raise DatasetError(f"{folder}: model.efficientad.distill_images is not a folder")
        paths = list_images(Path(folder), recursive=True)
        if not paths:
            raise DatasetError(f"{folder}: model.efficientad.distill_images has no images")
        report = SkipReport()
        arrays = [pre(item.image) for item in iter_loaded([Sample(p, 0, "good") for p in paths], True, report)]
        if not arrays:
            raise DatasetError(f"{folder}: none of the {len(paths)} distillation images could be read")
        return torch.from_numpy(np.stack(arrays))
    arrays = [pre(photo) for photo in sample_photos()]
    h, w = pre.input_size
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, h, w)


SAMPLE_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins", "colorwheel", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "rocket", "text", "horse",
)  # fmt: skip


def sample_photos() -> list[np.ndarray]:
    """scikit-image's bundled sample photos (no download), or none when it is not installed."""
    try:
        from skimage import data
    except ImportError:
        return []
    out = []
    for name in SAMPLE_PHOTOS:
        try:
            photo = np.asarray(getattr(data, name)())
        except Exception:  # some need an optional download; skip them
            continue
        out.append(photo.astype(np.uint8) * 255 if photo.dtype == bool else photo)
    return out


# ---------------------------------------------------------------------------------------------- fit

# Documented defaults (config.yaml): the CPU ones keep `linewatch calibrate --model efficientad` on 100
# frames under 30 minutes on a 2-core box; the CUDA ones follow the paper (70,000 steps).
CPU_DISTILL_STEPS, CUDA_DISTILL_STEPS = 400, 20000
CPU_STEPS, CUDA_STEPS = 2000, 70000
DISTILL_BATCH = 4


def efficientad_preprocessing(input_size: int, crop_size: int | None = None) -> Preprocessing:
    """ImageNet normalisation, as the published teachers expect."""
    crop = crop_size or input_size
    return Preprocessing((input_size, input_size), (crop, crop), IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class EfficientADFit:
    model: EfficientADModel
    info: dict[str, Any]  # what the manifest records about the run


def split_normalisation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, normalisation) indices: a seeded share of the fit frames is kept out of training."""
    if n < 2:
        raise DatasetError(
            f"EfficientAD needs at least 2 normal images (one to train on, one to normalise maps), got {n}"
        )
    n_norm = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng([seed, 2]).permutation(n)
    return sorted(order[n_norm:].tolist()), sorted(order[:n_norm].tolist())


def fit_efficientad(
    mc: ModelConfig,
    images: torch.Tensor,
    pre: Preprocessing,
    seed: int,
    data_fingerprint: str,
    progress: bool = False,
    stop_after: int | None = None,
    device: str = "cpu",
) -> EfficientADFit:
    """Teacher (file or distilled), then student + autoencoder, then quantiles on frames kept out of training.

    `images` (N, 3, H, W) are normal frames preprocessed with `pre` (`efficientad_preprocessing`).
    Training runs on `model.efficientad.device`, or on `device` (fit.device) when that is not set.
    """
    ec = mc.efficientad
    dev = ec.device or device
    require_device("model.efficientad.device" if ec.device else "fit.device", dev)
    on_gpu = dev.startswith("cuda")
    precision = resolve_train_precision(ec.precision, dev)
    steps = ec.steps or (CUDA_STEPS if on_gpu else CPU_STEPS)
    learning_rate = ec.learning_rate or LEARNING_RATE
    train_idx, norm_idx = split_normalisation(len(images), ec.norm_fraction, seed)
    train, norm = images[train_idx], images[norm_idx]
    h = images.shape[-2]
    generic = generic_images(ec.distill_images, pre)
    checkpoint = Path(ec.checkpoint) if ec.checkpoint else None
    teacher = PatchDescriptionNetwork(ec.size, TEACHER_CHANNELS, ec.padding)
    info: dict[str, Any] = {"steps": steps, "learning_rate": learning_rate, "precision": precision, "device": dev}
    info["penalty_images"] = len(generic)
    info.update({"train_images": len(train_idx), "norm_images": len(norm_idx)})
    if ec.teacher is not None:
        load_pdn_weights(teacher, ec.teacher)
        source = f"file {Path(ec.teacher).name} sha256 {file_sha256(Path(ec.teacher))[:16]}"
    else:
        distill_steps = (
            ec.distill_steps if ec.distill_steps is not None else (CUDA_DISTILL_STEPS if on_gpu else CPU_DISTILL_STEPS)
        )
        distill_set = torch.cat([train, generic])
        source = (
            f"distilled from {mc.backbone} ({distill_steps} steps x {DISTILL_BATCH} on {len(train)} fit + "
            f"{len(generic)} generic images, seed {seed})"
        )
        info["distill_steps"] = distill_steps
        resuming = checkpoint is not None and checkpoint.is_file()
        if not resuming:  # a checkpoint carries its teacher: no need to distil again
            spec = get_spec(mc.backbone)
            backbone = load_backbone(mc.backbone, mc.layers, mc.backbone_weights).module.to(dev)
            teacher, losses = distill_teacher(
                backbone, spec.preprocessing(h), pre, distill_set, ec.size, ec.padding, distill_steps,
                DISTILL_BATCH, seed, dev, precision, progress,
            )  # fmt: skip
            info["distill_loss"] = [round(float(np.mean(losses[:20])), 4), round(float(np.mean(losses[-20:])), 4)]
    settings = TrainSettings(source, ec.size, ec.padding, steps, seed, precision, dev, learning_rate)
    log: list[float] = []
    state, mean, std = train_student(
        teacher, train, generic, pre, settings, data_fingerprint, checkpoint, ec.checkpoint_every, progress,
        on_step=lambda _, terms: log.append(terms["loss"]), stop_after=stop_after,
    )  # fmt: skip
    if log:
        info["train_loss"] = [round(float(np.mean(log[:50])), 4), round(float(np.mean(log[-50:])), 4)]
    model = build_model(teacher, state, mean, std, norm, mc.sigma, source, dev)
    return EfficientADFit(model, info)
