"""The README's main command (`make serve`) brings up a server that curl can use: chat, stream, bad input."""

import json
import subprocess

import pytest

from softthought.server.process import ServerProcess

pytestmark = pytest.mark.slow
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def curl(*args: str) -> tuple[int, str]:
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=120)
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


def test_make_serve_answers_curl(tmp_path):
    srv = ServerProcess(["make", "-s", "serve"], 8000, tmp_path / "serve.log", env={"XDG_DATA_HOME": str(tmp_path)},
                        cwd=ROOT)
    srv.start()
    try:
        url = "127.0.0.1:8000/v1/chat/completions"
        request = {"model": "softthought", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        code, text = curl(url, "-H", "Content-Type: application/json", "-d", json.dumps(request))
        assert code == 200
        reply = json.loads(text)
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
        code, text = curl("-N", url, "-d", json.dumps({**request, "stream": True}))
        events = [line for line in text.splitlines() if line.startswith("data: ")]
        assert code == 200 and events[-1] == "data: [DONE]" and len(events) > 3
        assert json.loads(events[1][6:])["object"] == "chat.completion.chunk"
        code, text = curl(url, "-d", '{"model": "softthought", "messages": "nope"}')
        assert code == 400 and json.loads(text)["error"]["param"] == "messages"
    finally:
        srv.stop()
