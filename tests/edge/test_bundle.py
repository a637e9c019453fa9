import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from calibration.datasets import SkipReport, normal_frames
from calibration.fit import fit, preprocess_samples
from edge.bundle import BundleError, load_bundle, read_bundle_file, save_bundle
from pipeline.app.config import config_from_dict


@pytest.mark.parametrize(
    ("model_name", "border_mode", "border_pad", "precision"),
    [
        ("patchcore", "zeros", 0, "float32"),
        ("patchcore", "circular", 16, "bfloat16"),
        ("padim", "reflect", 16, "float32"),
    ],
)
def test_fit_save_load_gives_identical_scores(
    small_category: Path, tmp_path: Path, model_name: str, border_mode: str, border_pad: int, precision: str
) -> None:
    model_config = {
        "name": model_name,
        "input_size": 128,
        "border_mode": border_mode,
        "border_pad": border_pad,
        "backbone_precision": precision,
    }
    config = config_from_dict({"model": model_config})
    result = fit(config, normal_frames(small_category)[:8])
    path = tmp_path / "m.pt"
    digest = save_bundle(path, result.model, result.manifest)
    bundle = load_bundle(path)
    assert bundle.hash == digest
    assert bundle.manifest.model == model_name
    assert bundle.manifest.backbone.name == "efficientnet_lite0"
    assert bundle.model.backbone.border_mode == bundle.manifest.backbone.border_mode == border_mode
    assert bundle.model.backbone.border_pad == bundle.manifest.backbone.border_pad == border_pad
    assert bundle.model.backbone.precision == bundle.manifest.backbone.precision == precision
    assert bundle.manifest.versions["torch"] == torch.__version__
    assert bundle.manifest.dataset.n_images == 8
    x = torch.from_numpy(
        preprocess_samples(normal_frames(small_category)[8:10], bundle.preprocessing, False, SkipReport()).numpy()
    )
    with torch.inference_mode():
        a, b = result.model(x), bundle.model(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    # The file holds tensors and strings only: loadable without pickle.
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "manifest", "hash", "tensors"}


@pytest.fixture()
def saved(small_category: Path, tmp_path: Path) -> Path:
    config = config_from_dict({"model": {"input_size": 128, "patchcore": {"coreset_ratio": 0.05}}})
    result = fit(config, normal_frames(small_category)[:4])
    path = tmp_path / "m.pt"
    save_bundle(path, result.model, result.manifest)
    return path


def test_tampered_bundle_is_refused(saved: Path) -> None:
    raw = torch.load(saved, weights_only=True)
    raw["tensors"]["memory_bank"][0, 0] += 1.0
    torch.save(raw, saved)
    with pytest.raises(BundleError, match="content hash mismatch"):
        load_bundle(saved)


def test_edited_manifest_is_refused(saved: Path) -> None:
    raw = torch.load(saved, weights_only=True)
    raw["manifest"] = raw["manifest"].replace('"num_neighbors": 9', '"num_neighbors": 3')
    torch.save(raw, saved)
    with pytest.raises(BundleError, match="content hash mismatch"):
        read_bundle_file(saved)


def test_other_backbone_weights_are_refused(saved: Path, tmp_path: Path) -> None:
    from edge.backbones import BACKBONES, resolve_weights

    state = torch.load(resolve_weights(BACKBONES["efficientnet_lite0"], None), weights_only=True)
    state["_fc.bias"] = state["_fc.bias"] + 1.0
    other = tmp_path / "other.pth"
    torch.save(state, other)
    with pytest.raises(BundleError, match="differ from those the model was fitted with"):
        load_bundle(saved, backbone_weights=other)


def test_not_a_bundle(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(BundleError, match="not a linewatch bundle"):
        load_bundle(junk)
    torch.save({"a": torch.zeros(1)}, junk)
    with pytest.raises(BundleError, match="no 'linewatch-bundle' header"):
        load_bundle(junk)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "missing.pt")


