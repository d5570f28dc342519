import json
import random
import re
from pathlib import Path

import pytest

import train_aux
from softthought.ifeval import check_all
from train_aux.checks import CHECK_IDS
from train_aux.data import edit_answer, first_sentence, prompt_pool, qa_choices, qa_texts, whole_sentences, winogrande_choices
from train_aux.users import (
    COUNTRIES,
    KINDS,
    LANGUAGE_NAMES,
    LANGUAGES,
    STYLES,
    TRAINED,
    ZERO_SHOT,
    case_twin,
    compatible,
    floor_twin,
    kind_of,
    make_users,
    phrasings,
)

ANSWER = ("The ocean is a vast body of salt water that covers most of the Earth, and it is home to countless "
          "creatures. It shapes weather and climate. People depend on it for food, trade, and recreation.")
LONG = ANSWER + (" Many different animals live very deep below the waves. Scientists have explored only a small part of it. "
                 "Protecting the ocean really matters for the whole world.")


def test_every_kind_has_at_least_thirty_phrasings_with_its_placeholders():
    for name, kind in KINDS.items():
        table = phrasings(name)
        assert set(table) == set(STYLES), name
        assert sum(len(v) for v in table.values()) >= 30, name
        fields = set(kind.fill(kind.sample(random.Random(0)), "en"))
        for variants in table.values():
            for v in variants:
                assert set(re.findall(r"{(\w+)}", v)) == fields, (name, v)


def test_users_have_valid_compatible_checks():
    for u in make_users(500, 0, "t", held_out_phrasing=False):
        ids = [c["instruction_id"] for c in u["checks"]]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids) and set(ids) <= set(CHECK_IDS)
        assert compatible(u["kinds"]) and [kind_of(c) for c in u["checks"]] == u["kinds"]
        assert not set(u["kinds"]) & set(ZERO_SHOT)
        assert u["summary"].strip() and "{" not in u["summary"]
    zero = make_users(50, 2, "z", held_out_phrasing=True, kinds=TRAINED + ZERO_SHOT, include=ZERO_SHOT)
    assert all(set(u["kinds"]) & set(ZERO_SHOT) for u in zero)


def _pattern(template: str) -> re.Pattern:
    return re.compile(".{1,60}?".join(re.escape(part) for part in re.split(r"{\w+}", template)), re.IGNORECASE)


def test_held_out_phrasings_never_reach_training_users():
    held_out = {k: [_pattern(v[-1]) for v in phrasings(k).values()] for k in KINDS}
    train = make_users(600, 0, "train", held_out_phrasing=False)
    evaluation = make_users(80, 1, "eval", held_out_phrasing=True, typo_rate=0.0)
    assert not any(h.search(u["summary"]) for u in train for k in u["kinds"] for h in held_out[k])
    assert all(any(h.search(u["summary"]) for h in held_out[k]) for u in evaluation for k in u["kinds"])
    assert not {u["summary"] for u in train} & {u["summary"] for u in evaluation}


def test_a_case_twin_asks_for_the_other_case_and_is_never_a_held_out_phrasing():
    def user(summary, *ids):
        return {"user": "u", "summary": summary, "checks": [{"instruction_id": i, "kwargs": {}} for i in ids]}

    twin = case_twin(user("Merci de répondre en anglais et uniquement en MAJUSCULES. Pas de virgules.",
                          "change_case:english_capital", "punctuation:no_comma"))
    assert twin["summary"] == "Merci de répondre en anglais et uniquement en minuscules. Pas de virgules."
    assert [c["instruction_id"] for c in twin["checks"]] == ["change_case:english_lowercase", "punctuation:no_comma"]
    # every word naming a case swaps, so a negation keeps its sense: "no capital letters" becomes "no lowercase letters"
    twin = case_twin(user("Please write everything in lowercase, no capital letters anywhere.", "change_case:english_lowercase"))
    assert twin["summary"] == "Please write everything in uppercase, no lowercase letters anywhere."
    assert twin["checks"][0]["instruction_id"] == "change_case:english_capital"
    assert case_twin(user("No commas.", "punctuation:no_comma")) is None
    assert case_twin(user("block capitols", "change_case:english_capital")) is None  # no word to swap
    # "3 words in capitals" is another check, which a swapped word would contradict
    assert case_twin(user("All caps. At least 3 words in CAPITALS.", "change_case:english_capital",
                          "change_case:capital_word_frequency")) is None
    # the lowercase held-out phrasing "Réponses en anglais, tout en minuscules." is what evaluation users get
    assert case_twin(user("Réponses en anglais, tout en majuscules.", "change_case:english_capital")) is None
    held_out = [v[-1] for k in ("capital", "lowercase") for v in phrasings(k).values()]
    twins = [t for u in make_users(600, 0, "train", held_out_phrasing=False) if (t := case_twin(u))]
    assert len(twins) > 60 and not any(h in t["summary"] for t in twins for h in held_out)



