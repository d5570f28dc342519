"""Where evaluation's heavy calls run: here, on the loaded backbone, or sharded over Ray workers.

An evaluation builds its prompts (and users' thoughts) once, then hands lists of them to `run.map(fn, items, ...)`,
where fn(backbone, chunk, ...) returns one result per item (`eval.generate_replies`, `eval.score_items`). `InProcess` calls it
on the whole list; `RayWorkers` splits the list into chunks of a fixed size that go round robin to N actors, each
with its own backbone replica (a GPU each with --gpus-per-worker), and puts the results back in order. The chunks do
not depend on N, so neither do the figures: 2 workers write the JSON 1 worker writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from softthought.backbone import Backbone, load_backbone

from .paths import enter_driver_cwd


class InProcess:
    """Each call on the whole list, in this process."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def map(self, fn: Callable, items: Sequence, *args) -> list:
        return list(fn(self.backbone, list(items), *args))


class RayWorkers:
    """`workers` Ray actors, each loading the backbone itself (refused unless its fingerprint is `fingerprint`)."""

    def __init__(self, backbone: str | None, dtype: str, fingerprint: str, workers: int, chunk: int,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, device: str = "auto") -> None:
        import ray

        worker = ray.remote(_Worker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
        self.chunk = chunk
        self.actors = [worker.remote(backbone, dtype, device, os.getcwd(), max(1, int(cpus_per_worker)))
                       for _ in range(workers)]
        found = ray.get([a.fingerprint.remote() for a in self.actors])
        if set(found) != {fingerprint}:
            raise RuntimeError(f"the workers' backbones are not the one evaluated ({fingerprint}): {found}")

    def map(self, fn: Callable, items: Sequence, *args) -> list:
        import ray

        chunks = [list(items[at : at + self.chunk]) for at in range(0, len(items), self.chunk)]
        refs = [self.actors[k % len(self.actors)].run.remote(fn, c, *args) for k, c in enumerate(chunks)]
        return [x for part in ray.get(refs) for x in part]


class _Worker:
    def __init__(self, backbone: str | None, dtype: str, device: str, cwd: str, threads: int) -> None:
        import torch

        enter_driver_cwd(cwd)
        torch.set_num_threads(threads)
        self.backbone = load_backbone(backbone, dtype=dtype, device=device)

    def fingerprint(self) -> str:
        return self.backbone.fingerprint

    def run(self, fn: Callable, items: list, *args) -> list:
        return list(fn(self.backbone, items, *args))
