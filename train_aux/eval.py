"""Evaluation: personalization (checkable preferences) and general ability (multiple choice by log-likelihood).

    python -m train_aux.eval personalization --users U.jsonl --prompts P.jsonl [--aux DIR] --json OUT.json
    python -m train_aux.eval general --tasks hellaswag,arc_easy,piqa --n 1000 [--aux DIR] --users U.jsonl --json OUT.json
    python -m train_aux.eval head [--users U.jsonl] [--aux DIR] --json OUT.json

`--backbone DIR` evaluates another backbone (e.g. a fine-tuned baseline) the same way.
"""

from __future__ import annotations

import argparse
import bz2
import json
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from softthought.aux_model import SoftThoughtAux
from softthought.backbone import Backbone, load_backbone
from softthought.generation import Engine, SamplingParams, guided_logits
from softthought.ifeval import check_all
from softthought.splice import (
    OPENING,
    Placement,
    Prompt,
    build_chat_prompt,
    embed_prompt,
    hide,
    hiding_mask,
    left_pad,
    text_prompt,
    with_system_text,
)

from .checks import is_loop, on_topic
from .data import encode_pair, read_jsonl, summary_before
from .eval_workers import InProcess, RayWorkers
from .ifeval_phrasings import split_of
from .paths import shared_data
from .users import compatible, kind_of

CONDITIONS = ("none", "text", "soft")
#: Replies kept as samples: the first pairs' in each condition but none, so text and soft are read side by side.
SAMPLE_PAIRS = 30
#: Bumped when a personalization result gains fields the report needs (2: per-pair outcomes, paired margins).
PERSONALIZATION_FORMAT = 2
#: How `general` scored the choices (its result's "scoring"; results from before it was recorded are per-choice).
PER_CHOICE, SHARED_CONTEXT = "per-choice", "shared-context"


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


@torch.inference_mode()
def users_thoughts(aux: SoftThoughtAux, users: list[dict]) -> list[torch.Tensor]:
    """Each user's soft thoughts [K, hidden], encoded one summary at a time as the server encodes them."""
    return [aux.encode([u["summary"]])[0] for u in users]


# ------------------------------------------------------------------------------------------ personalization
def generate_replies(backbone: Backbone, prompts: list[Prompt], params: SamplingParams, batch: int) -> list:
    """The replies to built prompts, the engine keeping `batch` sequences running and refilling slots as replies end."""
    return Engine(backbone, max_batch_size=batch).generate(prompts, params)


def soft_reading(aux: SoftThoughtAux | None, guidance: float | None, gate: float | None) -> dict:
    """How the soft condition reads its thoughts, as `SamplingParams` fields: `guidance` and `gate` when given, else
    the checkpoint's own, as served."""
    config = aux.config if aux is not None else None
    return {"guidance": guidance if guidance is not None else config.guidance if config else 1.0,
            "guidance_gate": gate if gate is not None else config.guidance_gate if config else 0.0}


