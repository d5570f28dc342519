import json

import pytest
import torch

from softthought.aux_model import SoftThoughtAux
from softthought.splice import Placement, build_text_prompt, embed_prompt, hiding_mask, left_pad
from train_aux.eval import loglikelihoods
from train_aux.train import (
    Example,
    choice_items,
    choice_loss,
    copy_strings,
    copy_targets,
    copy_terms,
    edited_chars,
    load_config,
    make_probe,
    own_targets,
    preservation_loss,
    preservation_texts,
    probe_labels,
    probe_term,
    repeated_positions,
    reply_logprobs,
    rollouts,
    target_loss,
    target_sums,
    train,
    unlikelihood_loss,
)


def test_training_moves_only_the_aux_and_logs_the_unchanged_fingerprint(tmp_path, data_dir, tiny_dir, tiny):
    cfg = load_config(None, dict(backbone=tiny_dir, dtype="float32", data_dir=str(data_dir), out=str(tmp_path / "run"),
                                 num_thoughts=4, steps=3, batch_size=2, save_every=2, log_every=1, edit_weight=4.0,
                                 probe_weight=0.5, probe_reads="all", probe_batch=2, preserve_weight=1.0, preserve_batch=2,
                                 preserve_tokens=16, rollout_weight=1.0, own_weight=1.0, rollout_every=2, rollout_batch=2,
                                 rollout_tokens=12, choice_weight=1.0, choice_batch=2, choice_items="qa", choice_guidance=2.0))
    final = train(cfg)
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    end = events[-1]
    assert end["event"] == "end" and end["backbone_fingerprint_before"] == end["backbone_fingerprint_after"] == tiny.fingerprint
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3]
    assert all(e["grad_norm"] > 0 and {"target", "probe", "preserve", "choice"} <= set(e["terms"]) for e in events if "loss" in e)
    assert [e["step"] for e in events if "rollout_repeats" in e] == [1, 3]  # rollouts every second step
    assert [e["step"] for e in events if "own_targets" in e] == [1, 3]
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
    # a further phase from the trained checkpoint's weights (fresh optimizer), the summary as the KL's teacher, the
    # thoughts now read by the reply only, the probe on the batch's mean thought; its steps count after the
    # checkpoint's and resuming it keeps the count
    init = cfg5.model_copy(update={"steps": 2, "init": str(final), "out": str(tmp_path / "more"), "preserve_teacher": "text",
                                   "thoughts_seen_by": "reply", "probe_reads": "mean", "probe_batch": 0})
    more = train(init)
    assert SoftThoughtAux.from_pretrained(final, backbone=tiny).config.thoughts_seen_by == "all"
    meta = SoftThoughtAux.from_pretrained(more, backbone=tiny).config.metadata
    assert meta["steps"] == 8 and meta["init_steps"] == 6
    assert [p["from_step"] for p in meta["phases"]] == [0, 3, 5, 6]
    assert meta["phases"][-1]["train_config"]["init"] == str(final)
    train(init.model_copy(update={"steps": 3, "thoughts_seen_by": None}), resume=True)  # None keeps the checkpoint's
    resumed = SoftThoughtAux.from_pretrained(more, backbone=tiny).config
    assert resumed.metadata["steps"] == 9 and [p["from_step"] for p in resumed.metadata["phases"]] == [0, 3, 5, 6, 8]
    assert resumed.thoughts_seen_by == "reply"
    # a phase that moves the thoughts after the prompt
    moved = train(init.model_copy(update={"out": str(tmp_path / "end"), "thoughts_seen_by": None, "thoughts_at": "end"}))
    assert SoftThoughtAux.from_pretrained(moved, backbone=tiny).placement == Placement(at_end=True)


def test_repeated_positions_are_the_tokens_that_complete_a_4gram_seen_before():
    assert repeated_positions([1, 2, 3, 4, 1, 2, 3, 4, 5]) == [7]
    assert repeated_positions([7, 7, 7, 7, 7, 7]) == [4, 5]
    assert repeated_positions([1, 2, 3, 1, 2, 4, 1, 2, 3]) == []


