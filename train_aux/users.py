"""Synthetic users with checkable standing preferences, phrased the ways people write them down.

A user is {"user", "summary", "checks", ...}: the checks are IFEval instruction ids with their kwargs, the summary free
text built from the phrasings in `phrasings/<kind>.yaml` (first and third person, terse notes, polite requests,
negations, French, German and Spanish), one to three preferences mixed with personal facts that nothing checks, now and
then with a typo. The last phrasing of every style is held out of training (evaluation users may use only those);
the kinds in `ZERO_SHOT` are held out of training altogether.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

PHRASINGS_DIR = Path(__file__).with_name("phrasings")
#: Languages the backbone writes well enough for IFEval's language check to pass on its samples.
LANGUAGES = ("fr", "de", "es", "it", "pt")
#: A language's name as a phrasing written in each language spells it.
LANGUAGE_NAMES = {
    "en": {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese"},
    "fr": {"fr": "français", "de": "allemand", "es": "espagnol", "it": "italien", "pt": "portugais"},
    "de": {"fr": "Französisch", "de": "Deutsch", "es": "Spanisch", "it": "Italienisch", "pt": "Portugiesisch"},
    "es": {"fr": "francés", "de": "alemán", "es": "español", "it": "italiano", "pt": "portugués"},
    "it": {"fr": "francese", "de": "tedesco", "es": "spagnolo", "it": "italiano", "pt": "portoghese"},
    "pt": {"fr": "francês", "de": "alemão", "es": "espanhol", "it": "italiano", "pt": "português"},
}
#: Where a country is and where someone is from, as a phrasing written in each language says it.
COUNTRIES = {
    "en": {"fr": ("in France", "from France"), "de": ("in Germany", "from Germany"), "es": ("in Spain", "from Spain"),
           "it": ("in Italy", "from Italy"), "pt": ("in Portugal", "from Portugal")},
    "fr": {"fr": ("en France", "de France"), "de": ("en Allemagne", "d'Allemagne"), "es": ("en Espagne", "d'Espagne"),
           "it": ("en Italie", "d'Italie"), "pt": ("au Portugal", "du Portugal")},
    "de": {"fr": ("in Frankreich", "aus Frankreich"), "de": ("in Deutschland", "aus Deutschland"),
           "es": ("in Spanien", "aus Spanien"), "it": ("in Italien", "aus Italien"), "pt": ("in Portugal", "aus Portugal")},
    "es": {"fr": ("en Francia", "de Francia"), "de": ("en Alemania", "de Alemania"), "es": ("en España", "de España"),
           "it": ("en Italia", "de Italia"), "pt": ("en Portugal", "de Portugal")},
}
AND = {"en": "and", "fr": "et", "de": "und", "es": "y"}
STYLES = ("first", "third", "terse", "polite", "negation", "fr", "de", "es")
#: The voice a summary is written in, and the phrasing styles that voice draws each preference from.
VOICES = {"first": ("first", "polite", "negation"), "third": ("third",), "terse": ("terse", "negation"),
          "fr": ("fr",), "de": ("de",), "es": ("es",)}

END_PHRASES = ["Cheers!", "Hope this helps!", "Have a great day!", "Stay curious.", "That is all.", "Talk soon.",
               "Any other questions?", "Best wishes."]
KEYWORDS = ["banana", "sunshine", "galaxy", "river", "pencil", "harmony", "compass", "lantern", "velvet", "meadow",
            "anchor", "puzzle"]
# Words the backbone's answers often use, so that forbidding them changes something.
FORBIDDEN = ["very", "really", "also", "many", "important", "because", "different", "people", "known", "often", "help",
             "world"]
LETTERS = "bcdfghklmnprstwz"
#: The word floors users ask for: replies reach them within 96 new tokens.
FLOORS = (40, 50)

PERSONAS = {
    "first": ["I live in Ohio and work as a nurse.", "I have two cats.", "My favourite season is autumn.",
              "I'm studying economics.", "I work night shifts.", "I like hiking on weekends.", "I'm a retired teacher.",
              "I play the violin.", "I'm learning to cook.", "I commute by bike.", "I have a toddler at home.",
              "I'm vegetarian.", "I run a small bakery.", "English is my second language."],
    "third": ["Lives in Ohio, works as a nurse.", "Has two cats.", "Favourite season: autumn.", "Studies economics.",
              "Works night shifts.", "Enjoys weekend hikes.", "Retired teacher.", "Plays the violin.",
              "Software engineer in Berlin.", "Has a toddler.", "Vegetarian.", "Runs a small bakery."],
    "fr": ["J'habite à Lyon.", "Je suis infirmière.", "J'ai deux chats.", "J'aime la randonnée.", "Je suis étudiant."],
    "de": ["Ich wohne in Hamburg.", "Ich bin Lehrerin.", "Ich habe zwei Katzen.", "Ich fahre gern Rad.",
           "Ich studiere Informatik."],
    "es": ["Vivo en Sevilla.", "Soy enfermera.", "Tengo dos gatos.", "Me gusta el senderismo.", "Estudio economía."],
}


def _quoted(words: list[str], lang: str) -> str:
    return f" {AND[lang]} ".join(f'"{w}"' for w in words)


@dataclass(frozen=True)
class Kind:
    """A standing preference: its IFEval check, how its kwargs are drawn, how they fill a phrasing's placeholders."""

    instruction_id: str
    sample: Callable[[random.Random], dict] = lambda rng: {}
    fill: Callable[[dict, str], dict] = lambda kw, lang: {}

    def relation(self) -> dict:
        """The kwargs every preference of this kind has in common (its relation: "less than", "at least")."""
        return {k: v for k, v in self.sample(random.Random(0)).items() if k.endswith("relation")}


