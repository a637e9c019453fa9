"""Benchmark: detection quality over many photograph families, two defect generators and several seeds.

    python bench/quality_bench.py [--families brick grass ...] [--seeds 5] [--first-seed 0] [--set KEY=VALUE[,...]]
                                  [--variant NAME KEY=VALUE[,KEY=VALUE]] [--anomalib] [--json OUT]
                                  [--data DIR] [--baseline EARLIER.json]

Each (family, seed) is a category of `calibration.quality_sets` (100 training tiles, 30 good test tiles,
30 defective tiles from each generator); the seed moves the tiles, the split and the coreset. The default
configuration (with `--set` applied) is fitted on every category; each `--variant` is fitted on the same
categories, so its difference from the default is paired, seed by seed. Printed: image AUROC, pixel AUROC
and PRO as mean ± std over seeds per family, the overall mean (per seed, the mean over families; ± its
std over seeds), image AUROC per generator, and each variant's paired difference. A difference counts only
when its mean is beyond twice its standard error. `--anomalib` scores anomalib's PatchCore on the same
tiles (see `anomalib_bench.py` for the set-up; it needs anomalib installed). `--baseline` takes the
default's runs from an earlier `--json` (its default configuration must be this one's) instead of fitting
them again; with `--data` pointing at the same categories, a variant then costs one fit per category.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.datasets import MVTecCategory, SkipReport, normal_frames
from calibration.evaluate import score_category
from calibration.fit import fit
from calibration.photos import PHOTOS
from calibration.quality_sets import GENERATORS, QualitySetSize, quality_figures, write_quality_category
from edge.settings import to_dict
from pipeline.app.config import Config, ConfigError, load_config, with_overrides

METRICS = ("image_auroc", "pixel_auroc", "pro") + tuple(f"image_auroc_{g}" for g in GENERATORS)


@dataclass(frozen=True)
class Run:
    variant: str
    family: str
    seed: int
    figures: dict[str, float]
    fit_s: float


def run_linewatch(config: Config, folder: Path, seed: int) -> tuple[dict[str, float], float]:
    seeded = with_overrides(config, {"fit.seed": seed})
    t0 = time.perf_counter()
    result = fit(seeded, normal_frames(folder))
    fit_s = time.perf_counter() - t0
    category = MVTecCategory(folder)
    scored = score_category(result.model.eval(), result.preprocessing, category, False, SkipReport())
    return quality_figures(scored), fit_s


def fitted_settings(config: Config) -> dict[str, object]:
    """The settings that decide a fit's figures, as "section.key": value (the seed is set per run)."""
    sections = {"model": to_dict(config.model), "fit": to_dict(config.fit)}
    flat = {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}
    flat.pop("fit.seed")
    return flat


def load_baseline(path: Path, default: Config) -> dict[tuple[str, int], Run]:
    """The default's runs of an earlier `--json`, by (family, seed); SystemExit in one line when the file is
    not such a record or its default was fitted with other settings."""
    try:
        data = json.loads(path.read_text())
        recorded, rows = dict(data["configs"]["default"]), data["runs"]
        runs = [Run(**row) for row in rows if row["variant"] == "default"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"quality_bench: --baseline {path}: expected a --json record of this script ({exc})") from None
    current = fitted_settings(default)
    if differing := sorted(k for k in current.keys() | recorded.keys() if current.get(k) != recorded.get(k)):
        raise SystemExit(f"quality_bench: --baseline {path}: its default was fitted with other {', '.join(differing)}")
    return {(r.family, r.seed): r for r in runs}


