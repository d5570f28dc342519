import json
import random

import pytest
import torch

from softthought.aux_model import SoftThoughtAux
from softthought.generation import SamplingParams
from softthought.splice import OPENING, Placement, build_chat_prompt
from train_aux import eval as eval_module
from train_aux.data import write_jsonl
from train_aux.eval import (
    against_plain,
    correctness,
    general,
    generate_replies,
    gold_margin_shift,
    instruction_following,
    load_task,
    loglikelihoods,
    paired_checks,
    personalization,
)
from train_aux.users import make_users

#: Thoughts opening the text, the same hidden from it, and after it.
PLACEMENTS = (OPENING, Placement(reply_only=True), Placement(at_end=True))


def _items(n=300, seed=0):
    rng = random.Random(seed)
    items, plain = [], []
    for _ in range(n):
        choices = [" " + "x" * rng.randint(3, 30) for _ in range(4)]
        items.append({"choices": choices, "gold": rng.randrange(4)})
        plain.append([-rng.uniform(0.5, 3.0) * len(c) for c in choices])  # per-byte scores in [-3, -0.5]
    return items, plain


def _per_byte_edit(items, scores, edit):
    """Log-likelihoods whose per-byte values are edit(item, per-byte values)."""
    out = []
    for item, s in zip(items, scores):
        norm = edit(item, [x / len(c) for x, c in zip(s, item["choices"])])
        out.append([v * len(c) for v, c in zip(norm, item["choices"])])
    return out


def test_correctness_ranks_by_sum_and_by_byte():
    item = {"choices": [" a", " bbbbbbbbb"], "gold": 1}
    assert correctness([item], [[-2.0, -5.0]]) == [(0, 1)]  # the long choice loses on the sum, wins per byte


def test_gold_margin_shift_separates_a_systematic_loss_from_rescaling_and_noise():
    items, plain = _items()
    # every margin shrunk by a fifth about each item's mean: slope 0.8, no shift, no item changes its acc_norm answer
    shrunk = _per_byte_edit(items, plain, lambda item, v: [sum(v) / 4 + 0.8 * (x - sum(v) / 4) for x in v])
    m = gold_margin_shift(items, plain, [shrunk])
    assert m["slope"] == pytest.approx(0.8) and m["shift"] == pytest.approx(0.0, abs=1e-9)
    assert [r[1] for r in correctness(items, shrunk)] == [r[1] for r in correctness(items, plain)]
    # the right answer loses 0.05 nats per byte on every item: a shift of exactly -0.05
    lowered = _per_byte_edit(items, plain, lambda item, v: [x - 0.05 * (i == item["gold"]) for i, x in enumerate(v)])
    m = gold_margin_shift(items, plain, [lowered])
    assert m["shift"] == pytest.approx(-0.05) and m["slope"] == pytest.approx(1.0)
    assert m["shift_pct"] == pytest.approx(100 * -0.05 / abs(m["plain_margin"]))
    # user rounds are averaged per item: one round lowered by 0.1, one untouched
    lowered2 = _per_byte_edit(items, plain, lambda item, v: [x - 0.1 * (i == item["gold"]) for i, x in enumerate(v)])
    assert gold_margin_shift(items, plain, [lowered2, plain])["shift"] == pytest.approx(-0.05)
    # a plain backbone that prefers a wrong choice on average: the percentage keeps the shift's sign
    worst = [{**item, "gold": min(range(4), key=[x / len(c) for x, c in zip(s, item["choices"])].__getitem__)}
             for item, s in zip(items, plain)]
    m = gold_margin_shift(worst, plain, [_per_byte_edit(worst, plain, lambda item, v: [
        x - 0.05 * (i == item["gold"]) for i, x in enumerate(v)])])
    assert m["plain_margin"] < 0 and m["shift_pct"] < 0 < m["shift_pct_se"]
    # noise that ignores which choice is right: the shift stays within its standard error's reach of 0
    rng = random.Random(1)
    noisy = _per_byte_edit(items, plain, lambda item, v: [x + rng.gauss(0, 0.2) for x in v])
    m = gold_margin_shift(items, plain, [noisy])
    assert abs(m["shift"]) < 3 * m["shift_se"] and 0 < m["shift_se"] < 0.05


