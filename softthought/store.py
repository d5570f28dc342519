"""Preference summaries per user in SQLite (WAL), versioned: every update bumps the user's version, and a version
is never given twice to one user id, deletes included (so `preference_version` names one summary)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS preferences (
    user TEXT PRIMARY KEY,
    summary TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS retired_versions (
    user TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Preference:
    user: str
    summary: str
    version: int
    updated_at: float

    def to_dict(self) -> dict:
        return asdict(self)


class PreferenceStore:
    """One short-lived connection per call, so the store is safe to use from any thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)  # autocommit
        try:
            db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            yield db
        finally:
            db.close()

    def put(self, user: str, summary: str) -> Preference:
        now = time.time()
        with self._connect() as db:
            row = db.execute(
                "INSERT INTO preferences (user, summary, version, updated_at) VALUES "
                "(?, ?, 1 + COALESCE((SELECT version FROM retired_versions WHERE user = ?), 0), ?) "
                "ON CONFLICT(user) DO UPDATE SET summary = excluded.summary, version = version + 1, "
                "updated_at = excluded.updated_at RETURNING version",
                (user, summary, user, now),
            ).fetchone()
        return Preference(user, summary, row[0], now)

    def get(self, user: str) -> Preference | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT user, summary, version, updated_at FROM preferences WHERE user = ?", (user,)
            ).fetchone()
        return Preference(*row) if row else None

    def delete(self, user: str) -> bool:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:  # the deleted version is remembered, so that the user's next summary gets a later one
                db.execute("INSERT INTO retired_versions (user, version) SELECT user, version FROM preferences "
                           "WHERE user = ? ON CONFLICT(user) DO UPDATE SET version = excluded.version", (user,))
                deleted = db.execute("DELETE FROM preferences WHERE user = ?", (user,)).rowcount > 0
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return deleted
