"""The verdict store: every published verdict and every run, in SQLite (embedded) or PostgreSQL.

One engine from a URL (`sqlite:///PATH` or `postgresql+psycopg://...`), SQLAlchemy Core, one
transaction per batch. A verdict is stored exactly once per (run, seq): writing a batch again, as a
restarted recorder does with what it had in hand, inserts only the rows that are new. The rows hold
the wire message's fields, so a missed stretch is replayed as the very messages that were published.
A store of an older schema version is upgraded when it is opened (`pipeline.store.migrations`).
SQLite runs in WAL mode: readers (history, replay) never block the writer, and a killed writer loses
at most its open transaction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Engine, Table, create_engine, event, func, inspect, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from linewatch_plc.wire import Verdict, encode
from pipeline.shadow import ShadowVerdict
from pipeline.store.keys import key_row
from pipeline.store.migrations import apply_step, pending
from pipeline.store.schema import REQUIRED_TABLES, SCHEMA_VERSION, metadata, runs, store_meta, verdicts

EXPIRE_CHUNK = 500  # keys per UPDATE: well under SQLite's limit on bound parameters
SCHEMA_LOCK_KEY = 0x6C696E65  # the advisory lock of linewatch's schema changes on a shared PostgreSQL ("line")

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A store that cannot be opened or written; the message names it and what is wrong."""


@dataclass(frozen=True)
class StoredVerdict:
    """One published message: its sequence numbers, the verdict and the bundle that decided it."""

    run: str
    seq: int
    topic_seq: int
    verdict: Verdict
    bundle: str
    image_key: str | None = None
    image_expired_ns: int | None = None  # when the archive deleted the image; the row stays
    shadow: ShadowVerdict | None = None  # the camera's shadow bundle's verdict on the same frame, if it had one

    @property
    def images_kept(self) -> bool:
        """Whether the archive holds this verdict's frame (and overlay) now: kept, and not expired since."""
        return self.image_key is not None and self.image_expired_ns is None

    def decision_order(self) -> tuple[int, str, int]:
        """Sort key: by decision time, then (run, seq), as the store's searches order them."""
        return self.verdict.t_decision_ns, self.run, self.seq

    def message(self) -> list[bytes]:
        """The v1 wire message as it was published."""
        return encode(self.run, self.seq, self.topic_seq, self.verdict, self.bundle)

    def row(self) -> dict[str, Any]:
        """The table row: the verdict's own fields beside the message's sequence numbers and bundle."""
        return {
            "run_id": self.run,
            "seq": self.seq,
            "topic_seq": self.topic_seq,
            **vars(self.verdict),
            "bundle": self.bundle,
            "image_key": self.image_key,
            "image_expired_ns": self.image_expired_ns,
            "shadow_bundle": self.shadow.bundle if self.shadow else None,
            "shadow_score": self.shadow.score if self.shadow else None,
            "shadow_verdict": self.shadow.verdict if self.shadow else None,
        }

    @classmethod
    def from_row(cls, row: Any) -> StoredVerdict:
        verdict = Verdict(**{f.name: getattr(row, f.name) for f in fields(Verdict)})
        shadow = None
        if row.shadow_bundle is not None:
            shadow = ShadowVerdict(row.shadow_bundle, row.shadow_score, row.shadow_verdict)
        return cls(row.run_id, row.seq, row.topic_seq, verdict, row.bundle, row.image_key, row.image_expired_ns, shadow)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> StoredVerdict:
        """A published v1 body (as spooled: with `image_key` when its images were archived already, and `shadow`
        when a shadow bundle scored the frame)."""
        verdict = Verdict(**{f.name: message[f.name] for f in fields(Verdict)})
        run, seq, topic_seq = str(message["run"]), int(message["seq"]), int(message["topic_seq"])
        shadow = ShadowVerdict.from_json(message.get("shadow"))
        return cls(run, seq, topic_seq, verdict, str(message["bundle"]), message.get("image_key"), None, shadow)


