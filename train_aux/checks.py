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

#: The checks a user's preferences may carry (IFEval instruction ids).
CHECK_IDS = (
    "language:response_language",
    "length_constraints:number_words",
    "change_case:english_lowercase",
    "change_case:english_capital",
    "startend:end_checker",
    "startend:quotation",
    "keywords:existence",
    "punctuation:no_comma",
    "detectable_content:postscript",
    "detectable_format:title",
)

_CLASSES = {
    "language:response_language": "ResponseLanguageChecker",
    "length_constraints:number_words": "NumberOfWords",
    "change_case:english_lowercase": "LowercaseLettersEnglishChecker",
    "change_case:english_capital": "CapitalLettersEnglishChecker",
    "startend:end_checker": "EndChecker",
    "startend:quotation": "QuotationChecker",
    "keywords:existence": "KeywordChecker",
    "punctuation:no_comma": "CommaChecker",
    "detectable_content:postscript": "PostscriptChecker",
    "detectable_format:title": "TitleChecker",
}


@functools.cache
def _instructions() -> types.ModuleType:
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
    for name in ("instructions_util", "instructions"):
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
    return sys.modules["lm_eval.tasks.ifeval.instructions"]


def check(response: str, instruction_id: str, kwargs: dict | None = None) -> bool:
    """Whether `response` follows the instruction, exactly as IFEval's strict checker decides."""
    if instruction_id not in _CLASSES:
        raise ValueError(f"unknown check {instruction_id!r}; known: {', '.join(CHECK_IDS)}")
    checker = getattr(_instructions(), _CLASSES[instruction_id])(instruction_id)
    random.seed(0)  # some checkers pick random defaults in build_description
    checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None})
    return bool(response.strip()) and bool(checker.check_following(response))


def check_all(response: str, checks: list[dict]) -> list[bool]:
    return [check(response, c["instruction_id"], c.get("kwargs")) for c in checks]
