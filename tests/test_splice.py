import pytest
import torch

from softthought.splice import (
    THOUGHT_MARKER,
    Placement,
    PromptError,
    build_chat_prompt,
    build_text_prompt,
    embed_prompt,
    hiding_mask,
    left_pad,
)

MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]


def _thoughts(backbone, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, backbone.hidden_size, generator=g) * backbone.embed_norm


@pytest.mark.parametrize("which", ["smollm", "tiny"])
def test_text_positions_match_backbone_embeddings_and_thoughts_sit_at_marker(which, request):
    bb = request.getfixturevalue(which)
    tok, table = bb.tokenizer, bb.model.get_input_embeddings()
    vocab = len(tok)
    thoughts = _thoughts(bb)
    prompt = build_chat_prompt(tok, MESSAGES, thoughts)
    embeds = embed_prompt(table, prompt)
    before, th, after = prompt.segments
    assert th is thoughts
    assert embeds.shape == (len(before) + 5 + len(after), bb.hidden_size)
    # every non-thought position is exactly the backbone's own embedding of that token
    ids = torch.tensor(before + after)
    text_rows = torch.cat([embeds[: len(before)], embeds[len(before) + 5 :]])
    assert torch.equal(text_rows, table.weight[ids])
    # the thoughts are exactly where the marker was rendered
    assert torch.equal(embeds[len(before) : len(before) + 5], thoughts)
    from softthought.splice import render_chat_with_marker

    rendered = render_chat_with_marker(tok, MESSAGES)
    head, tail = rendered.split(THOUGHT_MARKER)
    assert tok.decode(before) == head and tok.decode(after) == tail
    assert "Hello, how are you today?" in tail
    assert len(tok) == vocab  # nothing added to the vocabulary


def test_marker_goes_into_system_turn_for_chatml(smollm):
    before, _, after = build_chat_prompt(smollm.tokenizer, MESSAGES, _thoughts(smollm)).segments
    assert smollm.tokenizer.decode(before) == "<|im_start|>system\n"
    assert smollm.tokenizer.decode(after).startswith("<|im_end|>\n<|im_start|>user\nHello")


def test_existing_system_message_keeps_its_text_after_the_thoughts(smollm):
    msgs = [{"role": "system", "content": "You are a pirate."}, *MESSAGES]
    before, _, after = build_chat_prompt(smollm.tokenizer, msgs, _thoughts(smollm)).segments
    assert smollm.tokenizer.decode(before) == "<|im_start|>system\n"
    assert smollm.tokenizer.decode(after).startswith("\nYou are a pirate.<|im_end|>")


def test_template_without_system_role_gets_thoughts_in_first_user_turn(tiny):
    before, _, after = build_chat_prompt(tiny.tokenizer, MESSAGES, _thoughts(tiny)).segments
    assert tiny.tokenizer.decode(before) == "<bos><start_of_turn>user\n"
    assert tiny.tokenizer.decode(after).startswith("\nHello, how are you today?<end_of_turn>")


@pytest.mark.parametrize("which", ["smollm", "tiny"])
def test_splicing_token_embeddings_reproduces_plain_token_logits(which, request):
    """If the 'thoughts' are the backbone's own embeddings of some text X, the spliced forward pass is
    exactly the forward pass on the tokens before + X + after: splicing adds nothing of its own."""
    bb = request.getfixturevalue(which)
    table = bb.model.get_input_embeddings()
    x_ids = bb.tokenizer("Answer in French.", add_special_tokens=False)["input_ids"]
    prompt = build_chat_prompt(bb.tokenizer, MESSAGES, table.weight[x_ids].detach())
    before, _, after = prompt.segments
    with torch.no_grad():
        spliced = bb.model(inputs_embeds=embed_prompt(table, prompt)[None]).logits
        plain = bb.model(input_ids=torch.tensor([before + x_ids + after])).logits
    assert torch.equal(spliced, plain)


def test_no_thoughts_is_the_plain_chat_template(smollm, tiny):
    for bb in (smollm, tiny):
        prompt = build_chat_prompt(bb.tokenizer, MESSAGES)
        expected = bb.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert prompt.segments == [list(expected)]
        assert prompt.num_thoughts == 0


def test_prompt_counts_thoughts_as_positions(smollm):
    prompt = build_chat_prompt(smollm.tokenizer, MESSAGES, _thoughts(smollm, k=7))
    assert prompt.num_thoughts == 7
    assert prompt.num_tokens == len(prompt.token_ids) + 7


def test_marker_in_user_text_is_refused(smollm):
    with pytest.raises(PromptError, match="marker"):
        build_chat_prompt(smollm.tokenizer, [{"role": "user", "content": f"hi {THOUGHT_MARKER}"}], _thoughts(smollm))


def test_template_rejection_is_a_prompt_error(tiny):
    with pytest.raises(PromptError, match="chat template"):
        build_chat_prompt(tiny.tokenizer, [{"role": "system", "content": "x"}, *MESSAGES])


