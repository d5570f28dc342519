"""Training data: prompts, the backbone's own answers, and those answers minimally edited per user.

`python -m train_aux.data --out train_aux/data` writes train/eval users (eval: unseen users *and* unseen
phrasings), train/eval prompts, and the frozen backbone's own greedy answers to the training prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from tqdm import tqdm

from .checks import check_all
from .paths import shared_data
from .users import make_users

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


def edit_answer(answer: str, prompt: str, checks: list[dict], rng: random.Random) -> str | None:
    """The smallest edit of the backbone's own answer that satisfies every check, or None if none is found."""
    kinds = {c["instruction_id"]: c.get("kwargs") or {} for c in checks}
    text = answer.strip()
    if "length_constraints:number_words" in kinds:
        budget = kinds["length_constraints:number_words"]["num_words"]
        # leave room for the words other edits add (title, end phrase, postscript, keywords)
        extra = 4 * sum(k in kinds for k in ("detectable_format:title", "startend:end_checker",
                                             "detectable_content:postscript", "keywords:existence"))
        text = _truncate_words(text, max(5, budget - extra))
    if "punctuation:no_comma" in kinds:
        text = text.replace(",", "")
    if "keywords:existence" in kinds:
        missing = [k for k in kinds["keywords:existence"]["keywords"] if k.lower() not in text.lower()]
        if missing:
            text += " " + rng.choice(["Think of {w}.", "This reminds me of {w}.", "Like {w}."]).format(w=" and ".join(missing))
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


def teacher_answers(prompts: list[str], backbone: str | None, max_tokens: int, batch: int) -> list[dict]:
    """The frozen backbone's own greedy answers with no summary: the base that edits start from."""
    from softthought.generation import SamplingParams
    from softthought.pipeline import Pipeline
    from softthought.splice import build_chat_prompt

    pipe = Pipeline.load(backbone, dtype="bfloat16", max_batch_size=batch)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    rows = []
    for i in tqdm(range(0, len(prompts), batch), desc="teacher answers", unit="batch"):
        chunk = prompts[i : i + batch]
        built = [build_chat_prompt(pipe.backbone.tokenizer, [{"role": "user", "content": p}]) for p in chunk]
        for p, r in zip(chunk, pipe.engine.generate(built, params)):
            answer = whole_sentences(r.text)
            if len(answer.split()) >= 5:
                rows.append({"prompt": p, "answer": answer})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="train_aux/data")
    ap.add_argument("--train-users", type=int, default=600)
    ap.add_argument("--eval-users", type=int, default=80)
    ap.add_argument("--train-prompts", type=int, default=640)
    ap.add_argument("--eval-prompts", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--backbone")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    write_jsonl(out / "train_users.jsonl", make_users(args.train_users, args.seed, "train", held_out_phrasing=False))
    # unseen users *and* unseen phrasings (the held-out variant of every style)
    write_jsonl(out / "eval_users.jsonl", make_users(args.eval_users, args.seed + 1, "eval", held_out_phrasing=True))
    pool = prompt_pool(args.seed)
    train, evaluation = pool[: args.train_prompts], pool[args.train_prompts : args.train_prompts + args.eval_prompts]
    write_jsonl(out / "train_prompts.jsonl", [{"prompt": p} for p in train])
    write_jsonl(out / "eval_prompts.jsonl", [{"prompt": p} for p in evaluation])
    write_jsonl(out / "answers.jsonl", teacher_answers(train, args.backbone, args.max_tokens, args.batch))


if __name__ == "__main__":
    main()
