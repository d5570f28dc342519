"""IFEval's human-written instruction sentences, as standing-preference phrasings for synthetic users.

Each of IFEval's 541 rows (a prompt, its instruction ids and their kwargs) belongs once and for ever to "train" or
"eval" by the first byte of sha256(str(key)): about half each, independent of Python's hash seed, of the order of
the file and of anything else in this module, so training may read `ifeval_sentences("train")` while evaluation
keeps `ifeval_sentences("eval")` phrasings it never saw.

For every supported instruction of a row the prompt is cut into sentences (at sentence ends and newlines) and the
first sentence, or else the first two adjacent sentences, that states it is kept: it must match the instruction's
cue, name its parameter (number with its relation, keywords, end phrase, marker, language name) so the kwargs
match the text, state no other instruction, and read as a general rule: no reference to the prompt's task (the
poem, the email, ...), no pronoun standing for it, no question, no dangling example. Precision over recall.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re

from .paths import shared_data

NUMBER_WORDS = {1: "one|once", 2: "two|twice", 3: "three|thrice", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 11: "eleven", 12: "twelve", 15: "fifteen", 20: "twenty", 30: "thirty", 40: "forty",
                50: "fifty", 100: "(?:one |a )?hundred"}
LANGUAGE_NAMES = {"ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "de": "German", "fa": "Persian|Farsi", "fi": "Finnish",
                  "gu": "Gujarati", "hi": "Hindi", "it": "Italian", "kn": "Kannada", "ko": "Korean", "mr": "Marathi",
                  "ne": "Nepali", "pa": "Punjabi", "pt": "Portuguese", "ru": "Russian", "sw": "Swahili", "ta": "Tamil",
                  "te": "Telugu", "th": "Thai", "ur": "Urdu", "vi": "Vietnamese"}
NEGATION = r"\b(?:not|no|avoid|avoiding|without|exclude|never|cannot|refrain)\b|n['’]t\b"

#: What a sentence must match to state an instruction (with its parameters, checked by `_names_params`).
CUES = {
    "language:response_language": r"\blanguage\b|\b(?:in|using|use|only)\b",
    "change_case:english_lowercase": r"lower ?case|no capital letters|not contain any capital|without (?:using )?(?:any )?capital",
    "change_case:english_capital": r"all capital letters|\ball caps\b|capitalize all|\bupper ?case",
    "change_case:capital_word_frequency": r"capital letters|\ball[ -]caps\b|capitalized",
    "punctuation:no_comma": r"\bcommas?\b",
    "length_constraints:number_words": r"\bwords?\b",
    "length_constraints:number_sentences": r"\bsentences?\b",
    "length_constraints:number_paragraphs": r"\bparagraphs?\b",
    "detectable_format:title": r"\btitle\b.*<<(?:my |your |a )?title>>",
    "detectable_format:number_bullet_lists": r"\bbullet",
    "detectable_format:number_highlighted_sections": r"highlight|italic",
    "detectable_format:multiple_sections": r"\bsections?\b|\bparagraphs?\b|\bparts?\b|\bdays?\b",
    "detectable_format:json_format": r"\bJSON\b",
    "detectable_content:postscript": r"post ?script|\bP\.P?\.S",
    "detectable_content:number_placeholders": r"placeholder",
    "startend:end_checker": r"\b(?:end|ends|finish|last)\b",
    "startend:quotation": r"double quot|quotation marks?",
    "keywords:existence": r"\b(?:include|includes|use|mention|contain|contains|keywords?)\b",
    "keywords:frequency": r"\bword\b|\bkeyword\b",
    "keywords:forbidden_words": NEGATION,
    "keywords:letter_frequency": r"\bletter\b",
}
SUPPORTED = set(CUES)
#: Features that only one kind of instruction talks about: a sentence kept for one instruction mentions no other's.
FEATURES = {
    "punctuation:no_comma": r"\bcommas?\b", "detectable_format:title": r"<<|\btitle\b", "detectable_format:json_format": r"\bJSON\b",
    "detectable_content:postscript": CUES["detectable_content:postscript"], "startend:quotation": CUES["startend:quotation"],
    "detectable_format:number_bullet_lists": r"\bbullet", "detectable_format:number_highlighted_sections": r"highlight|italic",
    "detectable_content:number_placeholders": r"placeholder|square bracket", "language:response_language": r"\blanguages?\b",
    "change_case:english_lowercase": r"lower ?case", "change_case:english_capital": r"capital|\bcaps\b|upper ?case",
    "length_constraints:number_paragraphs": r"\bparagraphs?\b|\*\*\*",
    "detectable_format:multiple_sections": r"\bsections?\b|\b(?:paragraph|day|audience|part) X\b",
    "length_constraints:number_sentences": r"\bsentences?\b", "length_constraints:number_words": r"\d+\+? words?\b",
    "combination:repeat_prompt": r"\brepeat", "combination:two_responses": r"\*{6}|two (?:different )?responses",
    "length_constraints:nth_paragraph_first_word": r"first word|start with (?:the )?word",
    "detectable_format:constrained_response": r"my answer is",
}
#: Feature words an instruction's own phrasing may use: the case instructions talk of capitals and lowercase alike,
#: and highlighted "sections" are not the sections of multiple_sections.
SHARED_WORDS = {
    "change_case:english_lowercase": ("change_case:english_capital",),
    "change_case:english_capital": ("change_case:english_lowercase",),
    "change_case:capital_word_frequency": ("change_case:english_capital", "change_case:english_lowercase"),
    "detectable_format:number_highlighted_sections": ("detectable_format:multiple_sections",),
}
TASK_WORDS = (r"\b(?:poems?|essays?|stor(?:y|ies)|resumes?|e-?mails?|songs?|raps?|limericks?|riddles?|blog|posts?|summary|"
              r"summaries|ads?|advertisements?|products?|articles?|prompt|request|tweets?|pitch|slogan|jokes?|haikus?|"
              r"itinerary|speech|review|proposal|template|outline|description|dialogue|conversation|critiques?|lyrics|"
              r"stanzas?|verses?|versions?|names?|company|plot|translation|tagline|tldr|question|quote|passage|paper|"
              r"page|thread|document|file|list|rubric|brief|topic|style|tone|following|below|above|students?|kids?|"
              r"teenagers?|snippets?|options?|steps|comments?|explanations?|notation|html|rant|weird|funny|zany|angry|"
              r"json\s+schema)\b|\bto (?:express|stress|emphasi[sz]e|show|make)\b|\b(?:the|this|that) (?:sentence|text)\b|"
              r"\b(?:the|a|an|this|your|my|cover|funny|formal) letter\b(?!s)")
PRONOUNS = r"\b(?:it|its|it['’]s|they|them|their|he|she|his|her|him)\b"
TASK_START = (r"^(?:please\s+)?(?:write|create|compose|generate|draft|rewrite|summarize|come up|brainstorm|plan|give me|"
              r"tell me|explain|describe|translate|can you|could you|would you|solve|hallucinate|invent|elaborate|"
              r"criticize|critique|imagine|name|make a|make me|list|expand|continue|complete|say|what|why|how)\b")
EXAMPLE_INTRO = (r",?\s*(?:such as|like|like below|like this|for example|as follows|in the following (?:form|format)|"
                 r"(?:using|with|following) the (?:exact |following )?format(?: below)?|as shown below)\s*:$")
QUOTED = r"\"([^\"]+)\"|“([^”]+)”|‘([^’]+)’|(?<!\w)'([^']+)'(?!\w)"
CONNECTIVE = r"^(?:also|additionally|finally|in particular|basically|but|and|then|plus|lastly|moreover|furthermore)\b,?\s*"
#: The kwargs that are words of the text: taken out of it before looking for task words, pronouns and questions.
TEXT_PARAMS = ("keywords", "forbidden_words", "keyword", "end_phrase", "postscript_marker", "section_spliter")
MAX_CHARS = 300
TIMES = r"times?\b"


def split_of(key: int) -> str:
    """"train" or "eval" for an IFEval row, by the first byte of sha256(str(key)): fixed for ever, about half each."""
    return "train" if hashlib.sha256(str(key).encode()).digest()[0] < 128 else "eval"


def sentences(prompt: str) -> list[str]:
    """The prompt cut at newlines and at sentence ends, not after "i.e.", "e.g." or a "P.S." inside a sentence."""
    out: list[str] = []
    for line in prompt.splitlines():
        pieces: list[str] = []
        for piece in re.split(r"(?<=[.!?])\s+", line.strip()):
            if pieces and (re.search(r"\b(?:i\.e|e\.g|etc|vs)\.$", pieces[-1])
                           or (re.search(r"P\.P?\.S\.$", pieces[-1]) and piece[:1].islower())):
                pieces[-1] += " " + piece
            elif piece:
                pieces.append(piece)
        out += pieces
    return out


def _number(n: int) -> str:
    return rf"(?:(?<![\d,.]){n}(?![\d,])|\b(?:{NUMBER_WORDS[n]})\b)" if n in NUMBER_WORDS else rf"(?<![\d,.]){n}(?![\d,])"


def _count(text: str, n: int, unit: str | None, relation: str | None = None) -> bool:
    """Whether the text asks for `n` of `unit` (None: the number alone), with that relation ("at least" or "less than")
    when one is given: "at least 3 sections", "3+ words", "17 or more sentences", "fewer than six", "at least twice"."""
    num = _number(n)
    said = num if unit is None else rf"{num}(?:\s*\+)?[\s-]+(?:[\w-]+\s+){{0,3}}?{unit}"
    if unit == TIMES and n in (1, 2):
        said = rf"(?:{said}|\b{'once' if n == 1 else 'twice'}\b)"
    unit = unit or ""
    if relation == "at least":
        pattern = (rf"\b(?:at least|no (?:fewer|less) than|a minimum of)\s+(?:a total of\s+)?{said}"
                   rf"|{num}\s*\+\s*(?:[\w-]+\s+)?{unit}|{num}\s+(?:{unit}\s+)?or more")
    elif relation == "less than":
        pattern = rf"\b(?:less than|fewer than|under)\s+(?:a total of\s+)?{said}"
    else:
        pattern = said
    return re.search(pattern, text, re.I) is not None


def _has_words(text: str, words: list[str]) -> bool:
    return all(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, re.I) for w in words)


def _listed(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _names_params(iid: str, kw: dict, text: str) -> bool:
    """Whether the text names the instruction's parameters as IFEval's kwargs give them."""
    if iid == "language:response_language":
        name = LANGUAGE_NAMES.get(kw["language"], "$^")
        said = rf"\b(?:in|using|use)\s+(?:only\s+)?(?:the\s+)?(?:{name})\b|\b(?:{name})\s+(?:language|only)\b"
        return re.search(said, text) is not None
    if iid == "change_case:capital_word_frequency":
        return _count(text, kw["capital_frequency"], None, kw["capital_relation"])
    if iid == "length_constraints:number_words":
        return _count(text, kw["num_words"], r"words?\b", kw["relation"])
    if iid == "length_constraints:number_sentences":
        return _count(text, kw["num_sentences"], r"sentences?\b", kw["relation"])
    if iid == "length_constraints:number_paragraphs":
        return _count(text, kw["num_paragraphs"], r"paragraphs?\b") and "***" in text
    if iid == "detectable_format:number_bullet_lists":
        return _count(text, kw["num_bullets"], r"bullet")
    if iid == "detectable_format:number_highlighted_sections":
        return _count(text, kw["num_highlights"], r"(?:sections?|parts?|words?|phrases?)\b")
    if iid == "detectable_format:multiple_sections":
        return (_count(text, kw["num_sections"], r"(?:sections?|paragraphs?|parts?|days?)\b")
                and re.search(rf"\b{re.escape(kw['section_spliter'])} X\b", text) is not None)
    if iid == "detectable_content:postscript":
        return re.search(rf"(?<![\w.]){re.escape(kw['postscript_marker'])}(?![\w])", text) is not None
    if iid == "detectable_content:number_placeholders":
        return _count(text, kw["num_placeholders"], r"placeholders?\b") and re.search(r"square bracket|\[", text) is not None
    if iid == "startend:end_checker":
        return kw["end_phrase"].lower() in text.lower()
    if iid in ("keywords:existence", "keywords:forbidden_words"):
        words = kw["keywords" if iid == "keywords:existence" else "forbidden_words"]
        negated = re.search(NEGATION, text, re.I) is not None
        return _has_words(text, words) and negated == (iid == "keywords:forbidden_words")
    if iid == "keywords:frequency":
        return _has_words(text, [kw["keyword"]]) and _count(text, kw["frequency"], TIMES, kw["relation"])
    if iid == "keywords:letter_frequency":
        return (re.search(rf"\bletter\s+[\"'“‘]?{re.escape(kw['letter'])}[\"'”’]?(?!\w)", text, re.I) is not None
                and _count(text, kw["let_frequency"], TIMES, kw["let_relation"]))
    return True  # no parameter


def _states(iid: str, kw: dict, text: str) -> bool:
    return re.search(CUES[iid], text, re.I) is not None and _names_params(iid, kw, text)


def _without_params(kw: dict, text: str) -> str:
    """The text less its parameters (keywords, end phrase, the letter asked for), for the task and pronoun filters."""
    if "letter" in kw:
        text = re.sub(rf"\bletter\s+[\"'“‘]?{re.escape(kw['letter'])}[\"'”’]?(?!\w)", "", text, flags=re.I)
    for key in TEXT_PARAMS:
        for word in _listed(kw.get(key)):
            text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", "", text, flags=re.I)
    return text


def _only_these(iid: str, kw: dict, text: str) -> bool:
    """For keyword instructions: nothing quoted, and no "the word X" or "the letter X", but the kwargs' own."""
    if not iid.startswith("keywords:"):
        return True
    allowed = {w.lower() for key in ("keywords", "forbidden_words", "keyword", "letter") for w in _listed(kw.get(key))}
    named = [q for found in re.findall(QUOTED, text) for q in found if q]
    if iid in ("keywords:frequency", "keywords:letter_frequency"):
        named += re.findall(r"\b(?:word|letter)\s+[\"'“‘]?([\w-]+)", text, re.I)
    return all(q.strip().lower() in allowed for q in named)