KINDS: dict[str, Kind] = {
    "language": Kind("language:response_language", lambda r: {"language": r.choice(LANGUAGES)},
                     lambda kw, lang: {"language": LANGUAGE_NAMES[lang][kw["language"]]}),
    "lowercase": Kind("change_case:english_lowercase"),
    "capital": Kind("change_case:english_capital"),
    "capital_words": Kind("change_case:capital_word_frequency",
                          lambda r: {"capital_relation": "at least", "capital_frequency": r.choice([2, 3, 4])},
                          lambda kw, lang: {"x": kw["capital_frequency"]}),
    "no_comma": Kind("punctuation:no_comma"),
    "short": Kind("length_constraints:number_words", lambda r: {"relation": "less than", "num_words": r.choice([20, 30, 40])},
                  lambda kw, lang: {"x": kw["num_words"]}),
    "sentences": Kind("length_constraints:number_sentences",
                      lambda r: {"relation": "less than", "num_sentences": r.choice([2, 3, 4])},
                      lambda kw, lang: {"x": kw["num_sentences"]}),
    "paragraphs": Kind("length_constraints:number_paragraphs", lambda r: {"num_paragraphs": r.choice([2, 3])},
                       lambda kw, lang: {"x": kw["num_paragraphs"]}),
    "title": Kind("detectable_format:title"),
    "bullets": Kind("detectable_format:number_bullet_lists", lambda r: {"num_bullets": r.choice([2, 3, 4])},
                    lambda kw, lang: {"x": kw["num_bullets"]}),
    "highlights": Kind("detectable_format:number_highlighted_sections", lambda r: {"num_highlights": r.choice([1, 2, 3])},
                       lambda kw, lang: {"x": kw["num_highlights"]}),
    "sections": Kind("detectable_format:multiple_sections",
                     lambda r: {"section_spliter": "Section", "num_sections": r.choice([2, 3])},
                     lambda kw, lang: {"x": kw["num_sections"]}),
    "json": Kind("detectable_format:json_format"),
    "postscript": Kind("detectable_content:postscript", lambda r: {"postscript_marker": r.choice(["P.S.", "P.P.S"])},
                       lambda kw, lang: {"x": kw["postscript_marker"]}),
    "end_phrase": Kind("startend:end_checker", lambda r: {"end_phrase": r.choice(END_PHRASES)},
                       lambda kw, lang: {"x": kw["end_phrase"]}),
    "quotation": Kind("startend:quotation"),
    "keywords": Kind("keywords:existence", lambda r: {"keywords": r.sample(KEYWORDS, r.choice([1, 2]))},
                     lambda kw, lang: {"x": _quoted(kw["keywords"], lang)}),
    "keyword_frequency": Kind("keywords:frequency",
                              lambda r: {"keyword": r.choice(KEYWORDS), "frequency": r.choice([2, 3]), "relation": "at least"},
                              lambda kw, lang: {"x": kw["keyword"], "n": kw["frequency"]}),
    "forbidden": Kind("keywords:forbidden_words", lambda r: {"forbidden_words": r.sample(FORBIDDEN, r.choice([1, 2]))},
                      lambda kw, lang: {"x": _quoted(kw["forbidden_words"], lang)}),
    "placeholders": Kind("detectable_content:number_placeholders", lambda r: {"num_placeholders": r.choice([1, 2, 3])},
                         lambda kw, lang: {"x": kw["num_placeholders"]}),
    "letter_frequency": Kind("keywords:letter_frequency",
                             lambda r: {"letter": r.choice(LETTERS), "let_frequency": r.choice([3, 5]), "let_relation": "at least"},
                             lambda kw, lang: {"x": kw["letter"], "n": kw["let_frequency"]}),
    "long": Kind("length_constraints:number_words", lambda r: {"relation": "at least", "num_words": r.choice(FLOORS)},
                 lambda kw, lang: {"x": kw["num_words"]}),
    "two_responses": Kind("combination:two_responses"),
}
#: Held out of training altogether: the zero-shot kinds of evaluation (c).
ZERO_SHOT = ("letter_frequency", "two_responses")
TRAINED = tuple(k for k in KINDS if k not in ZERO_SHOT)
#: Preferences that cannot hold together (or that IFEval's checkers cannot both pass).
CONFLICTS = [frozenset(c) for c in (
    {"lowercase", "capital"}, {"lowercase", "capital_words"}, {"language", "lowercase"}, {"language", "capital"},
    {"lowercase", "sections"}, {"capital", "sections"}, {"short", "long"}, {"bullets", "paragraphs"},
    {"bullets", "sections"}, {"paragraphs", "sections"}, {"bullets", "highlights"}, {"json", "quotation"},
    {"two_responses", "json"}, {"two_responses", "quotation"}, {"two_responses", "paragraphs"},
    *({"json", k} for k in ("title", "bullets", "sections", "paragraphs", "postscript", "end_phrase", "highlights")),
)]


