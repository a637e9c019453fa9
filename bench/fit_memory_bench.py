"""Benchmark: peak memory and time of `linewatch fit` (PatchCore) as the number of training patches grows.

    python bench/fit_memory_bench.py [--images 100 500 1000] [--max-bank 10240]

Each size is a folder of generated normal frames (256 px, so 1,024 Lite0 patches per frame; needs the
demo extra) fitted by `linewatch fit` in its own process, so each peak RSS is that fit's alone. Prints
patches, bank rows, wall time, peak RSS and the bytes per patch above the 100-image run, which shows
whether memory grows linearly (no patches x bank matrix anywhere) and by how much per patch.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from calibration.synthetic import normal_tile, texture_photo

PATCHES_PER_FRAME = 1024  # Lite0 stride 8 at 256 px: 32 x 32


def write_frames(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photo = texture_photo("grass")
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:05d}.png"), normal_tile(photo, 256, rng))
    return folder


def fit_once(folder: Path, config: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one `linewatch fit` child."""
    cmd = [sys.executable, "-m", "pipeline.app.cli", "fit", "--data", str(folder), "--out", str(out)]
    cmd += ["--config", str(config), "--quiet"]
    start = time.perf_counter()
    # A fresh `time`-like wrapper per size: RUSAGE_CHILDREN keeps the largest child's peak so far.
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return wall, int(done.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--max-bank", type=int, default=10240, help="model.patchcore.max_bank for every size")
    parser.add_argument("--work", type=Path, help="keep frames and bundles here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="linewatch-fitmem-"))
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"patchcore": {"max_bank": args.max_bank}}}))
    sizes = sorted(args.images)
    frames = write_frames(work / "frames", sizes[-1])
    names = sorted(os.listdir(frames))
    rows = []
    for n in sizes:
        folder = work / f"n{n}"
        folder.mkdir(exist_ok=True)
        for name in names[:n]:
            link = folder / name
            if not link.exists():
                link.symlink_to(frames / name)
        wall, rss = fit_once(folder, config, work / f"n{n}.pt")
        rows.append((n, wall, rss))
        print(f"{n:6d} frames = {n * PATCHES_PER_FRAME:9,d} patches: fit wall {wall:6.1f} s, peak RSS {rss:7.0f} MB")
    n0, _, rss0 = rows[0]
    for n, _, rss in rows[1:]:
        per_patch = (rss - rss0) * 2**20 / ((n - n0) * PATCHES_PER_FRAME)
        print(f"  {n0} -> {n} frames: {per_patch:.0f} bytes of peak RSS per added patch")
    print(
        f"(bank capped at {args.max_bank} rows; ru_maxrss of this process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)"
    )


if __name__ == "__main__":
    main()
