"""A PostgreSQL server of the test's own (initdb in a temporary directory, run as the
``postgres`` user), which a test may stop and start again: the database going away mid-load.
And a fresh database on the machine's PostgreSQL (127.0.0.1:5432, found or started by .ci/run)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

SYSTEM_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    assert path, f"PostgreSQL's {name} is needed (Debian's postgresql package)"
    return path


def _as_postgres(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = list(args) if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


@dataclass
class PgServer:
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        _as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-w",
                     "-l", str(self.data / "server.log"), "start")  # fmt: skip

    def stop(self) -> None:
        """As if killed: no checkpoint, clients cut off."""
        _as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")


@contextlib.contextmanager
def own_postgres() -> Iterator[PgServer]:
    root = Path(tempfile.mkdtemp(prefix="ragline-pg-"))
    root.chmod(0o755)
    data = root / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    _as_postgres(_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    server = PgServer(data, free_port())
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new database on the machine's PostgreSQL, dropped afterwards."""
    import psycopg

    name = f"ragline_test_{secrets.token_hex(4)}"
    with psycopg.connect(SYSTEM_URL, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    try:
        yield SYSTEM_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(SYSTEM_URL, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
