"""The verdict store: every published verdict and every run, in SQLite (embedded) or PostgreSQL.

One engine from a URL (`sqlite:///PATH` or `postgresql+psycopg://...`), SQLAlchemy Core, one
transaction per batch. A verdict is stored exactly once per (run, seq): writing a batch again, as a
restarted recorder does with what it had in hand, inserts only the rows that are new. The rows hold
the wire message's fields, so a missed stretch is replayed as the very messages that were published.
SQLite runs in WAL mode: readers (history, replay) never block the writer, and a killed writer loses
at most its open transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from pipeline.store.schema import REQUIRED_TABLES, SCHEMA_VERSION, metadata, runs, store_meta, verdicts
from pipeline.wire import Verdict, encode


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
        }

    @classmethod
    def from_row(cls, row: Any) -> StoredVerdict:
        verdict = Verdict(**{f.name: getattr(row, f.name) for f in fields(Verdict)})
        return cls(row.run_id, row.seq, row.topic_seq, verdict, row.bundle, row.image_key)


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path)}"


class VerdictStore:
    """Open (creating when new) a store; refuse a foreign, corrupt or newer one in one line."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = _where(url)
        try:
            self.engine = _engine(url)
            self._prepare()
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.where}: cannot open the verdict store ({_reason(exc)})") from None

    def _prepare(self) -> None:
        tables = set(inspect(self.engine).get_table_names())
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
        if version is None or not version.isdigit() or int(version) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.where}: verdict store schema version {version!r} is not supported by this linewatch "
                f"(supports <= {SCHEMA_VERSION}); upgrade linewatch"
            )

    def start_run(self, run: str, bundle_hash: str, bundle_path: str, config: dict[str, Any], started_ns: int) -> None:
        row = {
            "run_id": run,
            "started_ns": started_ns,
            "bundle_hash": bundle_hash,
            "bundle_path": bundle_path,
            "config_json": json.dumps(config, sort_keys=True),
        }
        self._write(lambda conn: conn.execute(self._insert_new(runs, ["run_id"]), [row]))

    def stop_run(self, run: str, stopped_ns: int) -> None:
        statement = runs.update().where(runs.c.run_id == run).values(stopped_ns=stopped_ns)
        self._write(lambda conn: conn.execute(statement))

    def write(self, batch: Sequence[StoredVerdict]) -> int:
        """Store a batch in one transaction; returns how many rows were new (repeats are skipped)."""
        if not batch:
            return 0
        # RETURNING lists the rows actually inserted (rowcount of a batch is not reported by every driver).
        statement = self._insert_new(verdicts, ["run_id", "seq"]).returning(verdicts.c.seq)
        return len(self._write(lambda conn: conn.execute(statement, [v.row() for v in batch]).all()))

    def range(self, run: str, from_seq: int, to_seq: int) -> list[StoredVerdict]:
        """The stored verdicts of `run` with from_seq <= seq <= to_seq, in seq order."""
        c = verdicts.c
        query = select(verdicts).where(c.run_id == run, c.seq >= from_seq, c.seq <= to_seq).order_by(c.seq)
        return self._read(lambda conn: [StoredVerdict.from_row(r) for r in conn.execute(query)])

    def count(self, run: str) -> int:
        query = select(func.count()).select_from(verdicts).where(verdicts.c.run_id == run)
        return int(self._read(lambda conn: conn.execute(query).scalar_one()))

    def run_record(self, run: str) -> dict[str, Any] | None:
        row = self._read(lambda conn: conn.execute(select(runs).where(runs.c.run_id == run)).mappings().first())
        return None if row is None else dict(row)

    def close(self) -> None:
        self.engine.dispose()

    def _insert_new(self, table: Any, keys: list[str]) -> Any:
        """INSERT that skips rows whose key is already stored, in the engine's dialect."""
        dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(self.engine.dialect.name)
        if dialect is None:
            raise StoreError(f"{self.where}: {self.engine.dialect.name} is not supported (SQLite or PostgreSQL)")
        return dialect.insert(table).on_conflict_do_nothing(index_elements=keys)

    def _read(self, work: Any) -> Any:
        return self._transact(work, write=False)

    def _write(self, work: Any) -> Any:
        return self._transact(work, write=True)

    def _transact(self, work: Any, write: bool) -> Any:
        """Run `work(connection)`; a write in one transaction. Driver errors become one-line StoreErrors."""
        try:
            with self.engine.begin() if write else self.engine.connect() as conn:
                return work(conn)
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.where}: {'write' if write else 'read'} failed ({_reason(exc)})") from None


def _engine(url: str) -> Engine:
    engine = create_engine(url)
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


def _where(url: str) -> str:
    """The store as a message names it: the file for SQLite, the URL without its password otherwise."""
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///")
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return "store.url"


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's own words, on one line (SQLAlchemy appends the statement and a link)."""
    original = getattr(exc, "orig", None) or exc
    return " ".join(str(original).split())
