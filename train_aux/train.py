"""Train the auxiliary model by personalized self-distillation; the backbone stays frozen.

Targets are the frozen backbone's own answers, minimally edited to satisfy each user's checkable
preferences (and kept only if IFEval's verifiers pass). The student is the same backbone reading K soft
thoughts of the user's summary instead of any text; the loss is cross-entropy on the target tokens, with the
tokens the edit changed weighted up (`edit_weight`), plus an optional probe loss that asks the thoughts to say
which preferences the summary holds (`probe_weight`), plus an optional preservation term: the KL divergence from
the plain backbone's next-token distributions to those with the thoughts as a prefix of plain text, so that
thoughts speak to the chat reply and leave the backbone's general ability alone (`preserve_weight`).

    python -m train_aux.train --config train_aux/configs/default.yaml [--steps N --out DIR ...] [--device cuda]
    python -m train_aux.train --config ... --workers N [--gpus-per-worker 1]     # data parallel, train_aux.distributed
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from softthought.aux_model import CopySource, SoftThoughtAux
from softthought.backbone import Backbone, load_backbone, weights_fingerprint
from softthought.generation import Engine, GenerationResult, SamplingParams, guided_logits
from softthought.splice import OPENING, Placement, Prompt, build_chat_prompt, embed_prompt, hiding_mask, left_pad, text_prompt

from .checks import is_loop
from .data import (
    boolq_texts,
    edit_answer,
    encode_pair,
    qa_choices,
    qa_texts,
    read_jsonl,
    reply_texts,
    summary_before,
    whole_sentences,
    winogrande_choices,
)
from .users import case_twin, floor_twin, make_users


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str | None = None
    dtype: str = "bfloat16"  # the serving dtype: the student sees the numerics it will be served with
    data_dir: str = "train_aux/data"
    out: str = "runs/aux"
    num_thoughts: int = 8
    # Thoughts mixed from the backbone's own embeddings of the summary's tokens (`AuxConfig.copy_thoughts`). With
    # --init, a checkpoint without them grows this many fresh ones; None keeps the checkpoint's (new: none).
    copy_thoughts: int | None = None
    # Weight of the copy thoughts' pointer and gate losses (`copy_terms`): thought i takes the i-th token of the
    # strings the user asked for, and the gates open on those and stay shut elsewhere.
    copy_weight: float = 1.0
    # Where the edit brings in a keyword the answer lacks: a sentence after the answer, or one that opens the reply,
    # where a copied word is the next thing written.
    keywords_first: bool = False
    # Each training user who caps their replies' words beside a twin asking for at least as many (`users.floor_twin`).
    floor_twins: bool = False
    # The share of examples drawn from users whose response language or case has an offset (`reply_forms`); None: as
    # often as the users hold one (about 9 % of the broad data's languages), too rarely to move a reply's first token.
    language_share: float | None = Field(None, gt=0, lt=1)
    # Grow (on a checkpoint without them) an offset to every thought for each language of language_answers.jsonl, and
    # the head that names them (`AuxConfig.languages`): teacher forced in training (each example's own language),
    # the head's choice when served.
    add_languages: bool = False
    # Grow an offset and the head's class for each whole-reply case (`CASES`), as for a language; the head then also
    # reads each case user's twin asking for the other case (`users.case_twin`).
    add_cases: bool = False
    # Grow an offset and the head's class for a word floor (`FLOOR`), the head reading each floor twin beside its user.
    add_floor: bool = False
    # Weight of the language head's cross-entropy over `language_batch` training users' summaries each step.
    language_weight: float = 1.0
    language_batch: int = Field(32, ge=1)
    # Users generated with the training phrasings (`users.make_users`) that the head draws from beside the data's
    # training users: a head fitted on a few hundred speakers learns their summaries rather than the request.
    language_users: int = Field(0, ge=0)
    # Generated users whose summaries name a language or a country without asking for it, or ask for English
    # (`users.language_mentions`), a third of them asking for another language: a head that fires on any language's
    # name sends a French teacher's replies into French.
    language_mentions: int = Field(0, ge=0)
    # The language head's width (`AuxConfig.language_head_hidden`); one that differs from the checkpoint's is made
    # afresh, the offsets kept.
    language_head_hidden: int | None = Field(None, ge=0)
    # The backbone's layers the head reads the summary through (`AuxConfig.language_reader_layers`; with
    # language_head_hidden): its states of each summary are kept for the phase, the reader being frozen.
    language_reader_layers: int | None = Field(None, ge=0)
    # What the phase trains: the whole auxiliary model; only the languages' offsets and head (every other weight, and
    # so every summary's thoughts without a language, as they were); or the head alone (no backbone in the loop).
    trains: Literal["all", "languages", "language_head"] = "all"
    encoder_training: str = "lora"
    lora_r: int = 8
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    encoder_lr: float = 2e-4
    warmup_steps: int = 20
    max_target_tokens: int = 96
    # Most target tokens are the backbone's own answer, which one shared prompt already fits; the preference
    # lives in the few tokens the edit changed. Without weighting them up, training collapses every user onto
    # the same thoughts (pairwise cosine 0.997 across users after 400 steps).
    edit_weight: float = 1.0
    # The end of turn's weight, where the reply's length is decided (None: `edit_weight`'s). Every target ends where a
    # short teacher answer was cut, so weighting it as the form teaches replies to stop early.
    end_weight: float | None = Field(None, ge=0)
    # Weight of a multi-label probe (training only) that must read the user's preferences (`probe_labels`) off the
    # thoughts: it keeps users' thoughts apart while the backbone learns to use them.
    probe_weight: float = 0.0
    # What the probe reads: the mean thought, linearly, or every thought through a small MLP, which asks only that
    # the thoughts carry the preferences, not that their mean spell them out.
    probe_reads: Literal["mean", "all"] = "mean"
    # Summaries drawn from the training users each step for the probe alone (0: it reads the batch's own). The
    # encoder learns to read a summary from thousands of them, more than the batches of generation show it.
    probe_batch: int = Field(0, ge=0)
    # Steps at the start that train the probe's term alone on those summaries, the backbone out of the loop and the
    # gradient not clipped: the thoughts learn to tell users' preferences apart before generation asks them to be
    # used (generation's gradient, clipped, otherwise divides the probe's pull by 5-9). The learning-rate schedule
    # starts after them.
    read_steps: int = Field(0, ge=0)
    # Weight of KL(plain backbone || backbone with the thoughts before the text) on plain text: that is how the
    # general-ability benchmarks are scored, and what strongly personalizing thoughts otherwise disturb.
    preserve_weight: float = 0.0
    # Which plain text the KL runs on: BoolQ passages ending in their question, or "Question: ...\nAnswer:
    # ..." built from the training prompts and the backbone's own answers (the KL then also covers the tokens after
    # "Answer:", where multiple-choice benchmarks score their continuations), or both.
    preserve_texts: Literal["boolq", "qa", "boolq+qa", "replies", "qa+replies"] = "boolq"
    # Whose next-token distributions the thoughts are held to on that text: the plain backbone's, or those of the
    # backbone reading the same user's summary written before the text (the condition the thoughts stand in for).
    preserve_teacher: Literal["plain", "text"] = "plain"
    # Weight of the choice term (`choice_loss`): how far the thoughts move one choice's per-byte log-likelihood
    # against the others' on multiple-choice items, scored as the benchmarks score them. A KL on next-token
    # distributions weighs tokens by the plain backbone's probability and barely sees the unlikely continuations a
    # benchmark scores, where the thoughts' drift reshuffles near-ties.
    choice_weight: float = 0.0
    # Its items: Winogrande's, or "Question: ...\nAnswer:" items built from the training prompts (`qa_choices`).
    choice_items: Literal["winogrande", "qa", "winogrande+qa"] = "winogrande+qa"
    # The guidance the choice term reads the thoughts with: the one the checkpoint is served at.
    choice_guidance: float = Field(1.0, ge=0, le=10)
    choice_batch: int = 4
    # Which positions attend to the thoughts (the checkpoint's `thoughts_seen_by`): every later one, or only the
    # reply's, so that the prompt is read as without them. None keeps the --init/--resume checkpoint's (new: all).
    thoughts_seen_by: Literal["all", "reply"] | None = None
    # Where the thoughts go (the checkpoint's `thoughts_at`): opening the system turn, or after the whole prompt,
    # generation header included (no text reads them, and every prompt shares the plain prompt's prefix cache).
    # None keeps the --init/--resume checkpoint's (new: system).
    thoughts_at: Literal["system", "end"] | None = None
    # Weight of a sequence-level unlikelihood term on the student's own greedy replies (`unlikelihood_loss`), run every
    # `rollout_every` steps on the batch's first `rollout_batch` prompts for up to `rollout_tokens` tokens.
    rollout_weight: float = 0.0
    # Weight of the cross-entropy on those same greedy replies minimally edited to satisfy the user's checks
    # (`own_targets`, as DAgger): the edited answers show each correction after the plain backbone's words, but the
    # thoughts are judged after their own, where an end phrase, a closing quote or a postscript must then follow.
    own_weight: float = 0.0
    rollout_every: int = 2
    rollout_batch: int = 8
    rollout_tokens: int = 96
    preserve_batch: int = 4
    preserve_tokens: int = 96
    grad_clip: float = 1.0
    log_every: int = 10
    save_every: int = 100
    seed: int = 0
    threads: int | None = None
    # Start from this auxiliary checkpoint's weights (a fresh optimizer and probe): a further phase on a trained
    # checkpoint. Its phases stay in the metadata and its steps are counted before this run's.
    init: str | None = None

    @model_validator(mode="after")
    def _options_hold_together(self) -> TrainConfig:
        if self.read_steps and not (self.probe_weight > 0 and self.probe_batch > 0):
            raise ValueError("read_steps trains the probe alone: it needs probe_weight > 0 and probe_batch > 0")
        if self.read_steps >= self.steps:
            raise ValueError("read_steps must leave steps for generation")
        if self.trains != "all" and self.probe_weight > 0:
            raise ValueError(f"trains: {self.trains} leaves the thoughts the probe reads as they were: set probe_weight 0")
        if self.language_reader_layers and not self.language_head_hidden:  # else no head would be made to read them
            raise ValueError("language_reader_layers needs language_head_hidden: the reader's head is an MLP that wide")
        return self


def load_config(path: str | None, overrides: dict) -> TrainConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.model_validate(data)


def data_hash(data: Path) -> str:
    """The training data's identity: its users and the backbone's answers."""
    h = hashlib.sha256()
    for name in ("train_users.jsonl", "answers.jsonl"):
        h.update((data / name).read_bytes())
    for name in ("language_answers.jsonl", "floor_answers.jsonl"):  # older data sets have neither
        if (data / name).exists():
            h.update((data / name).read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Term:
    """One term of the loss: this worker's sum, and what the sum over all workers is divided by (each worker's `count`
    added up). Kept apart until the counts are known, so that any split of a global batch over workers and
    micro-batches gives the loss of the whole batch on one worker."""
    total: torch.Tensor
    count: float


@dataclass(frozen=True)
class Shard:
    """Which examples of every global batch this worker computes (rank, rank + size, ...; all of them alone), and how
    the workers' sums are added: torch.distributed's process group, which Ray Train's TorchTrainer sets up."""
    rank: int = 0
    size: int = 1

    def mine(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.size))

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(t)
        return t

    def wait(self) -> None:
        """Until every worker gets here: what the slowest keeps the others waiting, timed apart from the sums."""
        if self.size > 1:
            torch.distributed.barrier()

    def all_gather(self, obj) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values everywhere: every worker starts from the same weights."""
        for t in tensors if self.size > 1 else ():
            torch.distributed.broadcast(t.data, 0)


@dataclass
class Example:
    summary: str
    prompt: str
    target: str  # the backbone's own answer, edited to satisfy the user's checks
    answer: str  # that answer unedited
    checks: list[dict]  # the user's checks, IFEval ids and kwargs
    copy_strings: list[str] = field(default_factory=list)  # what the user asks for word for word (`copy_strings`)
    ended: bool = True  # whether the target ends the turn (not where the backbone's answer ran out of tokens)


def probe_labels(checks: list[dict]) -> list[str]:
    """What the probe reads off the thoughts: the checks' ids, and a response language's code (which one matters)."""
    return [c["instruction_id"] for c in checks] + [f"language:{c['kwargs']['language']}" for c in checks
                                                    if c["instruction_id"] == "language:response_language"]


PROBE_HIDDEN = 512


class Mean(torch.nn.Module):
    def forward(self, thoughts: torch.Tensor) -> torch.Tensor:
        return thoughts.mean(1)


def make_probe(labels: list[str], aux: SoftThoughtAux, cfg: TrainConfig) -> torch.nn.Module:
    d = aux.config.backbone_hidden
    if cfg.probe_reads == "mean":
        return torch.nn.Sequential(Mean(), torch.nn.Linear(d, len(labels)))
    # normalized first: the thoughts' coordinates are small (their norm is the embeddings'), the MLP's init is not
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LayerNorm(aux.config.total_thoughts * d),
                               torch.nn.Linear(aux.config.total_thoughts * d, PROBE_HIDDEN), torch.nn.GELU(),
                               torch.nn.Linear(PROBE_HIDDEN, len(labels)))


def probe_term(probe: torch.nn.Module, thoughts: torch.Tensor, checks: list[list[dict]], labels: list[str]) -> Term:
    """The probe's binary cross-entropy, summed over `labels` for each row of `thoughts` (users' `checks`)."""
    held = [set(probe_labels(c)) for c in checks]
    target = torch.tensor([[float(x in h) for x in labels] for h in held], device=thoughts.device)
    return Term(F.binary_cross_entropy_with_logits(probe(thoughts), target, reduction="sum"), target.numel())


class Examples:
    """Endless stream of examples from random users and the backbone's own answers: in the user's response language
    when they have one (`language_answers`), those that reach the user's word floor when they have one
    (`floor_answers`), else its plain answers. With `language_share`, that share of them comes from users with one of
    the reply forms `forms` (`reply_forms`; None: any)."""

    def __init__(self, users: list[dict], answers: list[dict], seed: int, language_answers: list[dict] = (),
                 keywords_first: bool = False, language_share: float | None = None,
                 forms: Sequence[str] | None = None, floor_answers: list[dict] = ()) -> None:
        # the backbone's own answers that loop (2 % of them) would teach the thoughts to loop: left out
        self.answers = [a for a in answers if not is_loop(a["answer"])]
        self.floor_answers = [a for a in floor_answers if not is_loop(a["answer"])]
        self.keywords_first = keywords_first
        self.by_language: dict[str, list[dict]] = {}
        for row in language_answers:
            if not is_loop(row["answer"]):
                self.by_language.setdefault(row["language"], []).append(row)
        # a floor no answer reaches (IFEval's sentences ask for up to 800 words) leaves its user out
        longest = max((len(a["answer"].split()) for a in self.floor_answers), default=0)
        self.users = [u for u in users if ((lang := _language(u["checks"])) is None or lang in self.by_language)
                      and (_floor(u["checks"]) or 0) <= longest]
        self.language_share = language_share
        # users without and with a reply form, drawn apart when language_share is set
        held = [any(forms is None or f in forms for f in reply_forms(u["checks"])) for u in self.users]
        self.pools = ([u for u, h in zip(self.users, held) if not h], [u for u, h in zip(self.users, held) if h])
        if language_share is not None and not all(self.pools):
            raise ValueError("language_share needs users both with and without a reply form that has an offset")
        self.rng = random.Random(seed)
        self.seed = seed

    def probe_users(self, n: int, step: int) -> list[dict]:
        """`n` users for the probe at `step`, drawn apart from the stream: the same on every worker and on resume."""
        return random.Random(f"{self.seed}-probe-{step}").sample(self.users, min(n, len(self.users)))

    def _user(self) -> dict:
        if self.language_share is None:
            return self.rng.choice(self.users)
        return self.rng.choice(self.pools[self.rng.random() < self.language_share])

    def sample(self) -> Example:
        while True:
            user = self._user()
            lang, floor = _language(user["checks"]), _floor(user["checks"])
            row = self.rng.choice(self.by_language[lang] if lang else self.floor_answers if floor else self.answers)
            ended = row.get("ended", True)
            if not ended and any(c["instruction_id"] in AT_THE_END for c in user["checks"]):
                continue  # what the edit writes after an answer cut off by the token budget would fall past it
            target = edit_answer(row["answer"], row["prompt"], user["checks"], self.rng, self.keywords_first)
            if target is not None and not is_loop(target) and (floor is None or len(target.split()) >= floor):
                # an answer in another language is weighed against itself less its opening (what the preference
                # adds): were all of it counted as edited (against the plain answer), these few users' whole replies
                # outweighed every other preference's edits
                source = row["answer"][len(row.get("opening", "")) :]
                return Example(user["summary"], row["prompt"], target, source, user["checks"], copy_strings(user["checks"]),
                               ended)


#: The checks' arguments a reply must contain word for word: what copy thoughts should hand the backbone.
COPIED_KWARGS = ("end_phrase", "keywords", "keyword", "postscript_marker")


def copy_strings(checks: list[dict]) -> list[str]:
    out = []
    for check in checks:
        for name in COPIED_KWARGS:
            value = check["kwargs"].get(name)
            out += [value] if isinstance(value, str) else list(value or [])
    return out


def copy_targets(summary: str, strings: list[str], offsets: list[tuple[int, int]], limit: int) -> list[int]:
    """The positions of the backbone tokens that spell `strings` where `summary` first writes each (any case), in
    the order the summary has them, at most `limit`; a string the summary does not spell out is left out."""
    lowered = summary.lower()
    spans = sorted((at, at + len(s)) for s in strings if (at := lowered.find(s.lower())) >= 0)
    positions = [j for a, b in spans for j, (x, y) in enumerate(offsets) if x < b and a < y]
    return list(dict.fromkeys(positions))[:limit]


def copy_terms(picks: torch.Tensor, gate_logits: torch.Tensor, targets: list[list[int]]) -> dict[str, Term]:
    """Copy thought i of summary b should take token targets[b][i] (the pointer: negative log of its attention
    there, over the targets), and its gate be open exactly when it has a target (binary cross-entropy, over the
    gates)."""
    gates = torch.zeros_like(gate_logits)
    nll = []
    for b, positions in enumerate(targets):
        for i, pos in enumerate(positions):
            nll.append(-(picks[b, i, pos] + 1e-6).log())
            gates[b, i] = 1.0
    pointer = torch.stack(nll).sum() if nll else picks.sum() * 0.0
    return {"copy_pointer": Term(pointer, len(nll)),
            "copy_gates": Term(F.binary_cross_entropy_with_logits(gate_logits, gates, reduction="sum"), gates.numel())}


def _language(checks: list[dict]) -> str | None:
    return next((c["kwargs"]["language"] for c in checks if c["instruction_id"] == "language:response_language"), None)


def _floor(checks: list[dict]) -> int | None:
    """The fewest words the user asks for, if they ask for at least so many."""
    return next((c["kwargs"]["num_words"] for c in checks if c["instruction_id"] == "length_constraints:number_words"
                 and c["kwargs"]["relation"] == "at least"), None)


#: Checks whose edits write at the end of the reply (or around all of it).
AT_THE_END = ("startend:end_checker", "detectable_content:postscript", "detectable_format:json_format", "startend:quotation")


#: A whole reply's case as an offset's code (`AuxConfig.languages`): like a language, a shift of every token, which the
#: projection every preference shares learned poorly (the thoughts of "tout en minuscules" wrote capitals).
CASES = {"change_case:english_capital": "capital", "change_case:english_lowercase": "lowercase"}


#: A word floor as an offset's code: the thoughts could not tell "at least 40 words" from "less than 40 words", which
#: the head, reading the summary through the backbone, may.
FLOOR = "floor"


def reply_forms(checks: list[dict]) -> list[str]:
    """The codes an offset may stand for in `checks`: the response language, then the case, then a word floor."""
    return (([lang] if (lang := _language(checks)) else []) + [CASES[c["instruction_id"]] for c in checks
                                                               if c["instruction_id"] in CASES]
            + ([FLOOR] if _floor(checks) else []))


def edited_chars(source: str, target: str) -> list[bool]:
    """For each character of `target`, whether the edit from `source` wrote it or follows a deletion there."""
    flags = [False] * len(target)
    for op, _, _, j1, j2 in difflib.SequenceMatcher(None, source, target, autojunk=False).get_opcodes():
        if op in ("replace", "insert"):
            flags[j1:j2] = [True] * (j2 - j1)
        elif op == "delete" and j1 < len(target):
            flags[j1] = True  # the token after a removed comma is where the decision is made
    return flags


def reply_logits(model, table: torch.nn.Module, prompts: list[Prompt], replies: list[list[int]]) -> list[torch.Tensor]:
    """The logits that predict each reply's tokens read after its prompt (teacher forced), one [len, vocab] each."""
    dev = table.weight.device
    sequences = [torch.cat([embed_prompt(table, p), table(torch.tensor(ids, device=dev))]) for p, ids in zip(prompts, replies)]
    embeds, mask, positions = left_pad(sequences)
    length = mask.shape[1]
    attention = hiding_mask(mask, [p.hidden_thoughts(length - len(s)) for p, s in zip(prompts, sequences)], embeds.dtype)
    logits = model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).logits
    # left padding: each reply ends its row, and position t predicts token t+1
    return [logits[i, length - len(ids) - 1 : length - 1].float() for i, ids in enumerate(replies)]


