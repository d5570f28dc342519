"""Training data: prompts, the backbone's own answers, and those answers minimally edited per user.

`python -m train_aux.data --out train_aux/data` writes the users (training; evaluation: (a) unseen users with unseen
phrasings, dev users of the same kind for choosing checkpoints, (b) users phrased from IFEval's held-out sentences, (c)
users with kinds held out of training), train/eval prompts, the frozen backbone's own greedy answers to the training
prompts (and those that reach a word floor in the eval's budget), and its sampled answers in each response language.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from tqdm import tqdm

from softthought.ifeval import check, check_all, count_words

from .checks import is_loop
from .paths import shared_data
from .users import FLOORS, LANGUAGES, TRAINED, ZERO_SHOT, ifeval_users, make_users, word_floor

TOPICS = [
    "the ocean", "volcanoes", "photosynthesis", "the moon", "honey bees", "the internet", "rain", "gravity",
    "the Roman Empire", "chess", "coffee", "electric cars", "the human heart", "music", "recycling", "dinosaurs",
    "the stock market", "clouds", "bread baking", "the Olympic Games", "penguins", "solar panels", "sleep",
    "libraries", "earthquakes", "tea", "the printing press", "bicycles", "friendship", "vaccines", "deserts",
    "jazz", "robots", "the Amazon rainforest", "glaciers", "pizza", "time zones", "rainbows", "airplanes",
    "the immune system", "gardening", "poetry", "trains", "whales", "democracy", "mountains", "chocolate",
    "the alphabet", "lightning", "mushrooms", "the pyramids", "batteries", "meditation", "owls", "maps",
    "soap", "bridges", "the seasons", "cheese", "yoga", "comets", "paper", "fireworks", "elephants",
]
TEMPLATES = [
    "Tell me about {t}.", "What is interesting about {t}?", "Explain {t} in simple terms.", "Give me a fact about {t}.",
    "Why do people care about {t}?", "How would you describe {t} to a child?", "Write a few sentences about {t}.",
    "What should I know about {t}?",
]


def boolq_texts() -> list[str]:
    """Plain text for the preservation term (passages ending in their question, as BoolQ's lm-eval prompt has them
    before "Answer:"): not the general-ability benchmarks, and never in a chat template."""
    return [json.loads(line)["query"] for line in (shared_data() / "boolq" / "boolq.jsonl").read_text().splitlines()]


def summary_before(summary: str, text: str) -> str:
    """Plain text with the user's summary written before it: the text condition of `eval general` and the teacher
    of `--preserve-teacher text` read the same string."""
    return f"{summary}\n\n{text}"


def qa_texts(answers: list[dict]) -> list[str]:
    """Plain "Question: ...\nAnswer: ..." text from the training prompts and the backbone's own first sentence of
    answer: the shape multiple-choice benchmarks are scored in (a short question, then a short continuation after
    "Answer:"), built from none of their items."""
    return [f"Question: {a['prompt']}\nAnswer: {first_sentence(a['answer'])}" for a in answers]


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval makes them: the whole string tokenized, the continuation what
    follows the context's tokens."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def winogrande_choices() -> list[list[tuple[str, str]]]:
    """Winogrande's items as (context, continuation) per option, as lm-eval scores them (the option fills the blank
    in the context, the rest of the sentence is the continuation): for the choice term, not a benchmark here."""
    return [[(ctx, " " + row["continuation"]) for ctx in row["context_options"]]
            for row in read_jsonl(shared_data() / "winogrande" / "winogrande.jsonl")]


def qa_choices(answers: list[dict], seed: int = 0, n: int = 4) -> list[list[tuple[str, str]]]:
    """Multiple-choice items in the shape ARC and PIQA are scored in, from the training prompts: "Question: ...
    \nAnswer:" and n short continuations, the first words of the backbone's own answer and of n - 1 others'."""
    rng = random.Random(seed)
    heads = [first_sentence(a["answer"]).split() for a in answers]
    out = []
    for i, a in enumerate(answers):
        picks = [i, *rng.sample([j for j in range(len(answers)) if j != i], n - 1)]
        context = f"Question: {a['prompt']}\nAnswer:"
        out.append([(context, " " + " ".join(heads[j][: rng.randint(2, 12)])) for j in picks if heads[j]])
    return [item for item in out if len(item) > 1]


def reply_texts(answers: list[dict]) -> list[str]:
    """The same with the backbone's whole answer after "Answer:" (those that do not loop): under a KL on them the
    thoughts learn to leave a long continuation as the backbone writes it, the stretch where their replies loop."""
    return [f"Question: {a['prompt']}\nAnswer: {a['answer']}" for a in answers if not is_loop(a["answer"])]


