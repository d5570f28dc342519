"""Decoding with continuous batching over a frozen backbone.

`Engine` keeps one running batch with a shared KV cache. Each `step()` either prefills newly arrived
requests (their caches are left-padded and concatenated onto the running batch) or decodes one token
for every running request. Finished requests leave the batch at once, so a new request never waits for
a whole batch to drain, and requests from any mix of users share one forward pass.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .backbone import Backbone
from .detokenizer import IncrementalDetokenizer
from .splice import Prompt, embed_prompt, hiding_mask, left_pad


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] | None = ()
    ignore_eos: bool = False  # run to max_tokens (or a stop string) even past end-of-sequence, as vLLM's option
    # Guidance on the thoughts (classifier-free guidance): logits = guide's + guidance * (prompt's - guide's), the
    # guide being the prompt without its thoughts (`Prompt.guide`); 1 reads the thoughts as they are.
    guidance: float = 1.0
    # Guidance only where the thoughts move the next token: a position whose unguided KL(prompt's || guide's) is at
    # most this many nats takes the guide's logits (`guided_logits`); 0 guides every position.
    guidance_gate: float = 0.0
    # OpenAI's penalties on the reply's own tokens so far: logit -= count * frequency + (count > 0) * presence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.guidance <= 10:
            raise ValueError("guidance must be in [0, 10]")
        if self.guidance_gate < 0:
            raise ValueError("guidance_gate must be >= 0")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        self.stop = tuple(s for s in (self.stop or ()) if s)


def guided_logits(read: torch.Tensor, plain: torch.Tensor, guidance: float | torch.Tensor = 1.0,
                  gate: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Guided logits (`SamplingParams.guidance`, `guidance_gate`) from [..., vocab] logits with the thoughts and
    without: plain + guidance * (read - plain) at positions where KL(read || plain) exceeds `gate`, plain elsewhere.
    A greedy reply changes only where the thoughts move a token enough to change its argmax, while a scored
    continuation sums every small shift: the gate keeps the first and drops the second. `guidance` and `gate` may be
    per-row tensors of shape [rows, 1]."""
    scale = torch.as_tensor(guidance, dtype=read.dtype, device=read.device)
    gate = torch.as_tensor(gate, dtype=torch.float32, device=read.device)
    if bool((gate > 0).any()):
        lr, lp = read.float().log_softmax(-1), plain.float().log_softmax(-1)
        kl = (lr.exp() * (lr - lp)).sum(-1, keepdim=True)
        scale = torch.where((kl > gate) | (gate == 0), scale, torch.zeros_like(scale))
    return plain + scale * (read - plain)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int  # soft thoughts counted, one position each
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class StepOutput:
    """What one engine step produced for one request: new text, and the result once finished."""

    request_id: str
    delta: str
    result: GenerationResult | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None


@dataclass(eq=False)
class _Sequence:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    generator: torch.Generator | None
    detokenize: IncrementalDetokenizer
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out
    position: int = 0  # position id of the next input token
    finish_reason: str | None = None
    # guidance: the guide's sequence, run beside this one and fed the same tokens; `guides` points back from it
    guided_by: _Sequence | None = None
    guides: _Sequence | None = None

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=list(self.generated),
            prompt_tokens=self.prompt.num_tokens,
            completion_tokens=len(self.generated),
            finish_reason=self.finish_reason or "length",
        )


