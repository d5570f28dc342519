import pytest

from softthought.ifeval import check, count_words


@pytest.mark.parametrize("text", ["Sure - here is the plan: 3 steps, no more.", "* one\n* two\n\n**Done**", "Bonjour, ça va ?"])
def test_words_are_counted_as_ifevals_length_checks_count_them(text):
    floor = {"relation": "at least", "num_words": count_words(text)}
    assert check(text, "length_constraints:number_words", floor)
    assert not check(text, "length_constraints:number_words", {**floor, "num_words": floor["num_words"] + 1})
    assert count_words(text) != len(text.split())  # what a whitespace split would have counted instead


def test_an_unknown_instruction_is_refused_by_name():
    with pytest.raises(ValueError, match="no:such"):
        check("text", "no:such")