def prompt_pool(seed: int = 0) -> list[str]:
    """General questions: topic templates plus BoolQ's questions (BoolQ carries no signal for this backbone
    and is not one of the general-ability benchmarks, so using its questions leaks nothing)."""
    prompts = [t.format(t=topic) for topic in TOPICS for t in TEMPLATES]
    for text in boolq_texts():
        q = text.rsplit("Question:", 1)[-1].split("\n")[0].strip()
        if q:
            prompts.append(q[0].upper() + q[1:].rstrip("?") + "?")
    random.Random(seed).shuffle(prompts)
    return list(dict.fromkeys(prompts))


SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def first_sentence(text: str) -> str:
    text = text.strip()
    match = SENTENCE_END.search(text)
    return text[: match.end()] if match else text


def whole_sentences(text: str) -> str:
    """Cut a reply that hit max_tokens back to its last complete sentence."""
    text = text.strip()
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else text


# ------------------------------------------------------------------------------------------------ edits
def _title(prompt: str) -> str:
    words = re.sub(r"[^\w\s]", "", prompt).split()
    stop = {"tell", "me", "about", "what", "is", "why", "do", "how", "would", "you", "the", "a", "an", "of", "to",
            "in", "give", "explain", "write", "few", "should", "i", "know", "people", "care", "describe", "does",
            "are", "can", "simple", "terms", "sentences", "fact", "interesting", "child"}
    keep = [w for w in words if w.lower() not in stop][:4] or ["Answer"]
    return " ".join(w.capitalize() for w in keep)


def _truncate_words(text: str, limit: int) -> str:
    words = text.split()
    if len(words) < limit:
        return text
    cut = " ".join(words[: limit - 1])
    sentences = whole_sentences(cut)
    return sentences if len(sentences.split()) >= 3 else cut.rstrip(",;:") + "."


def _sentences(text: str) -> list[str]:
    text = text.strip()
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return [piece.strip() for a, b in zip([0, *ends], [*ends, len(text)]) if (piece := text[a:b]).strip()]


def _groups(sentences: list[str], n: int) -> list[str] | None:
    """`sentences` in `n` consecutive groups of about equal size; with fewer sentences than `n`, the longest pieces
    split at a comma or an "and" (None if that is still too few)."""
    pieces = list(sentences)
    while 0 < len(pieces) < n:
        i = max(range(len(pieces)), key=lambda j: len(pieces[j]))
        cuts = [m for m in re.finditer(r", | and ", pieces[i]) if 12 < m.start() < len(pieces[i]) - 12]
        if not cuts:
            return None
        m = min(cuts, key=lambda m: abs(m.start() - len(pieces[i]) / 2))
        head, tail = pieces[i][: m.start()], pieces[i][m.end():]
        pieces[i : i + 1] = [head.rstrip(",") + ".", tail[0].upper() + tail[1:]]
    if len(pieces) < n:
        return None
    cuts = [round(i * len(pieces) / n) for i in range(n + 1)]
    return [" ".join(pieces[a:b]) for a, b in zip(cuts, cuts[1:])]


SYNONYMS = {"very": "quite", "really": "truly", "also": "too", "many": "numerous", "important": "key", "because": "since",
            "different": "varied", "people": "folks", "known": "famed", "often": "frequently", "help": "aid",
            "world": "planet"}
PLACEHOLDERS = ["[name]", "[date]", "[place]", "[email]", "[address]", "[phone]"]


def _replace_words(text: str, words: list[str]) -> str:
    for w in words:
        text = re.sub(rf"\b{re.escape(w)}\b", lambda m, w=w: SYNONYMS.get(w.lower(), "")
                      if m.group()[0].islower() else SYNONYMS.get(w.lower(), "").capitalize(), text, flags=re.IGNORECASE)
    return re.sub(r"  +", " ", text)


def _shout(text: str, n: int) -> str:
    """The `n` longest words (at least four letters) of `text` written in capitals (of equal lengths, the first in
    alphabetical order: a set's order changes with every process's string hashing)."""
    words = sorted(set(re.findall(r"\b[a-z]{4,}\b", text)), key=lambda w: (-len(w), w))[:n]
    for w in words:
        text = re.sub(rf"\b{w}\b", w.upper(), text, count=1)
    return text


def _add(text: str, sentences: str, first: bool) -> str:
    return f"{sentences} {text}" if first else f"{text} {sentences}"


#: Edits that must run even when the answer already passes: a limit keeps room for the words other edits add.
ALWAYS_EDITED = {"length_constraints:number_words", "length_constraints:number_sentences"}


