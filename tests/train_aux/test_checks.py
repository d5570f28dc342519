import pytest

from softthought.ifeval import check
from train_aux.checks import CHECK_IDS

CASES = [
    ("language:response_language", {"language": "fr"}, "Bonjour, je suis très content de vous aider aujourd'hui.", True),
    ("language:response_language", {"language": "fr"}, "Hello, I am very happy to help you today.", False),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5}, "one two three four", True),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5}, "one two three four five", False),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 3}, "one two three", True),
    ("change_case:english_lowercase", {}, "all lowercase here.", True),
    ("change_case:english_lowercase", {}, "Not lowercase.", False),
    ("change_case:english_capital", {}, "ALL CAPS HERE.", True),
    ("change_case:english_capital", {}, "MOSTLY caps.", False),
    ("startend:end_checker", {"end_phrase": "Cheers!"}, "Done here. cheers!", True),
    ("startend:end_checker", {"end_phrase": "Cheers!"}, "Cheers! Done here.", False),
    ("startend:quotation", {}, '"wrapped"', True),
    ("startend:quotation", {}, "not wrapped", False),
    ("keywords:existence", {"keywords": ["river", "galaxy"]}, "A river in a galaxy.", True),
    ("keywords:existence", {"keywords": ["river", "galaxy"]}, "A river.", False),
    ("punctuation:no_comma", {}, "No commas at all.", True),
    ("punctuation:no_comma", {}, "One, comma.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\n\nP.S. more", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\n\nP.P.S more", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body only.", False),
    ("detectable_format:title", {}, "<<A Title>>\nBody", True),
    ("detectable_format:title", {}, "Title: body", False),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2}, "a VERY BIG deal.", True),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2}, "a very BIG deal.", False),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 2}, "One sentence.", True),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 2}, "One. Two.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n\n***\n\nTwo.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n\nTwo.", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* only", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1\na\nSection 2\nb", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1\na", False),
    ("detectable_format:json_format", {}, '```json\n{"answer": "yes"}\n```', True),
    ("detectable_format:json_format", {}, "answer: yes", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see [place].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False),
    ("keywords:frequency", {"keyword": "river", "frequency": 2, "relation": "at least"}, "River and river.", True),
    ("keywords:frequency", {"keyword": "river", "frequency": 2, "relation": "at least"}, "One river.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["very"]}, "It is quite good.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["very"]}, "It is Very good.", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zany zoo.", True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "A zoo.", False),
]


@pytest.mark.parametrize("instruction_id, kwargs, response, expected", CASES)
def test_checks_follow_ifeval_semantics(instruction_id, kwargs, response, expected):
    assert check(response, instruction_id, kwargs) is expected


def test_every_supported_id_is_covered():
    assert {c[0] for c in CASES} == set(CHECK_IDS)


def test_unknown_check_is_refused():
    with pytest.raises(ValueError, match="unknown IFEval instruction"):
        check("x", "format:json")


def test_empty_response_never_passes():
    assert check("   ", "punctuation:no_comma") is False


def test_a_borderline_text_gets_the_same_decision_every_time():
    # all-caps English that langdetect, unseeded, called English on about 88% and 12% of calls: the checks decide
    # training data and scores, so they must not flip from one call to the next
    for text in ("THE ANSWER TO THAT QUESTION IS NO, THERE IS NO SUCH PLACE AS GARRISON COLORADO.",
                 "THE JEB'SONS, A CLASSIC AMERICAN FAMILY DRAMA, HAS INDEED BEEN REIMAGINED IN VARIOUS WAYS."):
        assert len({check(text, "change_case:english_capital") for _ in range(40)}) == 1


def test_a_loop_is_told_from_prose():
    from train_aux.checks import is_loop, repetition

    assert is_loop("* * *\n" * 24) and is_loop("DON'T TRY TO SEE THE FINISHED STORY, " * 8)
    prose = "Honey bees produce honey, a vital resource for people and for the plants whose flowers they pollinate."
    assert repetition(prose) == 0.0 and not is_loop(prose) and not is_loop("No, no, no.")  # too short to judge


def test_a_reply_on_topic_repeats_a_content_word_of_its_prompt():
    from train_aux.checks import on_topic

    prompt = "Is there a 3rd season of Berlin Station?"
    assert on_topic(prompt, "Yes, the third SEASON of Berlin Station aired in 2018.")
    assert on_topic(prompt, "Oui, la saison 3 de « Berlin Station » existe.")  # a name survives another language
    # a preference's form with nothing of the question, and a reply sharing only a function word
    for reply in ('{"answer my question"}', "``That Is All``", "There is no way to know.", "P.P.S 3rd"):
        assert not on_topic(prompt, reply)
