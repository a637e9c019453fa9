"""Calibrating on CUDA against the CPU, both float32: held-out scores, and coreset rows picked differently.

TF32 convolutions move features by ~1e-3; farthest-first selection is discontinuous in them, so a few picks
change and a held-out frame's score can move by percent, while with the whole bank (no coreset) the scores
agree to TF32's error. Run on a GPU box from the repository root:

    python bench/device_picks_bench.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SMALL  # noqa: E402  (the CUDA calibrate test's data)

from calibration.calibrate import calibrate  # noqa: E402
from calibration.datasets import MVTecCategory, normal_frames  # noqa: E402
from calibration.synthetic import generate_mvtec_dataset  # noqa: E402
from pipeline.app.config import config_from_dict  # noqa: E402

LOOSE = {"target_fpr": 0.2, "confidence": 0.8, "synthetic_per_kind": 3}


def main() -> None:
    category = generate_mvtec_dataset(Path(tempfile.mkdtemp()), ("brick",), seed=1, **SMALL)[0]
    samples = normal_frames(category)
    for ratio in (0.1, 1.0):
        runs = {}
        for device in ("cpu", "cuda"):
            patchcore = {"search_precision": "float32", "coreset_ratio": ratio}
            model = {"name": "patchcore", "input_size": 128, "backbone_precision": "float32", "patchcore": patchcore}
            config = config_from_dict({"model": model, "fit": {"device": device}, "calibration": LOOSE})
            runs[device] = calibrate(config, samples, MVTecCategory(category))
        cpu, cuda = (runs[d].fit.model.memory_bank.float() for d in ("cpu", "cuda"))
        gap = torch.cdist(cuda, cpu).min(1).values / cpu.norm(dim=1).mean()
        print(f"coreset {ratio}: bank {tuple(cpu.shape)}; CUDA rows with no CPU row within 1e-2: {(gap > 1e-2).sum()}")
        print("  cpu ", np.round(runs["cpu"].holdout_scores, 3))
        print("  cuda", np.round(runs["cuda"].holdout_scores, 3))


if __name__ == "__main__":
    main()
