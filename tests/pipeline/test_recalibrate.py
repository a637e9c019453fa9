"""`linewatch calibrate --from-store` in-process on a real SQLite store and a real JPEG archive filled by hand as a
line would: the threshold re-chosen on the archived passed frames, the record in the manifest, the camera and time
filters, the refusals, and how far the archive's JPEG moves the scores."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from calibration.calibrate import kept_scores, score_images
from calibration.threshold import choose_threshold, proportion_interval
from edge.bundle import load_bundle, read_bundle_file
from edge.golden import TENSOR as GOLDEN_TENSOR
from edge.images import list_images, read_image
from edge.preprocessing import to_rgb8
from linewatch_plc.wire import Verdict
from pipeline.app.cli import main
from pipeline.store.archive import ImageArchive
from pipeline.store.paths import DATA_FOLDER, DATABASE_FILE
from pipeline.store.reviews import Reviews
from pipeline.store.verdicts import StoredVerdict, VerdictStore, sqlite_url

S = 1_000_000_000
MINUTE = 60 * S
OTHER = "ab" * 32  # a bundle with another input size that ran on the same line earlier
LOOSE = ["--target-fpr", "0.2", "--confidence", "0.8", "--quiet"]  # needs 8 frames
BATCH = 4  # fit.batch_size by default: the new threshold's scores are computed in batches of 4


@dataclass(frozen=True)
class Line:
    """A store and archive beside the bundle, as `linewatch run` leaves them, and what was put in."""

    bundle: Path
    data: Path
    now_ns: int
    good: list[StoredVerdict]  # the passed good frames with their archived images, oldest first
    originals: list[np.ndarray]  # those frames before JPEG, in the same order
    verdicts: int  # rows in the store
    rejects: int


def row(seq: int, camera: str, t_ns: int, kind: str, bundle: str, threshold: float, key: str | None) -> StoredVerdict:
    score = None if kind == "error" else (2.0 * threshold if kind == "reject" else 0.5 * threshold)
    verdict = Verdict(camera, 1000 + seq, t_ns - 30_000_000, t_ns, score, threshold, kind, None)
    return StoredVerdict("run-1", seq, seq, verdict, bundle, key)


@pytest.fixture(scope="module")
def line(bundle_path: Path, small_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Line:
    """20 good parts passed over 30 minutes on cam0 and cam1 alternately, their frames archived; around them
    rejects, a pass without an image, an error, a pass whose image expired, one whose image was deleted by
    hand, and two passes of another bundle whose frames are 64 px."""
    home = tmp_path_factory.mktemp("line3")
    bundle_file = home / "line3.pt"
    shutil.copy(bundle_path, bundle_file)
    bundle = load_bundle(bundle_file)
    t0, pre = bundle.threshold or 0.0, bundle.preprocessing
    data = home / DATA_FOLDER
    data.mkdir()
    store = VerdictStore(sqlite_url(data / DATABASE_FILE))
    archive = ImageArchive(data / "images", max_bytes=10**9, max_days=90)
    now_ns = time.time_ns() // S * S
    paths = list_images(small_category / "train" / "good") + list_images(small_category / "test" / "good")
    originals = [pre.geometry(to_rgb8(read_image(p))) for p in paths]
    defects = [pre.geometry(to_rgb8(read_image(p))) for p in list_images(small_category / "test" / "crack")]
    rows: list[StoredVerdict] = []

    def add(camera: str, t_ns: int, kind: str, image: np.ndarray | None, bundle_hash: str = bundle.hash) -> None:
        seq = len(rows) + 1
        key = None if image is None else archive.save("run-1", seq, camera, t_ns - 30_000_000, image, None)
        rows.append(row(seq, camera, t_ns, kind, bundle_hash, t0, key))

    for i, frame in enumerate(originals):
        add(f"cam{i % 2}", now_ns - (30 - i) * MINUTE, "pass", frame)
    add("cam0", now_ns - 25 * MINUTE - 30 * S, "reject", defects[0])
    add("cam1", now_ns - 15 * MINUTE - 30 * S, "reject", defects[1])
    add("cam1", now_ns - 12 * MINUTE - 30 * S, "reject", None)
    add("cam0", now_ns - 20 * MINUTE - 30 * S, "pass", None)  # a pass whose frame was not sampled
    add("cam1", now_ns - 20 * MINUTE - 20 * S, "error", None)
    add("cam0", now_ns - 20 * MINUTE - 10 * S, "pass", originals[0])  # its image expires below
    add("cam1", now_ns - 20 * MINUTE - 5 * S, "pass", originals[1])  # its image is deleted by hand below
    small = [cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in originals[:2]]
    add("cam0", now_ns - 5 * MINUTE, "pass", small[0], OTHER)
    add("cam0", now_ns - 4 * MINUTE, "pass", small[1], OTHER)
    store.write(rows)
    expired, lost = rows[-4].image_key or "", rows[-3].image_key or ""
    archive.path(expired).unlink()
    assert store.mark_expired([expired], now_ns) == 1
    archive.path(lost).unlink()  # gone without the store knowing: counted as missing
    store.close()
    good = rows[: len(originals)]
    return Line(bundle_file, data, now_ns, good, originals, len(rows), 3)


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def archived(line: Line, rows: list[StoredVerdict]) -> list[np.ndarray]:
    """The frames of `rows` as the archive holds them (decoded JPEG)."""
    return [read_image(line.data / "images" / f"{v.image_key}.jpg") for v in rows]


def scores_of(bundle: Path, frames: list[np.ndarray]) -> np.ndarray:
    b = load_bundle(bundle)
    return np.asarray([s for s, _ in score_images(b.model, b.preprocessing, frames, BATCH)])


def utc_iso(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns // S, UTC).isoformat()


def test_the_threshold_is_rechosen_on_the_archived_passed_frames(
    line: Line, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "line3-recal.pt"
    rc, stdout, err = cli(
        ["calibrate", "--from-store", "--bundle", str(line.bundle), "--out", str(out), *LOOSE], capsys
    )
    assert rc == 0, err
    old, new = load_bundle(line.bundle), load_bundle(out)  # the new one's content hash is checked on load
    scores = scores_of(line.bundle, archived(line, line.good))
    choice = choose_threshold(scores, 0.2, 0.8)
    assert new.threshold == choice.threshold and new.threshold != old.threshold
    assert new.manifest.threshold is not None and new.manifest.threshold.choice == choice.to_dict()
    cal = new.manifest.calibration or {}
    assert {k: v for k, v in cal.items() if k not in ("config", "rethresholded")} == {
        "source": "store",
        "store": sqlite_url(line.data / DATABASE_FILE),
        "images": str(line.data / "images"),
        "since_ns": None,
        "until_ns": cal["until_ns"],
        "camera": None,
        "period_verdicts": {"error": 1, "pass": 25, "reject": 3},
        "frames": 20,
        "holdout_scores": kept_scores(scores),  # the drift watch's reference from now on
        "skipped": 2,
        "bundle_of_frames": {old.hash: 20},
        "previous_threshold": old.threshold,
        "previous_bundle": old.hash,
        "missing": 1,
        "reviewed_false_rejects": 0,
        "missed_defects_left_out": 0,
        "reviewed_recall": None,
    }
    assert line.now_ns <= cal["until_ns"] <= time.time_ns()
    json.dumps(new.manifest.to_dict())  # the record is plain JSON

    # The model is B's, tensor for tensor, and the new bundle scores like it.
    _, old_tensors, _ = read_bundle_file(line.bundle)
    _, new_tensors, _ = read_bundle_file(out)
    model_keys = old_tensors.keys() - {GOLDEN_TENSOR}  # the golden frames: those still clear at the new threshold
    assert model_keys == new_tensors.keys() - {GOLDEN_TENSOR}
    assert all(torch.equal(old_tensors[k], new_tensors[k]) for k in model_keys)
    frame = torch.from_numpy(line.originals[3][None])
    with torch.inference_mode():
        x = new.preprocessing.normalize_batch(frame)
        assert new.model(x).scores.item() == old.model(x).scores.item()

    lines = stdout.splitlines()
    assert lines[0].startswith(
        f"threshold {old.threshold:.4g} -> {choice.threshold:.4g} (reject when score > threshold)"
    )
    assert " 20 archived passed frames from the first verdict to " in lines[0] and f", k={choice.k}" in lines[0]
    assert f"false-reject rate <= {choice.fpr_bound:.4f} with 80% confidence (meets target 0.2" in lines[1]
    assert "frames: 2 of another input size (another bundle's) skipped, 1 not found in the archive" in stdout
    assert f"period: 3 rejects of {line.verdicts} verdicts = {3 / line.verdicts:.2%} reject rate" in stdout
    assert "caveat: the frames are only parts the current threshold passed" in stdout
    assert "by up to the current threshold's own false-reject rate" in stdout
    assert "JPEG (quality 95)" in stdout
    assert lines[-1] == f"bundle {out} (hash {new.hash[:12]}), report {tmp_path / 'report.html'}"
    page = (tmp_path / "report.html").read_text()
    assert f"above {choice.threshold:.4g}</b> (before: {old.threshold:.4g})" in page
    assert "No parts of this period were reviewed as defects" in page
    assert (tmp_path / "rethreshold_scores.png").is_file()


def test_reviews_on_the_operator_page_change_the_good_frames_and_measure_recall(
    line: Line, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / DATA_FOLDER
    shutil.copytree(line.data, data)  # the module's store stays unreviewed
    config = tmp_path / "config.yaml"
    config.write_text(f"store:\n  path: {data}\n")
    store = VerdictStore(sqlite_url(data / DATABASE_FILE))
    reviews = Reviews(store)
    rejects = [v for v in store.range("run-1", 1, 100) if v.verdict.verdict == "reject" and v.image_key]
    assert len(rejects) == 2
    good_reject, defect = rejects
    missed = line.good[4]
    t = time.time_ns()
    reviews.add_label("run-1", good_reject.seq, "false_reject", "dust", "qa", t)
    reviews.add_label("run-1", defect.seq, "false_reject", "", "qa", t)
    reviews.add_label("run-1", defect.seq, "confirmed_defect", "looked again", "qa", t + 1)  # the newest counts
    reviews.add_label("run-1", missed.seq, "missed_defect", "", "qa", t)
    store.close()
    out = tmp_path / "reviewed.pt"
    argv = ["calibrate", "--from-store", "--bundle", str(line.bundle), "--config", str(config), "--out", str(out)]
    rc, stdout, err = cli([*argv, *LOOSE], capsys)
    assert rc == 0, err

    def in_time(rows: list[StoredVerdict]) -> list[StoredVerdict]:
        return sorted(rows, key=lambda v: (v.verdict.t_decision_ns, v.run, v.seq))

    good = in_time([v for v in line.good if v.seq != missed.seq] + [good_reject])
    choice = choose_threshold(scores_of(line.bundle, archived(line, good)), 0.2, 0.8)
    new = load_bundle(out)
    assert new.threshold == choice.threshold
    defect_scores = scores_of(line.bundle, archived(line, in_time([defect, missed])))
    caught = int((defect_scores > choice.threshold).sum())
    cal = new.manifest.calibration or {}
    assert cal["frames"] == 20 and cal["reviewed_false_rejects"] == 1 and cal["missed_defects_left_out"] == 1
    assert cal["reviewed_recall"] == {
        "n": 2,
        "caught": caught,
        "recall": caught / 2,
        "interval_95": list(proportion_interval(caught, 2)),
    }
    assert "reviewed: 1 rejects marked false rejects are among the good frames" in stdout
    assert f"recall on 2 reviewed defects at the new threshold: {caught} rejected = {caught / 2:.1%}" in stdout
    page = (tmp_path / "report.html").read_text()
    assert "Of <b>2</b> parts reviewed as defective" in page and f"the new threshold rejects <b>{caught}</b>" in page


def test_camera_and_period_select_the_frames(line: Line, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The bundle elsewhere, the data folder named by the config's store.path.
    elsewhere = tmp_path / "copy" / "line3.pt"
    elsewhere.parent.mkdir()
    shutil.copy(line.bundle, elsewhere)
    config = tmp_path / "config.yaml"
    config.write_text(f"store:\n  path: {line.data}\n")
    since, until = line.good[10].verdict.t_decision_ns, line.good[18].verdict.t_decision_ns
    # Relative times count back from the moment the command runs, a little after the fixture's now: 20.5 minutes
    # back takes frames 10 to 19 (decided 20 to 11 minutes before the fixture's now), and the expired frame and
    # the one never archived of 20 minutes and some seconds ago are left out.
    cases = [
        (["--camera", "cam1"], [v for v in line.good if v.verdict.camera_id == "cam1"], 0, None, None),
        (["--since", utc_iso(since), "--until", utc_iso(until)], line.good[10:18], 0, since, until),
        (["--since", "-1230s", "--camera", "cam0", "--allow-weak-bound"], line.good[10::2], 2, -1230 * S, None),
    ]
    for flags, want, skipped, since_ns, until_ns in cases:
        out = tmp_path / "new.pt"
        argv = ["calibrate", "--from-store", "--bundle", str(elsewhere), "--config", str(config), "--out", str(out)]
        started = time.time_ns()
        rc, _, err = cli([*argv, *LOOSE, *flags], capsys)
        assert rc == 0, (flags, err)
        new = load_bundle(out)
        cal = new.manifest.calibration or {}
        camera = flags[flags.index("--camera") + 1] if "--camera" in flags else None
        assert (cal["frames"], cal["skipped"], cal["camera"]) == (len(want), skipped, camera), flags
        assert new.threshold == choose_threshold(scores_of(line.bundle, archived(line, want)), 0.2, 0.8, True).threshold
        if since_ns is None:
            assert cal["since_ns"] is None
        elif since_ns < 0:  # relative: that long before the command ran
            assert started + since_ns <= cal["since_ns"] <= time.time_ns() + since_ns
        else:
            assert cal["since_ns"] == since_ns
        if until_ns is not None:
            assert cal["until_ns"] == until_ns
    assert cal["config"]["allow_weak_bound"] is True and new.manifest.threshold is not None
    assert new.manifest.threshold.choice["method"] == "max_score_weak"  # 5 cam0 frames: 8 are needed


def test_too_few_frames_are_refused_in_one_line_naming_the_counts(
    line: Line, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new.pt"
    argv = ["calibrate", "--from-store", "--bundle", str(line.bundle), "--out", str(out), *LOOSE, "--since", "-930s"]
    rc, stdout, err = cli(argv, capsys)
    assert rc == 2 and stdout == "" and not out.exists()
    (message,) = err.splitlines()
    assert message.startswith("linewatch: error: ")
    # 15.5 minutes back: frames 15 to 19 (15 to 11 minutes before the fixture's now); the other bundle's two 64 px
    # frames came later.
    assert "5 passed frames at the model's input size 128x128 (2 of another size skipped)" in message
    assert "needs at least 8" in message and "--allow-weak-bound" in message


def test_the_forms_of_calibrate_are_not_mixed(line: Line, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "new.pt")
    store = ["--from-store", "--bundle", str(line.bundle), "--out", out]
    cases = [
        ([*store, "--data", str(tmp_path)], "--data: not with --from-store"),
        (["--from-store", "--out", out], "--bundle: required with --from-store"),
        (["--out", out], "--data: required"),
        ([*store, "--holdout", "0.3"], "--holdout: only when fitting on --data"),
        ([*store, "--model", "padim"], "--model: only when fitting on --data"),
        (["--data", str(tmp_path), "--out", out, "--since", "-1d"], "--since: only with --from-store"),
        (["--from-store", "--bundle", str(line.bundle), "--out", str(line.bundle)], "the same file as --bundle"),
        ([*store, "--since", "-1h", "--until", "-2h"], "--since -1h: not before --until"),
        ([*store, "--since", "yesterday"], "--since 'yesterday': expected an ISO 8601 time"),
    ]
    for argv, message in cases:
        rc, stdout, err = cli(["calibrate", *argv], capsys)
        assert rc == 2 and stdout == "", argv
        (text,) = err.splitlines()
        assert text.startswith("linewatch: error: ") and message in text, (argv, text)
    assert not Path(out).exists()


def test_the_archives_jpeg_moves_scores_a_little_against_the_threshold(line: Line) -> None:
    """The frames as captured against their archived JPEG (quality 95), scored by the same model.

    Measured on generated textures (PatchCore on efficientnet_lite0, 128 and 256 px; docs/calibration.md): at
    quality 95 the JPEG moves good frames' scores by -3.5 % to +4.5 % of the threshold, at most +1.7 % on
    average. 8 % leaves room for another seed or a torch release without hiding a broken archive (a frame saved
    in BGR order or at the wrong size moves scores by far more than the threshold).
    """
    bundle = load_bundle(line.bundle)
    t = bundle.threshold or 0.0
    live = scores_of(line.bundle, line.originals)
    jpeg = scores_of(line.bundle, archived(line, line.good))
    moved = (jpeg - live) / t
    assert np.abs(moved).max() < 0.08, moved
    assert abs(moved.mean()) < 0.04, moved
