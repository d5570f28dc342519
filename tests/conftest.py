"""Shared fixtures: the real embedded backbone (fp32, so batched and single greedy decoding agree bit for
bit), the real embedded encoder, and a tiny random-init model of another family with another template."""

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


def make_tiny_model(directory) -> str:
    """A 2-layer Qwen2 with a freshly trained byte-level BPE tokenizer, saved as a plain HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

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
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory)


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
