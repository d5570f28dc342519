"""Preference summaries per (tenant, user), versioned, behind one interface with two backends chosen by URL:
SQLite (a plain path or `sqlite:///path`, the embedded default) and PostgreSQL (`postgresql://user@host:port/db`).

Every update bumps the user's version, and a version is never given twice to one (tenant, user), deletes included,
so `preference_version` names one summary."""

from __future__ import annotations

from .base import DEFAULT_TENANT, Preference, PreferenceStore

__all__ = ["DEFAULT_TENANT", "Preference", "PreferenceStore", "open_store"]


def open_store(url: str) -> PreferenceStore:
    """The store a URL names: `postgresql://...` (or `postgres://`), `sqlite:///path`, or a plain file path."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    from .sqlite import SQLiteStore

    return SQLiteStore(url.removeprefix("sqlite://") if url.startswith("sqlite:///") else url)