def token_logprobs(logits: list[torch.Tensor], replies: list[list[int]]) -> list[torch.Tensor]:
    return [F.log_softmax(x, dim=-1).gather(1, torch.tensor(ids, device=x.device)[:, None])[:, 0]
            for x, ids in zip(logits, replies)]


def reply_logprobs(model, table: torch.nn.Module, prompts: list[Prompt], replies: list[list[int]]) -> list[torch.Tensor]:
    """The log-probability of each reply's tokens read after its prompt (teacher forced), one [len] tensor each."""
    return token_logprobs(reply_logits(model, table, prompts, replies), replies)


def target_loss(model, table: torch.nn.Module, tokenizer, prompts: list[Prompt], targets: list[str],
                max_target: int, sources: list[str] | None = None, edit_weight: float = 1.0,
                end_weight: float | None = None, ended: list[bool] | None = None) -> tuple[torch.Tensor, int]:
    """Cross-entropy of each target reply (+ end of turn) after its prompt, the weighted mean of `target_sums`;
    returns (loss, target tokens)."""
    total, weights, n_tokens = target_sums(model, table, tokenizer, prompts, targets, max_target, sources, edit_weight,
                                           end_weight, ended)
    return total / weights, n_tokens


def target_sums(model, table: torch.nn.Module, tokenizer, prompts: list[Prompt], targets: list[str],
                max_target: int, sources: list[str] | None = None, edit_weight: float = 1.0,
                end_weight: float | None = None, ended: list[bool] | None = None) -> tuple[torch.Tensor, float, int]:
    """The weighted sum of the target tokens' negative log-likelihoods (each reply + end of turn, after its prompt;
    no end of turn after the replies `ended` marks False), the sum of the weights, and the number of target tokens.

    With `sources` (the unedited answers), the tokens the edit touched count `edit_weight` times and the end of turn
    (where the reply's length is decided) `end_weight` times (None: `edit_weight`).
    """
    end_weight = edit_weight if end_weight is None else end_weight
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    target_ids, target_weights = [], []
    for i, target in enumerate(targets):
        enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=sources is not None)
        ids = (enc["input_ids"] + ([end] if ended is None or ended[i] else []))[:max_target]
        weights = [1.0] * len(ids)
        if sources is not None:
            flags = edited_chars(sources[i], target)
            spans = list(enc["offset_mapping"]) + [(len(target), len(target) + 1)]
            weights = [end_weight if a >= len(target) else edit_weight if any(flags[a:b]) else 1.0
                       for a, b in spans[: len(ids)]]
        target_ids.append(ids)
        target_weights.append(weights)
    nll = -torch.cat(reply_logprobs(model, table, prompts, target_ids))
    w = torch.tensor([x for ws in target_weights for x in ws], device=nll.device)
    return (nll * w).sum(), float(w.sum()), sum(len(t) for t in target_ids)


