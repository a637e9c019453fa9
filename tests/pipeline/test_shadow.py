"""A shadow bundle on a real run: its verdicts stored beside the live ones, never published; disagreements counted,
kept and listed; a shadow set, promoted and removed at run time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from calibration.datasets import MVTecCategory
from edge.bundle import content_hash
from pipeline.app.ports import free_port
from pipeline.bundles import RunBundle
from pipeline.changeover import SwitchRequest, ask_switch
from pipeline.settings import SourceConfig
from pipeline.store.switches import SwitchLog
from pipeline.supervisor import Pipeline, RunBundles
from tests.pipeline.test_changeover import run_operated
from tests.pipeline.test_runtime import Subscriber, offline_decisions, run_config


def edited_copy(bundle: Path, out: Path, threshold: float | None = None, resize: int | None = None) -> Path:
    """The bundle with its manifest's threshold or resize changed (its hash recomputed to match)."""
    raw = torch.load(bundle, weights_only=True)
    manifest = json.loads(raw["manifest"])
    if threshold is not None:
        manifest["threshold"]["value"] = threshold
    if resize is not None:
        manifest["preprocessing"]["resize"] = [resize, resize]
    raw["manifest"] = json.dumps(manifest, sort_keys=True)
    raw["hash"] = content_hash(raw["manifest"], raw["tensors"])
    torch.save(raw, out)
    return out