def parse_assignments(text: str) -> dict[str, object]:
    """`a.b=1,c=x` -> {"a.b": 1, "c": "x"} (values read as YAML scalars, as config files are)."""
    import yaml

    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"quality_bench: {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def report(runs: list[Run], families: list[str], seeds: list[int], variants: list[str]) -> None:
    def values(variant: str, family: str, metric: str) -> list[float]:
        return [r.figures[metric] for r in runs if (r.variant, r.family) == (variant, family) and metric in r.figures]

    def per_seed_overall(variant: str, metric: str) -> list[float]:
        by_seed = [[r.figures.get(metric) for r in runs if (r.variant, r.seed) == (variant, s)] for s in seeds]
        return [float(np.mean([v for v in vs if v is not None])) for vs in by_seed if vs]

    for variant in variants:
        print(f"\n== {variant}: mean ± std over {len(seeds)} seeds")
        print(f"{'family':10s} " + " ".join(f"{m:>18s}" for m in METRICS))
        for family in families:
            print(f"{family:10s} " + " ".join(f"{mean_std(values(variant, family, m)):>18s}" for m in METRICS))
        print(f"{'overall':10s} " + " ".join(f"{mean_std(per_seed_overall(variant, m)):>18s}" for m in METRICS))
        fit_s = [r.fit_s for r in runs if r.variant == variant]
        print(f"fit seconds per category: median {np.median(fit_s):.1f}")
    for variant in variants[1:]:
        print(f"\n== {variant} minus {variants[0]}, paired by family and seed (mean ± standard error)")
        for metric in METRICS:
            diffs = paired_differences(runs, variants[0], variant, metric)
            if len(diffs) < 2:
                continue
            mean, se = float(np.mean(diffs)), float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
            verdict = "better" if mean > 2 * se else "worse" if mean < -2 * se else "no difference beyond noise"
            print(f"{metric:20s} {mean:+.4f} ± {se:.4f}  ({len(diffs)} pairs): {verdict}")


def paired_differences(runs: list[Run], base: str, other: str, metric: str) -> list[float]:
    index = {(r.variant, r.family, r.seed): r.figures.get(metric) for r in runs}
    out = []
    for (variant, family, seed), value in index.items():
        if variant == other and value is not None and index.get((base, family, seed)) is not None:
            out.append(value - index[(base, family, seed)])  # type: ignore[operator]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(PHOTOS), choices=list(PHOTOS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--config", type=Path, help="config file the default starts from")
    parser.add_argument("--set", default="", help="KEY=VALUE[,KEY=VALUE]: overrides of the default")
    parser.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "KEY=VALUE[,...]"))
    parser.add_argument("--anomalib", action="store_true", help="also score anomalib's PatchCore on the same tiles")
    parser.add_argument("--data", type=Path, help="folder to keep the generated categories in (reused if there)")
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--baseline", type=Path, help="an earlier --json whose default runs are reused")
    args = parser.parse_args()
    if args.seeds < 1:
        raise SystemExit(f"quality_bench: --seeds {args.seeds}: expected 1 or more")
    try:
        default = with_overrides(load_config(args.config), parse_assignments(args.set))
        configs = {"default": default}
        configs |= {name: with_overrides(default, parse_assignments(a)) for name, a in args.variant}
    except ConfigError as exc:
        raise SystemExit(f"quality_bench: {exc}") from None
    reused = load_baseline(args.baseline, default) if args.baseline else {}
    data = args.data or Path(tempfile.mkdtemp(prefix="linewatch-quality-"))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs: list[Run] = []
    for family in args.families:
        for seed in seeds:
            folder = data / f"{family}-s{seed}"
            if not folder.exists():
                write_quality_category(data, family, seed, QualitySetSize(n_train=args.n_train))
            for name, config in configs.items():
                if name == "default" and (family, seed) in reused:
                    runs.append(reused[(family, seed)])
                    continue
                figures, fit_s = run_linewatch(config, folder, seed)
                runs.append(Run(name, family, seed, figures, fit_s))
                print(f"{family}-s{seed} {name}: " + " ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
            if args.anomalib:
                runs.append(theirs := run_anomalib(folder, seed))
                print(f"{family}-s{seed} anomalib: " + " ".join(f"{k} {v:.3f}" for k, v in theirs.figures.items()))
    variants = list(configs) + (["anomalib"] if args.anomalib else [])
    report(runs, args.families, seeds, variants)
    if args.json:
        record = {
            "configs": {name: fitted_settings(c) for name, c in configs.items()},
            "runs": [r.__dict__ for r in runs],
        }
        args.json.write_text(json.dumps(record, indent=1))


def run_anomalib(folder: Path, seed: int) -> Run:
    from anomalib_bench import run_anomalib as fit_and_test  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory() as work:
        result, _ = fit_and_test(folder, Path(work))
    figures = {k: float(result[k]) for k in ("image_auroc", "pixel_auroc")}
    return Run("anomalib", folder.name.rsplit("-s", 1)[0], seed, figures, float(result["fit_s"]))


if __name__ == "__main__":
    main()
