"""Two keys of two tenants (issue 30): each tenant's users are its own on every preference route and as `user` in
a completion; the same id in both tenants names two users."""

import httpx
import pytest

from .conftest import ADMIN_KEY, API_KEY, OTHER_TENANT_KEY

CHAT = {"model": "softthought", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}


@pytest.fixture()
def other(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {OTHER_TENANT_KEY}"}, timeout=120) as c:
        yield c


def test_another_tenant_can_neither_read_overwrite_delete_nor_use_a_user(http, other):
    put = http.put("/v1/users/shared-id/preferences", json={"summary": "Answer in French."})
    assert put.status_code == 200
    assert other.get("/v1/users/shared-id/preferences").status_code == 404
    assert other.delete("/v1/users/shared-id/preferences").status_code == 404
    assert other.delete("/v1/users/shared-id").status_code == 404
    chat = other.post("/v1/chat/completions", json={**CHAT, "user": "shared-id"}).json()
    assert chat["softthought"]["summary_source"] == "none"  # not A's summary

    # the same id in tenant B is B's own user, with its own versions
    assert other.put("/v1/users/shared-id/preferences", json={"summary": "Be brief."}).json()["version"] == 1
    assert other.get("/v1/users/shared-id/preferences").json()["summary"] == "Be brief."
    mine = http.get("/v1/users/shared-id/preferences").json()
    assert mine["summary"] == "Answer in French." and mine["version"] == put.json()["version"]
    chat = http.post("/v1/chat/completions", json={**CHAT, "user": "shared-id"}).json()
    assert chat["softthought"]["summary_source"] == "stored"
    assert chat["softthought"]["preference_version"] == put.json()["version"]


def test_forgetting_a_user_removes_what_is_stored_for_them(http, other):
    http.put("/v1/users/forget-me/preferences", json={"summary": "Answer in lowercase."})
    other.put("/v1/users/forget-me/preferences", json={"summary": "Answer in capitals."})
    assert http.delete("/v1/users/forget-me").json() == {"user": "forget-me", "deleted": True}
    assert http.get("/v1/users/forget-me/preferences").status_code == 404
    assert other.get("/v1/users/forget-me/preferences").json()["summary"] == "Answer in capitals."  # B's is B's


def test_an_admin_key_works_in_the_default_tenant(server, http):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        assert admin.put("/v1/users/admins-user/preferences", json={"summary": "x"}).status_code == 200
    assert http.get("/v1/users/admins-user/preferences").status_code == 404
    assert API_KEY != OTHER_TENANT_KEY
