import hashlib
import json
import re
from collections import Counter

import pytest

from train_aux.ifeval_phrasings import LANGUAGE_NAMES, SUPPORTED, ifeval_sentences, split_of
from train_aux.paths import shared_data

WORDS = {1: ["one", "once"], 2: ["two", "twice"], 3: ["three"], 4: ["four"], 5: ["five"], 6: ["six"], 7: ["seven"], 8: ["eight"],
         9: ["nine"], 10: ["ten"], 12: ["twelve"], 15: ["fifteen"], 20: ["twenty"], 30: ["thirty"], 40: ["forty"], 50: ["fifty"]}
NUMBERS = ("num_words", "num_sentences", "num_paragraphs", "num_bullets", "num_highlights", "num_sections", "num_placeholders",
           "frequency", "let_frequency", "capital_frequency")
VERBATIM = ("keywords", "forbidden_words", "keyword", "end_phrase", "postscript_marker", "section_spliter")
RELATIONS = {"at least": r"at least|or more|\d\+", "less than": r"less than|fewer than|under"}
TASK = r"\b(?:poems?|essays?|stor(?:y|ies)|resumes?|e-?mails?|songs?|raps?|limericks?|riddles?|blog posts?|summary|ads?|products?|" \
       r"articles?|this prompt|the request|tweets?|jokes?|haikus?|itinerary|slogan|lyrics)\b|\b(?:the|this|a|cover) letter(?!s|\s+\S\b)"


@pytest.fixture(scope="module")
def splits():
    return {split: ifeval_sentences(split) for split in ("train", "eval")}


def test_the_split_is_a_fixed_hash_of_the_key_and_the_splits_share_no_key(splits):
    keys = [json.loads(line)["key"] for line in (shared_data() / "ifeval" / "input_data.jsonl").read_text().splitlines()]
    assert [split_of(k) for k in keys] == [split_of(k) for k in keys]
    assert all(split_of(k) == ("train" if hashlib.sha256(str(k).encode()).digest()[0] < 128 else "eval") for k in keys)
    assert (split_of(1000), split_of(1001), split_of(3748)) == ("train", "eval", "eval")  # fixed for ever
    assert 0.4 < Counter(split_of(k) for k in keys)["train"] / len(keys) < 0.6
    train, held_out = ({s["key"] for s in splits[name]} for name in ("train", "eval"))
    assert train and held_out and not train & held_out
    assert all(split_of(s["key"]) == name for name in splits for s in splits[name])
    with pytest.raises(ValueError):
        ifeval_sentences("test")


def test_both_splits_cover_most_instructions(splits):
    for rows in splits.values():
        assert {s["instruction_id"] for s in rows} <= SUPPORTED
        assert sum(1 for iid in SUPPORTED if any(s["instruction_id"] == iid for s in rows)) >= 12


def test_every_sentence_names_its_parameters(splits):
    for s in splits["train"] + splits["eval"]:
        text, kw = s["sentence"].lower(), s["kwargs"]
        assert None not in kw.values() and 0 < len(text) <= 300, s
        for key in NUMBERS:
            if key in kw:
                said = [str(kw[key])] + WORDS.get(kw[key], [])
                assert any(re.search(rf"(?<![\d,.]){n}(?![\d,])" if n.isdigit() else rf"\b{n}\b", text) for n in said), s
        for key in VERBATIM:
            for value in kw.get(key, []) if isinstance(kw.get(key), list) else [kw[key]] if key in kw else []:
                assert value.lower() in text, s
        for key in ("relation", "let_relation", "capital_relation"):
            if key in kw:
                assert re.search(RELATIONS[kw[key]], text), s
        if "letter" in kw:
            assert re.search(rf"\bletter\s+[\"']?{re.escape(kw['letter'])}\b", text), s
        if "language" in kw:
            assert any(name.lower() in text for name in LANGUAGE_NAMES[kw["language"]].split("|")), s


def test_no_sentence_refers_to_the_task(splits):
    for s in splits["train"] + splits["eval"]:
        text = s["sentence"]
        for key in ("keywords", "forbidden_words", "keyword", "end_phrase"):  # the parameters themselves may be such words
            for value in s["kwargs"].get(key, []) if isinstance(s["kwargs"].get(key), list) else [s["kwargs"].get(key, "")]:
                text = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", "", text, flags=re.I) if value else text
        assert not re.search(TASK, text, re.I), s
