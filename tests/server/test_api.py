"""The real server through the official openai client."""

import json
import shutil
import time

import pytest
import torch

from softthought.aux_model import SoftThoughtAux
from softthought.generation import Engine, SamplingParams
from softthought.splice import build_chat_prompt

from .conftest import on_each_engine

pytestmark = pytest.mark.slow
HELLO = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module", params=["hf", "vllm"])
def server(request, server):
    """Every test here runs on the reference engine's server and on vLLM's."""
    return on_each_engine(request, server)


def _in_process(smollm, aux_dir, messages, summary, max_tokens):
    thoughts, aux = None, SoftThoughtAux.from_pretrained(aux_dir, backbone=smollm).eval()
    if summary:
        with torch.no_grad():
            thoughts = aux.encode([summary])[0]
    guidance = aux.config.guidance if summary else 1.0
    prompt = build_chat_prompt(smollm.tokenizer, messages, thoughts, placement=aux.placement, guided=guidance != 1)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, guidance=guidance, guidance_gate=aux.config.guidance_gate)
    return Engine(smollm).generate([prompt], params)[0]


def test_chat_completion_matches_in_process_generation(client, smollm, aux_dir):
    resp = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=16, temperature=0)
    expected = _in_process(smollm, aux_dir, HELLO, None, 16)
    choice = resp.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == expected.finish_reason
    assert resp.usage.prompt_tokens == expected.prompt_tokens and resp.usage.completion_tokens == expected.completion_tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.to_dict()["softthought"]["summary_source"] == "none"


def test_streaming_is_incremental(client):
    start = time.perf_counter()
    stamps, text, usage = [], "", None
    stream = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=48, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter() - start)
            text += chunk.choices[0].delta.content
    assert len(stamps) >= 20
    assert stamps[0] < 0.3 * stamps[-1], f"first token at {stamps[0]:.2f}s, last at {stamps[-1]:.2f}s"
    assert usage is not None and usage.completion_tokens == 48
    full = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=48, temperature=0)
    assert text == full.choices[0].message.content


def test_stored_preferences_select_the_users_thoughts(client, http, admin, smollm, aux_dir):
    summary = "I am a chef. Answer in French, briefly."
    put = http.put("/v1/users/chef/preferences", json={"summary": summary})
    assert put.status_code == 200
    resp = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=16, temperature=0, user="chef")
    ext = resp.to_dict()["softthought"]
    assert ext["summary_source"] == "stored" and ext["preference_version"] == put.json()["version"]
    assert ext["aux_version"] == admin.get("/health").json()["aux"]["version"]
    expected = _in_process(smollm, aux_dir, HELLO, summary, 16)
    assert resp.choices[0].message.content == expected.text
    assert resp.usage.prompt_tokens == expected.prompt_tokens  # the K thoughts are counted
    plain = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=16, temperature=0)
    assert plain.usage.prompt_tokens != resp.usage.prompt_tokens


@pytest.mark.parametrize("fields", [{"thoughts_seen_by": "reply"}, {"thoughts_at": "end"}, {"guidance": 2.0},
                                    {"guidance": 2.0, "guidance_gate": 0.2}], ids=lambda f: "+".join(f))
def test_a_checkpoint_placing_its_thoughts_otherwise_is_served_as_the_library_reads_it(client, admin, smollm, aux_dir,
                                                                                        tmp_path, fields):
    """The same weights with the thoughts read by the reply only, placed after the prompt or guided (at every
    position or gated) are another version, and the server places, hides and guides the thoughts exactly as the library
    does; vLLM, which has no per-request mask and no guide sequence, refuses the masked and the guided ones and keeps
    serving the loaded one."""
    name = next(iter(fields))
    reply_dir = shutil.copytree(aux_dir, tmp_path / "reply")
    config = json.loads((reply_dir / "config.json").read_text())
    (reply_dir / "config.json").write_text(json.dumps({**config, **fields}))
    summary, original = "Answer like a pirate, in capitals.", admin.get("/admin/aux").json()["version"]
    answer = admin.post("/admin/aux", json={"checkpoint": str(reply_dir)})
    if name != "thoughts_at" and admin.get("/health").json()["backbone"]["engine"] == "vllm":
        words = "thoughts_at: end" if name == "thoughts_seen_by" else "engine 'hf'"
        assert answer.status_code == 400 and words in answer.json()["error"]["message"]
        assert admin.get("/admin/aux").json()["version"] == original
        return
    rolled = answer.json()
    try:
        assert rolled["changed"] and rolled["version"] != original
        assert all(admin.get("/admin/aux").json()[k] == v for k, v in fields.items())
        resp = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=16, temperature=0,
                                              extra_body={"preference_summary": summary})
    finally:
        assert admin.post("/admin/aux", json={"checkpoint": str(aux_dir)}).json()["version"] == original
    expected = _in_process(smollm, reply_dir, HELLO, summary, 16)
    assert resp.choices[0].message.content == expected.text
    assert expected.text != _in_process(smollm, aux_dir, HELLO, summary, 16).text  # the two readings differ


