"""Evaluation sharded over real Ray actors gives the figures one worker gives."""

import json

import pytest
import torch

from softthought.aux_model import SoftThoughtAux
from train_aux.data import write_jsonl
from train_aux.eval import main
from train_aux.users import make_users

pytestmark = pytest.mark.slow


def test_two_workers_write_the_json_one_worker_writes(ray_cluster, tiny_dir, tiny, tmp_path):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=4).save_pretrained(tmp_path / "aux")
    write_jsonl(tmp_path / "users.jsonl", make_users(4, 5, "e", held_out_phrasing=True))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Hello there.", "Tell me about the sea.", "Why?")])
    common = ["--backbone", tiny_dir, "--dtype", "float32", "--aux", str(aux), "--users", str(tmp_path / "users.jsonl"),
              "--shard-size", "3"]  # several chunks per condition, so that both workers take some
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        main(["personalization", *common, "--prompts", str(tmp_path / "prompts.jsonl"), "--pairs-per-user", "2",
              "--max-new-tokens", "8", "--workers", str(workers), "--json", str(out / "pers.json")])
        main(["general", *common, "--tasks", "piqa", "--n", "7", "--with-text", "--workers", str(workers),
              "--json", str(out / "gen.json")])
        main(["ifeval", *common, "--n", "5", "--max-new-tokens", "6", "--workers", str(workers), "--json", str(out / "ifeval.json")])
        runs[workers] = {name: json.loads((out / f"{name}.json").read_text()) for name in ("pers", "gen", "ifeval")}
    assert runs[1] == runs[2]
    pers, gen = runs[1]["pers"], runs[1]["gen"]
    assert pers["n_pairs"] == 8 and len(pers["soft"]["passed"]) == 8 and pers["samples"]
    assert len(gen["piqa"]["plain_loglik"]) == 7 and {"soft", "text"} <= set(gen["piqa"])
    assert runs[1]["ifeval"]["n"] == 5 and len(runs[1]["ifeval"]["soft"]["passed"]) == 5
    # in this process, unsharded: the same replies and scores here (fp32, where batching does not move a token)
    main(["general", *common, "--tasks", "piqa", "--n", "7", "--with-text", "--json", str(tmp_path / "here.json")])
    assert json.loads((tmp_path / "here.json").read_text())["piqa"]["plain_loglik"] == gen["piqa"]["plain_loglik"]
