"""Verdicts the recorder's in-memory buffer had no room for, kept on local disk until it takes them back.

The decide stage appends each such verdict's published message (the v1 JSON body, one line) to a
segment file `<pid>-<n>.part`, and the kept frame that goes with it (frame + quantised map) to
`images/<run>-<seq>.npy`. A segment is sealed (renamed to `.seg`) once the buffer has room again or
the writer stops. The recorder takes sealed segments, and open ones whose writer has died, oldest
first. Being plain files they survive a crash of every process, and the next run's recorder takes
what this one could not. A torn last line (a writer killed mid-write) is skipped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OPEN_SUFFIX, SEALED_SUFFIX = ".part", ".seg"


@dataclass(frozen=True)
class SpooledVerdict:
    message: dict[str, Any]  # the published v1 body
    image: np.ndarray | None  # (H, W, 4): RGB frame + map quantised against the threshold


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _image_path(root: Path, run: str, seq: int) -> Path:
    return root / "images" / f"{run}-{seq:010d}.npy"


class SpoolWriter:
    """The decide stage's side: append verdicts while the buffer is full, at most `max_bytes` on disk."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        self._file: Any = None
        self._path: Path | None = None
        self._count = 0
        self._bytes = 0

    @property
    def open(self) -> bool:
        return self._file is not None

    def append(self, body: bytes, run: str, seq: int, image: np.ndarray | None) -> bool:
        """Spool one verdict; False when the spool is over `max_bytes` (the verdict is not kept)."""
        if self._file is None:
            self._start_segment()
        size = len(body) + 1 + (image.nbytes + 128 if image is not None else 0)
        if self._bytes + size > self.max_bytes:
            return False
        if image is not None:  # before the line: a line never names an image that is not there yet
            np.save(_image_path(self.root, run, seq), image)
        self._file.write(body + b"\n")
        self._file.flush()  # into the page cache: a killed process loses nothing written
        self._bytes += size
        return True

    def seal(self) -> None:
        """Close the open segment and hand it to the recorder."""
        if self._file is None or self._path is None:
            return
        self._file.close()
        self._path.rename(self._path.with_suffix(SEALED_SUFFIX))
        self._file, self._path = None, None

    def _start_segment(self) -> None:
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self._bytes = _folder_bytes(self.root)  # the recorder removes what it took: count afresh
        self._count += 1
        # <writer pid>-<creation time>-<n>: the pid tells a dead writer's segment, the time sorts them.
        self._path = self.root / f"{os.getpid()}-{time.time_ns():020d}-{self._count}{OPEN_SUFFIX}"
        self._file = self._path.open("ab")


class SpoolReader:
    """The recorder's side: the segments ready to take, their verdicts, and their removal once stored."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def segments(self, include_open: bool = False) -> list[Path]:
        """Sealed segments and those of dead writers, oldest first; `include_open`: every open one too."""
        if not self.root.is_dir():
            return []
        ready = []
        for path in self.root.iterdir():
            if path.suffix == SEALED_SUFFIX or (
                path.suffix == OPEN_SUFFIX and (include_open or not _alive(_writer_pid(path)))
            ):
                ready.append(path)
        return sorted(ready, key=lambda p: p.name.split("-")[1:])

    def read(self, segment: Path) -> list[SpooledVerdict]:
        out = []
        for line in segment.read_bytes().split(b"\n"):
            try:
                message = json.loads(line)
                run, seq = str(message["run"]), int(message["seq"])
            except (ValueError, KeyError, TypeError):
                continue  # empty or torn line
            image_path = _image_path(self.root, run, seq)
            image = np.load(image_path) if image_path.is_file() else None
            out.append(SpooledVerdict(message, image))
        return out

    def remove(self, segment: Path, taken: list[SpooledVerdict]) -> None:
        for entry in taken:
            _image_path(self.root, str(entry.message["run"]), int(entry.message["seq"])).unlink(missing_ok=True)
        segment.unlink(missing_ok=True)


def _writer_pid(path: Path) -> int:
    try:
        return int(path.name.split("-")[0])
    except ValueError:
        return -1


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