def test_a_floor_twin_asks_for_at_least_the_words_its_user_capped_in_the_same_style():
    limit = {"instruction_id": "length_constraints:number_words", "kwargs": {"relation": "less than", "num_words": 30}}
    comma = {"instruction_id": "punctuation:no_comma", "kwargs": {}}
    user = {"user": "u", "summary": "I have two cats. Keep your answers under 30 words, please. No commas.",
            "checks": [comma, limit], "kinds": ["no_comma", "short"]}
    twin = floor_twin(user)
    assert twin["summary"] == "I have two cats. " + phrasings("long")["first"][0].format(x=30) + " No commas."
    assert twin["checks"] == [comma, {**limit, "kwargs": {"relation": "at least", "num_words": 30}}]
    assert twin["kinds"] == ["no_comma", "long"] and twin["user"] == "u-floor" and user["checks"][1] == limit
    assert floor_twin({**user, "summary": "Keep your answers undr 30 words."}) is None  # a typo: no phrasing to swap
    assert floor_twin({**user, "checks": [comma], "kinds": ["no_comma"]}) is None
    users = make_users(600, 0, "train", held_out_phrasing=False)
    twins = [t for u in users if (t := floor_twin(u))]
    held_out = [v[-1].format(x=n) for v in phrasings("long").values() for n in (20, 30, 40)]
    assert len(twins) > 0.7 * sum("short" in u["kinds"] for u in users)
    assert not any(h in t["summary"] for t in twins for h in held_out) and all(compatible(t["kinds"]) for t in twins)

def test_language_mentions_name_a_language_and_ask_only_for_english_or_the_users_own():
    table = phrasings("language_mentions")
    held_out = [_pattern(v[-1]) for part in table.values() for v in part.values()]
    names = ({n.lower() for spelled in LANGUAGE_NAMES.values() for n in spelled.values()}
             | {p.lower() for places in COUNTRIES.values() for pair in places.values() for p in pair})
    train = make_users(300, 0, "m", held_out_phrasing=False, mentions=True)
    asking = make_users(100, 1, "a", held_out_phrasing=False, include=("language",), mentions=True)
    for u in train + asking:
        assert any(n in u["summary"].lower() for n in names) and "{" not in u["summary"]
        asked = [c["kwargs"]["language"] for c in u["checks"] if c["instruction_id"] == KINDS["language"].instruction_id]
        assert len(asked) <= 1 and set(asked) <= set(LANGUAGES) | {"en"}
        assert not any(h.search(u["summary"]) for h in held_out)
    english = [u for u in train if {"instruction_id": KINDS["language"].instruction_id, "kwargs": {"language": "en"}} in u["checks"]]
    assert 0.15 < len(english) / len(train) < 0.4
    assert not any(c["kwargs"].get("language") == "en" for u in asking for c in u["checks"])
    # a fifth of the requests are written in Italian or Portuguese, naming the language asked for as they spell it
    foreign = [u for u in asking if any(_pattern(p).search(u["summary"]) for part in table["asking"].values() for p in part)]
    assert 0.08 < len(foreign) / len(asking) < 0.35
    for u in foreign:
        asked = next(c["kwargs"]["language"] for c in u["checks"] if c["instruction_id"] == KINDS["language"].instruction_id)
        assert any(f" {LANGUAGE_NAMES[lang][asked]}" in u["summary"] for lang in ("it", "pt"))
    evaluation = make_users(50, 2, "e", held_out_phrasing=True, typo_rate=0.0, mentions=True)
    assert all(any(h.search(u["summary"]) for h in held_out) for u in evaluation)
    # without mentions the users are what they always were: the committed data sets stay reproducible
    stored = [json.loads(line) for line in (Path(train_aux.__file__).parent / "data-broad" / "dev_users.jsonl").open()]
    assert make_users(len(stored), 3, "dev", held_out_phrasing=True) == stored


