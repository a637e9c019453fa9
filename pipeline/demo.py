"""`linewatch demo`: the whole offline story on generated data, with nothing to download.

Generates an MVTec-layout dataset from scikit-image texture photos with synthetic defects, fits
PatchCore and PaDiM on the default backbone per category, evaluates each and prints a table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from calibration.datasets import MVTecCategory, normal_frames
from calibration.evaluate import Evaluation, evaluate
from calibration.fit import fit
from calibration.synthetic import TEXTURES, generate_mvtec_dataset
from edge.bundle import load_bundle, save_bundle
from pipeline.config import Config, with_overrides

COLUMNS = ("category", "model", "fit s", "img AUROC", "px AUROC", "PRO", "F1", "ms/img")


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _row(category: str, model: str, fit_s: float, ev: Evaluation) -> tuple[str, ...]:
    metrics = (ev.image_auroc, ev.pixel_auroc, ev.pro, ev.f1)
    return (category, model, f"{fit_s:.1f}", *map(_cell, metrics), f"{ev.ms_per_image:.1f}")


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    for r in [COLUMNS, *rows]:
        print(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def run_demo(
    workdir: Path, quiet: bool = False, n_train: int = 100, models: tuple[str, ...] = ("patchcore", "padim")
) -> int:
    progress = not quiet
    data_root = workdir / "data"
    print(f"generating demo dataset in {data_root} ...", file=sys.stderr)
    categories = generate_mvtec_dataset(data_root, TEXTURES, n_train=n_train)
    rows = []
    for folder in categories:
        for name in models:
            config = with_overrides(Config(), {"model.name": name})
            start = time.perf_counter()
            result = fit(config, normal_frames(folder), progress=progress)
            fit_s = time.perf_counter() - start
            bundle_path = workdir / "bundles" / f"{folder.name}-{name}.pt"
            save_bundle(bundle_path, result.model, result.manifest)
            ev, _ = evaluate(load_bundle(bundle_path), MVTecCategory(folder), progress=progress)
            rows.append(_row(folder.name, name, fit_s, ev))
    print()
    print_table(rows)
    example = workdir / "bundles" / f"{categories[0].name}-{models[0]}.pt"
    print(f"\nbundles in {workdir / 'bundles'}; try: linewatch evaluate --model {example} --data {categories[0]}")
    return 0
