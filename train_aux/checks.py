"""The checkable preferences users are drawn from, and what makes a reply degenerate. The checkers themselves are
IFEval's (`softthought.ifeval`)."""

from __future__ import annotations

import re

#: The checks a user's preferences may carry (IFEval instruction ids): every standing-preference type of `users.KINDS`.
CHECK_IDS = (
    "language:response_language",
    "change_case:english_lowercase",
    "change_case:english_capital",
    "change_case:capital_word_frequency",
    "punctuation:no_comma",
    "length_constraints:number_words",
    "length_constraints:number_sentences",
    "length_constraints:number_paragraphs",
    "detectable_format:title",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_content:postscript",
    "detectable_content:number_placeholders",
    "startend:end_checker",
    "startend:quotation",
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
)


def repetition(text: str, n: int = 4) -> float:
    """The share of a reply's word n-grams that repeat an earlier one: about 0 for prose, near 1 for a loop
    ("* * *" over and over). Replies under 2n words count as 0."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if len(words) >= 2 * n else 0.0


def is_loop(text: str) -> bool:
    """A degenerate reply: at least half of its 4-grams repeat. Checks it passes (no comma, no forbidden word) are
    hollow, and as a training target it teaches looping."""
    return repetition(text) >= 0.5


#: Words of five letters or more that say nothing of a question's topic.
_FUNCTION_WORDS = frozenset({"there", "their", "these", "those", "which", "where", "while", "would", "should", "could",
                             "about", "after", "before", "other", "every", "still", "being", "always", "never",
                             "really", "thing", "things", "people", "think"})


def content_words(text: str) -> set[str]:
    return {w for w in (m.lower() for m in re.findall(r"[^\W\d_]{5,}", text)) if w not in _FUNCTION_WORDS}


def on_topic(prompt: str, reply: str) -> bool:
    """Whether a reply repeats a content word (five letters or more) of its prompt: a crude sign that it addresses
    the question, which no IFEval check asks. A reply that writes only a preference's form ('{"answer my
    question"}', "That Is All") passes its checks and says nothing; four in five of the plain backbone's replies
    repeat one."""
    return bool(content_words(prompt) & content_words(reply))
