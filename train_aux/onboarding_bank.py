"""Build the preference memory's question bank (`softthought/data/onboarding_questions.json`).

Each question is a prompt with three candidate replies: the backbone's own answer (or a hand-written one, in English
or a response language) minimally edited towards one to three preferences, the way training targets are. IFEval's
checkers then label every reply with every preference it passes, intended or not, and a reply is kept only if it
passes the ones it was edited towards.

    python -m train_aux.onboarding_bank [--questions 400 --seed 0 --out softthought/data/onboarding_questions.json]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import yaml

from softthought.ifeval import check
from softthought.preference_memory import DEFAULT_BANK, Atom, Bank, Option, Question

from .checks import is_loop
from .data import edit_answer, read_jsonl
from .paths import REPO_ROOT
from .users import CONFLICTS, KINDS, LANGUAGES, phrasings

ANSWERS = Path(__file__).with_name("onboarding") / "answers.yaml"

#: The preferences onboarding can learn: each kind the auxiliary model is trained on that a choice between replies can
#: show, with the parameter values a person is likely to hold (keywords and placeholders are not shown by a choice).
CATALOG: list[tuple[str, dict]] = [
    *(("language", {"language": lang}) for lang in LANGUAGES),
    ("lowercase", {}), ("capital", {}), ("no_comma", {}),
    ("short", {"relation": "less than", "num_words": 20}), ("short", {"relation": "less than", "num_words": 40}),
    ("title", {}), ("bullets", {"num_bullets": 3}), ("highlights", {"num_highlights": 2}),
    ("sections", {"section_spliter": "Section", "num_sections": 2}), ("paragraphs", {"num_paragraphs": 2}),
    ("json", {}), ("postscript", {"postscript_marker": "P.S."}), ("end_phrase", {"end_phrase": "Hope this helps!"}),
    ("quotation", {}),
]


def atom(kind: str, kwargs: dict) -> Atom:
    """The atom of a catalogue entry, phrased by its kind's first first-person training phrasing."""
    spec = KINDS[kind]
    shown = [v for k, v in kwargs.items() if k not in ("relation", "section_spliter")]
    name = kind + "".join(f":{v}" for v in shown)
    phrase = phrasings(kind)["first"][0].format(**{k: str(v) for k, v in spec.fill(kwargs, "en").items()})
    return Atom(name, kind, spec.instruction_id, kwargs, phrase)


def atoms() -> list[Atom]:
    return [atom(kind, kwargs) for kind, kwargs in CATALOG]


def features(text: str, catalogue: list[Atom]) -> frozenset[str]:
    return frozenset(a.id for a in catalogue if check(text, a.instruction_id, a.kwargs))


def build(n_questions: int, seed: int, data_dir: Path) -> Bank:
    rng = random.Random(seed)
    catalogue = atoms()
    bank = Bank(catalogue, [frozenset(c) for c in CONFLICTS], {})
    written = yaml.safe_load(ANSWERS.read_text())
    backbone = [a for a in read_jsonl(data_dir / "answers.jsonl") if not is_loop(a["answer"])]
    languages = [a for a in catalogue if a.kind == "language"]
    while len(bank.questions) < n_questions:
        hand = rng.random() < 0.4  # hand-written answers: the only ones an option in another language can come from
        row = rng.choice(written) if hand else rng.choice(backbone)
        prompt = row["prompt"]
        options: list[Option] = []
        for _ in range(50):
            if len(options) == 3:
                break
            size = rng.choice([0, 1, 1, 2, 2, 3]) if not options else rng.choice([1, 2, 2, 3])
            pool = catalogue if hand else [a for a in catalogue if a.kind != "language"]
            chosen = rng.sample(pool, size)
            if not bank.compatible(chosen):
                continue
            lang = next((a.kwargs["language"] for a in chosen if a in languages), None)
            base = row[lang or "en"] if hand else row["answer"]
            text = edit_answer(base, prompt, [a.check() for a in chosen if a.kind != "language"], rng)
            if text is None or is_loop(text):
                continue
            labels = features(text, catalogue)
            if {a.id for a in chosen} <= labels and all(labels != o.features for o in options):
                options.append(Option(f"o{len(options) + 1}", text, labels))
        if len(options) == 3:
            qid = f"q{len(bank.questions) + 1:04d}"
            bank.questions[qid] = Question(qid, prompt, tuple(options))
    return bank


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=str(REPO_ROOT / "train_aux" / "data-broad"))
    ap.add_argument("--out", default=str(DEFAULT_BANK))
    args = ap.parse_args(argv)
    bank = build(args.questions, args.seed, Path(args.data_dir))
    Path(args.out).write_text(json.dumps(bank.to_json(), ensure_ascii=False, indent=1) + "\n")
    print(f"{len(bank.questions)} questions, {len(bank.atoms)} preferences, {len(bank.hypotheses)} hypotheses -> {args.out}")


if __name__ == "__main__":
    main()
