"""Train the auxiliary model by personalized self-distillation; the backbone stays frozen.

Targets are the frozen backbone's own answers, minimally edited to satisfy each user's checkable
preferences (and kept only if IFEval's verifiers pass). The student is the same backbone reading K soft
thoughts of the user's summary instead of any text; the loss is cross-entropy on the target tokens, with the
tokens the edit changed weighted up (`edit_weight`), plus an optional probe loss that asks the thoughts to say
which preferences the summary holds (`probe_weight`), plus an optional preservation term: the KL divergence from
the plain backbone's next-token distributions to those with the thoughts as a prefix of plain text, so that
thoughts speak to the chat reply and leave the backbone's general ability alone (`preserve_weight`).

    python -m train_aux.train --config train_aux/configs/default.yaml [--steps N --out DIR ...]
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from softthought.aux_model import CopySource, SoftThoughtAux
from softthought.backbone import Backbone, load_backbone, weights_fingerprint
from softthought.generation import Engine, SamplingParams
from softthought.splice import OPENING, Placement, Prompt, build_chat_prompt, embed_prompt, hiding_mask, left_pad, text_prompt

from .checks import is_loop
from .data import boolq_texts, edit_answer, qa_texts, read_jsonl, reply_texts, summary_before


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
    # Weight of the copy thoughts' pointer loss (`copy_loss`): thought i takes the i-th token of the strings the
    # user asked for, and the gates open on those and stay shut elsewhere.
    copy_weight: float = 1.0
    # Where the edit brings in a keyword the answer lacks: a sentence after the answer, or one that opens the reply,
    # where a copied word is the next thing written.
    keywords_first: bool = False
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
    # Weight of a multi-label probe (linear, training only) that must read the user's check ids off the mean
    # thought: it keeps users' thoughts apart while the backbone learns to use them.
    probe_weight: float = 0.0
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


def load_config(path: str | None, overrides: dict) -> TrainConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.model_validate(data)


def data_hash(data: Path) -> str:
    """The training data's identity: its users and the backbone's answers."""
    h = hashlib.sha256()
    for name in ("train_users.jsonl", "answers.jsonl"):
        h.update((data / name).read_bytes())
    if (data / "language_answers.jsonl").exists():  # older data sets have no answers in other languages
        h.update((data / "language_answers.jsonl").read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Example:
    summary: str
    prompt: str
    target: str  # the backbone's own answer, edited to satisfy the user's checks
    answer: str  # that answer unedited
    check_ids: list[str]
    copy_strings: list[str] = field(default_factory=list)  # what the user asks for word for word (`copy_strings`)


class Examples:
    """Endless stream of examples from random users and the backbone's own answers: in the user's response language
    when they have one (`language_answers`), else its plain answers."""

    def __init__(self, users: list[dict], answers: list[dict], seed: int, language_answers: list[dict] = (),
                 keywords_first: bool = False) -> None:
        # the backbone's own answers that loop (2 % of them) would teach the thoughts to loop: left out
        self.answers = [a for a in answers if not is_loop(a["answer"])]
        self.keywords_first = keywords_first
        self.by_language: dict[str, list[dict]] = {}
        for row in language_answers:
            if not is_loop(row["answer"]):
                self.by_language.setdefault(row["language"], []).append(row)
        self.users = [u for u in users if (lang := _language(u)) is None or lang in self.by_language]
        self.rng = random.Random(seed)

    def sample(self) -> Example:
        while True:
            user = self.rng.choice(self.users)
            lang = _language(user)
            row = self.rng.choice(self.by_language[lang] if lang else self.answers)
            target = edit_answer(row["answer"], row["prompt"], user["checks"], self.rng, self.keywords_first)
            if target is not None and not is_loop(target):
                # an answer in another language is weighed against itself: were all of it counted as edited (against
                # the plain answer), these few users' whole replies outweighed every other preference's edits
                return Example(user["summary"], row["prompt"], target, row["answer"],
                               [c["instruction_id"] for c in user["checks"]], copy_strings(user["checks"]))


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


def copy_loss(picks: torch.Tensor, gate_logits: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """Copy thought i of summary b should take token targets[b][i] (negative log of its attention there), and its
    gate be open exactly when it has a target (binary cross-entropy)."""
    gates = torch.zeros_like(gate_logits)
    nll = []
    for b, positions in enumerate(targets):
        for i, pos in enumerate(positions):
            nll.append(-(picks[b, i, pos] + 1e-6).log())
            gates[b, i] = 1.0
    pointer = torch.stack(nll).mean() if nll else picks.sum() * 0.0
    return pointer + F.binary_cross_entropy_with_logits(gate_logits, gates)


def _language(user: dict) -> str | None:
    return next((c["kwargs"]["language"] for c in user["checks"] if c["instruction_id"] == "language:response_language"), None)


def edited_chars(source: str, target: str) -> list[bool]:
    """For each character of `target`, whether the edit from `source` wrote it or follows a deletion there."""
    flags = [False] * len(target)
    for op, _, _, j1, j2 in difflib.SequenceMatcher(None, source, target, autojunk=False).get_opcodes():
        if op in ("replace", "insert"):
            flags[j1:j2] = [True] * (j2 - j1)
        elif op == "delete" and j1 < len(target):
            flags[j1] = True  # the token after a removed comma is where the decision is made
    return flags


def reply_logprobs(model, table: torch.nn.Module, prompts: list[Prompt], replies: list[list[int]]) -> list[torch.Tensor]:
    """The log-probability of each reply's tokens read after its prompt (teacher forced), one [len] tensor each."""
    sequences = [torch.cat([embed_prompt(table, p), table(torch.tensor(ids))]) for p, ids in zip(prompts, replies)]
    embeds, mask, positions = left_pad(sequences)
    length = mask.shape[1]
    attention = hiding_mask(mask, [p.hidden_thoughts(length - len(s)) for p, s in zip(prompts, sequences)], embeds.dtype)
    logits = model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).logits
    out = []
    for i, ids in enumerate(replies):  # left padding: each reply ends its row, and position t predicts token t+1
        logp = F.log_softmax(logits[i, length - len(ids) - 1 : length - 1].float(), dim=-1)
        out.append(logp.gather(1, torch.tensor(ids)[:, None])[:, 0])
    return out


