"""The OPC UA gateway's logins: a file of `name:pbkdf2_sha256$iterations$salt$hash` lines (no plain passwords
on the box), written with `linewatch-plc add-user`."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

ITERATIONS = 310_000  # OWASP's figure for PBKDF2-HMAC-SHA256
SCHEME = "pbkdf2_sha256"
STORED = re.compile(rf"^{SCHEME}\$[0-9]{{4,8}}\$[0-9a-f]+\$[0-9a-f]{{64}}$")  # 1,000 to 99,999,999 iterations


def hash_password(password: str, iterations: int = ITERATIONS) -> str:
    salt = secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), iterations).hex()
    return f"{SCHEME}${iterations}${salt}${digest}"


def verify_password(password: str, stored: str) -> bool:
    """False for a wrong password, and for anything but a stored hash of this scheme."""
    if not STORED.match(stored) or len(stored.split("$")[2]) % 2:
        return False
    _, iterations, salt, digest = stored.split("$")
    got = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations)).hex()
    return hmac.compare_digest(got, digest)


def load_users(path: Path) -> dict[str, str]:
    """name -> stored hash; ValueError naming the file and line for anything else."""
    users: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, stored = line.strip().partition(":")
        if not name or not STORED.match(stored) or len(stored.split("$")[2]) % 2:
            raise ValueError(f"{path}:{number}: expected NAME:{SCHEME}$ITERATIONS$SALT$HASH (linewatch-plc add-user)")
        users[name] = stored
    if not users:
        raise ValueError(f"{path}: no user in it (linewatch-plc add-user)")
    return users


def add_user(path: Path, name: str, password: str) -> None:
    """Add `name`, or replace its password; other lines are kept."""
    if not name or ":" in name or name != name.strip():
        raise ValueError(f"user name {name!r}: expected a name without ':' or surrounding spaces")
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line.partition(":")[0].strip() != name]
    text = "\n".join([*kept, f"{name}:{hash_password(password)}"]) + "\n"
    part = path.with_name(f".{path.name}.part")  # made owner-only before a byte is written, then renamed
    part.unlink(missing_ok=True)  # a leftover (or a link planted there) is not written through
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    part.replace(path)