def test_against_plain_pairs_each_item_with_itself():
    items, plain = _items(200)
    # the gold choice made certain on the first 50 items: exactly those the plain backbone got wrong turn right
    boosted = _per_byte_edit(items[:50], plain[:50], lambda item, v: [0.0 if i == item["gold"] else x for i, x in enumerate(v)])
    wrong = sum(1 - r[1] for r in correctness(items[:50], plain[:50]))
    accs, minus, margin = against_plain(items, plain, [boosted + plain[50:]])
    assert minus["acc_norm"]["diff"] == pytest.approx(100 * wrong / 200) and minus["acc_norm"]["diff_se"] > 0
    assert accs["acc_norm"] == pytest.approx(100 * sum(r[1] for r in correctness(items, plain)) / 200 + 100 * wrong / 200)
    assert margin["shift"] > 0
    # itself: no change, no standard error; two rounds are averaged per item (one right, one as plain: half the gain)
    assert against_plain(items, plain, [plain])[1]["acc_norm"] == {"diff": 0.0, "diff_se": 0.0}
    assert against_plain(items, plain, [boosted + plain[50:], plain])[1]["acc_norm"]["diff"] == pytest.approx(50 * wrong / 200)


def _judged(n_users=20, checks=3, rate=0.3, seed=0):
    rng = random.Random(seed)
    pairs = [[f"u{u}", f"p{k}"] for u in range(n_users) for k in range(2)]
    return pairs, [[rng.random() < rate for _ in range(checks)] for _ in pairs]


def test_paired_checks_differences_and_clustered_errors():
    pairs, a = _judged()
    same = paired_checks(a, a, pairs)
    assert same["check_pass_rate"] == 0 and same["check_pass_rate_se"] == 0 and same["all_pass_rate_se"] == 0
    assert same["n_checks"] == 120 and same["n_users"] == 20
    # b passes everything for the first 5 users' responses: exactly the checks a failed there are gained
    b = [[True] * len(x) if user in {f"u{i}" for i in range(5)} else x for (user, _), x in zip(pairs, a)]
    gained = sum(not ok for (user, _), x in zip(pairs, a) if user in {f"u{i}" for i in range(5)} for ok in x)
    m = paired_checks(a, b, pairs)
    assert m["check_pass_rate"] == pytest.approx(gained / 120) and m["check_pass_rate_se"] > 0
    assert paired_checks(b, a, pairs)["check_pass_rate"] == pytest.approx(-gained / 120)
    # the gain sits in a few users: clustering by user gives a larger error than treating the 40 responses as users
    per_response = paired_checks(a, b, [[f"{u}/{q}", q] for u, q in pairs])
    assert m["check_pass_rate_se"] > per_response["check_pass_rate_se"]
    with pytest.raises(ValueError, match="same pairs"):
        paired_checks(a, b[:-1], pairs)


def test_personalization_and_general_eval_run_on_tiny_model(tiny, tmp_path):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=4).eval()
    users = make_users(3, 5, "e", held_out_phrasing=True)
    report = personalization(tiny, aux, users, ["Hello there.", "Tell me about the sea."], 1, 6, 0)
    for cond in ("none", "text", "soft"):
        assert 0 <= report[cond]["check_pass_rate"] <= 1 and report[cond]["n_responses"] == 3
        assert 0 <= report[cond]["degenerate_rate"] <= 1 and len(report[cond]["degenerate"]) == 3
        assert report[cond]["sound_check_pass_rate"] <= report[cond]["check_pass_rate"]
        assert 0 <= report[cond]["on_topic_rate"] <= 1 and len(report[cond]["on_topic"]) == 3
        assert report[cond]["on_topic_check_pass_rate"] <= report[cond]["sound_check_pass_rate"]
    assert report["soft"]["mean_prompt_tokens"] != report["text"]["mean_prompt_tokens"]
    # paired on the same checks, the mean difference is exactly the difference of the rates
    for a, b in (("none", "soft"), ("text", "soft"), ("none", "text")):
        paired = report["paired"][f"{b}_minus_{a}"]
        assert paired["check_pass_rate"] == pytest.approx(report[b]["check_pass_rate"] - report[a]["check_pass_rate"])
        assert paired["all_pass_rate"] == pytest.approx(report[b]["all_pass_rate"] - report[a]["all_pass_rate"])
    # another aux keeps the replies that read no thoughts when they answered the same pairs, and writes its own
    other = SoftThoughtAux.for_backbone(tiny, num_thoughts=2).eval()
    with torch.no_grad():
        other.queries.mul_(50)
    kept = personalization(tiny, other, users, ["Hello there.", "Tell me about the sea."], 1, 6, 0, reuse=report)
    assert kept["none"] is report["none"] and kept["text"] is report["text"]
    fresh = personalization(tiny, other, users, ["Hello there.", "Tell me about the sea."], 1, 6, 0)
    assert kept["soft"]["passed"] == fresh["soft"]["passed"] and kept["paired"] == fresh["paired"]
    moved = personalization(tiny, other, users, ["Hello there.", "Tell me about the sea."], 1, 7, 0, reuse=report)
    assert moved["text"] is not report["text"]  # other replies (another length): generated again
    # a client's penalties on every condition: recorded, and replies without them are not reused
    penalized = personalization(tiny, other, users, ["Hello there.", "Tell me about the sea."], 1, 6, 0, reuse=report,
                                penalties={"frequency_penalty": 2.0, "presence_penalty": 2.0})
    assert penalized["penalties"] == {"frequency_penalty": 2.0, "presence_penalty": 2.0} and "penalties" not in report
    assert penalized["none"] is not report["none"]
    assert [s["response"] for s in penalized["samples"]] != [s["response"] for s in fresh["samples"]]
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
    with pytest.raises(SystemExit):  # scored the other way, whose bf16 scores differ: like is paired with like only
        main(args + ["--shared-context", "--json", str(tmp_path / "y.json"), "--paired-with", str(tmp_path / "base.json")])
    assert "scored per-choice" in capsys.readouterr().err
    main(args + ["--shared-context", "--json", str(tmp_path / "shared.json")])
    shared = json.loads((tmp_path / "shared.json").read_text())
    assert (base["scoring"], shared["scoring"]) == ("per-choice", "shared-context")
    main(args + ["--json", str(tmp_path / "again.json"), "--paired-with", str(tmp_path / "base.json")])  # like with like


