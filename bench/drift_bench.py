"""Benchmark: the drift watch's delay after a change of the scene, and its silence without one.

    python bench/drift_bench.py [--families brick grass gravel] [--seeds 3] [--horizon 10000]

Per texture family and seed: a bundle is calibrated as a line's would be (PatchCore, 128 px, 2 % false
rejects at 90 % confidence, 200 held-out good frames). The good test frames are scored as they are and
changed: darker (gain 0.9, 0.8, 0.75, 0.7) and out of focus (Gaussian blur, sigma 1 and 2). A stream of
passed parts is then drawn from those scores, like the supervisor sees it: 200 unchanged parts, then changed
ones; printed is how many changed parts the watch took to alarm ("-" when none within 2,000), and the share
of changed parts the threshold already rejects (false rejects). Last, `--horizon` unchanged parts: whether
the watch alarmed at all (its stated rate: drift.false_alarm).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from calibration.calibrate import calibrate, score_images
from calibration.datasets import normal_frames
from calibration.synthetic import TEXTURES, generate_mvtec_dataset
from pipeline.app.config import Config, config_from_dict
from pipeline.drift import DriftReference, DriftWatch, alarm_level
from pipeline.settings import DriftConfig

SIZE = 128
CHANGES = {
    "gain 0.9": lambda im: np.clip(im * 0.9, 0, 255),
    "gain 0.8": lambda im: np.clip(im * 0.8, 0, 255),
    "gain 0.75": lambda im: np.clip(im * 0.75, 0, 255),
    "gain 0.7": lambda im: np.clip(im * 0.7, 0, 255),
    "blur 1": lambda im: cv2.GaussianBlur(im, (0, 0), 1.0),
    "blur 2": lambda im: cv2.GaussianBlur(im, (0, 0), 2.0),
}
BEFORE, LONGEST = 200, 2000


def frames(category: Path) -> list[np.ndarray]:
    out = []
    for p in sorted((category / "test" / "good").glob("*.png")):
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        out.append(cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32))
    return out


def delay(watch: DriftWatch, before: np.ndarray, after: np.ndarray, threshold: float, rng: np.random.Generator) -> int:
    """Changed parts (passed or not) until the alarm; -1 when none within LONGEST."""
    for s in rng.choice(before, BEFORE):
        if s <= threshold:
            watch.observe(float(s))
    for i, s in enumerate(rng.choice(after, LONGEST)):
        if s <= threshold:
            watch.observe(float(s))
        if watch.alarm:
            return i + 1
    return -1


def row(config: Config, dc: DriftConfig, level: float, category: Path, seed: int, horizon: int) -> str:
    """One family and seed: the reference's bound, the delay after each change, and the silence without one."""
    cal = calibrate(config, normal_frames(category))
    model, pre = cal.fit.model, cal.fit.preprocessing
    t = cal.choice.threshold
    reference = DriftReference.from_holdout(cal.holdout_scores, t, dc.quantile, dc.confidence)
    assert reference is not None
    good = frames(category)

    def scores(images: list[np.ndarray]) -> np.ndarray:
        return np.array([s for s, _ in score_images(model, pre, (im.astype(np.uint8) for im in images), 8)])

    unchanged = scores(good)
    rng = np.random.default_rng(seed)
    cells = []
    for change in CHANGES.values():
        changed = scores([change(im) for im in good])
        d = delay(DriftWatch(reference, level), unchanged, changed, t, rng)
        cells.append(f"{'-' if d < 0 else d:>6} ({(changed > t).mean():4.0%})")
    watch, alarmed = DriftWatch(reference, level), False
    for s in rng.choice(unchanged, horizon):
        if s <= t:
            watch.observe(float(s))
            alarmed = alarmed or watch.alarm
    silent = "no" if alarmed else "yes"
    return f"{reference.exceed_bound:5.3f} " + " ".join(f"{c:>13}" for c in cells) + f"  {silent}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(TEXTURES), choices=list(TEXTURES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=10_000)
    parser.add_argument("--quantile", type=float, default=DriftConfig().quantile, help="drift.quantile")
    args = parser.parse_args()
    dc = DriftConfig(quantile=args.quantile)
    level = alarm_level(args.horizon, dc.false_alarm)
    calibration = {"target_fpr": 0.02, "confidence": 0.9, "synthetic_per_kind": 0}
    config = config_from_dict({"model": {"input_size": SIZE}, "calibration": calibration})
    print(f"{'family':8} {'seed':>4} {'p0':>5} " + " ".join(f"{c:>13}" for c in CHANGES) + "  silent")
    root = Path(tempfile.mkdtemp(prefix="linewatch-drift-"))
    for family in args.families:
        for seed in range(args.seeds):
            category = generate_mvtec_dataset(
                root / f"{family}-{seed}", (family,), n_train=400, n_test_good=60, n_test_per_defect=1, seed=seed
            )[0]
            print(f"{family:8} {seed:>4} {row(config, dc, level, category, seed, args.horizon)}", flush=True)


if __name__ == "__main__":
    main()
