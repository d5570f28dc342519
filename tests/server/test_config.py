"""Application arguments: keys from config and environment, and the roots checkpoints may be rolled out from."""

import os

from softthought.server.config import ServerConfig


def test_admin_keys_come_from_config_and_environment_apart_from_api_keys(monkeypatch):
    monkeypatch.setenv("SOFTTHOUGHT_ADMIN_KEYS", " a2 ,, a3")
    monkeypatch.setenv("SOFTTHOUGHT_API_KEYS", "k2")
    config = ServerConfig(api_keys=["k1"], admin_keys=["a1", ""])
    assert config.resolved_admin_keys() == {"a1", "a2", "a3"}
    assert config.resolved_api_keys() == {"k1", "k2"}


def test_checkpoint_roots_are_absolute_and_include_the_configured_checkpoints_parent(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = ServerConfig(aux_checkpoint=str(tmp_path / "ckpts" / "v1"), checkpoint_roots=[str(tmp_path / "link")])
    roots = config.resolved_checkpoint_roots()
    assert str(tmp_path / "real") in roots and str(tmp_path / "ckpts") in roots  # symlinks resolved
    assert any(r.endswith(os.path.join("softthought", "checkpoints")) for r in roots)  # the shipped ones
    assert all(os.path.isabs(r) for r in roots)
