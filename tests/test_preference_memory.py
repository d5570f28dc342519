"""The posterior over preference sets and the shipped question bank (real, checker-labelled replies)."""

import numpy as np
import pytest

from softthought.ifeval import check
from softthought.preference_memory import NEITHER, Bank, Posterior, simulated_answer, summary_of


@pytest.fixture(scope="module")
def bank():
    return Bank.load()


def _users(bank, n, seed, sizes=(1, 2, 3)):
    rng = np.random.default_rng(seed)
    pool = [h for h in bank.hypotheses if len(h) in sizes]
    return [{bank.atoms[i].id for i in pool[j]} for j in rng.choice(len(pool), n, replace=False)]


def _onboard(bank, truth, adaptive, questions, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    post, asked = Posterior(bank), []
    for _ in range(questions):
        q = post.best_question(asked) if adaptive else bank.questions[rng.choice([k for k in bank.questions if k not in asked])]
        asked.append(q.id)
        post.observe_choice(q, simulated_answer(q, truth, noise, rng))
    return {a.id for a in post.most_probable()[0]}


def test_hypotheses_hold_compatible_sets_of_at_most_three_one_per_kind(bank):
    kinds = [[bank.atoms[i].kind for i in h] for h in bank.hypotheses]
    assert all(len(k) == len(set(k)) <= 3 for k in kinds)
    assert not any(c <= set(k) for k in kinds for c in bank.conflicts)
    assert np.isclose(np.exp(bank.log_prior).sum(), 1)
    assert len(bank.atoms) >= 15 and len({a.kind for a in bank.atoms}) >= 13


def test_every_option_passes_the_checks_its_features_name_and_only_those(bank):
    for q in list(bank.questions.values())[:40]:
        assert len({o.features for o in q.options}) == len(q.options) >= 2
        for o in q.options:
            assert {a.id for a in bank.atoms if check(o.text, a.instruction_id, a.kwargs)} == o.features


def test_noise_free_users_are_recovered_adaptively_within_ten_questions_and_faster_than_at_random(bank):
    users = _users(bank, 30, seed=1)
    adaptive = [_onboard(bank, u, True, 10) == u for u in users]
    assert sum(adaptive) / len(users) >= 0.9
    random_order = [_onboard(bank, u, False, 10, seed=i) == u for i, u in enumerate(users)]
    assert sum(random_order) < sum(adaptive)


def test_a_user_without_preferences_answers_neither_and_is_learned_as_none(bank):
    q = next(iter(bank.questions.values()))
    assert simulated_answer(q, set(), 0.0, np.random.default_rng(0)) == NEITHER
    assert _onboard(bank, set(), True, 10) == set()


def test_ratings_move_the_posterior_towards_what_the_liked_replies_pass(bank):
    post = Posterior(bank)
    before = post.marginals()[bank.atom_index["lowercase"]]
    for _ in range(4):
        post.observe_rating({"lowercase", "no_comma"}, 1)
        post.observe_rating({"title"}, -1)
    after = post.marginals()
    assert after[bank.atom_index["lowercase"]] > 2 * before
    assert after[bank.atom_index["title"]] < before


def test_information_gain_is_zero_once_the_answer_is_known(bank):
    q = next(iter(bank.questions.values()))
    post = Posterior(bank)
    assert post.information_gain(q) > 0.1
    post.log = np.where(np.arange(len(bank.hypotheses)) == 5, 0.0, -np.inf)  # certain of one set
    assert post.information_gain(q) == pytest.approx(0, abs=1e-9)


def test_the_summary_says_each_preference_with_its_parameter(bank):
    names = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese"}
    for a in bank.atoms:
        shown = [names.get(v, str(v)) for k, v in a.kwargs.items() if k not in ("relation", "section_spliter")]
        assert a.phrase and all(x in a.phrase for x in shown), a
    atoms = [bank.atoms[bank.atom_index[i]] for i in ("language:fr", "short:40")]
    assert summary_of(atoms) == f"{atoms[0].phrase} {atoms[1].phrase}"
