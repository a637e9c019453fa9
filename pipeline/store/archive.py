"""The image archive: the frame and anomaly-map overlay of each kept verdict, as JPEG files under one folder.

`<root>/<key>.jpg` is the frame as captured, `<root>/<key>.overlay.jpg` the frame under its anomaly map
drawn as a JET heat map; the key (`pipeline.store.keys`) names the verdict row. Each file is written under
a temporary name and renamed, so a killed writer never leaves half an image under a final name.

Retention deletes whole keys, frame and overlay together: first those older than `max_days`, then the
oldest until the archive fits in `max_bytes`. It returns the deleted keys so that the caller marks their
rows expired in the verdict store; the rows themselves stay. One process writes an archive: it scans the
folder once when it opens it and from then on counts the bytes it writes and deletes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.store.keys import KINDS, SUFFIXES, ImageKind, image_key, image_path

JPEG_QUALITY = 95  # the frames feed `calibrate --from-store`: at 90 scores moved up to 13 % of the threshold
OVERLAY_ALPHA = 0.45  # share of the heat map in the overlay: the part stays recognisable under it
PARTIAL_SUFFIX = ".part"  # a file being written; renamed to its final name once complete
STALE_PARTIAL_NS = 600 * 10**9  # a write takes milliseconds: a temporary this old was left by a killed writer
NS_PER_DAY = 86_400 * 10**9
THRESHOLD_LEVEL = 128  # the map's byte value at the threshold

log = logging.getLogger(__name__)


def quantise_map(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """An (H, W) anomaly map as bytes on a fixed scale: 128 at the threshold, 255 at twice it (or more), 0 at 0.

    The same byte therefore means the same score relative to the threshold in every overlay, whatever the
    model or bundle: green at the threshold, orange between it and twice it, dark red at twice it or more, blue
    well below it.
    """
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold {threshold}: expected a positive number to scale the map by")
    scaled = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float64)) * (THRESHOLD_LEVEL / threshold)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def heat_overlay(frame_bgr: np.ndarray, map_u8: np.ndarray) -> np.ndarray:
    """The frame (H, W, 3 BGR) blended with the map (H, W bytes, see quantise_map) as a JET heat map."""
    heat = cv2.applyColorMap(map_u8, cv2.COLORMAP_JET)
    return cv2.addWeighted(frame_bgr, 1.0 - OVERLAY_ALPHA, heat, OVERLAY_ALPHA, 0.0)


@dataclass
class _Entry:
    """One key's files: when written (the oldest file's mtime) and their bytes together."""

    mtime_ns: int
    size: int


class ImageArchive:
    """Saves, finds and expires archived images under `root` (created on the first save)."""

    def __init__(self, root: Path, max_bytes: int, max_days: float) -> None:
        if max_bytes <= 0 or not max_days > 0:
            raise ValueError(f"image archive {root}: max_bytes {max_bytes} and max_days {max_days} must be > 0")
        self.root, self.max_bytes, self.max_days = Path(root), max_bytes, max_days
        self._entries = self._scan()  # oldest first; saves are appended, so the order holds
        self._bytes = sum(e.size for e in self._entries.values())

    @property
    def bytes_used(self) -> int:
        """Bytes of all archived images."""
        return self._bytes

    def path(self, key: str, kind: ImageKind = "frame") -> Path:
        """The file of a key's frame or overlay; ValueError for a key that would leave the archive."""
        return image_path(self.root, key, kind)

    def save(
        self,
        run: str,
        seq: int,
        camera: str,
        t_capture_ns: int,
        frame_rgb: np.ndarray,
        map_u8: np.ndarray | None,
    ) -> str:
        """Archive a frame (H, W, 3 uint8 RGB) and, when given, its overlay from the map (H, W uint8 on
        quantise_map's scale: 128 = at the threshold, 255 = twice it, so every overlay has the same colour
        scale); returns the image key."""
        if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3 or frame_rgb.dtype != np.uint8:
            raise ValueError(f"frame: expected an (H, W, 3) uint8 RGB array, got {frame_rgb.shape} {frame_rgb.dtype}")
        if map_u8 is not None and (map_u8.shape != frame_rgb.shape[:2] or map_u8.dtype != np.uint8):
            raise ValueError(
                f"map: expected a {frame_rgb.shape[:2]} uint8 array like the frame, got {map_u8.shape} {map_u8.dtype}"
            )
        key = image_key(run, seq, camera, t_capture_ns)
        frame_bgr = cv2.cvtColor(np.ascontiguousarray(frame_rgb), cv2.COLOR_RGB2BGR)
        self._forget(key)  # saved again: counted anew
        size = _write_jpeg(self.path(key, "frame"), frame_bgr)
        overlay = self.path(key, "overlay")
        if map_u8 is not None:
            size += _write_jpeg(overlay, heat_overlay(frame_bgr, np.ascontiguousarray(map_u8)))
        else:
            overlay.unlink(missing_ok=True)  # an earlier save's overlay would not match this frame
        self._entries[key] = _Entry(self.path(key, "frame").stat().st_mtime_ns, size)
        self._bytes += size
        return key

    def enforce_retention(self, now_ns: int) -> list[str]:
        """Delete images older than max_days, then the oldest until bytes_used <= max_bytes; returns the
        deleted keys, oldest first. A file that cannot be deleted stops this round (logged); the next
        round tries it again."""
        cutoff = now_ns - int(self.max_days * NS_PER_DAY)
        deleted: list[str] = []
        for key, entry in list(self._entries.items()):
            if entry.mtime_ns >= cutoff and self._bytes <= self.max_bytes:
                break
            try:
                self._delete(key)
            except OSError as exc:
                log.error("image archive %s: cannot delete %s: %s", self.root, key, exc)
                break
            deleted.append(key)
        return deleted

    def _delete(self, key: str) -> None:
        frame = self.path(key, "frame")
        for kind in KINDS:
            self.path(key, kind).unlink(missing_ok=True)
        self._forget(key)
        for folder in (frame.parent, frame.parent.parent):  # the camera's folder, then the day's
            if folder == self.root:
                break
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: other images are still there

    def _forget(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size

    def _scan(self) -> dict[str, _Entry]:
        """Every key on disk with its files' bytes, oldest first; removes temporaries left by a killed writer."""
        found: dict[str, _Entry] = {}
        if not self.root.is_dir():
            return found
        stale_before = time.time_ns() - STALE_PARTIAL_NS
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = Path(dirpath, name)
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # a temporary renamed by a live writer meanwhile
                if name.endswith(PARTIAL_SUFFIX):
                    if stat.st_mtime_ns < stale_before:  # a younger one may be a live writer's
                        path.unlink(missing_ok=True)
                    continue
                key = _key_of(path.relative_to(self.root).as_posix())
                if key is None:
                    continue  # not an archive file: neither counted nor ever deleted
                entry = found.setdefault(key, _Entry(stat.st_mtime_ns, 0))
                entry.mtime_ns = min(entry.mtime_ns, stat.st_mtime_ns)
                entry.size += stat.st_size
        return dict(sorted(found.items(), key=lambda item: (item[1].mtime_ns, item[0])))


def _key_of(relative: str) -> str | None:
    """The key of an archive file's path relative to the root (the overlay's suffix first: it ends in .jpg too)."""
    for suffix in sorted(SUFFIXES.values(), key=len, reverse=True):
        if relative.endswith(suffix):
            return relative.removesuffix(suffix)
    return None


def _write_jpeg(path: Path, image_bgr: np.ndarray) -> int:
    """Encode and write under a temporary name, then rename into place; returns the bytes written."""
    ok, encoded = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"{path}: the image could not be encoded as JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    partial.write_bytes(encoded.tobytes())
    os.replace(partial, path)
    return int(encoded.size)
