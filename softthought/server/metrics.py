"""Prometheus metrics of the ingress (prometheus-client), served on its own `/metrics` route.

Backbone- and aux-side figures (batch size, aux latency, cache hits) travel back with each response and
are recorded here, so one scrape of the ingress sees the whole request path.
"""

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_TOKEN_TIME = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)

REQUESTS = Counter("softthought_requests_total", "HTTP requests by route and status code", ["route", "status"])
IN_FLIGHT = Gauge("softthought_requests_in_flight", "HTTP requests being handled")
LATENCY = Histogram("softthought_request_duration_seconds", "End-to-end request latency", ["route"], buckets=_LATENCY)
TTFT = Histogram("softthought_time_to_first_token_seconds", "Time from request arrival to the first output token",
                 buckets=_LATENCY)
TPOT = Histogram("softthought_time_per_output_token_seconds", "Mean time between output tokens of a request",
                 buckets=_TOKEN_TIME)
PROMPT_TOKENS = Counter("softthought_prompt_tokens_total", "Prompt positions processed (soft thoughts counted)")
COMPLETION_TOKENS = Counter("softthought_completion_tokens_total", "Tokens generated")
AUX_LATENCY = Histogram("softthought_aux_latency_seconds", "Time to get soft thoughts for a summary (cache hits included)",
                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
CACHE_HITS = Counter("softthought_thought_cache_hits_total", "Soft-thought cache hits")
CACHE_MISSES = Counter("softthought_thought_cache_misses_total", "Soft-thought cache misses (an encoder pass)")
BATCH_SIZE = Histogram("softthought_batch_size", "Sequences in the backbone batch at each step of a request",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
SUMMARIES_LEARNED = Counter("softthought_summaries_learned_total", "Summaries the preference memory stored, by where they "
                            "came from (onboarding, feedback)", ["source"])
RATINGS = Counter("softthought_feedback_ratings_total", "Ratings of stored completions (up, down)", ["rating"])