def personalization(backbone: Backbone, aux: SoftThoughtAux | None, users: list[dict], prompts: list[str],
                    pairs_per_user: int, max_new_tokens: int, seed: int, conditions=CONDITIONS, batch: int = 16,
                    run: InProcess | RayWorkers | None = None, guidance: float | None = None,
                    guidance_gate: float | None = None, reuse: dict | None = None, penalties: dict | None = None) -> dict:
    """Each user's checks on their replies to `pairs_per_user` prompts, per condition, paired. `run`: where the
    replies are generated (`eval_workers`; here by default). `guidance`, `guidance_gate`: the soft replies' reading
    of the thoughts (`SamplingParams`, the plain prompt guiding; `soft_reading`). `reuse`: an earlier result whose
    conditions that read no thoughts (none, text) are kept when it answered the same pairs the same way.
    `penalties`: OpenAI's `frequency_penalty` / `presence_penalty` on every condition's replies, as a client sets them."""
    run = run or InProcess(backbone)
    reading = soft_reading(aux, guidance, guidance_gate)
    guidance = reading["guidance"]
    rng = random.Random(seed)
    pairs = [(u, p) for u in users for p in rng.sample(prompts, min(pairs_per_user, len(prompts)))]
    thoughts = dict(zip((u["user"] for u in users), users_thoughts(aux, users))) if "soft" in conditions else {}
    tok = backbone.tokenizer
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0, **(penalties or {}))
    report: dict = {"format_version": PERSONALIZATION_FORMAT, "n_pairs": len(pairs), "n_users": len(users),
                    "pairs_per_user": pairs_per_user, "max_new_tokens": max_new_tokens, "seed": seed, **reading,
                    "backbone_fingerprint": backbone.fingerprint, "pairs": [[u["user"], p] for u, p in pairs],
                    **({"penalties": penalties} if penalties else {})}
    same = reuse is not None and all(reuse.get(k) == report.get(k) for k in
                                     ("format_version", "pairs", "max_new_tokens", "seed", "backbone_fingerprint", "penalties"))
    kept = {c for c in ("none", "text") if same and c in conditions and c in reuse}
    samples = [s for s in reuse["samples"] if s["condition"] in kept] if kept else []
    for cond in conditions:
        if cond in kept:
            report[cond] = reuse[cond]
            continue
        built = []
        for u, p in pairs:
            user_msg = [{"role": "user", "content": p}]
            if cond == "none":
                built.append(build_chat_prompt(tok, user_msg))
            elif cond == "text":
                built.append(build_chat_prompt(tok, with_system_text(tok, user_msg, u["summary"])))
            else:
                built.append(build_chat_prompt(tok, user_msg, thoughts[u["user"]], placement=aux.placement,
                                               guided=guidance != 1))
        print(f"personalization/{cond}: generating {len(built)} replies", file=sys.stderr, flush=True)
        results = run.map(generate_replies, built, replace(params, **reading) if cond == "soft" else params, batch)
        outcomes, per_id = [], defaultdict(list)
        for i, ((u, p), r) in enumerate(zip(pairs, results)):
            outcome = check_all(r.text, u["checks"])
            outcomes.append(outcome)
            for c, ok in zip(u["checks"], outcome):
                per_id[c["instruction_id"]].append(ok)
            if i < SAMPLE_PAIRS and cond != "none":
                samples.append({"condition": cond, "user": u["user"], "summary": u["summary"], "prompt": p,
                                "response": r.text, "passed": outcome})
        n_checks = sum(len(o) for o in outcomes)
        topical = [on_topic(p, r.text) for (_, p), r in zip(pairs, results)]
        rate, all_rate = sum(map(sum, outcomes)) / n_checks, sum(map(all, outcomes)) / len(pairs)
        report[cond] = {
            "check_pass_rate": rate, "check_pass_rate_se": _se(rate, n_checks), "n_checks": n_checks,
            "all_pass_rate": all_rate, "all_pass_rate_se": _se(all_rate, len(pairs)), "n_responses": len(pairs),
            "mean_prompt_tokens": sum(r.prompt_tokens for r in results) / len(results),
            "degenerate_rate": (deg := sum(loops := [is_loop(r.text) for r in results]) / len(results)),
            "degenerate_rate_se": _se(deg, len(results)),
            # checks passed by replies that are not loops: what a reader would grant
            "sound_check_pass_rate": sum(sum(o) for o, loop in zip(outcomes, loops) if not loop) / n_checks,
            "degenerate": loops,
            "on_topic_rate": (topic := sum(topical) / len(results)),
            "on_topic_rate_se": _se(topic, len(results)),
            # checks passed by replies that repeat something of the question and do not loop
            "on_topic_check_pass_rate": sum(sum(o) for o, t, loop in zip(outcomes, topical, loops) if t and not loop) / n_checks,
            "on_topic": topical,
            "per_instruction": {k: {"pass_rate": sum(v) / len(v), "n": len(v)} for k, v in sorted(per_id.items())},
            "passed": outcomes,
        }
    report["paired"] = {f"{b}_minus_{a}": paired_checks(report[a]["passed"], report[b]["passed"], report["pairs"])
                        for a, b in (("none", "text"), ("none", "soft"), ("text", "soft")) if a in report and b in report}
    report["samples"] = samples
    return report


