"""The shipped default auxiliary checkpoint, with the real embedded backbone: what the CLI and the server load when
no --aux is given. Random-init auxiliary models cover the mechanics elsewhere; only this test notices a shipped
checkpoint that loads but does not personalize. And the pipeline reads a checkpoint as its config says."""

from pathlib import Path

import pytest

from softthought.aux_model import SoftThoughtAux
from softthought.generation import Engine, SamplingParams
from softthought.ifeval import check_all
from softthought.pipeline import DEFAULT_AUX_DIR, Pipeline, default_aux_dir
from train_aux.data import read_jsonl

DATA = Path(__file__).parents[1] / "train_aux" / "data-broad"


@pytest.fixture(scope="module")
def shipped():
    assert default_aux_dir() == DEFAULT_AUX_DIR, "no default checkpoint is shipped"
    return Pipeline.load(aux=DEFAULT_AUX_DIR)


def test_the_shipped_checkpoint_is_small_and_was_trained_on_this_backbone(shipped):
    assert sum(f.stat().st_size for f in DEFAULT_AUX_DIR.iterdir()) < 20_000_000
    assert shipped.aux.config.metadata["backbone_fingerprint"] == shipped.backbone.fingerprint


def test_the_shipped_thoughts_personalize_users_never_seen_in_training(shipped):
    # evaluation users, phrased with held-out phrasings; one prompt each, greedy, as `train_aux.eval personalization`
    users = read_jsonl(DATA / "eval_users.jsonl")[:16]
    prompts = [r["prompt"] for r in read_jsonl(DATA / "eval_prompts.jsonl")[:16]]
    params = SamplingParams(max_tokens=64, temperature=0)

    def checks_passed(summary_of) -> int:
        built = [shipped.prompt([{"role": "user", "content": p}], summary_of(u)) for u, p in zip(users, prompts)]
        replies = shipped.engine.generate(built, shipped.params(built[0], params))  # read as served: guided
        return sum(sum(check_all(r.text, u["checks"])) for r, u in zip(replies, users))

    plain, soft = checks_passed(lambda u: None), checks_passed(lambda u: u["summary"])
    n_checks = sum(len(u["checks"]) for u in users)
    # the shipped thoughts pass 10 of these 32 checks (22 kinds of preference), the plain backbone 1, random-init
    # thoughts 2
    assert soft >= max(plain + 4, n_checks // 4), (plain, soft, n_checks)


def test_a_summary_is_read_with_the_checkpoints_guidance(smollm, aux_dir):
    aux = SoftThoughtAux.from_pretrained(aux_dir, backbone=smollm).eval()
    pipe, chat = Pipeline(smollm, aux, Engine(smollm)), [{"role": "user", "content": "Name a fruit."}]
    params = SamplingParams(max_tokens=12, temperature=0)
    plain, read = pipe.chat(chat, params=params).token_ids, pipe.chat(chat, "I like French.", params).token_ids
    assert read != plain  # the thoughts change the reply
    aux.config.guidance = 0.0  # none of the difference they make
    assert pipe.chat(chat, "I like French.", params).token_ids == plain
    assert params.guidance == 1  # the caller's params are left as they were
