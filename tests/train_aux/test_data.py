import random
import re

from train_aux.checks import CHECK_IDS, check_all
from train_aux.data import edit_answer, first_sentence, prompt_pool, qa_texts, whole_sentences
from train_aux.users import PHRASINGS, make_users

ANSWER = ("The ocean is a vast body of salt water that covers most of the Earth, and it is home to countless "
          "creatures. It shapes weather and climate. People depend on it for food, trade, and recreation.")


def test_users_have_valid_compatible_checks():
    for u in make_users(300, 0, "t", held_out_phrasing=False):
        ids = [c["instruction_id"] for c in u["checks"]]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids) and set(ids) <= set(CHECK_IDS)
        assert not {"change_case:english_lowercase", "change_case:english_capital"} <= set(ids)
        assert u["summary"].strip()


def test_held_out_phrasings_never_reach_training_users():
    held_out = [re.compile(".{1,40}?".join(re.escape(part) for part in v[-1].split("{x}")))
                for styles in PHRASINGS.values() for v in styles.values()]
    train = make_users(600, 0, "train", held_out_phrasing=False)
    evaluation = make_users(80, 1, "eval", held_out_phrasing=True)
    assert not any(h.search(u["summary"]) for u in train for h in held_out)
    assert all(any(h.search(u["summary"]) for h in held_out) for u in evaluation)
    assert not {u["summary"] for u in train} & {u["summary"] for u in evaluation}


def test_edits_satisfy_every_check_and_stay_close_to_the_answer():
    rng = random.Random(0)
    users = make_users(200, 3, "t", held_out_phrasing=False)
    edited = [(u, edit_answer(ANSWER, "Tell me about the ocean.", u["checks"], rng)) for u in users]
    ok = [(u, t) for u, t in edited if t is not None]
    assert len(ok) >= 0.9 * len(users)
    for u, t in ok:
        assert all(check_all(t, u["checks"]))
        assert "ocean" in t.lower()  # the backbone's own answer is still there


def test_whole_sentences_and_prompt_pool():
    assert whole_sentences("One. Two! Three is cut") == "One. Two!"
    assert first_sentence(" One. Two! ") == "One." and first_sentence("No end") == "No end"
    pool = prompt_pool()
    assert len(pool) > 1000 and len(set(pool)) == len(pool)


def test_qa_texts_have_the_multiple_choice_shape_and_the_backbones_first_sentence():
    texts = qa_texts([{"prompt": "Why is the sky blue?", "answer": "Light scatters. Blue scatters most."}])
    assert texts == ["Question: Why is the sky blue?\nAnswer: Light scatters."]
