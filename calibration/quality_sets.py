"""Evaluation sets of the quality benchmark, in MVTec AD layout: one category per (photograph, seed).

Normal tiles are cut from one photograph (`calibration.photos`) at jittered poses. The defective test tiles
come from two generators designed apart: `drawn` (`calibration.synthetic`: strokes and blotches of flat
tone) and `pasted` (`calibration.pasted`: material of other photographs, colour shifts, blur, foreign
bodies, hairline cracks). A defect folder is named `<generator>_<kind>`, so every tool that reads MVTec AD
scores the same tiles, and the results split by generator afterwards.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from calibration.evaluate import ScoredSet, metrics_of
from calibration.pasted import PastedDefects
from calibration.photos import PHOTOS, load_photo
from calibration.synthetic import DEFECTS, Defect, normal_tile

GENERATORS = ("drawn", "pasted")


@dataclass(frozen=True)
class QualitySetSize:
    n_train: int = 100
    n_test_good: int = 30
    n_test_per_generator: int = 30  # defective tiles from each generator, spread over its kinds
    size: int = 256


def generator_of(defect_type: str) -> str:
    """The generator a test folder's defects came from (`drawn_scratch` -> `drawn`)."""
    return defect_type.split("_", 1)[0]


def _write(path: Path, image: np.ndarray) -> None:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"{path}: could not write the image")


def defect_kinds(family: str) -> dict[str, dict[str, Defect]]:
    """Each generator's defects for tiles of `family`; the pasted ones take material from every other photo."""
    donors = [load_photo(name) for name in PHOTOS if name != family]
    return {"drawn": dict(DEFECTS), "pasted": PastedDefects(donors).kinds()}


def write_quality_category(root: Path, family: str, seed: int, size: QualitySetSize = QualitySetSize()) -> Path:
    """Write category `<family>-s<seed>` under `root`; the same (family, seed) always gives the same tiles."""
    photo = load_photo(family)
    rng = np.random.default_rng([seed, zlib.crc32(family.encode())])  # not its place in PHOTOS: that may grow
    base = root / f"{family}-s{seed}"
    for folder, n in (("train", size.n_train), ("test", size.n_test_good)):
        (base / folder / "good").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _write(base / folder / "good" / f"{i:03d}.png", normal_tile(photo, size.size, rng))
    for generator, kinds in defect_kinds(family).items():
        for j in range(size.n_test_per_generator):
            kind = list(kinds)[j % len(kinds)]
            name = f"{generator}_{kind}"
            image, mask = kinds[kind](normal_tile(photo, size.size, rng), rng)
            for folder in (base / "test" / name, base / "ground_truth" / name):
                folder.mkdir(parents=True, exist_ok=True)
            _write(base / "test" / name / f"{j:03d}.png", image)
            _write(base / "ground_truth" / name / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)
    return base


def quality_figures(scored: ScoredSet) -> dict[str, float]:
    """Image AUROC, pixel AUROC and PRO over the whole category, and image AUROC per generator (its defects
    against all the good tiles); a figure the set cannot support is left out."""
    whole = metrics_of(scored)
    out = {"image_auroc": whole.image_auroc, "pixel_auroc": whole.pixel_auroc, "pro": whole.pro}
    for generator in GENERATORS:
        keep = np.array([k == "good" or generator_of(k) == generator for k in scored.kinds])
        out[f"image_auroc_{generator}"] = metrics_of(scored.subset(keep)).image_auroc
    return {k: float(v) for k, v in out.items() if v is not None}
