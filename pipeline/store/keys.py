"""Image keys: where an archived frame and its overlay live, and which verdict row they belong to.

A key is `YYYY-MM-DD/<camera>/<run>-<seq:010d>`: the UTC day of capture, the camera id made safe as a
folder name, and the row's primary key (run, seq). A key alone therefore finds its row without a scan,
and a day's or a camera's images sit in one folder: `<archive>/<key>.jpg` (the frame) and
`<archive>/<key>.overlay.jpg` (the frame under its anomaly map).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Literal

ImageKind = Literal["frame", "overlay"]
KINDS: tuple[ImageKind, ...] = ("frame", "overlay")
SUFFIXES: dict[str, str] = {"frame": ".jpg", "overlay": ".overlay.jpg"}

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_RUN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_KEY = re.compile(r"\d{4}-\d{2}-\d{2}/[^/]+/(?P<run>[A-Za-z0-9_][A-Za-z0-9_.-]*)-(?P<seq>\d{10,})")


def safe_name(text: str) -> str:
    """`text` as one path component: other characters than letters, digits, '_', '.', '-' become '_', and a
    leading '.' too (no hidden folders, no '..')."""
    name = _UNSAFE.sub("_", text)
    if name.startswith("."):
        name = "_" + name[1:]
    return name or "_"


def image_key(run: str, seq: int, camera: str, t_capture_ns: int) -> str:
    """The key of the row (run, seq); ValueError for a run id that is not a plain name or a negative seq."""
    if not _RUN.fullmatch(run):
        raise ValueError(f"run id {run!r}: expected letters, digits, '_', '.' and '-' (not first)")
    if seq < 0:
        raise ValueError(f"seq {seq}: expected >= 0")
    day = datetime.fromtimestamp(t_capture_ns // 1_000_000_000, tz=UTC).date().isoformat()
    return f"{day}/{safe_name(camera)}/{run}-{seq:010d}"


def key_row(key: str) -> tuple[str, int]:
    """(run, seq) of the row a key belongs to; ValueError naming the key when it is not one."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise ValueError(f"image key {key!r}: expected YYYY-MM-DD/CAMERA/RUN-SEQ")
    return match["run"], int(match["seq"])


def image_path(root: Path, key: str, kind: ImageKind = "frame") -> Path:
    """The file of `key`'s frame or overlay under `root`; ValueError for a key that would leave `root`."""
    suffix = SUFFIXES.get(kind)
    if suffix is None:
        raise ValueError(f"image kind {kind!r}: expected frame or overlay")
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or ".." in parts:
        raise ValueError(f"image key {key!r}: outside the archive (expected YYYY-MM-DD/CAMERA/RUN-SEQ)")
    return Path(root, *parts[:-1], parts[-1] + suffix)
