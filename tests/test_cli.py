import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softthought.backbone import load_backbone

CLI = str(Path(sys.executable).parent / "softthought")


def run(*args, timeout=300):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_chat_prints_exactly_transformers_greedy_reply():
    question = "What is the capital of France?"
    proc = run("chat", "--max-tokens", "24", "--temperature", "0", question)
    assert proc.returncode == 0, proc.stderr
    bb = load_backbone(dtype="bfloat16")  # the CLI's default dtype
    ids = bb.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt")["input_ids"]
    out = bb.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    expected = bb.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert proc.stdout == expected + "\n"


@pytest.mark.slow
def test_chat_penalties_follow_openais_formula():
    question = "List the colours of the rainbow."
    proc = run("chat", "--max-tokens", "24", "--temperature", "0", "--presence-penalty", "-2", "--frequency-penalty", "-1",
               question)
    assert proc.returncode == 0, proc.stderr
    bb = load_backbone(dtype="bfloat16")
    ids = bb.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt")["input_ids"]
    reply = []
    with torch.inference_mode():  # greedy, logit -= count * frequency + (count > 0) * presence, on the reply's tokens
        for _ in range(24):
            logits = bb.model(torch.cat([ids, torch.tensor([reply], dtype=ids.dtype)], 1)).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(reply, dtype=torch.long), minlength=logits.numel())[: logits.numel()]
            token = int((logits + counts * 1.0 + (counts > 0) * 2.0).argmax())
            if token == bb.tokenizer.eos_token_id:
                break
            reply.append(token)
    expected = bb.tokenizer.decode(reply, skip_special_tokens=True)
    assert proc.stdout == expected + "\n"
    plain = run("chat", "--max-tokens", "24", "--temperature", "0", question)
    assert plain.stdout != proc.stdout  # the penalties changed the reply
    bad = run("chat", "--presence-penalty", "3", question)
    assert bad.returncode == 2 and "presence_penalty and frequency_penalty must be in [-2, 2]" in bad.stderr


@pytest.mark.slow
def test_aux_init_then_chat_with_summary(tmp_path):
    out = tmp_path / "aux"
    proc = run("aux-init", "--out", str(out), "--num-thoughts", "4", "--copy-thoughts", "2")
    assert proc.returncode == 0, proc.stderr
    assert "K=6" in proc.stderr and json.loads((out / "config.json").read_text())["copy_thoughts"] == 2
    assert (out / "model.safetensors").exists()
    proc = run("chat", "--aux", str(out), "--summary", "Answer in French.", "--max-tokens", "16", "--temperature", "0", "Hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_chat_with_corrupt_checkpoint_fails_cleanly(tmp_path, aux_dir):
    bad = tmp_path / "bad"
    shutil.copytree(aux_dir, bad)
    (bad / "model.safetensors").write_bytes(b"broken")
    proc = run("chat", "--aux", str(bad), "--summary", "x", "--max-tokens", "4", "Hello")
    assert proc.returncode == 2
    assert "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
