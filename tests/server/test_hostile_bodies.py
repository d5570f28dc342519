"""Generated request bodies thrown at the running ingress: never a 5xx, every error OpenAI-shaped (issue 29)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

# any JSON value, strings with lone surrogates included (what a hostile client escapes as "\ud800")
strings = st.text(max_size=20) | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | strings,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(strings, children, max_size=3),
    max_leaves=12,
)
# generation stays short whatever is drawn: counts are small or not counts at all
small_counts = st.integers(max_value=4) | json_values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 1]),
                                           "content": strings | json_values}), max_size=3)
FIELDS = {
    "temperature": json_values, "top_p": json_values, "seed": json_values, "stop": json_values, "user": json_values,
    "stream": json_values, "stream_options": json_values, "preference_summary": json_values, "ignore_eos": json_values,
    "presence_penalty": json_values, "frequency_penalty": json_values, "logprobs": json_values,
    "response_format": json_values, "echo": json_values, "max_tokens": small_counts, "n": small_counts,
    "max_completion_tokens": small_counts, "store": json_values,
}


@st.composite
def bodies(draw):
    body = {"model": draw(st.just("softthought") | json_values)}
    route = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    body["messages" if route.endswith("chat/completions") else "prompt"] = draw(messages | strings | json_values)
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(sorted(FIELDS)) | strings)  # a known parameter, or any key at all
        body[key] = draw(FIELDS.get(key, json_values))
    body.setdefault("max_tokens", 2)
    return route, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=bodies())
def test_generated_bodies_never_get_a_5xx(http, case):
    route, body = case
    resp = http.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert resp.status_code < 500, (body, resp.text)
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert "Traceback" not in error["message"]
    elif body.get("stream") is True:
        assert resp.text.rstrip().endswith("data: [DONE]")
    else:
        assert resp.json()["choices"]


MEMORY_FIELDS = {"id": json_values, "user": json_values, "rating": json_values, "choice": json_values,
                 "question": json_values}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(body=st.dictionaries(st.sampled_from(sorted(MEMORY_FIELDS)) | strings, json_values, max_size=4)
       | json_values, route=st.sampled_from(["/v1/feedback", "/v1/users/hostile/onboarding/onb-x/answers"]))
def test_generated_feedback_and_answer_bodies_never_get_a_5xx(http, body, route):
    resp = http.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500, (body, resp.text)
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
