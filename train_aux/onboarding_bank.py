"""Build the preference memory's question bank (`softthought/data/onboarding_questions.json`).

Each question is a prompt with three candidate replies: the backbone's own answer (or a hand-written one, in English
or a response language) minimally edited towards one to three preferences, the way training targets are. IFEval's
checkers then label every reply with every preference it passes, intended or not, and a reply is kept only if it
passes the ones it was edited towards.

Each preference is then phrased, for the summaries onboarding writes, in the words the auxiliary checkpoint follows
best: among its kind's training phrasings (held-out ones excluded), the one whose soft thoughts pass its check most
often on training prompts (about 5 min on 2 cores).

    python -m train_aux.onboarding_bank [--questions 400 --seed 0 --aux DIR --out softthought/data/onboarding_questions.json]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from softthought.aux_model import SoftThoughtAux
from softthought.backbone import Backbone, load_backbone
from softthought.generation import Engine, SamplingParams
from softthought.ifeval import check
from softthought.pipeline import default_aux_dir
from softthought.preference_memory import DEFAULT_BANK, Atom, Bank, Option, Question
from softthought.splice import build_chat_prompt

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


#: The training phrasings a preference may be said with: a person's own voice, in English.
PHRASE_STYLES = (("first", 4), ("polite", 2), ("terse", 2))


def _said(kind: str, kwargs: dict, template: str) -> str:
    return template.format(**{k: str(v) for k, v in KINDS[kind].fill(kwargs, "en").items()})


def atom(kind: str, kwargs: dict) -> Atom:
    """The atom of a catalogue entry, phrased by its kind's first first-person training phrasing."""
    spec = KINDS[kind]
    shown = [v for k, v in kwargs.items() if k not in ("relation", "section_spliter")]
    name = kind + "".join(f":{v}" for v in shown)
    return Atom(name, kind, spec.instruction_id, kwargs, _said(kind, kwargs, phrasings(kind)["first"][0]))


def phrase_for(catalogue: list[Atom], backbone: Backbone, aux: SoftThoughtAux, prompts: list[str],
               max_new_tokens: int = 96) -> list[Atom]:
    """Each atom phrased as the checkpoint's thoughts follow it best on `prompts` (ties: the earlier phrasing)."""
    candidates = {a.id: list(dict.fromkeys(_said(a.kind, a.kwargs, t) for style, n in PHRASE_STYLES
                                           for t in (phrasings(a.kind).get(style) or [])[:-1][:n])) for a in catalogue}
    jobs = [(a, text, p) for a in catalogue for text in candidates[a.id] for p in prompts]
    with torch.no_grad():
        thoughts = {text: aux.encode([text])[0] for texts in candidates.values() for text in texts}
    tok = backbone.tokenizer
    guidance = aux.config.guidance  # read as served
    built = [build_chat_prompt(tok, [{"role": "user", "content": p}], thoughts[text], placement=aux.placement,
                               guided=guidance != 1) for _, text, p in jobs]
    print(f"phrasing {len(catalogue)} preferences: {len(jobs)} replies", flush=True)
    replies = Engine(backbone).generate(built, SamplingParams(max_tokens=max_new_tokens, temperature=0, guidance=guidance,
                                                              guidance_gate=aux.config.guidance_gate))
    passed: dict[tuple[str, str], int] = {}
    for (a, text, _), r in zip(jobs, replies):
        passed[a.id, text] = passed.get((a.id, text), 0) + check(r.text, a.instruction_id, a.kwargs)
    return [replace(a, phrase=max(candidates[a.id], key=lambda t, a=a: passed[a.id, t])) for a in catalogue]


def atoms() -> list[Atom]:
    return [atom(kind, kwargs) for kind, kwargs in CATALOG]


def features(text: str, catalogue: list[Atom]) -> frozenset[str]:
    return frozenset(a.id for a in catalogue if check(text, a.instruction_id, a.kwargs))


def build(n_questions: int, seed: int, data_dir: Path, catalogue: list[Atom] | None = None) -> Bank:
    rng = random.Random(seed)
    catalogue = catalogue or atoms()
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
    ap.add_argument("--aux", help="the checkpoint whose thoughts the summaries' phrasings are chosen for (default: the "
                                  "shipped one)")
    ap.add_argument("--phrase-prompts", type=int, default=6, help="training prompts each phrasing is tried on")
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    prompts = [r["prompt"] for r in read_jsonl(data / "train_prompts.jsonl")][: args.phrase_prompts]
    backbone = load_backbone(None, dtype="bfloat16")
    aux = SoftThoughtAux.from_pretrained(args.aux or default_aux_dir(), backbone=backbone).eval()
    bank = build(args.questions, args.seed, data, phrase_for(atoms(), backbone, aux, prompts))
    Path(args.out).write_text(json.dumps({**bank.to_json(), "phrased_for": aux.version}, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(bank.questions)} questions, {len(bank.atoms)} preferences, {len(bank.hypotheses)} hypotheses -> {args.out}")


if __name__ == "__main__":
    main()
