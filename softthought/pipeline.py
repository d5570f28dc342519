"""Backbone + auxiliary model + engine in one process: the library's entry point for notebooks, the CLI,
benchmarks and evaluation. The server splits the same pieces across Ray Serve deployments."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .aux_model import CheckpointError, SoftThoughtAux
from .backbone import Backbone, load_backbone
from .generation import Engine, GenerationResult, SamplingParams, StepOutput
from .splice import Prompt, build_chat_prompt

#: Where the trained default auxiliary checkpoint for the embedded backbone lives, once one is shipped.
DEFAULT_AUX_DIR = Path(__file__).parent / "checkpoints" / "default"


def default_aux_dir() -> Path | None:
    return DEFAULT_AUX_DIR if (DEFAULT_AUX_DIR / "config.json").exists() else None


@dataclass(eq=False)
class Pipeline:
    backbone: Backbone
    aux: SoftThoughtAux | None
    engine: Engine

    @classmethod
    def load(
        cls, backbone: str | None = None, aux: str | Path | None = None, dtype: str = "bfloat16", max_batch_size: int = 16
    ) -> Pipeline:
        bb = load_backbone(backbone, dtype=dtype)
        model = None
        if aux is not None:
            model = SoftThoughtAux.from_pretrained(aux, backbone=bb).eval()
        return cls(bb, model, Engine(bb, max_batch_size=max_batch_size))

    @torch.inference_mode()
    def thoughts(self, summary: str) -> torch.Tensor:
        """[K, hidden] soft thoughts for one preference summary."""
        if self.aux is None:
            raise CheckpointError("no auxiliary checkpoint is loaded: pass aux=DIR (see `softthought aux-init`)")
        return self.aux.encode([summary])[0]

    def prompt(self, messages: Sequence[dict], summary: str | None = None) -> Prompt:
        """No summary: the plain chat prompt, exactly what the backbone alone would see."""
        if not summary:
            return build_chat_prompt(self.backbone.tokenizer, messages)
        return build_chat_prompt(self.backbone.tokenizer, messages, self.thoughts(summary), placement=self.aux.placement)

    def chat(self, messages: Sequence[dict], summary: str | None = None, params: SamplingParams | None = None) -> GenerationResult:
        return self.engine.generate([self.prompt(messages, summary)], params or SamplingParams())[0]

    def stream(self, messages: Sequence[dict], summary: str | None = None, params: SamplingParams | None = None) -> Iterator[StepOutput]:
        return self.engine.stream(self.prompt(messages, summary), params or SamplingParams())
