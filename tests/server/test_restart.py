"""Preferences live in SQLite: they survive a full restart of the server (Ray cluster included)."""

import pytest

pytestmark = pytest.mark.slow


def test_preferences_survive_restart(server, http):
    http.put("/v1/users/durable/preferences", json={"summary": "first"})
    written = http.put("/v1/users/durable/preferences", json={"summary": "Answer in Spanish, please."}).json()
    server.restart()
    assert http.get("/v1/users/durable/preferences").json() == written
    assert http.get("/health").json()["status"] == "ok"
