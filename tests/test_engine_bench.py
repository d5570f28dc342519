"""`softthought bench --engine hf --engine vllm`: both engines measured in one run, on small sizes (the figures
themselves are the benchmark's, not a test's)."""

import json

import pytest

from softthought.cli import build_parser
from softthought.engine_bench import run

pytestmark = pytest.mark.slow


def test_the_bench_command_takes_several_engines():
    args = build_parser().parse_args(["bench", "--engine", "hf", "--engine", "vllm"])
    assert args.engine == ["hf", "vllm"]


def test_both_engines_in_one_run_write_the_table_and_plot(tmp_path):
    run(["hf", "vllm"], tmp_path, None, "float32", max_tokens=8, system_tokens=120)
    results = json.loads((tmp_path / "engines.json").read_text())
    for kind in ("hf", "vllm"):
        entry = results[kind]
        assert entry["info"]["engine"] == kind and entry["startup_s"] > 0
        shared = entry["shared_system_prompt"]
        assert shared["users"] == 16 and shared["prompt_tokens"] > 120 and shared["rest/first"] > 0
        for level in ("single_stream", "concurrency_8", "concurrency_16"):
            assert entry[level]["tokens_per_s"] > 0
    assert results["hf"]["info"]["fingerprint"] == results["vllm"]["info"]["fingerprint"]
    table = (tmp_path / "engines.md").read_text()
    assert "| | hf | vllm |" in table and "rest / first" in table
    assert (tmp_path / "engines.png").stat().st_size > 10_000