def repeated_positions(ids: list[int], n: int = 4) -> list[int]:
    """The indices of the tokens that complete an n-gram `ids` already had before them."""
    seen, out = set(), []
    for t in range(n - 1, len(ids)):
        gram = tuple(ids[t - n + 1 : t + 1])
        if gram in seen:
            out.append(t)
        seen.add(gram)
    return out


def rollouts(engine: Engine, prompts: list[Prompt], max_tokens: int) -> list[GenerationResult]:
    """The student's own greedy replies to `prompts` (the evaluation's decoding), without gradients."""
    detached = [Prompt([s.detach() if isinstance(s, torch.Tensor) else s for s in p.segments], p.reply_only) for p in prompts]
    return engine.generate(detached, SamplingParams(max_tokens=max_tokens, temperature=0))


def unlikelihood_loss(backbone: Backbone, prompts: list[Prompt], replies: list[list[int]]) -> tuple[torch.Tensor, int, int]:
    """Sequence-level unlikelihood (Welleck et al., 2020) on the student's own replies (`rollouts`) to `prompts`:
    -log(1 - p) of every token that completes a 4-gram its reply already wrote, summed (the loss divides it by the
    rollouts' tokens). Loops are what the edited targets can teach and teacher forcing never shows: they happen only
    in the model's own replies. Returns (that sum, the rollouts' tokens, how many of them repeat)."""
    tokens = sum(len(r) for r in replies)
    looping = [(p, r, pos) for p, r in zip(prompts, replies) if (pos := repeated_positions(r))]
    if not looping:
        return torch.zeros((), device=backbone.device), tokens, 0
    logps = reply_logprobs(backbone.model, backbone.model.get_input_embeddings(), [p for p, _, _ in looping],
                           [r for _, r, _ in looping])
    unlikely = torch.cat([-torch.log1p(-lp[pos].exp().clamp(max=1 - 1e-6)) for lp, (_, _, pos) in zip(logps, looping)])
    return unlikely.sum(), tokens, sum(len(pos) for _, _, pos in looping)


