"""The preference memory: onboarding sessions and feedback, on top of the store and the question bank.

A session asks the question of highest expected information gain under the user's posterior, one at a time, until
the most probable preference set is `confidence` likely or `max_questions` were asked; it then stores that set's
summary (`summary_source` "onboarding") and keeps the answers as the user's evidence. A rating of one of the server's
own completions (kept only when the request said `store: true`) adds the reply's checked features to that evidence;
once there are `min_ratings` ratings and the posterior is confident of a set other than the stored one, the summary is
revised (`summary_source` "feedback"). A summary the client wrote itself is never overwritten by ratings.

Sessions live in the store, so they survive a restart of the server and are shared by every Ingress replica.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .ifeval import check
from .preference_memory import Bank, Posterior, profile_of, summary_of
from .protocol import APIError
from .store import PreferenceStore

MAX_EVIDENCE = 500  # a user's latest answers and ratings; older ones are dropped


@dataclass(frozen=True)
class MemorySettings:
    max_questions: int = 10
    confidence: float = 0.95
    noise: float = 0.05  # the share of answers and ratings the posterior allows to be slips
    session_ttl_s: float = 3600.0
    min_ratings: int = 3
    completion_retention_s: float = 30 * 86400.0
    max_stored_completions: int = 50


class PreferenceMemory:
    def __init__(self, store: PreferenceStore, bank: Bank, settings: MemorySettings) -> None:
        self.store, self.bank, self.settings = store, bank, settings

    def posterior(self, evidence: list[dict]) -> Posterior:
        post = Posterior(self.bank, self.settings.noise)
        for item in evidence:
            if "rating" in item:
                post.observe_rating(item["features"], item["rating"])
            elif (question := self.bank.questions.get(item["question"])) is not None:  # a bank may drop questions
                post.observe_choice(question, item["answer"])
        return post

    # -------------------------------------------------------------------------- onboarding
    def start(self, tenant: str, user: str) -> dict:
        session = "onb-" + uuid.uuid4().hex
        question = Posterior(self.bank, self.settings.noise).best_question()
        expires_at = time.time() + self.settings.session_ttl_s
        self.store.save_session(session, tenant, user, {"answers": [], "current": question.id}, expires_at)
        return {"session": session, "user": user, "expires_at": int(expires_at), "question_number": 1,
                "max_questions": self.settings.max_questions, "question": question.public()}

    def answer(self, tenant: str, user: str, session: str, question_id: str, choice: str) -> dict:
        found = self.store.load_session(session, tenant, user)
        if found is None:
            raise APIError(404, f"No onboarding session '{session}' for user '{user}'.", param="session",
                           code="session_not_found")
        state, expires_at = found
        if expires_at < time.time():
            self.store.end_session(session)
            raise APIError(410, f"The onboarding session '{session}' expired; start a new one.", param="session",
                           code="session_expired")
        if question_id != state["current"]:
            raise APIError(409, f"Question '{question_id}' is not the one this session asked; answer "
                                f"'{state['current']}'.", param="question", code="question_not_asked")
        question = self.bank.questions[question_id]
        if choice not in question.answers:
            raise APIError(400, f"'{choice}' is not an option of question '{question_id}'; choose one of "
                                f"{', '.join(question.answers)}.", param="choice", code="invalid_value")
        answers = [*state["answers"], {"question": question_id, "answer": choice}]
        post = self.posterior(answers)
        atoms, probability = post.most_probable()
        if probability < self.settings.confidence and len(answers) < min(self.settings.max_questions, len(self.bank.questions)):
            nxt = post.best_question(a["question"] for a in answers)
            self.store.save_session(session, tenant, user, {"answers": answers, "current": nxt.id}, expires_at)
            return {"session": session, "done": False, "question_number": len(answers) + 1,
                    "max_questions": self.settings.max_questions, "question": nxt.public()}
        profile = profile_of(atoms, post)
        pref = self.store.put(tenant, user, summary_of(atoms), "onboarding", profile)
        self.store.set_evidence(tenant, user, answers)
        self.store.end_session(session)
        return {"session": session, "done": True, "summary": pref.summary, "preference_version": pref.version,
                "profile": profile, "questions_asked": len(answers), "confidence": round(probability, 4)}

    # -------------------------------------------------------------------------- feedback
    def keep(self, completion: str, tenant: str, user: str, texts: list[str]) -> None:
        self.store.keep_completion(completion, tenant, user, texts, self.settings.completion_retention_s,
                                   self.settings.max_stored_completions)

    def rate(self, tenant: str, user: str | None, completion: str, rating: int, choice: int = 0) -> dict:
        """A rating of a kept completion by its own user (`user`, if given, must be that user)."""
        found = self.store.completion(completion, tenant, user)
        if found is None:
            whose = f" for user '{user}'" if user else ""
            raise APIError(404, f"No stored completion '{completion}'{whose}: only completions requested with store: "
                                "true and a user, within their retention, can be rated, by that user.", param="id",
                           code="completion_not_found")
        user, texts = found
        if choice >= len(texts):
            raise APIError(400, f"The completion has {len(texts)} choice(s); choice {choice} does not exist.",
                           param="choice", code="invalid_value")
        features = sorted(a.id for a in self.bank.atoms if check(texts[choice], a.instruction_id, a.kwargs))
        evidence = [*self.store.evidence(tenant, user), {"features": features, "rating": rating}][-MAX_EVIDENCE:]
        self.store.set_evidence(tenant, user, evidence)
        out = {"id": completion, "user": user, "rating": rating, "recorded": True, "summary_revised": False}
        current = self.store.get(tenant, user)
        if current is not None and current.summary_source == "put":
            return out
        ratings = sum("rating" in e for e in evidence)
        post = self.posterior(evidence)
        atoms, probability = post.most_probable()
        known = {p["preference"] for p in (current.profile or [])} if current else None
        if atoms and ratings >= self.settings.min_ratings and probability >= self.settings.confidence \
                and {a.id for a in atoms} != known:
            pref = self.store.put(tenant, user, summary_of(atoms), "feedback", profile_of(atoms, post))
            out.update(summary_revised=True, summary=pref.summary, preference_version=pref.version, profile=pref.profile)
        return out
