"""Splicing soft thoughts into a prompt, tokenizer-agnostically.

The chat template is rendered with a marker string where the thoughts go; the rendered text is split at
the marker and each piece tokenized on its own, so no position is ever computed by hand and no token is
added to the backbone's vocabulary. The marker itself never reaches the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Placeholder rendered into the template where the thoughts go. Not a token of any vocabulary.
THOUGHT_MARKER = "\u2063<softthought-thoughts>\u2063"

Segment = list[int] | torch.Tensor  # token ids, or soft thoughts [K, hidden]


class PromptError(ValueError):
    """A prompt that cannot be built (bad roles, marker in user text, template failure)."""


@dataclass(frozen=True)
class Placement:
    """Where a checkpoint's thoughts go in a prompt, and which positions read them.

    `at_end`: after the whole rendered prompt, generation header included; the prompt is then the plain backbone's,
    token for token and position for position, no text reads the thoughts and no mask is needed, and every prompt
    shares its prefix with the plain one's (a prefix cache serves them all). Otherwise they open the system turn
    (or the raw prompt) and `reply_only` hides them from the prompt's text after them (`Prompt.reply_only`).
    """

    at_end: bool = False
    reply_only: bool = False

    def __post_init__(self) -> None:
        if self.at_end and self.reply_only:
            raise ValueError("thoughts at the end of the prompt are read by the reply only already")


#: The thoughts opening the system turn, read by every later position: a checkpoint's placement by default.
OPENING = Placement()


@dataclass
class Prompt:
    """A prompt as an ordered list of token-id pieces and soft-thought blocks.

    `reply_only`: the prompt's text after the thoughts does not attend to them, except its last position, which
    predicts the reply's first token; every reply position does. The prompt is then read exactly as without
    thoughts, and the thoughts condition only what is predicted from it.
    """

    segments: list[Segment]
    reply_only: bool = False
    # The same request without its thoughts (the plain backbone's prompt): with `SamplingParams.guidance`, the reply's
    # next-token logits are this prompt's plus `guidance` times the difference the thoughts make.
    guide: Prompt | None = None

    @property
    def num_tokens(self) -> int:
        """Input positions, soft thoughts counted (one position each)."""
        return sum(len(s) if isinstance(s, list) else s.shape[0] for s in self.segments)

    @property
    def num_thoughts(self) -> int:
        return sum(s.shape[0] for s in self.segments if isinstance(s, torch.Tensor))

    @property
    def token_ids(self) -> list[int]:
        return [t for s in self.segments if isinstance(s, list) for t in s]

    def hidden_thoughts(self, offset: int = 0) -> tuple[int, int, int] | None:
        """(a, b, c) when queries [b, c) must not see the thoughts at [a, b), positions counted from `offset`."""
        if not self.reply_only or not self.num_thoughts:
            return None
        a = offset
        for seg in self.segments:
            if isinstance(seg, torch.Tensor):
                return a, a + seg.shape[0], offset + self.num_tokens - 1
            a += len(seg)
        return None


def _check_messages(messages: Sequence[dict]) -> None:
    for m in messages:
        if THOUGHT_MARKER in str(m.get("content", "")):
            raise PromptError("message content contains the reserved soft-thought marker")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja raises TemplateError for roles/orders a template rejects
        raise PromptError(f"the chat template rejected the messages: {exc}") from exc


def with_system_text(tokenizer, messages: Sequence[dict], text: str) -> list[dict]:
    """The conversation with `text` opening the system turn (one is added if there is none).

    Templates that refuse a system role get `text` at the start of the first user turn instead.
    """
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = text + "\n" + str(out[0]["content"])
    else:
        out.insert(0, {"role": "system", "content": text})
    try:
        _render(tokenizer, out, True)
        return out
    except PromptError:
        out = [dict(m) for m in messages]
        first_user = next((i for i, m in enumerate(out) if m.get("role") == "user"), None)
        if first_user is None:
            raise
        out[first_user]["content"] = text + "\n" + str(out[first_user]["content"])
        return out


def render_chat_with_marker(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Rendered chat text containing the marker exactly once, where `with_system_text` puts text."""
    text = _render(tokenizer, with_system_text(tokenizer, messages, THOUGHT_MARKER), add_generation_prompt)
    if text.count(THOUGHT_MARKER) != 1:
        raise PromptError("the chat template dropped or repeated the soft-thought marker")
    return text


