from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from softthought.generation import Engine, SamplingParams, guided_logits
from softthought.splice import Placement, build_chat_prompt, embed_prompt, hiding_mask, left_pad

GREEDY = SamplingParams(max_tokens=24, temperature=0)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Describe the sea."}],
]


def _hf_greedy(bb, messages, max_new_tokens):
    ids = bb.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = bb.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_no_summary_equals_transformers_greedy_generate(smollm, conversation):
    result = Engine(smollm).generate([build_chat_prompt(smollm.tokenizer, conversation)], GREEDY)[0]
    expected = _hf_greedy(smollm, conversation, 24)
    assert result.token_ids == expected
    assert result.text == smollm.tokenizer.decode(expected, skip_special_tokens=True)


def test_batch_of_three_users_equals_each_alone(smollm, smollm_aux):
    with torch.no_grad():
        th = smollm_aux.encode(["Answer in French.", "I like short answers with bullet points."])
    prompts = [
        build_chat_prompt(smollm.tokenizer, [{"role": "user", "content": "Tell me about the sea."}], th[0]),
        build_chat_prompt(smollm.tokenizer, [{"role": "user", "content": "Hi"}]),
        build_chat_prompt(smollm.tokenizer, CONVERSATIONS[1], th[1]),
    ]
    assert len({p.num_tokens for p in prompts}) == 3  # different lengths: left padding is exercised
    engine = Engine(smollm)
    batched = engine.generate(prompts, GREEDY)
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.prompt_tokens for r in batched] == [p.num_tokens for p in prompts]


def test_request_joining_a_running_batch_matches_running_alone(smollm):
    engine = Engine(smollm)
    long_prompt = build_chat_prompt(smollm.tokenizer, CONVERSATIONS[1])
    short_prompt = build_chat_prompt(smollm.tokenizer, [{"role": "user", "content": "Hi"}])
    params = SamplingParams(max_tokens=20, temperature=0)
    expected = [engine.generate([p], params)[0].token_ids for p in (long_prompt, short_prompt)]
    first = engine.add(long_prompt, params)
    for _ in range(5):
        engine.step()
    second = engine.add(short_prompt, params)
    results = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.result.token_ids
            assert len(engine.running) <= 2
    assert [results[first], results[second]] == expected


def test_max_tokens_ends_with_length(smollm):
    prompt = build_chat_prompt(smollm.tokenizer, CONVERSATIONS[1])
    r = Engine(smollm).generate([prompt], SamplingParams(max_tokens=5, temperature=0))[0]
    assert (r.finish_reason, r.completion_tokens, len(r.token_ids)) == ("length", 5, 5)


def test_eos_ends_with_stop_and_is_not_in_the_text(smollm):
    prompt = build_chat_prompt(smollm.tokenizer, CONVERSATIONS[0])
    r = Engine(smollm).generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    assert r.finish_reason == "stop" and r.token_ids[-1] in smollm.eos_token_ids
    assert r.text == "The capital of France is Paris."


def test_ignore_eos_runs_to_max_tokens(smollm):
    prompt = build_chat_prompt(smollm.tokenizer, CONVERSATIONS[0])
    r = Engine(smollm).generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert (r.finish_reason, r.completion_tokens) == ("length", 40)
    assert any(t in smollm.eos_token_ids for t in r.token_ids) and r.text.startswith("The capital of France is Paris.")


def test_stop_string_truncates_and_ends_with_stop(smollm):
    prompt = build_chat_prompt(smollm.tokenizer, CONVERSATIONS[1])
    engine = Engine(smollm)
    full = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0))[0].text
    words = full.split()
    stop = " ".join(words[3:5])  # a two-word stop string from the middle of the reply
    r = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop=["zzzz", stop]))[0]
    assert r.finish_reason == "stop"
    assert r.text == full[: full.index(stop)]
    assert r.completion_tokens < 30


def test_stream_deltas_add_up_and_never_show_the_stop_string(smollm):
    prompt = build_chat_prompt(smollm.tokenizer, CONVERSATIONS[1])
    engine = Engine(smollm)
    full = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0))[0].text
    stop = next(full[i : i + 5] for i in range(10, len(full)) if full.index(full[i : i + 5]) == i)
    outs = list(engine.stream(prompt, SamplingParams(max_tokens=30, temperature=0, stop=[stop])))
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    streamed = "".join(o.delta for o in outs)
    assert streamed == outs[-1].result.text == full[: full.index(stop)]
    assert len(outs) > 3  # incremental, not one chunk