def test_own_targets_edit_the_students_replies_and_leave_out_loops():
    end = [{"instruction_id": "startend:end_checker", "kwargs": {"end_phrase": "That is all."}}]
    title = [{"instruction_id": "detectable_format:title", "kwargs": {}}]
    examples = [Example("Always end with 'That is all.'", "Why is the sky blue?", "", "", end),
                Example("Give every answer a title.", "Tell me about rain.", "", "", title),
                Example("Give every answer a title.", "Tell me about rain.", "", "", title),
                Example("Always end with 'That is all.'", "Why is the sky blue?", "", "", end)]
    replies = ["Light scatters in the air, and blue scatters most. It",  # cut off by max_tokens mid-sentence
               "<<Rain>>\nRain is water that falls from clouds.",  # follows its check already: kept as it is
               "Rain falls. " * 12,  # a loop
               "Sky."]  # too short to be an answer
    assert own_targets(examples, replies, keywords_first=False) == [
        (0, "Light scatters in the air, and blue scatters most.", "Light scatters in the air, and blue scatters most. That is all."),
        (1, "<<Rain>>\nRain is water that falls from clouds.", "<<Rain>>\nRain is water that falls from clouds.")]


def test_unlikelihood_is_minus_log_one_minus_p_of_the_greedy_replies_repeats_and_reaches_only_the_thoughts(tiny):
    from softthought.generation import Engine, SamplingParams
    from softthought.splice import Prompt, build_chat_prompt

    table, tok = tiny.model.get_input_embeddings(), tiny.tokenizer
    thoughts = (table.weight[:8].detach().clone().reshape(2, 4, -1) * 3).requires_grad_()
    prompts = [build_chat_prompt(tok, [{"role": "user", "content": q}], th) for q, th in zip(["Hi", "Why?"], thoughts)]
    engine = Engine(tiny)
    replies = [r.token_ids for r in rollouts(engine, prompts, 32)]
    loss, tokens, repeats = unlikelihood_loss(tiny, prompts, replies)
    loss.backward()
    assert thoughts.grad.abs().sum() > 0 and all(p.grad is None for p in tiny.model.parameters())
    # the rollouts are the greedy replies, generated apart from the thoughts' graph
    plain = [Prompt([s.detach() if isinstance(s, torch.Tensor) else s for s in p.segments]) for p in prompts]
    assert replies == [r.token_ids for r in engine.generate(plain, SamplingParams(max_tokens=32, temperature=0))]
    flagged = [repeated_positions(r) for r in replies]
    assert tokens == sum(map(len, replies)) and repeats == sum(map(len, flagged)) > 0  # a random-init backbone repeats itself
    with torch.no_grad():
        logps = reply_logprobs(tiny.model, table, prompts, replies)
    expected = sum(-torch.log(1 - lp[pos].exp()).sum() for lp, pos in zip(logps, flagged))
    assert torch.allclose(loss, expected, rtol=1e-4)


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
    # the end of turn weighs apart from the form: only its own weight moves the loss of a target the edit left alone
    with torch.no_grad():
        untouched = [prompts[1]], ["A cat sat."], 32, ["A cat sat."]
        assert torch.allclose(target_loss(tiny.model, table, tok, *untouched, edit_weight=50.0, end_weight=1.0)[0],
                              target_loss(tiny.model, table, tok, *untouched, edit_weight=1.0)[0])
        assert not torch.allclose(target_loss(tiny.model, table, tok, *untouched, edit_weight=1.0, end_weight=50.0)[0],
                                  target_loss(tiny.model, table, tok, *untouched, edit_weight=1.0)[0])


def test_preservation_loss_is_a_kl_that_only_the_thoughts_can_lower(tiny):
    table = tiny.model.get_input_embeddings()
    texts = preservation_texts(tiny.tokenizer, ["Passage: the sea is big.\nAnswer:", "Question: a cat?\nAnswer: A cat sat."], 96)
    thoughts = (table.weight[:8].detach().clone().reshape(2, 4, -1) * 3).requires_grad_()
    loss = preservation_loss(tiny, thoughts, texts)
    loss.backward()
    assert loss.item() > 0 and thoughts.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.parameters())