def target_loss(model, table: torch.nn.Module, tokenizer, prompts: list[Prompt], targets: list[str],
                max_target: int, sources: list[str] | None = None, edit_weight: float = 1.0) -> tuple[torch.Tensor, int]:
    """Cross-entropy of each target reply (+ end of turn) after its prompt; returns (loss, target tokens).

    With `sources` (the unedited answers) and `edit_weight` > 1, the tokens the edit touched and the end of turn
    (where the reply's length is decided) count `edit_weight` times in the weighted mean.
    """
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    target_ids, target_weights = [], []
    for i, target in enumerate(targets):
        enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=sources is not None)
        ids = (enc["input_ids"] + [end])[:max_target]
        weights = [1.0] * len(ids)
        if sources is not None:
            flags = edited_chars(sources[i], target)
            spans = list(enc["offset_mapping"]) + [(len(target), len(target) + 1)]
            weights = [edit_weight if a >= len(target) or any(flags[a:b]) else 1.0 for a, b in spans[: len(ids)]]
        target_ids.append(ids)
        target_weights.append(weights)
    nll = -torch.cat(reply_logprobs(model, table, prompts, target_ids))
    w = torch.tensor([x for ws in target_weights for x in ws])
    return (nll * w).sum() / w.sum(), sum(len(t) for t in target_ids)


def repeated_positions(ids: list[int], n: int = 4) -> list[int]:
    """The indices of the tokens that complete an n-gram `ids` already had before them."""
    seen, out = set(), []
    for t in range(n - 1, len(ids)):
        gram = tuple(ids[t - n + 1 : t + 1])
        if gram in seen:
            out.append(t)
        seen.add(gram)
    return out


def unlikelihood_loss(backbone: Backbone, engine: Engine, prompts: list[Prompt], max_tokens: int) -> tuple[torch.Tensor, float]:
    """Sequence-level unlikelihood (Welleck et al., 2020) on the student's own greedy replies to `prompts`: -log(1 - p)
    of every token that completes a 4-gram its reply already wrote, summed over the rollouts' tokens and divided by
    their number. Loops are what the edited targets can teach and teacher forcing never shows: they happen only in
    the model's own replies. Returns (loss, the share of rollout tokens that repeat)."""
    detached = [Prompt([s.detach() if isinstance(s, torch.Tensor) else s for s in p.segments], p.reply_only) for p in prompts]
    replies = [r.token_ids for r in engine.generate(detached, SamplingParams(max_tokens=max_tokens, temperature=0))]
    total = max(1, sum(len(r) for r in replies))
    looping = [(p, r, pos) for p, r in zip(prompts, replies) if (pos := repeated_positions(r))]
    if not looping:
        return torch.zeros(()), 0.0
    logps = reply_logprobs(backbone.model, backbone.model.get_input_embeddings(), [p for p, _, _ in looping],
                           [r for _, r, _ in looping])
    unlikely = torch.cat([-torch.log1p(-lp[pos].exp().clamp(max=1 - 1e-6)) for lp, (_, _, pos) in zip(logps, looping)])
    return unlikely.sum() / total, sum(len(pos) for _, _, pos in looping) / total


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
    """Mean per-token KL(teacher || with thoughts) over token sequences of plain text, thoughts[i] placed in the ids of
    texts[i] = (ids, reply start): before them, or after the reply start (`placement.at_end`). The teacher is the plain
    backbone reading the ids alone, or with `teacher_prefixes[i]` (token ids) before them. When the text before its
    reply start does not see the thoughts (`placement.reply_only`, or at the end), the KL runs over the positions that
    do: the reply's, predicted from its start on."""
    table = backbone.model.get_input_embeddings()
    with torch.no_grad():
        prefixes = teacher_prefixes or [[] for _ in texts]
        embeds, mask, positions = left_pad([table(torch.tensor(pre + ids)) for pre, (ids, _) in zip(prefixes, texts)])
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
    return total / len(texts)


