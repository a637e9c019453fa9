"""The bundle library: bundles named by content hash, and configs that name them by `sha256:HASH`."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from edge.bundle import read_bundle_file
from pipeline.app.cli import main
from pipeline.app.config import ConfigError, config_from_dict
from pipeline.app.library import BundleLibrary, resolve_bundles
from pipeline.store.verdicts import VerdictStore, sqlite_url


def test_add_names_the_file_by_its_content_hash_once_and_list_shows_it(
    bundle_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    library = tmp_path / "library"
    digest = read_bundle_file(bundle_path)[2]
    assert main(["library", "add", str(bundle_path), "--library", str(library)]) == 0
    assert capsys.readouterr().out.split()[0] == f"sha256:{digest}"
    assert main(["library", "add", str(bundle_path), "--library", str(library)]) == 0  # already there: kept
    assert [p.name for p in library.iterdir()] == [f"{digest}.pt"]
    assert (library / f"{digest}.pt").read_bytes() == bundle_path.read_bytes()
    assert main(["library", "list", "--library", str(library)]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()[-1:]
    assert line.startswith(f"sha256:{digest}  patchcore, threshold ")


def test_a_config_names_bundles_by_hash_everywhere_and_gets_the_checked_files(
    bundle_path: Path, grass_bundle: Path, tmp_path: Path
) -> None:
    library = BundleLibrary(tmp_path / "library")
    brick, grass = library.add(bundle_path), library.add(grass_bundle)
    config = config_from_dict(
        {
            "pipeline": {
                "bundle_library": str(library.folder),
                "bundle": f"sha256:{brick}",
                "sources": [{"spec": "camera:0", "id": "top", "shadow_bundle": f"sha256:{grass}"}],
                "recipes": {"grass": f"sha256:{grass}", "brick": str(bundle_path)},
            }
        }
    )
    p = resolve_bundles(config).pipeline
    assert p.bundle == str(library.path_of(brick)) and p.sources[0].shadow_bundle == str(library.path_of(grass))
    assert p.recipes == {"grass": str(library.path_of(grass)), "brick": str(bundle_path)}  # a path stays a path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("renamed", "holds bundle"),
        ("missing", "bundle file does not exist"),
        ("short", "expected sha256: and 64 lowercase hex digits"),
        ("no-library", "needs pipeline.bundle_library"),
    ],
)
def test_a_reference_that_does_not_hold_is_refused_naming_the_field(
    bundle_path: Path, grass_bundle: Path, tmp_path: Path, case: str, expected: str
) -> None:
    library = BundleLibrary(tmp_path / "library")
    brick = library.add(bundle_path)
    if case == "renamed":  # another bundle under brick's name
        shutil.copy(grass_bundle, library.path_of(brick))
    elif case == "missing":
        library.path_of(brick).unlink()
    reference = f"sha256:{brick[:12]}" if case == "short" else f"sha256:{brick}"
    pipeline = {"bundle": reference} | ({} if case == "no-library" else {"bundle_library": str(library.folder)})
    with pytest.raises(ConfigError, match=expected) as raised:
        resolve_bundles(config_from_dict({"pipeline": pipeline}))
    assert str(raised.value).startswith("pipeline.bundle = ")


def test_run_by_hash_decides_with_that_bundle(
    bundle_path: Path, small_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    library = BundleLibrary(tmp_path / "library")
    digest = library.add(bundle_path)
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "pipeline": {"bundle_library": str(library.folder), "control_address": None},
                "metrics": {"port": 0},
                "ui": {"enabled": False},
                "store": {"path": str(tmp_path / "data")},
                "golden": {"enabled": False},
            }
        )
    )
    argv = ["run", "--config", str(config), "--bundle", f"sha256:{digest}", "--json"]
    assert main([*argv, "--source", f"folder:{small_category / 'test' / 'good'}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with sqlite3.connect(tmp_path / "data" / "verdicts.sqlite") as db:
        bundles = db.execute("SELECT bundle, count(*) FROM verdicts GROUP BY bundle").fetchall()
    assert summary["verdicts"] > 0 and bundles == [(digest, summary["verdicts"])]


def test_a_run_by_hash_needs_store_path_and_the_store_commands_find_it_there(
    bundle_path: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    library = BundleLibrary(tmp_path / "library")
    digest = library.add(bundle_path)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"pipeline": {"bundle_library": str(library.folder)}, "metrics": {"port": 0}}))
    for argv in (["run", "--source", "camera:0"], ["history"]):
        assert main([*argv, "--config", str(config), "--bundle", f"sha256:{digest}"]) == 2
        (line,) = capfd.readouterr().err.strip().splitlines()[-1:]
        assert "store.path: not set, and the bundle is named by hash" in line  # the library is shared by lines
    data = tmp_path / "data"
    data.mkdir()
    VerdictStore(sqlite_url(data / "verdicts.sqlite")).close()
    config.write_text(json.dumps({"pipeline": {"bundle_library": str(library.folder)}, "store": {"path": str(data)}}))
    assert main(["history", "--config", str(config), "--bundle", f"sha256:{digest}"]) == 0


def test_only_a_main_bundle_named_by_hash_needs_store_path(bundle_path: Path, tmp_path: Path) -> None:
    from pipeline.app.library import check_data_folder
    from pipeline.settings import SourceConfig

    library = BundleLibrary(tmp_path / "library")
    ref = f"sha256:{library.add(bundle_path)}"
    cameras = [{"spec": "camera:0", "id": "top"}, {"spec": "camera:1", "id": "side", "bundle": ref}]
    plain_main = config_from_dict({"pipeline": {"bundle": str(bundle_path), "sources": cameras}})
    check_data_folder(plain_main)  # the data folder goes beside the plain main bundle
    without_store = config_from_dict({"pipeline": {"bundle": ref}, "store": {"enabled": False}})
    check_data_folder(without_store)  # nothing is stored
    first_by_hash = config_from_dict({"pipeline": {"sources": list(reversed(cameras))}})
    with pytest.raises(ConfigError, match="store.path: not set"):
        check_data_folder(first_by_hash)
    check_data_folder(first_by_hash, (SourceConfig(spec="camera:0"),))  # --source replaced them
