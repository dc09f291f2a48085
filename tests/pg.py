"""A PostgreSQL for tests: FLOTILLA_TEST_PG_URL, else a private cluster from Debian's
postgresql binaries (initdb/pg_ctl under a temp dir, loopback port, always torn down).

The server refuses to run as root, so as root the cluster belongs to the `postgres` system user
(created by the Debian package) and the commands run through `runuser`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from services.broker import free_port


def _bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "no PostgreSQL binaries: `apt-get install -y postgresql` or set FLOTILLA_TEST_PG_URL"
        )
    return found[-1].parent


def _as_owner(argv: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else argv


@contextlib.contextmanager
def private_cluster() -> Iterator[str]:
    """Yield the URL of a fresh cluster's `postgres` database; stop and delete it after."""
    bindir = _bindir()
    user = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="flotilla-pg-"))
    data = base / "data"
    port = free_port()
    if user:
        shutil.chown(base, user)
    started = False
    try:
        subprocess.run(
            _as_owner(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "flotilla",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                user,
            ),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            _as_owner(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(base / "server.log"),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    (
                        f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off "
                        "-c synchronous_commit=off -c full_page_writes=off"
                    ),
                    "start",
                ],
                user,
            ),
            check=True,
            capture_output=True,
        )
        started = True
        yield f"postgresql://flotilla@127.0.0.1:{port}/postgres"
    except subprocess.CalledProcessError as exc:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        raise RuntimeError(
            f"private PostgreSQL failed: {exc.stderr.decode(errors='replace')}\n{log}"
        ) from None
    finally:
        if started:
            subprocess.run(
                _as_owner(
                    [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], user
                ),
                check=False,
                capture_output=True,
            )
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    url = os.environ.get("FLOTILLA_TEST_PG_URL")
    if url:
        yield url
        return
    with private_cluster() as found:
        yield found


@contextlib.contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A new, empty database on `server` for one test; dropped after."""
    name = f"flotilla_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(server, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