def edit_answer(answer: str, prompt: str, checks: list[dict], rng: random.Random, keywords_first: bool = False) -> str | None:
    """The smallest edit of the backbone's own answer that satisfies every check, or None if none is found.

    `answer` is the plain backbone's answer, for a response-language user its sampled answer in that language, or the
    student's own reply (`train.own_targets`), which may already follow some checks: what follows one already (a
    title, bullets, a postscript, quotes) is left as it is rather than written twice.
    `keywords_first`: the sentences that bring in missing keywords open the reply instead of closing it."""
    text = answer.strip()
    kinds = {c["instruction_id"]: c.get("kwargs") or {} for c in checks
             if c["instruction_id"] in ALWAYS_EDITED or not check(text, c["instruction_id"], c.get("kwargs"))}
    if "length_constraints:number_words" in kinds and kinds["length_constraints:number_words"]["relation"] == "less than":
        budget = kinds["length_constraints:number_words"]["num_words"]
        # leave room for the words other edits add (title, end phrase, postscript, keywords, placeholders, sections)
        extra = 4 * sum(k in kinds for k in ("detectable_format:title", "startend:end_checker", "detectable_content:postscript",
                                             "keywords:existence", "keywords:frequency", "detectable_content:number_placeholders",
                                             "detectable_format:multiple_sections"))
        text = _truncate_words(text, max(5, budget - extra))
    if "length_constraints:number_sentences" in kinds:
        limit = kinds["length_constraints:number_sentences"]["num_sentences"]
        text = " ".join(_sentences(text)[: max(1, limit - 1 - ("detectable_content:postscript" in kinds))])
    if "keywords:forbidden_words" in kinds:
        text = _replace_words(text, kinds["keywords:forbidden_words"]["forbidden_words"])
    if "punctuation:no_comma" in kinds:
        text = text.replace(",", "")
    if "keywords:existence" in kinds:
        missing = [k for k in kinds["keywords:existence"]["keywords"] if k.lower() not in text.lower()]
        if missing:
            text = _add(text, rng.choice(["Think of {w}.", "This reminds me of {w}.", "Like {w}."]).format(w=" and ".join(missing)),
                        keywords_first)
    if "keywords:frequency" in kinds and kinds["keywords:frequency"]["relation"] == "at least":
        kw = kinds["keywords:frequency"]
        missing = kw["frequency"] - len(re.findall(kw["keyword"], text, flags=re.IGNORECASE))
        if missing > 0:
            text = _add(text, " ".join(rng.choice(["Think of {w}.", "Picture a {w}.", "A {w} fits here."]).format(w=kw["keyword"])
                                       for _ in range(missing)), keywords_first)
    if "detectable_content:number_placeholders" in kinds:
        n = kinds["detectable_content:number_placeholders"]["num_placeholders"]
        slots = rng.sample(PLACEHOLDERS, n) if n <= len(PLACEHOLDERS) else [f"[item {i + 1}]" for i in range(n)]
        text += " " + rng.choice(["Fill in {p}.", "Adapt it with {p}.", "Replace {p} as needed."]).format(p=" and ".join(slots))
    if kinds.get("change_case:capital_word_frequency", {}).get("capital_relation") == "at least":
        text = _shout(text, kinds["change_case:capital_word_frequency"]["capital_frequency"])
    if "detectable_format:number_highlighted_sections" in kinds:
        sentences = _sentences(text)
        n = kinds["detectable_format:number_highlighted_sections"]["num_highlights"]
        if len(sentences) < n:
            return None
        text = " ".join(f"*{s}*" if i < n else s for i, s in enumerate(sentences))
    for structure, key in (("detectable_format:number_bullet_lists", "num_bullets"),
                           ("length_constraints:number_paragraphs", "num_paragraphs"),
                           ("detectable_format:multiple_sections", "num_sections")):
        if structure not in kinds:
            continue
        groups = _groups(_sentences(text), kinds[structure][key])
        if groups is None:
            return None
        if key == "num_bullets":
            text = "\n".join(f"* {g}" for g in groups)
        elif key == "num_paragraphs":
            text = "\n\n***\n\n".join(groups)
        else:
            spliter = kinds[structure]["section_spliter"]
            text = "\n\n".join(f"{spliter} {i + 1}\n{g}" for i, g in enumerate(groups))
    if "startend:end_checker" in kinds:
        text = text.rstrip() + " " + kinds["startend:end_checker"]["end_phrase"]
    if "detectable_content:postscript" in kinds:
        note = rng.choice(["Let me know if you have more questions.", "Thanks for asking.", "Ask me anything else."])
        text = text.rstrip() + f"\n\n{kinds['detectable_content:postscript']['postscript_marker']} {note}"
        if "startend:end_checker" in kinds:  # the end phrase must stay last
            phrase = kinds["startend:end_checker"]["end_phrase"]
            text = text.replace(" " + phrase + "\n\n", "\n\n", 1).rstrip() + " " + phrase
    if "detectable_format:title" in kinds:
        text = f"<<{_title(prompt)}>>\n{text}"
    if "detectable_format:json_format" in kinds:
        text = json.dumps({"answer": text}, ensure_ascii=False)
    if "change_case:english_lowercase" in kinds:
        text = text.lower()
    if "change_case:english_capital" in kinds:
        text = text.upper()
    if "startend:quotation" in kinds:
        text = f"\"{text}\""
    return text if all(check_all(text, checks)) else None