def _tokenize(tokenizer, text: str) -> list[int]:
    # The rendered template already carries its special tokens (BOS etc.): add none.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def build_chat_prompt(
    tokenizer, messages: Sequence[dict], thoughts: torch.Tensor | None = None, add_generation_prompt: bool = True,
    placement: Placement = OPENING, guided: bool = False,
) -> Prompt:
    """Tokenized chat prompt; `thoughts` [K, hidden], if any, where `placement` puts them: after the whole prompt,
    or where the marker was rendered. `guided`: with thoughts, the plain prompt rides along as its `guide`."""
    _check_messages(messages)
    if thoughts is None or placement.at_end:
        ids = _tokenize(tokenizer, _render(tokenizer, list(messages), add_generation_prompt))
        prompt = Prompt([ids] if thoughts is None else [ids, thoughts])
    else:
        before, after = render_chat_with_marker(tokenizer, messages, add_generation_prompt).split(THOUGHT_MARKER)
        prompt = Prompt([_tokenize(tokenizer, before), thoughts, _tokenize(tokenizer, after)], placement.reply_only)
    if guided and thoughts is not None:
        prompt.guide = build_chat_prompt(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return prompt


def build_text_prompt(tokenizer, text: str, thoughts: torch.Tensor | None = None,
                      placement: Placement = OPENING, guided: bool = False) -> Prompt:
    """Raw completion prompt (no chat template); thoughts, if any, after the text (`placement.at_end`) or first,
    after a BOS if the model uses one. `guided`: as `build_chat_prompt`'s."""
    if THOUGHT_MARKER in text:
        raise PromptError("prompt contains the reserved soft-thought marker")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    prompt = text_prompt(ids, thoughts, placement, tokenizer.bos_token_id)
    if guided and thoughts is not None:
        prompt.guide = Prompt([ids])
    return prompt


def text_prompt(ids: list[int], thoughts: torch.Tensor | None, placement: Placement = OPENING,
                bos: int | None = None) -> Prompt:
    """Plain-text token ids with the thoughts placed: after them, or before them (after a leading `bos`)."""
    if thoughts is None:
        return Prompt([ids])
    if placement.at_end:
        return Prompt([ids, thoughts])
    if ids and bos is not None and ids[0] == bos:
        return Prompt([[bos], thoughts, ids[1:]], placement.reply_only)
    return Prompt([thoughts, ids], placement.reply_only)


def embed_prompt(embedding: torch.nn.Module, prompt: Prompt) -> torch.Tensor:
    """Input embeddings [L, hidden]: text pieces through the backbone's own table, thoughts as they are."""
    weight = embedding.weight
    parts = []
    for seg in prompt.segments:
        if isinstance(seg, torch.Tensor):
            parts.append(seg.to(device=weight.device, dtype=weight.dtype))
        elif seg:
            parts.append(embedding(torch.tensor(seg, dtype=torch.long, device=weight.device)))
    return torch.cat(parts, dim=0)


def left_pad(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch prompts of different lengths: (inputs_embeds [B, L, d], attention_mask [B, L], position_ids [B, L]).

    Left padding keeps every prompt's last position at the end, where the next token is read.
    Padded positions are zero vectors that the mask hides; real positions are numbered from 0.
    """
    length = max(e.shape[0] for e in embeds)
    d = embeds[0].shape[1]
    batch = embeds[0].new_zeros(len(embeds), length, d)
    mask = torch.zeros(len(embeds), length, dtype=torch.long, device=embeds[0].device)
    for i, e in enumerate(embeds):
        batch[i, length - e.shape[0] :] = e
        mask[i, length - e.shape[0] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch, mask, positions


def hiding_mask(mask: torch.Tensor, hidden: Sequence[tuple[int, int, int] | None], dtype: torch.dtype) -> torch.Tensor:
    """The attention mask for rows padded as `mask` [B, L] in which row i hides positions [a, b) from the queries
    [b, c), for hidden[i] = (a, b, c) (see `Prompt.hidden_thoughts`): a 4-D additive one [B, 1, L, L], causal, padding
    hidden; `mask` itself when no row hides anything, so that the model builds its own."""
    if all(span is None for span in hidden):
        return mask
    length = mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril() & mask.bool()[:, None, :]
    hide(allowed, hidden)
    allowed |= torch.eye(length, dtype=torch.bool, device=mask.device)  # a padding query sees itself: no NaN row
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def hide(allowed: torch.Tensor, hidden: Sequence[tuple[int, int, int] | None]) -> None:
    """In place, in a boolean [B, L, L] mask of what each query may attend to: row i's positions [a, b) hidden from
    its queries [b, c), for hidden[i] = (a, b, c)."""
    for i, span in enumerate(hidden):
        if span is not None:
            a, b, c = span
            allowed[i, b:c, a:b] = False