@functools.cache
def phrasings(kind: str) -> dict[str, list[str]]:
    return yaml.safe_load((PHRASINGS_DIR / f"{kind}.yaml").read_text())


def compatible(kinds: list[str]) -> bool:
    return not any(c <= set(kinds) for c in CONFLICTS)


def with_typo(text: str, rng: random.Random) -> str:
    """Two neighbouring letters swapped in one longer word outside any placeholder."""
    words = [m for m in re.finditer(r"(?<![{\w])[A-Za-z]{6,}(?![\w}])", text)]
    if not words:
        return text
    m = rng.choice(words)
    i = m.start() + rng.randrange(1, len(m.group()) - 2)
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]


def phrase(kind: str, kwargs: dict, style: str, rng: random.Random, held_out: bool, typo_rate: float = 0.0) -> str:
    """One phrasing of a preference in `style`: the style's held-out (last) variant, or one of the others."""
    table = phrasings(kind)
    variants = table[style] if len(table.get(style) or []) >= 2 else table["first"]  # a kind no negation fits
    template = _variant(variants, rng, held_out)
    if rng.random() < typo_rate:
        template = with_typo(template, rng)
    lang = style if style in AND else "en"
    return template.format(**{k: str(v) for k, v in KINDS[kind].fill(kwargs, lang).items()})


def _variant(variants: list[str], rng: random.Random, held_out: bool) -> str:
    return variants[-1] if held_out else rng.choice(variants[:-1])


def language_mentions(voice: str, checks: list[dict], rng: random.Random, held_out: bool) -> list[str]:
    """One or two facts in `voice` that name a language or a country without asking for replies in it, and for a
    third of the users without a response language a request for English, whose check ("en") joins `checks`."""
    table = phrasings("language_mentions")
    lang = voice if voice in COUNTRIES else "en"
    style = voice if voice in COUNTRIES else "third" if voice in ("third", "terse") else "first"
    facts = table["facts"][style]
    parts = []
    for template in facts[-1:] if held_out else rng.sample(facts[:-1], rng.choice([1, 1, 2])):
        named = rng.choice(LANGUAGES)
        in_country, from_country = COUNTRIES[lang][named]
        parts.append(template.format(language=LANGUAGE_NAMES[lang][named], in_country=in_country,
                                     from_country=from_country))
    if not any(c["instruction_id"] == KINDS["language"].instruction_id for c in checks) and rng.random() < 1 / 3:
        # now and then in a language the summaries are otherwise never written in
        parts.append(_variant(table["english"][rng.choice(["it", "pt"]) if rng.random() < 0.2 else style], rng, held_out))
        checks.append({"instruction_id": KINDS["language"].instruction_id, "kwargs": {"language": "en"}})
    return parts