def test_preservation_loss_with_a_text_teacher_is_zero_when_the_thoughts_are_that_text(tiny):
    table, tok = tiny.model.get_input_embeddings(), tiny.tokenizer
    texts = preservation_texts(tok, ["Question: why is the sea big?\nAnswer: water.", "A cat sat.\nAnswer: yes"], 96)
    prefixes = [tok("I like cats.\n\n")["input_ids"], tok("Be brief!\n\n")["input_ids"]]
    k = min(len(p) for p in prefixes)
    prefixes = [p[:k] for p in prefixes]
    with torch.no_grad():
        as_text = torch.stack([table(torch.tensor(p)) for p in prefixes])  # thoughts that are the prefix's embeddings
        assert preservation_loss(tiny, as_text, texts, prefixes).item() < 1e-5
        assert preservation_loss(tiny, as_text, texts).item() > 1e-3  # the plain backbone is another teacher


def test_preservation_texts_read_the_reply_from_the_last_answer_prompt(tiny):
    tok = tiny.tokenizer
    texts = ["Question: why is the sea big?\nAnswer: because of water.", "Passage: Answer: no. Is it?\nAnswer:",
             "A passage.\nQuestion: is it?"]
    prompts = [texts[0][: texts[0].index(" because")], texts[1], texts[2]]  # no "Answer:": the whole text is the prompt
    for (ids, start), text, prompt in zip(preservation_texts(tok, texts, 96), texts, prompts):
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids[: start + 1]) == prompt
    (ids, start), = preservation_texts(tok, texts[:1], 5)  # cut to the last 5 tokens, the reply start moves with them
    assert len(ids) == 5 and tok.decode(ids[start + 1:]) == tok.decode(tok(texts[0])["input_ids"][-(5 - start - 1):])


