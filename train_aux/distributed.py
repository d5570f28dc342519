"""Data-parallel training of the auxiliary model on Ray Train.

`TorchTrainer` starts N workers, each with its own frozen backbone replica on its device (a GPU with
--gpus-per-worker, else the CPU, gloo between them). Every worker draws the same global batches and computes its share
(`train.train_step`); the aux model's gradients are summed with one all-reduce, so N workers take the steps one would.
Rank 0 writes the JSONL log and the checkpoints, which it reports to Ray Train: a worker that dies restarts the group
from the last one (up to --max-failures times).

    python -m train_aux.train --config train_aux/configs/default.yaml --workers 2 [--gpus-per-worker 1]
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from .paths import enter_driver_cwd
from .train import Shard, TrainConfig, train


def train_on_ray(cfg: TrainConfig, workers: int, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                 max_failures: int = 3, resume: bool = False, micro_batch: int | None = None) -> Path:
    """Run `train` on `workers` Ray Train workers (on the cluster `ray.init` finds, or a local one); returns OUT/final.
    Ray Train's own record of the run and its checkpoints go under OUT/ray."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = gpus_per_worker > 0
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.model_dump(), "resume": resume, "micro_batch": micro_batch, "cwd": os.getcwd(),
                           "threads": max(1, int(cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=time.strftime("train-%Y%m%d-%H%M%S"), storage_path=str(out / "ray"),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    final = out / "final"
    if not (final / "config.json").exists() and result.checkpoint is not None:
        # rank 0 ran on another node: the last checkpoint, from Ray's storage, less the optimizer's state
        with result.checkpoint.as_directory() as directory:
            shutil.copytree(directory, final, ignore=shutil.ignore_patterns("training_state.pt"))
    return final


def _worker(config: dict) -> None:
    """One Ray Train worker: `train` on its shard, reporting rank 0's checkpoints to Ray Train."""
    import ray.train
    import ray.train.torch

    enter_driver_cwd(config["cwd"])
    cfg = TrainConfig.model_validate(config["cfg"])
    if not cfg.threads:
        torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    shard = Shard(context.get_world_rank(), context.get_world_size())
    device = str(ray.train.torch.get_device())

    def report(step: int, directory: Path | None, metrics: dict) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:07d}",
                         delete_local_checkpoint_after_upload=False)

    run = dict(device=device, micro_batch=config["micro_batch"], shard=shard, on_checkpoint=report)
    restored = ray.train.get_checkpoint()  # set when the group restarts after a worker died
    if restored is None:
        train(cfg, resume=config["resume"], **run)
        return
    with restored.as_directory() as directory:
        train(cfg, resume_from=directory, **run)