def test_scoring_bench_times_both_ways_on_the_same_items(tiny_dir, tmp_path):
    from train_aux.eval import main

    write_jsonl(tmp_path / "users.jsonl", make_users(2, 5, "e", held_out_phrasing=True))
    main(["scoring-bench", "--no-aux", "--backbone", tiny_dir, "--dtype", "float32", "--tasks", "piqa,arc_easy", "--n", "5",
          "--users", str(tmp_path / "users.jsonl"), "--json", str(tmp_path / "bench.json")])
    bench = json.loads((tmp_path / "bench.json").read_text())
    for task in ("piqa", "arc_easy"):
        assert set(bench[task]["seconds"]) == {"per-choice", "shared-context"} and bench[task]["speedup"] > 0
        assert bench[task]["max_abs_diff"] <= 2e-4 and bench[task]["acc_norm_differs"] == 0  # fp32: the same scores


def test_benchmark_tasks_load_with_gold_labels():
    for task, k in (("hellaswag", 4), ("arc_easy", None), ("piqa", 2)):
        items = load_task(task, 20, 0)
        assert len(items) == 20
        for item in items:
            assert 0 <= item["gold"] < len(item["choices"]) and all(c.startswith(" ") for c in item["choices"])
            assert k is None or len(item["choices"]) == k
        dev = load_task(task, 20, 0, skip=20)  # the dev split continues the same shuffle, disjoint from the first n
        assert load_task(task, 40, 0) == items + dev


def test_shared_context_scores_are_the_per_choice_scores(tiny):
    from train_aux.eval import score_task

    torch.manual_seed(0)
    words = ["the", "sea", "is", "calm", "tonight", "and", "every", "boat", "is", "home", "before", "dark"]
    items = [{"context": " ".join(words[: 3 + i]) + ":", "gold": 0,
              "choices": [" " + " ".join(words[j : j + 1 + (i + j) % 5]) for j in range(2 + i % 3)]} for i in range(7)]
    thoughts = torch.randn(3, tiny.model.config.hidden_size) * 0.5
    for prefixes in ([None] * 7, [thoughts] * 7, ["I like short answers."] * 7, [None, thoughts] * 3 + ["terse"]):
        for placement in PLACEMENTS:
            alone = score_task(tiny, items, prefixes, "test", placement=placement)
            shared = score_task(tiny, items, prefixes, "test", shared_context=True, placement=placement)
            # a continuation that saw another, or was numbered after it, would score differently
            assert [len(s) for s in shared] == [len(item["choices"]) for item in items]
            assert all(a == pytest.approx(b, abs=2e-4) for a, b in zip(shared, alone))
    seen, hidden, end = (score_task(tiny, items, [thoughts] * 7, "test", placement=p) for p in PLACEMENTS)
    assert seen != hidden != end != seen


