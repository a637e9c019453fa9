"""Frame sources: a folder replayed as a simulated conveyor, a video file, a live camera.

A source yields `Frame`s and knows nothing about processes or pacing (the capture stage paces a
replay to the configured parts-per-minute). Failures are typed so the capture stage can count them:
`FrameUnreadable` (one bad file: counted and skipped), `SourceDisconnected` (camera lost, replayed
folder gone: reconnect with backoff), `SourceUnavailable` (cannot open: retried with backoff for a
camera, and for any source that was open before).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from calibration.datasets import DatasetError, MVTecCategory
from edge.images import IMAGE_SUFFIXES, ImageError, list_images, read_image
from edge.preprocessing import to_rgb8
from pipeline.settings import SOURCE_KINDS, SourceConfig


class SourceError(ValueError):
    """A source spec or source that cannot be used; the message names it."""


class SourceUnavailable(SourceError):
    pass


class SourceDisconnected(SourceError):
    pass


class FrameUnreadable(SourceError):
    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # RGB uint8 (H, W, 3)
    index: int  # position in the source (file number, video frame); resumes after a restart
    label: int = -1  # ground truth of a labelled replay: 0 good, 1 defect, -1 unknown
    trigger: int | None = None  # encoder / trigger count of the part, when the source has one


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, target = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS or not target:
        raise SourceError(f"source {spec!r}: expected folder:PATH, video:PATH or camera:INDEX_OR_URL")
    return kind, target


def default_policy(config: SourceConfig) -> str:
    if config.policy is not None:
        return config.policy
    return "drop_oldest" if parse_spec(config.spec)[0] == "camera" else "block"


# Decoded frames a looping folder replay keeps for its later passes: decoding PNGs in one capture process
# is slower than a GPU scores them, so a replay would measure the decoder, not the line.
REPLAY_CACHE_BYTES = 1 << 30


class FolderSource:
    """Images of a folder in sorted order, recursively: the simulated conveyor.

    An MVTec AD category replays its `test/` images (every defect type and good) with ground truth.
    Each frame's trigger is its part number on the conveyor (counting across loops). A looping replay
    keeps decoded frames, up to `cache_bytes`, so later passes copy them instead of decoding again.
    """

    finite = True

    def __init__(
        self, root: str | Path, loop: bool = False, start: int = 0, cache_bytes: int = REPLAY_CACHE_BYTES
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise SourceUnavailable(f"folder source {root}: not a folder")
        self.root = root
        self.labels: list[int]
        if (root / "train" / "good").is_dir() and (root / "test").is_dir():
            try:
                test = MVTecCategory(root).test
            except DatasetError as exc:
                raise SourceUnavailable(str(exc)) from None
            test = sorted(test, key=lambda s: str(s.path))
            self.paths = [s.path for s in test]
            self.labels = [s.label for s in test]
        else:
            self.paths = list_images(root, recursive=True)
            self.labels = [-1] * len(self.paths)
        if not self.paths:
            raise SourceUnavailable(f"folder source {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.loop = loop
        self.position = start  # counts across loops
        self.cache_room = cache_bytes if loop else 0
        self.cache: dict[int, np.ndarray] = {}  # file number -> decoded frame (read-only: the ring copies it)

    def read(self) -> Frame | None:
        n = len(self.paths)
        if self.position >= n and not self.loop:
            return None
        if not self.root.is_dir():  # an unmounted share, a removed folder: the conveyor stopped, not a bad file
            raise SourceDisconnected(f"folder source {self.root}: the folder is gone")
        index = self.position
        self.position += 1
        i = index % n
        image = self.cache.get(i)
        if image is None:
            try:
                image = to_rgb8(read_image(self.paths[i]))
            except (ImageError, ValueError) as exc:
                raise FrameUnreadable(index, str(exc)) from None
            if image.nbytes <= self.cache_room:
                image.flags.writeable = False
                self.cache[i] = image
                self.cache_room -= image.nbytes
        return Frame(image, index, self.labels[i], trigger=index)

    def close(self) -> None:
        pass


class VideoSource:
    finite = True

    def __init__(self, path: str | Path, loop: bool = False, start: int = 0) -> None:
        self.path = Path(path)
        self.loop = loop
        self.cap = cv2.VideoCapture(str(self.path))
        if not self.cap.isOpened():
            raise SourceUnavailable(f"video source {self.path}: cannot be opened as a video")
        self.position = start
        if start:
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, start)

    def read(self) -> Frame | None:
        ok, image = self.cap.read()
        if not ok:
            if not self.loop or self.position == 0:
                return None
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self.cap.read()
            if not ok:
                return None
        index = self.position
        self.position += 1
        return Frame(
            cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else to_rgb8(image), index, trigger=index
        )

    def close(self) -> None:
        self.cap.release()


class CameraSource:
    """A live camera: a device index or an RTSP/HTTP URL through cv2.VideoCapture."""

    finite = False

    def __init__(self, target: str, start: int = 0) -> None:
        self.target: int | str = int(target) if target.isdigit() else target
        self.cap = cv2.VideoCapture(self.target)
        if not self.cap.isOpened():
            self.cap.release()
            raise SourceUnavailable(f"camera {target}: cannot be opened")
        self.position = start

    def read(self) -> Frame | None:
        ok, image = self.cap.read()
        if not ok or image is None:
            raise SourceDisconnected(f"camera {self.target}: no frame (disconnected?)")
        index = self.position
        self.position += 1
        return Frame(cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else to_rgb8(image), index)

    def close(self) -> None:
        self.cap.release()


FrameSource = FolderSource | VideoSource | CameraSource


def open_source(config: SourceConfig, start: int = 0) -> FrameSource:
    """Open the source of `config`, resuming at frame `start` (after a restart of the capture stage)."""
    kind, target = parse_spec(config.spec)
    if kind == "folder":
        return FolderSource(target, config.loop, start)
    if kind == "video":
        return VideoSource(target, config.loop, start)
    return CameraSource(target, start)
