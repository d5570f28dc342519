"""Bad input gets the right 4xx with an OpenAI-shaped body, and never a 500."""

import pytest

from .conftest import ADMIN_KEY, API_KEY

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
OK = {"model": "softthought", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

CASES = [
    # (name, method, path, body or raw bytes, headers, status, param)
    ("malformed json", "POST", "/v1/chat/completions", b'{"model": ', None, 400, None),
    ("body not an object", "POST", "/v1/chat/completions", [1, 2], None, 400, None),
    ("wrong type", "POST", "/v1/chat/completions", {**OK, "temperature": "hot"}, None, 400, "temperature"),
    ("temperature out of range", "POST", "/v1/chat/completions", {**OK, "temperature": 2.5}, None, 400, "temperature"),
    ("unknown model", "POST", "/v1/chat/completions", {**OK, "model": "gpt-9"}, None, 404, "model"),
    ("empty messages", "POST", "/v1/chat/completions", {**OK, "messages": []}, None, 400, "messages"),
    ("missing messages", "POST", "/v1/chat/completions", {"model": "softthought"}, None, 400, "messages"),
    ("bad role", "POST", "/v1/chat/completions", {**OK, "messages": [{"role": "wizard", "content": "x"}]}, None, 400,
     "messages.0.role"),
    ("unknown parameter", "POST", "/v1/chat/completions", {**OK, "tools": []}, None, 400, "tools"),
    ("penalty out of range", "POST", "/v1/chat/completions", {**OK, "frequency_penalty": 2.5}, None, 400,
     "frequency_penalty"),
    ("max_tokens over limit", "POST", "/v1/chat/completions", {**OK, "max_tokens": 100000}, None, 400, "max_tokens"),
    ("n too large", "POST", "/v1/chat/completions", {**OK, "n": 9}, None, 400, "n"),
    ("n zero", "POST", "/v1/chat/completions", {**OK, "n": 0}, None, 400, "n"),
    ("prompt too long", "POST", "/v1/chat/completions",
     {**OK, "messages": [{"role": "user", "content": "lorem ipsum " * 400}]}, None, 400, "messages"),
    ("summary too long", "POST", "/v1/chat/completions", {**OK, "preference_summary": "x" * 600}, None, 400,
     "preference_summary"),
    ("stream_options without stream", "POST", "/v1/chat/completions",
     {**OK, "stream_options": {"include_usage": True}}, None, 400, None),
    ("no api key", "POST", "/v1/chat/completions", OK, {"Authorization": ""}, 401, None),
    ("wrong api key", "GET", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, None),
    ("empty completion prompt", "POST", "/v1/completions", {"model": "softthought", "prompt": ""}, None, 400, "prompt"),
    ("unknown user preferences", "GET", "/v1/users/ghost/preferences", None, None, 404, "user"),
    ("delete unknown user", "DELETE", "/v1/users/ghost/preferences", None, None, 404, "user"),
    ("preferences without summary", "PUT", "/v1/users/u/preferences", {"text": "x"}, None, 400, None),
    ("preference summary too long", "PUT", "/v1/users/u/preferences", {"summary": "y" * 600}, None, 400, "summary"),
    # hostile input (issue 29): refused at the ingress, before any model work
    ("lone surrogate in a message", "POST", "/v1/chat/completions",
     b'{"model": "softthought", "messages": [{"role": "user", "content": "a\\ud800"}]}', None, 400,
     "messages.0.content"),
    ("lone surrogate in a completion prompt", "POST", "/v1/completions",
     b'{"model": "softthought", "prompt": "\\udfff"}', None, 400, "prompt"),
    ("lone surrogate in an inline summary", "POST", "/v1/chat/completions",
     b'{"model": "softthought", "messages": [{"role": "user", "content": "hi"}], "preference_summary": "\\ud800"}',
     None, 400, "preference_summary"),
    ("lone surrogate in a stored summary", "PUT", "/v1/users/u/preferences", b'{"summary": "\\ud800"}', None, 400,
     "summary"),
    ("json nested 10000 deep", "POST", "/v1/chat/completions", b'{"model": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
     None, 400, None),
    ("body over the size limit", "POST", "/v1/chat/completions",
     {**OK, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}, None, 413, None),
    ("prompt far over the token limit", "POST", "/v1/chat/completions",
     {**OK, "messages": [{"role": "user", "content": "lorem " * 150_000}]}, None, 400, "messages"),
    ("stream as a string", "POST", "/v1/chat/completions", {**OK, "stream": "yes"}, None, 400, "stream"),
    ("seed beyond 64 bits", "POST", "/v1/chat/completions", {**OK, "seed": 2**64}, None, 400, "seed"),
    ("user id too long in a path", "PUT", "/v1/users/" + "u" * 10_000 + "/preferences", {"summary": "x"}, None, 400,
     "user"),
    ("user id too long in the user field", "POST", "/v1/chat/completions", {**OK, "user": "u" * 10_000}, None, 400,
     "user"),
    ("checkpoint path with a NUL", "POST", "/admin/aux", {"checkpoint": "/tmp/a\x00b"}, ADMIN, 400, "checkpoint"),
    ("inference key on the admin API", "POST", "/admin/aux", {"checkpoint": "/tmp"}, None, 403, None),
    ("inference key reading the admin API", "GET", "/admin/aux", None, None, 403, None),
    ("no key on the admin API", "GET", "/admin/aux", None, {"Authorization": ""}, 401, None),
    ("unknown route", "GET", "/v1/nothing", None, None, 404, None),
    ("wrong method", "GET", "/v1/chat/completions", None, None, 405, None),
]


@pytest.mark.parametrize("name, method, path, body, headers, status, param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(http, name, method, path, body, headers, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
    resp = http.request(method, path, headers=headers, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param


def test_a_405_names_the_allowed_methods(http):
    resp = http.request("PATCH", "/v1/users/u/preferences")
    assert resp.status_code == 405
    assert set(resp.headers["allow"].replace(" ", "").split(",")) == {"GET", "PUT", "DELETE"}
    assert resp.json()["error"]["code"] == "method_not_allowed"


def test_a_long_prompt_is_refused_without_stalling_other_clients(http):
    """A body just under the size limit, refused by its characters alone: a short chat beside it is unaffected."""
    import concurrent.futures

    huge = {**OK, "messages": [{"role": "user", "content": "lorem " * 170_000}]}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        refused = [pool.submit(http.post, "/v1/chat/completions", json=huge) for _ in range(3)]
        short = pool.submit(http.post, "/v1/chat/completions", json=OK)
        assert short.result().status_code == 200
        for r in refused:
            assert r.result().status_code == 400
            assert r.result().json()["error"]["code"] == "context_length_exceeded"


def test_preference_versions_never_repeat_after_a_delete(http):
    assert http.put("/v1/users/versions/preferences", json={"summary": "a"}).json()["version"] == 1
    assert http.delete("/v1/users/versions/preferences").status_code == 200
    assert http.put("/v1/users/versions/preferences", json={"summary": "b"}).json()["version"] == 2


@pytest.mark.parametrize("path", ["/etc/passwd", "/etc", "/nonexistent/ckpt", "relative/ckpt", "/tmp/../etc"])
def test_rollout_outside_the_checkpoint_roots_reveals_nothing_of_the_filesystem(admin, path):
    resp = admin.post("/admin/aux", json={"checkpoint": path})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "checkpoint" and error["code"] == "invalid_checkpoint"
    # one message for all: whether the path exists, is a file or a directory stays unknown
    assert error["message"] == ("Checkpoint refused: only absolute paths under the server's checkpoint roots "
                                "(checkpoint_roots) can be loaded; the current one keeps serving.")


def test_health_shows_details_to_admin_keys_only(server, http, admin):
    import httpx

    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    assert http.get("/health").json() == {"status": "ok"}
    details = admin.get("/health").json()
    assert details["aux"]["checkpoint"] and details["backbone"]["fingerprint"]


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="softthought", messages=[{"role": "user", "content": "x"}], n=9)
    assert err.value.body["param"] == "n"
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bad_input_never_produced_a_500(http):
    # runs after the cases above in file order; the ingress counts every status it returned
    metrics = http.get("/metrics").text
    assert 'status="500"' not in metrics
    assert API_KEY  # the server under test requires a key
