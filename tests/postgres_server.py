"""A throwaway PostgreSQL server for the store tests: Debian's own binaries, a cluster in a temp dir.

Nothing is mocked: `initdb` makes a cluster, `pg_ctl` starts it on a free loopback port, and it is
stopped and deleted after the session. As root the server runs as the `postgres` user, as it must.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.app.ports import free_port


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL server's bin folder, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


class PostgresServer:
    """A cluster of its own (user `linewatch`, trust auth); `stop()` and `start()` again, as an outage would."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="linewatch-pg-"))
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.data, self.port = self.root / "data", free_port()
        self.url = f"postgresql+psycopg://linewatch@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "linewatch", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_postgres, str(self.bin_dir / tool), *args], check=True, capture_output=True, timeout=120
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        """Stop at once, as a crash or a lost host would (connections are cut, nothing is flushed politely)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[str]:
    """Start a cluster; yields its SQLAlchemy URL (user `linewatch`, trust auth, database `postgres`)."""
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server.url
    finally:
        server.remove()


def new_database(server_url: str, prefix: str) -> str:
    """The URL of a new, empty database on the server at `server_url`."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)
