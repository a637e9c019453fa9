"""report.html for a threshold re-chosen on the line's own frames (`linewatch calibrate --from-store`).

It answers what a line engineer asks after re-thresholding: what threshold now, with what false-reject bound,
chosen on which frames, and how many of the defects people confirmed on the operator page it rejects. That
recall is measured on real defects of this line, not estimated from generated ones; with few reviewed defects
its interval is wide, and the page says so. The page follows `calibration.report`'s look and filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.plots import histogram_figure, save_figure
from calibration.report import report_environment
from calibration.rethreshold import Rethreshold, ReviewedRecall

TEMPLATE = "rethreshold_report.html.j2"
SCORES_FIGURE = "rethreshold_scores.png"


@dataclass(frozen=True)
class RethresholdContext:
    """What the page says about where the frames came from."""

    bundle_path: Path
    bundle_hash: str
    period: str  # e.g. "from 2026-12-07 06:00:00 to 2026-12-07 14:00:00, camera cam0"
    verdicts: dict[str, int]  # the period's verdicts by kind
    false_rejects: int  # rejects reviewed as good, among the frames
    missed_left_out: int  # passes reviewed as defective, left out of them
    missing: int  # archived frames not found


def write_rethreshold_report(
    out_dir: Path, result: Rethreshold, recall: ReviewedRecall | None, context: RethresholdContext
) -> list[Path]:
    """Write report.html and its score histogram into `out_dir`; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = {"good frames (archived passes and reviewed false rejects)": result.scores}
    if recall is not None:
        groups["reviewed defects"] = recall.scores
    fig = histogram_figure("Scores of the line's archived frames", groups, result.choice.threshold)
    figure = save_figure(out_dir / SCORES_FIGURE, fig)
    page = out_dir / "report.html"
    page.write_text(
        report_environment().get_template(TEMPLATE).render(_values(result, recall, context)), encoding="utf-8"
    )
    return [figure, page]


def _values(result: Rethreshold, recall: ReviewedRecall | None, context: RethresholdContext) -> dict[str, Any]:
    total = sum(context.verdicts.values())
    rejects = context.verdicts.get("reject", 0)
    return {
        "c": result.choice,
        "ctx": context,
        "previous": result.previous_threshold,
        "recall": recall,
        "total": total,
        "reject_rate": rejects / total if total else float("nan"),
        "rejects": rejects,
        "figure": SCORES_FIGURE,
        "median_good": float(np.median(result.scores)),
    }
