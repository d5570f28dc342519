import json
from dataclasses import asdict

import pytest

from train_aux import report
from train_aux.finetune import FinetuneConfig
from train_aux.report import TASKS, _fine_tuned, _plain_loglik, _run, plot, render

PAIRS = [[f"u{i // 2}", f"p{i}"] for i in range(160)]


def _pers(rate):
    passed = [[i < 160 * rate, True] if i % 2 else [i < 160 * rate] for i in range(160)]
    block = {"check_pass_rate": rate, "check_pass_rate_se": 0.02, "all_pass_rate": rate / 2, "all_pass_rate_se": 0.03,
             "n_checks": 300, "n_responses": 160, "mean_prompt_tokens": 40.0, "passed": passed,
             "per_instruction": {"change_case:english_lowercase": {"pass_rate": rate, "n": 50}}}
    return block


def _judged(**conditions):
    return {"pairs": PAIRS, **{c: _pers(r) for c, r in conditions.items()}}


def _gen(base, conditions=(), n=1000):
    out = {"n_users": 8, "seed": 0}
    for t in TASKS:
        entry = {"n": n, "plain": {"acc": base, "acc_se": 1.5, "acc_norm": base, "acc_norm_se": 1.5}}
        for c in conditions:
            entry[c] = {"acc": base - 0.5, "acc_se": 1.5, "acc_norm": base - 0.5, "acc_norm_se": 1.5}
            entry[f"{c}_minus_plain"] = {"acc": {"diff": -0.5, "diff_se": 0.4}, "acc_norm": {"diff": -0.5, "diff_se": 0.4}}
            entry[f"{c}_gold_margin"] = {"plain_margin": 0.16, "slope": 0.94 if c == "soft" else 0.9, "shift": -0.0004,
                                         "shift_se": 0.0027, "shift_pct": -0.25, "shift_pct_se": 1.69}
        out[t] = entry
    return out


IFEVAL_PAIRS = [[f"k{i}", f"u{i}"] for i in range(10)]


def _ifeval(passed, **conditions):
    return {"n": 10, "max_new_tokens": 192, "pairs": IFEVAL_PAIRS, **conditions,
            "none": {"prompt_level_strict": sum(passed) / 10, "instruction_level_strict": 0.5, "passed": passed}}


def _paired(diff):
    margin = {"plain_margin": 0.16, "slope": 0.8, "shift": -0.01, "shift_se": 0.002, "shift_pct": -6.25, "shift_pct_se": 1.25}
    return {t: {"minus_plain": {"acc": {"diff": diff, "diff_se": 1.1}, "acc_norm": {"diff": diff, "diff_se": 1.1}},
                "gold_margin": margin} for t in TASKS}