def own_targets(examples: list[Example], replies: list[str], keywords_first: bool) -> list[tuple[int, str, str]]:
    """(index, source, target) for each of the student's own `replies` that an edit makes pass its example's checks:
    the reply cut back to whole sentences (the source) and minimally edited (`data.edit_answer`; a reply that passes
    already is its own target). Loops are left out, as in the edited answers. The edit's random choices are seeded by
    the example, so that every worker makes the same."""
    out = []
    for i, (ex, reply) in enumerate(zip(examples, replies)):
        source = whole_sentences(reply)
        if len(source.split()) < 3 or is_loop(source):
            continue
        target = edit_answer(source, ex.prompt, ex.checks, random.Random(f"{ex.summary}\n{ex.prompt}"), keywords_first)
        if target is not None and not is_loop(target):
            out.append((i, source, target))
    return out


def preservation_texts(tokenizer, raw: list[str], max_tokens: int) -> list[tuple[list[int], int]]:
    """Each text's last `max_tokens` token ids, and where its reply is read from: the last token of its last
    "Answer:", which predicts the answer's first token (as a benchmark's context does its continuation), or its
    last token when it has none (a BoolQ passage and its question)."""
    heads = [text if (end := text.rfind("Answer:")) < 0 else text[: end + len("Answer:")] for text in raw]
    out = []
    for ids, prompt in zip(*(tokenizer(t, add_special_tokens=False)["input_ids"] for t in (raw, heads))):
        cut = max(0, len(ids) - max_tokens)
        out.append((ids[cut:], max(0, len(prompt) - 1 - cut)))
    return out