def paired_checks(a: list[list[bool]], b: list[list[bool]], pairs: list[list[str]]) -> dict:
    """b minus a, judged on the same (user, prompt) pairs and the same checks: the change in the fraction of checks
    passed and of responses passing all of theirs, each with its standard error clustered by user (a user's checks
    recur in each of their responses, so they are not independent draws)."""
    if len(a) != len(b) or len(a) != len(pairs) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("paired_checks: the two results were not judged on the same pairs and checks")
    users = {user: i for i, user in enumerate(dict.fromkeys(user for user, _ in pairs))}
    sums = np.zeros((len(users), 4))  # per user: checks gained, checks, responses gained (all passing), responses
    for (user, _), x, y in zip(pairs, a, b):
        sums[users[user]] += (sum(y) - sum(x), len(x), all(y) - all(x), 1)

    def ratio(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
        # a ratio of cluster sums: the usual cluster-robust (sandwich) standard error
        mean, g = num.sum() / den.sum(), len(num)
        return float(mean), math.sqrt(((num - mean * den) ** 2).sum() * g / max(1, g - 1)) / den.sum()

    check, check_se = ratio(sums[:, 0], sums[:, 1])
    every, every_se = ratio(sums[:, 2], sums[:, 3])
    return {"check_pass_rate": check, "check_pass_rate_se": check_se, "all_pass_rate": every, "all_pass_rate_se": every_se,
            "n_checks": int(sums[:, 1].sum()), "n_users": len(users)}


# ------------------------------------------------------------------------------------------ instruction following
#: Kinds that only add to a reply (a word, a placeholder, emphasis, no commas): the only ones a user may hold for an
#: IFEval prompt whose own instructions are none of ours (repeat the request, two responses, a fixed answer, ...).
ADDITIVE = {"keywords", "keyword_frequency", "forbidden", "no_comma", "capital_words", "placeholders", "highlights"}


def ifeval_items(split: str = "eval") -> list[dict]:
    """IFEval's rows of one split of its keys (`ifeval_phrasings.split_of`): "eval" is the half that never feeds training."""
    rows = [json.loads(line) for line in (shared_data() / "ifeval" / "input_data.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if split_of(r["key"]) == split]


def fits(user: dict, item: dict) -> bool:
    """Whether a user's preferences leave an IFEval prompt's own instructions satisfiable: none of the same
    instruction, none that conflicts with them, no response language or whole-reply form (JSON, quotation marks) of
    their own, and only additive preferences beside instructions that are none of ours."""
    checks = [{"instruction_id": i, "kwargs": k} for i, k in zip(item["instruction_id_list"], item["kwargs"])]
    kinds = [kind_of(c) for c in checks]
    own = {c["instruction_id"] for c in user["checks"]}
    return (not own & set(item["instruction_id_list"]) and not {"language", "json", "quotation"} & set(user["kinds"])
            and compatible([k for k in kinds if k] + user["kinds"]) and (all(kinds) or set(user["kinds"]) <= ADDITIVE))


def instruction_following(backbone: Backbone, aux: SoftThoughtAux | None, users: list[dict], n: int, max_new_tokens: int,
                          seed: int, batch: int = 16, run: InProcess | RayWorkers | None = None,
                          guidance: float | None = None, guidance_gate: float | None = None,
                          reuse: dict | None = None) -> dict:
    """IFEval prompt-level strict accuracy of the plain backbone and of the backbone reading a user's thoughts, on the
    same held-out prompts, paired item by item: each prompt is answered with the thoughts of one user whose
    preferences do not contradict its own instructions (`fits`), and judged on the prompt's instructions only. `run`:
    where the replies are generated (`eval_workers`; here by default); `guidance`, `guidance_gate`: the soft replies'
    (`soft_reading`). Without `aux`, only the plain replies: a fine-tuned copy is paired with the plain backbone on
    the same prompts, which depend on the users and seed only. `reuse`: an earlier result whose plain replies are
    kept when the same backbone answered the same prompts the same way."""
    run = run or InProcess(backbone)
    reading = soft_reading(aux, guidance, guidance_gate)
    guidance = reading["guidance"]
    rng = random.Random(seed)
    items = ifeval_items("eval")
    rng.shuffle(items)
    pairs = []
    for item in items:
        fitting = [u for u in users if fits(u, item)]
        if fitting:
            pairs.append((item, rng.choice(fitting)))
    pairs = pairs[:n]
    tok = backbone.tokenizer
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0)
    conditions, placement = (("none",), OPENING) if aux is None else (("none", "soft"), aux.placement)
    thoughts = {} if aux is None else dict(zip((u["user"] for _, u in pairs), users_thoughts(aux, [u for _, u in pairs])))
    report: dict = {"n": len(pairs), "max_new_tokens": max_new_tokens, "seed": seed, "split": "eval", **reading,
                    "backbone_fingerprint": backbone.fingerprint, "pairs": [[item["key"], u["user"]] for item, u in pairs]}
    for cond in conditions:
        if cond == "none" and reuse is not None and all(reuse.get(k) == report[k] for k in
                                                        ("pairs", "max_new_tokens", "seed", "backbone_fingerprint")):
            report[cond] = reuse[cond]
            continue
        built = [build_chat_prompt(tok, [{"role": "user", "content": item["prompt"]}],
                                   thoughts[u["user"]] if cond == "soft" else None, placement=placement,
                                   guided=guidance != 1)
                 for item, u in pairs]
        print(f"ifeval/{cond}: generating {len(built)} replies", file=sys.stderr, flush=True)
        outcomes = [check_all(r.text, [{"instruction_id": i, "kwargs": k} for i, k in
                                       zip(item["instruction_id_list"], item["kwargs"])])
                    for (item, _), r in zip(pairs, run.map(generate_replies, built,
                                                            replace(params, **reading) if cond == "soft" else params,
                                                            batch))]
        prompt_level = [int(all(o)) for o in outcomes]
        n_instructions = sum(map(len, outcomes))
        report[cond] = {"prompt_level_strict": sum(prompt_level) / len(pairs),
                        "instruction_level_strict": sum(map(sum, outcomes)) / n_instructions, "passed": prompt_level}
    if aux is not None:
        report["soft_minus_none"] = paired_diff(report["none"]["passed"], report["soft"]["passed"])
    return report


# ------------------------------------------------------------------------------------------ general ability
def load_task(name: str, n: int, seed: int, skip: int = 0) -> list[dict]:
    """Items skip..skip+n of one seeded shuffle, as {"context", "choices" (continuations with their leading space),
    "gold"}, lm-eval's prompts. skip > 0 gives a dev split disjoint from the first n, to choose checkpoints on."""
    root = shared_data()
    items = []
    if name == "hellaswag":
        with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt") as f:
            lines = f.read().splitlines()
        for i in range(0, len(lines) - 5, 6):
            items.append({"context": lines[i], "choices": [" " + e for e in lines[i + 2 : i + 6]], "gold": int(lines[i + 1])})
    elif name == "arc_easy":
        for row in read_jsonl(root / "arc_easy" / "arc_easy.jsonl"):
            items.append({"context": row["query"] + "\nAnswer:", "choices": [" " + c for c in row["choices"]], "gold": row["gold"]})
    elif name == "piqa":
        labels = (root / "piqa" / "valid-labels.lst").read_text().split()
        for row, label in zip(read_jsonl(root / "piqa" / "valid.jsonl"), labels):
            items.append({"context": f"Question: {row['goal']}\nAnswer:", "choices": [" " + row["sol1"], " " + row["sol2"]],
                          "gold": int(label)})
    else:
        raise ValueError(f"unknown task {name!r}; known: hellaswag, arc_easy, piqa")
    random.Random(seed).shuffle(items)
    return items[skip : skip + n]


@torch.inference_mode()
def loglikelihoods(backbone: Backbone, requests: list[tuple[list[int], list[int], torch.Tensor | None]], batch: int = 32,
                   desc: str = "loglik", placement: Placement = OPENING, guidance: float = 1.0,
                   gate: float = 0.0) -> list[float]:
    """Sum of log p(continuation | context with the thoughts placed) for each (context ids, continuation ids,
    thoughts): the thoughts before the context, or after it (`placement.at_end`), where a chat prompt's end is.
    `placement.reply_only`: the context, but its last position, does not see them (`Prompt.reply_only`).
    `guidance`: the continuation's logits guided as generation guides them (`SamplingParams.guidance`), the same
    text without the thoughts guiding, only where they move the token by more than `gate` nats (`guided_logits`)."""
    table = backbone.model.get_input_embeddings()

    def key(i: int) -> tuple:
        return tuple(requests[i][0]), tuple(requests[i][1])

    # guided, the same text read with several users' thoughts is sorted into one batch, where its guiding plain
    # logits are computed once
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]) - len(requests[i][1]),
                                                        *(key(i) if guidance != 1 else ())))
    out = [0.0] * len(requests)

    def continuation_logits(prompts: list[Prompt], conts: list[list[int]]) -> list[torch.Tensor]:
        seqs = [embed_prompt(table, Prompt([*p.segments, cont])) for p, cont in zip(prompts, conts)]
        embeds, mask, positions = left_pad(seqs)
        length = embeds.shape[1]
        hidden = [p.hidden_thoughts(length - len(e)) for p, e in zip(prompts, seqs)]
        logits = backbone.model(inputs_embeds=embeds, attention_mask=hiding_mask(mask, hidden, embeds.dtype),
                                position_ids=positions).logits
        return [logits[row, length - len(cont) - 1 : length - 1].float() for row, cont in enumerate(conts)]

    for start in tqdm(range(0, len(order), batch), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch]
        conts = [requests[i][1] for i in idx]
        logits = continuation_logits([text_prompt(requests[i][0], requests[i][2], placement) for i in idx], conts)
        if guidance != 1:
            texts = list(dict.fromkeys(key(i) for i in idx))
            plain = dict(zip(texts, continuation_logits([text_prompt(list(ctx), None) for ctx, _ in texts],
                                                        [list(cont) for _, cont in texts])))
            logits = [guided_logits(x, plain[key(i)], guidance, gate) for x, i in zip(logits, idx)]
        for i, cont, x in zip(idx, conts, logits):
            out[i] = x.log_softmax(-1).gather(-1, torch.tensor(cont, device=x.device)[:, None]).sum().item()
    return out


