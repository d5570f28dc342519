"""Application arguments: keys from config and environment, and the roots checkpoints may be rolled out from."""

import os

from softthought.server.config import ServerConfig, key_tenant


def test_admin_keys_come_from_config_and_environment_apart_from_api_keys(monkeypatch):
    monkeypatch.setenv("SOFTTHOUGHT_ADMIN_KEYS", " a2 ,, a3")
    monkeypatch.setenv("SOFTTHOUGHT_API_KEYS", "k2")
    config = ServerConfig(api_keys=["k1"], admin_keys=["a1", ""])
    assert config.resolved_admin_keys() == {"a1", "a2", "a3"}
    assert set(config.resolved_api_keys()) == {"k1", "k2"}


def test_each_key_has_a_tenant(monkeypatch):
    monkeypatch.setenv("SOFTTHOUGHT_API_KEYS", "k3=shop, k4")
    config = ServerConfig(api_keys={"k1": "shop", "k2": "bank"})
    assert config.resolved_api_keys() == {"k1": "shop", "k2": "bank", "k3": "shop", "k4": key_tenant("k4")}
    listed = ServerConfig(api_keys=["k1", "k2", "k5=bank", "b64key=="]).resolved_api_keys()
    assert listed["k1"] != listed["k2"] and "k1" not in listed["k1"]  # a plain list: one tenant per key, key unshown
    assert listed["k5"] == "bank" and listed["b64key=="] == key_tenant("b64key==")


def test_the_store_comes_from_config_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTTHOUGHT_STORE", "postgresql://app@db/prefs")
    assert ServerConfig().resolved_store() == "postgresql://app@db/prefs"
    assert ServerConfig(store_path=str(tmp_path / "a.db")).resolved_store() == str(tmp_path / "a.db")  # the old name
    monkeypatch.delenv("SOFTTHOUGHT_STORE")
    assert ServerConfig().resolved_store().endswith("preferences.db")


def test_checkpoint_roots_are_absolute_and_include_the_configured_checkpoints_parent(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = ServerConfig(aux_checkpoint=str(tmp_path / "ckpts" / "v1"), checkpoint_roots=[str(tmp_path / "link")])
    roots = config.resolved_checkpoint_roots()
    assert str(tmp_path / "real") in roots and str(tmp_path / "ckpts") in roots  # symlinks resolved
    assert any(r.endswith(os.path.join("softthought", "checkpoints")) for r in roots)  # the shipped ones
    assert all(os.path.isabs(r) for r in roots)


def test_auto_engine_keeps_a_masked_or_guided_checkpoint_on_the_reference_engine(tmp_path):
    import json
    import shutil

    from softthought.pipeline import DEFAULT_AUX_DIR
    from softthought.server.app import engine_for

    masked = shutil.copytree(DEFAULT_AUX_DIR, tmp_path / "masked")
    config = {**json.loads((masked / "config.json").read_text()), "guidance": 1.0, "guidance_gate": 0.0}  # unguided
    (masked / "config.json").write_text(json.dumps({**config, "thoughts_at": "system", "thoughts_seen_by": "reply"}))
    end = shutil.copytree(masked, tmp_path / "end")
    (end / "config.json").write_text(json.dumps({**config, "thoughts_at": "end"}))
    assert engine_for(ServerConfig(aux_checkpoint=str(masked))) == "hf"  # vLLM could not apply its mask
    assert engine_for(ServerConfig(aux_checkpoint=str(end))) == "auto"
    guided = shutil.copytree(end, tmp_path / "guided")
    (guided / "config.json").write_text(json.dumps({**config, "thoughts_at": "end", "guidance": 2.0}))
    assert engine_for(ServerConfig(aux_checkpoint=str(guided))) == "hf"  # vLLM decodes no guide sequence
    assert engine_for(ServerConfig(aux_checkpoint=None)) == "auto"
    assert engine_for(ServerConfig()) == "hf"  # the shipped checkpoint is guided
    assert engine_for(ServerConfig(aux_checkpoint=str(masked), engine="vllm")) == "vllm"  # refused later, with a message
