"""Distilling an EfficientAD teacher once, on the teacher corpus, into a file that linewatch can ship.

The PDN learns what `distill_teacher` teaches it on a line's frames (the backbone's locally aware features
of the same image at twice the size, through a 1x1 read-out thrown away afterwards), but on an unbounded
corpus of procedural images and photographs instead of a hundred fit frames, as the paper distils on
ImageNet. Step s trains on corpus images s*B .. s*B + B - 1, so the data needs no state: a run stopped at
any checkpoint and resumed, on the same or another device, goes on where it stopped. The standardisation
statistics and a held-out loss come from two other streams of the same corpus.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibration.efficientad import (
    WEIGHT_DECAY,
    DistillationTarget,
    ImageSpace,
    efficientad_preprocessing,
    resolve_train_precision,
    train_autocast,
)
from calibration.progress import Progress
from calibration.teacher_corpus import PROCEDURAL, TeacherCorpus, packaged_photos
from edge.backbones import get_spec, load_backbone
from edge.backends import require_device
from edge.models.efficientad import PDN_SIZES, TEACHER_CHANNELS, TEACHER_FILE_FORMAT, PatchDescriptionNetwork

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "linewatch-teacher-distillation"
TRAIN, STATISTICS, HELD_OUT = 0, 1, 2  # corpus streams
LOSS_EVERY = 50  # steps per entry of the training-loss record


@dataclass(frozen=True)
class DistillationSettings:
    """What decides the teacher a distillation ends with (device and precision only how fast it gets there)."""

    size: str = "small"
    backbone: str = "efficientnet_lite0"
    side: int = 256
    steps: int = 60_000  # the paper's count, of batches of 16
    batch_size: int = 16
    learning_rate: float = 1e-3  # Adam with cosine decay to 0 over `steps`
    seed: int = 0
    statistics_images: int = 512
    held_out_images: int = 128

    def __post_init__(self) -> None:
        if self.size not in PDN_SIZES:
            raise ValueError(f"size {self.size!r}: expected one of {', '.join(PDN_SIZES)}")
        for name in ("side", "steps", "batch_size", "statistics_images", "held_out_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: expected 1 or more")
        if self.side % 32:
            raise ValueError(f"side = {self.side}: expected a multiple of 32 (EfficientAD's input)")


@dataclass
class Distillation:
    """A distillation in progress: the networks, the optimiser, and what it has measured so far."""

    settings: DistillationSettings
    teacher: PatchDescriptionNetwork
    readout: nn.Conv2d
    target: DistillationTarget
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last entry)
    held_out_loss: list[tuple[int, float]] = field(default_factory=list)


def corpus(settings: DistillationSettings, stream: int, photos: tuple[np.ndarray, ...]) -> TeacherCorpus:
    return TeacherCorpus(settings.seed, settings.side, photos, stream)


def new_distillation(settings: DistillationSettings, device: str) -> Distillation:
    """Networks initialised from the seed and their optimiser; the target's statistics still to fit."""
    torch.manual_seed(settings.seed)
    teacher = PatchDescriptionNetwork(settings.size, TEACHER_CHANNELS, padding=False).to(device)
    backbone = load_backbone(settings.backbone, None, None).module.to(device).eval()
    target = DistillationTarget(backbone, teacher.output_size((settings.side, settings.side))).to(device).eval()
    readout = nn.Conv2d(TEACHER_CHANNELS, target.channels, 1).to(device)
    params = list(teacher.parameters()) + list(readout.parameters())
    optimizer = torch.optim.Adam(params, lr=settings.learning_rate, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    return Distillation(settings, teacher, readout, target, optimizer, scheduler)


def fit_target_statistics(d: Distillation, photos: tuple[np.ndarray, ...], device: str, precision: str) -> None:
    """Standardise the backbone's features with their mean and std over the statistics stream."""
    n = d.settings.statistics_images
    stats = corpus(d.settings, STATISTICS, photos)
    bb = _spaces(d.settings, device)[1]
    with torch.inference_mode(), train_autocast(device, precision):
        d.target.fit_statistics([bb.from_unit(_unit(stats.batch(i, min(16, n - i)), device)) for i in range(0, n, 16)])


@functools.lru_cache(maxsize=8)
def _spaces(settings: DistillationSettings, device: str) -> tuple[ImageSpace, ImageSpace]:
    """(the PDN's input space, the backbone's); made once per settings and device, not on every step."""
    pdn = efficientad_preprocessing(settings.side)
    return ImageSpace(pdn, device), ImageSpace(get_spec(settings.backbone).preprocessing(settings.side), device)


def _unit(batch: np.ndarray | torch.Tensor, device: str) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float 0..1 on `device`."""
    return torch.as_tensor(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def distillation_loss(d: Distillation, rgb: torch.Tensor, device: str, precision: str) -> torch.Tensor:
    """Mean squared error of the read-out teacher against the standardised backbone features of `rgb`."""
    pdn, bb = _spaces(d.settings, device)
    with torch.no_grad(), train_autocast(device, precision):
        y = d.target(bb.from_unit(rgb))
    with train_autocast(device, precision):
        out = d.readout(d.teacher(pdn.from_unit(rgb).contiguous(memory_format=torch.channels_last)))
    return F.mse_loss(out.float(), y.float())


def held_out_loss(d: Distillation, photos: tuple[np.ndarray, ...], device: str, precision: str) -> float:
    """The distillation loss on the held-out stream, which no step trains on."""
    images = corpus(d.settings, HELD_OUT, photos)
    total, n = 0.0, d.settings.held_out_images
    d.teacher.eval()
    d.readout.eval()
    with torch.inference_mode():
        for i in range(0, n, 16):
            k = min(16, n - i)
            total += float(distillation_loss(d, _unit(images.batch(i, k), device), device, precision)) * k
    d.teacher.train()
    d.readout.train()
    return total / n


class CorpusRange(torch.utils.data.Dataset):
    """Images start .. stop - 1 of a corpus, for a DataLoader whose workers draw them in parallel."""

    def __init__(self, corpus: TeacherCorpus, start: int, stop: int) -> None:
        self.corpus, self.start, self.stop = corpus, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.corpus.image(self.start + i))


def train(
    d: Distillation,
    photos: tuple[np.ndarray, ...],
    device: str,
    precision: str,
    until: int,
    on_step: Callable[[Distillation, float], None] = lambda d, loss: None,
    progress: bool = False,
    workers: int = 0,
) -> None:
    """Train from `d.step` to `until` (at most `settings.steps`); `on_step` runs after each step. `workers`
    processes draw the images (a GPU outpaces one CPU core drawing them); any number gives the same teacher."""
    s = d.settings
    until = min(until, s.steps)
    images = CorpusRange(corpus(s, TRAIN, photos), d.step * s.batch_size, until * s.batch_size)
    loader = torch.utils.data.DataLoader(
        images, batch_size=s.batch_size, num_workers=workers, prefetch_factor=4 if workers else None
    )
    d.teacher.train()
    d.readout.train()
    with Progress("distil teacher", until - d.step, enabled=progress) as bar:
        for batch in loader:
            loss = distillation_loss(d, _unit(batch, device), device, precision)
            d.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            d.optimizer.step()
            d.scheduler.step()
            d.step += 1
            on_step(d, float(loss.detach()))
            bar.update()


def checkpoint_state(d: Distillation, photo_names: tuple[str, ...]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "settings": asdict(d.settings),
        "photos": list(photo_names),
        "step": d.step,
        "teacher": d.teacher.state_dict(),
        "readout": d.readout.state_dict(),
        "target_mean": d.target.mean,
        "target_std": d.target.std,
        "optimizer": d.optimizer.state_dict(),
        "scheduler": d.scheduler.state_dict(),
        "train_loss": [list(x) for x in d.train_loss],
        "held_out_loss": [list(x) for x in d.held_out_loss],
    }


def save_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write under a temporary name and rename: a crash mid-write leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def resume(path: Path, settings: DistillationSettings, photo_names: tuple[str, ...], device: str) -> Distillation:
    """The distillation saved at `path`; ValueError in one line when it is not one or had other settings."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"{path}: not a teacher distillation checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a teacher distillation checkpoint")
    if raw["settings"] != asdict(settings):
        differ = sorted(f.name for f in fields(settings) if raw["settings"].get(f.name) != getattr(settings, f.name))
        raise ValueError(f"{path}: written by a distillation with other {', '.join(differ)}; delete it or set those")
    if list(raw["photos"]) != list(photo_names):
        raise ValueError(
            f"{path}: written where the photographs {', '.join(raw['photos']) or 'none'} were installed, here "
            f"{', '.join(photo_names) or 'none'} are: the corpus would differ (install the same extras)"
        )
    d = new_distillation(settings, device)
    d.teacher.load_state_dict(raw["teacher"])
    d.readout.load_state_dict(raw["readout"])
    d.target.mean.copy_(raw["target_mean"])
    d.target.std.copy_(raw["target_std"])
    d.optimizer.load_state_dict(raw["optimizer"])
    d.scheduler.load_state_dict(raw["scheduler"])
    d.step = int(raw["step"])
    d.train_loss = [(int(a), float(b)) for a, b in raw["train_loss"]]
    d.held_out_loss = [(int(a), float(b)) for a, b in raw["held_out_loss"]]
    return d


def teacher_file(d: Distillation, photo_names: tuple[str, ...]) -> dict[str, Any]:
    """The teacher's weights and its account of itself: settings, steps done, losses, the corpus it saw."""
    record = {
        "settings": asdict(d.settings),
        "steps_done": d.step,
        "held_out_loss": [list(x) for x in d.held_out_loss],
        "train_loss": [list(x) for x in d.train_loss],
        "corpus": {"procedural": list(PROCEDURAL), "photos": list(photo_names)},
        "torch": str(torch.__version__),
    }
    weights = {k: v.detach().cpu().clone() for k, v in d.teacher.state_dict().items()}
    return {"format": TEACHER_FILE_FORMAT, "size": d.settings.size, "weights": weights, "record": record}


def distil(
    settings: DistillationSettings,
    out: Path,
    checkpoint: Path | None = None,
    device: str = "cpu",
    precision: str = "auto",
    checkpoint_every: int = 200,
    eval_every: int = 1000,
    stop_after: int | None = None,
    progress: bool = False,
    workers: int = 0,
) -> Distillation:
    """Distil (or resume distilling from `checkpoint`) and write the teacher to `out`.

    `stop_after` steps end this run early (the checkpoint and `out` then hold the teacher so far); the held-out
    loss is measured before the first step, every `eval_every` steps and at the last.
    """
    require_device("--device", device)
    precision = resolve_train_precision(precision, device)
    named = packaged_photos()
    photos, names = tuple(named.values()), tuple(named)
    if checkpoint is not None and checkpoint.is_file():
        d = resume(checkpoint, settings, names, device)
        log.info("resuming the distillation at step %d of %d from %s", d.step, settings.steps, checkpoint)
    else:
        d = new_distillation(settings, device)
        fit_target_statistics(d, photos, device, precision)
        d.held_out_loss = [(0, held_out_loss(d, photos, device, precision))]
    window: list[float] = []

    def on_step(d: Distillation, loss: float) -> None:
        window.append(loss)
        last = d.step == settings.steps
        if d.step % LOSS_EVERY == 0 or last:
            d.train_loss.append((d.step, float(np.mean(window))))
            window.clear()
        if d.step % eval_every == 0 or last:
            d.held_out_loss.append((d.step, held_out_loss(d, photos, device, precision)))
        if checkpoint is not None and d.step % checkpoint_every == 0:
            save_atomic(checkpoint, checkpoint_state(d, names))

    until = settings.steps if stop_after is None else d.step + stop_after
    train(d, photos, device, precision, until, on_step, progress, workers)
    if checkpoint is not None:
        save_atomic(checkpoint, checkpoint_state(d, names))
    save_atomic(out, teacher_file(d, names))
    return d
