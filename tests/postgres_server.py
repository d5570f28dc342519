"""A throwaway PostgreSQL server for the tests: initdb into a temporary directory, listening on 127.0.0.1.

PostgreSQL refuses to run as root, so as root (CI) it runs as the `postgres` system user, in a directory that user
owns. Debian's package keeps initdb and pg_ctl in /usr/lib/postgresql/VERSION/bin, off the PATH."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} was not found: install the postgresql package (make install does)")
    return found


class PostgresServer:
    def __init__(self, port: int, durable: bool = False) -> None:
        self.port, self.durable = port, durable  # not durable: no fsync, as fits a server thrown away after the tests
        self.root = Path(tempfile.mkdtemp(prefix="softthought-pg-"))
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://softthought@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, cwd=self.root)

    def start(self) -> PostgresServer:
        t0 = time.perf_counter()
        data = self.root / "data"
        self._run(_binary("initdb"), "-D", str(data), "-U", "softthought", "-A", "trust", "--no-sync", "-E", "UTF8")
        self._run(_binary("pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"), "-w", "start", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
                  + ("" if self.durable else " -c fsync=off"))
        self.startup_s = time.perf_counter() - t0
        return self

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        self._run(_binary("pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
