"""A bundle library: a folder of bundles named by their content hash, so a deployment names the bundle it runs
by hash (`sha256:HASH`), and a line is rolled to another bundle, and back, by changing that one reference.

Reading a reference checks the file: its recorded content hash must be HASH, and its content must still
hash to it (`edge.bundle.read_bundle_file`). Adding copies atomically (write aside, fsync, rename), so a
reader never sees half a file; a bundle already there is left as it is. edge.bundle (torch) is imported where a
bundle is read: the store commands check a reference (`check_data_folder`) without torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.app.config import Config, ConfigError
from pipeline.settings import SourceConfig

REFERENCE = re.compile(r"^sha256:([0-9a-f]{64})$")


@dataclass(frozen=True)
class LibraryEntry:
    hash: str
    path: Path
    model: str
    threshold: float | None  # None: fitted, not calibrated
    created: str  # ISO 8601, UTC
    fit_images: int


class BundleLibrary:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path_of(self, digest: str) -> Path:
        return self.folder / f"{digest}.pt"

    def add(self, bundle: Path) -> str:
        """Put `bundle` in the library under its content hash; returns the hash."""
        from edge.bundle import read_bundle_file

        _, _, digest = read_bundle_file(bundle)
        target = self.path_of(digest)
        if target.is_file():
            return digest
        self.folder.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.part")
        with bundle.open("rb") as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        part.replace(target)
        return digest

    def resolve(self, digest: str) -> Path:
        """The file of bundle `digest`, checked; BundleError naming the file otherwise."""
        from edge.bundle import BundleError, read_bundle_file

        path = self.path_of(digest)
        _, _, recorded = read_bundle_file(path)
        if recorded != digest:
            raise BundleError(f"{path}: holds bundle {recorded}, not {digest} (a library file must not be renamed)")
        return path

    def entries(self) -> list[LibraryEntry]:
        from edge.bundle import read_bundle_file

        found = []
        for path in sorted(self.folder.glob("*.pt")):
            m, _, digest = read_bundle_file(path)
            threshold = None if m.threshold is None else m.threshold.value
            found.append(LibraryEntry(digest, path, m.model, threshold, m.created, m.dataset.n_images))
        return found


def referenced_digest(value: str, library: str | None, field: str) -> str | None:
    """The HASH of a `sha256:HASH` reference, None for a bundle named by its file; ConfigError naming `field`
    for a malformed reference or one without pipeline.bundle_library."""
    match = REFERENCE.match(value.strip())
    if match is None:
        if names_by_hash(value):
            raise ConfigError(f"{field} = {value!r}: expected sha256: and 64 lowercase hex digits")
        return None
    if library is None:
        raise ConfigError(f"{field} = {value}: a bundle named by hash needs pipeline.bundle_library")
    return match[1]


def names_by_hash(value: str | None) -> bool:
    return value is not None and value.strip().startswith("sha256:")


def check_data_folder(config: Config, sources: Sequence[SourceConfig] | None = None) -> None:
    """The data folder goes beside the run's main bundle (pipeline.bundle, else the first source's) unless
    store.path says where. A main bundle named by hash lives in a library shared by lines, no place for one
    line's data: then store.path must be set. ConfigError otherwise."""
    p = config.pipeline
    sources = p.sources if sources is None else sources
    main = p.bundle or (sources[0].bundle if sources else None)
    if config.store.enabled and config.store.path is None and names_by_hash(main):
        raise ConfigError("store.path: not set, and the bundle is named by hash (its library folder is shared)")


def resolve_reference(value: str, library: str | None, field: str) -> str:
    """`value` itself, or for `sha256:HASH` the library's checked file; ConfigError naming `field`."""
    from edge.bundle import BundleError

    digest = referenced_digest(value, library, field)
    if digest is None or library is None:
        return value
    try:
        return str(BundleLibrary(Path(library)).resolve(digest))
    except BundleError as exc:
        raise ConfigError(f"{field} = {value[:19]}…: {exc}") from None


def resolve_bundles(config: Config) -> Config:
    """The config with every bundle named by hash replaced by its checked file in pipeline.bundle_library."""
    p = config.pipeline
    lib = p.bundle_library

    def one(value: str | None, field: str) -> str | None:
        return None if value is None else resolve_reference(value, lib, field)

    sources = tuple(
        dataclasses.replace(
            s,
            bundle=one(s.bundle, f"pipeline.sources[{i}].bundle"),
            shadow_bundle=one(s.shadow_bundle, f"pipeline.sources[{i}].shadow_bundle"),
        )
        for i, s in enumerate(p.sources)
    )
    recipes = {name: resolve_reference(v, lib, f"pipeline.recipes.{name}") for name, v in p.recipes.items()}
    pipeline = dataclasses.replace(p, bundle=one(p.bundle, "pipeline.bundle"), sources=sources, recipes=recipes)
    return dataclasses.replace(config, pipeline=pipeline)