@dataclass(frozen=True)
class HistoryFilter:
    """Which stored verdicts a search returns: since_ns <= t_decision_ns < until_ns, and each given field
    matched (a score bound leaves out error verdicts, which have no score). limit None: all of them."""

    since_ns: int | None = None
    until_ns: int | None = None
    camera: str | None = None
    verdict: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    run: str | None = None
    limit: int | None = 1000
    newest_first: bool = True
    offset: int = 0  # rows of the order skipped first (a page of a long history)
    disagreements: bool = False  # only frames on which the shadow bundle's verdict differs from the live one


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path)}"


class VerdictStore:
    """Open (creating when new, unless `create` is False) a store, upgrading an older one; refuse a foreign,
    corrupt or newer one in one line."""

    def __init__(self, url: str, create: bool = True, check: bool = True, line: str = "") -> None:
        """`check` False: connect at the first read or write (for a process whose parent checked the store and
        that must start even while the database is away). `line` (store.line): every row written carries it,
        and only its rows are read."""
        self.url, self.line = url, line
        self.where = _where(url)
        if len(line) > 64:
            raise StoreError(f"store.line = {line[:20]!r}...: expected at most 64 characters, got {len(line)}")
        if not create and url.startswith("sqlite:///") and not Path(self.where).is_file():
            # Checked before connecting: opening a missing SQLite file would create it.
            raise StoreError(f"{self.where}: no verdict store here (no such file)")
        try:
            self.engine = _engine(url)
            if check:
                self._prepare(create)
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.where}: cannot open the verdict store ({_reason(exc)})") from None

    def _prepare(self, create: bool) -> None:
        with self._schema_lock():
            self._prepare_locked(create)

    @contextmanager
    def _schema_lock(self) -> Iterator[None]:
        """Boxes of a plant starting together on one empty (or older) PostgreSQL take turns creating or upgrading
        the schema: a session-level advisory lock, held while it is checked and changed."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})

    def _prepare_locked(self, create: bool) -> None:
        tables = set(inspect(self.engine).get_table_names())
        if not tables and not create:
            raise StoreError(f"{self.where}: no verdict store here (the database has no tables)")
        if not tables:
            with self.engine.begin() as conn:
                metadata.create_all(conn)
                conn.execute(store_meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        missing = REQUIRED_TABLES - tables
        if missing:
            raise StoreError(
                f"{self.where}: not a linewatch verdict store (it has tables {', '.join(sorted(tables))}; "
                f"missing {', '.join(sorted(missing))})"
            )
        with self.engine.connect() as conn:
            version = conn.execute(select(store_meta.c.value).where(store_meta.c.key == "schema_version")).scalar()
        if version is None or not version.isdigit() or int(version) < 1:
            raise StoreError(f"{self.where}: verdict store schema version {version!r} is not one linewatch makes")
        if int(version) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.where}: verdict store schema version {version!r} is not supported by this linewatch "
                f"(supports <= {SCHEMA_VERSION}); upgrade linewatch"
            )
        self._upgrade(int(version))

    def _upgrade(self, version: int) -> None:
        for step in pending(version):
            try:
                applied = apply_step(self.engine, step)
            except SQLAlchemyError as exc:
                raise StoreError(
                    f"{self.where}: upgrading the verdict store to schema version {step.to_version} "
                    f"({step.description}) failed ({_reason(exc)}); it stays at version {step.to_version - 1}"
                ) from None
            if applied:
                log.info(
                    "%s: verdict store upgraded to schema version %d: %s", self.where, step.to_version, step.description
                )

    def start_run(self, run: str, bundle_hash: str, bundle_path: str, config: dict[str, Any], started_ns: int) -> None:
        row = {
            "run_id": run,
            "line_id": self.line,
            "started_ns": started_ns,
            "bundle_hash": bundle_hash,
            "bundle_path": bundle_path,
            "config_json": json.dumps(config, sort_keys=True),
        }
        self._write(lambda conn: conn.execute(self._insert_new(runs, ["run_id"]), [row]))

    def stop_run(self, run: str, stopped_ns: int) -> None:
        statement = runs.update().where(self.mine(runs), runs.c.run_id == run).values(stopped_ns=stopped_ns)
        self._write(lambda conn: conn.execute(statement))

    def write(self, batch: Sequence[StoredVerdict]) -> int:
        """Store a batch in one transaction; returns how many rows were new (repeats are skipped)."""
        if not batch:
            return 0
        # RETURNING lists the rows actually inserted (rowcount of a batch is not reported by every driver).
        statement = self._insert_new(verdicts, ["run_id", "seq"]).returning(verdicts.c.seq)
        rows = [v.row() | {"line_id": self.line} for v in batch]
        return len(self._write(lambda conn: conn.execute(statement, rows).all()))

    def range(self, run: str, from_seq: int, to_seq: int) -> list[StoredVerdict]:
        """The stored verdicts of `run` with from_seq <= seq <= to_seq, in seq order."""
        c = verdicts.c
        query = select(verdicts).where(self.mine(), c.run_id == run, c.seq >= from_seq, c.seq <= to_seq).order_by(c.seq)
        return self._read(lambda conn: [StoredVerdict.from_row(r) for r in conn.execute(query)])

    def count(self, run: str) -> int:
        query = select(func.count()).select_from(verdicts).where(self.mine(), verdicts.c.run_id == run)
        return int(self._read(lambda conn: conn.execute(query).scalar_one()))

    def run_record(self, run: str) -> dict[str, Any] | None:
        query = select(runs).where(self.mine(runs), runs.c.run_id == run)
        row = self._read(lambda conn: conn.execute(query).mappings().first())
        return None if row is None else dict(row)

    def runs_list(self) -> list[dict[str, Any]]:
        """Every run's row, the newest start first."""
        query = select(runs).where(self.mine(runs)).order_by(runs.c.started_ns.desc(), runs.c.run_id)
        return self._read(lambda conn: [dict(r) for r in conn.execute(query).mappings()])

    def search(self, f: HistoryFilter) -> list[StoredVerdict]:
        """The stored verdicts `f` selects, by decision time (newest first unless told otherwise)."""
        c = verdicts.c
        order = (
            (c.t_decision_ns.desc(), c.run_id.desc(), c.seq.desc())
            if f.newest_first
            else (c.t_decision_ns, c.run_id, c.seq)
        )
        query = (
            select(verdicts)
            .where(self.mine(), *_conditions(f))
            .order_by(*order)
            .limit(f.limit)
            .offset(f.offset or None)
        )
        return self._read(lambda conn: [StoredVerdict.from_row(r) for r in conn.execute(query)])

    def verdict_counts(self, f: HistoryFilter) -> dict[str, int]:
        """How many of the verdicts `f` selects are of each kind (pass, reject, error); its limit and order
        do not apply. Counted in the database: a day of a busy line is millions of rows."""
        c = verdicts.c
        query = select(c.verdict, func.count()).where(self.mine(), *_conditions(f)).group_by(c.verdict)
        return self._read(lambda conn: {kind: int(n) for kind, n in conn.execute(query)})

    def passes_with_images(self, since_ns: int, until_ns: int, camera: str | None = None) -> list[StoredVerdict]:
        """Passed parts decided in [since_ns, until_ns) whose frame is still archived, oldest first."""
        c = verdicts.c
        period = HistoryFilter(since_ns, until_ns, camera, verdict="pass")
        kept = (c.image_key.is_not(None), c.image_expired_ns.is_(None))
        query = (
            select(verdicts).where(self.mine(), *_conditions(period), *kept).order_by(c.t_decision_ns, c.run_id, c.seq)
        )
        return self._read(lambda conn: [StoredVerdict.from_row(r) for r in conn.execute(query)])

    def mark_expired(self, keys: Sequence[str], t_ns: int) -> int:
        """Note that the images of `keys` were deleted at t_ns; returns how many rows this changed (a row
        already marked keeps its first time). ValueError naming a key that is not an image key."""
        by_run: dict[str, dict[int, str]] = {}
        for key in keys:
            run, seq = key_row(key)
            by_run.setdefault(run, {})[seq] = key
        c = verdicts.c

        def work(conn: Any) -> int:
            changed = 0
            for run, seqs in by_run.items():
                items = sorted(seqs.items())
                for start in range(0, len(items), EXPIRE_CHUNK):
                    chunk = dict(items[start : start + EXPIRE_CHUNK])
                    # run_id = ? AND seq IN (...): a search of the primary key on SQLite and PostgreSQL (a
                    # row-value IN would scan the table on SQLite). The key must match too, so a stale
                    # key changes nothing.
                    statement = (
                        verdicts.update()
                        .where(
                            self.mine(),
                            c.run_id == run,
                            c.seq.in_(list(chunk)),
                            c.image_key.in_(list(chunk.values())),
                            c.image_expired_ns.is_(None),
                        )
                        .values(image_expired_ns=t_ns)
                        .returning(c.seq)
                    )
                    changed += len(conn.execute(statement).all())
            return changed

        return self._write(work) if by_run else 0

    def mine(self, table: Table = verdicts) -> ColumnElement[bool]:
        """The condition selecting this line's rows of `table` (a plant database holds other lines' too)."""
        return table.c.line_id == self.line

    def close(self) -> None:
        self.engine.dispose()

    def _insert_new(self, table: Any, keys: list[str]) -> Any:
        """INSERT that skips rows whose key is already stored, in the engine's dialect."""
        dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(self.engine.dialect.name)
        if dialect is None:
            raise StoreError(f"{self.where}: {self.engine.dialect.name} is not supported (SQLite or PostgreSQL)")
        return dialect.insert(table).on_conflict_do_nothing(index_elements=keys)

    def _read(self, work: Any) -> Any:
        return self.transact(work, write=False)

    def _write(self, work: Any) -> Any:
        return self.transact(work, write=True)

    def transact(self, work: Any, write: bool) -> Any:
        """Run `work(connection)`; a write in one transaction. Driver errors become one-line StoreErrors."""
        try:
            with self.engine.begin() if write else self.engine.connect() as conn:
                return work(conn)
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.where}: {'write' if write else 'read'} failed ({_reason(exc)})") from None