# ------------------------------------------------------------------------------------------------ build
def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def greedy_replies(prompts: list[str], backbone: str | None, max_tokens: int, batch: int, desc: str):
    """(prompt, GenerationResult) for the frozen backbone's greedy reply to each prompt, with no summary."""
    from softthought.generation import SamplingParams
    from softthought.pipeline import Pipeline
    from softthought.splice import build_chat_prompt

    pipe = Pipeline.load(backbone, dtype="bfloat16", max_batch_size=batch)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    for i in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch"):
        chunk = prompts[i : i + batch]
        built = [build_chat_prompt(pipe.backbone.tokenizer, [{"role": "user", "content": p}]) for p in chunk]
        yield from zip(chunk, pipe.engine.generate(built, params))


def teacher_answers(prompts: list[str], backbone: str | None, max_tokens: int, batch: int) -> list[dict]:
    """The frozen backbone's own greedy answers with no summary: the base that edits start from."""
    rows = []
    for p, r in greedy_replies(prompts, backbone, max_tokens, batch, "teacher answers"):
        answer = whole_sentences(r.text)
        if len(answer.split()) >= 5:
            rows.append({"prompt": p, "answer": answer})
    return rows


def floor_answers(prompts: list[str], backbone: str | None, max_tokens: int, batch: int, min_words: int) -> list[dict]:
    """The backbone's greedy answers within `max_tokens` (the budget replies are judged in) that reach `min_words`
    words: the base for users who ask for at least N words. "ended" says whether the backbone ended the reply itself;
    where it did not, a target must not teach an end of turn there (one cut to whole sentences would teach stopping
    short of the floor, the thoughts' failure on such users)."""
    rows = []
    for p, r in greedy_replies(prompts, backbone, max_tokens, batch, "floor answers"):
        answer = r.text.strip() if r.finish_reason == "length" else whole_sentences(r.text)
        if count_words(answer) >= min_words:
            rows.append({"prompt": p, "answer": answer, "ended": r.finish_reason == "stop"})
    return rows


#: "Always answer in <language>", written in that language: a system message in English drew English replies.
ANSWER_IN = {"fr": "Réponds toujours en français.", "de": "Antworte immer auf Deutsch.", "es": "Responde siempre en español.",
             "it": "Rispondi sempre in italiano.", "pt": "Responda sempre em português."}
#: Openings written into the reply before the backbone goes on: begun in the language, SmolLM2-135M stays in it about
#: 40-90 % of the time against 12-21 % from the system message alone; the thoughts then have one opening to start.
OPENINGS = {"fr": ["Bien sûr ! Voici ma réponse en français : ", "Bonjour ! La réponse est la suivante : "],
            "de": ["Gerne! Hier ist meine Antwort auf Deutsch: ", "Hallo! Die Antwort ist folgende: "],
            "es": ["¡Claro! Aquí está mi respuesta en español: ", "¡Hola! La respuesta es la siguiente: "],
            "it": ["Certo! Ecco la mia risposta in italiano: ", "Ciao! La risposta è questa: "],
            "pt": ["Claro! Aqui está a minha resposta em português: ", "Olá! A resposta é a seguinte: "]}