def test_text_prompt_puts_thoughts_after_bos(tiny, smollm):
    th = _thoughts(tiny, k=3)
    p = build_text_prompt(tiny.tokenizer, "Hello", th)
    # this tokenizer adds no BOS by itself for plain text, so the thoughts come first
    assert isinstance(p.segments[0], torch.Tensor) or p.segments[0] == [tiny.tokenizer.bos_token_id]
    assert p.num_thoughts == 3
    assert build_text_prompt(smollm.tokenizer, "Hello").segments == [smollm.tokenizer("Hello")["input_ids"]]


@pytest.mark.parametrize("chat", [False, True])
def test_reply_only_thoughts_are_seen_by_the_prompts_last_position_alone(tiny, chat):
    """The prompt's text reads as if there were no thoughts; its last position, which predicts the reply, reads them."""
    tok, table = tiny.tokenizer, tiny.model.get_input_embeddings()
    th = _thoughts(tiny, k=3)

    def build(reply_only):
        if chat:
            return build_chat_prompt(tok, MESSAGES, th, placement=Placement(reply_only=reply_only))
        return build_text_prompt(tok, "The quick brown fox jumps over", th, placement=Placement(reply_only=reply_only))

    p = build(True)
    a, b, c = p.hidden_thoughts()
    assert b - a == 3 and c == p.num_tokens - 1
    assert build(False).hidden_thoughts() is None
    embeds, mask, positions = left_pad([embed_prompt(table, p)])
    text_positions = [i for i in range(p.num_tokens) if not a <= i < b]  # the text alone, numbered as in the prompt
    with torch.no_grad():
        hidden = tiny.model(inputs_embeds=embeds, attention_mask=hiding_mask(mask, [(a, b, c)], embeds.dtype),
                            position_ids=positions).logits[0]
        seen = tiny.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[0]
        plain = tiny.model(input_ids=torch.tensor([p.token_ids]), position_ids=torch.tensor([text_positions])).logits[0]
    assert torch.allclose(hidden[b:c], plain[a:-1], atol=1e-5)
    assert not torch.allclose(seen[b:c], plain[a:-1], atol=1e-3)  # without the mask the text reads the thoughts
    assert not torch.allclose(hidden[c], plain[-1], atol=1e-3)  # the last position reads them


def test_hiding_mask_is_the_padding_mask_when_nothing_is_hidden():
    _, mask, _ = left_pad([torch.ones(3, 4), torch.ones(5, 4)])
    assert hiding_mask(mask, [None, None], torch.float32) is mask
    full = hiding_mask(mask, [None, (1, 3, 4)], torch.float32)[:, 0] == 0  # allowed
    assert full.shape == (2, 5, 5)
    assert full[0, 4, 2:].all() and not full[0, 4, :2].any()  # row 0: padding hidden, causal
    assert not full[1, 3, 1:3].any() and full[1, 3, 0] and full[1, 3, 3]  # row 1: [1, 3) hidden from query 3
    assert full[1, 4, :5].all()  # ... but not from query 4, the last


def test_left_pad_masks_and_positions():
    a, b = torch.ones(3, 4), torch.full((5, 4), 2.0)
    embeds, mask, pos = left_pad([a, b])
    assert embeds.shape == (2, 5, 4)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert pos.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert torch.equal(embeds[0, 2:], a) and torch.equal(embeds[0, :2], torch.zeros(2, 4))


@pytest.mark.parametrize("chat", [False, True])
def test_thoughts_at_the_end_follow_the_plain_prompt_token_for_token(tiny, chat):
    """At the end the prompt is the plain one, generation header included, then the thoughts: no mask, and every
    user's prompt shares its prefix with the plain prompt."""
    tok, th, end = tiny.tokenizer, _thoughts(tiny, k=3), Placement(at_end=True)
    if chat:
        plain, p = build_chat_prompt(tok, MESSAGES), build_chat_prompt(tok, MESSAGES, th, placement=end)
    else:
        plain, p = (build_text_prompt(tok, "The quick brown fox", t, placement=end) for t in (None, th))
    assert p.segments[0] == plain.token_ids and p.segments[1] is th and len(p.segments) == 2
    assert p.hidden_thoughts() is None and p.num_tokens == len(plain.token_ids) + 3
    with pytest.raises(ValueError, match="reply only already"):
        Placement(at_end=True, reply_only=True)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("placement", [Placement(), Placement(reply_only=True), Placement(at_end=True)])
def test_a_guided_prompt_carries_the_plain_prompt_as_its_guide(smollm, chat, placement):
    tok, th = smollm.tokenizer, _thoughts(smollm, k=3)
    build = (lambda t, **kw: build_chat_prompt(tok, MESSAGES, t, **kw)) if chat else \
        (lambda t, **kw: build_text_prompt(tok, "The quick brown fox", t, **kw))
    guided, plain = build(th, placement=placement, guided=True), build(None)
    assert guided.guide.segments == plain.segments and guided.guide.num_thoughts == 0 and not guided.guide.reply_only
    assert guided.segments == build(th, placement=placement).segments  # the prompt itself is unchanged
    assert build(th, placement=placement).guide is None and build(None, guided=True).guide is None  # nothing to guide
