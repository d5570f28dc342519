"""The preference memory over HTTP: onboarding, stored completions and feedback, and their errors."""

import httpx

from softthought.ifeval import check
from softthought.preference_memory import Bank

from .conftest import OTHER_TENANT_KEY

HIDDEN = ("lowercase", "short:40")


def _metric(http, name: str) -> float:
    line = next(x for x in http.get("/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


def _answer_as(atoms, question) -> str:
    """A user who prefers `atoms` and reads the options: the one passing most of them, else "neither"."""
    passed = [sum(check(o["text"], a.instruction_id, a.kwargs) for a in atoms) for o in question["options"]]
    best = max(passed)
    return "neither" if passed.count(best) == len(passed) else question["options"][passed.index(best)]["id"]


def test_a_user_with_two_hidden_preferences_is_learned_within_ten_questions(http):
    bank = Bank.load()
    atoms = [bank.atoms[bank.atom_index[a]] for a in HIDDEN]
    step = http.post("/v1/users/onboarding-alice/onboarding").json()
    session, asked = step["session"], 0
    while not step.get("done"):
        asked += 1
        assert asked <= 10 and set(step["question"]) == {"id", "prompt", "options"}
        body = {"question": step["question"]["id"], "choice": _answer_as(atoms, step["question"])}
        resp = http.post(f"/v1/users/onboarding-alice/onboarding/{session}/answers", json=body)
        assert resp.status_code == 200, resp.text
        step = resp.json()
    assert {p["preference"] for p in step["profile"]} == set(HIDDEN)
    stored = http.get("/v1/users/onboarding-alice/preferences").json()
    assert stored["summary"] == step["summary"] and stored["summary_source"] == "onboarding"
    assert stored["version"] == step["preference_version"] and stored["profile"] == step["profile"]
    assert _metric(http, 'softthought_summaries_learned_total{source="onboarding"}') >= 1


def test_the_openai_client_starts_a_session_as_the_readme_shows(client):
    started = client.post("/users/openai-carol/onboarding", cast_to=object)
    assert started["session"].startswith("onb-") and len(started["question"]["options"]) == 3


def test_onboarding_errors_are_openai_shaped_4xx(http, server):
    step = http.post("/v1/users/onboarding-bob/onboarding").json()
    url = f"/v1/users/onboarding-bob/onboarding/{step['session']}/answers"
    asked = step["question"]["id"]
    cases = [
        ("/v1/users/onboarding-bob/onboarding/onb-nope/answers", {"question": asked, "choice": "o1"}, 404, "session_not_found"),
        (f"/v1/users/onboarding-eve/onboarding/{step['session']}/answers", {"question": asked, "choice": "o1"}, 404,
         "session_not_found"),
        (url, {"question": "q9999", "choice": "o1"}, 409, "question_not_asked"),
        (url, {"question": asked, "choice": "o7"}, 400, "invalid_value"),
        (url, {"question": asked}, 400, "missing_required_parameter"),
        (url, {"question": asked, "choice": "o1", "extra": 1}, 400, "unsupported_parameter"),
    ]
    for path, body, status, code in cases:
        resp = http.post(path, json=body)
        assert resp.status_code == status and resp.json()["error"]["code"] == code, (path, body, resp.text)
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {OTHER_TENANT_KEY}"}) as other:
        assert other.post(url, json={"question": asked, "choice": "o1"}).status_code == 404  # another tenant's session
    assert http.post(url, json={"question": asked, "choice": "o1"}).status_code == 200  # nothing was lost


def test_a_stored_completion_can_be_rated_by_its_user_only(client, http, server):
    kept = client.chat.completions.create(model="softthought", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          temperature=0, user="rater", store=True)
    unkept = client.chat.completions.create(model="softthought", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                            temperature=0, user="rater")
    stream = client.chat.completions.create(model="softthought", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                            temperature=0, user="rater", store=True, stream=True)
    streamed_id = [chunk.id for chunk in stream][0]
    for completion in (kept.id, streamed_id):
        resp = http.post("/v1/feedback", json={"id": completion, "user": "rater", "rating": 1})
        assert resp.status_code == 200 and resp.json()["recorded"] is True, resp.text
    assert _metric(http, 'softthought_feedback_ratings_total{rating="up"}') >= 2
    cases = [({"id": unkept.id, "user": "rater", "rating": 1}, 404),  # not stored
             ({"id": kept.id, "user": "someone-else", "rating": 1}, 404),
             ({"id": kept.id, "user": "rater", "rating": 5}, 400),
             ({"id": kept.id, "user": "rater", "rating": True}, 400),
             ({"id": kept.id, "user": "rater", "rating": -1, "choice": 3}, 400),
             ({"id": kept.id}, 400)]
    for body, status in cases:
        resp = http.post("/v1/feedback", json=body)
        assert resp.status_code == status and set(resp.json()["error"]) == {"message", "type", "param", "code"}, body
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {OTHER_TENANT_KEY}"}) as other:
        assert other.post("/v1/feedback", json={"id": kept.id, "user": "rater", "rating": 1}).status_code == 404
        assert other.post("/v1/feedback", json={"id": kept.id, "rating": 1}).status_code == 404
    by_id = http.post("/v1/feedback", json={"id": kept.id, "rating": -1})  # the body the issue gives: the id names the user
    assert by_id.status_code == 200 and by_id.json()["user"] == "rater"
    assert http.delete("/v1/users/rater").status_code == 200  # forgotten: the kept completions with it
    assert http.post("/v1/feedback", json={"id": kept.id, "user": "rater", "rating": 1}).status_code == 404
