"""Synthetic users with checkable preferences, phrased many ways.

A user is {"user", "summary", "checks"}: the summary is free text in one of several styles (first person,
third person, terse notes, or French/Spanish/German), optionally padded with unrelated persona facts as a
real "semantic memory" would be; the checks are IFEval instruction ids with kwargs. Each style has several
phrasing variants per preference; the last variant of every style is held out of training, so evaluation
can use phrasings the auxiliary model never saw, as well as users it never saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

END_PHRASES = ["Cheers!", "Hope this helps!", "Have a great day!", "Stay curious.", "That is all."]
KEYWORDS = ["banana", "sunshine", "galaxy", "river", "pencil", "harmony", "compass", "lantern"]
WORD_LIMITS = [20, 30, 40]
PERSONAS = [
    "I live in Ohio and work as a nurse.", "I have two cats.", "My favourite season is autumn.",
    "I'm studying economics.", "I work night shifts.", "I like hiking on weekends.", "I'm a retired teacher.",
    "I play the violin.", "I'm learning to cook.", "I commute by bike.",
]
PERSONAS_THIRD = [
    "Lives in Ohio, works as a nurse.", "Has two cats.", "Favourite season: autumn.", "Studies economics.",
    "Works night shifts.", "Enjoys weekend hikes.", "Retired teacher.", "Plays the violin.",
]

# Phrasings: preference -> style -> variants. "{x}" is the preference's parameter. The last variant of
# each style is held out of training.
PHRASINGS: dict[str, dict[str, list[str]]] = {
    "lowercase": {
        "first": ["I prefer answers written entirely in lowercase letters.", "Please never use capital letters when you answer me.",
                  "I like replies in all lowercase, no capitals at all.", "Write to me only in lowercase, please."],
        "third": ["The user wants responses in lowercase only.", "Prefers answers with no capital letters.",
                  "They like every reply written in lowercase.", "This person asks for all-lowercase text."],
        "terse": ["lowercase only", "no caps", "all lowercase", "reply lowercase"],
        "foreign": ["Je préfère des réponses entièrement en minuscules (in English).",
                    "Prefiero respuestas solo en minúsculas (in English).",
                    "Bitte antworte nur in Kleinbuchstaben (in English)."],
    },
    "capital": {
        "first": ["I want every answer written in CAPITAL LETTERS.", "Please answer me in all caps.",
                  "I like replies entirely in uppercase.", "Write your answers to me in capital letters only."],
        "third": ["The user wants all responses in uppercase.", "Prefers answers written in all capital letters.",
                  "They like every reply in caps.", "This person asks for uppercase-only answers."],
        "terse": ["ALL CAPS", "uppercase only", "caps lock answers", "capital letters only"],
        "foreign": ["Je veux des réponses en MAJUSCULES (in English).", "Quiero respuestas en MAYÚSCULAS (in English).",
                    "Antworte bitte nur in GROSSBUCHSTABEN (in English)."],
    },
    "end_phrase": {
        "first": ["I like answers that end with the exact phrase \"{x}\"", "Please always finish your reply with \"{x}\"",
                  "End every answer to me with: {x}", "I want your last words to always be \"{x}\""],
        "third": ["The user wants each response to end with \"{x}\"", "Prefers replies that finish with the phrase \"{x}\"",
                  "They like answers closing with \"{x}\"", "This person asks that every answer end in \"{x}\""],
        "terse": ["sign-off: \"{x}\"", "end with \"{x}\"", "closing line \"{x}\"", "always finish: \"{x}\""],
        "foreign": ["Termine toujours tes réponses par \"{x}\"", "Termina siempre tus respuestas con \"{x}\"",
                    "Beende jede Antwort mit \"{x}\""],
    },
    "quotation": {
        "first": ["I like the whole answer wrapped in double quotation marks.", "Please put your entire reply inside double quotes.",
                  "Wrap everything you say to me in quotation marks.", "I want answers enclosed in double quotes."],
        "third": ["The user wants the full response wrapped in double quotes.", "Prefers replies enclosed in quotation marks.",
                  "They like answers inside double quotation marks.", "This person asks for quoted responses."],
        "terse": ["wrap answer in \"quotes\"", "double-quoted replies", "quote the whole answer", "answers in quotes"],
        "foreign": ["Mets toute ta réponse entre guillemets doubles.", "Pon toda tu respuesta entre comillas dobles.",
                    "Setze die ganze Antwort in doppelte Anführungszeichen."],
    },
    "keywords": {
        "first": ["I like it when answers mention the words {x}.", "Please always include the words {x} in your reply.",
                  "Work the words {x} into every answer for me.", "I want to see the words {x} in what you write."],
        "third": ["The user wants responses to contain the words {x}.", "Prefers answers that use the words {x}.",
                  "They like replies mentioning {x}.", "This person asks that answers include {x}."],
        "terse": ["must mention: {x}", "include words {x}", "keywords {x}", "always say {x}"],
        "foreign": ["Utilise toujours les mots {x} dans tes réponses.", "Incluye siempre las palabras {x}.",
                    "Verwende immer die Wörter {x}."],
    },
    "no_comma": {
        "first": ["I can't stand commas, so please never use any.", "Please answer me without a single comma.",
                  "I prefer replies with no commas at all.", "Don't use commas when you write to me."],
        "third": ["The user wants responses with no commas.", "Prefers answers without any commas.",
                  "They dislike commas in replies.", "This person asks for comma-free text."],
        "terse": ["no commas", "zero commas", "avoid commas", "comma-free"],
        "foreign": ["N'utilise jamais de virgules.", "No uses comas nunca.", "Benutze niemals Kommas."],
    },
    "postscript": {
        "first": ["I like every answer to end with a postscript starting with {x}", "Please add a {x} note at the end of your replies.",
                  "Always include a postscript ({x}) after your answer.", "I want a {x} line at the bottom of each reply."],
        "third": ["The user wants a postscript starting with {x} at the end.", "Prefers answers followed by a {x} note.",
                  "They like replies that close with a {x} postscript.", "This person asks for a {x} section after answers."],
        "terse": ["add {x} at end", "postscript {x}", "include a {x} line", "end with a {x} note"],
        "foreign": ["Ajoute toujours un post-scriptum {x} à la fin.", "Añade siempre una posdata {x} al final.",
                    "Füge immer ein {x} am Ende hinzu."],
    },
    "title": {
        "first": ["I like answers that start with a title in double angular brackets, like <<Title>>.",
                  "Please give every reply a title wrapped in << and >>.",
                  "Begin your answers with a title such as <<My Title>>.", "I want a <<title>> at the top of each answer."],
        "third": ["The user wants each response to have a title in double angular brackets, e.g. <<Title>>.",
                  "Prefers replies headed by a <<title>>.", "They like answers that open with a <<title>>.",
                  "This person asks for a title like <<this>> on every reply."],
        "terse": ["title in <<brackets>>", "start with <<title>>", "<<title>> first", "headline as <<...>>"],
        "foreign": ["Commence chaque réponse par un titre entre <<chevrons>>.", "Empieza con un título entre <<corchetes angulares>>.",
                    "Beginne jede Antwort mit einem Titel in <<spitzen Klammern>>."],
    },
    "short": {
        "first": ["I like short answers, fewer than {x} words.", "Please keep your replies under {x} words.",
                  "Answer me in less than {x} words.", "I want brief answers: under {x} words each."],
        "third": ["The user wants responses shorter than {x} words.", "Prefers answers under {x} words.",
                  "They like replies of fewer than {x} words.", "This person asks for answers below {x} words."],
        "terse": ["max {x} words", "under {x} words", "<{x} words", "keep it below {x} words"],
        "foreign": ["Réponds en moins de {x} mots.", "Responde en menos de {x} palabras.", "Antworte in weniger als {x} Wörtern."],
    },
}
STYLES = ("first", "third", "terse", "foreign")
# Preferences that cannot hold together.
CONFLICTS = {frozenset({"lowercase", "capital"})}


@dataclass
class Preference:
    kind: str
    param: object = None

    def check(self) -> dict:
        kind, p = self.kind, self.param
        ids = {
            "lowercase": ("change_case:english_lowercase", {}),
            "capital": ("change_case:english_capital", {}),
            "end_phrase": ("startend:end_checker", {"end_phrase": p}),
            "quotation": ("startend:quotation", {}),
            "keywords": ("keywords:existence", {"keywords": p}),
            "no_comma": ("punctuation:no_comma", {}),
            "postscript": ("detectable_content:postscript", {"postscript_marker": p}),
            "title": ("detectable_format:title", {}),
            "short": ("length_constraints:number_words", {"relation": "less than", "num_words": p}),
        }[kind]
        return {"instruction_id": ids[0], "kwargs": ids[1]}

    def text_param(self) -> str:
        if self.kind == "keywords":
            return " and ".join(f"\"{k}\"" for k in self.param)
        return "" if self.param is None else str(self.param)


def _sample_preference(kind: str, rng: random.Random) -> Preference:
    param = {
        "end_phrase": lambda: rng.choice(END_PHRASES),
        "keywords": lambda: rng.sample(KEYWORDS, rng.choice([1, 2])),
        "postscript": lambda: rng.choice(["P.S.", "P.P.S"]),
        "short": lambda: rng.choice(WORD_LIMITS),
    }.get(kind, lambda: None)()
    return Preference(kind, param)


def make_user(user_id: str, rng: random.Random, held_out_phrasing: bool) -> dict:
    kinds = list(PHRASINGS)
    while True:
        chosen = rng.sample(kinds, rng.choice([1, 2, 2, 3]))
        if not any(c <= set(chosen) for c in CONFLICTS):
            break
    prefs = [_sample_preference(k, rng) for k in chosen]
    style = rng.choice(STYLES)
    fragments = []
    for p in prefs:
        variants = PHRASINGS[p.kind][style]
        pick = variants[-1] if held_out_phrasing else rng.choice(variants[:-1])
        fragments.append(pick.replace("{x}", p.text_param()))
    personas = PERSONAS_THIRD if style in ("third", "terse") else PERSONAS
    extra = rng.sample(personas, rng.choice([0, 0, 1, 2]))
    parts = fragments + extra
    rng.shuffle(parts)
    joiner = "; " if style == "terse" else " "
    return {"user": user_id, "summary": joiner.join(parts), "checks": [p.check() for p in prefs],
            "style": style, "held_out_phrasing": held_out_phrasing}


def make_users(n: int, seed: int, prefix: str, held_out_phrasing: bool) -> list[dict]:
    rng = random.Random(seed)
    return [make_user(f"{prefix}-{i:04d}", rng, held_out_phrasing) for i in range(n)]