def _conditions(f: HistoryFilter) -> list[ColumnElement[bool]]:
    c = verdicts.c
    conditions = []
    if f.since_ns is not None:
        conditions.append(c.t_decision_ns >= f.since_ns)
    if f.until_ns is not None:
        conditions.append(c.t_decision_ns < f.until_ns)
    if f.camera is not None:
        conditions.append(c.camera_id == f.camera)
    if f.verdict is not None:
        conditions.append(c.verdict == f.verdict)
    if f.min_score is not None:
        conditions.append(c.score >= f.min_score)
    if f.max_score is not None:
        conditions.append(c.score <= f.max_score)
    if f.run is not None:
        conditions.append(c.run_id == f.run)
    if f.disagreements:
        conditions.append(c.shadow_verdict.is_not(None) & (c.shadow_verdict != c.verdict))
    return conditions


def _engine(url: str) -> Engine:
    # pre_ping: a connection that a database restart cut is replaced, not handed out to fail once.
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, _record: Any) -> None:
            # WAL: readers never block the recorder; NORMAL: a commit survives a killed process (not a
            # power cut, which would lose the last commits but never corrupt the file).
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

    return engine


def public_url(url: str) -> str:
    """`url` as it may be written down (logs, a bundle's manifest): its password, if any, hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return "store.url"


def _where(url: str) -> str:
    """The store as a message names it: the file for SQLite, the URL without its password otherwise."""
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///")
    return public_url(url)


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's own words, on one line (SQLAlchemy appends the statement and a link)."""
    original = getattr(exc, "orig", None) or exc
    return " ".join(str(original).split())
