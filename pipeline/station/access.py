"""Who may see and do what on the operator page, and the guards that enforce it.

- Bound to a loopback address (127.0.0.1, ::1, localhost) the page is readable without a login: only
  people on the box reach it. Bound anywhere else, every page needs a login.
- Reviewing (a label on a verdict) always needs a logged-in user; users live in the store
  (`linewatch user add`), with scrypt password hashes.
- The session is a signed cookie (Starlette's SessionMiddleware), its key kept in the data folder so that
  logins survive a restart of the page. Every POST carries the session's CSRF token in a form field, and
  the cookie is SameSite=strict.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from starlette.requests import Request

SECRET_FILE = "station-secret"
SESSION_COOKIE = "linewatch_session"


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the page on this box."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def session_secret(folder: Path) -> str:
    """The key that signs session cookies, made once per data folder (readable by its owner only)."""
    path = folder / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key)
    return key


def user_of(request: Request) -> str | None:
    user = request.session.get("user")
    return str(user) if user else None


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use."""
    token = request.session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(24)
        request.session["csrf"] = token
    return str(token)


def csrf_ok(request: Request, sent: object) -> bool:
    expected = request.session.get("csrf")
    return bool(expected) and isinstance(sent, str) and hmac.compare_digest(str(expected), sent)


def log_in(request: Request, user: str) -> None:
    """A fresh session for `user` (a new CSRF token too, so one seen before the login is worth nothing)."""
    request.session.clear()
    request.session["user"] = user
    csrf_token(request)


def local_path(target: str | None, default: str = "/") -> str:
    """`target` when it is a path on this site, else `default` (no redirect to another host after a login)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default