def foreign_request(language: str, rng: random.Random, held_out: bool) -> str:
    """A request for replies in `language` written in Italian or Portuguese, which no voice writes in."""
    lang = rng.choice(["it", "pt"])
    return _variant(phrasings("language_mentions")["asking"][lang], rng, held_out).format(
        language=LANGUAGE_NAMES[lang][language])


#: The words that name a whole reply's case in the phrasings (and IFEval's sentences), each with its opposite.
CASE_WORDS = {
    "uppercase": "lowercase", "Uppercase": "Lowercase", "upper case": "lower case", "upper-case": "lower-case",
    "upper": "lower", "capital letters": "lowercase letters", "capital letter": "lowercase letter",
    "capitals": "lowercase", "CAPITALS": "LOWERCASE", "ALL CAPS": "all lowercase", "ALL-CAPS": "all-lowercase",
    "all caps": "all lowercase", "caps": "lowercase", "CAPS": "lowercase", "capitalize": "lowercase",
    "capitalized": "lowercased", "majuscules": "minuscules", "MAJUSCULES": "minuscules", "majuscule": "minuscule",
    "capitales": "minuscules", "Großbuchstaben": "Kleinbuchstaben", "GROSSBUCHSTABEN": "Kleinbuchstaben",
    "Großbuchstabe": "Kleinbuchstabe", "großgeschrieben": "kleingeschrieben", "groß geschrieben": "klein geschrieben",
    "mayúsculas": "minúsculas", "MAYÚSCULAS": "minúsculas", "mayúscula": "minúscula",
}
CASE_WORDS |= {low: up for up, low in CASE_WORDS.items() if low not in CASE_WORDS} | {
    "lowercase": "uppercase", "lower case": "upper case", "lowercased": "capitalized", "lower": "upper"}
_CASE_WORD = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in sorted(CASE_WORDS, key=len, reverse=True)) + r")(?!\w)")
_OTHER_CASE = {"change_case:english_capital": "change_case:english_lowercase",
               "change_case:english_lowercase": "change_case:english_capital"}


def case_twin(user: dict) -> dict | None:
    """`user` asking for the other case: every word naming a case swapped for its opposite, and the check with it
    (None without such a word, or with another check that names capitals). A head trained on both twins has to read
    the word that tells them apart, not the template around it: "tout en majuscules" is not "tout en minuscules"."""
    ids = {c["instruction_id"] for c in user["checks"]}
    if not ids & set(_OTHER_CASE) or KINDS["capital_words"].instruction_id in ids:
        return None
    summary, swaps = _CASE_WORD.subn(lambda m: CASE_WORDS[m.group()], user["summary"])
    if not swaps or any(held in summary for held in _held_out_cases()):  # never a phrasing evaluation users get
        return None
    checks = [{**c, "instruction_id": _OTHER_CASE.get(c["instruction_id"], c["instruction_id"])} for c in user["checks"]]
    return {**user, "user": f"{user['user']}-twin", "summary": summary, "checks": checks}



def floor_twin(user: dict) -> dict | None:
    """`user` asking for at least the words they capped their replies at: the limit's phrasing swapped for the floor
    phrasing of the same style and place in `phrasings` (None for a user without a word limit, or whose limit reads
    as no training phrasing does: a typo, an IFEval sentence). "Less than 40 words" and "at least 40 words" differ by
    two words in alike summaries; trained side by side, the thoughts have to read them."""
    limit = next((c for c in user["checks"] if kind_of(c) == "short"), None)
    if limit is None:
        return None
    n = limit["kwargs"]["num_words"]
    for style, variants in phrasings("short").items():
        for i, template in enumerate(variants[:-1]):  # training users never have the held-out (last) variant
            if (text := template.format(x=n)) in user["summary"]:
                floor = phrasings("long")[style][i].format(x=n)
                checks = [{"instruction_id": c["instruction_id"], "kwargs": {"relation": "at least", "num_words": n}}
                          if c is limit else c for c in user["checks"]]
                return {**user, "user": f"{user['user']}-floor", "summary": user["summary"].replace(text, floor),
                        "checks": checks, "kinds": ["long" if k == "short" else k for k in user["kinds"]]}
    return None

