"""Evaluate the preference memory with simulated users (`python -m train_aux.eval onboarding`).

Simulated users hold one to three preferences of the question bank's catalogue, hidden from the server. They answer
each question by IFEval's checkers (the option passing most of their preferences; "neither" when all tie), a share
`noise` of answers flipped to another answer, and like a reply when it passes all of their preferences.

1. Recovery: how often the most probable set is exactly the hidden one after k questions, adaptive selection
   (expected information gain) against questions drawn at random, without noise and with it.
2. End to end: the soft thoughts of the summary onboarding learned (the server's stopping rule) against those of
   the user's own summary (a held-out phrasing of each preference, as a person would write it) and against none, on
   the same prompts and checks.
3. Semantic against episodic memory (PRIME): for users with a rated history, the thoughts of the summary learned from
   their ratings against their liked replies placed in the prompt as examples (text).
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

from softthought.aux_model import SoftThoughtAux
from softthought.backbone import Backbone
from softthought.preference_memory import DEFAULT_BANK, Bank, Posterior, simulated_answer, summary_of

from .users import STYLES, phrase

NOISES = (0.0, 0.1)


def hidden_users(bank: Bank, n: int, seed: int) -> list[tuple[int, ...]]:
    """n preference sets of one to three atoms, drawn uniformly among the bank's hypotheses of each size."""
    rng = np.random.default_rng(seed)
    by_size = {s: [h for h in bank.hypotheses if len(h) == s] for s in (1, 2, 3)}
    return [by_size[s][rng.integers(len(by_size[s]))] for s in rng.choice([1, 2, 3], n)]


def onboard(bank: Bank, truth: set[str], noise: float, adaptive: bool, questions: int, rng: np.random.Generator,
            confidence: float | None = None, model_noise: float = 0.05) -> tuple[list[set[str]], Posterior]:
    """The most probable set after each question (stopping early once it is `confidence` likely, if given)."""
    post, asked, guesses = Posterior(bank, model_noise), [], []
    order = list(rng.permutation(list(bank.questions)))
    for _ in range(questions):
        q = post.best_question(asked) if adaptive else bank.questions[order[len(asked)]]
        asked.append(q.id)
        post.observe_choice(q, simulated_answer(q, truth, noise, rng))
        atoms, p = post.most_probable()
        guesses.append({a.id for a in atoms})
        if confidence is not None and p >= confidence:
            break
    return guesses, post


def recovery(bank: Bank, n_users: int, questions: int, seed: int) -> dict:
    users = hidden_users(bank, n_users, seed)
    out = {"n_users": n_users, "questions": questions, "curves": {}}
    for noise in NOISES:
        for adaptive in (True, False):
            rng = np.random.default_rng(seed + 1)
            hits = np.zeros(questions)
            for h in users:
                truth = {bank.atoms[i].id for i in h}
                guesses, _ = onboard(bank, truth, noise, adaptive, questions, rng)
                hits += [g == truth for g in guesses]
            rate = hits / n_users
            name = f"{'adaptive' if adaptive else 'random'}_noise_{noise}"
            out["curves"][name] = {"recovered": [round(float(r), 4) for r in rate],
                                   "se": [round(float(np.sqrt(r * (1 - r) / n_users)), 4) for r in rate],
                                   "questions_to_80": next((k + 1 for k, r in enumerate(rate) if r >= 0.8), None)}
            print(f"onboarding/{name}: recovered {' '.join(f'{r:.2f}' for r in rate)}", flush=True)
    return out


def _written(bank: Bank, h: tuple[int, ...], rng: random.Random) -> str:
    """The user's own summary: each preference in a held-out phrasing of one style, as a person writes it."""
    style = rng.choice(STYLES)
    return " ".join(phrase(bank.atoms[i].kind, bank.atoms[i].kwargs, style, rng, held_out=True) for i in h)


def end_to_end(backbone: Backbone, aux: SoftThoughtAux, bank: Bank, prompts: list[str], n_users: int, seed: int,
               pairs_per_user: int, max_new_tokens: int, questions: int, confidence: float) -> dict:
    from .eval import paired_checks, personalization

    rng, text_rng = np.random.default_rng(seed + 2), random.Random(seed)
    out = {}
    for noise in NOISES:
        base, learned, exact = [], [], 0
        for j, h in enumerate(hidden_users(bank, n_users, seed + 3)):
            truth = [bank.atoms[i] for i in h]
            user = {"user": f"sim-{j:03d}", "checks": [a.check() for a in truth], "summary": _written(bank, h, text_rng)}
            guesses, post = onboard(bank, {a.id for a in truth}, noise, True, questions, rng, confidence)
            atoms, _ = post.most_probable()
            exact += guesses[-1] == {a.id for a in truth}
            base.append(user)
            learned.append({**user, "summary": summary_of(atoms)})
        own = personalization(backbone, aux, base, prompts, pairs_per_user, max_new_tokens, seed, ("none", "soft"))
        mem = personalization(backbone, aux, learned, prompts, pairs_per_user, max_new_tokens, seed, ("soft",))
        rates = {"none": own["none"]["check_pass_rate"], "own_summary": own["soft"]["check_pass_rate"],
                 "learned_summary": mem["soft"]["check_pass_rate"]}
        out[f"noise_{noise}"] = {
            "n_users": n_users, "n_checks": own["soft"]["n_checks"], "exactly_recovered": exact / n_users,
            "check_pass_rate": rates, "learned_over_own": rates["learned_summary"] / max(rates["own_summary"], 1e-9),
            "learned_minus_own": paired_checks(own["soft"]["passed"], mem["soft"]["passed"], own["pairs"]),
            "learned_minus_none": paired_checks(own["none"]["passed"], mem["soft"]["passed"], own["pairs"]),
            "samples": [{"user": u["user"], "own": u["summary"], "learned": m["summary"]} for u, m in zip(base, learned)][:10],
        }
        print(f"onboarding/end-to-end noise {noise}: {rates}", flush=True)
    return out


