"""Preferences and onboarding sessions live in the store: they survive a full restart of the server (Ray cluster
included)."""

import pytest

pytestmark = pytest.mark.slow


def test_preferences_and_an_onboarding_session_survive_restart(server, http):
    http.put("/v1/users/durable/preferences", json={"summary": "first"})
    written = http.put("/v1/users/durable/preferences", json={"summary": "Answer in Spanish, please."}).json()
    started = http.post("/v1/users/onboarded/onboarding").json()
    server.restart()
    assert http.get("/v1/users/durable/preferences").json() == written
    assert http.get("/health").json()["status"] == "ok"
    answer = {"question": started["question"]["id"], "choice": "neither"}
    step = http.post(f"/v1/users/onboarded/onboarding/{started['session']}/answers", json=answer)
    assert step.status_code == 200 and step.json()["question_number"] == 2