def test_inline_summary_overrides_the_stored_one(client, http):
    http.put("/v1/users/overridden/preferences", json={"summary": "Answer in German."})
    inline = "Answer like a pirate."
    a = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=12, temperature=0,
                                       user="overridden", extra_body={"preference_summary": inline})
    b = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=12, temperature=0,
                                       extra_body={"preference_summary": inline})
    assert a.to_dict()["softthought"]["summary_source"] == "inline"
    assert a.choices[0].message.content == b.choices[0].message.content


def test_unknown_user_gets_the_plain_backbone(client):
    a = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=10, temperature=0, user="nobody")
    b = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=10, temperature=0)
    assert a.to_dict()["softthought"]["summary_source"] == "none"
    assert a.choices[0].message.content == b.choices[0].message.content


def test_n_choices_with_seed_are_reproducible(client):
    kwargs = dict(model="softthought", messages=HELLO, max_tokens=10, temperature=1.0, seed=7, n=3)
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # different seeds per choice
    assert 3 <= a.usage.completion_tokens <= 30  # summed over the choices


def test_stop_sequence(client):
    full = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    stop = text.split()[3]
    cut = client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_penalties_are_applied_as_the_engine_applies_them(client, smollm):
    """OpenAI's presence and frequency penalties reach the engine: the reply is the in-process engine's with them,
    not the unpenalized one (negative ones, which favour repeats: the plain reply repeats nothing this early)."""
    kwargs = dict(model="softthought", messages=HELLO, max_tokens=24, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    penalized = client.chat.completions.create(**kwargs, presence_penalty=-2, frequency_penalty=-2)
    params = SamplingParams(max_tokens=24, temperature=0, presence_penalty=-2, frequency_penalty=-2)
    expected = Engine(smollm).generate([build_chat_prompt(smollm.tokenizer, HELLO)], params)[0].text
    assert penalized.choices[0].message.content == expected != plain


def test_ignore_eos_extension_runs_to_max_tokens(client):
    capital = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model="softthought", messages=capital, max_tokens=40, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 40
    full = client.chat.completions.create(model="softthought", messages=capital, max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40


def test_text_completions_and_streaming(client):
    resp = client.completions.create(model="softthought", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="softthought", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == resp.choices[0].text


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["softthought"]


def test_preference_api_round_trip(http):
    assert http.put("/v1/users/u1/preferences", json={"summary": "v1"}).json()["version"] == 1
    assert http.put("/v1/users/u1/preferences", json={"summary": "v2"}).json()["version"] == 2
    got = http.get("/v1/users/u1/preferences").json()
    assert (got["summary"], got["version"]) == ("v2", 2)
    assert http.delete("/v1/users/u1/preferences").json() == {"user": "u1", "deleted": True}
    assert http.get("/v1/users/u1/preferences").status_code == 404


def test_health_and_metrics(http, admin, client):
    health = admin.get("/health").json()
    assert health["status"] == "ok" and health["backbone"]["fingerprint"] and health["aux"]["version"]
    client.chat.completions.create(model="softthought", messages=HELLO, max_tokens=4, temperature=0,
                                   extra_body={"preference_summary": "metrics check"})
    text = http.get("/metrics").text
    for name in ("softthought_requests_total", "softthought_request_duration_seconds_bucket",
                 "softthought_time_to_first_token_seconds_bucket", "softthought_time_per_output_token_seconds_bucket",
                 "softthought_prompt_tokens_total", "softthought_completion_tokens_total",
                 "softthought_aux_latency_seconds_bucket", "softthought_thought_cache_misses_total",
                 "softthought_thought_cache_hits_total", "softthought_batch_size_bucket", "softthought_requests_in_flight"):
        assert name in text, name
    assert 'softthought_requests_total{route="/v1/chat/completions",status="200"}' in text
