"""Preference-store benchmark: PUT and GET latency (one client) and throughput (many threads) of each store URL,
measured in one run, with ratios against the first URL.

    python -m softthought.store.bench /tmp/prefs.db postgresql://softthought@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import time

from . import open_store


def measure(url: str, ops: int = 400, threads: int = 16) -> dict:
    store = open_store(url)
    latency = {}
    for name, op in (("put", lambda i: store.put("bench", f"u{i % 50}", f"summary {i}")),
                     ("get", lambda i: store.get("bench", f"u{i % 50}"))):
        times = []
        for i in range(ops // 4):
            t0 = time.perf_counter()
            op(i)
            times.append(time.perf_counter() - t0)
        with cf.ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            list(pool.map(op, range(ops)))
            per_s = ops / (time.perf_counter() - t0)
        latency[name] = {"p50_ms": statistics.median(times) * 1e3, "p99_ms": sorted(times)[int(len(times) * 0.99)] * 1e3,
                         f"per_s_{threads}_threads": per_s}
    store.close()
    return latency


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--ops", type=int, default=400)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    results = {url: measure(url, args.ops, args.threads) for url in args.urls}
    base = results[args.urls[0]]
    print(f"| store | PUT p50 ms | PUT p99 ms | PUT/s ({args.threads} threads) | GET p50 ms | GET p99 ms | GET/s | "
          f"PUT/s vs first | GET/s vs first |")
    print("|---|---|---|---|---|---|---|---|---|")
    key = f"per_s_{args.threads}_threads"
    for url, r in results.items():
        print(f"| {url.split('://')[0] if '://' in url else 'sqlite'} | {r['put']['p50_ms']:.2f} | {r['put']['p99_ms']:.2f} "
              f"| {r['put'][key]:.0f} | {r['get']['p50_ms']:.2f} | {r['get']['p99_ms']:.2f} | {r['get'][key]:.0f} | "
              f"{r['put'][key] / base['put'][key]:.2f} | {r['get'][key] / base['get'][key]:.2f} |")


if __name__ == "__main__":
    main()