def history(store_url: str, *flags: str) -> list[dict]:
    command = [sys.executable, "-m", "pipeline.app.cli", "history", "--store-url", store_url, "--json", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_shadow_bundle_is_stored_and_compared_but_never_published(
    bundle_path: Path, small_category: Path, tmp_path: Path
) -> None:
    """The shadow is the live bundle with a lower threshold (the median good score): on the frames between the
    two thresholds it rejects what the line passes. Those are counted, kept with their images and listed."""
    scores, threshold = offline_decisions(bundle_path, small_category)
    labels = [s.label for s in sorted(MVTecCategory(small_category).test, key=lambda s: s.path)]
    lower = sorted(s for s, label in zip(scores, labels, strict=True) if label == 0)[len(scores) // 8]
    shadow = edited_copy(bundle_path, tmp_path / "candidate.pt", threshold=lower)
    expected = [i for i, s in enumerate(scores) if (s > lower) != (s > threshold)]
    assert expected  # the scenario has disagreements to find

    port = free_port()
    subscriber = Subscriber(f"tcp://127.0.0.1:{port}")
    subscriber.start()
    config = run_config(port, max_batch=2)
    source = SourceConfig(spec=f"folder:{small_category}", id="top", shadow_bundle=str(shadow))
    pipeline = Pipeline(config, bundle_path, (source,))
    summary = pipeline.run(install_signals=False)
    time.sleep(0.3)
    subscriber.stop()

    live_hash, shadow_hash = pipeline.bundle_hash, RunBundle.read(shadow).hash
    # The line sees the live bundle only, as if there were no shadow.
    assert len(subscriber.messages) == summary.verdicts == len(scores)
    assert all(m["bundle"] == live_hash and m["threshold"] == threshold for m in subscriber.messages)
    assert all(m["verdict"] == ("reject" if m["score"] > threshold else "pass") for m in subscriber.messages)
    assert summary.shadow == {"top": {"scored": len(scores), "disagreements": len(expected)}}
    # The store has both verdicts of every frame; the disagreements come with their images.
    assert pipeline.store is not None
    rows = pipeline.store.range(summary.run_id, 1, summary.verdicts)
    assert all(r.shadow is not None and r.shadow.bundle == shadow_hash for r in rows)
    assert all(r.shadow.score == pytest.approx(r.verdict.score) for r in rows if r.shadow)
    assert all(r.shadow.verdict == ("reject" if r.shadow.score > lower else "pass") for r in rows if r.shadow)
    store_url = pipeline.store.url
    listed = history(store_url, "--disagreements", "--run", summary.run_id)
    assert sorted(r["frame_id"] for r in listed) == expected
    assert all(r["verdict"] != r["shadow_verdict"] and r["image_key"] for r in listed)


def test_a_shadow_is_set_promoted_and_removed_while_the_line_runs(
    bundle_path: Path, small_category: Path, tmp_path: Path
) -> None:
    candidate = edited_copy(bundle_path, tmp_path / "candidate.pt", threshold=1e9)  # never rejects
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    subscriber = Subscriber(f"tcp://127.0.0.1:{port}")
    subscriber.start()
    config = run_config(port, max_batch=2, control_address=control)
    source = SourceConfig(spec=f"folder:{small_category}", id="top", rate_ppm=900, loop=True)
    pipeline = Pipeline(config, bundle_path, (source,))
    outcomes: dict[str, object] = {}

    def operator() -> None:
        subscriber.wait_for(5)
        refused = edited_copy(bundle_path, tmp_path / "other-cut.pt", resize=160)
        outcomes["cut"] = ask_switch(control, SwitchRequest("top", str(refused), shadow=True, by="qa"), 60)
        outcomes["promote_none"] = ask_switch(control, SwitchRequest("top", promote=True, by="qa"), 60)
        outcomes["shadow"] = ask_switch(control, SwitchRequest("top", str(candidate), shadow=True, by="qa"), 120)
        subscriber.wait_for(subscriber.verdicts() + 10)
        outcomes["promote"] = ask_switch(control, SwitchRequest("top", promote=True, by="qa"), 60)
        subscriber.wait_for(subscriber.verdicts() + 10)
        outcomes["again"] = ask_switch(control, SwitchRequest("top", str(bundle_path), shadow=True, by="qa"), 120)
        outcomes["live_cut"] = ask_switch(control, SwitchRequest("top", str(refused), by="qa"), 60)
        subscriber.wait_for(subscriber.verdicts() + 5)
        outcomes["stop"] = ask_switch(control, SwitchRequest("top", shadow=True, by="qa"), 60)
        subscriber.wait_for(subscriber.verdicts() + 5)

    summary = run_operated(pipeline, subscriber, operator)

    live, cand = pipeline.bundle_hash, RunBundle.read(candidate).hash
    cut, none = outcomes["cut"], outcomes["promote_none"]
    assert not cut.switched and "other-cut.pt: resizes or crops unlike camera top's bundle" in cut.error  # type: ignore[attr-defined]
    assert not none.switched and none.error == "camera top: no shadow bundle to promote"  # type: ignore[attr-defined]
    live_cut = outcomes["live_cut"]
    assert not live_cut.switched and "stop or promote the shadow first" in live_cut.error  # type: ignore[attr-defined]
    for name in ("shadow", "promote", "again", "stop"):
        assert outcomes[name].switched, (name, outcomes[name])  # type: ignore[attr-defined]
    assert summary.drops == 0 and summary.verdicts == summary.frames
    ids = sorted(m["frame_id"] for m in subscriber.messages)
    assert ids == list(range(summary.frames))
    # Published: the live bundle until the promotion, the candidate from then on; never both for one frame.
    hashes = [m["bundle"] for m in sorted(subscriber.messages, key=lambda m: m["frame_id"])]
    first = hashes.index(cand)
    assert set(hashes[:first]) == {live} and set(hashes[first:]) == {cand}
    # Stored: shadow verdicts by the candidate before the promotion, by the first bundle after `again`, none at the end.
    assert pipeline.store is not None
    rows = sorted(pipeline.store.range(summary.run_id, 1, summary.verdicts), key=lambda r: r.verdict.frame_id)
    shadows = [r.shadow.bundle if r.shadow else None for r in rows]
    assert cand in shadows[:first] and live in shadows[first:] and shadows[-1] is None
    assert all(s in (None, cand) for s in shadows[:first])
    kinds = [(s.shadow, s.made) for s in reversed(SwitchLog(pipeline.store).recent(run=summary.run_id))]
    assert kinds == [
        (True, False), (False, False), (True, True), (False, True), (True, True), (False, False), (True, True)
    ]  # fmt: skip


def test_a_configured_shadow_that_cuts_frames_otherwise_is_refused(bundle_path: Path, tmp_path: Path) -> None:
    other = edited_copy(bundle_path, tmp_path / "other-cut.pt", resize=160)
    source = SourceConfig(spec="folder:/x", bundle=str(bundle_path), shadow_bundle=str(other))
    with pytest.raises(ValueError, match=r"pipeline\.sources\[0\]\.shadow_bundle: .*other-cut\.pt resizes or crops"):
        RunBundles.of(None, (source,))