def test_newer_format_is_refused(saved: Path) -> None:

    _rewrite_manifest(saved, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        load_bundle(saved)


def _rewrite_manifest(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the stored manifest JSON in place, with a hash that matches again (as an older linewatch wrote it)."""
    from edge.bundle import content_hash

    raw = torch.load(path, weights_only=True)
    manifest = json.loads(raw["manifest"])
    edit(manifest)
    raw["manifest"] = json.dumps(manifest, sort_keys=True)
    raw["hash"] = content_hash(raw["manifest"], raw["tensors"])
    torch.save(raw, path)


def _as_version_1(manifest: dict[str, Any]) -> None:
    """The layout of the first bundles: flat threshold record, the whole config, input_size beside the rest."""
    manifest.update(format="linewatch-bundle", format_version=1, input_size=manifest["preprocessing"]["crop"])
    threshold = manifest["threshold"]
    if threshold is not None:
        manifest["threshold"] = {k: v for k, v in threshold.items() if k != "choice"} | threshold["choice"]
    manifest["fit"]["config"] |= {"publisher": {"address": "tcp://127.0.0.1:5556"}, "metrics": {"port": 9108}}


def test_a_version_1_bundle_loads_and_scores_alike(saved: Path, small_category: Path) -> None:
    bundle = load_bundle(saved)
    _rewrite_manifest(saved, _as_version_1)
    old = load_bundle(saved)
    assert old.manifest.format_version == 2 and old.manifest.fit["config"].keys() == {"model", "fit"}
    assert old.manifest.backbone == bundle.manifest.backbone and old.manifest.input_size == bundle.manifest.input_size
    x = preprocess_samples(normal_frames(small_category)[4:6], old.preprocessing, False, SkipReport())
    with torch.inference_mode():
        assert torch.equal(old.model(x).scores, bundle.model(x).scores)


def test_a_malformed_manifest_is_refused_in_one_line(saved: Path, tmp_path: Path) -> None:
    good = shutil.copy(saved, tmp_path / "good.pt")
    _rewrite_manifest(saved, lambda m: m.update(dataset="many"))
    with pytest.raises(BundleError, match=r"m.pt: manifest dataset = 'many': expected a mapping$"):
        load_bundle(saved)
    for edit, message in [
        (lambda m: m["backbone"].update(layers=3), "manifest backbone.layers = 3: expected a list of str"),
        (lambda m: m["backbone"].pop("weights_sha256"), "manifest backbone.weights_sha256: missing, expected str"),
        (lambda m: m["preprocessing"].update(resize=[256]), "manifest preprocessing.resize = [256]: expected a list"),
        (lambda m: m.update(format_version="2"), "manifest format_version = '2': expected a whole number from 1"),
        (lambda m: m.update(colour="red"), "manifest colour: unknown key"),
    ]:
        shutil.copy(good, saved)
        _rewrite_manifest(saved, edit)
        with pytest.raises(BundleError, match=re.escape(message)):
            load_bundle(saved)


def test_bundle_without_a_recorded_precision_runs_its_backbone_in_float32(saved: Path) -> None:
    def before_precision(manifest: dict[str, Any]) -> None:  # as version-1 bundles written before the setting
        _as_version_1(manifest)
        del manifest["backbone"]["precision"]

    _rewrite_manifest(saved, before_precision)
    backbone = load_bundle(saved).model.backbone
    assert backbone.precision == "float32" and backbone.net_bfloat16 is None


def _resave_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from edge.bundle import content_hash

    raw = torch.load(path, weights_only=True)
    raw["tensors"] = tensors
    raw["hash"] = content_hash(raw["manifest"], tensors)
    torch.save(raw, path)


def test_bundle_without_the_neighbour_table_computes_the_same_one(saved: Path, small_category: Path) -> None:
    bundle = load_bundle(saved)
    table = bundle.model.bank_neighbors
    tensors = torch.load(saved, weights_only=True)["tensors"]
    assert table.shape == (bundle.model.memory_bank.shape[0], 9) and torch.equal(tensors["bank_neighbors"], table)
    _resave_tensors(saved, {"memory_bank": tensors["memory_bank"]})  # as bundles before session 10
    older = load_bundle(saved)
    assert torch.equal(older.model.bank_neighbors, table)
    x = preprocess_samples(normal_frames(small_category)[4:6], older.preprocessing, False, SkipReport())
    with torch.inference_mode():
        assert torch.equal(older.model(x).scores, bundle.model(x).scores)


def test_bundle_records_its_map_upsampling_and_older_bundles_keep_bilinear_maps(
    saved: Path, small_category: Path
) -> None:
    bundle = load_bundle(saved)
    assert bundle.manifest.model_params["map_upsampling"] == "cubic"  # what a fit now gives PatchCore
    _rewrite_manifest(saved, lambda m: m["model_params"].pop("map_upsampling"))  # as bundles before it existed
    older = load_bundle(saved)
    assert older.model.smoother.upsampling_mode == "linear"
    x = preprocess_samples(normal_frames(small_category)[4:6], older.preprocessing, False, SkipReport())
    with torch.inference_mode():
        new, old = bundle.model(x), older.model(x)
    assert torch.equal(new.scores, old.scores)  # image scores (and so the threshold) do not depend on it
    assert not torch.allclose(new.maps, old.maps)
    _rewrite_manifest(saved, lambda m: m["model_params"].update(map_upsampling="bilinear"))
    with pytest.raises(BundleError, match="map upsampling 'bilinear': expected one of linear, cubic"):
        load_bundle(saved)


def test_a_neighbour_table_of_the_wrong_shape_is_refused(saved: Path) -> None:
    tensors = torch.load(saved, weights_only=True)["tensors"]
    tensors["bank_neighbors"] = tensors["bank_neighbors"][:, :3]
    _resave_tensors(saved, tensors)
    with pytest.raises(BundleError, match=r"bank_neighbors has shape \(\d+, 3\), expected \(\d+, 9\)"):
        load_bundle(saved)


def test_a_threshold_calibrated_in_another_arithmetic_is_flagged(saved: Path) -> None:
    def bf16_calibrated(manifest: dict[str, Any]) -> None:
        manifest["backbone"]["precision"] = "auto"
        manifest["threshold"] = {"value": 1.0, "reject_if": "score > value", "backbone_arithmetic": "bfloat16"}

    _rewrite_manifest(saved, bf16_calibrated)
    bundle = load_bundle(saved)
    cpu = bundle.model.backbone.arithmetic(torch.device("cpu"))
    # "auto" runs float32 on a GPU, so a bf16-calibrated threshold is flagged there on every machine ...
    warning = bundle.arithmetic_mismatch("cuda")
    assert warning is not None and "calibrated with the backbone in bfloat16, cuda runs it in float32" in warning
    # ... and on this CPU exactly when it lacks native bf16.
    assert (bundle.arithmetic_mismatch("cpu") is None) == (cpu == "bfloat16")
