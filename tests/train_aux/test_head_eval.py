import json

import pytest

from train_aux.eval import main
from train_aux.head_eval import tally


def test_tally_counts_each_user_once_in_the_group_of_the_form_asked_for():
    wanted = ["fr", "fr", "fr", None, None, "capital", "lowercase", None]
    named = ["fr", "de", None, "es", None, "capital", "fr", "lowercase"]
    t = tally(wanted, named)
    assert t["language"] == {"asked": 3, "not_asked": 5, "right": 1, "false": 1, "missed": 1, "wrong": 1}
    # a case user given a language is a wrong case; a false case is counted among the cases
    assert t["case"] == {"asked": 2, "not_asked": 6, "right": 1, "false": 1, "missed": 0, "wrong": 1}
    with pytest.raises(ValueError):
        tally(["fr"], [])


def test_head_cli_refuses_a_checkpoint_without_a_head(tiny_dir, tmp_path, capsys):
    from softthought.aux_model import SoftThoughtAux
    from softthought.backbone import load_backbone

    aux = SoftThoughtAux.for_backbone(load_backbone(tiny_dir, dtype="float32"), num_thoughts=2)
    aux.save_pretrained(tmp_path / "aux")
    with pytest.raises(SystemExit):
        main(["head", "--backbone", tiny_dir, "--aux", str(tmp_path / "aux"), "--json", str(tmp_path / "h.json")])
    assert "no language head" in capsys.readouterr().err


def test_shipped_head_names_the_hand_written_users_forms(tmp_path):
    users = "train_aux/data-broad/language_head_dev.jsonl,train_aux/data-broad/hand_users.jsonl"
    main(["head", "--users", users, "--json", str(tmp_path / "head.json")])
    report = json.loads((tmp_path / "head.json").read_text())
    assert report["languages"][:3] and report["language_confidence"] > 0
    head, hand = report["sets"]["language_head_dev"], report["sets"]["hand_users"]
    assert head["n"] == 22 and hand["n"] == 24
    # the shipped head (EXPERIMENTS.md, phase 15) names every hand-written form and none falsely
    assert head["language"]["asked"] > 0 and hand["case"]["asked"] > 0
    for s in (head, hand):
        assert all(s[g]["right"] == s[g]["asked"] and s[g]["false"] == 0 for g in ("language", "case"))
        assert s["not_right"] == []