@torch.inference_mode()
def shared_context_loglikelihoods(backbone: Backbone, groups: list[tuple[list[int], list[list[int]], torch.Tensor | None]],
                                  batch: int = 16, desc: str = "loglik", placement: Placement = OPENING) -> list[list[float]]:
    """The same sums as `loglikelihoods`, for each continuation of each (context ids, [continuation ids], thoughts),
    with the context read once: one row holds the context with its thoughts placed, then every continuation, each
    continuation attending to that prefix and to itself only and numbered as if it alone followed it. An item's
    choices share their context, so this reads 2-3x fewer tokens. `placement`: as in `loglikelihoods`."""
    table, dtype, dev = backbone.model.get_input_embeddings(), backbone.dtype, backbone.device
    decoder, head = backbone.model.get_decoder(), backbone.model.get_output_embeddings()
    window = getattr(backbone.model.config, "sliding_window", None)
    order = sorted(range(len(groups)), key=lambda i: -len(groups[i][0]) - sum(map(len, groups[i][1])))
    out: list[list[float]] = [[] for _ in groups]
    for start in tqdm(range(0, len(order), batch), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch]
        rows, segments, positions, hidden_spans = [], [], [], []
        reads = []  # per continuation: its item, and the (row, position, token) of each of its tokens
        for r, i in enumerate(idx):
            ctx, conts, thoughts = groups[i]
            prompt = text_prompt(ctx, thoughts, placement)
            emb = embed_prompt(table, Prompt([*prompt.segments, [t for c in conts for t in c]]))
            prefix = prompt.num_tokens  # context and thoughts
            hidden_spans.append(prompt.hidden_thoughts())  # rows start at position 0
            seg, pos, at = [0] * prefix, list(range(prefix)), prefix
            for s, cont in enumerate(conts, 1):
                seg += [s] * len(cont)
                pos += range(prefix, prefix + len(cont))
                # the first token is read from the context's last position, the others from their own segment
                reads.append((i, [(r, q, t) for q, t in zip([prefix - 1, *range(at, at + len(cont) - 1)], cont)]))
                at += len(cont)
            rows.append(emb)
            segments.append(torch.tensor(seg, device=dev))
            positions.append(torch.tensor(pos, device=dev))
        length = max(e.shape[0] for e in rows)
        if window and length > window:  # a custom mask replaces the model's own, window included
            raise ValueError(f"shared-context scoring cannot keep this backbone's {window}-position sliding window "
                             f"over rows of {length}: score each choice on its own")
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
        seg = torch.full((len(rows), length), -1, device=dev)  # -1: padding, which attends only to padding (never NaN)
        pos = torch.zeros((len(rows), length), dtype=torch.long, device=dev)
        for r, (e, s, p) in enumerate(zip(rows, segments, positions)):
            embeds[r, : e.shape[0]], seg[r, : e.shape[0]], pos[r, : e.shape[0]] = e, s, p
        q, k = seg[:, :, None], seg[:, None, :]
        allowed = torch.ones(length, length, dtype=torch.bool, device=dev).tril() & ((k == q) | ((k == 0) & (q >= 0)))
        hide(allowed, hidden_spans)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        flat = [x for _, tokens in reads for x in tokens]
        logp = head(hidden[[x[0] for x in flat], [x[1] for x in flat]]).float().log_softmax(-1)
        picked = logp[torch.arange(len(flat), device=dev), [x[2] for x in flat]].tolist()
        at = 0
        for i, tokens in reads:
            out[i].append(sum(picked[at : at + len(tokens)]))
            at += len(tokens)
    return out


