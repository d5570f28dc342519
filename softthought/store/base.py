"""The store's interface and the SQL both backends share (SQLite and PostgreSQL accept the same statements here;
placeholders are written `?` and translated by the PostgreSQL backend)."""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

DEFAULT_TENANT = "default"  # the tenant of a server without keys, and of summaries stored before tenants existed

Run = Callable[[str, tuple], list[tuple]]  # execute one statement, return its rows


#: Where a stored summary came from: written by the client, learned in onboarding, or revised from ratings.
SOURCES = ("put", "onboarding", "feedback")


@dataclass(frozen=True)
class Preference:
    user: str
    summary: str
    version: int
    updated_at: float
    summary_source: str = "put"
    profile: list[dict] | None = None  # the learned preferences the summary says (onboarding and feedback only)

    def to_dict(self) -> dict:
        return asdict(self)


def counter_key(tenant: str, user: str) -> str:
    """The version counter's key: a hash, so that a forgotten user leaves no readable id behind (ids and tenant names
    hold no control characters, so the separator keeps pairs apart)."""
    return hashlib.sha256(f"{tenant}\x00{user}".encode()).hexdigest()


_SCHEMA_VERSION_TABLE = "CREATE TABLE schema_version (version INTEGER NOT NULL)"
_TABLES_V2 = (  # the data tables of schema version 2; later versions are reached by their migrations
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
SCHEMA_VERSION = 3


def _migrate_1_to_2(run: Run) -> None:
    """The first release's tables (one namespace of users, deleted versions in retired_versions) into tenants: every
    summary goes to the default tenant, and each user's counter starts after the highest version it ever had."""
    rows = run('SELECT "user", summary, version, updated_at FROM preferences', ())
    retired = dict(run('SELECT "user", version FROM retired_versions', ()))
    run("ALTER TABLE preferences RENAME TO preferences_v1", ())
    for statement in _TABLES_V2:
        run(statement, ())
    for user, summary, version, updated_at in rows:
        run("INSERT INTO preferences VALUES (?, ?, ?, ?, ?)", (DEFAULT_TENANT, user, summary, version, updated_at))
    highest = {**retired, **{u: max(v, retired.get(u, 0)) for u, _, v, _ in rows}}
    for user, version in highest.items():
        run("INSERT INTO version_counters VALUES (?, ?)", (counter_key(DEFAULT_TENANT, user), version))
    run("DROP TABLE preferences_v1", ())
    run("DROP TABLE retired_versions", ())


def _migrate_2_to_3(run: Run) -> None:
    """The preference memory: where a summary came from and what it was learned as, onboarding sessions, each user's
    evidence (answers and ratings), and the completions a user may rate (kept only when the request asked to store)."""
    run("ALTER TABLE preferences ADD COLUMN summary_source TEXT NOT NULL DEFAULT 'put'", ())
    run("ALTER TABLE preferences ADD COLUMN profile TEXT", ())
    run("""CREATE TABLE onboarding_sessions (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        user_id TEXT NOT NULL,
        state TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""", ())
    run("""CREATE TABLE preference_evidence (
        tenant TEXT NOT NULL,
        user_id TEXT NOT NULL,
        evidence TEXT NOT NULL,
        PRIMARY KEY (tenant, user_id)
    )""", ())
    run("""CREATE TABLE stored_completions (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        user_id TEXT NOT NULL,
        texts TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""", ())
    run("CREATE INDEX stored_completions_user ON stored_completions (tenant, user_id, created_at)", ())


MIGRATIONS = {2: _migrate_1_to_2, 3: _migrate_2_to_3}  # to version N from N - 1


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
            else:  # a fresh store: version 2's tables, then every later migration
                for statement in (_SCHEMA_VERSION_TABLE, *_TABLES_V2):
                    run(statement, ())
                run("INSERT INTO schema_version VALUES (2)", ())
                version = 2
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
    def put(self, tenant: str, user: str, summary: str, source: str = "put", profile: list[dict] | None = None) -> Preference:
        now = time.time()
        stored_profile = None if profile is None else json.dumps(profile)
        with self._transaction() as run:
            # the counter row is the lock: concurrent writers of one user take their versions one after the other
            version = run("INSERT INTO version_counters (user_key, version) VALUES (?, 1) ON CONFLICT (user_key) "
                          "DO UPDATE SET version = version_counters.version + 1 RETURNING version",
                          (counter_key(tenant, user),))[0][0]
            run("INSERT INTO preferences (tenant, user_id, summary, version, updated_at, summary_source, profile) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, user_id) DO UPDATE SET summary = excluded.summary, "
                "version = excluded.version, updated_at = excluded.updated_at, summary_source = excluded.summary_source, "
                "profile = excluded.profile", (tenant, user, summary, version, now, source, stored_profile))
        return Preference(user, summary, version, now, source, profile)

    def get(self, tenant: str, user: str) -> Preference | None:
        with self._transaction(write=False) as run:
            rows = run("SELECT user_id, summary, version, updated_at, summary_source, profile FROM preferences "
                       "WHERE tenant = ? AND user_id = ?", (tenant, user))
        if not rows:
            return None
        *head, profile = rows[0]
        return Preference(*head, None if profile is None else json.loads(profile))

    def delete(self, tenant: str, user: str) -> bool:
        """Remove the user's summary. The version counter (a hash, no text) stays, so the next summary gets a later
        version."""
        with self._transaction() as run:
            return bool(run("DELETE FROM preferences WHERE tenant = ? AND user_id = ? RETURNING 1", (tenant, user)))

    def forget(self, tenant: str, user: str) -> bool:
        """Remove everything stored for the user (summary, onboarding sessions, evidence, stored completions); whether
        there was anything."""
        with self._transaction() as run:
            return any([bool(run(f"DELETE FROM {table} WHERE tenant = ? AND user_id = ? RETURNING 1", (tenant, user)))
                        for table in ("preferences", "onboarding_sessions", "preference_evidence", "stored_completions")])

    # -------------------------------------------------------------------------- preference memory
    def save_session(self, session: str, tenant: str, user: str, state: dict, expires_at: float) -> None:
        with self._transaction() as run:
            run("INSERT INTO onboarding_sessions (id, tenant, user_id, state, expires_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state", (session, tenant, user, json.dumps(state), expires_at))

    def load_session(self, session: str, tenant: str, user: str) -> tuple[dict, float] | None:
        """The session's state and expiry, if it exists for this tenant's user."""
        with self._transaction(write=False) as run:
            rows = run("SELECT state, expires_at FROM onboarding_sessions WHERE id = ? AND tenant = ? AND user_id = ?",
                       (session, tenant, user))
        return (json.loads(rows[0][0]), rows[0][1]) if rows else None

    def end_session(self, session: str) -> None:
        with self._transaction() as run:
            run("DELETE FROM onboarding_sessions WHERE id = ? OR expires_at < ?", (session, time.time()))

    def evidence(self, tenant: str, user: str) -> list[dict]:
        with self._transaction(write=False) as run:
            rows = run("SELECT evidence FROM preference_evidence WHERE tenant = ? AND user_id = ?", (tenant, user))
        return json.loads(rows[0][0]) if rows else []

    def set_evidence(self, tenant: str, user: str, evidence: list[dict]) -> None:
        with self._transaction() as run:
            run("INSERT INTO preference_evidence (tenant, user_id, evidence) VALUES (?, ?, ?) ON CONFLICT (tenant, user_id) "
                "DO UPDATE SET evidence = excluded.evidence", (tenant, user, json.dumps(evidence)))

    def keep_completion(self, completion: str, tenant: str, user: str, texts: list[str], keep_s: float, most: int) -> None:
        """Keep a completion's texts for rating, for `keep_s` seconds and among the user's `most` latest."""
        now = time.time()
        with self._transaction() as run:
            run("INSERT INTO stored_completions (id, tenant, user_id, texts, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (completion, tenant, user, json.dumps(texts), now, now + keep_s))
            run("DELETE FROM stored_completions WHERE expires_at < ?", (now,))
            run("DELETE FROM stored_completions WHERE tenant = ? AND user_id = ? AND id NOT IN (SELECT id FROM "
                "stored_completions WHERE tenant = ? AND user_id = ? ORDER BY created_at DESC, id DESC LIMIT ?)",
                (tenant, user, tenant, user, most))

    def completion(self, completion: str, tenant: str, user: str | None = None) -> tuple[str, list[str]] | None:
        """A kept completion's user and texts, if it is this tenant's (and `user`'s, if given) and has not expired."""
        with self._transaction(write=False) as run:
            rows = run("SELECT user_id, texts FROM stored_completions WHERE id = ? AND tenant = ? AND expires_at >= ?",
                       (completion, tenant, time.time()))
        if not rows or user not in (None, rows[0][0]):
            return None
        return rows[0][0], json.loads(rows[0][1])
