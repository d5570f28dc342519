"""The store's interface and the SQL both backends share (SQLite and PostgreSQL accept the same statements here;
placeholders are written `?` and translated by the PostgreSQL backend)."""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

DEFAULT_TENANT = "default"  # the tenant of a server without keys, and of summaries stored before tenants existed

Run = Callable[[str, tuple], list[tuple]]  # execute one statement, return its rows


@dataclass(frozen=True)
class Preference:
    user: str
    summary: str
    version: int
    updated_at: float

    def to_dict(self) -> dict:
        return asdict(self)


def counter_key(tenant: str, user: str) -> str:
    """The version counter's key: a hash, so that a forgotten user leaves no readable id behind (ids and tenant names
    hold no control characters, so the separator keeps pairs apart)."""
    return hashlib.sha256(f"{tenant}\x00{user}".encode()).hexdigest()


_SCHEMA_VERSION_TABLE = "CREATE TABLE schema_version (version INTEGER NOT NULL)"
_TABLES = (  # the latest schema's data tables
    """CREATE TABLE preferences (
        tenant TEXT NOT NULL,
        user_id TEXT NOT NULL,
        summary TEXT NOT NULL,
        version BIGINT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, user_id)
    )""",
    "CREATE TABLE version_counters (user_key TEXT PRIMARY KEY, version BIGINT NOT NULL)",
)
SCHEMA_VERSION = 2


def _migrate_1_to_2(run: Run) -> None:
    """The first release's tables (one namespace of users, deleted versions in retired_versions) into tenants: every
    summary goes to the default tenant, and each user's counter starts after the highest version it ever had."""
    rows = run('SELECT "user", summary, version, updated_at FROM preferences', ())
    retired = dict(run('SELECT "user", version FROM retired_versions', ()))
    run("ALTER TABLE preferences RENAME TO preferences_v1", ())
    for statement in _TABLES:
        run(statement, ())
    for user, summary, version, updated_at in rows:
        run("INSERT INTO preferences VALUES (?, ?, ?, ?, ?)", (DEFAULT_TENANT, user, summary, version, updated_at))
    highest = {**retired, **{u: max(v, retired.get(u, 0)) for u, _, v, _ in rows}}
    for user, version in highest.items():
        run("INSERT INTO version_counters VALUES (?, ?)", (counter_key(DEFAULT_TENANT, user), version))
    run("DROP TABLE preferences_v1", ())
    run("DROP TABLE retired_versions", ())


MIGRATIONS = {2: _migrate_1_to_2}  # to version N from N - 1


class PreferenceStore(ABC):
    """Thread-safe: every call runs in its own transaction on a connection of its own."""

    @abstractmethod
    def _transaction(self, write: bool = True) -> AbstractContextManager[Run]:
        """A transaction; a write one serializes with every other writer of the same rows."""

    @abstractmethod
    def _tables(self, run: Run) -> set[str]:
        """Names of the tables that exist."""

    def _lock_schema(self, run: Run) -> None:  # noqa: B027 - SQLite's write transaction already excludes the others
        """Keep other processes from migrating until this transaction ends."""

    def close(self) -> None:  # noqa: B027 - backends with a pool close it
        pass

    # -------------------------------------------------------------------------- schema
    def _migrate(self) -> None:
        with self._transaction() as run:
            self._lock_schema(run)
            tables = self._tables(run)
            if "schema_version" in tables:
                version = run("SELECT version FROM schema_version", ())[0][0]
            elif "preferences" in tables:
                version = 1  # the first release kept no schema version
                run(_SCHEMA_VERSION_TABLE, ())
                run("INSERT INTO schema_version VALUES (1)", ())
            else:
                for statement in (_SCHEMA_VERSION_TABLE, *_TABLES):
                    run(statement, ())
                run("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                return
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"the preference store has schema version {version}; this release knows up to "
                                   f"{SCHEMA_VERSION}: upgrade softthought")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[target](run)
                run("UPDATE schema_version SET version = ?", (target,))

    def schema_version(self) -> int:
        with self._transaction(write=False) as run:
            return run("SELECT version FROM schema_version", ())[0][0]

    # -------------------------------------------------------------------------- preferences
    def put(self, tenant: str, user: str, summary: str) -> Preference:
        now = time.time()
        with self._transaction() as run:
            # the counter row is the lock: concurrent writers of one user take their versions one after the other
            version = run("INSERT INTO version_counters (user_key, version) VALUES (?, 1) ON CONFLICT (user_key) "
                          "DO UPDATE SET version = version_counters.version + 1 RETURNING version",
                          (counter_key(tenant, user),))[0][0]
            run("INSERT INTO preferences (tenant, user_id, summary, version, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (tenant, user_id) DO UPDATE SET summary = excluded.summary, version = excluded.version, "
                "updated_at = excluded.updated_at", (tenant, user, summary, version, now))
        return Preference(user, summary, version, now)

    def get(self, tenant: str, user: str) -> Preference | None:
        with self._transaction(write=False) as run:
            rows = run("SELECT user_id, summary, version, updated_at FROM preferences WHERE tenant = ? AND user_id = ?",
                       (tenant, user))
        return Preference(*rows[0]) if rows else None

    def delete(self, tenant: str, user: str) -> bool:
        """Remove the user's summary. The version counter (a hash, no text) stays, so the next summary gets a later
        version."""
        with self._transaction() as run:
            return bool(run("DELETE FROM preferences WHERE tenant = ? AND user_id = ? RETURNING 1", (tenant, user)))
