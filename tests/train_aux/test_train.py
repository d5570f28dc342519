import json

import pytest
import torch

from softthought.aux_model import SoftThoughtAux
from train_aux.train import edited_chars, load_config, preservation_loss, target_loss, train


def test_training_moves_only_the_aux_and_logs_the_unchanged_fingerprint(tmp_path, data_dir, tiny_dir, tiny):
    cfg = load_config(None, dict(backbone=tiny_dir, dtype="float32", data_dir=str(data_dir), out=str(tmp_path / "run"),
                                 num_thoughts=4, steps=3, batch_size=2, save_every=2, log_every=1, edit_weight=4.0,
                                 probe_weight=0.5, preserve_weight=1.0, preserve_batch=2, preserve_tokens=16))
    final = train(cfg)
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    end = events[-1]
    assert end["event"] == "end" and end["backbone_fingerprint_before"] == end["backbone_fingerprint_after"] == tiny.fingerprint
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3]
    aux = SoftThoughtAux.from_pretrained(final, backbone=tiny)  # strict: the training-only probe was not saved
    assert aux.config.metadata["steps"] == 3 and aux.config.metadata["data_hash"]
    # resume: continuing to 5 steps starts from step 3's state (here with the KL on question-answer text instead)
    cfg5 = cfg.model_copy(update={"steps": 5, "preserve_texts": "qa"})
    train(cfg5, resume=True)
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    starts = [e for e in events if e.get("event") == "start"]
    assert starts[-1]["step"] == 3

    def recorded_phases():
        return SoftThoughtAux.from_pretrained(final, backbone=tiny).config.metadata["phases"]

    phases = recorded_phases()
    assert [(p["from_step"], p["train_config"]["preserve_texts"]) for p in phases] == [(0, "boolq"), (3, "qa")]
    # resuming with the same settings continues that phase; more steps make a new one
    train(cfg5, resume=True)
    phases = recorded_phases()
    assert [p["from_step"] for p in phases] == [0, 3]
    train(cfg5.model_copy(update={"steps": 6}), resume=True)
    phases = recorded_phases()
    assert [p["from_step"] for p in phases] == [0, 3, 5]
    # a further phase from the trained checkpoint's weights (fresh optimizer), the summary as the KL's teacher;
    # its steps count after the checkpoint's and resuming it keeps the count
    init = cfg5.model_copy(update={"steps": 2, "init": str(final), "out": str(tmp_path / "more"),
                                   "preserve_teacher": "text"})
    more = train(init)
    meta = SoftThoughtAux.from_pretrained(more, backbone=tiny).config.metadata
    assert meta["steps"] == 8 and meta["init_steps"] == 6
    assert [p["from_step"] for p in meta["phases"]] == [0, 3, 5, 6]
    assert meta["phases"][-1]["train_config"]["init"] == str(final)
    train(init.model_copy(update={"steps": 3}), resume=True)
    meta = SoftThoughtAux.from_pretrained(more, backbone=tiny).config.metadata
    assert meta["steps"] == 9 and [p["from_step"] for p in meta["phases"]] == [0, 3, 5, 6, 8]


def test_config_refuses_an_unknown_preservation_text():
    assert load_config(None, {"preserve_texts": "boolq+qa"}).preserve_texts == "boolq+qa"
    with pytest.raises(ValueError, match="preserve_texts"):
        load_config(None, {"preserve_texts": "wikipedia"})


def test_edited_chars_mark_what_the_edit_wrote():
    def marked(source, target):
        return "".join(c if f else "_" for c, f in zip(target, edited_chars(source, target)))

    assert marked("The sea is big.", "the sea is big.") == "t" + "_" * 14
    assert marked("Hi there.", "Hi there. Cheers!") == "_" * 9 + " Cheers!"
    assert marked("Red, blue.", "Red blue.") == "___" + " " + "_" * 5  # the token after a removed comma
    assert marked("Same.", "Same.") == "_____"


def test_edit_weight_moves_the_loss_toward_edited_tokens(tiny):
    from softthought.splice import build_chat_prompt

    table, tok = tiny.model.get_input_embeddings(), tiny.tokenizer
    prompts = [build_chat_prompt(tok, [{"role": "user", "content": "Hi"}])] * 2
    targets, sources = ["The sea. Cheers!", "A cat sat."], ["The sea.", "A cat sat."]
    with torch.no_grad():
        plain, n = target_loss(tiny.model, table, tok, prompts, targets, 32)
        same, _ = target_loss(tiny.model, table, tok, prompts, targets, 32, sources, edit_weight=1.0)
        heavy, _ = target_loss(tiny.model, table, tok, prompts, targets, 32, sources, edit_weight=50.0)
    assert torch.allclose(plain, same) and n > 0
    assert not torch.allclose(plain, heavy)


def test_preservation_loss_is_a_kl_that_only_the_thoughts_can_lower(tiny):
    table = tiny.model.get_input_embeddings()
    texts = [tiny.tokenizer("Passage: the sea is big.\nAnswer:")["input_ids"], tiny.tokenizer("A cat sat.")["input_ids"]]
    thoughts = (table.weight[:8].detach().clone().reshape(2, 4, -1) * 3).requires_grad_()
    loss = preservation_loss(tiny, thoughts, texts)
    loss.backward()
    assert loss.item() > 0 and thoughts.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.parameters())


def test_preservation_loss_with_a_text_teacher_is_zero_when_the_thoughts_are_that_text(tiny):
    table, tok = tiny.model.get_input_embeddings(), tiny.tokenizer
    texts = [tok("Question: why is the sea big?\nAnswer: water.")["input_ids"], tok("A cat sat.")["input_ids"]]
    prefixes = [tok("I like cats.\n\n")["input_ids"], tok("Be brief!\n\n")["input_ids"]]
    k = min(len(p) for p in prefixes)
    prefixes = [p[:k] for p in prefixes]
    with torch.no_grad():
        as_text = torch.stack([table(torch.tensor(p)) for p in prefixes])  # thoughts that are the prefix's embeddings
        assert preservation_loss(tiny, as_text, texts, prefixes).item() < 1e-5
        assert preservation_loss(tiny, as_text, texts).item() > 1e-3  # the plain backbone is another teacher
