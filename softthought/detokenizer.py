"""Incremental detokenization: the text a growing list of token ids adds, at a cost that does not grow with it.

Decoding the whole reply at every step costs O(length) per token, O(length^2) per reply: at thousands of tokens
and a full batch, that host time outweighs a GPU's decode step. As vLLM and TGI do, only a short window of recent
tokens is decoded: the tokens emitted last (so a tokenizer that drops a leading space at the start of a decode,
as SentencePiece does, still places it) and the new ones after them.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what a decode shows for the bytes of a character whose remaining bytes are in later tokens


@dataclass(eq=False)
class IncrementalDetokenizer:
    tokenizer: object
    prefix: int = 0  # window start: the first of the tokens emitted last
    read: int = 0  # tokens whose text has been emitted

    def __call__(self, ids: list[int], final: bool = False) -> str:
        """Text that `ids` (the previous ids plus new ones) adds. A character whose bytes are not all there yet is
        held back until they are, or until `final`, which hands out whatever is left (as the full decode shows it)."""
        before = self.tokenizer.decode(ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(ids)
        return after[len(before) :]
