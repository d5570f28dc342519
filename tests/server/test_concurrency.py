"""50 concurrent requests from 10 users (8 with stored summaries), batched together: each equals the same
request sent alone (greedy, fp32 server)."""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import on_each_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["hf", "vllm"])
def server(request, server):
    """On the reference engine's server and on vLLM's."""
    return on_each_engine(request, server)

SUMMARIES = [
    "Answer in French.", "I like very short answers.", "Use bullet points.", "Write everything in lowercase.",
    "I am a software engineer; be technical.", "End every answer with 'Cheers!'", "Call me Captain.",
    "Avoid commas.",
]
PROMPTS = ["Tell me about the sea.", "What is a cat?", "Give me a tip for sleeping well.", "Hi!",
           "Why is the sky blue?"]


def _ask(client, user, prompt, stream=False):
    kwargs = dict(model="softthought", messages=[{"role": "user", "content": prompt}], max_tokens=12,
                  temperature=0, user=user)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    return client.chat.completions.create(**kwargs).choices[0].message.content


def test_fifty_concurrent_requests_equal_each_alone(client, http):
    users = [f"user-{i}" for i in range(10)]
    for user, summary in zip(users, SUMMARIES):  # users 8 and 9 have no stored summary
        assert http.put(f"/v1/users/{user}/preferences", json={"summary": summary}).status_code == 200
    jobs = [(users[i % 10], PROMPTS[i // 10], i % 3 == 0) for i in range(50)]  # a third of them streaming
    before = _batch_stats(http)
    with ThreadPoolExecutor(max_workers=50) as pool:
        concurrent = list(pool.map(lambda job: _ask(client, *job), jobs))
    after = _batch_stats(http)
    alone = [_ask(client, user, prompt) for user, prompt, _ in jobs]
    assert concurrent == alone
    assert len({u for u, _, _ in jobs}) >= 8
    # the requests really shared batches
    mean_batch = (after[0] - before[0]) / (after[1] - before[1])
    assert mean_batch > 4, mean_batch


def _batch_stats(http):
    text = http.get("/metrics").text
    total = float(re.search(r"^softthought_batch_size_sum (\S+)", text, re.M).group(1))
    count = float(re.search(r"^softthought_batch_size_count (\S+)", text, re.M).group(1))
    return total, count
