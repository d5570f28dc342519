import json

import pytest
from pydantic import ValidationError

from softthought import protocol as oai

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("field, value", [
    ("stream", "yes"), ("stream", 1), ("seed", "5"), ("seed", 2**63), ("seed", -(2**63) - 1), ("max_tokens", 8.0),
    ("max_tokens", "8"), ("n", True), ("temperature", "0.5"), ("user", "a" * 257), ("user", "a\nb"),
    ("stream_options", {"include_usage": "true"}),
])
def test_integers_booleans_and_user_ids_are_taken_strictly(field, value):
    body = {**CHAT, field: value, **({"stream": True} if field == "stream_options" else {})}
    with pytest.raises(ValidationError) as info:
        oai.ChatCompletionRequest.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == field


def test_what_openai_accepts_is_accepted():
    req = oai.ChatCompletionRequest.model_validate(
        {**CHAT, "temperature": 1, "seed": 2**63 - 1, "user": "", "stream": False, "max_tokens": 8})
    assert req.temperature == 1.0 and req.seed == 2**63 - 1
    assert oai.ChatCompletionRequest.model_validate({**CHAT, "seed": -(2**63), "user": "ü" * 256}).user == "ü" * 256
    penalized = oai.ChatCompletionRequest.model_validate({**CHAT, "presence_penalty": -2, "frequency_penalty": 1.5})
    assert (penalized.presence_penalty, penalized.frequency_penalty) == (-2.0, 1.5)


@pytest.mark.parametrize("user", ["", "x" * 257, "a\x00b", "tab\there"])
def test_a_user_id_in_a_path_follows_the_fields_rule(user):
    with pytest.raises(oai.APIError) as info:
        oai.check_user_id(user)
    assert info.value.status == 400 and info.value.param == "user"


def test_json_tree_refuses_lone_surrogates_naming_where():
    for raw, param in [('{"messages": [{"content": "a\\ud800"}]}', "messages.0.content"),
                       ('{"prompt": "\\udc00"}', "prompt"), ('{"\\ud800": 1}', None)]:
        with pytest.raises(oai.APIError) as info:
            oai.check_json_tree(json.loads(raw))
        assert info.value.status == 400 and info.value.param == param
    oai.check_json_tree(json.loads('{"a": ["\\ud83d\\ude00", "é", {"b": [1, 2.5, null, true]}]}'))  # a real pair


def test_json_tree_refuses_deep_nesting_without_recursing():
    deep = current = []
    for _ in range(100_000):  # far deeper than Python's recursion limit
        current.append([])
        current = current[0]
    with pytest.raises(oai.APIError, match="nests deeper than 32"):
        oai.check_json_tree({"a": deep})
    shallow = {"a": [[[[{"b": "c"}]]]]}
    oai.check_json_tree(shallow)
