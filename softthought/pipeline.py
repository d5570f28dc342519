"""Backbone + auxiliary model + engine in one process: the library's entry point for notebooks, the CLI,
benchmarks and evaluation. The server splits the same pieces across Ray Serve deployments."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
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
        return self.place(messages, self.thoughts(summary) if summary else None)

    def place(self, messages: Sequence[dict], thoughts: torch.Tensor | None) -> Prompt:
        """The chat prompt with `thoughts`, if any, placed and guided as the checkpoint says (`AuxConfig`)."""
        if thoughts is None:
            return build_chat_prompt(self.backbone.tokenizer, messages)
        return build_chat_prompt(self.backbone.tokenizer, messages, thoughts, placement=self.aux.placement,
                                 guided=self.aux.config.guidance != 1)

    def params(self, prompt: Prompt, params: SamplingParams | None = None) -> SamplingParams:
        """`params` with the checkpoint's guidance for a prompt that reads thoughts, as the server applies it."""
        params = params or SamplingParams()
        config = self.aux.config
        return replace(params, guidance=config.guidance, guidance_gate=config.guidance_gate) if prompt.num_thoughts else params

    def chat(self, messages: Sequence[dict], summary: str | None = None, params: SamplingParams | None = None) -> GenerationResult:
        prompt = self.prompt(messages, summary)
        return self.engine.generate([prompt], self.params(prompt, params))[0]

    def stream(self, messages: Sequence[dict], summary: str | None = None, params: SamplingParams | None = None) -> Iterator[StepOutput]:
        prompt = self.prompt(messages, summary)
        return self.engine.stream(prompt, self.params(prompt, params))
