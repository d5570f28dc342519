"""The PostgreSQL backend: psycopg 3 with a connection pool, for several Ingress replicas on several nodes.

The URL carries no password: libpq reads it from $PGPASSWORD or ~/.pgpass (or the whole DSN comes from
$SOFTTHOUGHT_STORE, e.g. a Kubernetes secret)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from psycopg_pool import ConnectionPool

from .base import PreferenceStore, Run

_MIGRATION_LOCK = 0x50726566  # pg_advisory_xact_lock key: replicas starting together migrate one after the other


class PostgresStore(PreferenceStore):
    def __init__(self, url: str, max_connections: int = 8) -> None:
        self.pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=True, name="softthought-store")
        self.pool.wait(timeout=30)
        self._migrate()

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Run]:
        with self.pool.connection() as conn, conn.transaction():
            def run(sql: str, params: tuple) -> list[tuple]:
                cur = conn.execute(sql.replace("?", "%s"), params)
                return cur.fetchall() if cur.description else []

            yield run

    def _lock_schema(self, run: Run) -> None:
        run("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))

    def _tables(self, run: Run) -> set[str]:
        return {r[0] for r in run("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()", ())}

    def close(self) -> None:
        self.pool.close()
