from softthought.bench import CRITERIA, markdown, plot, summary_of


def test_summary_of_cuts_to_the_token_budget(smollm):
    for n in (60, 150, 300):
        text = summary_of(smollm.tokenizer, n)
        assert abs(len(smollm.tokenizer(text, add_special_tokens=False)["input_ids"]) - n) <= 2


def _timing(ttft, latency, tokens):
    return {"prompt_tokens": tokens, "ttft_s": ttft, "latency_s": latency}


def test_report_and_plot_from_results(tmp_path):
    cost = {}
    for n in ("60", "150", "300"):
        e = {"summary_tokens": int(n), "text": _timing(0.2, 1.0, 200), "soft_cached": _timing(0.08, 0.9, 40),
             "soft_cold": _timing(0.1, 0.92, 40)}
        for k in ("soft_cached", "soft_cold"):
            e[f"{k}/text"] = {m: e[k][m] / e["text"][m] for m in ("prompt_tokens", "ttft_s", "latency_s")}
        cost[n] = e
    batching = {str(c): {"one_user": {"tokens_per_s": 30.0 * c ** 0.7, "mean_ttft_s": 0.1},
                         "different_users": {"tokens_per_s": 30.0 * c ** 0.7, "mean_ttft_s": 0.1},
                         "different/one": 1.0, "speedup_vs_single_stream": c ** 0.7} for c in (1, 2, 4, 8, 16)}
    results = {
        "meta": {"device": "cpu", "backbone": "b", "dtype": "bfloat16", "num_thoughts": 8, "server_startup_s": 20.0,
                 "server_rss_mb": 3000.0},
        "prompt_cost": cost,
        "server_overhead": {"64": {"completion_tokens": 64, "http_latency_s": 1.05, "in_process_latency_s": 1.0,
                                   "http/in_process": 1.05}},
        "batching": batching,
        "cache": {"miss_ms": 10.0, "hit_ms": 0.01, "hit/miss": 0.001},
        "under_load": {"background_streams": 8, "still_running_at_end": 8, "idle_ttft_s": 0.1, "loaded_ttft_s": 0.3,
                       "loaded/idle": 3.0},
    }
    md = markdown(results)
    assert "| TTFT soft/text, 150-token summary (cached thoughts) | 0.400 | <= 0.6 | yes |" in md
    assert "| TTFT of a new request under load / idle | 3.000 | <= 2.0 | NO |" in md  # a miss is reported as one
    assert len(CRITERIA) == 5
    plot(results, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 10_000