def test_every_trained_kind_but_the_language_has_an_edit():
    rng = random.Random(0)
    for name in TRAINED:
        if name == "language":  # written by sampling the backbone, not by an edit
            continue
        for _ in range(5):
            checks = [{"instruction_id": KINDS[name].instruction_id, "kwargs": KINDS[name].sample(rng)}]
            edited = edit_answer(LONG, "Tell me about the ocean.", checks, rng)
            assert edited is not None and all(check_all(edited, checks)), (name, checks)


def test_edits_satisfy_every_check_and_stay_close_to_the_answer():
    rng = random.Random(0)
    users = [u for u in make_users(300, 3, "t", held_out_phrasing=False) if "language" not in u["kinds"]]
    edited = [(u, edit_answer(LONG, "Tell me about the ocean.", u["checks"], rng)) for u in users]
    ok = [(u, t) for u, t in edited if t is not None]
    assert len(ok) >= 0.8 * len(users)
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


def test_qa_choices_are_short_heads_of_the_backbones_answers_after_the_question():
    answers = [{"prompt": f"Question {i}?", "answer": f"Answer{i} number is long enough to cut. More."} for i in range(10)]
    items = qa_choices(answers, seed=3)
    assert items == qa_choices(answers, seed=3) and len(items) == 10
    for a, item in zip(answers, items):
        assert len(item) == 4 and {ctx for ctx, _ in item} == {f"Question: {a['prompt']}\nAnswer:"}
        assert first_sentence(a["answer"]).startswith(item[0][1].strip())  # the first choice is its own answer's head
        assert all(cont.startswith(" ") and 2 <= len(cont.split()) <= 12 for _, cont in item)
        assert len({cont.split()[0] for _, cont in item}) == 4  # three other answers' heads


def test_winogrande_choices_fill_the_blank_and_share_the_continuation():
    items = winogrande_choices()
    assert len(items) > 1000
    for item in items[:50]:
        (a, cont), (b, cont_b) = item
        assert a != b and cont == cont_b and cont.startswith(" ")


def test_keywords_first_open_the_reply_and_still_satisfy_every_check():
    rng = random.Random(1)
    users = [u for u in make_users(300, 4, "t", held_out_phrasing=False)
             if {"keywords", "keyword_frequency"} & set(u["kinds"]) and "language" not in u["kinds"]]
    assert len(users) > 20
    edited = [(u, edit_answer(LONG, "Tell me about the ocean.", u["checks"], rng, keywords_first=True)) for u in users]
    ok = [(u, t) for u, t in edited if t is not None]
    assert len(ok) >= 0.8 * len(users)
    for u, t in ok:
        assert all(check_all(t, u["checks"]))
    plain = [t for u, t in ok if set(u["kinds"]) <= {"keywords", "keyword_frequency", "no_comma", "forbidden"}]
    assert plain and all(t.startswith(("Think of", "This reminds", "Like", "Picture a", "A ")) for t in plain)


def test_reply_texts_keep_whole_answers_that_do_not_loop():
    from train_aux.data import reply_texts

    answers = [{"prompt": "Why is the sky blue?", "answer": "Sunlight scatters. Blue scatters most, so the sky looks blue."},
               {"prompt": "Say no.", "answer": "No, no, no, " * 20}]
    assert reply_texts(answers) == ["Question: Why is the sky blue?\nAnswer: Sunlight scatters. Blue scatters most, so the "
                                    "sky looks blue."]


@pytest.mark.slow
def test_answers_in_other_languages_begin_with_an_opening_and_pass_the_language_check(monkeypatch):
    from train_aux import data

    monkeypatch.setattr(data, "LANGUAGES", ("de", "pt"))
    answers = [{"prompt": p, "answer": "An answer."} for p in ("Tell me about rain.", "What is a volcano?", "Why do cats purr?")]
    rows = data.language_answers(answers, None, prompts=3, samples=2, max_tokens=32, batch=8, seed=0)
    assert {r["language"] for r in rows} == {"de", "pt"}  # the embedded backbone, begun in the language, stays in it
    for r in rows:
        assert r["opening"] in data.OPENINGS[r["language"]] and r["answer"].startswith(r["opening"])
        assert check_all(r["answer"], [{"instruction_id": "language:response_language", "kwargs": {"language": r["language"]}}]) == [True]