def batch_loss(backbone: Backbone, aux: SoftThoughtAux, batch: list[Example], cfg: TrainConfig,
               probe: torch.nn.Linear | None = None, check_ids: list[str] | None = None,
               texts: list[list[int]] | None = None, engine: Engine | None = None) -> tuple[torch.Tensor, int, float | None]:
    """The student's loss: the user's soft thoughts instead of the summary text (+ the probe's, the preservation term
    on `texts`, and with an `engine` the unlikelihood of its own replies' repeats, if given); returns (loss, target
    tokens, the share of rollout tokens that repeat or None)."""
    tok = backbone.tokenizer
    summaries = [ex.summary for ex in batch]
    copying = 0.0
    if aux.config.copy_thoughts:
        thoughts, picks, gate_logits, offsets = aux.encode_copy(summaries)
        targets = [copy_targets(ex.summary, ex.copy_strings, off, aux.config.copy_thoughts) for ex, off in zip(batch, offsets)]
        copying = cfg.copy_weight * copy_loss(picks, gate_logits, targets)
    else:
        thoughts = aux.encode(summaries)
    placement = aux.placement
    prompts = [build_chat_prompt(tok, [{"role": "user", "content": ex.prompt}], th, placement=placement)
               for ex, th in zip(batch, thoughts)]
    loss, n_tokens = target_loss(backbone.model, backbone.model.get_input_embeddings(), tok, prompts,
                                 [ex.target for ex in batch], cfg.max_target_tokens, [ex.answer for ex in batch],
                                 cfg.edit_weight)
    loss = loss + copying
    if probe is not None:
        labels = torch.tensor([[float(c in ex.check_ids) for c in check_ids] for ex in batch])
        loss = loss + cfg.probe_weight * F.binary_cross_entropy_with_logits(probe(thoughts.mean(1)), labels)
    if texts:
        prefixes = (tok([summary_before(ex.summary, "") for ex in batch[: len(texts)]], add_special_tokens=False)["input_ids"]
                    if cfg.preserve_teacher == "text" else None)
        loss = loss + cfg.preserve_weight * preservation_loss(backbone, thoughts[: len(texts)], texts, prefixes, placement)
    repeats = None
    if engine is not None:
        unlikely, repeats = unlikelihood_loss(backbone, engine, prompts[: cfg.rollout_batch], cfg.rollout_tokens)
        loss = loss + cfg.rollout_weight * unlikely
    return loss, n_tokens, repeats


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
    assert {id(p) for p in held} == {id(p) for p in aux.trainable_parameters()} | probe_ids
    return optimizer


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data_dir)
    users, answers = read_jsonl(data / "train_users.jsonl"), read_jsonl(data / "answers.jsonl")
    backbone = load_backbone(cfg.backbone, dtype=cfg.dtype)
    fingerprint = backbone.fingerprint
    last = out / "last"
    # offset: the steps of the checkpoint this run started from (--init); this run's step s is step offset + s
    if resume and (last / "config.json").exists():
        aux = SoftThoughtAux.from_pretrained(last, backbone=backbone)
        state = torch.load(last / "training_state.pt", weights_only=False)
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
    if cfg.thoughts_seen_by:
        aux.config.thoughts_seen_by = cfg.thoughts_seen_by
    if cfg.thoughts_at:
        aux.config.thoughts_at = cfg.thoughts_at
    aux.train()
    # the probe reads the mean thought; it is part of training only and never saved with the checkpoint
    check_ids = sorted({c["instruction_id"] for u in users for c in u["checks"]})
    probe = torch.nn.Linear(backbone.hidden_size, len(check_ids)) if cfg.probe_weight > 0 else None
    optimizer = make_optimizer(aux, backbone, cfg, probe)
    languages = read_jsonl(data / "language_answers.jsonl") if (data / "language_answers.jsonl").exists() else []
    examples = Examples(users, answers, cfg.seed, languages, cfg.keywords_first)
    texts = []
    if cfg.preserve_weight > 0:  # each text's last preserve_tokens tokens: a long passage keeps its question and answer
        raw = [*(boolq_texts() if "boolq" in cfg.preserve_texts else []), *(qa_texts(answers) if "qa" in cfg.preserve_texts else []),
               *(reply_texts(answers) if "replies" in cfg.preserve_texts else [])]
        texts = preservation_texts(backbone.tokenizer, raw, cfg.preserve_tokens)
    start = 0
    if state:
        if probe is not None:
            probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        examples.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
    (out / "train_config.json").write_text(cfg.model_dump_json(indent=2))
    log = open(out / "log.jsonl", "a")  # noqa: SIM115 - appended to through the whole run, closed at its end
    log.write(json.dumps({"event": "start", "step": start, "backbone_fingerprint": fingerprint,
                          "trainable_params": sum(p.numel() for p in aux.trainable_parameters())}) + "\n")
    # every phase's config, so that a checkpoint resumed with new settings still says how all of it was trained
    settings = cfg.model_dump()
    phases = list(aux.config.metadata.get("phases", [])) if state or cfg.init else []
    if not phases or phases[-1]["train_config"] != settings:
        phases.append({"from_step": offset + start, "train_config": settings})
    meta = {"backbone_fingerprint": fingerprint, "data_hash": data_hash(data),
            "train_config": settings, "phases": phases, **({"init_steps": offset} if offset else {})}
    engine = Engine(backbone, max_batch_size=cfg.rollout_batch) if cfg.rollout_weight > 0 else None
    t0, tokens, recent, repeats = time.perf_counter(), 0, [], []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train aux", unit="step")
    for step in bar:
        for g, base in zip(optimizer.param_groups, [cfg.lr, cfg.encoder_lr]):
            g["lr"] = base * lr_factor(step, cfg)
        batch = [examples.sample() for _ in range(cfg.batch_size)]
        preserve = [examples.rng.choice(texts) for _ in range(cfg.preserve_batch)] if texts else None
        rollout = engine if engine is not None and step % cfg.rollout_every == 0 else None
        loss, n_tokens, repeat_share = batch_loss(backbone, aux, batch, cfg, probe, check_ids, preserve, rollout)
        repeats += [] if repeat_share is None else [repeat_share]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(aux.trainable_parameters()), cfg.grad_clip)
        optimizer.step()
        tokens += n_tokens
        recent.append(loss.item())
        bar.set_postfix(loss=f"{sum(recent[-10:]) / len(recent[-10:]):.3f}")
        if (step + 1) % cfg.log_every == 0:
            elapsed = time.perf_counter() - t0
            log.write(json.dumps({"step": step + 1, "loss": sum(recent) / len(recent), "lr": optimizer.param_groups[0]["lr"],
                                  "elapsed_s": round(elapsed, 1), "target_tokens_per_s": round(tokens / elapsed, 1),
                                  **({"rollout_repeats": round(sum(repeats) / len(repeats), 4)} if repeats else {})}) + "\n")
            log.flush()
            recent, repeats = [], []
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _checkpoint(aux, optimizer, probe, examples, step + 1, last, {**meta, "step": offset + step + 1})
    assert all(p.grad is None for p in backbone.model.parameters()), "the backbone received gradients"
    after = weights_fingerprint(backbone.model)
    log.write(json.dumps({"event": "end", "backbone_fingerprint_before": fingerprint,
                          "backbone_fingerprint_after": after, "elapsed_s": round(time.perf_counter() - t0, 1)}) + "\n")
    log.close()
    if after != fingerprint:
        raise RuntimeError(f"backbone fingerprint changed during training: {fingerprint} -> {after}")
    final = out / "final"
    aux.config.metadata = {**meta, "steps": offset + cfg.steps}
    aux.save_pretrained(final)
    return final


def _checkpoint(aux, optimizer, probe, examples, step, directory: Path, meta: dict) -> None:
    aux.config.metadata = meta
    aux.save_pretrained(directory)
    torch.save({"optimizer": optimizer.state_dict(), "probe": probe.state_dict() if probe is not None else None,
                "rng": examples.rng.getstate(), "torch_rng": torch.get_rng_state(), "step": step},
               directory / "training_state.pt")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last if it exists")
    for name, spec in TrainConfig.model_fields.items():
        kind = next((t for t in (int, float) if t in (spec.annotation, *get_args(spec.annotation))), str)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    args = vars(ap.parse_args(argv))
    config, resume = args.pop("config"), args.pop("resume")
    final = train(load_config(config, args), resume=resume)
    print(final)


if __name__ == "__main__":
    main()
