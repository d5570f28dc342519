import pytest
import torch

from softthought.splice import (
    THOUGHT_MARKER,
    PromptError,
    build_chat_prompt,
    build_text_prompt,
    embed_prompt,
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


def test_left_pad_masks_and_positions():
    a, b = torch.ones(3, 4), torch.full((5, 4), 2.0)
    embeds, mask, pos = left_pad([a, b])
    assert embeds.shape == (2, 5, 4)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert pos.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert torch.equal(embeds[0, 2:], a) and torch.equal(embeds[0, :2], torch.zeros(2, 4))
