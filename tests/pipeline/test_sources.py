from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.sources import FolderSource, FrameUnreadable, SourceDisconnected


def _folder(tmp_path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return tmp_path


def test_looping_replay_reuses_decoded_frames_within_its_budget(tmp_path: Path) -> None:
    folder = _folder(tmp_path, 3)
    source = FolderSource(folder, loop=True, cache_bytes=2 * 8 * 8 * 3)  # room for two frames
    first = [source.read() for _ in range(3)]
    for path in sorted(folder.glob("*.png")):
        path.unlink()  # later passes can only come from the cache
    again = [source.read(), source.read()]
    assert all(f is not None for f in first + again)
    for before, after in zip(first[:2], again, strict=True):
        assert before is not None and after is not None
        np.testing.assert_array_equal(after.image, before.image)
        assert after.index == before.index + 3 and after.trigger == after.index  # parts keep counting
        assert not after.image.flags.writeable  # a consumer cannot change what the next pass replays
    with pytest.raises(FrameUnreadable):  # the third frame did not fit: read from disk, which is gone
        source.read()


def test_single_pass_replay_keeps_nothing(tmp_path: Path) -> None:
    source = FolderSource(_folder(tmp_path, 2))
    assert source.read() is not None and source.read() is not None and source.read() is None
    assert source.cache == {}


def test_a_replayed_folder_that_is_gone_is_a_disconnected_source(tmp_path: Path) -> None:
    (tmp_path / "line").mkdir()
    folder = _folder(tmp_path / "line", 2)
    source = FolderSource(folder, loop=True)
    assert source.read() is not None
    folder.rename(tmp_path / "elsewhere")  # a share unmounted mid-run: even cached frames stop
    with pytest.raises(SourceDisconnected, match=r"^folder source .*line: the folder is gone$"):
        source.read()
