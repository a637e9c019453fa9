"""Operators' reviews of verdicts (labels), and the users who may give them.

A label says what a person found when they looked at a part:

- `false_reject`: rejected, but the part is good;
- `confirmed_defect`: rejected, and the part is defective;
- `missed_defect`: passed, but the part is defective.

Labels are appended, never updated: a second review of the same part adds a row. The newest is the part's
current label; the earlier ones stay as the audit trail, each with its user, time and note.

Passwords are kept as scrypt hashes (RFC 7914, from hashlib) with a random salt and the cost parameters
they were made with, so a later linewatch can raise the cost without invalidating stored hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, select

from pipeline.store.schema import labels, users, verdicts
from pipeline.store.verdicts import StoredVerdict, VerdictStore

# Each label and the verdict it may be given to.
LABELS: dict[str, str] = {"false_reject": "reject", "confirmed_defect": "reject", "missed_defect": "pass"}
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # 16 MiB and ~50 ms per check: slow for a guesser, not for a login
MIN_PASSWORD = 8
MAX_NOTE = 2000
_USER = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class ReviewError(ValueError):
    """A review or user that cannot be stored; the message says which field and what was expected."""


@dataclass(frozen=True)
class Label:
    run: str
    seq: int
    label: str
    note: str
    user: str
    t_ns: int


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$SALT$HASH` (hex) of `password`."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` (hash_password's text) was made from; False for a malformed text."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        computed = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
        return hmac.compare_digest(computed, bytes.fromhex(digest))
    except ValueError:
        return False


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * n * r * p, dklen=32)


def check_user_name(name: str) -> str:
    if not _USER.fullmatch(name):
        raise ReviewError(f"user name {name!r}: expected 1-64 letters, digits, '_', '.', '@' or '-'")
    return name


class Reviews:
    """Users and labels in a verdict store."""

    def __init__(self, store: VerdictStore) -> None:
        self.store = store

    def set_user(self, name: str, password: str, now_ns: int) -> bool:
        """Add a user, or give an existing one a new password; True when the user is new."""
        check_user_name(name)
        if len(password) < MIN_PASSWORD:
            raise ReviewError(f"password of {name}: expected at least {MIN_PASSWORD} characters")
        hashed = hash_password(password)

        def work(conn: Any) -> bool:
            found = conn.execute(select(users.c.name).where(users.c.name == name)).first()
            if found is None:
                conn.execute(users.insert().values(name=name, password_hash=hashed, created_ns=now_ns))
                return True
            conn.execute(users.update().where(users.c.name == name).values(password_hash=hashed))
            return False

        return bool(self.store.transact(work, write=True))

    def authenticate(self, name: str, password: str) -> bool:
        """Whether `name` is a user and `password` is theirs (the hash is computed either way, so the time taken
        does not tell a guesser which names exist)."""
        query = select(users.c.password_hash).where(users.c.name == name)
        stored = self.store.transact(lambda conn: conn.execute(query).scalar(), write=False)
        ok = verify_password(password, stored or hash_password("", b"\0" * 16))
        return stored is not None and ok

    def user_names(self) -> list[str]:
        query = select(users.c.name).order_by(users.c.name)
        return list(self.store.transact(lambda conn: conn.execute(query).scalars().all(), write=False))

    def add_label(self, run: str, seq: int, label: str, note: str, user: str, now_ns: int) -> Label:
        """Append a review of the verdict (run, seq); ReviewError for an unknown verdict or label, or a label
        that does not fit the verdict (a pass cannot be a false reject)."""
        if label not in LABELS:
            raise ReviewError(f"label {label!r}: expected one of {', '.join(LABELS)}")
        if len(note) > MAX_NOTE:
            raise ReviewError(f"note: expected at most {MAX_NOTE} characters, got {len(note)}")
        found = self.store.range(run, seq, seq)
        if not found:
            raise ReviewError(f"verdict {run}/{seq}: not in the store")
        verdict = found[0].verdict.verdict
        if LABELS[label] != verdict:
            raise ReviewError(f"label {label}: applies to a {LABELS[label]}, and {run}/{seq} is a {verdict}")
        row = Label(run, seq, label, note.strip(), check_user_name(user), now_ns)
        values = {"run_id": run, "seq": seq, "label": label, "note": row.note, "user_name": user, "t_ns": now_ns}
        self.store.transact(lambda conn: conn.execute(labels.insert().values(**values)), write=True)
        return row

    def labels_of(self, run: str, seq: int) -> list[Label]:
        """Every review of (run, seq), oldest first: the last is the current label."""
        c = labels.c
        query = select(labels).where(c.run_id == run, c.seq == seq).order_by(c.label_id)
        return self.store.transact(lambda conn: [_label(r) for r in conn.execute(query)], write=False)

    def labelled(self, label: str, since_ns: int | None = None, until_ns: int | None = None) -> list[StoredVerdict]:
        """The verdicts decided in [since_ns, until_ns) whose current label is `label`, oldest first."""
        if label not in LABELS:
            raise ReviewError(f"label {label!r}: expected one of {', '.join(LABELS)}")
        c, v = labels.c, verdicts.c
        mine = and_(v.run_id == c.run_id, v.seq == c.seq, self.store.mine())  # this line's verdicts
        query = select(c.run_id, c.seq, c.label).where(exists().where(mine)).order_by(c.label_id)
        current: dict[tuple[str, int], str] = {}
        for run, seq, name in self.store.transact(lambda conn: conn.execute(query).all(), write=False):
            current[(run, seq)] = name
        keys = [k for k, name in current.items() if name == label]
        found = [v for run, seq in keys for v in self.store.range(run, seq, seq)]
        lo, hi = since_ns if since_ns is not None else -(2**63), until_ns if until_ns is not None else 2**63
        found = [v for v in found if lo <= v.verdict.t_decision_ns < hi]
        return sorted(found, key=StoredVerdict.decision_order)


def _label(row: Any) -> Label:
    return Label(row.run_id, row.seq, row.label, row.note, row.user_name, row.t_ns)