def test_stream_of_split_and_broken_characters_adds_up_to_the_full_decode(tiny):
    """A random-init model over a byte-level vocabulary emits raw bytes: characters split across tokens, invalid ones."""
    prompt = build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Hello"}])
    outs = list(Engine(tiny).stream(prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=0, ignore_eos=True)))
    r = outs[-1].result
    assert any("\ufffd" in tiny.tokenizer.decode([t]) for t in r.token_ids)  # the case under test did occur
    assert "".join(o.delta for o in outs) == r.text == tiny.tokenizer.decode(r.token_ids, skip_special_tokens=True)


def test_sampling_is_reproducible_by_seed(smollm):
    engine = Engine(smollm)
    prompt = build_chat_prompt(smollm.tokenizer, CONVERSATIONS[1])
    runs = [engine.generate([prompt], SamplingParams(max_tokens=16, temperature=1.0, seed=s))[0].token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_tiny_top_p_is_greedy(smollm):
    engine = Engine(smollm)
    prompt = build_chat_prompt(smollm.tokenizer, CONVERSATIONS[1])
    greedy = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    nucleus = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=3))[0].token_ids
    assert nucleus == greedy


def test_abort_removes_a_running_request(tiny):
    engine = Engine(tiny)
    prompt = build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Hello"}])
    keep = engine.add(prompt, SamplingParams(max_tokens=8, temperature=0))
    drop = engine.add(prompt, SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    engine.abort(drop)
    finished = []
    while engine.has_work():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == [keep]


def test_prompt_longer_than_context_is_refused(tiny):
    prompt = build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Hello " * 200}])
    with pytest.raises(ValueError, match="context"):
        Engine(tiny).add(prompt, SamplingParams(max_tokens=400))


def test_penalties_decode_as_openai_defines_them(tiny):
    """Greedy with OpenAI's penalties: each token the argmax of the logits less frequency x count + presence x
    (count > 0), counting the reply's own tokens so far (not the prompt's), alone and in a batch."""
    prompt = build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Hello"}])
    table, expected = tiny.model.get_input_embeddings(), []
    with torch.no_grad():
        for _ in range(40):
            reply = torch.tensor(expected, dtype=torch.long)
            logits = tiny.model(inputs_embeds=torch.cat([embed_prompt(table, prompt), table(reply)])[None]).logits[0, -1]
            counts = torch.bincount(reply, minlength=logits.shape[0]).float()
            expected.append(int((logits.float() - 0.3 * counts - 0.5 * (counts > 0).float()).argmax()))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, presence_penalty=0.5, frequency_penalty=0.3)
    unpenalized = Engine(tiny).generate([prompt], replace(params, presence_penalty=0, frequency_penalty=0))[0].token_ids
    assert len(set(unpenalized)) < len(unpenalized) and unpenalized != expected  # the reply repeats; the penalty matters
    assert Engine(tiny).generate([prompt], params)[0].token_ids == expected
    other = build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Tell me about the sea."}])
    assert Engine(tiny).generate([other, prompt], params)[1].token_ids == expected


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(guidance=-1),
                                 dict(guidance=11), dict(presence_penalty=2.5), dict(frequency_penalty=-3)])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_batch_on_tiny_model_of_another_family_with_thoughts(tiny):
    """Left padding + splicing on a model of another family: batch equals alone."""
    g = torch.Generator().manual_seed(0)
    th = torch.randn(2, 4, tiny.hidden_size, generator=g) * tiny.embed_norm
    prompts = [
        build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Hello"}], th[0]),
        build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "The quick brown fox jumps"}], th[1]),
        build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Paris"}]),
    ]
    engine = Engine(tiny)
    params = SamplingParams(max_tokens=10, temperature=0)
    assert [r.token_ids for r in engine.generate(prompts, params)] == [engine.generate([p], params)[0].token_ids for p in prompts]