def _general(iid: str, kw: dict, text: str, others: list[tuple[str, dict]]) -> bool:
    """Whether the text reads as a standing preference about this instruction alone."""
    rest = _without_params(kw, text)
    if not _only_these(iid, kw, text):
        return False
    if (len(text) > MAX_CHARS or text.rstrip().endswith(":") or "?" in rest or rest.count('"') % 2
            or rest.count("“") != rest.count("”") or re.search(TASK_START, text.strip(), re.I)
            or re.search(TASK_WORDS, rest, re.I) or re.search(PRONOUNS, rest, re.I)):
        return False
    for other, okw in others:  # another instruction of the row stated here too
        if other != iid and other in SUPPORTED and _states(other, okw, text):
            return False
    return not any(re.search(pattern, rest, re.I) for other, pattern in FEATURES.items()
                   if other != iid and other not in SHARED_WORDS.get(iid, ()))


def _tidy(text: str) -> str:
    """The sentence without a leading "Also," or "But" and without a trailing "such as:" that introduced an example."""
    text = re.sub(CONNECTIVE, "", text.strip(), flags=re.I)
    text, cut = re.subn(EXAMPLE_INTRO, "", text, flags=re.I)
    return text[:1].upper() + text[1:] + ("." if cut else "")


def _find(iid: str, kw: dict, parts: list[str], others: list[tuple[str, dict]]) -> str | None:
    """The first sentence, else the first two adjacent sentences, that state the instruction as a general rule."""
    parts = [_tidy(part) for part in parts]
    for text in parts:
        if _states(iid, kw, text) and _general(iid, kw, text, others):
            return text
    for first, second in zip(parts, parts[1:]):
        text = f"{first} {second}"
        if not _states(iid, kw, first) and not _states(iid, kw, second) and _states(iid, kw, text) \
                and _general(iid, kw, text, others):
            return text
    return None


@functools.cache
def _all() -> tuple[dict, ...]:
    lines = (shared_data() / "ifeval" / "input_data.jsonl").read_text().splitlines()
    found = []
    for row in (json.loads(line) for line in lines if line.strip()):
        pairs = [(iid, {k: v for k, v in kw.items() if v is not None})
                 for iid, kw in zip(row["instruction_id_list"], row["kwargs"])]
        parts = sentences(row["prompt"])
        seen: set[str] = set()
        for iid, kw in pairs:
            asked = {json.dumps(k, sort_keys=True) for i, k in pairs if i == iid}
            if iid not in SUPPORTED or iid in seen or len(asked) > 1:
                continue  # unsupported, done, or asked twice with different kwargs (a range): ambiguous
            seen.add(iid)
            if (sentence := _find(iid, kw, parts, pairs)) is not None:
                found.append({"key": row["key"], "instruction_id": iid, "kwargs": kw, "sentence": sentence})
    return tuple(found)


def ifeval_sentences(split: str) -> list[dict]:
    """[{"key", "instruction_id", "kwargs", "sentence"}] for every (row, instruction) of that split whose instruction
    sentence could be found and reads as a standing preference."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    return [copy.deepcopy(s) for s in _all() if split_of(s["key"]) == split]
