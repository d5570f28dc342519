"""A new auxiliary checkpoint goes live under traffic with zero failed requests; bad ones are refused."""

import json
import shutil
import threading
import time

import httpx
import pytest
import torch

from softthought.aux_model import SoftThoughtAux

from .conftest import API_KEY

pytestmark = pytest.mark.slow


def _client_loop(base_url, stop, records, i):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        n = 0
        while not stop.is_set():
            body = {"model": "softthought", "messages": [{"role": "user", "content": f"Hello {n}"}], "max_tokens": 4,
                    "temperature": 0, "preference_summary": f"Client {i} likes short answers."}
            start = time.monotonic()
            try:
                if n % 2:
                    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
                        status, version = r.status_code, json.loads(lines[0][6:])["softthought"]["aux_version"]
                else:
                    r = c.post("/v1/chat/completions", json=body)
                    status, version = r.status_code, r.json()["softthought"]["aux_version"]
            except Exception as exc:  # a dropped connection counts as a failure
                status, version = repr(exc), None
            records.append((start, time.monotonic(), status, version))
            n += 1


def _wait_for(condition, what: str, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s  # a bound against a hang, far above any load seen
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {limit_s} s"
        time.sleep(0.1)


def test_rollout_under_traffic(server, admin, smollm, tiny, aux_dir, tmp_path):
    original = admin.get("/admin/aux").json()["version"]
    torch.manual_seed(123)
    new_dir = SoftThoughtAux.for_backbone(smollm, num_thoughts=8).save_pretrained(tmp_path / "new")
    new_version = SoftThoughtAux.from_pretrained(new_dir).version
    corrupt = tmp_path / "corrupt"
    shutil.copytree(new_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a tensor file")
    other_backbone = SoftThoughtAux.for_backbone(tiny, num_thoughts=4).save_pretrained(tmp_path / "other")

    stop, records = threading.Event(), []
    clients = [threading.Thread(target=_client_loop, args=(server.base_url, stop, records, i)) for i in range(4)]
    [t.start() for t in clients]
    try:
        # counted, not timed: the same traffic on either side of the switch however loaded the machine is
        _wait_for(lambda: len(records) >= 8, "8 requests before the rollout")
        resp = admin.post("/admin/aux", json={"checkpoint": str(new_dir)})
        assert resp.status_code == 200, resp.text
        rolled = resp.json()
        switched_at = time.monotonic()
        assert rolled["version"] == new_version and rolled["previous_version"] == original and rolled["changed"]
        for bad, words in ((corrupt, "model.safetensors"), (other_backbone, "fingerprint"), (tmp_path / "nothing", "missing")):
            refused = admin.post("/admin/aux", json={"checkpoint": str(bad)})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["code"] == "invalid_checkpoint" and words in error["message"]
        _wait_for(lambda: sum(r[0] > switched_at for r in records) >= 8, "8 requests sent after the rollout")
    finally:
        stop.set()
        [t.join() for t in clients]
    failures = [r for r in records if r[2] != 200]
    assert not failures, failures[:5]
    versions = [v for _, _, _, v in sorted(records)]
    assert versions[0] == original and versions[-1] == new_version
    assert all(v == new_version for start, _, _, v in records if start > switched_at)  # never an old thought again
    assert admin.get("/admin/aux").json()["version"] == new_version  # the refused ones changed nothing
    print(f"rollout took {rolled['rollout_s']} s; {len(records)} requests served during the test, 0 failed")
    # leave the server as the other tests expect it
    assert admin.post("/admin/aux", json={"checkpoint": str(aux_dir)}).json()["version"] == original