@pytest.mark.parametrize("placement", [Placement(reply_only=True), Placement(at_end=True)])
def test_preservation_kl_runs_over_what_reads_the_thoughts(tiny, placement):
    """The student's text before its reply does not see the thoughts (hidden, or placed after it), and the KL is the
    mean over the reply's positions, summed over the texts."""
    tok, table = tiny.tokenizer, tiny.model.get_input_embeddings()
    texts = preservation_texts(tok, ["Question: why is the sea so big?\nAnswer: water.", "Q: a cat?\nAnswer: A cat sat."], 96)
    thoughts = torch.randn(2, 3, tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = []
    with torch.no_grad():
        for th, (ids, start) in zip(thoughts, texts):  # each text alone, its prompt as a chat prompt is placed
            prompt = build_text_prompt(tok, tok.decode(ids[: start + 1]), th, placement=placement)
            embeds, mask, positions = left_pad([torch.cat([embed_prompt(table, prompt), table(torch.tensor(ids[start + 1:]))])])
            hidden = prompt.hidden_thoughts()
            student = tiny.model(inputs_embeds=embeds, attention_mask=hiding_mask(mask, [hidden], embeds.dtype),
                                 position_ids=positions).logits[0, prompt.num_tokens - 1:].log_softmax(-1)
            plain = tiny.model(input_ids=torch.tensor([ids])).logits[0, start:].log_softmax(-1)
            expected.append(torch.nn.functional.kl_div(student, plain, log_target=True, reduction="batchmean"))
        got = preservation_loss(tiny, thoughts, texts, placement=placement)
        every_position = preservation_loss(tiny, thoughts, texts)
    assert got.item() == pytest.approx(sum(expected).item(), rel=1e-4)
    assert every_position.item() != pytest.approx(got.item(), rel=1e-2)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_choice_loss_is_the_centred_shift_in_what_acc_norm_ranks_as_eval_general_scores_it(tiny, guidance):
    """The term's per-byte shifts are those of `eval general`'s scoring (thoughts placed and guided alike); a shift
    every choice of an item shares costs nothing; only the thoughts get a gradient."""
    placement = Placement(reply_only=True)
    raw = [[("Question: why is the sea big?\nAnswer:", " water"), ("Question: why is the sea big?\nAnswer:", " the moon, mostly")],
           [("The cat sat on Tom", " and purred."), ("The cat sat on the mat", " and purred."), ("Cats", " purr.")]]
    items = choice_items(tiny.tokenizer, raw)
    thoughts = torch.randn(2, 3, tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = choice_loss(tiny, thoughts, items, placement, guidance)
    loss.backward()
    assert thoughts.grad.abs().sum() > 0 and all(p.grad is None for p in tiny.model.parameters())
    expected = 0.0
    for item, th in zip(items, thoughts.detach()):
        plain = loglikelihoods(tiny, [(ctx, cont, None) for ctx, cont, _ in item])
        read = loglikelihoods(tiny, [(ctx, cont, th) for ctx, cont, _ in item], placement=placement, guidance=guidance)
        shift = torch.tensor([(r - p) / size for r, p, (_, _, size) in zip(read, plain, item)])
        expected += float((shift - shift.mean()).pow(2).mean())
    assert loss.item() == pytest.approx(expected, rel=1e-3) and loss.item() > 0
    assert choice_loss(tiny, thoughts, items, placement, 0.0).item() == pytest.approx(0.0, abs=1e-9)  # plain: no shift
    same = choice_items(tiny.tokenizer, [[("The cat sat", " and purred.")] * 3])  # identical choices move together
    assert choice_loss(tiny, thoughts[:1], same, placement, guidance).item() == pytest.approx(0.0, abs=1e-9)


def test_copy_targets_are_the_tokens_that_spell_what_the_user_asks_for_in_order():
    checks = [{"instruction_id": "startend:end_checker", "kwargs": {"end_phrase": "Cheers!"}},
              {"instruction_id": "keywords:existence", "kwargs": {"keywords": ["lantern", "river"]}},
              {"instruction_id": "punctuation:no_comma", "kwargs": {}}]
    assert copy_strings(checks) == ["Cheers!", "lantern", "river"]
    summary = 'Use the words river and LANTERN. End with "Cheers!"'
    # character offsets of made-up tokens: "Use" " the" " words" " river" " and" " LAN" "TERN" "." ... "Cheers" '!"'
    offsets = [(0, 3), (3, 7), (7, 13), (13, 19), (19, 23), (23, 27), (27, 31), (31, 32), (32, 36), (36, 41),
               (41, 43), (43, 49), (49, 51)]
    assert copy_targets(summary, copy_strings(checks), offsets, 8) == [3, 5, 6, 11, 12]
    assert copy_targets(summary, copy_strings(checks), offsets, 2) == [3, 5]
    assert copy_targets("No strings here.", ["absent"], [(0, 2)], 8) == []


def test_copy_loss_is_low_only_where_the_right_tokens_are_taken_and_the_gates_match():
    targets = [[2, 3], []]
    picks = torch.zeros(2, 3, 5)
    picks[0, 0, 2] = picks[0, 1, 3] = picks[0, 2, 0] = 1.0
    picks[1, :, 0] = 1.0
    right_gates = torch.tensor([[20.0, 20.0, -20.0], [-20.0, -20.0, -20.0]])

    def copy_loss(picks, gates):
        terms = copy_terms(picks, gates, targets)
        assert (terms["copy_pointer"].count, terms["copy_gates"].count) == (2, 6)
        return sum(t.total / t.count for t in terms.values())

    assert copy_loss(picks, right_gates) < 1e-6
    assert copy_loss(picks.roll(1, dims=2), right_gates) > 10  # wrong tokens
    assert copy_loss(picks, -right_gates) > 10  # gates the wrong way round


def test_copy_thoughts_train_from_an_init_checkpoint_and_learn_to_point(tmp_path, data_dir, tiny_dir, tiny):
    cfg = load_config(None, dict(backbone=tiny_dir, dtype="float32", data_dir=str(data_dir), out=str(tmp_path / "a"),
                                 num_thoughts=2, steps=1, batch_size=2, log_every=1))
    base = train(cfg)
    grown = train(cfg.model_copy(update={"init": str(base), "copy_thoughts": 3, "out": str(tmp_path / "b"), "steps": 30,
                                         "lr": 1e-2, "batch_size": 4}))
    aux = SoftThoughtAux.from_pretrained(grown, backbone=tiny)
    assert aux.config.copy_thoughts == 3 and aux.config.total_thoughts == 5
    events = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if "loss" in e]
    assert events[-1]["backbone_fingerprint_after"] == tiny.fingerprint
    assert sum(losses[-5:]) < sum(losses[:5])  # the pointer loss is learnable: it falls


def test_examples_leave_out_the_backbones_answers_that_loop():
    from train_aux.train import Examples

    user = {"user": "u", "summary": "Use no commas.", "checks": [{"instruction_id": "punctuation:no_comma", "kwargs": {}}]}
    answers = [{"prompt": "Why?", "answer": "No, no, no, " * 20}, {"prompt": "How?", "answer": "Slowly, with care and patience."}]
    examples = Examples([user], answers, seed=0)
    assert {examples.sample().answer for _ in range(20)} == {"Slowly, with care and patience."}


def test_an_answer_in_another_language_counts_its_opening_as_the_edit():
    from train_aux.train import Examples

    user = {"user": "u", "summary": "Réponds en français.",
            "checks": [{"instruction_id": "language:response_language", "kwargs": {"language": "fr"}}]}
    opening = "Bien sûr ! Voici ma réponse en français : "
    body = "Le ciel est bleu parce que la lumière bleue se diffuse davantage dans l'air."
    languages = [{"prompt": "Why is the sky blue?", "language": "fr", "opening": opening, "answer": opening + body}]
    example = Examples([user], [{"prompt": "Why is the sky blue?", "answer": "Blue light scatters most."}], 0, languages).sample()
    assert example.target == opening + body and example.answer == body
    flags = edited_chars(example.answer, example.target)
    assert all(flags[: len(opening) - 1]) and not any(flags[len(opening) + 1 :])


def test_users_with_a_word_floor_get_answers_that_reach_it_and_no_end_where_the_backbone_ran_on():
    from train_aux.train import Examples

    def floor_user(name, *more):
        return {"user": name, "summary": "At least 12 words please.", "checks": [
            {"instruction_id": "length_constraints:number_words", "kwargs": {"relation": "at least", "num_words": 12}}, *more]}

    answers = [{"prompt": "Why?", "answer": "Because it is so."}]
    cut = {"prompt": "Why?", "answer": "Light scatters in the air and the blue part of it scatters the most of all the", "ended": False}
    whole = {"prompt": "How?", "answer": "Slowly and with care, one small step after another, until the work is done.", "ended": True}
    short = {"prompt": "What?", "answer": "A short one that ends.", "ended": True}
    examples = Examples([floor_user("a")], answers, 0, floor_answers=[cut, whole, short])
    drawn = {(ex.target, ex.ended) for ex in (examples.sample() for _ in range(40))}
    assert drawn == {(cut["answer"], False), (whole["answer"], True)}  # never the plain answers, never short of the floor
    end = {"instruction_id": "startend:end_checker", "kwargs": {"end_phrase": "Cheers!"}}
    ending = Examples([floor_user("b", end)], answers, 0, floor_answers=[cut, whole])
    assert {ex.target for ex in (ending.sample() for _ in range(20))} == {whole["answer"] + " Cheers!"}
    assert Examples([floor_user("c")], answers, 0).users == []  # no answer reaches the floor: the user is left out
    assert Examples([floor_user("d")], answers, 0, floor_answers=[short]).users == []


def test_a_target_the_backbone_did_not_end_teaches_no_end_of_turn(tiny):
    from softthought.splice import build_chat_prompt

    table, tok = tiny.model.get_input_embeddings(), tiny.tokenizer
    prompt = [build_chat_prompt(tok, [{"role": "user", "content": "Hi"}])]
    tokens = tok("A cat sat on the", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ended, _, n_ended = target_sums(tiny.model, table, tok, prompt, ["A cat sat on the"], 32, ended=[True])
        cut, _, n_cut = target_sums(tiny.model, table, tok, prompt, ["A cat sat on the"], 32, ended=[False])
        logps = reply_logprobs(tiny.model, table, prompt, [tokens + [tok.eos_token_id]])[0]
    assert n_cut == n_ended - 1 == len(tokens)
    assert torch.allclose(cut, -logps[:-1].sum()) and torch.allclose(ended, -logps.sum())


def test_examples_draw_language_users_at_the_share_asked():
    from train_aux.train import Examples

    speaks = {"user": "a", "summary": "Réponds en français.",
              "checks": [{"instruction_id": "language:response_language", "kwargs": {"language": "fr"}}]}
    plain = [{"user": f"b{i}", "summary": "Use no commas.", "checks": [{"instruction_id": "punctuation:no_comma", "kwargs": {}}]}
             for i in range(9)]
    answers = [{"prompt": "Why?", "answer": "Because it is so."}]
    languages = [{"prompt": "Why?", "language": "fr", "opening": "Bien sûr ! ", "answer": "Bien sûr ! Parce que c'est ainsi."}]
    for share, low, high in ((None, 0.05, 0.16), (0.5, 0.42, 0.58)):
        examples = Examples([speaks, *plain], answers, 0, languages, language_share=share)
        drawn = sum(examples.sample().summary == speaks["summary"] for _ in range(400)) / 400
        assert low < drawn < high, (share, drawn)
    with pytest.raises(ValueError):  # one of the two pools would be empty
        load_config(None, {"language_share": 1.0})


def test_read_steps_train_the_probe_alone_before_generation(tmp_path, data_dir, tiny_dir):
    cfg = load_config(None, dict(backbone=tiny_dir, dtype="float32", data_dir=str(data_dir), out=str(tmp_path / "run"),
                                 num_thoughts=4, steps=4, read_steps=2, warmup_steps=4, batch_size=2, log_every=1,
                                 probe_weight=1.0, probe_reads="all", probe_batch=3, rollout_weight=1.0, rollout_batch=2,
                                 rollout_tokens=8))
    train(cfg)
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [e for e in steps if "loss" in e]
    # reading: the probe's term alone, at the full learning rate, no target tokens and no rollouts
    assert [set(e["terms"]) for e in steps] == [{"probe"}, {"probe"}, {"probe", "target", "unlikelihood"}, {"probe", "target"}]
    assert [e["target_tokens_per_s"] > 0 for e in steps] == [False, False, True, True]
    assert all(e["grad_norm"] > 0 for e in steps)
    # generation's warm-up starts after the reading
    assert [e["lr"] for e in steps] == pytest.approx([cfg.lr, cfg.lr, cfg.lr / 4, cfg.lr / 2])
    with pytest.raises(ValueError, match="probe_batch"):
        load_config(None, {"read_steps": 2, "probe_weight": 1.0})
    with pytest.raises(ValueError, match="leave steps"):
        load_config(None, {"read_steps": 4, "steps": 4, "probe_weight": 1.0, "probe_batch": 2})


def test_probe_labels_name_the_response_language():
    checks = [{"instruction_id": "punctuation:no_comma", "kwargs": {}},
              {"instruction_id": "language:response_language", "kwargs": {"language": "de"}}]
    assert probe_labels(checks) == ["punctuation:no_comma", "language:response_language", "language:de"]


@pytest.mark.parametrize("reads", ["mean", "all"])
def test_the_probe_reads_the_thoughts_and_its_gradient_reaches_the_encoder(tiny, reads):
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=3, encoder_training="lora").eval()
    labels = ["language:fr", "punctuation:no_comma"]
    probe = make_probe(labels, aux, load_config(None, {"probe_reads": reads}))
    checks = [[{"instruction_id": "punctuation:no_comma", "kwargs": {}}],
              [{"instruction_id": "language:response_language", "kwargs": {"language": "fr"}}]]
    thoughts = aux.encode(["No commas, please.", "Réponds en français."])
    term = probe_term(probe, thoughts, checks, labels)
    assert term.count == 4
    expected = torch.nn.functional.binary_cross_entropy_with_logits(probe(thoughts), torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
                                                                    reduction="sum")
    assert torch.allclose(term.total, expected)
    term.total.backward()
    lora = [p for n, p in aux.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora) and aux.queries.grad.abs().sum() > 0
    # the probe on every thought sees each one, the mean probe only their average
    swapped = thoughts.clone()
    swapped[:, [0, 1]] = thoughts[:, [1, 0]]
    moved = not torch.allclose(probe(swapped), probe(thoughts), atol=1e-6)
    assert moved == (reads == "all")


def test_the_probes_own_users_are_drawn_apart_from_the_stream():
    from train_aux.train import Examples

    users = [{"user": f"u{i}", "summary": f"Use no commas {i}.", "checks": [{"instruction_id": "punctuation:no_comma", "kwargs": {}}]}
             for i in range(20)]
    answers = [{"prompt": "Why?", "answer": "Because it is so."}]
    one, two = Examples(users, answers, 3), Examples(users, answers, 3)
    assert one.probe_users(5, 7) == two.probe_users(5, 7) != one.probe_users(5, 8)  # the same on resume and every worker
    assert len({u["user"] for u in one.probe_users(5, 7)}) == 5
    assert [one.sample().summary for _ in range(10)] == [two.sample().summary for _ in range(10)]  # the stream is untouched


def test_a_case_is_a_reply_form_beside_the_language(tiny):
    from train_aux.train import Examples, language_targets, reply_forms

    def check(instruction_id, **kwargs):
        return {"instruction_id": instruction_id, "kwargs": kwargs}

    capital = [check("change_case:english_capital"), check("punctuation:no_comma")]
    english_lowercase = [check("language:response_language", language="en"), check("change_case:english_lowercase")]
    french, plain = [check("language:response_language", language="fr")], [check("punctuation:no_comma")]
    assert reply_forms(english_lowercase) == ["en", "lowercase"] and reply_forms(plain) == []
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2)
    aux.add_languages(["fr"])
    assert language_targets(aux, [capital, english_lowercase, french, plain]).tolist() == [0, 0, 1, 0]
    aux.add_languages(["capital", "lowercase"])  # English has no offset: its lowercase user is the case's
    assert language_targets(aux, [capital, english_lowercase, french, plain]).tolist() == [2, 3, 1, 0]
    users = [{"user": str(i), "summary": str(i), "checks": c} for i, c in enumerate([capital, french, plain])]
    answers, french_answers = [{"prompt": "Why?", "answer": "Because."}], [{"prompt": "Why?", "language": "fr", "answer": "Parce que."}]
    assert [len(pool) for pool in Examples(users, answers, 0, french_answers, forms=["fr"]).pools] == [2, 1]
    assert [len(pool) for pool in Examples(users, answers, 0, french_answers, forms=aux.config.languages).pools] == [1, 2]
    with pytest.raises(ValueError, match="language_share"):  # a share of nobody
        Examples(users, answers, 0, french_answers, language_share=0.5, forms=["it"])



