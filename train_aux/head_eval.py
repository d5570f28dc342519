"""The language head's choices on users it was not trained on: the reply form (a response language or a case) it names
for each summary against the one the summary asks for: what a phase that trains the head is judged on (EXPERIMENTS.md).

    python -m train_aux.eval head --json OUT.json                  # the head-dev sets below
    python -m train_aux.eval head --users U.jsonl --json OUT.json
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from softthought.aux_model import SoftThoughtAux

from .data import read_jsonl
from .train import CASES, reply_forms
from .users import make_users

#: right: the form asked for; false: a form for a user who asked for none of the head's; missed: none for one who
#: asked; wrong: another form than the one asked for.
OUTCOMES = ("right", "false", "missed", "wrong")


def head_dev_sets(data_dir: Path) -> dict[str, list[dict]]:
    """Generated users in held-out phrasings (seeds no training set uses), users who mention languages (most without
    asking for one), users who mention languages and ask for one, the hand-written head-dev summaries (most in a
    language other than the one they ask for) with the hand-written users, and the dev users."""
    return {
        "held-out": make_users(800, 31, "hd", held_out_phrasing=True),
        "mentions": make_users(600, 32, "hm", held_out_phrasing=True, mentions=True),
        "asking": make_users(200, 33, "ha", held_out_phrasing=True, include=("language",), mentions=True),
        "hand": read_jsonl(data_dir / "language_head_dev.jsonl") + read_jsonl(data_dir / "hand_users.jsonl"),
        "dev": read_jsonl(data_dir / "dev_users.jsonl"),
    }


def group_of(code: str) -> str:
    return "case" if code in CASES.values() else "language"


def tally(wanted: list[str | None], named: list[str | None]) -> dict:
    """Per group (language, case): how many users asked for one of its forms, how many did not, and the outcomes
    (`OUTCOMES`) of the head's choices, each user counted in the group of the form asked for (else of the one named)."""
    asked, counts = Counter(), Counter()
    for want, got in zip(wanted, named, strict=True):
        if want is not None:
            asked[group_of(want)] += 1
        if want is None and got is None:
            continue
        outcome = "right" if want == got else "false" if want is None else "missed" if got is None else "wrong"
        counts[group_of(want or got), outcome] += 1
    return {g: {"asked": asked[g], "not_asked": len(wanted) - asked[g], **{o: counts[g, o] for o in OUTCOMES}}
            for g in ("language", "case")}


@torch.no_grad()
def head_choices(aux: SoftThoughtAux, users: list[dict], batch: int = 32) -> tuple[list[str | None], list[str | None]]:
    """For each user, the first form their checks ask for that the head knows, and the one it names (None: none)."""
    codes = aux.config.languages
    wanted = [next((f for f in reply_forms(u["checks"]) if f in codes), None) for u in users]
    named = []
    for i in tqdm(range(0, len(users), batch), desc="head choices", unit="batch"):
        chosen = aux.chosen_languages(aux.language_logits([u["summary"] for u in users[i:i + batch]]))
        named += [codes[int(row.argmax())] if row.sum() > 0 else None for row in chosen]
    return wanted, named


def evaluate(aux: SoftThoughtAux, sets: dict[str, list[dict]]) -> dict:
    """Each set's tally, with the users whose choice was not right (to read what the head got wrong)."""
    if not aux.config.languages:
        raise ValueError("this checkpoint has no language head")
    report = {"languages": list(aux.config.languages), "language_confidence": aux.config.language_confidence, "sets": {}}
    for name, users in sets.items():
        wanted, named = head_choices(aux, users)
        report["sets"][name] = {"n": len(users), **tally(wanted, named),
                        "not_right": [{"user": u["user"], "summary": u["summary"], "asked": w, "named": g}
                                      for u, w, g in zip(users, wanted, named) if w != g]}
    return report