def scoring_name(shared_context: bool) -> str:
    return SHARED_CONTEXT if shared_context else PER_CHOICE


def score_items(backbone: Backbone, pairs: list[tuple[dict, object]], desc: str, shared_context: bool = False,
                placement: Placement = OPENING, guidance: float = 1.0, gate: float = 0.0) -> list[list[float]]:
    """`score_task` on (item, prefix) pairs: what `general` hands its runner."""
    return score_task(backbone, [item for item, _ in pairs], [prefix for _, prefix in pairs], desc, shared_context, placement,
                      guidance, gate)


def score_task(backbone: Backbone, items: list[dict], prefixes: list, desc: str, shared_context: bool = False,
               placement: Placement = OPENING, guidance: float = 1.0, gate: float = 0.0) -> list[list[float]]:
    """log p(choice | [prefix] + context) of each choice of each item, rounded to 4 decimals (as cached in reports).
    prefixes[i] goes before item i's context: None, soft thoughts [K, hidden], or a text summary (written out
    before the context, as a plain prompt would carry it). `shared_context` reads each context once for all its
    choices (`shared_context_loglikelihoods`); the default scores each choice on its own, as lm-eval does.
    `placement`: where the thoughts go and who reads them, `guidance` and `gate` how they are read (`loglikelihoods`)."""
    if shared_context and guidance != 1:
        raise ValueError("guided scoring reads each choice on its own: drop shared_context")
    tok = backbone.tokenizer
    groups = []
    for item, prefix in zip(items, prefixes):
        context = summary_before(prefix, item["context"]) if isinstance(prefix, str) else item["context"]
        pairs = [encode_pair(tok, context, choice) for choice in item["choices"]]
        groups.append((pairs[0][0], [cont for _, cont in pairs], prefix if isinstance(prefix, torch.Tensor) else None))
    if shared_context:
        scores = shared_context_loglikelihoods(backbone, groups, desc=desc, placement=placement)
    else:
        flat = loglikelihoods(backbone, [(ctx, cont, th) for ctx, conts, th in groups for cont in conts], desc=desc,
                              placement=placement, guidance=guidance, gate=gate)
        bounds = np.cumsum([0] + [len(conts) for _, conts, _ in groups])
        scores = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [[round(x, 4) for x in s] for s in scores]


def _per_byte(item: dict, scores: list[float]) -> list[float]:
    return [s / len(c.encode()) for s, c in zip(scores, item["choices"])]  # lm-eval's acc_norm normalizes by bytes


def correctness(items: list[dict], loglik: list[list[float]]) -> list[tuple[int, int]]:
    """(acc, acc_norm) of each item from its choices' log-likelihoods."""
    def right(scores, gold):
        return int(max(range(len(scores)), key=scores.__getitem__) == gold)
    return [(right(scores, item["gold"]), right(_per_byte(item, scores), item["gold"])) for item, scores in zip(items, loglik)]


def gold_margin_shift(items: list[dict], plain: list[list[float]], reading: list[list[list[float]]]) -> dict:
    """Does reading the thoughts pull the scores away from the right answers, or only reshuffle near-ties? An item's
    gold margin is its right choice's per-byte log-likelihood minus the mean of the other choices' (what acc_norm
    ranks). Fitted over items, margin with thoughts = slope x plain margin + shift: slope < 1 shrinks every margin
    in proportion; shift < 0 costs the right answer ground on every item alike, a systematic loss. What neither
    explains is item-specific, and flips only near-ties. `reading` holds one list per user round, averaged per item.
    The shift's standard error treats items as independent."""
    def margin(item, scores):
        norm = _per_byte(item, scores)
        others = [x for i, x in enumerate(norm) if i != item["gold"]]
        return norm[item["gold"]] - sum(others) / len(others)

    x = np.array([margin(item, s) for item, s in zip(items, plain)])
    y = np.array([np.mean([margin(item, r[i]) for r in reading]) for i, item in enumerate(items)])
    design = np.stack([x, np.ones_like(x)], axis=1)
    (slope, shift), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ np.array([slope, shift])
    shift_se = math.sqrt(resid.var(ddof=2) * np.linalg.inv(design.T @ design)[1, 1])
    mean = float(x.mean())
    size = abs(mean)  # a plain backbone worse than chance has a negative mean margin; the shift keeps its sign
    return {"plain_margin": mean, "slope": float(slope), "shift": float(shift), "shift_se": shift_se,
            "shift_pct": 100 * float(shift) / size, "shift_pct_se": 100 * shift_se / size}