def semantic_vs_episodic(backbone: Backbone, aux: SoftThoughtAux, bank: Bank, prompts: list[str], n_users: int,
                         seed: int, pairs_per_user: int, max_new_tokens: int, history: int = 12,
                         examples: int = 3) -> dict:
    """Users rate `history` replies of the bank (half of them ones they like where the bank has them); the summary the
    ratings teach (soft thoughts) against up to `examples` liked replies shown as examples (text)."""
    from .eval import paired_checks, personalization

    rng = np.random.default_rng(seed + 4)
    options = [o for q in bank.questions.values() for o in q.options]
    semantic, episodic = [], []
    for j, h in enumerate(hidden_users(bank, 4 * n_users, seed + 5)):
        truth = {bank.atoms[i].id for i in h}
        liked = [o for o in options if truth <= o.features]
        if len(semantic) == n_users or len(liked) < 3:
            continue
        disliked = [o for o in options if not truth <= o.features]
        rated = ([(o, 1) for o in rng.choice(liked, min(len(liked), history // 2), replace=False)]
                 + [(o, -1) for o in rng.choice(disliked, history // 2, replace=False)])
        post = Posterior(bank)
        for o, r in rated:
            post.observe_rating(o.features, r)
        atoms, _ = post.most_probable()
        checks = [bank.atoms[bank.atom_index[a]].check() for a in sorted(truth)]
        shown = "\n\n".join(f"Example {k + 1}:\n{o.text}" for k, (o, r) in enumerate([x for x in rated if x[1] > 0][:examples]))
        semantic.append({"user": f"rated-{j:03d}", "checks": checks, "summary": summary_of(atoms)})
        episodic.append({"user": f"rated-{j:03d}", "checks": checks,
                         "summary": f"Replies I liked before, as examples of how to answer me:\n\n{shown}"})
    sem = personalization(backbone, aux, semantic, prompts, pairs_per_user, max_new_tokens, seed, ("soft",))
    epi = personalization(backbone, aux, episodic, prompts, pairs_per_user, max_new_tokens, seed, ("text",))
    rates = {"semantic_soft": sem["soft"]["check_pass_rate"], "episodic_text": epi["text"]["check_pass_rate"]}
    print(f"onboarding/semantic vs episodic: {rates}", flush=True)
    return {"n_users": len(semantic), "n_checks": sem["soft"]["n_checks"], "history": history, "check_pass_rate": rates,
            "semantic_minus_episodic": paired_checks(epi["text"]["passed"], sem["soft"]["passed"], sem["pairs"])}


def bank_digest() -> str:
    """Which question bank an evaluation read: a rebuilt bank (`train_aux.onboarding_bank`) is evaluated again."""
    return hashlib.sha256(DEFAULT_BANK.read_bytes()).hexdigest()[:16]


def evaluate(backbone: Backbone, aux: SoftThoughtAux, prompts: list[str], seed: int = 0, recovery_users: int = 300,
             questions: int = 10, confidence: float = 0.95, n_users: int = 60, pairs_per_user: int = 2,
             max_new_tokens: int = 96) -> dict:
    """All three measurements on the shipped question bank."""
    bank = Bank.load()
    gen = (prompts, n_users, seed, pairs_per_user, max_new_tokens)
    return {"bank": bank_digest(), "recovery": recovery(bank, recovery_users, questions, seed),
            "end_to_end": end_to_end(backbone, aux, bank, *gen, questions, confidence),
            "semantic_vs_episodic": semantic_vs_episodic(backbone, aux, bank, *gen),
            "settings": {"seed": seed, "questions": questions, "confidence": confidence, "n_users": n_users,
                         "pairs_per_user": pairs_per_user, "max_new_tokens": max_new_tokens}}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["recovery"]["curves"]
    fig, axes = plt.subplots(1, len(NOISES), figsize=(5 * len(NOISES), 3.6), sharey=True)
    for ax, noise in zip(axes, NOISES):
        for kind, style in (("adaptive", "-o"), ("random", "--s")):
            c = curves[f"{kind}_noise_{noise}"]
            k = np.arange(1, len(c["recovered"]) + 1)
            ax.errorbar(k, c["recovered"], yerr=c["se"], fmt=style, ms=3, capsize=2, label=kind)
        ax.set(title=f"{int(noise * 100)} % of answers flipped", xlabel="questions asked", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hidden preference set recovered exactly")
    axes[0].legend()
    fig.suptitle(f"Onboarding, {report['recovery']['n_users']} simulated users with 1-3 preferences")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
