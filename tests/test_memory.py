"""Onboarding sessions and feedback over a real store (SQLite and PostgreSQL), with the shipped question bank."""

import time

import numpy as np
import pytest

from softthought.memory import MemorySettings, PreferenceMemory
from softthought.preference_memory import Bank, simulated_answer
from softthought.protocol import APIError
from softthought.store import open_store

TRUTH = {"lowercase", "short:40"}


@pytest.fixture(scope="module")
def bank():
    return Bank.load()


def _memory(store_url, bank, **settings):
    return PreferenceMemory(open_store(store_url), bank, MemorySettings(**settings))


def _onboard(memory, bank, user, truth, tenant="t"):
    rng = np.random.default_rng(0)
    step = memory.start(tenant, user)
    session = step["session"]
    while not step.get("done"):
        q = bank.questions[step["question"]["id"]]
        assert step["question"] == q.public() and "features" not in str(step["question"])
        step = memory.answer(tenant, user, session, q.id, simulated_answer(q, truth, 0.0, rng))
    return step


def test_onboarding_learns_and_stores_the_users_preferences(store_url, bank):
    memory = _memory(store_url, bank)
    done = _onboard(memory, bank, "u", TRUTH)
    assert done["questions_asked"] <= 10 and {p["preference"] for p in done["profile"]} == TRUTH
    stored = memory.store.get("t", "u")
    assert (stored.summary, stored.summary_source, stored.version) == (done["summary"], "onboarding", done["preference_version"])
    phrases = [a.phrase for a in bank.atoms if a.id in TRUTH]  # as the bank phrases them for the shipped thoughts
    assert len(phrases) == len(TRUTH) and all(ph in stored.summary for ph in phrases) and "40 words" in stored.summary
    assert len(memory.store.evidence("t", "u")) == done["questions_asked"]
    with pytest.raises(APIError) as err:  # a finished session is gone
        memory.answer("t", "u", done["session"], "q0001", "o1")
    assert err.value.status == 404


def test_a_session_survives_a_restart_and_refuses_what_it_did_not_ask(store_url, bank):
    first = _memory(store_url, bank).start("t", "u")
    memory = _memory(store_url, bank)  # a new server process on the same store
    asked = first["question"]["id"]
    other = next(q for q in bank.questions if q != asked)
    cases = [(("t", "u", "onb-unknown", asked, "o1"), 404, "session_not_found"),
             (("t", "v", first["session"], asked, "o1"), 404, "session_not_found"),  # another user's session
             (("t2", "u", first["session"], asked, "o1"), 404, "session_not_found"),  # another tenant's
             (("t", "u", first["session"], other, "o1"), 409, "question_not_asked"),
             (("t", "u", first["session"], asked, "o9"), 400, "invalid_value")]
    for args, status, code in cases:
        with pytest.raises(APIError) as err:
            memory.answer(*args)
        assert (err.value.status, err.value.code) == (status, code)
    step = memory.answer("t", "u", first["session"], asked, "neither")
    assert step["done"] is False and step["question_number"] == 2


def test_an_expired_session_is_refused_as_gone(store_url, bank):
    memory = _memory(store_url, bank, session_ttl_s=0.01)
    step = memory.start("t", "u")
    time.sleep(0.05)
    with pytest.raises(APIError) as err:
        memory.answer("t", "u", step["session"], step["question"]["id"], "o1")
    assert (err.value.status, err.value.code) == (410, "session_expired")


def test_ratings_learn_a_summary_and_leave_one_the_client_wrote(store_url, bank):
    memory = _memory(store_url, bank, min_ratings=3)
    long_tail = " and it goes on with more words about the topic" * 5
    rated = [("<<a title>>\nhere is a short answer in lowercase.", 1),
             ("here is a short answer in lowercase without a title.", -1),
             ("<<A Title>>\nHere Is An Answer In Capitals.", -1),
             ("<<a title>>\nhere is a long answer, with commas, that goes on" + long_tail + ".", 1)]
    outcomes = []
    for i in range(12):
        text, rating = rated[i % len(rated)]
        memory.keep(f"c{i}", "t", "u", [text])
        outcomes.append(memory.rate("t", "u", f"c{i}", rating))
    assert all(o["recorded"] for o in outcomes) and not any(o["summary_revised"] for o in outcomes[:2])
    stored = memory.store.get("t", "u")
    assert stored.summary_source == "feedback" and {p["preference"] for p in stored.profile} == {"lowercase", "title"}
    assert sum(o["summary_revised"] for o in outcomes) == 1  # more of the same evidence changes nothing
    with pytest.raises(APIError) as err:  # another user's (or tenant's) completion cannot be rated
        memory.rate("t", "v", "c0", 1)
    assert (err.value.status, err.value.code) == (404, "completion_not_found")
    with pytest.raises(APIError) as err:
        memory.rate("t2", "u", "c0", 1)
    assert err.value.status == 404
    with pytest.raises(APIError) as err:  # named by its id alone, still only within its tenant
        memory.rate("t2", None, "c0", 1)
    assert err.value.status == 404
    assert memory.rate("t", None, "c1", -1)["user"] == "u"  # the completion's own user
    assert len(memory.store.evidence("t", "u")) == 13
    with pytest.raises(APIError) as err:
        memory.rate("t", "u", "c0", 1, choice=1)
    assert err.value.status == 400
    memory.store.put("t", "w", "I write my own summary.")
    for i in range(8):
        text, rating = rated[i % len(rated)]
        memory.keep(f"w{i}", "t", "w", [text])
        assert memory.rate("t", "w", f"w{i}", rating)["summary_revised"] is False
    assert memory.store.get("t", "w").summary == "I write my own summary."


def test_a_session_ends_when_the_bank_has_no_question_left(store_url, bank):
    from softthought.preference_memory import Bank

    small = Bank(bank.atoms, bank.conflicts, dict(list(bank.questions.items())[:2]))
    done = _onboard(_memory(store_url, small, max_questions=10), small, "u", {"lowercase", "title", "short:40"})
    assert done["done"] is True and done["questions_asked"] == 2
