"""Datasets: MVTec AD category folders and plain folders of normal frames.

MVTec AD layout (Bergmann et al. 2019), followed exactly:
    <category>/train/good/*.png
    <category>/test/good/*.png, <category>/test/<defect_type>/*.png
    <category>/ground_truth/<defect_type>/<stem>_mask.png      (optional: categories without masks are fine)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.images import IMAGE_SUFFIXES, ImageError, list_images, read_image

log = logging.getLogger(__name__)


class DatasetError(ImageError):
    """A dataset problem; the message names the file or folder and what was expected."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: `label` 0 = normal, 1 = anomalous; `mask_path` only for anomalous ones."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


@dataclass
class SkipReport:
    """Files skipped under --skip-bad, each with its one-line error (which names the file)."""

    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, path: Path, error: str) -> None:
        self.skipped.append((path, error))

    def log(self) -> None:
        """One warning for the count, one per file with its error."""
        if self.skipped:
            log.warning("skipped %d bad file(s):", len(self.skipped))
            for _, error in self.skipped:
                log.warning("  %s", error)


def read_mask(path: Path, expected_hw: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W); it must match its image's size."""
    mask = read_image(path)
    if mask.ndim == 3:
        mask = mask[:, :, 0]
    if mask.shape[:2] != expected_hw:
        raise DatasetError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {expected_hw[1]}x{expected_hw[0]}"
        )
    return mask > 0


class MVTecCategory:
    """One MVTec-AD-layout category folder. Listing is validated on construction."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        train = self.root / "train" / "good"
        if not train.is_dir():
            raise DatasetError(f"{self.root}: not an MVTec AD category (expected a folder {train})")
        self.train = [Sample(p, 0, "good") for p in list_images(train)]
        if not self.train:
            raise DatasetError(f"{train}: no images (expected {', '.join(sorted(IMAGE_SUFFIXES))} files)")
        self.has_masks = (self.root / "ground_truth").is_dir()
        self.test: list[Sample] = []
        test_root = self.root / "test"
        if test_root.is_dir():
            for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
                kind = type_dir.name
                for p in list_images(type_dir):
                    if kind == "good":
                        self.test.append(Sample(p, 0, kind))
                    else:
                        mask = self.root / "ground_truth" / kind / f"{p.stem}_mask.png"
                        self.test.append(Sample(p, 1, kind, mask if self.has_masks else None))

    @property
    def name(self) -> str:
        return self.root.name

    def check_masks(self, skip_bad: bool, report: SkipReport) -> None:
        """Every anomalous test image needs its mask when the category has ground_truth/."""
        if not self.has_masks:
            return
        kept = []
        for s in self.test:
            if s.mask_path is not None and not s.mask_path.is_file():
                msg = f"{s.path}: missing ground-truth mask {s.mask_path}"
                if not skip_bad:
                    raise DatasetError(msg)
                report.add(s.path, msg)
                continue
            kept.append(s)
        self.test = kept


def normal_frames(root: str | Path) -> list[Sample]:
    """Normal frames of `root`: an MVTec category's train/good, or every image under a plain folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder does not exist")
    if (root / "train" / "good").is_dir():
        return MVTecCategory(root).train
    samples = [Sample(p, 0, "good") for p in list_images(root, recursive=True)]
    if not samples:
        raise DatasetError(f"{root}: no images found (expected {', '.join(sorted(IMAGE_SUFFIXES))} files)")
    return samples


@dataclass(frozen=True)
class LoadedSample:
    sample: Sample
    image: np.ndarray
    mask: np.ndarray | None


def iter_loaded(samples: list[Sample], skip_bad: bool, report: SkipReport) -> Iterator[LoadedSample]:
    """Read each sample's image (and mask); a bad file raises, or with `skip_bad` is reported and skipped."""
    for s in samples:
        try:
            image = read_image(s.path)
            mask = None
            if s.mask_path is not None:
                mask = read_mask(s.mask_path, image.shape[:2])
        except ImageError as exc:
            if not skip_bad:
                raise DatasetError(str(exc)) from None
            report.add(s.path, str(exc))
            continue
        yield LoadedSample(s, image, mask)


def fingerprint(samples: list[Sample]) -> str:
    """SHA-256 over the relative names, sizes and contents of the files (identifies the fit data)."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(s.path.name.encode())
        digest.update(s.path.read_bytes())
    return digest.hexdigest()