def test_scoring_is_the_training_loss_of_the_same_text(tiny):
    """Eval's per-choice and training's cross-entropy place the thoughts and hide them from the same positions."""
    from softthought.splice import build_text_prompt
    from train_aux.train import target_loss

    tok = tiny.tokenizer
    thoughts = torch.randn(2, 3, tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    contexts, replies = ["The sea is calm tonight and", "Paris:"], [" every boat is home.", " the capital of France."]
    end = tok.convert_tokens_to_ids(tok.eos_token)
    for placement in PLACEMENTS:
        prompts = [build_text_prompt(tok, c, th, placement=placement) for c, th in zip(contexts, thoughts)]
        conts = [tok(r, add_special_tokens=False)["input_ids"] + [end] for r in replies]
        with torch.no_grad():  # both in one batch: the shorter row is padded
            loss, n = target_loss(tiny.model, tiny.model.get_input_embeddings(), tok, prompts, replies, 64)
        logp = loglikelihoods(tiny, [(p.token_ids, c, th) for p, c, th in zip(prompts, conts, thoughts)], placement=placement)
        assert n == sum(map(len, conts)) and loss.item() == pytest.approx(-sum(logp) / n, abs=1e-4)


def test_shared_context_refuses_rows_past_a_sliding_window(sliding):
    from train_aux.eval import score_task

    windowed, _ = sliding
    items = [{"context": "a long context that runs past eight positions for sure", "choices": [" yes", " no"], "gold": 0}]
    with pytest.raises(ValueError, match="sliding window"):
        score_task(windowed, items, [None], "test", shared_context=True)


def _user(*kinds):
    from train_aux.users import KINDS

    rng = random.Random(0)
    return {"user": "-".join(kinds), "kinds": list(kinds), "summary": " and ".join(kinds),
            "checks": [{"instruction_id": KINDS[k].instruction_id, "kwargs": KINDS[k].sample(rng)} for k in kinds]}


def test_a_user_fits_an_ifeval_prompt_only_where_both_can_hold():
    from train_aux.eval import fits

    caps = {"instruction_id_list": ["change_case:english_capital"], "kwargs": [{}]}
    repeat = {"instruction_id_list": ["combination:repeat_prompt"], "kwargs": [{"prompt_to_repeat": "x"}]}
    assert fits(_user("title", "no_comma"), caps)
    assert not fits(_user("lowercase"), caps)  # a conflicting preference
    assert not fits(_user("capital"), caps)  # the same instruction, maybe with other kwargs
    assert not fits(_user("json"), caps) and not fits(_user("language"), caps)  # they take over the whole reply
    assert fits(_user("keywords", "placeholders"), repeat) and not fits(_user("title"), repeat)


def test_instruction_following_pairs_plain_and_thoughts_on_held_out_prompts(tiny, tmp_path):
    from train_aux.eval import fits, ifeval_items

    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=4).eval()
    users = [_user("no_comma"), _user("title", "keywords"), _user("placeholders")]
    report = instruction_following(tiny, aux, users, n=6, max_new_tokens=6, seed=0)
    assert report["n"] == 6 == len(report["pairs"])
    by_user = {u["user"]: u for u in users}
    items = {item["key"]: item for item in ifeval_items("eval")}
    assert all(fits(by_user[user], items[key]) for key, user in report["pairs"])  # held-out keys, fitting users only
    for cond in ("none", "soft"):
        assert report[cond]["prompt_level_strict"] == sum(report[cond]["passed"]) / 6
    diff = sum(report["soft"]["passed"]) - sum(report["none"]["passed"])
    assert report["soft_minus_none"]["diff"] == pytest.approx(100 * diff / 6)
    # without an aux (a fine-tuned copy is scored so): the same prompts, the plain replies only
    plain = instruction_following(tiny, None, users, n=6, max_new_tokens=6, seed=0)
    assert plain["pairs"] == report["pairs"] and plain["none"] == report["none"]
    assert "soft" not in plain and "soft_minus_none" not in plain
    # another aux keeps the plain replies of the same prompts, and only those
    marked = {**report, "none": {**report["none"], "prompt_level_strict": -1.0}}  # which none the result took
    kept = instruction_following(tiny, aux, users, n=6, max_new_tokens=6, seed=0, reuse=marked)
    assert kept["none"]["prompt_level_strict"] == -1.0 and kept["soft"] == report["soft"]
    other = instruction_following(tiny, aux, users, n=6, max_new_tokens=5, seed=0, reuse=marked)
    assert other["none"]["prompt_level_strict"] >= 0


