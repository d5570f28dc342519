import json
import shutil
from dataclasses import asdict

import pytest
import torch

from softthought.aux_model import SoftThoughtAux
from softthought.backbone import load_backbone
from train_aux.checks import check_all
from train_aux.data import read_jsonl, write_jsonl
from train_aux.eval import general, load_task, personalization
from train_aux.train import data_hash, edited_chars, load_config, preservation_loss, target_loss, train
from train_aux.users import make_users


@pytest.fixture()
def data_dir(tmp_path):
    write_jsonl(tmp_path / "train_users.jsonl", make_users(20, 0, "t", held_out_phrasing=False))
    answers = [{"prompt": f"Tell me about topic {i}.", "answer": "The quick brown fox jumps over the lazy dog. Hello there."}
               for i in range(10)]
    write_jsonl(tmp_path / "answers.jsonl", answers)
    return tmp_path


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


def test_personalization_and_general_eval_run_on_tiny_model(tiny, tmp_path):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=4).eval()
    users = make_users(3, 5, "e", held_out_phrasing=True)
    report = personalization(tiny, aux, users, ["Hello there.", "Tell me about the sea."], 1, 6, 0)
    for cond in ("none", "text", "soft"):
        assert 0 <= report[cond]["check_pass_rate"] <= 1 and report[cond]["n_responses"] == 3
    assert report["soft"]["mean_prompt_tokens"] != report["text"]["mean_prompt_tokens"]
    # paired on the same checks, the mean difference is exactly the difference of the rates
    for a, b in (("none", "soft"), ("text", "soft"), ("none", "text")):
        paired = report["paired"][f"{b}_minus_{a}"]
        assert paired["check_pass_rate"] == pytest.approx(report[b]["check_pass_rate"] - report[a]["check_pass_rate"])
        assert paired["all_pass_rate"] == pytest.approx(report[b]["all_pass_rate"] - report[a]["all_pass_rate"])
    result = general(tiny, aux, users, ["piqa"], 6, 0)
    assert result["piqa"]["n"] == 6 and "soft_minus_plain" in result["piqa"]
    assert set(result["piqa"]["soft_gold_margin"]) >= {"slope", "shift", "shift_se", "shift_pct"}
    # the plain backbone's per-choice scores are reused when given for the same items, and recomputed otherwise
    swapped = [s[::-1] for s in result["piqa"]["plain_loglik"]]  # the other choice wins every item
    reused = general(tiny, aux, users, ["piqa"], 6, 0, plain_loglik={"piqa": swapped})
    assert reused["piqa"]["plain_loglik"] == swapped and reused["piqa"]["soft"] == result["piqa"]["soft"]
    assert reused["piqa"]["plain"]["acc"] == pytest.approx(100 - result["piqa"]["plain"]["acc"])
    again = general(tiny, aux, users, ["piqa"], 6, 0, plain_loglik={"piqa": swapped[:5]})
    assert again["piqa"]["plain_loglik"] == result["piqa"]["plain_loglik"]
    # every item scored with all three users: the exact average over users, the same whatever the users' order
    every = general(tiny, aux, users, ["piqa"], 6, 0, users_per_item=3)
    rotated = general(tiny, aux, users[1:] + users[:1], ["piqa"], 6, 0, users_per_item=3)
    assert every["users_per_item"] == 3 and every["piqa"]["soft"] == rotated["piqa"]["soft"]
    with pytest.raises(ValueError, match="users_per_item"):
        general(tiny, aux, users, ["piqa"], 6, 0, users_per_item=4)
    alone = general(tiny, None, users, ["piqa"], 6, 0)  # no condition reads the users: none are recorded
    assert alone["conditions"] == [] and "n_users" not in alone and alone["piqa"]["plain"] == result["piqa"]["plain"]


