"""The benchmark scripts' own logic (their figures come from running them, not from tests)."""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from pipeline.app.config import Config, with_overrides

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def record(qb: ModuleType, default: Config, path: Path) -> Path:
    runs = [
        qb.Run("default", "grass", 0, {"image_auroc": 0.9}, 10.0),
        qb.Run("default", "grass", 1, {"image_auroc": 0.8}, 11.0),
        qb.Run("sigma2", "grass", 0, {"image_auroc": 0.7}, 12.0),
    ]
    sigma2 = with_overrides(default, {"model.sigma": 2.0})
    configs = {"default": qb.fitted_settings(default), "sigma2": qb.fitted_settings(sigma2)}
    path.write_text(json.dumps({"configs": configs, "runs": [r.__dict__ for r in runs]}))
    return path


def test_baseline_gives_back_the_default_runs_of_an_earlier_record(tmp_path: Path) -> None:
    qb = load("quality_bench")
    default = Config()
    reused = qb.load_baseline(record(qb, default, tmp_path / "r.json"), with_overrides(default, {"fit.seed": 7}))
    assert set(reused) == {("grass", 0), ("grass", 1)}  # the seed is set per run: it does not count
    assert reused[("grass", 1)].figures == {"image_auroc": 0.8} and reused[("grass", 0)].variant == "default"


def test_baseline_fitted_otherwise_or_not_a_record_is_refused_in_one_line(tmp_path: Path) -> None:
    qb = load("quality_bench")
    path = record(qb, Config(), tmp_path / "r.json")
    with pytest.raises(
        SystemExit,
        match=r"^quality_bench: --baseline .*r\.json: its default was fitted with other "
        r"model\.patchcore, model\.sigma$",
    ):
        qb.load_baseline(path, with_overrides(Config(), {"model.sigma": 2.0, "model.patchcore.num_neighbors": 3}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{"variant": "default", "family": "grass", "seed": 0, "figures": {}, "fit_s": 1.0}]))
    with pytest.raises(SystemExit, match=r"old\.json: expected a --json record of this script"):
        qb.load_baseline(old, Config())
    with pytest.raises(SystemExit, match=r"missing\.json: expected a --json record"):
        qb.load_baseline(tmp_path / "missing.json", Config())


def test_reject_alert_bench_uses_the_rules_transform() -> None:
    rab = load("reject_alert_bench")
    rule = (BENCH.parent / "deploy" / "alerts.yml").read_text()
    assert "(linewatch:rejects:increase15m + 0.375) / (linewatch:parts:increase15m + 0.75)" in rule
    n, p = 9000.0, 0.01
    assert abs(float(rab.z_arcsine(np.array(n * p), n, p))) < 0.1  # at the bound: no excess
    assert float(rab.z_arcsine(np.array(2 * n * p), n, p)) > 4 > float(rab.z_arcsine(np.array(1.2 * n * p), n, p))
    share = rab.alarm_days(rate=10, p=0.01, limit=4.0, days=3, seed=0)
    assert set(share) == {"arcsine", "normal"} and all(0.0 <= v <= 1.0 for v in share.values())
    assert rab.alarm_days(rate=10, p=0.01, limit=-100.0, days=2, seed=0) == {"arcsine": 1.0, "normal": 1.0}


def test_drift_bench_counts_changed_parts_until_the_alarm() -> None:
    db = load("drift_bench")
    from pipeline.drift import DriftReference, DriftWatch

    reference = DriftReference(level=1.0, exceed_bound=0.1, n=100)
    rng = np.random.default_rng(0)
    quiet, loud = np.zeros(50), np.full(50, 2.0)  # below and above the reference level, all passing
    d = db.delay(DriftWatch(reference, 1e6), quiet, loud, threshold=10.0, rng=rng)
    assert 15 <= d <= 25  # R doubles with every part above q: about log2(1e6) = 20 parts
    assert db.delay(DriftWatch(reference, 1e6), quiet, quiet, threshold=10.0, rng=rng) == -1
    assert db.delay(DriftWatch(reference, 1e6), quiet, loud, threshold=1.5, rng=rng) == -1  # all rejected: no passes