def test_personalization_guidance_zero_writes_the_plain_backbones_replies(tiny, monkeypatch):
    """logits = plain + 0 * (with thoughts - plain): the soft replies are then the plain prompt's, token for token.
    The checkpoint's own guidance is the default, as the server reads it."""
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=4).eval()
    aux.config.guidance = 0.0
    users = make_users(3, 5, "e", held_out_phrasing=True)
    report = personalization(tiny, aux, users, ["Hello there.", "Tell me about the sea."], 1, 6, 0,
                             conditions=("soft",))
    assert report["guidance"] == 0.0 and report["guidance_gate"] == 0.0
    assert instruction_following(tiny, aux, users, n=2, max_new_tokens=4, seed=0)["guidance"] == 0.0
    assert personalization(tiny, aux, users[:1], ["Hi."], 1, 2, 0, conditions=("soft",), guidance=1.5)["guidance"] == 1.5
    monkeypatch.setattr(eval_module, "SAMPLE_PAIRS", 2)  # fewer than the 3 pairs: the cap is per condition
    both = personalization(tiny, aux, users, ["Hello there.", "Tell me about the sea."], 1, 2, 0, conditions=("text", "soft"))
    # the same first pairs' replies in each condition shown, side by side
    assert [(s["user"], s["prompt"]) for s in both["samples"] if s["condition"] == "text"] == \
        [(s["user"], s["prompt"]) for s in both["samples"] if s["condition"] == "soft"] == [tuple(x) for x in both["pairs"][:2]]
    plain = [build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": s["prompt"]}]) for s in report["samples"]]
    replies = generate_replies(tiny, plain, SamplingParams(max_tokens=6, temperature=0), 4)
    assert [s["response"] for s in report["samples"]] == [r.text for r in replies]


def test_guided_scoring_at_zero_is_the_plain_backbones_and_general_records_it(tiny):
    tok = tiny.tokenizer
    th = torch.randn(4, tiny.hidden_size, generator=torch.Generator().manual_seed(5)) * tiny.embed_norm
    pairs = [(tok("The sky is")["input_ids"], tok(" blue")["input_ids"]), (tok("Two and two make")["input_ids"], tok(" four")["input_ids"])]
    plain = loglikelihoods(tiny, [(ctx, cont, None) for ctx, cont in pairs])
    read = loglikelihoods(tiny, [(ctx, cont, th) for ctx, cont in pairs], placement=Placement(reply_only=True))
    zero = loglikelihoods(tiny, [(ctx, cont, th) for ctx, cont in pairs], placement=Placement(reply_only=True), guidance=0.0)
    twice = loglikelihoods(tiny, [(ctx, cont, th) for ctx, cont in pairs], placement=Placement(reply_only=True), guidance=2.0)
    assert zero == pytest.approx(plain, abs=1e-4) and read != pytest.approx(plain, abs=1e-4)
    assert twice != pytest.approx(read, abs=1e-4)
    closed = loglikelihoods(tiny, [(ctx, cont, th) for ctx, cont in pairs], placement=Placement(reply_only=True),
                            guidance=2.0, gate=1e9)  # no position moves that much: the plain backbone's scores
    assert closed == pytest.approx(plain, abs=1e-4)
    # the same text read with several thoughts: its guiding plain logits computed once, each reading scored as alone
    other = torch.randn(4, tiny.hidden_size, generator=torch.Generator().manual_seed(6)) * tiny.embed_norm
    mixed = [(ctx, cont, t) for t in (th, other) for ctx, cont in pairs]
    together = loglikelihoods(tiny, mixed, placement=Placement(reply_only=True), guidance=2.0)
    alone = [loglikelihoods(tiny, [r], placement=Placement(reply_only=True), guidance=2.0)[0] for r in mixed]
    assert together == pytest.approx(alone, abs=1e-4) and together[:2] == pytest.approx(twice, abs=1e-4)
    assert together[:2] != pytest.approx(together[2:], abs=1e-4)
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=4).eval()
    users = make_users(3, 5, "e", held_out_phrasing=True)
    report = general(tiny, aux, users, ["piqa"], 6, 0, guidance=0.0)
    assert report["guidance"] == 0.0 and report["piqa"]["soft"] == report["piqa"]["plain"]
    aux.config.guidance_gate = 1e9  # the checkpoint's own gate is the default, as served
    report = general(tiny, aux, users, ["piqa"], 6, 0, guidance=2.0)
    assert report["guidance_gate"] == 1e9 and report["piqa"]["soft"] == report["piqa"]["plain"]
    with pytest.raises(ValueError, match="shared_context"):
        general(tiny, aux, users, ["piqa"], 6, 0, shared_context=True, guidance=2.0)