def test_general_cli_pairs_another_backbone_with_an_earlier_result(tiny_dir, tmp_path, capsys):
    from train_aux.eval import main

    write_jsonl(tmp_path / "users.jsonl", make_users(2, 5, "e", held_out_phrasing=True))
    args = ["general", "--no-aux", "--backbone", tiny_dir, "--dtype", "float32", "--tasks", "piqa", "--n", "6",
            "--users", str(tmp_path / "users.jsonl")]
    main(args + ["--json", str(tmp_path / "base.json")])
    base = json.loads((tmp_path / "base.json").read_text())
    assert "plain_vs_paired_with" not in base["piqa"]
    # the reference's plain backbone prefers the other choice on every item (summed log-likelihood, acc): every item
    # the tiny model gets right is one the reference got wrong, and the other way round
    for s in base["piqa"]["plain_loglik"]:
        s.reverse()
    (tmp_path / "swapped.json").write_text(json.dumps(base))
    main(args + ["--json", str(tmp_path / "paired.json"), "--paired-with", str(tmp_path / "swapped.json")])
    paired = json.loads((tmp_path / "paired.json").read_text())["piqa"]
    right = paired["plain"]["acc"] / 100
    assert paired["plain_vs_paired_with"]["minus_plain"]["acc"]["diff"] == pytest.approx(100 * (2 * right - 1))
    assert set(paired["plain_vs_paired_with"]["gold_margin"]) >= {"slope", "shift", "shift_pct"}
    assert "plain_vs_paired_with" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the reference scored fewer items than asked for
        main(["general", "--no-aux", "--backbone", tiny_dir, "--tasks", "piqa", "--n", "7", "--users",
              str(tmp_path / "users.jsonl"), "--json", str(tmp_path / "x.json"), "--paired-with", str(tmp_path / "base.json")])
    assert "not scored on these items" in capsys.readouterr().err


def test_benchmark_tasks_load_with_gold_labels():
    for task, k in (("hellaswag", 4), ("arc_easy", None), ("piqa", 2)):
        items = load_task(task, 20, 0)
        assert len(items) == 20
        for item in items:
            assert 0 <= item["gold"] < len(item["choices"]) and all(c.startswith(" ") for c in item["choices"])
            assert k is None or len(item["choices"]) == k
        dev = load_task(task, 20, 0, skip=20)  # the dev split continues the same shuffle, disjoint from the first n
        assert load_task(task, 40, 0) == items + dev


def test_a_per_user_copy_learns_that_users_examples_with_no_summary_in_the_prompt(tmp_path, data_dir, tiny_dir, monkeypatch):
    import train_aux.finetune as ft

    user = read_jsonl(data_dir / "train_users.jsonl")[3]
    seen, real = [], ft.target_loss

    def spy(model, table, tok, prompts, targets, *args):
        seen.extend((tok.decode(p.token_ids), t) for p, t in zip(prompts, targets))
        return real(model, table, tok, prompts, targets, *args)

    monkeypatch.setattr(ft, "target_loss", spy)
    cfg = ft.FinetuneConfig("lora", steps=2, lr=1e-3, batch_size=3, max_target_tokens=16)
    out = ft.finetune(cfg, tmp_path / "one", data_dir, backbone_name=tiny_dir, user=user)
    assert json.loads((out / "finetune.json").read_text()) == {**ft.recipe(cfg, data_dir), "user": user["user"]}
    assert len(seen) == 6
    for prompt, target in seen:
        assert user["summary"] not in prompt  # the preference is to live in the weights, not in the prompt
        assert all(check_all(target, user["checks"]))  # every target was edited for this one user


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_baselines_train_a_copy_and_save_a_loadable_model(tmp_path, data_dir, tiny_dir, tiny, mode):
    from train_aux.finetune import FinetuneConfig, finetune, recipe

    cfg = FinetuneConfig(mode, steps=2, lr=1e-3, batch_size=2, max_target_tokens=16)
    out = finetune(cfg, tmp_path / mode, data_dir, backbone_name=tiny_dir)
    recorded = json.loads((out / "finetune.json").read_text())  # what a report compares before reusing the copy
    assert recorded == {**asdict(cfg), "data_hash": data_hash(data_dir)} == recipe(cfg, data_dir)
    regenerated = shutil.copytree(data_dir, tmp_path / "regenerated")
    (regenerated / "answers.jsonl").write_text((data_dir / "answers.jsonl").read_text()[::-1])
    assert recipe(cfg, regenerated) != recorded  # new data: the copy would be trained again
    tuned = load_backbone(str(out), dtype="float32")
    assert tuned.fingerprint != tiny.fingerprint  # the copy was trained
    assert load_backbone(tiny_dir, dtype="float32").fingerprint == tiny.fingerprint  # the original was not
