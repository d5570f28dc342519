"""What a user prefers, inferred from their choices and ratings: a posterior over sets of checkable preferences.

Most users never write down what they prefer; they show it. Following PReF, the server asks a few questions (one
prompt, two or more candidate replies whose features IFEval's checkers labelled) picked to maximize the expected
information gain under a Bayesian posterior over the user's preference set; following PRIME, what it keeps is a compact
summary of the most probable set (semantic memory), written in words the auxiliary model was trained on, rather than the
interactions themselves. Ratings of the server's own replies update the same posterior.

The hypotheses are every compatible set of at most `max_size` preferences ("atoms": an IFEval instruction with its
kwargs, such as a response language or a word limit), at most one per kind. A user answers a question with the option
that satisfies most of their preferences (when every option satisfies equally many they answer "neither"), and likes a
reply that passes all of them; a share `noise` of answers and ratings is anything else.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NEITHER = "neither"
DEFAULT_BANK = Path(__file__).with_name("data") / "onboarding_questions.json"


@dataclass(frozen=True)
class Atom:
    """One checkable preference: an IFEval check with its kwargs, and the sentence a summary says it with."""

    id: str
    kind: str
    instruction_id: str
    kwargs: dict
    phrase: str

    def check(self) -> dict:
        return {"instruction_id": self.instruction_id, "kwargs": self.kwargs}


@dataclass(frozen=True)
class Option:
    id: str
    text: str
    features: frozenset[str]  # the atoms whose checks this reply passes


@dataclass(frozen=True)
class Question:
    id: str
    prompt: str
    options: tuple[Option, ...]

    @property
    def answers(self) -> tuple[str, ...]:
        return (*(o.id for o in self.options), NEITHER)

    def public(self) -> dict:
        """The question as a client sees it: no features."""
        return {"id": self.id, "prompt": self.prompt, "options": [{"id": o.id, "text": o.text} for o in self.options]}


@dataclass
class Bank:
    """The atoms, which kinds cannot hold together, and the questions (`python -m train_aux.onboarding_bank`)."""

    atoms: list[Atom]
    conflicts: list[frozenset[str]]  # kinds
    questions: dict[str, Question]
    max_size: int = 3
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_BANK) -> Bank:
        data = json.loads(Path(path).read_text())
        atoms = [Atom(**a) for a in data["atoms"]]
        questions = {q["id"]: Question(q["id"], q["prompt"], tuple(Option(o["id"], o["text"], frozenset(o["features"]))
                                                                    for o in q["options"])) for q in data["questions"]}
        return cls(atoms, [frozenset(c) for c in data["conflicts"]], questions, data.get("max_size", 3))

    def to_json(self) -> dict:
        return {"max_size": self.max_size, "atoms": [a.__dict__ for a in self.atoms],
                "conflicts": [sorted(c) for c in self.conflicts],
                "questions": [{"id": q.id, "prompt": q.prompt, "options": [
                    {"id": o.id, "text": o.text, "features": sorted(o.features)} for o in q.options]}
                    for q in self.questions.values()]}

    @functools.cached_property
    def atom_index(self) -> dict[str, int]:
        return {a.id: i for i, a in enumerate(self.atoms)}

    def compatible(self, atoms: Iterable[Atom]) -> bool:
        kinds = [a.kind for a in atoms]
        return len(set(kinds)) == len(kinds) and not any(c <= set(kinds) for c in self.conflicts)

    @functools.cached_property
    def hypotheses(self) -> list[tuple[int, ...]]:
        """Every compatible set of 0..max_size atoms, as sorted atom indices."""
        return [combo for size in range(self.max_size + 1) for combo in itertools.combinations(range(len(self.atoms)), size)
                if self.compatible(self.atoms[i] for i in combo)]

    @functools.cached_property
    def incidence(self) -> np.ndarray:
        """[hypotheses, atoms]: 1 where the hypothesis holds the atom."""
        out = np.zeros((len(self.hypotheses), len(self.atoms)))
        for h, combo in enumerate(self.hypotheses):
            out[h, list(combo)] = 1
        return out

    @functools.cached_property
    def log_prior(self) -> np.ndarray:
        """Each size of set (1..max_size) equally likely, and no preference at all a tenth as likely; uniform within."""
        sizes = self.incidence.sum(1)
        weight = np.where(sizes == 0, 0.1, 1.0) / np.array([np.sum(sizes == s) for s in sizes])
        return np.log(weight / weight.sum())

    def features(self, items: Iterable[str]) -> np.ndarray:
        vec = np.zeros(len(self.atoms))
        vec[[self.atom_index[a] for a in items if a in self.atom_index]] = 1
        return vec

    def answer_likelihood(self, question: Question, noise: float) -> np.ndarray:
        """[hypotheses, answers]: P(answer | hypothesis), answers in `question.answers` order."""
        key = (question.id, noise)
        if key not in self._cache:
            utility = self.incidence @ np.stack([self.features(o.features) for o in question.options], axis=1)
            best = utility == utility.max(1, keepdims=True)
            tied = best.all(1, keepdims=True)
            chosen = np.concatenate([best & ~tied, tied], axis=1)  # the answers a noise-free user gives
            count = chosen.sum(1, keepdims=True)
            others = chosen.shape[1] - count
            self._cache[key] = np.where(chosen, (1 - noise) / count, noise / np.maximum(others, 1))
        return self._cache[key]


def simulated_answer(question: Question, atoms: set[str], noise: float, rng: np.random.Generator) -> str:
    """A user with preference set `atoms`: the option passing most of them ("neither" when all tie); with
    probability `noise`, one of the other answers."""
    utility = np.array([len(atoms & o.features) for o in question.options])
    best = utility == utility.max()
    chosen = [o.id for o, b in zip(question.options, best) if b] if not best.all() else [NEITHER]
    others = [a for a in question.answers if a not in chosen]
    if others and rng.random() < noise:
        return str(rng.choice(others))
    return str(rng.choice(chosen))


class Posterior:
    """P(preference set | evidence) over `bank.hypotheses`."""

    def __init__(self, bank: Bank, noise: float = 0.05) -> None:
        if not 0 < noise < 1:
            raise ValueError("noise must be in (0, 1): a posterior that trusts every answer cannot recover from a slip")
        self.bank, self.noise = bank, noise
        self.log = bank.log_prior.copy()

    @property
    def probabilities(self) -> np.ndarray:
        p = np.exp(self.log - self.log.max())
        return p / p.sum()

    def observe_choice(self, question: Question, answer: str) -> None:
        self.log += np.log(self.bank.answer_likelihood(question, self.noise)[:, question.answers.index(answer)])
        self.log -= self.log.max()

    def observe_rating(self, features: Iterable[str], rating: int) -> None:
        """A rated reply: liked (+1) when it passes every preference of the set, disliked otherwise, but for slips."""
        inc = self.bank.incidence
        passes_all = inc @ self.bank.features(features) == inc.sum(1)
        liked = np.where(passes_all, 1 - self.noise, self.noise)
        self.log += np.log(liked if rating > 0 else 1 - liked)
        self.log -= self.log.max()

    def information_gain(self, question: Question) -> float:
        """Expected reduction of the posterior's entropy from the user's answer to `question` (in nats)."""
        lik = self.bank.answer_likelihood(question, self.noise)
        p = self.probabilities
        predictive = p @ lik
        return float(_entropy(predictive) - p @ _entropy(lik))

    def best_question(self, asked: Iterable[str] = ()) -> Question:
        done = set(asked)
        candidates = [q for q in self.bank.questions.values() if q.id not in done]
        return max(candidates, key=self.information_gain)  # first of equals: the bank's order

    def most_probable(self) -> tuple[list[Atom], float]:
        p = self.probabilities
        h = int(np.argmax(p))
        return [self.bank.atoms[i] for i in self.bank.hypotheses[h]], float(p[h])

    def marginals(self) -> np.ndarray:
        """P(the user holds atom i), per atom."""
        return self.probabilities @ self.bank.incidence


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1))).sum(-1)


def summary_of(atoms: list[Atom]) -> str:
    """The summary the auxiliary model reads: each preference in the words it was trained on."""
    return " ".join(a.phrase for a in atoms)


def profile_of(atoms: list[Atom], posterior: Posterior) -> list[dict]:
    marginals = posterior.marginals()
    return [{"preference": a.id, **a.check(), "probability": round(float(marginals[posterior.bank.atom_index[a.id]]), 4)}
            for a in atoms]
