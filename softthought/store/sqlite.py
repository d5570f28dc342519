"""The SQLite backend: one file in WAL mode, one short-lived connection per call (safe from any thread and from
several processes on one machine)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .base import PreferenceStore, Run


class SQLiteStore(PreferenceStore):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._use_wal()
        self._migrate()

    def _use_wal(self, wait_s: float = 10.0) -> None:
        # Replicas opening a fresh file together race to switch it to WAL, and SQLite answers that switch with
        # "database is locked" at once rather than through its busy handler: retry until the deadline.
        deadline = time.monotonic() + wait_s
        while True:
            db = sqlite3.connect(self.path, timeout=wait_s)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
            finally:
                db.close()
            time.sleep(0.01)

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Run]:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")  # one writer at a time: no counter is read twice
            try:
                yield lambda sql, params: db.execute(sql, params).fetchall()
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def _tables(self, run: Run) -> set[str]:
        return {r[0] for r in run("SELECT name FROM sqlite_master WHERE type = 'table'", ())}
