"""IFEval's own instruction checkers from lm-eval, loaded without the rest of lm-eval: what decides whether a reply
follows a checkable preference, for evaluation, training targets and the preference memory's labels.

Importing `lm_eval.tasks` pulls in the whole harness (datasets, evaluate, ...); the two ifeval modules need only nltk,
langdetect and immutabledict, so they are loaded from their files under stub parent packages. Their import downloads
NLTK's English sentence splitter when it is missing; it ships in this package (`data/nltk_data`), so nothing is
fetched at run time.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import sys
import types
from pathlib import Path

NLTK_DATA = Path(__file__).with_name("data") / "nltk_data"


@functools.cache
def _instructions() -> types.ModuleType:
    """lm-eval's IFEval instruction registry (its checkers by instruction id)."""
    import nltk

    if str(NLTK_DATA) not in nltk.data.path:
        nltk.data.path.insert(0, str(NLTK_DATA))
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
        raise ValueError(f"unknown IFEval instruction {instruction_id!r}")
    checker = registry[instruction_id](instruction_id)
    random.seed(0)  # some checkers pick random defaults in build_description
    checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None})
    return bool(response.strip()) and bool(checker.check_following(response))


def count_words(text: str) -> int:
    """Words as IFEval's length checks count them."""
    _instructions()
    return sys.modules["lm_eval.tasks.ifeval.instructions_util"].count_words(text)


def check_all(response: str, checks: list[dict]) -> list[bool]:
    return [check(response, c["instruction_id"], c.get("kwargs")) for c in checks]
