"""Shared fixtures: the real embedded backbone (fp32, so batched and single greedy decoding agree bit for
bit), the real embedded encoder, a tiny random-init model of another family with another template, and tiny sliding-window models."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from softthought.aux_model import SoftThoughtAux  # noqa: E402
from softthought.backbone import load_backbone  # noqa: E402

# Gemma-style template: no system role (exercises the marker's fallback into the first user turn),
# BOS written by the template itself, "model" as the assistant role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "Answer in French. Keep answers short. Use bullet points.",
    "What is the capital of France? Paris is the capital of France.",
    "Soft thoughts are continuous embeddings spliced into the prompt.",
] * 20


def tiny_tokenizer():
    """A freshly trained byte-level BPE tokenizer with a Gemma-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = GEMMA_TEMPLATE
    return fast


def save_tiny_model(directory, tokenizer, config_class=None, **config) -> str:
    """A 2-layer random-init causal LM (a Qwen2 unless `config_class` says otherwise) over `tokenizer`, saved as a
    plain HF directory."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config((config_class or Qwen2Config)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **config,
    ))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def make_tiny_model(directory) -> str:
    """A 2-layer Qwen2 with a freshly trained byte-level BPE tokenizer, saved as a plain HF directory."""
    return save_tiny_model(directory, tiny_tokenizer())


@pytest.fixture(scope="session")
def smollm():
    return load_backbone(dtype="float32")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load_backbone(tiny_dir, dtype="float32")


@pytest.fixture(scope="session")
def smollm_aux(smollm):
    torch.manual_seed(0)
    return SoftThoughtAux.for_backbone(smollm, num_thoughts=8).eval()


@pytest.fixture(scope="session")
def aux_dir(smollm_aux, tmp_path_factory):
    return smollm_aux.save_pretrained(tmp_path_factory.mktemp("aux"))


@pytest.fixture(scope="session")
def sliding(tiny_dir, tmp_path_factory):
    """A tiny Mistral whose attention sees only the last 8 positions, and the same weights with full attention."""
    from transformers import AutoTokenizer, MistralConfig

    def make(window):
        directory = tmp_path_factory.mktemp(f"tiny-mistral-{window}")
        save_tiny_model(directory, AutoTokenizer.from_pretrained(tiny_dir), MistralConfig, sliding_window=window)
        return load_backbone(str(directory), dtype="float32")
    return make(8), make(None)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/postgres_server.py)."""
    from softthought.server.process import free_port

    from .postgres_server import PostgresServer

    server = PostgresServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty store of each backend: the same test runs against both."""
    if request.param == "sqlite":
        return str(tmp_path / "prefs.db")
    return request.getfixturevalue("postgres").create_database(f"t_{abs(hash(request.node.nodeid)):x}")
