"""Schema migrations: the ordered steps that bring an older verdict store up to `SCHEMA_VERSION`.

Each step names the version it reaches, says what it changes and changes it through a connection.
`VerdictStore` applies the steps a store lacks when it opens it, each in its own transaction together
with the new `store_meta.schema_version`, so an interrupted upgrade leaves the store at the last
version it fully reached, and the next open carries on from there. Steps add to the schema and never
rewrite rows, and they run on SQLite and PostgreSQL alike.

A step first claims its version: it moves `schema_version` from the version before to its own, and
only the process whose claim changed the row applies the change. The claim takes the write lock
(SQLite) or the row's lock (PostgreSQL), so two processes opening the same old store never both
apply a step. It is also the transaction's first statement on purpose: Python's sqlite3 driver opens
a transaction on the first data change, not on DDL, so the ALTER TABLE after it is inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.schema import CreateColumn

from pipeline.store.schema import SCHEMA_VERSION, store_meta


@dataclass(frozen=True)
class Migration:
    """One step: the schema version it reaches, what it changes, and the change."""

    to_version: int
    description: str
    change: Callable[[Connection], None]


def add_column(table: str, column: Column[Any]) -> Callable[[Connection], None]:
    """A change adding a column (nullable, or with a server default), typed in the connection's dialect."""

    def change(conn: Connection) -> None:
        definition = CreateColumn(column).compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {definition}"))

    return change


def create_review_tables(conn: Connection) -> None:
    """Step 3: the `users` and `labels` tables and the verdicts' (verdict, time) index, as they were added."""
    added = MetaData()
    Table(
        "users",
        added,
        Column("name", String(64), primary_key=True),
        Column("password_hash", Text, nullable=False),
        Column("created_ns", BigInteger, nullable=False),
    )
    Table(
        "labels",
        added,
        Column("label_id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", String(64), nullable=False),
        Column("seq", BigInteger, nullable=False),
        Column("label", String(32), nullable=False),
        Column("note", Text, nullable=False),
        Column("user_name", String(64), nullable=False),
        Column("t_ns", BigInteger, nullable=False),
        Index("ix_labels_verdict", "run_id", "seq"),
        Index("ix_labels_label_time", "label", "t_ns"),
    )
    added.create_all(conn)
    conn.execute(text("CREATE INDEX ix_verdicts_verdict_time ON verdicts (verdict, t_decision_ns)"))


def add_bundle_changes(conn: Connection) -> None:
    """Step 4: the `bundle_switches` and `selftests` tables and the verdicts' shadow columns, as they were added."""
    shadow = (Column("shadow_bundle", String(64)), Column("shadow_score", Double), Column("shadow_verdict", String(16)))
    for column in shadow:
        add_column("verdicts", column)(conn)
    added = MetaData()
    Table(
        "bundle_switches",
        added,
        Column("switch_id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", String(64), nullable=False),
        Column("camera_id", String(128), nullable=False),
        Column("requested_ns", BigInteger, nullable=False),
        Column("requested_by", String(128), nullable=False),
        Column("recipe", String(128)),
        Column("bundle_path", Text, nullable=False),
        Column("from_bundle", String(64), nullable=False),
        Column("to_bundle", String(64)),
        Column("switched_ns", BigInteger),
        Column("refused", Text),
        Column("shadow", Boolean, nullable=False),
        Index("ix_bundle_switches_time", "requested_ns"),
    )
    Table(
        "selftests",
        added,
        Column("selftest_id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", String(64), nullable=False),
        Column("t_ns", BigInteger, nullable=False),
        Column("bundle", String(64), nullable=False),
        Column("bundle_path", Text, nullable=False),
        Column("why", String(32), nullable=False),
        Column("frames", Integer, nullable=False),
        Column("passed", Boolean, nullable=False),
        Column("failures", Text, nullable=False),
        Index("ix_selftests_time", "t_ns"),
    )
    added.create_all(conn)


def add_line_ids(conn: Connection) -> None:
    """Step 5: `line_id` on runs, verdicts, bundle_switches and selftests (rows already there: the empty line),
    and an index on the verdicts' (line_id, t_decision_ns)."""
    for table in ("runs", "verdicts", "bundle_switches", "selftests"):
        add_column(table, Column("line_id", String(64), nullable=False, server_default=""))(conn)
    added = MetaData()
    table = Table("verdicts", added, Column("line_id", String(64)), Column("t_decision_ns", BigInteger))
    Index("ix_verdicts_line_time", table.c.line_id, table.c.t_decision_ns).create(conn)


# The columns and tables are declared here as they were added, apart from schema.py: a later change there must not
# rewrite what a step did to stores already upgraded.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        2,
        "verdicts.image_expired_ns: when the image archive deleted a row's frame and overlay",
        add_column("verdicts", Column("image_expired_ns", BigInteger)),
    ),
    Migration(
        3,
        "users and labels: operators' reviews of verdicts, with who and when; an index on (verdict, time)",
        create_review_tables,
    ),
    Migration(
        4,
        "bundle_switches: every product changeover and shadow bundle asked of a run (who, when, from, to), made or "
        "refused; verdicts.shadow_*: the shadow bundle's verdict on the same frame; selftests: golden-sample "
        "self-test outcomes",
        add_bundle_changes,
    ),
    Migration(
        5,
        "line_id on runs, verdicts, bundle_switches and selftests: one database can hold a plant's lines",
        add_line_ids,
    ),
)


def pending(version: int, steps: Sequence[Migration] = MIGRATIONS) -> list[Migration]:
    """The steps a store at `version` lacks, in order."""
    return [step for step in steps if step.to_version > version]


def check_steps(steps: Sequence[Migration] = MIGRATIONS, first: int = 1, last: int = SCHEMA_VERSION) -> None:
    """ValueError unless the steps go one version at a time from `first` to `last`."""
    reached = [step.to_version for step in steps]
    if reached != list(range(first + 1, last + 1)):
        raise ValueError(f"migration steps reach versions {reached}; expected {list(range(first + 1, last + 1))}")


def apply_step(engine: Engine, step: Migration) -> bool:
    """Apply one step in one transaction; False when another process had already applied it."""
    claim = (
        store_meta.update()
        .where(store_meta.c.key == "schema_version", store_meta.c.value == str(step.to_version - 1))
        .values(value=str(step.to_version))
    )
    with engine.begin() as conn:
        if conn.execute(claim).rowcount != 1:
            return False
        step.change(conn)
    return True
