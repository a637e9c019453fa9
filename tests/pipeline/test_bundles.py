"""A bundle per camera: the bundle table, batches of one bundle, and two cameras on two views in one real run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from calibration.datasets import MVTecCategory
from edge.bundle import BundleError, read_bundle_file
from pipeline.app.ports import free_port
from pipeline.bundles import MAX_BUNDLES, BundleTable, RunBundle
from pipeline.inference import one_bundle_batch
from pipeline.ring import RECORD
from pipeline.settings import SourceConfig
from pipeline.supervisor import Pipeline
from tests.pipeline.test_runtime import Subscriber, offline_decisions, run_config


def headers(cameras: list[int], bundles: list[int]) -> np.ndarray:
    h = np.zeros(len(cameras), dtype=RECORD)
    h["camera"], h["bundle"] = cameras, bundles
    return h


def test_a_batch_is_of_one_bundle_and_keeps_each_cameras_frames_in_order() -> None:
    # Ring order: cam0 on bundle 0, cam1 on bundle 1, then cam0 switched to bundle 1, then cam0/cam1 again.
    h = headers([0, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1])
    slots = np.arange(len(h))
    assert one_bundle_batch(h, slots, 8) == [0]  # cam0's frames after its switch wait for its older one
    assert one_bundle_batch(h, slots[1:], 8) == [1, 2, 3, 4, 5]
    assert one_bundle_batch(h, slots[1:], 2) == [1, 2]
    # Two cameras on one bundle still batch together.
    assert one_bundle_batch(headers([0, 1, 0, 1], [3, 3, 3, 3]), np.arange(4), 4) == [0, 1, 2, 3]
    # cam1's frame on bundle 0 after its frame on bundle 2 is held back; cam0's later frame is not.
    assert one_bundle_batch(headers([0, 1, 1, 0], [0, 2, 0, 0]), np.arange(4), 4) == [0, 3]


def test_the_table_shares_a_slot_per_bundle_and_refuses_what_a_run_cannot_hold(bundle_path: Path) -> None:
    bundle = RunBundle.read(bundle_path)
    table = BundleTable.create(cameras=2)
    try:
        slot = table.add(bundle)
        assert table.add(bundle) == slot and table.active() == [slot]
        assert table.hash(slot) == bundle.hash and table.threshold(slot) == bundle.threshold
        assert table.path(slot) == str(bundle_path.resolve())
        assert table.preprocessing(slot) == bundle.manifest.preprocessing
        for i in range(1, MAX_BUNDLES):  # stand-ins with other hashes fill the table
            assert table.add(RunBundle(bundle.path, bundle.manifest, f"{i:064x}", 1.0)) == i
        with pytest.raises(BundleError, match=f"holds {MAX_BUNDLES} bundles already"):
            table.add(RunBundle(bundle.path, bundle.manifest, "f" * 64, 1.0))
    finally:
        table.close()
    with pytest.raises(BundleError, match=r"bundle\.pt: input size 128x128, but this run's bundles take 96x96"):
        RunBundle.read(bundle_path, (96, 96))


def test_a_source_without_a_bundle_and_no_default_is_refused_naming_the_key(small_category: Path) -> None:
    sources = (SourceConfig(spec=f"folder:{small_category}", bundle=None),)
    with pytest.raises(ValueError, match=r"pipeline\.sources\[0\]\.bundle: not set and no pipeline\.bundle"):
        Pipeline(run_config(free_port()), None, sources)


def test_two_cameras_on_two_views_each_decided_by_its_own_bundle(
    bundle_path: Path, small_category: Path, grass_bundle: Path, grass_category: Path
) -> None:
    """`top` sees brick and runs the brick bundle (the run's default); `side` sees grass with its own. With the
    brick bundle on grass, the grass camera would be rejected wholesale: each camera needs its own model."""
    brick_scores, brick_threshold = offline_decisions(bundle_path, small_category)
    grass_scores, grass_threshold = offline_decisions(grass_bundle, grass_category)
    wrong_scores, _ = offline_decisions(bundle_path, grass_category)
    good = [s.label == 0 for s in sorted(MVTecCategory(grass_category).test, key=lambda s: s.path)]
    rejected_with_brick = sum(s > brick_threshold for s, g in zip(wrong_scores, good, strict=True) if g)
    rejected_with_grass = sum(s > grass_threshold for s, g in zip(grass_scores, good, strict=True) if g)
    assert rejected_with_brick == sum(good) > rejected_with_grass

    port = free_port()
    subscriber = Subscriber(f"tcp://127.0.0.1:{port}")
    subscriber.start()
    records: list[np.void] = []
    sources = (
        SourceConfig(spec=f"folder:{small_category}", id="top"),
        SourceConfig(spec=f"folder:{grass_category}", id="side", bundle=str(grass_bundle)),
    )
    pipeline = Pipeline(run_config(port, max_batch=2), bundle_path, sources, records.append)
    summary = pipeline.run(install_signals=False)
    time.sleep(0.3)
    subscriber.stop()

    assert summary.errors == 0 and summary.drops == 0 and summary.verdicts == len(records) == summary.frames
    hashes = {"top": read_bundle_file(bundle_path)[2], "side": read_bundle_file(grass_bundle)[2]}
    expected = {"top": (brick_scores, brick_threshold), "side": (grass_scores, grass_threshold)}
    published = {(m["camera_id"], m["frame_id"]): m for m in subscriber.messages}
    assert len(published) == summary.verdicts
    for rec in records:
        camera = pipeline.cameras[int(rec["camera"])]
        scores, threshold = expected[camera]
        offline = scores[int(rec["source_index"])]
        message = published[(camera, int(rec["frame_id"]))]
        assert message["bundle"] == hashes[camera] and message["threshold"] == threshold
        assert message["score"] == pytest.approx(offline, rel=1e-4, abs=1e-4)
        assert message["verdict"] == ("reject" if offline > threshold else "pass")
    assert {m["camera_id"] for m in subscriber.messages} == {"top", "side"}
