import os
import subprocess
import sys

import pytest
import torch

from softthought.backbone import files_fingerprint, load_backbone, resolve_device, weights_fingerprint


def test_loaded_frozen(smollm, tiny):
    for bb in (smollm, tiny):
        assert not bb.model.training
        assert all(not p.requires_grad for p in bb.model.parameters())


def test_embedded_default_shape(smollm):
    assert smollm.hidden_size == 576
    assert sum(p.numel() for p in smollm.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert smollm.tokenizer.chat_template
    assert smollm.eos_token_ids == {smollm.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_fingerprint_stable_across_dtype_and_sensitive_to_weights(smollm, tiny, tiny_dir):
    bf16 = load_backbone(tiny_dir, dtype="bfloat16")
    assert bf16.fingerprint == tiny.fingerprint  # rounded to bf16 before hashing
    assert smollm.fingerprint != tiny.fingerprint
    model = load_backbone(tiny_dir, dtype="float32").model
    before = weights_fingerprint(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    assert weights_fingerprint(model) != before


def test_a_directorys_fingerprint_is_the_loaded_models_without_loading_it(tiny, tiny_dir, tmp_path):
    """What an engine that loads the weights itself (vLLM) reports: the same fingerprint, read tensor by tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    assert files_fingerprint(tiny_dir) == tiny.fingerprint
    renamed = shutil.copytree(tiny_dir, tmp_path / "renamed")
    weights = load_file(renamed / "model.safetensors")
    weights["renamed.weight"] = weights.pop("lm_head.weight")
    save_file(weights, renamed / "model.safetensors")
    with pytest.raises(ValueError, match="name no tensor 'lm_head.weight'"):
        files_fingerprint(renamed)


def test_unknown_dtype_refused(tiny_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_backbone(tiny_dir, dtype="float8")


@pytest.mark.slow
def test_two_processes_convert_embedded_model_at_once(tmp_path, smollm):
    """Both start with an empty cache; the lock makes one convert and the other reuse its result."""
    code = "from softthought.backbone import load_backbone; print(load_backbone(dtype='float32').fingerprint)"
    env = {**os.environ, "SOFTTHOUGHT_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [smollm.fingerprint, smollm.fingerprint]
    entries = sorted(p.name for p in (tmp_path / "backbones").iterdir())
    assert entries == [".convert.lock", "SmolLM2-135M-Instruct-fp32"]  # no temp dirs left behind


def test_resolve_device_takes_a_gpu_only_where_one_is_visible():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU is visible"):
            resolve_device("cuda:1")