def _first_stop(text: str, stops: Sequence[str], start: int) -> int:
    """Where the earliest stop string begins in `text`, searching from `start`; -1 if none does."""
    return min((i for i in (text.find(stop, start) for stop in stops) if i >= 0), default=-1)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may be the start of a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class Engine:
    """Continuous-batching generator. `add` may be called from any thread; `step` from one thread only."""

    def __init__(self, backbone: Backbone, max_batch_size: int = 16) -> None:
        self.backbone = backbone
        self.max_batch_size = max_batch_size
        self._embedding = backbone.model.get_input_embeddings()
        self._waiting: deque[list[_Sequence]] = deque()  # a request's sequences: its own, and its guide's
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.running: list[_Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, L] attention mask of the running batch's cache

    # ------------------------------------------------------------------ public API
    def add(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        if prompt.num_tokens == 0:
            raise ValueError("the prompt is empty")
        if prompt.num_tokens + params.max_tokens > self.backbone.max_context:
            raise ValueError(
                f"prompt ({prompt.num_tokens} positions) + max_tokens ({params.max_tokens}) exceeds the "
                f"backbone's context of {self.backbone.max_context}"
            )
        window = getattr(self.backbone.model.config, "sliding_window", None)
        if window and prompt.hidden_thoughts() and prompt.num_tokens > window:  # the prefill's own mask replaces the window
            raise ValueError(f"a prompt whose thoughts are read by the reply only cannot be longer than this backbone's "
                             f"sliding window of {window} positions (it has {prompt.num_tokens})")
        guide = prompt.guide if params.guidance != 1 else None
        if guide is not None and guide.num_tokens + params.max_tokens > self.backbone.max_context:
            raise ValueError(f"the guide prompt ({guide.num_tokens} positions) + max_tokens ({params.max_tokens}) exceeds "
                             f"the backbone's context of {self.backbone.max_context}")
        request_id = request_id or f"req-{next(self._ids)}"
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.backbone.device)
            generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
        seq = _Sequence(request_id, prompt, params, generator, IncrementalDetokenizer(self.backbone.tokenizer),
                        position=prompt.num_tokens)
        group = [seq]
        if guide is not None:
            seq.guided_by = _Sequence(request_id, guide, params, None, seq.detokenize, position=guide.num_tokens, guides=seq)
            group.append(seq.guided_by)
        with self._lock:
            self._waiting.append(group)
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop a request (client went away); takes effect at the next step."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        return bool(self.running or self._waiting)

    def num_unfinished(self) -> int:
        """Requests waiting or running."""
        return sum(s.guides is None for s in self.running) + len(self._waiting)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        self._drop_aborted()
        with self._lock:
            admitted = []  # a request and its guide join together (a batch of one admits a guided request alone)
            while self._waiting and (not admitted and not self.running
                                     or len(self.running) + len(admitted) + len(self._waiting[0]) <= self.max_batch_size):
                admitted += self._waiting.popleft()
        if admitted:
            outputs = self._prefill(admitted)  # new requests first: time to first token stays short
        elif self.running:
            outputs = self._decode()
        else:
            return []
        self._evict_finished()
        return outputs

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]) -> list[GenerationResult]:
        """Run prompts to completion as one batch (the engine must not be shared with another thread meanwhile)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [self.add(p, sp) for p, sp in zip(prompts, params)]
        results: dict[str, GenerationResult] = {}
        while len(results) < len(ids):
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out.result
        return [results[i] for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[StepOutput]:
        """Yield one request's outputs as they are produced (single-threaded use)."""
        rid = self.add(prompt, params)
        while True:
            for out in self.step():
                if out.request_id == rid:
                    yield out
                    if out.finished:
                        return

    # ------------------------------------------------------------------ internals
    def _forward(self, **inputs) -> torch.Tensor:
        out = self.backbone.model(past_key_values=self._cache, use_cache=True, logits_to_keep=1, **inputs)
        return out.logits[:, -1].float()

    def _prefill(self, seqs: list[_Sequence]) -> list[StepOutput]:
        embeds, mask, positions = left_pad([embed_prompt(self._embedding, s.prompt) for s in seqs])
        running_cache, running_mask = self._cache, self._mask
        # full-length layers even for sliding-window attention (the mask applies the window): a sliding layer keeps
        # only the last window of keys, which cannot be padded and merged with the running batch's
        self._cache = DynamicCache()
        # a reply-only prompt's text does not see its thoughts; decoding (2-D mask) lets every reply token see them
        hidden = [s.prompt.hidden_thoughts(mask.shape[1] - s.prompt.num_tokens) for s in seqs]
        logits = self._forward(inputs_embeds=embeds, attention_mask=hiding_mask(mask, hidden, embeds.dtype),
                               position_ids=positions)
        new_cache = self._cache
        if running_cache is not None and self.running:
            self._cache, self._mask = _merge(running_cache, running_mask, new_cache, mask)
        else:
            self._cache, self._mask = new_cache, mask
        self.running.extend(seqs)
        return self._advance_all(seqs, self._sample(logits, seqs))

    def _decode(self) -> list[StepOutput]:
        seqs = self.running
        dev = self.backbone.device
        ids = torch.tensor([[s.generated[-1]] for s in seqs], device=dev)
        positions = torch.tensor([[s.position - 1] for s in seqs], device=dev)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(seqs), 1)], dim=1)
        logits = self._forward(input_ids=ids, attention_mask=self._mask, position_ids=positions)
        return self._advance_all(seqs, self._sample(logits, seqs))

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        row = {id(s): i for i, s in enumerate(seqs)}
        guided = [(i, row[id(s.guided_by)]) for i, s in enumerate(seqs) if s.guided_by is not None]
        if guided:
            own, guide = (torch.tensor(x, device=logits.device) for x in zip(*guided))
            scale = torch.tensor([seqs[i].params.guidance for i, _ in guided], device=logits.device)[:, None]
            gate = torch.tensor([seqs[i].params.guidance_gate for i, _ in guided], device=logits.device)[:, None]
            logits[own] = guided_logits(logits[own], logits[guide], scale, gate)
        for i, s in enumerate(seqs):
            p = s.params
            if (p.presence_penalty or p.frequency_penalty) and s.generated and s.guides is None:
                counts = torch.bincount(torch.tensor(s.generated, device=logits.device),
                                        minlength=logits.shape[-1]).to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        tokens = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature == 0 or s.guides is not None:
                continue
            probs = F.softmax(logits[i] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest prefix whose mass reaches top_p (the top token always stays)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens[i] = int(torch.multinomial(probs, 1, generator=s.generator))
        for i, j in guided:  # the guide reads the reply being written
            tokens[j] = tokens[i]
        return tokens

    def _advance_all(self, seqs: list[_Sequence], tokens: list[int]) -> list[StepOutput]:
        outputs = []
        for s, token in zip(seqs, tokens):
            if s.guides is not None:
                s.generated.append(token)
                s.position += 1
            else:
                outputs.append(self._advance(s, token))
                if s.guided_by is not None:
                    s.guided_by.finish_reason = s.finish_reason
        return outputs

    def _advance(self, s: _Sequence, token: int) -> StepOutput:
        s.generated.append(token)
        s.position += 1
        if token in self.backbone.eos_token_ids and not s.params.ignore_eos:
            s.text += s.detokenize(s.generated[:-1], final=True)  # the end-of-sequence token itself is not text
            s.finish_reason = "stop"
        else:
            searched = len(s.text)
            length = len(s.generated) >= s.params.max_tokens or s.position >= self.backbone.max_context
            s.text += s.detokenize(s.generated, final=length)
            # text already searched cannot hold a whole stop string, but may hold the start of one
            longest = max(map(len, s.params.stop), default=1)
            cut = _first_stop(s.text, s.params.stop, max(0, searched - longest + 1))
            if cut >= 0:
                s.text, s.finish_reason = s.text[:cut], "stop"
            elif length:
                s.finish_reason = "length"
        end = len(s.text) if s.finish_reason else len(s.text) - _held_back(s.text, s.params.stop)
        delta, s.emitted = s.text[s.emitted : end], max(s.emitted, end)
        return StepOutput(s.request_id, delta, s.result() if s.finish_reason else None)

    def _drop_aborted(self) -> None:
        with self._lock:
            if not self._aborted:
                return
            self._waiting = deque(g for g in self._waiting if g[0].request_id not in self._aborted)
            for s in self.running:
                if s.request_id in self._aborted:
                    s.finish_reason = "abort"
            self._aborted.clear()
        self._evict_finished()

    def _evict_finished(self) -> None:
        keep = [i for i, s in enumerate(self.running) if s.finish_reason is None]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        # Drop columns that are padding for every remaining row (left by a longer, finished prompt).
        first = int(self._mask.any(dim=0).nonzero()[0])
        if first:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self._mask = self._mask[:, first:]


def _pad_seq(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _merge(
    cache_a: DynamicCache, mask_a: torch.Tensor, cache_b: DynamicCache, mask_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Stack two batches' KV caches along the batch axis, left-padding the shorter in sequence length."""
    length = max(mask_a.shape[1], mask_b.shape[1])
    for la, lb in zip(cache_a.layers, cache_b.layers):
        la.keys = torch.cat([_pad_seq(la.keys, length, 2), _pad_seq(lb.keys, length, 2)], dim=0)
        la.values = torch.cat([_pad_seq(la.values, length, 2), _pad_seq(lb.values, length, 2)], dim=0)
    return cache_a, torch.cat([_pad_seq(mask_a, length, 1), _pad_seq(mask_b, length, 1)], dim=0)