def preservation_loss(backbone: Backbone, thoughts: torch.Tensor, texts: list[tuple[list[int], int]],
                      teacher_prefixes: list[list[int]] | None = None, placement: Placement = OPENING) -> torch.Tensor:
    """The sum over texts of the mean per-token KL(teacher || with thoughts) on token sequences of plain text (the loss
    divides it by the number of texts), thoughts[i] placed in the ids of
    texts[i] = (ids, reply start): before them, or after the reply start (`placement.at_end`). The teacher is the plain
    backbone reading the ids alone, or with `teacher_prefixes[i]` (token ids) before them. When the text before its
    reply start does not see the thoughts (`placement.reply_only`, or at the end), the KL runs over the positions that
    do: the reply's, predicted from its start on."""
    table = backbone.model.get_input_embeddings()
    with torch.no_grad():
        prefixes = teacher_prefixes or [[] for _ in texts]
        embeds, mask, positions = left_pad([table(torch.tensor(pre + ids, device=backbone.device))
                                            for pre, (ids, _) in zip(prefixes, texts)])
        reference = backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    prompts = [text_prompt(ids[: start + 1], th, placement) for th, (ids, start) in zip(thoughts, texts)]
    rows = [embed_prompt(table, Prompt([*p.segments, ids[start + 1 :]])) for p, (ids, start) in zip(prompts, texts)]
    embeds, mask, positions = left_pad(rows)
    length = mask.shape[1]
    hidden = [p.hidden_thoughts(length - len(row)) for p, row in zip(prompts, rows)]
    student = backbone.model(inputs_embeds=embeds, attention_mask=hiding_mask(mask, hidden, embeds.dtype),
                             position_ids=positions).logits
    total = 0.0
    for i, (ids, start) in enumerate(texts):  # left padding: a text's positions are the last of its row
        read = len(ids) - (start if placement.reply_only or placement.at_end else 0)
        ref = F.log_softmax(reference[i, -read:].float(), dim=-1)
        out = F.log_softmax(student[i, -read:].float(), dim=-1)
        total = total + F.kl_div(out, ref, log_target=True, reduction="batchmean")
    return total


def choice_items(tokenizer, raw: list[list[tuple[str, str]]]) -> list[list[tuple[list[int], list[int], int]]]:
    """Each item's choices as (context ids, continuation ids, continuation bytes), tokenized as lm-eval does."""
    return [[(*encode_pair(tokenizer, ctx, cont), len(cont.encode())) for ctx, cont in item] for item in raw]


def choice_loss(backbone: Backbone, thoughts: torch.Tensor, items: list[list[tuple[list[int], list[int], int]]],
                placement: Placement = OPENING, guidance: float = 1.0) -> torch.Tensor:
    """The sum over items of the mean squared shift, centred over the item's choices, of each choice's per-byte
    log-likelihood (what acc_norm ranks) when item i is read with thoughts[i] placed as `eval general` places them
    and guided by `guidance` (logits = plain + guidance x (with thoughts - plain)). A shift every choice shares
    changes no ranking and costs nothing; one that moves a choice against the others is what flips an answer."""
    table = backbone.model.get_input_embeddings()
    flat = [(i, ctx, cont, size) for i, item in enumerate(items) for ctx, cont, size in item]
    conts = [cont for _, _, cont, _ in flat]
    with torch.no_grad():
        plain = reply_logits(backbone.model, table, [text_prompt(ctx, None) for _, ctx, _, _ in flat], conts)
    read = reply_logits(backbone.model, table, [text_prompt(ctx, thoughts[i], placement) for i, ctx, _, _ in flat], conts)
    guided = [guided_logits(x, p, guidance) for x, p in zip(read, plain)]
    shift = torch.stack([(g.sum() - p.sum()) / size for g, p, (_, _, _, size)
                         in zip(token_logprobs(guided, conts), token_logprobs(plain, conts), flat)])
    return sum((moved - moved.mean()).pow(2).mean() for moved in shift.split([len(item) for item in items]))


#: The loss's terms, in the order their sums and counts travel between workers.
TERMS = ("target", "copy_pointer", "copy_gates", "probe", "preserve", "choice", "unlikelihood", "own", "language")


def term_weights(cfg: TrainConfig) -> dict[str, float]:
    return {"target": 1.0, "copy_pointer": cfg.copy_weight, "copy_gates": cfg.copy_weight, "probe": cfg.probe_weight,
            "preserve": cfg.preserve_weight, "choice": cfg.choice_weight, "unlikelihood": cfg.rollout_weight,
            "own": cfg.own_weight, "language": cfg.language_weight}


def encode_batch(aux: SoftThoughtAux, batch: list[Example], rows: list[int], cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, Term]]:
    """The thoughts of the whole global batch, and the copy thoughts' terms over examples `rows`. Every worker encodes
    all of it (the encoder is small beside the backbone): the encoder's dropout then draws the same masks, from the
    same seed, as one worker would, and any split of the batch sees the same thoughts."""
    summaries = [ex.summary for ex in batch]
    languages = None
    if aux.config.languages:  # each example adds its own language's offset (teacher forced)
        own = language_targets(aux, [ex.checks for ex in batch])
        languages = F.one_hot(own, len(aux.config.languages) + 1)[:, 1:].float()
    if not aux.config.copy_thoughts:
        return aux.encode(summaries, languages), {}
    thoughts, picks, gate_logits, offsets = aux.encode_copy(summaries, languages)
    targets = [copy_targets(batch[i].summary, batch[i].copy_strings, offsets[i], aux.config.copy_thoughts) for i in rows]
    return thoughts, copy_terms(picks[rows], gate_logits[rows], targets)


def language_targets(aux: SoftThoughtAux, checks: list[list[dict]]) -> torch.Tensor:
    """Each user's reply form (`reply_forms`) as the language head's class: 0 for none (or one the checkpoint has no
    offset for, such as English), else 1 + its index in `AuxConfig.languages`."""
    codes = aux.config.languages
    return torch.tensor([next((1 + codes.index(f) for f in reply_forms(c) if f in codes), 0) for c in checks],
                        device=aux.device)


def language_term(aux: SoftThoughtAux, users: list[dict], read: dict[str, torch.Tensor]) -> Term:
    """The language head's cross-entropy, summed over `users`' summaries; `read` keeps the frozen reader's states of
    each summary it has read (`AuxConfig.language_reader_layers`), so that every draw after the first costs nothing."""
    summaries = [u["summary"] for u in users]
    if aux.config.language_reader_layers:
        if missing := [s for s in dict.fromkeys(summaries) if s not in read]:
            states, valid = aux.reader_states(missing)
            read.update({s: x[v].cpu() for s, x, v in zip(missing, states, valid)})
        rows = [read[s] for s in summaries]
        valid = torch.arange(max(len(r) for r in rows))[None, :] < torch.tensor([len(r) for r in rows])[:, None]
        logits = aux.reader_head(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(aux.device), valid.to(aux.device))
    else:
        logits = aux.language_logits(summaries)
    return Term(F.cross_entropy(logits, language_targets(aux, [u["checks"] for u in users]), reduction="sum"), len(users))


