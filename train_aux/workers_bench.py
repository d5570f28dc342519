"""Step time of training in this process against Ray Train with 1 and N workers, on the same cores, in one run.

    python -m train_aux.workers_bench --config train_aux/configs/default.yaml --steps 8 --out benchmarks

Every run trains the same steps from the same seed on the same data (the first steps are left out of the mean: they
warm the caches). Rank 0's time outside computing its share: waiting for the slowest worker, then the all-reduces.
Writes OUT/training.json and OUT/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from .distributed import train_on_ray
from .train import load_config, train


def _steps(run: Path, skip: int) -> dict:
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [e for e in events if "loss" in e]
    first, last = steps[skip - 1], steps[-1]
    seconds = (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])
    per_step = {k: round(sum(e.get(k, 0.0) for e in steps[skip:]) / (last["step"] - first["step"]), 3)
                for k in ("wait_s", "allreduce_s")}
    return {"step_s": round(seconds, 3), **per_step, "losses": [e["loss"] for e in steps]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="train_aux/configs/default.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="steps left out of the mean")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks")
    a = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    results = {"cores": cores, "steps": a.steps, "config": a.config}
    with tempfile.TemporaryDirectory() as tmp:
        def config(name: str):
            return load_config(a.config, {"out": f"{tmp}/{name}", "steps": a.steps, "log_every": 1,
                                          "save_every": a.steps, "threads": None})

        train(config("here"))
        results["in-process"] = _steps(Path(tmp, "here"), a.skip)
        for workers in (1, a.workers):  # the same cores, shared among the workers
            train_on_ray(config(f"ray{workers}"), workers, cpus_per_worker=max(1, cores // workers), max_failures=0)
            results[f"ray-{workers}"] = _steps(Path(tmp, f"ray{workers}"), a.skip)
    base = results["in-process"]["step_s"]
    rows = ["| run | s/step | vs in-process | waiting for the slowest, s/step | all-reduce, s/step (share) |",
            "|---|---|---|---|---|"]
    for name in ("in-process", "ray-1", f"ray-{a.workers}"):
        r = results[name]
        rows.append(f"| {name} | {r['step_s']:.2f} | {r['step_s'] / base:.2f}x | {r['wait_s']:.3f} | "
                    f"{r['allreduce_s']:.3f} ({100 * r['allreduce_s'] / r['step_s']:.1f} %) |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(results, indent=2))
    (out / "training.md").write_text(f"# Training step time, {cores} cores, `{a.config}`, global batch as configured\n\n"
                                     + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
