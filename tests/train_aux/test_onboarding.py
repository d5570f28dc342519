"""The onboarding question bank's builder and the simulated-user evaluation of the preference memory."""

import json

import pytest
import torch

from softthought.aux_model import SoftThoughtAux
from softthought.ifeval import check
from softthought.preference_memory import Bank
from train_aux import onboarding_eval
from train_aux.onboarding_bank import atoms, build
from train_aux.paths import REPO_ROOT


@pytest.fixture(scope="module")
def bank():
    return Bank.load()


def test_the_builder_labels_every_reply_by_the_checkers_and_keeps_what_it_edited_towards(tmp_path):
    built = build(6, seed=3, data_dir=REPO_ROOT / "train_aux" / "data-broad")
    assert len(built.questions) == 6
    catalogue = atoms()
    for q in built.questions.values():
        assert len(q.options) == 3 and len({o.features for o in q.options}) == 3
        for o in q.options:
            assert o.features == {a.id for a in catalogue if check(o.text, a.instruction_id, a.kwargs)}
    (tmp_path / "bank.json").write_text(json.dumps(built.to_json()))
    assert Bank.load(tmp_path / "bank.json").questions == built.questions


def test_the_catalogue_phrases_each_preference_as_training_did_and_covers_five_languages():
    catalogue = {a.id: a for a in atoms()}
    assert {a for a in catalogue if a.startswith("language:")} == {f"language:{x}" for x in ("fr", "de", "es", "it", "pt")}
    assert catalogue["no_comma"].phrase == "Please don't use any commas in your replies."


def test_each_preference_is_phrased_as_the_checkpoints_thoughts_follow_it_best(tiny):
    from train_aux.onboarding_bank import PHRASE_STYLES, phrase_for
    from train_aux.users import phrasings

    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2).eval()
    catalogue = [a for a in atoms() if a.id in ("no_comma", "json")]
    phrased = phrase_for(catalogue, tiny, aux, ["Name a fruit."], max_new_tokens=4)
    assert [a.id for a in phrased] == ["no_comma", "json"]
    for a in phrased:  # one of its kind's training phrasings, never a held-out one
        allowed = [t for style, n in PHRASE_STYLES for t in (phrasings(a.kind).get(style) or [])[:-1][:n]]
        assert a.phrase in allowed


def test_recovery_reports_adaptive_and_random_curves_without_and_with_noise(bank):
    report = onboarding_eval.recovery(bank, n_users=12, questions=8, seed=0)
    curves = report["curves"]
    assert set(curves) == {f"{k}_noise_{n}" for k in ("adaptive", "random") for n in onboarding_eval.NOISES}
    assert all(len(c["recovered"]) == 8 for c in curves.values())
    assert curves["adaptive_noise_0.0"]["recovered"][-1] > curves["random_noise_0.0"]["recovered"][-1]


def test_end_to_end_and_memory_comparisons_generate_for_the_same_pairs(tiny, bank):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2).eval()
    prompts = ["Why is the sky blue?", "Name a fruit."]
    out = onboarding_eval.end_to_end(tiny, aux, bank, prompts, n_users=3, seed=0, pairs_per_user=1, max_new_tokens=4,
                                     questions=10, confidence=0.95)
    for noise in onboarding_eval.NOISES:
        row = out[f"noise_{noise}"]
        assert set(row["check_pass_rate"]) == {"none", "own_summary", "learned_summary"} and row["n_users"] == 3
        assert all(s["learned"] and s["own"] for s in row["samples"])
    memory = onboarding_eval.semantic_vs_episodic(tiny, aux, bank, prompts, n_users=2, seed=0, pairs_per_user=1,
                                                  max_new_tokens=4, examples=1)
    assert memory["n_users"] == 2 and set(memory["check_pass_rate"]) == {"semantic_soft", "episodic_text"}


def test_the_bank_digest_names_the_bank_an_evaluation_read(tmp_path, monkeypatch):
    shipped = onboarding_eval.bank_digest()
    rebuilt = tmp_path / "onboarding_questions.json"
    rebuilt.write_bytes(onboarding_eval.DEFAULT_BANK.read_bytes().replace(b'"q', b'"Q', 1))
    monkeypatch.setattr(onboarding_eval, "DEFAULT_BANK", rebuilt)
    assert onboarding_eval.bank_digest() != shipped  # a report keyed by it evaluates the rebuilt bank again