def batch_terms(backbone: Backbone, aux: SoftThoughtAux, batch: list[Example], rows: list[int], thoughts: torch.Tensor,
                cfg: TrainConfig, texts: list[list[int]] | None = None,
                engine: Engine | None = None, choices: list | None = None) -> tuple[dict[str, Term], dict[str, int]]:
    """The student's loss terms over examples `rows` of the global `batch`, reading `thoughts` (`encode_batch`) instead
    of the summary text: the edited targets' cross-entropy, the preservation KL on texts[i] for the rows
    i < len(texts), the choice term on choices[i] for the rows i < len(choices), and with an `engine`, on its own
    greedy replies for the rows i < rollout_batch, the unlikelihood of their repeats and the cross-entropy of their
    edits (`own_targets`). Returns the terms and the counts the log reports (target tokens, rollout tokens and their
    repeats, own targets)."""
    tok = backbone.tokenizer
    placement = aux.placement
    prompts = {i: build_chat_prompt(tok, [{"role": "user", "content": batch[i].prompt}], thoughts[i], placement=placement)
               for i in rows}
    total, weights, n_tokens = target_sums(backbone.model, backbone.model.get_input_embeddings(), tok,
                                           [prompts[i] for i in rows], [batch[i].target for i in rows], cfg.max_target_tokens,
                                           [batch[i].answer for i in rows], cfg.edit_weight, cfg.end_weight,
                                           [batch[i].ended for i in rows])
    terms = {"target": Term(total, weights)}
    stats = {"target_tokens": n_tokens, "rollout_tokens": 0, "rollout_repeats": 0, "own_targets": 0}
    if preserved := [i for i in rows if texts and i < len(texts)]:
        prefixes = (tok([summary_before(batch[i].summary, "") for i in preserved], add_special_tokens=False)["input_ids"]
                    if cfg.preserve_teacher == "text" else None)
        kl = preservation_loss(backbone, thoughts[preserved], [texts[i] for i in preserved], prefixes, placement)
        terms["preserve"] = Term(kl, len(preserved))
    if scored := [i for i in rows if choices and i < len(choices)]:
        moved = choice_loss(backbone, thoughts[scored], [choices[i] for i in scored], placement, cfg.choice_guidance)
        terms["choice"] = Term(moved, len(scored))
    if engine is not None and (rolled := [i for i in rows if i < cfg.rollout_batch]):
        asked = [prompts[i] for i in rolled]
        replies = rollouts(engine, asked, cfg.rollout_tokens)
        if cfg.rollout_weight > 0:
            unlikely, tokens, repeats = unlikelihood_loss(backbone, asked, [r.token_ids for r in replies])
            terms["unlikelihood"] = Term(unlikely, tokens)
            stats.update(rollout_tokens=tokens, rollout_repeats=repeats)
        if cfg.own_weight > 0 and (own := own_targets([batch[i] for i in rolled], [r.text for r in replies], cfg.keywords_first)):
            total, weights, _ = target_sums(backbone.model, backbone.model.get_input_embeddings(), tok,
                                            [asked[j] for j, _, _ in own], [t for _, _, t in own],
                                            cfg.max_target_tokens, [s for _, s, _ in own], cfg.edit_weight,
                                            cfg.end_weight)
            terms["own"] = Term(total, weights)
            stats["own_targets"] = len(own)
    return terms, stats


def train_step(backbone: Backbone, aux: SoftThoughtAux, batch: list[Example], cfg: TrainConfig, params: list[torch.Tensor],
               shard: Shard = Shard(), micro_batch: int | None = None, probe: torch.nn.Module | None = None,
               labels: list[str] | None = None, texts: list[list[int]] | None = None,
               engine: Engine | None = None, probing: list[dict] | None = None, choices: list | None = None,
               heading: list[dict] | None = None, read: dict | None = None) -> dict[str, float]:
    """Set the gradient of `params` (every worker's the same) to that of the loss of the global `batch`, this worker
    computing its `shard` of it `micro_batch` examples at a time (gradient accumulation). Each term's gradient is
    summed apart and divided by its count over all workers and micro-batches, then the workers' gradients are added
    up with one all-reduce: the same gradient, to rounding, as one worker computing the whole batch at once. Returns
    the whole batch's loss, target tokens, rollout tokens and repeats, own targets, the seconds this worker waited
    for the slowest one, those it then spent in the all-reduces, and each term's mean (unweighted). With `probing`
    (users), the probe reads their summaries' thoughts instead of the batch's (every worker all of them, as it does
    the batch's); with an empty `batch` (`read_steps`), that term is the only one. `heading` (users): the summaries
    the language head's term reads (`read`: `language_term`'s)."""
    mine = shard.mine(len(batch))
    dev = backbone.device
    sums = {name: [torch.zeros_like(p) for p in params] for name in TERMS}
    totals, counts, weights = dict.fromkeys(TERMS, 0.0), dict.fromkeys(TERMS, 0.0), term_weights(cfg)
    stats = {"target_tokens": 0, "rollout_tokens": 0, "rollout_repeats": 0, "own_targets": 0}

    def add(terms: dict[str, Term]) -> None:
        for name, term in terms.items():
            totals[name] += float(term.total.detach())
            counts[name] += term.count
            if term.total.requires_grad:
                grads = torch.autograd.grad(term.total, params, retain_graph=True, allow_unused=True)
                for acc, g in zip(sums[name], grads):
                    if g is not None:
                        acc += g

    # on a GPU the aux model's fp32 master weights run in bf16 under autocast, beside the bf16 backbone
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        thoughts, once = encode_batch(aux, batch, mine, cfg) if batch else (None, {})
        if probe is not None and probing:
            once["probe"] = probe_term(probe, aux.encode([u["summary"] for u in probing]), [u["checks"] for u in probing], labels)
        elif probe is not None:
            once["probe"] = probe_term(probe, thoughts[mine], [batch[i].checks for i in mine], labels)
        if heading:
            once["language"] = language_term(aux, heading, {} if read is None else read)
    add(once)
    size = micro_batch or max(1, len(mine))
    for at in range(0, len(mine), size):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            terms, counted = batch_terms(backbone, aux, batch, mine[at : at + size], thoughts, cfg, texts, engine, choices)
        for key, value in counted.items():
            stats[key] += value
        add(terms)
    figures = torch.tensor([*totals.values(), *counts.values(), *stats.values()], dtype=torch.float64, device=dev)
    started = time.perf_counter()
    shard.wait()
    waited = time.perf_counter() - started
    started = time.perf_counter()
    shard.all_sum(figures)
    synced = time.perf_counter() - started
    n = len(TERMS)
    totals, counts = dict(zip(TERMS, figures[:n].tolist())), dict(zip(TERMS, figures[n : 2 * n].tolist()))
    used = [name for name in TERMS if counts[name] > 0]
    flat = torch.cat([sum((weights[name] / counts[name]) * sums[name][j] for name in used).reshape(-1)
                      if used else torch.zeros_like(p).reshape(-1) for j, p in enumerate(params)])
    started = time.perf_counter()
    shard.all_sum(flat)
    synced += time.perf_counter() - started
    at = 0
    for p in params:
        p.grad = flat[at : at + p.numel()].view_as(p).clone()
        at += p.numel()
    stats = dict(zip(stats, figures[2 * n :].tolist()))
    return {"loss": sum(weights[name] * totals[name] / counts[name] for name in used), **stats, "allreduce_s": synced,
            "wait_s": waited, "terms": {name: totals[name] / counts[name] for name in used}}


