"""Product changeovers in the verdict store: who asked which camera to go to which bundle, when, and what came of it.

Rows are appended, never updated: a refused switch stays on record with its reason beside the ones made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select

from pipeline.store.schema import bundle_switches
from pipeline.store.verdicts import VerdictStore


@dataclass(frozen=True)
class BundleSwitch:
    run_id: str
    camera_id: str
    requested_ns: int
    requested_by: str
    bundle_path: str
    from_bundle: str
    to_bundle: str | None  # None: the file could not be read as a bundle
    recipe: str | None = None
    switched_ns: int | None = None  # None: refused
    refused: str | None = None  # why, when refused
    shadow: bool = False  # the camera's shadow bundle was asked for (to_bundle None with no file: shadow removed)

    @property
    def made(self) -> bool:
        return self.switched_ns is not None


class SwitchLog:
    def __init__(self, store: VerdictStore) -> None:
        self.store = store

    def record(self, switch: BundleSwitch) -> None:
        """StoreError when the store cannot take it."""
        values = asdict(switch) | {"line_id": self.store.line}
        self.store.transact(lambda conn: conn.execute(bundle_switches.insert().values(**values)), write=True)

    def recent(self, limit: int = 50, run: str | None = None, camera: str | None = None) -> list[BundleSwitch]:
        """The latest switches (of one run, one camera), newest first."""
        c = bundle_switches.c
        query = select(bundle_switches).where(self.store.mine(bundle_switches))
        query = query.order_by(c.requested_ns.desc(), c.switch_id.desc()).limit(limit)
        if run is not None:
            query = query.where(c.run_id == run)
        if camera is not None:
            query = query.where(c.camera_id == camera)
        return self.store.transact(lambda conn: [_switch(r) for r in conn.execute(query)], write=False)


def _switch(row: Any) -> BundleSwitch:
    fields = {k: v for k, v in row._mapping.items() if k not in ("switch_id", "line_id")}
    return BundleSwitch(**fields)
