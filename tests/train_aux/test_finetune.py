import json
import shutil
from dataclasses import asdict

import pytest

from softthought.backbone import load_backbone
from softthought.ifeval import check_all
from train_aux.data import read_jsonl
from train_aux.train import data_hash


def test_a_per_user_copy_learns_that_users_examples_with_no_summary_in_the_prompt(tmp_path, data_dir, tiny_dir, monkeypatch):
    import train_aux.finetune as ft

    user = read_jsonl(data_dir / "train_users.jsonl")[3]
    seen, real = [], ft.target_loss

    def spy(model, table, tok, prompts, targets, *args):
        seen.extend((tok.decode(p.token_ids), t) for p, t in zip(prompts, targets))
        return real(model, table, tok, prompts, targets, *args)

    monkeypatch.setattr(ft, "target_loss", spy)
    cfg = ft.FinetuneConfig("lora", steps=2, lr=1e-3, batch_size=3, max_target_tokens=16)
    out = ft.finetune(cfg, tmp_path / "one", data_dir, backbone_name=tiny_dir, user=user)
    assert json.loads((out / "finetune.json").read_text()) == {**ft.recipe(cfg, data_dir), "user": user["user"]}
    assert len(seen) == 6
    for prompt, target in seen:
        assert user["summary"] not in prompt  # the preference is to live in the weights, not in the prompt
        assert all(check_all(target, user["checks"]))  # every target was edited for this one user


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_baselines_train_a_copy_and_save_a_loadable_model(tmp_path, data_dir, tiny_dir, tiny, mode):
    from train_aux.finetune import FinetuneConfig, finetune, recipe

    cfg = FinetuneConfig(mode, steps=2, lr=1e-3, batch_size=2, max_target_tokens=16)
    out = finetune(cfg, tmp_path / mode, data_dir, backbone_name=tiny_dir)
    recorded = json.loads((out / "finetune.json").read_text())  # what a report compares before reusing the copy
    assert recorded == {**asdict(cfg), "data_hash": data_hash(data_dir)} == recipe(cfg, data_dir)
    regenerated = shutil.copytree(data_dir, tmp_path / "regenerated")
    (regenerated / "answers.jsonl").write_text((data_dir / "answers.jsonl").read_text()[::-1])
    assert recipe(cfg, regenerated) != recorded  # new data: the copy would be trained again
    tuned = load_backbone(str(out), dtype="float32")
    assert tuned.fingerprint != tiny.fingerprint  # the copy was trained
    assert load_backbone(tiny_dir, dtype="float32").fingerprint == tiny.fingerprint  # the original was not


def test_cli_refuses_a_users_file_without_a_user(tmp_path, capsys):
    from train_aux.finetune import main

    with pytest.raises(SystemExit):  # the file alone would have been ignored: every user's examples, silently
        main(["--mode", "lora", "--out", str(tmp_path / "x"), "--users", str(tmp_path / "u.jsonl")])
    assert "pass --user" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