def test_render_and_plot(tmp_path):
    res = {
        "aux_meta": {"version": "abc", "num_thoughts": 8, "steps": 610, "data_hash": "d", "backbone_fingerprint": "f",
                     "train_config": {"edit_weight": 5.0, "probe_weight": 0.5, "preserve_weight": 2.0, "preserve_texts": "qa"},
                     "phases": [{"from_step": 0, "train_config": {"preserve_weight": 0.0, "probe_weight": 0.5}},
                                {"from_step": 400, "train_config": {"preserve_weight": 2.0, "probe_weight": 0.5}},
                                {"from_step": 550, "train_config": {"edit_weight": 5.0, "probe_weight": 0.5,
                                                                    "preserve_weight": 2.0, "preserve_texts": "qa"}}]},
        "pers": {"n_users": 80, "n_pairs": 160, "max_new_tokens": 128, **_judged(none=0.05, text=0.1, soft=0.5)},
        "gen": _gen(45.0, ["soft"]), "gen_text": _gen(45.0, ["text"]),
        "pers_lora": _judged(text=0.4), "gen_lora": _gen(40.0, n=300), "gen_lora_paired": _paired(-2.5),
        "pers_full": _judged(text=0.45), "gen_full": _gen(38.0, n=300), "gen_full_paired": _paired(-4.0),
        "ft_lora": asdict(FinetuneConfig("lora", 100, 2e-4)), "ft_full": asdict(FinetuneConfig("full", 80, 2e-5)),
        "pers_ifeval": {"n_users": 80, **_judged(none=0.05, text=0.2, soft=0.4)},
        "pers_zero_shot": {"n_users": 80, **_judged(none=0.05, text=0.5, soft=0.3)},
        "ifeval": _ifeval([1] * 5 + [0] * 5, soft={"prompt_level_strict": 0.4, "instruction_level_strict": 0.45},
                          soft_minus_none={"diff": -10.0, "diff_se": 10.0}),
        "ifeval_lora": _ifeval([1] * 4 + [0] * 6), "ifeval_full": _ifeval([1] * 6 + [0] * 4), "dev_split": True,
    }
    md = render(res)
    # (b) and (c) against text and none, paired as (a); per type on both
    assert "| (b) phrased from the held-out IFEval sentences | 80 | 300 | 5.0 | 20.0 | 40.0 | +" in md
    assert "| (c) preference types held out of training | 80 | 300 | 5.0 | 50.0 | 30.0 | -" in md
    # how often replies repeat their prompt's words, where the results recorded it
    assert md.count("| not measured |") == 3
    for c, rate in (("none", 0.825), ("text", 0.719), ("soft", 0.287)):
        res["pers"][c]["on_topic_rate"] = rate
    assert render(res).count("| not measured |") == 2 and "| 82.5 / 71.9 / 28.7 |" in render(res)
    assert "| `change_case:english_lowercase` | 50 | 20 | 40 | 50 | 50 | 30 |" in md
    # IFEval: each fine-tuned copy paired prompt by prompt with the plain backbone
    assert "| frozen backbone + soft thoughts | 40.0 | 45.0 | -10.0 ± 10.0 |" in md
    assert "| LoRA fine-tuned backbone | 40.0 | 50.0 | -10.0 ± 10.0 |" in md and "| fully fine-tuned backbone | 60.0 | 50.0 | +10.0" in md
    assert "The checkpoint was chosen on the dev split only" in md and "No set reported here was read to choose it." in md
    # the hand-written users: their own row and type columns, and named as read in choosing
    res["pers_hand"] = {"n_users": 24, **_judged(none=0.0, text=0.25, soft=0.7)}
    md_hand = render(res)
    assert "| (e) written by hand outside the generator | 24 | 300 | 0.0 | 25.0 | 70.0 | +" in md_hand
    assert "| (e) n | (e) text | (e) soft |" in md_hand and "save (e): the hand-written users' figures" in md_hand
    assert "chosen on the dev split: " in md_hand and "dev split only" not in md_hand
    del res["pers_hand"]
    assert "| frozen backbone + soft thoughts (softthought) | 50.0 ± 2.0 (n=300)" in md
    assert ("Training (3 phases): cross-entropy on the backbone's own answers edited to satisfy each user's checks, the "
            "tokens the edit changed weighted x5, plus a preference probe on the thoughts (weight 0.5 in steps 0-610), "
            "plus KL(plain backbone || backbone after the thoughts) on BoolQ passages (weight 2) in steps 400-550 and on "
            "question-answer text built from the training prompts and the backbone's own answers (weight 2) in steps "
            "550-610.") in md
    assert ("LoRA (r=16 on every projection) 100 steps at lr 0.0002, full fine-tuning 80 steps at lr 2e-05, batch 8, "
            "float32.") in md
    # soft passes the first check of responses 0-79, text of 0-15, LoRA of 0-63: 64 and 16 more of the 240 checks
    assert "| summary as text | +26.7 ± " in md and "| LoRA fine-tuned backbone + text | +6.7 ± " in md
    # an end of turn weighed apart from the edit is named
    meta = res["aux_meta"]
    res["aux_meta"] = {**meta, "steps": 700, "phases": meta["phases"] + [
        {"from_step": 610, "train_config": {**meta["phases"][-1]["train_config"], "end_weight": 1.0}}]}
    assert "the tokens the edit changed weighted x5, the end of turn x1, plus a preference probe" in render(res)
    res["aux_meta"] = meta
    # a further phase whose KL teacher reads the summary names that teacher
    meta = res["aux_meta"]
    phases = meta["phases"]
    res["aux_meta"] = {**meta, "steps": 710, "phases": phases + [
        {"from_step": 610, "train_config": {**phases[-1]["train_config"], "preserve_teacher": "text"}}]}
    assert ("(weight 2) in steps 550-610 and KL(backbone reading the summary as text || backbone after the thoughts) on "
            "question-answer text built from the training prompts and the backbone's own answers (weight 2) in steps "
            "610-710.") in render(res)
    # phases on other data, copy thoughts, an unlikelihood term, and the guidance the checkpoint is served with
    last = phases[-1]["train_config"]
    res["aux_meta"] = {**meta, "steps": 900, "guidance": 2.0, "guidance_gate": 0.19, "phases": phases + [
        {"from_step": 610, "train_config": {**last, "data_dir": "train_aux/data-broad", "copy_thoughts": 8}},
        {"from_step": 800, "train_config": {**last, "data_dir": "train_aux/data-broad", "rollout_weight": 2.0}}]}
    md_broad = render(res)
    assert ("Data: `data` in steps 0-610, then `data-broad` in steps 610-900. From step 610 on, 8 further thoughts are "
            "mixed from the backbone's own embeddings") in md_broad
    assert "In steps 800-900, an unlikelihood term (weight 2) on every token" in md_broad
    # phases with the same KL are described once, over the steps they span together
    assert "backbone's own answers (weight 2) in steps 550-900." in md_broad and md_broad.count("in steps 610-") == 1
    assert ("Served with guidance 2: logits = plain + 2 x (with thoughts - plain) where KL(with thoughts || plain) "
            "exceeds 0.19 nats, the plain logits elsewhere.") in md_broad
    # language phases train only their offsets, then only the head; the probe is named where it was on
    res["aux_meta"] = {**meta, "steps": 1100, "phases": phases + [
        {"from_step": 610, "train_config": {**last, "trains": "languages", "probe_weight": 0.0}},
        {"from_step": 800, "train_config": {**last, "trains": "language_head", "probe_weight": 0.0,
                                            "language_reader_layers": 20}},
        {"from_step": 1000, "train_config": {**last, "trains": "languages", "add_cases": True, "probe_weight": 0.0}}]}
    md_lang = render(res)
    assert "a preference probe on the thoughts (weight 0.5 in steps 0-610)" in md_lang
    assert ("In steps 610-800, only an offset per response language is trained (each example adds its own language's). "
            "In steps 800-1000, only the head that picks a summary's language (or case) offset is trained, reading the summary "
            "through the frozen backbone's first 20 layers.") in md_lang
    assert ("In steps 1000-1100, an offset per case (capitals, lowercase) is added, and only the offsets of the languages "
            "and the cases are trained (each example adds its own).") in md_lang
    assert "own answers (weight 2) in steps 550-800 and 1000-1100." in md_lang  # the head alone runs no backbone: no KL
    res["aux_meta"] = meta
    res["ifeval_full"] = {**res["ifeval_full"], "pairs": IFEVAL_PAIRS[::-1]}
    with pytest.raises(ValueError, match="IFEval, full: answered other"):
        render(res)
    res["ifeval_full"]["pairs"] = IFEVAL_PAIRS
    # a checkpoint without the phases metadata is described by its one recorded config
    del res["aux_meta"]["phases"]
    assert "Training (1 phase): " in render(res) and "(weight 2) in steps 0-610." in render(res)
    assert "| soft thoughts | shift -0.2 ± 1.7 %, slope 0.94 |" in md and "| summary as text | shift -0.2 ± 1.7 %, slope 0.90 |" in md
    assert "| soft thoughts (paired) | -0.50 ± 0.40" in md and "| summary as text (paired) | -0.50 ± 0.40" in md
    assert "| LoRA fine-tuned (paired, n=300) | -2.50 ± 1.10 | -2.50 ± 1.10 | -2.50 ± 1.10 | -2.50 |" in md
    assert "| fully fine-tuned | shift -6.2 ± 1.2 %, slope 0.80 |" in md
    res["pers_full"]["pairs"] = PAIRS[::-1]
    with pytest.raises(ValueError, match="other \\(user, prompt\\) pairs"):
        render(res)
    res["pers_full"]["pairs"] = PAIRS
    del res["gen_text"]  # --no-general-text: the text condition was not scored and has no rows
    md = render(res)
    assert "summary as text (paired)" not in md and "| summary as text | shift" not in md and "| not run |" in md
    plot(res, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_cached_results_are_rerun_for_another_checkpoint(tmp_path):
    calls = []

    def evaluate():
        calls.append(1)
        return {"score": len(calls)}

    path = tmp_path / "r.json"
    assert _run(path, False, evaluate, "v1")["score"] == 1
    assert _run(path, False, evaluate, "v1")["score"] == 1  # cached
    assert _run(path, False, evaluate, "v2") == {"score": 2, "aux_version": "v2"}  # another aux: scored again
    assert _run(path, True, evaluate, "v2")["score"] == 3  # --rerun
    assert _run(path, False, evaluate, "v2", users_per_item=4)["score"] == 4  # scored with other settings


def test_a_fine_tuned_copy_is_trained_and_loaded_only_when_an_evaluation_of_it_must_run(tmp_path, monkeypatch):
    trained, loaded = [], []

    def finetune(cfg, out, data):
        trained.append(cfg.steps)
        out.mkdir(parents=True, exist_ok=True)
        (out / "finetune.json").write_text(json.dumps({**asdict(cfg), "data_hash": "d"}))

    monkeypatch.setattr(report, "finetune", finetune)
    monkeypatch.setattr(report, "load_backbone", lambda path, dtype: loaded.append(path) or f"copy in {path}")
    cfg = FinetuneConfig("lora", 100, 2e-4)
    asked = {**asdict(cfg), "data_hash": "d"}
    path = tmp_path / "general_lora.json"
    path.write_text(json.dumps({"score": 1, "recipe": asked, "aux_version": None}))
    ft = _fine_tuned(tmp_path / "ft-lora", cfg, tmp_path, asked)
    assert _run(path, False, lambda: {"score": ft()}, recipe=asked)["score"] == 1  # its evaluation is cached
    assert trained == [] and loaded == []
    other = FinetuneConfig("lora", 200, 2e-4)
    other_recipe = {**asdict(other), "data_hash": "d"}
    ft = _fine_tuned(tmp_path / "ft-lora", other, tmp_path, other_recipe)
    for _ in range(2):  # another recipe: trained once, loaded once, both evaluations run
        assert _run(path, False, lambda ft=ft: {"score": ft()}, recipe=other_recipe)["recipe"] == other_recipe
        path.write_text(json.dumps({"score": 1, "recipe": asked, "aux_version": None}))
    assert trained == [200] and len(loaded) == 1
    ft = _fine_tuned(tmp_path / "ft-lora", other, tmp_path, other_recipe)
    assert _run(path, True, lambda: {"score": ft()}, recipe=other_recipe)["score"] == f"copy in {tmp_path / 'ft-lora'}"
    assert trained == [200]  # the copy on disk holds that recipe: loaded, not trained again


def test_plain_scores_are_reused_only_for_the_same_backbone_items_seed_and_scoring(tmp_path):
    gen = _gen(45.0, ["soft"])
    gen["backbone_fingerprint"] = "fp"
    for t in TASKS:
        gen[t]["plain_loglik"] = [[-1.0, -2.0]] * 1000
    gen["piqa"]["n"] = 500  # scored on fewer items: not reusable for n=1000
    path = tmp_path / "general.json"
    assert _plain_loglik(path, "fp", 1000, 0) is None  # nothing yet
    path.write_text(json.dumps(gen))
    assert set(_plain_loglik(path, "fp", 1000, 0)) == set(TASKS) - {"piqa"}
    assert _plain_loglik(path, "other", 1000, 0) is None and _plain_loglik(path, "fp", 1000, 1) is None
    path.write_text(json.dumps({**gen, "skip": 1000}))  # a dev split's items are not the report's
    assert _plain_loglik(path, "fp", 1000, 0) is None
    path.write_text(json.dumps({**gen, "scoring": "shared-context"}))  # its bf16 scores are not the report's either
    assert _plain_loglik(path, "fp", 1000, 0) is None
    path.write_text(json.dumps({**gen, "scoring": "per-choice"}))
    assert set(_plain_loglik(path, "fp", 1000, 0)) == set(TASKS) - {"piqa"}
