"""`linewatch calibrate --from-store`: a bundle's threshold re-chosen on the line's own archived passed frames.

The verdict store lists the passed parts of a period (and of one camera, when given) whose frame the archive
still holds: the runtime keeps the frame of every reject and of a sampled share of the passes
(`store.keep_pass_fraction`), as the model saw it, in JPEG. Those frames go to `calibration.rethreshold`,
which scores them with the bundle's model and chooses the threshold; the model is not refitted. The period's
verdict counts are read too: its reject rate is the context the bound needs (see calibration.rethreshold).
Nothing here writes to the store.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from calibration.progress import Progress
from calibration.rethreshold import LineFrame, Rethreshold, ReviewedRecall, rethreshold, reviewed_recall
from calibration.rethreshold_report import RethresholdContext, write_rethreshold_report
from calibration.settings import OfflineConfig
from calibration.threshold import InsufficientCalibrationData
from edge.bundle import Bundle, save_bundle
from edge.images import ImageError, read_image
from pipeline.app.history import StoreLocation, open_store, parse_time
from pipeline.store.keys import image_path
from pipeline.store.records import local_time
from pipeline.store.reviews import Reviews
from pipeline.store.verdicts import HistoryFilter, StoredVerdict, VerdictStore, public_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Period:
    """Verdicts decided in [since_ns, until_ns) (since_ns None: from the first), of `camera` when given."""

    since_ns: int | None
    until_ns: int
    camera: str | None

    def describe(self) -> str:
        start = "the first verdict" if self.since_ns is None else f"{local_time(self.since_ns):%Y-%m-%d %H:%M:%S}"
        camera = "" if self.camera is None else f", camera {self.camera}"
        return f"from {start} to {local_time(self.until_ns):%Y-%m-%d %H:%M:%S}{camera}"


@dataclass(frozen=True)
class StoreRecalibration:
    """What `calibrate --from-store` did: the choice, the period and its verdict counts, the bundle written."""

    result: Rethreshold
    period: Period
    counts: dict[str, int]  # the period's verdicts by kind (pass, reject, error)
    missing: int  # rows whose archived frame was not found or could not be read
    digest: str  # content hash of the bundle written
    false_rejects: int = 0  # rejects reviewed as good, among the frames
    recall: ReviewedRecall | None = None  # on the period's reviewed defects, at the new threshold

    @property
    def verdicts(self) -> int:
        return sum(self.counts.values())

    @property
    def rejects(self) -> int:
        return self.counts.get("reject", 0)


def period_of(since: str | None, until: str | None, camera: str | None, now_ns: int) -> Period:
    """The period the flags name (until: now by default); ValueError naming the flag for an empty one."""
    since_ns = None if since is None else parse_time(since, "--since", now_ns)
    until_ns = now_ns if until is None else parse_time(until, "--until", now_ns)
    if since_ns is not None and since_ns >= until_ns:
        raise ValueError(f"--since {since}: not before --until ({until or 'now'}): the period is empty")
    return Period(since_ns, until_ns, camera)


def read_frames(rows: Sequence[StoredVerdict], images: Path, missing: list[str], progress: bool) -> Iterator[LineFrame]:
    """The archived frame of each row, oldest first; a frame not found or unreadable is logged, its key added to
    `missing`, and left out."""
    with Progress("archived frames", len(rows), enabled=progress) as bar:
        for v in rows:
            key = v.image_key or ""
            try:
                image = read_image(image_path(images, key, "frame"))
            except ImageError as exc:
                log.warning("run %s seq %d: %s", v.run, v.seq, exc)
                missing.append(key)
            else:
                yield LineFrame(image, v.bundle)
            bar.update()


@dataclass(frozen=True)
class Reviewed:
    """The period's reviews that change what the frames are: passes found defective are left out of the good
    frames, rejects found good join them, and every confirmed defect measures the recall."""

    false_rejects: list[StoredVerdict]
    defects: list[StoredVerdict]  # confirmed defects (rejects) and missed defects (passes)
    missed: set[tuple[str, int]]  # passes labelled missed_defect

    @classmethod
    def read(cls, store: VerdictStore, period: Period) -> Reviewed:
        reviews = Reviews(store)

        def labelled(label: str) -> list[StoredVerdict]:
            rows = reviews.labelled(label, period.since_ns, period.until_ns)
            return [v for v in rows if period.camera in (None, v.verdict.camera_id)]

        missed = labelled("missed_defect")
        defects = sorted(labelled("confirmed_defect") + missed, key=StoredVerdict.decision_order)
        false_rejects = [v for v in labelled("false_reject") if v.images_kept]
        return cls(false_rejects, [v for v in defects if v.images_kept], {(v.run, v.seq) for v in missed})

    def good_frames(self, passes: list[StoredVerdict]) -> list[StoredVerdict]:
        """The archived passes less those found defective, with the rejects found good, oldest first."""
        rows = [v for v in passes if (v.run, v.seq) not in self.missed] + self.false_rejects
        return sorted(rows, key=StoredVerdict.decision_order)


def recalibrate_from_store(
    bundle: Bundle, out: Path, location: StoreLocation, period: Period, config: OfflineConfig, progress: bool
) -> StoreRecalibration:
    """Choose `bundle`'s threshold anew on the period's archived good frames (passes, and rejects reviewed as
    false rejects), measure its recall on the reviewed defects, and write the new bundle to `out`."""
    if location.images is None:
        raise ValueError(
            "store.path: the archived frames are in the data folder: set store.path or keep it beside --bundle"
        )
    store = open_store(location)
    try:
        passes = store.passes_with_images(period.since_ns or 0, period.until_ns, period.camera)
        counts = store.verdict_counts(HistoryFilter(period.since_ns, period.until_ns, period.camera, limit=None))
        reviewed = Reviewed.read(store, period)
    finally:
        store.close()
    rows = reviewed.good_frames(passes)
    missing: list[str] = []
    source = {
        "source": "store",
        "store": public_url(location.url),
        "images": str(location.images),
        "since_ns": period.since_ns,
        "until_ns": period.until_ns,
        "camera": period.camera,
        "period_verdicts": dict(sorted(counts.items())),
        "reviewed_false_rejects": len(reviewed.false_rejects),
        "missed_defects_left_out": sum((v.run, v.seq) in reviewed.missed for v in passes),
    }
    frames = read_frames(rows, location.images, missing, progress)
    try:
        result = rethreshold(bundle, frames, config, source)
    except InsufficientCalibrationData as exc:
        lost = f"; {len(missing)} archived frames not found" if missing else ""
        raise InsufficientCalibrationData(f"period {period.describe()}: {exc}{lost}") from None
    defects = read_frames(reviewed.defects, location.images, missing, progress)
    recall = reviewed_recall(bundle, defects, result.choice.threshold, config)
    if missing:
        log.warning("%d archived frames were not found or not readable (first: %s)", len(missing), missing[0])
    calibration = {  # known once all were read
        **(result.manifest.calibration or {}),
        "missing": len(missing),
        "reviewed_recall": None if recall is None else recall.to_dict(),
    }
    # Golden frames that are no longer clear cases at the new threshold would fail the self-test for nothing.
    golden = None if bundle.golden is None else bundle.golden.clear_at(result.choice.threshold)
    manifest = replace(result.manifest, calibration=calibration, golden=None if golden is None else golden.record())
    result = replace(result, manifest=manifest)
    digest = save_bundle(out, bundle.model, result.manifest, golden)
    return StoreRecalibration(result, period, counts, len(missing), digest, len(reviewed.false_rejects), recall)


def summary_lines(r: StoreRecalibration, out: Path, report: Path) -> list[str]:
    """What `calibrate --from-store` prints: old and new threshold, the bound, the caveat, the period's rejects."""
    c, res = r.result.choice, r.result
    bound = "meets" if c.meets_target else "MISSES"
    lines = [
        f"threshold {res.previous_threshold:.4g} -> {c.threshold:.4g} (reject when score > threshold):"
        f" {c.n} archived passed frames {r.period.describe()}, k={c.k}",
        f"  false-reject rate <= {c.fpr_bound:.4f} with {c.confidence:.0%} confidence ({bound} target {c.target_fpr:g};"
        f" P(rate > target) = {c.exceed_probability:.4f})",
    ]
    left_out = []
    if res.skipped:
        left_out.append(f"{res.skipped} of another input size (another bundle's) skipped")
    if r.missing:
        left_out.append(f"{r.missing} not found in the archive")
    if left_out:
        lines.append(f"  frames: {', '.join(left_out)}")
    passed_by = ", ".join(f"{h[:12]} {n}" for h, n in res.by_bundle.items())
    lines.append(f"  frames passed by bundle: {passed_by}")
    if r.verdicts:
        rate = f"{r.rejects / r.verdicts:.2%}"
        lines.append(f"  period: {r.rejects} rejects of {r.verdicts} verdicts = {rate} reject rate")
    else:
        rate = "unknown"
        lines.append("  period: no verdicts")
    if r.false_rejects:
        lines.append(f"  reviewed: {r.false_rejects} rejects marked false rejects are among the good frames")
    if r.recall is not None:
        rr = r.recall
        lines.append(
            f"  recall on {rr.n} reviewed defects at the new threshold: {rr.caught} rejected = {rr.recall:.1%}"
            f" (95 % interval {rr.low:.1%} to {rr.high:.1%})"
        )
    else:
        lines.append("  recall: no reviewed defects in the period (mark rejects on the operator page to measure it)")
    lower = "as here" if c.threshold < res.previous_threshold else "not the case here"
    lines.append(
        "  caveat: the frames are only parts the current threshold passed; normal parts it rejected are not among"
        f" them. So for a lower threshold ({lower}) the true false-reject rate can exceed the bound by up to the"
        f" current threshold's own false-reject rate, which the period's reject rate ({rate}) estimates from above."
    )
    lines.append(
        "  archived frames are JPEG (quality 95): their scores differ from the live ones (docs/calibration.md)"
    )
    lines.append(f"bundle {out} (hash {r.digest[:12]}), report {report}")
    return lines


def write_store_report(out_dir: Path, r: StoreRecalibration, bundle_path: Path) -> Path:
    """report.html of the re-chosen threshold, with the recall on reviewed defects; returns its path."""
    calibration = r.result.manifest.calibration or {}
    context = RethresholdContext(
        bundle_path=bundle_path,
        bundle_hash=r.digest,
        period=r.period.describe(),
        verdicts=r.counts,
        false_rejects=r.false_rejects,
        missed_left_out=int(calibration.get("missed_defects_left_out", 0)),
        missing=r.missing,
    )
    return write_rethreshold_report(out_dir, r.result, r.recall, context)[-1]