def paired_diff(a: list[int], b: list[int]) -> dict:
    """b minus a in points, item by item on the same items, with its standard error."""
    n = len(a)
    diffs = [y - x for x, y in zip(a, b)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(1, n - 1)
    return {"diff": 100 * mean, "diff_se": 100 * math.sqrt(var / n)}


def against_plain(items: list[dict], plain: list[list[float]], reading: list[list[list[float]]]) -> tuple[dict, dict, dict]:
    """Another reading of the same items against the plain backbone's: its acc / acc_norm (each item's correctness
    averaged over the rounds of `reading`, one per user), the paired difference, and the gold-margin shift."""
    right = [correctness(items, ll) for ll in reading]
    scored = [tuple(sum(r[i][k] for r in right) / len(right) for k in range(2)) for i in range(len(items))]
    base = correctness(items, plain)
    minus = {m: paired_diff([p[k] for p in base], [s[k] for s in scored]) for k, m in enumerate(("acc", "acc_norm"))}
    return _accs(scored), minus, gold_margin_shift(items, plain, reading)


def paired_backbones(reference: dict, other: dict, tasks: list[str], n: int, seed: int, skip: int = 0) -> dict:
    """Two `general` results on the same items (the first n of `reference`'s): `other`'s plain backbone (e.g. a
    fine-tuned copy) paired against `reference`'s, per task {"minus_plain", "gold_margin"}."""
    out = {}
    for t in tasks:
        _, minus, margin = against_plain(load_task(t, n, seed, skip), reference[t]["plain_loglik"][:n], [other[t]["plain_loglik"]])
        out[t] = {"minus_plain": minus, "gold_margin": margin}
    return out


def general(backbone: Backbone, aux: SoftThoughtAux | None, users: list[dict], tasks: list[str], n: int, seed: int,
            with_text: bool = False, plain_loglik: dict | None = None, users_per_item: int = 1, skip: int = 0,
            shared_context: bool = False, run: InProcess | RayWorkers | None = None, guidance: float | None = None,
            guidance_gate: float | None = None) -> dict:
    """acc / acc_norm of the plain backbone and, with `aux`, of the backbone reading users' soft thoughts; with
    `with_text`, also with the summary written as text. All paired on the same items, with the gold-margin shift
    of each condition against plain (`gold_margin_shift`). Item i is scored with users i, i+1, ...
    i+users_per_item-1 (mod len(users)) and its correctness averaged over them, so no one user's thoughts decide an
    item (users_per_item=len(users) is the exact average over users). `plain_loglik` ({task: per-choice scores}
    from an earlier report of the same backbone, items and scoring) spares scoring the plain backbone again: it
    does not depend on the aux. `shared_context`: see `score_task`; recorded as `scoring`. `run`: where the items are
    scored (`eval_workers`; here by default). `guidance`, `guidance_gate`: the soft condition's, as its replies are
    guided (`soft_reading`)."""
    run = run or InProcess(backbone)
    reading = soft_reading(aux, guidance, guidance_gate)
    if not 1 <= users_per_item <= max(1, len(users)):
        raise ValueError(f"users_per_item must be between 1 and the number of users ({len(users)})")
    conditions = {}  # name -> each user's prefix
    if aux is not None:
        conditions["soft"] = users_thoughts(aux, users)
    if with_text:
        conditions["text"] = [u["summary"] for u in users]
    report = {"n": n, "seed": seed, "skip": skip, "conditions": list(conditions), "backbone_fingerprint": backbone.fingerprint,
              "scoring": scoring_name(shared_context), **reading}
    if conditions:  # only a condition reads the users: the plain backbone alone (a fine-tuned copy) records none
        report.update(n_users=len(users), users_per_item=users_per_item)
    for task in tasks:
        items = load_task(task, n, seed, skip)
        cached = (plain_loglik or {}).get(task)
        plain_ll = cached if cached and len(cached) == len(items) else \
            run.map(score_items, [(item, None) for item in items], f"{task}/plain", shared_context)
        entry = {"n": len(items), "plain": _accs(correctness(items, plain_ll)), "plain_loglik": plain_ll}
        for name, per_user in conditions.items():
            rounds = range(users_per_item)  # one pass over the items per round, all in one batched scoring
            flat = run.map(score_items, [(item, per_user[(i + r) % len(users)]) for r in rounds for i, item in enumerate(items)],
                           f"{task}/{name}", shared_context,
                           *((aux.placement, reading["guidance"], reading["guidance_gate"]) if name == "soft" else (OPENING,)))
            per_round = [flat[r * len(items):(r + 1) * len(items)] for r in rounds]
            entry[name], entry[f"{name}_minus_plain"], entry[f"{name}_gold_margin"] = against_plain(items, plain_ll, per_round)
        report[task] = entry
    return report


def _accs(results: list[tuple[float, float]]) -> dict:
    # per-item correctness is fractional when averaged over users; the binomial SE is then an upper bound
    n = len(results)
    acc, norm = sum(r[0] for r in results) / n, sum(r[1] for r in results) / n
    return {"acc": 100 * acc, "acc_se": 100 * _se(acc, n), "acc_norm": 100 * norm, "acc_norm_se": 100 * _se(norm, n)}


def scoring_bench(backbone: Backbone, aux: SoftThoughtAux | None, users: list[dict], tasks: list[str], n: int,
                  seed: int) -> dict:
    """Seconds for each way of scoring the same items (with users' thoughts when an aux is given), their ratio, and
    how far the two sets of scores are apart: the largest difference in nats and the items whose acc_norm differs."""
    prefixes = users_thoughts(aux, users) if aux is not None else [None]
    out = {"dtype": str(backbone.dtype).removeprefix("torch."), "n": n}
    for task in tasks:
        items = load_task(task, n, seed)
        item_prefixes = [prefixes[i % len(prefixes)] for i in range(len(items))]
        seconds, scores = {}, {}
        for shared in (False, True):
            start = time.perf_counter()
            scores[shared] = score_task(backbone, items, item_prefixes, f"{task}/{scoring_name(shared)}", shared,
                                        aux.placement if aux is not None else OPENING)
            seconds[scoring_name(shared)] = round(time.perf_counter() - start, 2)
        norm = [correctness(items, scores[shared]) for shared in (False, True)]
        out[task] = {"seconds": seconds, "speedup": round(seconds[PER_CHOICE] / seconds[SHARED_CONTEXT], 2),
                     "max_abs_diff": max(abs(a - b) for x, y in zip(scores[False], scores[True]) for a, b in zip(x, y)),
                     "acc_norm_differs": sum(a[1] != b[1] for a, b in zip(*norm))}
    return out


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("personalization")
    p.add_argument("--users", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--pairs-per-user", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, on every condition's replies")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, on every condition's replies")
    g = sub.add_parser("general")
    g.add_argument("--tasks", default="hellaswag,arc_easy,piqa")
    g.add_argument("--n", type=int, default=1000)
    g.add_argument("--users", required=True)
    g.add_argument("--max-users", type=int, default=8)
    g.add_argument("--users-per-item", type=int, default=1, help="score each item with this many users' thoughts, averaged")
    g.add_argument("--with-text", action="store_true", help="also score with the summary written as text")
    g.add_argument("--skip", type=int, default=0,
                   help="score items SKIP..SKIP+n of the shuffle: a dev split for choosing checkpoints (the report uses 0)")
    g.add_argument("--shared-context", action="store_true",
                   help="read each item's context once for all its choices: the same scores up to rounding, 2-3x faster "
                        "(see `scoring-bench`); the report scores each choice on its own, as lm-eval does")
    g.add_argument("--paired-with", metavar="JSON",
                   help="an earlier `general` result on the same items (e.g. train_aux/results/general.json): this "
                        "backbone's plain scores are paired against its plain scores (for a fine-tuned copy)")
    f = sub.add_parser("ifeval", help="IFEval prompt-level strict accuracy on its held-out half, plain against users' thoughts")
    f.add_argument("--users", required=True, help="whose thoughts read the prompts (one fitting user per prompt)")
    f.add_argument("--n", type=int, default=1000, help="at most this many prompts")
    f.add_argument("--max-new-tokens", type=int, default=256)
    b = sub.add_parser("scoring-bench", help="time per-choice against shared-context scoring on the same items, in one run")
    b.add_argument("--tasks", default="arc_easy,hellaswag,piqa")
    b.add_argument("--n", type=int, default=100)
    b.add_argument("--users", required=True, help="their thoughts go before the items (round-robin)")
    o = sub.add_parser("onboarding", help="the preference memory with simulated users: recovery against questions asked, "
                                          "and the learned summaries' thoughts against the users' own (train_aux.onboarding_eval)")
    o.add_argument("--prompts", required=True)
    o.add_argument("--recovery-users", type=int, default=300)
    o.add_argument("--questions", type=int, default=10)
    o.add_argument("--confidence", type=float, default=0.95, help="the server's stopping rule (onboarding_confidence)")
    o.add_argument("--n-users", type=int, default=60, help="simulated users generating replies, per noise level")
    o.add_argument("--pairs-per-user", type=int, default=2)
    o.add_argument("--max-new-tokens", type=int, default=96)
    o.add_argument("--plot", help="PNG of the recovery curves")
    h = sub.add_parser("head", help="the language head's choices of reply form against the ones the summaries ask for "
                                    "(train_aux.head_eval)")
    h.add_argument("--data-dir", default="train_aux/data-broad", help="where the hand-written and dev users are")
    for s in (p, g, f):
        s.add_argument("--guidance", type=float, help="the soft condition's guidance on the thoughts: logits = plain + "
                                                      "GUIDANCE * (with thoughts - plain), replies and scored choices "
                                                      "alike (default: the checkpoint's own `guidance`)")
        s.add_argument("--guidance-gate", type=float, help="guide only positions where the thoughts' KL to the plain "
                                                           "prompt exceeds this many nats (default: the checkpoint's "
                                                           "own `guidance_gate`)")
        s.add_argument("--workers", type=int, help="shard the items over this many Ray workers, each with its own "
                                                   "backbone replica (train_aux.eval_workers); the figures do not "
                                                   "depend on how many")
        s.add_argument("--gpus-per-worker", type=float, default=0.0)
        s.add_argument("--cpus-per-worker", type=float, default=1.0)
        s.add_argument("--shard-size", type=int, default=32, help="with --workers: items per chunk handed to a worker")
    for s in (p, g, f, b, o, h):
        s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (a GPU if one is visible); with "
                                                       "--workers, where each worker runs (auto: its own GPU)")
        s.add_argument("--aux", help="auxiliary checkpoint (default: the shipped one)")
        s.add_argument("--no-aux", action="store_true", help="evaluate without soft thoughts")
        s.add_argument("--backbone")
        s.add_argument("--dtype", default="bfloat16")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--json", required=True)
    o.add_argument("--users", help=argparse.SUPPRESS)  # the simulated users are drawn from the question bank
    h.add_argument("--users", help="comma-separated user files, each a set (default: head_eval.head_dev_sets)")
    args = ap.parse_args(argv)
    workers = getattr(args, "workers", None)
    if workers is not None and (workers < 1 or args.shard_size < 1):
        ap.error("--workers and --shard-size must be at least 1")
    # with workers, this process only builds the prompts and the thoughts: the backbone's replicas are theirs
    backbone = load_backbone(args.backbone, dtype=args.dtype, device="cpu" if workers else args.device)
    run = (RayWorkers(args.backbone, args.dtype, backbone.fingerprint, workers, args.shard_size, args.gpus_per_worker,
                      args.cpus_per_worker, args.device) if workers else InProcess(backbone))
    aux = None
    if not args.no_aux:
        from softthought.pipeline import default_aux_dir

        path = args.aux or default_aux_dir()
        if path is None:
            ap.error("no auxiliary checkpoint: pass --aux DIR or --no-aux")
        aux = SoftThoughtAux.from_pretrained(path, backbone=backbone).to(backbone.device).eval()
    users = read_jsonl(args.users) if args.users and args.command != "head" else []
    if args.command == "head":
        from . import head_eval

        if aux is None:
            ap.error("head evaluates an auxiliary checkpoint's language head: drop --no-aux")
        sets = ({Path(f).stem: read_jsonl(f) for f in args.users.split(",")} if args.users
                else head_eval.head_dev_sets(Path(args.data_dir)))
        try:
            report = head_eval.evaluate(aux, sets)
        except ValueError as e:
            ap.error(str(e))
    elif args.command == "onboarding":
        from . import onboarding_eval

        if aux is None:
            ap.error("onboarding compares summaries through their thoughts: it needs an auxiliary checkpoint")
        report = onboarding_eval.evaluate(backbone, aux, [r["prompt"] for r in read_jsonl(args.prompts)], args.seed,
                                          args.recovery_users, args.questions, args.confidence, args.n_users,
                                          args.pairs_per_user, args.max_new_tokens)
        if args.plot:
            onboarding_eval.plot(report, args.plot)
    elif args.command == "ifeval":
        report = instruction_following(backbone, aux, users, args.n, args.max_new_tokens, args.seed, run=run,
                                       guidance=args.guidance, guidance_gate=args.guidance_gate)
    elif args.command == "scoring-bench":
        report = scoring_bench(backbone, aux, users, args.tasks.split(","), args.n, args.seed)
    elif args.command == "personalization":
        conditions = [c for c in args.conditions.split(",") if c and (aux is not None or c != "soft")]
        prompts = [r["prompt"] for r in read_jsonl(args.prompts)]
        report = personalization(backbone, aux, users, prompts, args.pairs_per_user, args.max_new_tokens, args.seed,
                                 conditions, run=run, guidance=args.guidance, guidance_gate=args.guidance_gate,
                                 penalties={k: v for k, v in (("frequency_penalty", args.frequency_penalty),
                                                              ("presence_penalty", args.presence_penalty)) if v})
    else:
        tasks = args.tasks.split(",")
        reference = json.loads(Path(args.paired_with).read_text()) if args.paired_with else None
        if reference and (reference.get("seed") != args.seed or reference.get("skip", 0) != args.skip
                          or any(reference.get(t, {}).get("n", 0) < args.n for t in tasks)):
            ap.error(f"--paired-with {args.paired_with}: not scored on these items (seed {args.seed}, skip {args.skip}, "
                     f"{args.n} items of {', '.join(tasks)})")
        if reference and reference.get("scoring", PER_CHOICE) != scoring_name(args.shared_context):
            # bf16 scores of one item differ between the two ways of batching it: pair like with like
            ap.error(f"--paired-with {args.paired_with}: scored {reference.get('scoring', PER_CHOICE)}, not "
                     f"{scoring_name(args.shared_context)} (add or drop --shared-context)")
        if soft_reading(aux, args.guidance, args.guidance_gate)["guidance"] != 1 and args.shared_context:
            ap.error("--guidance scores each choice on its own: drop --shared-context")
        report = general(backbone, aux, users[: args.max_users], tasks, args.n, args.seed, args.with_text,
                         users_per_item=args.users_per_item, skip=args.skip, shared_context=args.shared_context, run=run,
                         guidance=args.guidance, guidance_gate=args.guidance_gate)
        if reference:
            for t, compared in paired_backbones(reference, report, tasks, args.n, args.seed, args.skip).items():
                report[t]["plain_vs_paired_with"] = compared
    report["backbone"] = {"name": backbone.name, "fingerprint": backbone.fingerprint}
    report["aux_version"] = aux.version if aux is not None else None
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    # the summary leaves out the per-item scores: they are for the JSON file, not the terminal
    if args.command == "onboarding":
        summary = {"questions_to_80": {k: c["questions_to_80"] for k, c in report["recovery"]["curves"].items()},
                   **{k: v["check_pass_rate"] for k, v in report["end_to_end"].items()},
                   "semantic_vs_episodic": report["semantic_vs_episodic"]["check_pass_rate"]}
    elif args.command == "head":
        summary = {name: {"n": r["n"], **{g: r[g] for g in ("language", "case")}}
                   for name, r in report["sets"].items()}
    elif args.command == "ifeval":
        summary = {k: report[k] for k in ("n", "soft_minus_none") if k in report} | {
            c: {m: round(report[c][m], 4) for m in ("prompt_level_strict", "instruction_level_strict")}
            for c in ("none", "soft") if c in report}
    else:
        summary = {k: ({m: round(v[m], 3) for m in ("check_pass_rate", "all_pass_rate", "degenerate_rate",
                                                              "sound_check_pass_rate", "on_topic_rate",
                                                              "on_topic_check_pass_rate") if m in v}
                       if k in CONDITIONS else
                       {name: x for name, x in v.items() if name != "plain_loglik"})
                   for k, v in report.items() if k in CONDITIONS or k in ("hellaswag", "arc_easy", "piqa")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