def test_a_word_floor_is_a_reply_form_after_the_language_and_the_case(tiny):
    from train_aux.train import FLOOR, language_targets, reply_forms

    def words(relation):
        return {"instruction_id": "length_constraints:number_words", "kwargs": {"relation": relation, "num_words": 40}}

    capital = {"instruction_id": "change_case:english_capital", "kwargs": {}}
    assert reply_forms([words("at least")]) == [FLOOR] and reply_forms([words("less than")]) == []
    assert reply_forms([words("at least"), capital]) == ["capital", FLOOR]
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2)
    aux.add_languages(["capital", FLOOR])
    assert language_targets(aux, [[words("at least")], [capital, words("at least")], [words("less than")]]).tolist() == [2, 1, 0]

def test_a_languages_phase_trains_only_their_offsets_and_head(tmp_path, data_dir, tiny_dir, tiny):
    from train_aux.data import write_jsonl

    speakers = [{"user": f"fr{i}", "summary": f"Réponds toujours en français, s'il te plaît ({i}).",
                 "checks": [{"instruction_id": "language:response_language", "kwargs": {"language": "fr"}}]} for i in range(6)]
    users = [json.loads(line) for line in (data_dir / "train_users.jsonl").read_text().splitlines()]
    write_jsonl(data_dir / "train_users.jsonl", users + speakers)
    opening = "Bien sûr ! "
    write_jsonl(data_dir / "language_answers.jsonl", [{"prompt": f"Tell me about topic {i}.", "language": "fr", "opening": opening,
                                                       "answer": opening + "Le renard brun saute."} for i in range(10)])
    cfg = load_config(None, dict(backbone=tiny_dir, dtype="float32", data_dir=str(data_dir), out=str(tmp_path / "a"),
                                 num_thoughts=2, steps=1, batch_size=2, log_every=1))
    base = train(cfg)
    grown = train(cfg.model_copy(update={"init": str(base), "add_languages": True, "trains": "languages",
                                         "out": str(tmp_path / "b"), "steps": 25, "lr": 2e-2, "batch_size": 4,
                                         "language_share": 0.5, "language_batch": 12, "warmup_steps": 1}))
    before = SoftThoughtAux.from_pretrained(base, backbone=tiny).eval()
    after = SoftThoughtAux.from_pretrained(grown, backbone=tiny).eval()
    assert after.config.languages == ["fr"]
    old, new = before.persistent_state_dict(), after.persistent_state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)  # nothing but the languages' weights moved
    assert {k for k in new if k not in old} == {k for k in new if k.startswith("language_")}
    events = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    language = [e["terms"]["language"] for e in events if "loss" in e]
    assert language[-1] < language[0] / 2  # the head learns who asked for French
    assert events[-1]["backbone_fingerprint_after"] == tiny.fingerprint
    with torch.no_grad():
        asked, plain = [speakers[0]["summary"]], [u["summary"] for u in users[:4]]
        assert after.language_logits(asked).argmax(-1).tolist() == [1]
        assert after.language_logits(plain).argmax(-1).tolist() == [0] * 4
        # the French offset reaches the speaker's thoughts; the others' barely move
        moved = (after.encode(asked) - before.encode(asked)).norm()
        assert (after.encode(plain) - before.encode(plain)).norm(dim=(1, 2)).max() < moved / 5
    # a wider head alone, reading the backbone's states, also on generated users: no backbone's reply in the loop, the
    # offsets as they were, the backbone untouched
    head = train(cfg.model_copy(update={"init": str(grown), "trains": "language_head", "out": str(tmp_path / "c"),
                                        "steps": 5, "language_users": 50, "language_mentions": 30,
                                        "language_batch": 8, "language_head_hidden": 8,
                                        "language_reader_layers": 1}))
    events = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert all(set(e["terms"]) == {"language"} for e in events if "loss" in e)
    wide = SoftThoughtAux.from_pretrained(head, backbone=tiny)
    last = wide.persistent_state_dict()
    assert wide.config.language_head_hidden == 8 and wide.config.language_reader_layers == 1
    assert "language_norm.weight" in last and not any("_reader" in k for k in last)
    assert events[-1]["backbone_fingerprint_after"] == tiny.fingerprint
    assert torch.equal(last["language_offsets"], new["language_offsets"])
    # the cases grown beside French, their offsets trained on the users who ask for one, the head left as it was
    shouting = [{"user": f"up{i}", "summary": f"Write everything in capital letters ({i}).",
                 "checks": [{"instruction_id": "change_case:english_capital", "kwargs": {}}]} for i in range(6)]
    write_jsonl(data_dir / "train_users.jsonl", users + speakers + shouting)
    cased = train(cfg.model_copy(update={"init": str(head), "add_cases": True, "trains": "languages", "language_weight": 0,
                                         "out": str(tmp_path / "d"), "steps": 3, "lr": 2e-2, "batch_size": 4,
                                         "language_share": 0.9, "warmup_steps": 1}))
    both = SoftThoughtAux.from_pretrained(cased, backbone=tiny).persistent_state_dict()
    assert SoftThoughtAux.from_pretrained(cased, backbone=tiny).config.languages == ["fr", "capital", "lowercase"]
    assert all(torch.equal(last[k], both[k]) for k in last if not k.startswith("language_"))
    assert torch.equal(both["language_head.2.weight"][:2], last["language_head.2.weight"])  # the head not trained
    assert both["language_offsets"][1].abs().sum() > 0  # the capitals' offset learned from its users
    with pytest.raises(ValueError, match="probe_weight"):
        load_config(None, {"trains": "languages", "probe_weight": 0.5})
    with pytest.raises(ValueError, match="language_head_hidden"):
        load_config(None, {"language_reader_layers": 1})