def test_reply_only_thoughts_decode_as_a_full_forward_that_hides_them_from_the_prompt(tiny):
    """Prefill hides the thoughts from the prompt's text; every generated token sees them; batching changes nothing."""
    g = torch.Generator().manual_seed(1)
    th = torch.randn(4, tiny.hidden_size, generator=g) * tiny.embed_norm
    table = tiny.model.get_input_embeddings()
    chat = [{"role": "user", "content": "The quick brown fox jumps"}]
    prompt = build_chat_prompt(tiny.tokenizer, chat, th, placement=Placement(reply_only=True))
    expected = []  # greedy, one full forward per token, no cache
    with torch.no_grad():
        for _ in range(10):
            embeds, mask, positions = left_pad([torch.cat([embed_prompt(table, prompt), table(torch.tensor(expected, dtype=torch.long))])])
            attention = hiding_mask(mask, [prompt.hidden_thoughts()], embeds.dtype)
            expected.append(int(tiny.model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).logits[0, -1].argmax()))
    engine = Engine(tiny)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    others = [build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Hello"}], th),
              build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Paris is the capital of France"}])]
    assert engine.generate([prompt], params)[0].token_ids == expected
    assert engine.generate([others[0], prompt, others[1]], params)[1].token_ids == expected
    seen = build_chat_prompt(tiny.tokenizer, chat, th)
    assert engine.generate([seen], params)[0].token_ids != expected  # the mask matters


def test_thoughts_at_the_end_decode_as_a_full_forward_alone_and_batched(tiny):
    """The engine reads end-placed thoughts after the plain prompt, as one full forward per token does."""
    th = torch.randn(4, tiny.hidden_size, generator=torch.Generator().manual_seed(2)) * tiny.embed_norm
    table, end = tiny.model.get_input_embeddings(), Placement(at_end=True)
    chat = [{"role": "user", "content": "The quick brown fox jumps"}]
    prompt = build_chat_prompt(tiny.tokenizer, chat, th, placement=end)
    expected = []
    with torch.no_grad():
        for _ in range(10):
            embeds = torch.cat([embed_prompt(table, prompt), table(torch.tensor(expected, dtype=torch.long))])[None]
            expected.append(int(tiny.model(inputs_embeds=embeds).logits[0, -1].argmax()))
    engine, params = Engine(tiny), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    other = build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Hello"}], th * 0.5, placement=end)
    assert engine.generate([prompt], params)[0].token_ids == expected
    assert engine.generate([other, prompt], params)[1].token_ids == expected
    assert engine.generate([build_chat_prompt(tiny.tokenizer, chat, th)], params)[0].token_ids != expected


def test_reply_only_prompt_past_a_sliding_window_is_refused(sliding):
    bb, _ = sliding
    th = torch.zeros(2, bb.hidden_size)
    long = build_chat_prompt(bb.tokenizer, [{"role": "user", "content": "The quick brown fox jumps over the lazy dog"}], th,
                             placement=Placement(reply_only=True))
    with pytest.raises(ValueError, match="sliding window of 8"):
        Engine(bb).add(long, GREEDY)


def test_sliding_window_backbone_alone_batched_and_joining(sliding):
    """Prompts and replies longer than the window; a request joins a running batch (the caches are merged)."""
    bb, full_attention = sliding
    messages = [[{"role": "user", "content": "The quick brown fox jumps over the lazy dog"}], [{"role": "user", "content": "Hi"}]]
    prompts = [build_chat_prompt(bb.tokenizer, m) for m in messages]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine = Engine(bb)
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert alone == [_hf_greedy(bb, m, 20) for m in messages]
    assert alone != [Engine(full_attention).generate([p], params)[0].token_ids for p in prompts]  # the window matters
    assert [r.token_ids for r in engine.generate(prompts, params)] == alone
    first = engine.add(prompts[0], params)
    for _ in range(12):  # past the window before the second request joins
        engine.step()
    second = engine.add(prompts[1], params)
    results = {}
    while engine.has_work():
        results.update((o.request_id, o.result.token_ids) for o in engine.step() if o.finished)
    assert [results[first], results[second]] == alone


def _guided_prompt(tiny):
    """A reply-only prompt with random thoughts, its plain prompt as guide, and the backbone's last logits after a
    reply so far (two full forwards a token: the reference guided decoding is checked against)."""
    th = torch.randn(4, tiny.hidden_size, generator=torch.Generator().manual_seed(3)) * tiny.embed_norm
    table, chat = tiny.model.get_input_embeddings(), [{"role": "user", "content": "The quick brown fox jumps"}]
    prompt = build_chat_prompt(tiny.tokenizer, chat, th, placement=Placement(reply_only=True))
    prompt.guide = build_chat_prompt(tiny.tokenizer, chat)

    def last_logits(p, reply):
        embeds, mask, positions = left_pad([torch.cat([embed_prompt(table, p), table(torch.tensor(reply, dtype=torch.long))])])
        attention = hiding_mask(mask, [p.hidden_thoughts()], embeds.dtype)
        return tiny.model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).logits[0, -1].float()

    return th, prompt, last_logits