def make_optimizer(aux: SoftThoughtAux, backbone: Backbone, cfg: TrainConfig,
                   probe: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    enc = [p for n, p in aux.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    rest = [p for n, p in aux.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    rest += list(probe.parameters()) if probe is not None else []
    groups = [{"params": rest, "lr": cfg.lr}] + ([{"params": enc, "lr": cfg.encoder_lr}] if enc else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    backbone_ids = {id(p) for p in backbone.model.parameters()}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert not any(id(p) in backbone_ids for p in held), "a backbone parameter reached the optimizer"
    probe_ids = {id(p) for p in probe.parameters()} if probe is not None else set()
    assert {id(p) for p in held} == {id(p) for p in aux.trainable_parameters() if p.requires_grad} | probe_ids
    return optimizer


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Constant while reading (`read_steps`), then warm-up and a cosine to a tenth over generation's steps."""
    if step < cfg.read_steps:
        return 1.0
    step -= cfg.read_steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.read_steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, resume: bool = False, device: str = "cpu", micro_batch: int | None = None,
          shard: Shard = Shard(), resume_from: str | Path | None = None,
          on_checkpoint: Callable[[int, Path | None, dict], None] | None = None) -> Path:
    """Train (or, with `resume`, continue from OUT/last) and save OUT/final; returns its path.

    Data parallel when `shard` is one of several workers (`train_aux.distributed`): every worker holds a frozen
    backbone replica, draws the same global batches and computes its part (`train_step`); rank 0 writes the log and
    the checkpoints, and `on_checkpoint(step, directory or None, metrics)` is called on every worker at each one.
    `resume_from` names a checkpoint to continue from instead of OUT/last."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    lead = shard.rank == 0
    out = Path(cfg.out)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data_dir)
    users, answers = read_jsonl(data / "train_users.jsonl"), read_jsonl(data / "answers.jsonl")
    if cfg.floor_twins:
        users += [twin for u in users if (twin := floor_twin(u)) is not None]
    backbone = load_backbone(cfg.backbone, dtype=cfg.dtype, device=device)
    fingerprint = _same_everywhere(shard, backbone.fingerprint, "before")
    last = Path(resume_from) if resume_from else out / "last"
    # offset: the steps of the checkpoint this run started from (--init); this run's step s is step offset + s
    if (resume or resume_from) and (last / "config.json").exists():
        aux = SoftThoughtAux.from_pretrained(last, backbone=backbone)
        state = torch.load(last / "training_state.pt", weights_only=False, map_location="cpu")
        offset = aux.config.metadata.get("init_steps", 0)
    elif cfg.init:
        aux = SoftThoughtAux.from_pretrained(cfg.init, backbone=backbone)
        state, offset = None, aux.config.metadata.get("steps", 0)
        if cfg.copy_thoughts and not aux.config.copy_thoughts:
            aux.add_copy_thoughts(cfg.copy_thoughts, CopySource.of(backbone))
    else:
        aux = SoftThoughtAux.for_backbone(backbone, num_thoughts=cfg.num_thoughts, copy_thoughts=cfg.copy_thoughts or 0,
                                          encoder_training=cfg.encoder_training, lora_r=cfg.lora_r)
        state, offset = None, 0
    languages = read_jsonl(data / "language_answers.jsonl") if (data / "language_answers.jsonl").exists() else []
    floors = read_jsonl(data / "floor_answers.jsonl") if (data / "floor_answers.jsonl").exists() else []
    head = (cfg.language_head_hidden, cfg.language_reader_layers or 0)
    if cfg.add_languages and not aux.config.languages:
        aux.config.language_head_hidden, aux.config.language_reader_layers = head[0] or 0, head[1]
        aux.add_languages(sorted({row["language"] for row in languages}))
    elif head[0] is not None and head != (aux.config.language_head_hidden, aux.config.language_reader_layers):
        aux.new_language_head(*head)
    if cfg.add_cases and (cases := [c for c in CASES.values() if c not in aux.config.languages]):
        aux.add_languages(cases)
    if cfg.add_floor and FLOOR not in aux.config.languages:
        aux.add_languages([FLOOR])
    if cfg.trains != "all":
        if not aux.config.languages:
            raise ValueError(f"trains: {cfg.trains} needs a checkpoint with languages (add_languages)")
        for name, p in aux.named_parameters():
            p.requires_grad_(name.startswith("language_") and (cfg.trains == "languages" or name != "language_offsets"))
    if cfg.thoughts_seen_by:
        aux.config.thoughts_seen_by = cfg.thoughts_seen_by
    if cfg.thoughts_at:
        aux.config.thoughts_at = cfg.thoughts_at
    aux.to(backbone.device).train()  # fp32 master weights wherever the backbone is
    # the probe is part of training only and never saved with the checkpoint
    labels = sorted({x for u in users for x in probe_labels(u["checks"])})
    probe = make_probe(labels, aux, cfg).to(backbone.device) if cfg.probe_weight > 0 else None
    optimizer = make_optimizer(aux, backbone, cfg, probe)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    examples = Examples(users, answers, cfg.seed, languages, cfg.keywords_first, cfg.language_share, aux.config.languages,
                        floors)
    asking, read = cfg.language_mentions // 3, {}
    speakers = (examples.users + make_users(cfg.language_users, cfg.seed, "head", held_out_phrasing=False)
                + make_users(cfg.language_mentions - asking, cfg.seed + 1, "mention", held_out_phrasing=False, mentions=True)
                + make_users(asking, cfg.seed + 2, "mention-asking", held_out_phrasing=False, include=("language",),
                             mentions=True))
    if set(CASES.values()) & set(aux.config.languages):  # each case user beside its twin asking for the other case
        speakers += [twin for u in speakers if (twin := case_twin(u)) is not None]
    if FLOOR in aux.config.languages:  # each limit user beside its twin asking for a floor
        known = {u["user"] for u in speakers}
        speakers += [twin for u in speakers if (twin := floor_twin(u)) is not None and twin["user"] not in known]
    texts = []
    if cfg.preserve_weight > 0:  # each text's last preserve_tokens tokens: a long passage keeps its question and answer
        raw = [*(boolq_texts() if "boolq" in cfg.preserve_texts else []), *(qa_texts(answers) if "qa" in cfg.preserve_texts else []),
               *(reply_texts(answers) if "replies" in cfg.preserve_texts else [])]
        texts = preservation_texts(backbone.tokenizer, raw, cfg.preserve_tokens)
    items = []
    if cfg.choice_weight > 0:
        items = choice_items(backbone.tokenizer, [*(winogrande_choices() if "winogrande" in cfg.choice_items else []),
                                                  *(qa_choices(answers, cfg.seed) if "qa" in cfg.choice_items else [])])
    start = 0
    if state:
        if probe is not None:
            probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        examples.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and backbone.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], backbone.device)
        start = state["step"]
    shard.broadcast(params)  # a fresh model is drawn from the same seed everywhere; this makes sure of it
    workers = shard.all_gather({"rank": shard.rank, "host": socket.gethostname(), "pid": os.getpid(),
                                "device": str(backbone.device)})
    settings = cfg.model_dump()
    # every phase's config, so that a checkpoint resumed with new settings still says how all of it was trained
    phases = list(aux.config.metadata.get("phases", [])) if state or cfg.init else []
    if not phases or phases[-1]["train_config"] != settings:
        phases.append({"from_step": offset + start, "train_config": settings})
    meta = {"backbone_fingerprint": fingerprint, "data_hash": data_hash(data),
            "train_config": settings, "phases": phases, **({"init_steps": offset} if offset else {})}
    log = None
    if lead:
        (out / "train_config.json").write_text(cfg.model_dump_json(indent=2))
        log = open(out / "log.jsonl", "a")  # noqa: SIM115 - appended to through the whole run, closed at its end
        log.write(json.dumps({"event": "start", "step": start, "backbone_fingerprint": fingerprint,
                              "trainable_params": sum(p.numel() for p in aux.trainable_parameters() if p.requires_grad),
                              "global_batch": cfg.batch_size, "micro_batch": micro_batch, "workers": workers}) + "\n")
    engine = Engine(backbone, max_batch_size=cfg.rollout_batch) if cfg.rollout_weight > 0 or cfg.own_weight > 0 else None
    t0, tokens, recent, repeats, owned, synced, waited = time.perf_counter(), 0, [], [], [], 0.0, 0.0
    norms, terms = [], {}  # the gradient's norm before clipping, and each term's mean, over the steps since the last log
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train aux", unit="step", disable=not lead)
    for step in bar:
        for g, base in zip(optimizer.param_groups, [cfg.lr, cfg.encoder_lr]):
            g["lr"] = base * lr_factor(step, cfg)
        reading = step < cfg.read_steps or cfg.trains == "language_head"  # the probe or head alone: no backbone
        batch = [] if reading else [examples.sample() for _ in range(cfg.batch_size)]
        preserve = [examples.rng.choice(texts) for _ in range(cfg.preserve_batch)] if texts and not reading else None
        choices = [examples.rng.choice(items) for _ in range(cfg.choice_batch)] if items and not reading else None
        rollout = engine if engine is not None and step % cfg.rollout_every == 0 and not reading else None
        probing = examples.probe_users(cfg.probe_batch, step) if probe is not None and cfg.probe_batch else None
        heading = (random.Random(f"{cfg.seed}-head-{step}").sample(speakers, min(cfg.language_batch, len(speakers)))
                   if aux.config.languages and cfg.language_weight > 0 else None)
        figures = train_step(backbone, aux, batch, cfg, params, shard, micro_batch, probe, labels, preserve, rollout, probing,
                             choices, heading, read)
        if figures["rollout_tokens"]:
            repeats.append(figures["rollout_repeats"] / figures["rollout_tokens"])
        if rollout is not None and cfg.own_weight > 0:
            owned.append(figures["own_targets"] / min(cfg.rollout_batch, cfg.batch_size))
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(aux.trainable_parameters()), math.inf if reading else cfg.grad_clip)))
        for name, value in figures["terms"].items():
            terms.setdefault(name, []).append(value)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += figures["target_tokens"]
        synced += figures["allreduce_s"]
        waited += figures["wait_s"]
        recent.append(figures["loss"])
        bar.set_postfix(loss=f"{sum(recent[-10:]) / len(recent[-10:]):.3f}")
        if (step + 1) % cfg.log_every == 0:
            elapsed = time.perf_counter() - t0
            if log:
                log.write(json.dumps({"step": step + 1, "loss": sum(recent) / len(recent), "lr": optimizer.param_groups[0]["lr"],
                                      "elapsed_s": round(elapsed, 1), "target_tokens_per_s": round(tokens / elapsed, 1),
                                      "grad_norm": round(sum(norms) / len(norms), 4),
                                      "terms": {name: round(sum(v) / len(v), 4) for name, v in terms.items()},
                                      **({"allreduce_s": round(synced, 3), "wait_s": round(waited, 3)} if shard.size > 1 else {}),
                                      **({"rollout_repeats": round(sum(repeats) / len(repeats), 4)} if repeats else {}),
                                      # the share of rollouts an edit could turn into targets
                                      **({"own_targets": round(sum(owned) / len(owned), 4)} if owned else {})}) + "\n")
                log.flush()
            recent, repeats, owned, norms, terms = [], [], [], [], {}
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            saved = None
            if lead:
                saved = _checkpoint(aux, optimizer, probe, examples, step + 1, out / "last", {**meta, "step": offset + step + 1})
            if on_checkpoint:
                on_checkpoint(step + 1, saved, {"step": step + 1, "loss": figures["loss"]})
            if log:
                log.write(json.dumps({"event": "checkpoint", "step": step + 1}) + "\n")
                log.flush()
    assert all(p.grad is None for p in backbone.model.parameters()), "the backbone received gradients"
    after = _same_everywhere(shard, weights_fingerprint(backbone.model), "after")
    if log:
        log.write(json.dumps({"event": "end", "backbone_fingerprint_before": fingerprint,
                              "backbone_fingerprint_after": after, "elapsed_s": round(time.perf_counter() - t0, 1)}) + "\n")
        log.close()
    if after != fingerprint:
        raise RuntimeError(f"backbone fingerprint changed during training: {fingerprint} -> {after}")
    final = out / "final"
    if lead:
        aux.config.metadata = {**meta, "steps": offset + cfg.steps}
        aux.save_pretrained(final)
    return final


def _same_everywhere(shard: Shard, fingerprint: str, when: str) -> str:
    """The backbone's fingerprint, checked to be the same on every worker."""
    found = shard.all_gather(fingerprint)
    if len(set(found)) > 1:
        raise RuntimeError(f"the workers' backbones differ {when} training: fingerprints {found}")
    return fingerprint


def _checkpoint(aux, optimizer, probe, examples, step, directory: Path, meta: dict) -> Path:
    aux.config.metadata = meta
    aux.save_pretrained(directory)
    torch.save({"optimizer": optimizer.state_dict(), "probe": probe.state_dict() if probe is not None else None,
                "rng": examples.rng.getstate(), "torch_rng": torch.get_rng_state(), "step": step,
                "cuda_rng": torch.cuda.get_rng_state(aux.device) if aux.device.type == "cuda" else None},
               directory / "training_state.pt")
    return directory


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last if it exists")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (a GPU if one is visible); with "
                                                    "--workers, each worker's own GPU when --gpus-per-worker > 0")
    ap.add_argument("--workers", type=int, help="data parallel on Ray Train with this many workers, each with its own "
                                                "backbone replica (train_aux.distributed)")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--micro-batch", type=int, help="examples a worker computes at once; its share of the global "
                                                    "batch_size is accumulated (default: all of it at once)")
    ap.add_argument("--max-failures", type=int, default=3, help="with --workers: restarts from the last checkpoint "
                                                                "after a worker dies")
    for name, spec in TrainConfig.model_fields.items():
        kind = next((t for t in (int, float) if t in (spec.annotation, *get_args(spec.annotation))), str)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    args = vars(ap.parse_args(argv))
    config, resume, device, micro = args.pop("config"), args.pop("resume"), args.pop("device"), args.pop("micro_batch")
    run = {k: args.pop(k) for k in ("workers", "gpus_per_worker", "cpus_per_worker", "max_failures")}
    cfg = load_config(config, args)
    if micro is not None and micro < 1:
        ap.error("--micro-batch must be at least 1")
    if run["workers"] is None:
        final = train(cfg, resume=resume, device=device, micro_batch=micro)
    else:
        from .distributed import train_on_ray

        if not 1 <= run["workers"] <= cfg.batch_size:
            ap.error(f"--workers must be between 1 and the global batch_size ({cfg.batch_size})")
        final = train_on_ray(cfg, resume=resume, micro_batch=micro, **run)
    print(final)


if __name__ == "__main__":
    main()
