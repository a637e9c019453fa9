"""The verdict store's tables, declared once (SQLAlchemy Core), and the schema version they make.

One row per published verdict, keyed by (run_id, seq): the same message can be written twice (a recorder restarted after
writing but before acknowledging) and is stored once. One row per run with the bundle and the configuration
that ran. Times are integer nanoseconds since the epoch, as on the wire. A row outlives its images: when the
archive deletes them, `image_expired_ns` says when, and the row stays. Operators' reviews go to `labels`, one
row per review and never updated, so a later label adds to the audit trail instead of overwriting it; `users`
holds who may review, with a password hash (`pipeline.store.reviews`). `bundle_switches` records every product
changeover (and shadow bundle) asked of a run, made or refused (`pipeline.store.switches`); a verdict's
`shadow_*` columns hold the verdict of the camera's shadow bundle on the same frame, when it had one.
`selftests` holds each golden-sample self-test's outcome (`pipeline.selftest`). Every row of runs, verdicts,
bundle_switches and selftests carries `line_id` (store.line), so one database can hold a plant's lines; a box
reads only its own line's rows.
`store_meta` holds the schema version, so a store made by this version is recognised, upgraded by a later one
(`pipeline.store.migrations`), and refused by an older one.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Double, Index, Integer, MetaData, String, Table, Text

SCHEMA_VERSION = 5  # the last step in pipeline.store.migrations reaches it

metadata = MetaData()

store_meta = Table(
    "store_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("started_ns", BigInteger, nullable=False),
    Column("stopped_ns", BigInteger),  # null while running, or when the run was killed
    Column("bundle_hash", String(64), nullable=False),
    Column("bundle_path", Text, nullable=False),
    Column("config_json", Text, nullable=False),  # the runtime settings that ran, as JSON
    Column("line_id", String(64), nullable=False, server_default=""),
)

verdicts = Table(
    "verdicts",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("topic_seq", BigInteger, nullable=False),
    Column("camera_id", String(128), nullable=False),
    Column("frame_id", BigInteger, nullable=False),
    Column("trigger", BigInteger),
    Column("t_capture_ns", BigInteger, nullable=False),
    Column("t_decision_ns", BigInteger, nullable=False),
    Column("score", Double),  # null for an error verdict
    Column("threshold", Double, nullable=False),
    Column("verdict", String(16), nullable=False),
    Column("bundle", String(64), nullable=False),
    Column("image_key", Text),  # archived frame and overlay, when kept
    Column("image_expired_ns", BigInteger),  # when the archive deleted them; null while they are kept
    Column("shadow_bundle", String(64)),  # the camera's shadow bundle, when one scored the frame (never published)
    Column("shadow_score", Double),
    Column("shadow_verdict", String(16)),
    Column("line_id", String(64), nullable=False, server_default=""),
    Index("ix_verdicts_time", "t_decision_ns"),
    Index("ix_verdicts_camera_time", "camera_id", "t_decision_ns"),
    Index("ix_verdicts_verdict_time", "verdict", "t_decision_ns"),
    Index("ix_verdicts_line_time", "line_id", "t_decision_ns"),
)

users = Table(
    "users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("password_hash", Text, nullable=False),  # scrypt, with its parameters and salt (reviews.hash_password)
    Column("created_ns", BigInteger, nullable=False),
)

labels = Table(
    "labels",
    metadata,
    Column("label_id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("label", String(32), nullable=False),  # reviews.LABELS
    Column("note", Text, nullable=False),
    Column("user_name", String(64), nullable=False),
    Column("t_ns", BigInteger, nullable=False),
    Index("ix_labels_verdict", "run_id", "seq"),
    Index("ix_labels_label_time", "label", "t_ns"),
)

bundle_switches = Table(
    "bundle_switches",
    metadata,
    Column("switch_id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("camera_id", String(128), nullable=False),
    Column("requested_ns", BigInteger, nullable=False),
    Column("requested_by", String(128), nullable=False),
    Column("recipe", String(128)),  # the recipe asked for, when one was
    Column("bundle_path", Text, nullable=False),
    Column("from_bundle", String(64), nullable=False),
    Column("to_bundle", String(64)),  # null when the file could not be read as a bundle
    Column("switched_ns", BigInteger),  # when the camera's next frame went to the new bundle; null: refused
    Column("refused", Text),  # why the switch was refused; null when it was made
    Column("shadow", Boolean, nullable=False),  # the camera's shadow bundle was asked for, not its live one
    Column("line_id", String(64), nullable=False, server_default=""),
    Index("ix_bundle_switches_time", "requested_ns"),
)

selftests = Table(
    "selftests",
    metadata,
    Column("selftest_id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("t_ns", BigInteger, nullable=False),
    Column("bundle", String(64), nullable=False),
    Column("bundle_path", Text, nullable=False),
    Column("why", String(32), nullable=False),  # start | changeover | on demand | scheduled
    Column("frames", Integer, nullable=False),
    Column("passed", Boolean, nullable=False),
    Column("failures", Text, nullable=False),  # one line per failed frame
    Column("line_id", String(64), nullable=False, server_default=""),
    Index("ix_selftests_time", "t_ns"),
)

# Tables every linewatch store has, whatever its version: a database without them is not a store.
REQUIRED_TABLES = frozenset({"store_meta", "runs", "verdicts"})
