"""report.html + PNG figures for a calibration, written next to the bundle.

Written for a line engineer: the first paragraph answers "how many good parts will this reject, and
how many bad ones will it miss?", every figure has a sentence saying how to read it, and the
normal-only estimates are kept apart from results on real labelled defects.

The page is rendered from the Jinja2 template `templates/report.html.j2` (package data, autoescaped:
paths, names and labels are text, never markup); the charts come from `calibration.plots`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from calibration.calibrate import Calibration, Rate
from calibration.metrics import roc_curve
from calibration.plots import curve_figure, histogram_figure, overlay, save_figure, save_png, tile_grid
from calibration.threshold import fpr_upper_bound

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE = "report.html.j2"

FIGURES = {
    "histogram": "report_scores.png",
    "fpr": "report_fpr_curve.png",
    "roc": "report_roc.png",
    "examples": "report_examples.png",
}
CURVE_POINTS = 80


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.2f} %" if v < 0.1 else f"{100 * v:.1f} %"


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


@cache
def report_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # always: the template's name ends in .j2, which select_autoescape would not match
        undefined=jinja2.StrictUndefined,  # a missing value is an error, not a silently empty cell
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["pct"] = _pct
    env.filters["fmt"] = lambda v, spec: format(v, spec)
    env.filters["ordinal"] = _ordinal
    return env


def fpr_curve_points(sorted_scores: np.ndarray, confidence: float, max_fpr: float = 1.0) -> tuple[np.ndarray, ...]:
    """(threshold, empirical FPR, lower, upper) at up to CURVE_POINTS order statistics s(k).

    Only thresholds whose held-out FPR is <= max_fpr: the region around the target is what matters.
    """
    n = sorted_scores.size
    first = max(1, min(n, int(np.floor(n * (1.0 - max_fpr)))))
    ks = np.unique(np.linspace(first, n, min(n - first + 1, CURVE_POINTS)).round().astype(int))
    thresholds = sorted_scores[ks - 1]
    empirical = (n - ks) / n
    upper = np.array([fpr_upper_bound(n, int(k), confidence) for k in ks])
    lower = np.array([fpr_upper_bound(n, int(k), 1.0 - confidence) for k in ks])
    return thresholds, empirical, lower, upper


def write_report(out_dir: Path, cal: Calibration, bundle_path: Path, bundle_hash: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    c = cal.choice
    t = c.threshold
    written: list[Path] = []
    synthetic_all = (
        np.concatenate(list(cal.synthetic_scores.values())) if cal.synthetic_scores else np.zeros(0, np.float64)
    )

    groups = {"held-out good": cal.holdout_scores}
    if synthetic_all.size:
        groups["synthetic defects"] = synthetic_all
    lab = cal.labelled
    if lab is not None:
        groups["test good (real)"] = lab.scored.scores[lab.scored.labels == 0]
        groups["test defects (real)"] = lab.scored.scores[lab.scored.labels == 1]
    fig = histogram_figure("Anomaly scores by frame group", groups, t)
    written.append(save_figure(out_dir / FIGURES["histogram"], fig))

    shown = min(1.0, max(5 * c.target_fpr, 2 * c.fpr_bound))
    thresholds, empirical, lower, upper = fpr_curve_points(np.sort(cal.holdout_scores), c.confidence, shown)
    fig = curve_figure(
        "False-reject rate vs threshold (held-out good frames)",
        {"held-out FPR": (thresholds, empirical), f"{c.confidence:.0%} bound": (thresholds, upper)},
        "threshold (anomaly score)",
        "false-reject rate",
        band=(thresholds, lower, upper),
        band_label=f"{2 * c.confidence - 1:.0%} interval of the true rate",
        vline=(t, f"threshold {t:.3g}"),
        hline=(c.target_fpr, f"target {_pct(c.target_fpr)}"),
        limits=(float(thresholds[0]), float(max(thresholds[-1], t)), 0.0, float(min(1.0, upper.max() * 1.05)) or 1.0),
        y_percent=True,
    )
    written.append(save_figure(out_dir / FIGURES["fpr"], fig))

    roc_series = {}
    if synthetic_all.size:
        labels = np.r_[np.zeros(cal.holdout_scores.size), np.ones(synthetic_all.size)]
        fpr, tpr, _ = roc_curve(labels, np.r_[cal.holdout_scores, synthetic_all])
        roc_series["synthetic vs held-out good"] = (fpr, tpr)
    if lab is not None and 0 < lab.scored.labels.sum() < lab.scored.labels.size:
        fpr, tpr, _ = roc_curve(lab.scored.labels, lab.scored.scores)
        roc_series["real test set"] = (fpr, tpr)
    if roc_series:
        fig = curve_figure(
            "ROC: defects detected against good parts rejected",
            roc_series,
            "false-reject rate (good frames rejected)",
            "defects detected",
            limits=(0.0, 1.0, 0.0, 1.0),
            x_percent=True,
            y_percent=True,
            diagonal="chance",
        )
        written.append(save_figure(out_dir / FIGURES["roc"], fig))

    if cal.examples:
        maps = [e.anomaly_map for e in cal.examples if e.anomaly_map is not None]
        vmin = float(np.percentile(np.concatenate([m.ravel() for m in maps]), 1)) if maps else 0.0
        vmax = max(float(max(m.max() for m in maps)), vmin + 1e-6) if maps else 1.0
        rows = []
        for group in dict.fromkeys(e.group for e in cal.examples):
            items = []
            for e in (e for e in cal.examples if e.group == group):
                items.append((e.image, e.caption))
                if e.anomaly_map is not None:
                    items.append((overlay(e.image, e.anomaly_map, vmin, vmax), "anomaly map"))
            rows.append((group, items))
        written.append(save_png(out_dir / FIGURES["examples"], tile_grid(rows)))

    page = out_dir / "report.html"
    page.write_text(render_html(cal, bundle_path, bundle_hash, {p.name for p in written}), encoding="utf-8")
    written.append(page)
    return written


def render_html(cal: Calibration, bundle_path: Path, bundle_hash: str, figures: set[str]) -> str:
    """report.html's text; `figures` are the PNG file names written next to it (only those are shown)."""
    return report_environment().get_template(TEMPLATE).render(_context(cal, bundle_path, bundle_hash, figures))


def _context(cal: Calibration, bundle_path: Path, bundle_hash: str, figures: set[str]) -> dict[str, Any]:
    c = cal.choice
    m = cal.manifest
    fit_n = m.dataset.n_images
    rec = cal.synthetic_recall
    return {
        "c": c,
        "bundle_path": str(bundle_path),
        "bundle_hash": bundle_hash[:16],
        "model": m.model,
        "backbone": m.feature_extractor,
        "created": m.created,
        "fit_n": fit_n,
        "total_n": fit_n + c.n,
        "holdout_fpr": float((cal.holdout_scores > c.threshold).mean()),
        "empirical_holdout_fpr": float((cal.holdout_scores > c.empirical_threshold).mean()),
        "synthetic_recall": rec,
        "synthetic_total": Rate("all synthetic defects", sum(r.hits for r in rec), sum(r.n for r in rec)),
        "labelled": cal.labelled,
        "weakness": cal.weakness(),
        "synthetic_auroc": cal.synthetic_auroc,
        "figure": {key: name for key, name in FIGURES.items() if name in figures},
    }
