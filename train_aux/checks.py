"""Verifiable preferences: IFEval's own instruction checkers from lm-eval, loaded without the rest of lm-eval.

Importing `lm_eval.tasks` pulls in the whole harness (datasets, evaluate, ...); the two ifeval modules need
only nltk, langdetect and immutabledict, so they are loaded from their files under stub parent packages.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import sys
import types
from pathlib import Path

from .paths import shared_data

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


@functools.cache
def _instructions() -> types.ModuleType:
    """lm-eval's IFEval instruction registry (its checkers by instruction id)."""
    os.environ.setdefault("NLTK_DATA", str(shared_data() / "ifeval" / "nltk_data"))  # never download
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the IFEval checkers need lm-eval: pip install --no-deps lm-eval==0.4.13")
    ifeval_dir = Path(spec.submodule_search_locations[0]) / "tasks" / "ifeval"
    for name in ("lm_eval", "lm_eval.tasks", "lm_eval.tasks.ifeval"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = []
            sys.modules[name] = stub
    for name in ("instructions_util", "instructions", "instructions_registry"):
        full = f"lm_eval.tasks.ifeval.{name}"
        if full not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(full, ifeval_dir / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[full] = module
            module_spec.loader.exec_module(module)
            setattr(sys.modules["lm_eval.tasks.ifeval"], name, module)
    # langdetect (the language and English-case checks) samples n-grams from an unseeded RNG: a borderline text, such
    # as short all-caps English, passed on one call and failed on the next, so neither training data nor scores
    # reproduced. Seeded as langdetect advises; any text langdetect decides firmly is judged as lm-eval judges it.
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0
    return sys.modules["lm_eval.tasks.ifeval.instructions_registry"]


def check(response: str, instruction_id: str, kwargs: dict | None = None) -> bool:
    """Whether `response` follows the instruction (any of IFEval's), exactly as IFEval's strict checker decides."""
    registry = _instructions().INSTRUCTION_DICT
    if instruction_id not in registry:
        raise ValueError(f"unknown check {instruction_id!r}; users' preferences use: {', '.join(CHECK_IDS)}")
    checker = registry[instruction_id](instruction_id)
    random.seed(0)  # some checkers pick random defaults in build_description
    checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None})
    return bool(response.strip()) and bool(checker.check_following(response))


def check_all(response: str, checks: list[dict]) -> list[bool]:
    return [check(response, c["instruction_id"], c.get("kwargs")) for c in checks]


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