def test_guidance_decodes_as_two_full_forwards_alone_batched_and_in_a_batch_of_one(tiny):
    """Guided greedy: each token the argmax of plain + g * (with thoughts - plain), both fed the reply so far."""
    th, prompt, last_logits = _guided_prompt(tiny)
    expected = []
    with torch.no_grad():
        for _ in range(10):
            plain = last_logits(prompt.guide, expected)
            expected.append(int((plain + 2.5 * (last_logits(prompt, expected) - plain)).argmax()))
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, guidance=2.5)
    other = build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Hello"}], th * 0.5)
    assert Engine(tiny).generate([prompt], params)[0].token_ids == expected
    engine = Engine(tiny, max_batch_size=3)  # the guided request waits until it and its guide fit together
    results = engine.generate([other, other, prompt], params)
    assert results[2].token_ids == expected and results[2].prompt_tokens == prompt.num_tokens
    assert Engine(tiny, max_batch_size=1).generate([prompt], params)[0].token_ids == expected
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    unguided = Engine(tiny).generate([prompt], plain)[0].token_ids
    assert unguided != expected  # the guidance matters
    assert Engine(tiny).generate([prompt], replace(plain, guidance=1))[0].token_ids == unguided  # 1 leaves the guide out


def test_gated_guidance_guides_only_positions_the_thoughts_move():
    plain = torch.tensor([[2.0, 0.0, -1.0], [2.0, 0.0, -1.0]])
    read = torch.tensor([[2.0, 0.1, -1.0], [0.0, 3.0, -1.0]])  # a nudge (KL ~0.006 nats), and a new argmax (~2.3)
    guided = plain + 2.0 * (read - plain)
    assert torch.equal(guided_logits(read, plain, 2.0), guided)
    gated = guided_logits(read, plain, 2.0, 0.1)
    assert torch.equal(gated[0], plain[0]) and torch.equal(gated[1], guided[1])
    rows = guided_logits(read, plain, torch.tensor([[2.0], [3.0]]), torch.tensor([[0.0], [5.0]]))  # per request
    assert torch.equal(rows[0], guided[0]) and torch.equal(rows[1], plain[1])


def test_gated_guidance_decodes_as_the_gate_reads_each_position(tiny):
    """Greedy with `guidance_gate`: each token the argmax of the guided logits where the thoughts' KL to the plain
    prompt exceeds the gate, of the plain prompt's elsewhere; a gate past every KL gives the plain prompt's reply."""
    _, prompt, last_logits = _guided_prompt(tiny)

    def decode(gate):
        tokens, kls = [], []
        with torch.no_grad():
            for _ in range(10):
                plain, read = last_logits(prompt.guide, tokens), last_logits(prompt, tokens)
                kls.append(float(F.kl_div(plain.log_softmax(-1), read.log_softmax(-1), log_target=True, reduction="sum")))
                tokens.append(int(guided_logits(read, plain, 2.5, gate).argmax()))
        return tokens, kls

    ungated, kls = decode(0.0)
    gate = sorted(kls)[len(kls) // 2]  # about half the positions guided
    expected, _ = decode(gate)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, guidance=2.5, guidance_gate=gate)
    assert Engine(tiny).generate([prompt], params)[0].token_ids == expected
    assert expected != ungated
    closed = Engine(tiny).generate([prompt], replace(params, guidance_gate=1e9))[0].token_ids
    assert closed == Engine(tiny).generate([prompt.guide], replace(params, guidance=1))[0].token_ids
    with pytest.raises(ValueError, match="guidance_gate"):
        SamplingParams(guidance_gate=-0.1)


def test_aborting_a_guided_request_drops_its_guide(tiny):
    th = torch.randn(4, tiny.hidden_size, generator=torch.Generator().manual_seed(4)) * tiny.embed_norm
    chat = [{"role": "user", "content": "Hello"}]
    prompt = build_chat_prompt(tiny.tokenizer, chat, th)
    prompt.guide = build_chat_prompt(tiny.tokenizer, chat)
    engine = Engine(tiny)
    keep = engine.add(prompt, SamplingParams(max_tokens=6, temperature=0, guidance=2.0))
    drop = engine.add(prompt, SamplingParams(max_tokens=50, temperature=0, guidance=2.0))
    engine.step()
    assert len(engine.running) == 4 and engine.num_unfinished() == 2
    engine.abort(drop)
    finished = []
    while engine.has_work():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == [keep] and engine.running == []
