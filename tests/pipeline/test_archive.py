"""The image archive with real JPEG files: round trip, overlay colours, retention by size and by age, the byte
count against the disk, temporaries and keys that would leave the archive."""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.store.archive import PARTIAL_SUFFIX, STALE_PARTIAL_NS, ImageArchive, quantise_map
from pipeline.store.keys import key_row

T0 = 1_764_748_800_000_000_000  # 2025-12-03 08:00 UTC, in ns
NS_PER_DAY = 86_400 * 10**9
H, W = 48, 64


def frame(seed: int) -> np.ndarray:
    """A smooth RGB frame (compresses like a camera picture, not like noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.jpg"))


def archive_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_a_frame_and_its_overlay_round_trip(tmp_path: Path) -> None:
    archive = ImageArchive(tmp_path / "images", max_bytes=10**9, max_days=90)
    rgb = frame(1)
    high = np.zeros((H, W), np.uint8)
    high[:, W // 2 :] = 255  # twice the threshold on the right half, 0 on the left
    key = archive.save("run-a", 7, "cam0", T0, rgb, high)
    assert key == "2025-12-03/cam0/run-a-0000000007" and key_row(key) == ("run-a", 7)
    assert archive_files(tmp_path / "images") == {f"{key}.jpg", f"{key}.overlay.jpg"}
    saved = cv2.imread(str(archive.path(key)))
    assert saved.shape == (H, W, 3)
    assert np.abs(saved[..., ::-1].astype(int) - rgb.astype(int)).mean() < 4  # RGB in, JPEG quality 95
    overlay = cv2.imread(str(archive.path(key, "overlay"))).astype(float)
    red, blue = overlay[..., 2], overlay[..., 0]
    assert red[:, W // 2 + 4 :].mean() > red[:, : W // 2 - 4].mean() + 30
    assert blue[:, : W // 2 - 4].mean() > blue[:, W // 2 + 4 :].mean() + 30
    plain = archive.save("run-a", 8, "cam0", T0, rgb, None)
    assert not archive.path(plain, "overlay").exists() and archive.path(plain).is_file()
    assert archive.bytes_used == disk_bytes(tmp_path / "images")


def test_a_map_is_quantised_relative_to_the_threshold() -> None:
    threshold = 2.5
    scores = np.array([[0.0, threshold / 2, threshold, 2 * threshold, 10 * threshold, np.nan]])
    q = quantise_map(scores, threshold)
    assert q.dtype == np.uint8 and q.tolist() == [[0, 64, 128, 255, 255, 0]]
    with pytest.raises(ValueError, match=r"threshold 0.0: expected a positive number"):
        quantise_map(scores, 0.0)


def test_a_camera_id_becomes_a_safe_folder_name(tmp_path: Path) -> None:
    archive = ImageArchive(tmp_path, max_bytes=10**9, max_days=90)
    for camera in ("rtsp://10.0.0.5/stream 1", "..", "../../etc"):
        key = archive.save("run-a", 1, camera, T0, frame(2), None)
        path = archive.path(key)
        assert path.is_file() and path.resolve().is_relative_to(tmp_path.resolve())
        assert len(Path(key).parts) == 3
    assert sorted(p.name for p in (tmp_path / "2025-12-03").iterdir()) == [
        "_.",
        "_._.._etc",
        "rtsp___10.0.0.5_stream_1",
    ]


def test_retention_by_size_deletes_the_oldest_first_and_reports_their_keys(tmp_path: Path) -> None:
    root = tmp_path / "images"
    archive = ImageArchive(root, max_bytes=10**9, max_days=90)
    days = [T0 + i * NS_PER_DAY // 3 for i in range(9)]  # over three days
    keys = [
        archive.save("run-a", i, f"cam{i % 2}", t, frame(i), np.full((H, W), 20 * i, np.uint8))
        for i, t in enumerate(days)
    ]
    sizes = [archive.path(k).stat().st_size + archive.path(k, "overlay").stat().st_size for k in keys]
    assert archive.bytes_used == sum(sizes) == disk_bytes(root)
    archive.max_bytes = sum(sizes[4:])  # room for the five newest
    deleted = archive.enforce_retention(time.time_ns())
    assert deleted == keys[:4]
    assert archive.bytes_used == sum(sizes[4:]) == disk_bytes(root)
    assert archive_files(root) == {f"{k}{s}" for k in keys[4:] for s in (".jpg", ".overlay.jpg")}
    assert not (root / "2025-12-03").exists()  # its images all went: the day's folder too
    assert archive.enforce_retention(time.time_ns()) == []  # fits now

    archive.max_bytes = 1  # nothing fits: everything goes, and the folders with it
    assert archive.enforce_retention(time.time_ns()) == keys[4:]
    assert archive.bytes_used == 0 and list(root.iterdir()) == []


def test_retention_by_age_follows_the_files_times_after_a_reopen(tmp_path: Path) -> None:
    root = tmp_path / "images"
    archive = ImageArchive(root, max_bytes=10**9, max_days=90)
    keys = [archive.save("run-a", i, "cam0", T0, frame(i), None) for i in range(6)]
    now = time.time_ns()
    ages_days = [1, 120, 3, 95, 200, 0]  # the saving order is not the age order
    for key, age in zip(keys, ages_days, strict=True):
        t = now - age * NS_PER_DAY
        os.utime(archive.path(key), ns=(t, t))
    reopened = ImageArchive(root, max_bytes=10**9, max_days=90)
    assert reopened.bytes_used == archive.bytes_used == disk_bytes(root)
    assert reopened.enforce_retention(now) == [keys[4], keys[1], keys[3]]  # older than 90 days, oldest first
    assert reopened.bytes_used == disk_bytes(root)
    reopened.max_bytes = reopened.bytes_used - 1  # one more must go: the oldest left
    assert reopened.enforce_retention(now) == [keys[2]]
    assert sorted(archive_files(root)) == sorted(f"{k}.jpg" for k in (keys[0], keys[5]))


def test_the_byte_count_matches_the_disk_after_saves_deletions_and_a_reopen(tmp_path: Path) -> None:
    root = tmp_path / "images"
    archive = ImageArchive(root, max_bytes=10**9, max_days=90)
    for i in range(5):
        archive.save("run-a", i, "cam0", T0, frame(i), np.full((H, W), 200, np.uint8))
    archive.save("run-a", 2, "cam0", T0, frame(99), None)  # saved again, without its overlay now
    assert archive.bytes_used == disk_bytes(root)
    archive.max_bytes = archive.bytes_used // 2
    assert archive.enforce_retention(time.time_ns())
    assert archive.bytes_used == disk_bytes(root) <= archive.max_bytes
    (root / "notes.txt").write_text("not an image")  # a foreign file is neither counted nor deleted
    assert ImageArchive(root, max_bytes=10**9, max_days=90).bytes_used == archive.bytes_used
    assert (root / "notes.txt").exists()


def test_a_stale_temporary_is_removed_on_open_and_a_fresh_one_kept(tmp_path: Path) -> None:
    archive = ImageArchive(tmp_path, max_bytes=10**9, max_days=90)
    key = archive.save("run-a", 1, "cam0", T0, frame(1), None)
    stale = archive.path(key).with_name("run-a-0000000002.jpg" + PARTIAL_SUFFIX)
    fresh = archive.path(key).with_name("run-a-0000000003.jpg" + PARTIAL_SUFFIX)
    for partial in (stale, fresh):
        partial.write_bytes(b"\xff\xd8 half a jpeg")
    old = time.time_ns() - 2 * STALE_PARTIAL_NS
    os.utime(stale, ns=(old, old))
    reopened = ImageArchive(tmp_path, max_bytes=10**9, max_days=90)
    assert not stale.exists() and fresh.exists()
    assert reopened.bytes_used == archive.path(key).stat().st_size


def test_keys_that_would_leave_the_archive_are_refused(tmp_path: Path) -> None:
    archive = ImageArchive(tmp_path, max_bytes=10**9, max_days=90)
    for key in ("../secret", "2025-12-03/../../x", "/etc/passwd", ""):
        with pytest.raises(ValueError, match=r"outside the archive \(expected YYYY-MM-DD/CAMERA/RUN-SEQ\)$"):
            archive.path(key)
    with pytest.raises(ValueError, match=r"image kind 'thumbnail': expected frame or overlay"):
        archive.path("2025-12-03/cam0/run-a-0000000001", "thumbnail")  # type: ignore[arg-type]


def test_bad_input_is_refused_naming_what_was_expected(tmp_path: Path) -> None:
    archive = ImageArchive(tmp_path, max_bytes=10**9, max_days=90)
    with pytest.raises(ValueError, match=r"frame: expected an \(H, W, 3\) uint8 RGB array, got \(48, 64\) uint8"):
        archive.save("run-a", 1, "cam0", T0, frame(1)[..., 0], None)
    with pytest.raises(ValueError, match=r"map: expected a \(48, 64\) uint8 array like the frame, got \(4, 4\)"):
        archive.save("run-a", 1, "cam0", T0, frame(1), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"run id 'a/b': expected letters"):
        archive.save("a/b", 1, "cam0", T0, frame(1), None)
    assert archive_files(tmp_path) == set()