def language_answers(answers: list[dict], backbone: str | None, prompts: int, samples: int, max_tokens: int,
                     batch: int, seed: int) -> list[dict]:
    """The backbone's own answers in each of `LANGUAGES`, which no edit can write: sampled `samples` times per prompt
    with the preference written as text (a system message in the language) and the reply begun with one of the
    language's `OPENINGS`, and kept (the first per prompt) only when IFEval's language check passes. Their prompts are
    the first `prompts` of `answers`, so each has a plain answer beside it."""
    from softthought.generation import SamplingParams
    from softthought.pipeline import Pipeline
    from softthought.splice import Prompt, build_chat_prompt

    pipe = Pipeline.load(backbone, dtype="bfloat16", max_batch_size=batch)
    tok = pipe.backbone.tokenizer
    chosen = [a["prompt"] for a in answers[:prompts]]
    rows = []
    for code in LANGUAGES:
        jobs = [(p, OPENINGS[code][(j + s) % len(OPENINGS[code])]) for j, p in enumerate(chosen) for s in range(samples)]
        kept: dict[str, tuple[str, str]] = {}  # prompt -> (opening, what the backbone wrote after it)
        for i in tqdm(range(0, len(jobs), batch), desc=f"answers in {code}", unit="batch"):
            chunk = jobs[i : i + batch]
            built = [Prompt([build_chat_prompt(tok, [{"role": "system", "content": ANSWER_IN[code]}, {"role": "user", "content": p}])
                             .segments[0] + tok(opening, add_special_tokens=False)["input_ids"]]) for p, opening in chunk]
            # one seed per sample: the engine seeds each sequence's sampler from its params
            params = [SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed + i + k) for k in range(len(chunk))]
            for (p, opening), r in zip(chunk, pipe.engine.generate(built, params)):
                body = whole_sentences(r.text)
                if p not in kept and len(body.split()) >= 5 and check(opening + body, "language:response_language", {"language": code}):
                    kept[p] = (opening, body)
        rows += [{"prompt": p, "language": code, "opening": o, "answer": o + b} for p, (o, b) in kept.items()]
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="train_aux/data")
    ap.add_argument("--train-users", type=int, default=1200)
    ap.add_argument("--eval-users", type=int, default=80)
    ap.add_argument("--train-prompts", type=int, default=640)
    ap.add_argument("--eval-prompts", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--floor-tokens", type=int, default=96,
                    help="budget of the answers that reach a word floor (the eval's --max-new-tokens)")
    ap.add_argument("--language-prompts", type=int, default=160, help="prompts answered in each language")
    ap.add_argument("--language-samples", type=int, default=2, help="samples per prompt and language")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--backbone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-answers", action="store_true",
                    help="keep the answers files already in --out (the slow part); write only the users")
    args = ap.parse_args(argv)
    out = Path(args.out)
    train_users = make_users(args.train_users, args.seed, "train", held_out_phrasing=False)
    train_users += ifeval_users("train", len(train_users) // 4, args.seed)
    write_jsonl(out / "train_users.jsonl", train_users)
    # (a) unseen users with unseen phrasings (the held-out variant of every style); dev: the same kind of users,
    # drawn apart, for choosing checkpoints; (b) users phrased from IFEval's held-out sentences; (c) zero-shot kinds
    write_jsonl(out / "eval_users.jsonl", make_users(args.eval_users, args.seed + 1, "eval", held_out_phrasing=True))
    write_jsonl(out / "dev_users.jsonl", make_users(args.eval_users, args.seed + 3, "dev", held_out_phrasing=True))
    write_jsonl(out / "eval_users_ifeval.jsonl", ifeval_users("eval", args.eval_users, args.seed + 1))
    write_jsonl(out / "eval_users_zero_shot.jsonl", make_users(args.eval_users, args.seed + 2, "zero", held_out_phrasing=True,
                                                               kinds=TRAINED + ZERO_SHOT, include=ZERO_SHOT))
    pool = prompt_pool(args.seed)
    train, evaluation = pool[: args.train_prompts], pool[args.train_prompts : args.train_prompts + args.eval_prompts]
    write_jsonl(out / "train_prompts.jsonl", [{"prompt": p} for p in train])
    write_jsonl(out / "eval_prompts.jsonl", [{"prompt": p} for p in evaluation])
    if not (args.reuse_answers and (out / "answers.jsonl").exists()):
        write_jsonl(out / "answers.jsonl", teacher_answers(train, args.backbone, args.max_tokens, args.batch))
    # only where training users ask for a floor ("long" trained: kept out of TRAINED so far, EXPERIMENTS.md)
    floors = any(word_floor(u["checks"]) for u in train_users)
    if floors and not (args.reuse_answers and (out / "floor_answers.jsonl").exists()):
        write_jsonl(out / "floor_answers.jsonl",
                    floor_answers(train, args.backbone, args.floor_tokens, args.batch, min(FLOORS)))
    if not (args.reuse_answers and (out / "language_answers.jsonl").exists()):
        write_jsonl(out / "language_answers.jsonl", language_answers(
            read_jsonl(out / "answers.jsonl"), args.backbone, args.language_prompts, args.language_samples, args.max_tokens,
            args.batch, args.seed))


if __name__ == "__main__":
    main()
