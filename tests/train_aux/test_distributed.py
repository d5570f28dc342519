"""Data-parallel training on a real local Ray Train cluster (gloo between CPU workers)."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from softthought.aux_model import WEIGHTS_NAME, SoftThoughtAux
from train_aux.distributed import train_on_ray
from train_aux.train import load_config, make_optimizer, train

pytestmark = pytest.mark.slow


def _events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _config(tmp_path, data_dir, tiny_dir, name, **more):
    # every term: the edited targets, copy thoughts, the probe (on every thought of 2 summaries of its own), the
    # preservation KL (on the first 3 of 4 examples)
    return load_config(None, dict(backbone=tiny_dir, dtype="float32", data_dir=str(data_dir), out=str(tmp_path / name),
                                  num_thoughts=4, copy_thoughts=2, steps=5, batch_size=4, log_every=1, save_every=5,
                                  edit_weight=4.0, probe_weight=0.5, probe_reads="all", probe_batch=2,
                                  preserve_weight=1.0, preserve_batch=3,
                                  preserve_tokens=16, seed=3) | more)


def test_two_workers_take_the_steps_one_takes(ray_cluster, tmp_path, data_dir, tiny_dir, tiny):
    """Same seed and data order: after 5 steps the aux weights of 1 and 2 Ray Train workers, and of a run in-process
    with gradient accumulation, agree to 1e-5 relative and their logged losses match."""
    one = train_on_ray(_config(tmp_path, data_dir, tiny_dir, "one"), workers=1)
    two = train_on_ray(_config(tmp_path, data_dir, tiny_dir, "two"), workers=2)
    alone = train(_config(tmp_path, data_dir, tiny_dir, "alone"), micro_batch=1)
    torch.manual_seed(3)
    start = SoftThoughtAux.for_backbone(tiny, num_thoughts=4, copy_thoughts=2, encoder_training="lora", lora_r=8)  # the start
    reference = load_file(one / WEIGHTS_NAME)

    def flat(weights):  # the aux parameters as one vector: Adam's first steps magnify rounding in a zero-init tensor
        return torch.cat([weights[name].reshape(-1) for name in sorted(reference)])

    for other in (two, alone):
        weights = load_file(other / WEIGHTS_NAME)
        assert weights.keys() == reference.keys()
        assert (flat(weights) - flat(reference)).norm() <= 1e-5 * flat(reference).norm()
    moved = (flat(load_file(start.save_pretrained(tmp_path / "start") / WEIGHTS_NAME)) - flat(reference)).norm()
    assert moved > 1e-3 * flat(reference).norm()  # five steps did move them, 100 times more than the runs differ
    losses = {run: [e["loss"] for e in _events(tmp_path / run) if "loss" in e] for run in ("one", "two", "alone")}
    assert len(losses["one"]) == 5 and losses["two"] == pytest.approx(losses["one"], rel=1e-5)
    assert losses["alone"] == pytest.approx(losses["one"], rel=1e-5)
    for run, workers in (("one", 1), ("two", 2)):
        events = _events(tmp_path / run)
        assert [w["rank"] for w in events[0]["workers"]] == list(range(workers))
        assert events[-1]["backbone_fingerprint_before"] == events[-1]["backbone_fingerprint_after"] == tiny.fingerprint
    assert (tmp_path / "two" / "ray").is_dir()  # Ray Train's record of the run and its checkpoints


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(ray_cluster, tmp_path, data_dir, tiny_dir):
    cfg = _config(tmp_path, data_dir, tiny_dir, "killed", steps=30, save_every=4, rollout_weight=1.0, rollout_batch=2,
                  rollout_tokens=8)
    log = tmp_path / "killed" / "log.jsonl"
    killed = {}

    def kill_rank_one():
        while not killed:
            events = _events(tmp_path / "killed") if log.exists() else []
            saved = [e["step"] for e in events if e.get("event") == "checkpoint"]
            if len(saved) >= 2:  # Ray Train registers a reported checkpoint when its controller next polls the workers
                pid = events[0]["workers"][1]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, after=saved[-1])
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_rank_one, daemon=True)
    watcher.start()
    final = train_on_ray(cfg, workers=2, max_failures=2)
    watcher.join(timeout=1)
    assert killed, "no checkpoint was written before the run ended"
    events = _events(tmp_path / "killed")
    starts = [e for e in events if e.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["step"] == 0
    assert 4 <= starts[1]["step"] <= killed["after"] and starts[1]["step"] % 4 == 0  # resumed from a checkpoint
    assert killed["pid"] not in [w["pid"] for w in starts[1]["workers"]]
    assert events[-1]["event"] == "end" and events[-1]["backbone_fingerprint_before"] == events[-1]["backbone_fingerprint_after"]
    assert json.loads((final / "config.json").read_text())["metadata"]["steps"] == 30


def test_no_optimizer_holds_a_backbone_parameter(tiny):
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2)
    cfg = load_config(None, {})
    optimizer = make_optimizer(aux, tiny, cfg, torch.nn.Linear(tiny.hidden_size, 3))
    backbone = {id(p) for p in tiny.model.parameters()}
    assert not any(id(p) in backbone for g in optimizer.param_groups for p in g["params"])
    tiny.model.get_input_embeddings().weight.requires_grad_(True)  # a backbone weight that could reach an optimizer
    try:
        aux.queries = tiny.model.get_input_embeddings().weight  # and one that did: refused
        with pytest.raises(AssertionError, match="backbone parameter"):
            make_optimizer(aux, tiny, cfg)
    finally:
        tiny.model.get_input_embeddings().weight.requires_grad_(False)
