"""IncrementalDetokenizer: fed token by token, its pieces add up to the full decode; an unfinished character waits."""

import random

import pytest

from softthought.detokenizer import IncrementalDetokenizer

MULTILINGUAL = ["Grüße 你好 🙂 café", "P.S. 👍🏽 naïve façade, «quoted»", "日本語のテキストです。" * 3]


def _pieces(tok, ids: list[int]) -> list[str]:
    detokenize = IncrementalDetokenizer(tok)
    return [detokenize(ids[:i], final=i == len(ids)) for i in range(1, len(ids) + 1)]


@pytest.mark.parametrize("backbone", ["smollm", "tiny"])
def test_pieces_add_up_to_the_full_decode(backbone, request):
    tok = request.getfixturevalue(backbone).tokenizer
    rng = random.Random(0)
    seqs = [tok(text, add_special_tokens=False)["input_ids"] for text in MULTILINGUAL]
    # random ids: characters split across tokens, invalid UTF-8, special tokens
    seqs += [[rng.randrange(len(tok)) for _ in range(40)] for _ in range(200)]
    for ids in seqs:
        assert "".join(_pieces(tok, ids)) == tok.decode(ids, skip_special_tokens=True)


def test_an_unfinished_character_waits_for_its_last_byte(smollm):
    tok = smollm.tokenizer
    ids = tok("你好", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2  # this tokenizer splits the two characters' six bytes across tokens
    pieces = _pieces(tok, ids)
    assert "".join(pieces) == "你好" and "" in pieces and not any("\ufffd" in p for p in pieces)
    # the last call hands out what is left, as the full decode shows it
    assert _pieces(tok, ids[:1]) == [tok.decode(ids[:1])] and "\ufffd" in tok.decode(ids[:1])
