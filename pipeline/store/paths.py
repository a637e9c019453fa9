"""Where a run keeps its records: the data folder (SQLite store, image archive, spool) and the store URL.

`store.path` names the folder; by default it is `linewatch-data` next to the bundle, so a bundle and
what it decided stay together. `store.url` points the verdict rows at another database (PostgreSQL);
the images and the spool stay local in the folder either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.settings import StoreConfig

DATA_FOLDER = "linewatch-data"
DATABASE_FILE = "verdicts.sqlite"


@dataclass(frozen=True)
class StorePaths:
    root: Path
    url: str
    line: str = ""  # the line whose rows this box writes and reads (store.line)

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @classmethod
    def resolve(cls, store: StoreConfig, bundle_path: str | Path | None) -> StorePaths:
        """The folder and URL `store` names; ValueError naming the key when neither it nor a bundle gives one."""
        if store.path is not None:
            root = Path(store.path)
        elif bundle_path is not None:
            root = Path(bundle_path).resolve().parent / DATA_FOLDER
        else:
            raise ValueError("store.path: not set and no bundle to put the data folder beside (give --bundle)")
        return cls(root, store.url or f"sqlite:///{root / DATABASE_FILE}", store.line)