@functools.cache
def _held_out_cases() -> tuple[str, ...]:
    return tuple(variants[-1] for kind in ("capital", "lowercase") for variants in phrasings(kind).values())


def make_user(user_id: str, rng: random.Random, held_out_phrasing: bool, kinds: tuple[str, ...] = TRAINED,
              include: tuple[str, ...] = (), typo_rate: float = 0.1, mentions: bool = False) -> dict:
    """A user with one to three compatible preferences drawn from `kinds`, one of them from `include` if given; with
    `mentions`, their summary also names languages or countries (`language_mentions`)."""
    while True:
        first = [rng.choice(include)] if include else []
        rest = [k for k in kinds if k not in first]
        chosen = first + rng.sample(rest, rng.choice([1, 2, 2, 3]) - len(first))
        if compatible(chosen):
            break
    voice = rng.choice(list(VOICES))
    checks, fragments = [], []
    for kind in chosen:
        kwargs = KINDS[kind].sample(rng)
        checks.append({"instruction_id": KINDS[kind].instruction_id, "kwargs": kwargs})
        if mentions and kind == "language" and rng.random() < 0.2:  # now and then asked in Italian or Portuguese
            fragments.append(foreign_request(kwargs["language"], rng, held_out_phrasing))
        else:
            fragments.append(phrase(kind, kwargs, rng.choice(VOICES[voice]), rng, held_out_phrasing, typo_rate))
    facts = PERSONAS["third" if voice in ("third", "terse") else voice if voice in PERSONAS else "first"]
    parts = fragments + rng.sample(facts, rng.choice([0, 0, 1, 2, 3]))
    if mentions:
        parts += language_mentions(voice, checks, rng, held_out_phrasing)
    rng.shuffle(parts)
    joiner = rng.choice(["; ", "\n- ", " "]) if voice == "terse" else " "
    summary = ("- " if joiner == "\n- " else "") + joiner.join(parts)
    return {"user": user_id, "summary": summary, "checks": checks, "kinds": chosen, "style": voice,
            "held_out_phrasing": held_out_phrasing}


def make_users(n: int, seed: int, prefix: str, held_out_phrasing: bool, kinds: tuple[str, ...] = TRAINED,
               include: tuple[str, ...] = (), typo_rate: float = 0.1, mentions: bool = False) -> list[dict]:
    rng = random.Random(seed)
    return [make_user(f"{prefix}-{i:04d}", rng, held_out_phrasing, kinds, include, typo_rate, mentions) for i in range(n)]


def kind_of(check: dict) -> str | None:
    """The kind of `KINDS` a check belongs to (None for one that is none of them)."""
    kwargs = check.get("kwargs") or {}
    return next((name for name, kind in KINDS.items() if kind.instruction_id == check["instruction_id"]
                 and all(kwargs.get(k) == v for k, v in kind.relation().items())), None)


def ifeval_users(split: str, n: int, seed: int) -> list[dict]:
    """Users whose summaries are one to three instruction sentences people wrote for IFEval's prompts, from one
    split of its keys (`ifeval_phrasings.split_of`): phrasings this project's templates never produced. Responses in
    a language the backbone cannot write are left out, as are kinds held out of training when `split` is "train"."""
    from .ifeval_phrasings import ifeval_sentences

    pool = [s for s in ifeval_sentences(split) if (kind := kind_of(s)) is not None
            and (split != "train" or kind in TRAINED)
            and s["kwargs"].get("language", LANGUAGES[0]) in LANGUAGES]
    rng = random.Random(seed)
    users = []
    while len(users) < n:
        picked = rng.sample(pool, rng.choice([1, 2, 2, 3]))
        kinds = [kind_of(s) for s in picked]
        if len(set(kinds)) < len(kinds) or len({s["key"] for s in picked}) < len(picked) or not compatible(kinds):
            continue
        facts = rng.sample(PERSONAS["first"], rng.choice([0, 1, 2]))
        parts = [s["sentence"] for s in picked] + facts
        rng.shuffle(parts)
        users.append({"user": f"ifeval-{split}-{len(users):04d}", "summary": " ".join(parts), "kinds": kinds,
                      "checks": [{"instruction_id": s["instruction_id"], "kwargs": s["kwargs"]} for s in picked],
                      "style": "ifeval", "held_out_phrasing": split == "eval"})
    return users
