"""`softthought` console script: chat, aux-init, serve, rollout, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .backbone import DTYPES
from .engine import ENGINES


def _quiet() -> None:
    """Keep stdout for the reply alone: library chatter goes nowhere, progress bars off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def cmd_chat(args: argparse.Namespace) -> int:
    import asyncio

    import torch

    from .aux_model import CheckpointError, SoftThoughtAux
    from .engine import EngineSpec, make_engine
    from .generation import SamplingParams
    from .pipeline import default_aux_dir
    from .splice import OPENING, PromptError, build_chat_prompt

    aux = args.aux
    if args.summary and aux is None:
        aux = default_aux_dir()
        if aux is None:
            print("error: --summary needs an auxiliary checkpoint: pass --aux DIR "
                  "(`softthought aux-init --out DIR` makes an untrained one)", file=sys.stderr)
            return 2
    messages = [{"role": "user", "content": args.prompt}]
    loop = asyncio.new_event_loop()  # vLLM's engine belongs to the loop it starts on

    async def start():
        return make_engine(args.engine, EngineSpec(backbone=args.backbone, dtype=args.dtype,
                                                   max_tokens=args.max_tokens, enforce_eager=True))

    async def reply(engine, prompt):
        async for item in engine.generate(prompt, params, "chat"):
            sys.stdout.write(item.get("delta", ""))
            sys.stdout.flush()

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop or (),
            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        )
        thoughts, placement, model = None, OPENING, None
        if args.summary:  # before the engine starts: see engine_bench.run on OpenMP pools
            model = SoftThoughtAux.from_pretrained(aux).eval()
            with torch.inference_mode():
                thoughts, placement = model.encode([args.summary])[0], model.placement
            params.guidance, params.guidance_gate = model.config.guidance, model.config.guidance_gate
        engine = loop.run_until_complete(start())
        if model is not None:
            model.config.check_backbone(engine.info()["fingerprint"], aux)
        prompt = build_chat_prompt(engine.tokenizer, messages, thoughts, placement=placement, guided=params.guidance != 1)
        engine.check(prompt)
    except (CheckpointError, PromptError, ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        loop.run_until_complete(reply(engine, prompt))
    finally:
        engine.close()
    sys.stdout.write("\n")
    return 0


def cmd_aux_init(args: argparse.Namespace) -> int:
    import torch

    from .aux_model import EMBEDDED_ENCODER, SoftThoughtAux
    from .backbone import load_backbone

    torch.manual_seed(args.seed)
    backbone = load_backbone(args.backbone, dtype="float32")
    aux = SoftThoughtAux.for_backbone(
        backbone, encoder=args.encoder or EMBEDDED_ENCODER, num_thoughts=args.num_thoughts,
        copy_thoughts=args.copy_thoughts, encoder_training=args.encoder_training,
    )
    out = aux.save_pretrained(args.out)
    print(f"wrote an untrained auxiliary checkpoint to {out} (version {aux.version}, "
          f"K={aux.config.total_thoughts}, backbone {backbone.fingerprint})", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from .server.launch import load_serve_config, serve_forever

    http = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    store = args.store
    if store and "://" in store:
        if urlsplit(store).password is not None:
            print("error: --store must not carry a password (the command line is visible to every user of the "
                  "machine): set $PGPASSWORD, use ~/.pgpass, or pass the whole URL in $SOFTTHOUGHT_STORE", file=sys.stderr)
            return 2
    elif store:
        store = os.path.abspath(store)
    overrides = {
        "backbone": args.backbone, "aux_checkpoint": args.aux, "dtype": args.dtype, "engine": args.engine,
        "store": store, "api_keys": args.api_key, "admin_keys": args.admin_key,
    }
    if args.aux and args.aux != "default":
        overrides["aux_checkpoint"] = os.path.abspath(args.aux)
    config = load_serve_config(args.config, http, {k: v for k, v in overrides.items() if v is not None},
                               replicas={"Ingress": args.ingress_replicas} if args.ingress_replicas else None)
    return serve_forever(config, num_cpus=args.num_cpus, metrics_export_port=args.ray_metrics_port)


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import markdown, run

    aux = os.path.abspath(args.aux) if args.aux else None
    if args.engine:  # the backbone engines side by side, in this process
        from .engine_bench import run as run_engines

        run_engines(args.engine, Path(args.out), aux, args.dtype)
        print((Path(args.out) / "engines.md").read_text())
        return 0
    results = run(Path(args.out), args.url, aux, args.model, args.api_key, args.dtype)
    print(markdown(results))
    return 0 if all(c["holds"] for c in results["criteria"].values()) else 1


def cmd_rollout(args: argparse.Namespace) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    resp = httpx.post(args.url.rstrip("/") + "/admin/aux", json={"checkpoint": os.path.abspath(args.checkpoint)},
                      headers=headers, timeout=600)
    body = resp.json()
    if resp.status_code != 200:
        print(f"error: {body['error']['message']}", file=sys.stderr)
        return 1
    print(f"aux {body['previous_version']} -> {body['version']} in {body['rollout_s']:.2f} s")
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from .loadtest import markdown, run

    report = asyncio.run(run(args.url, args.api_key, args.requests, args.concurrency, args.disconnects, args.kill or [],
                             args.max_tokens, args.users, args.seed, log=lambda m: print(m, file=sys.stderr, flush=True)))
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["lost"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softthought", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="answer one prompt, printing only the reply")
    chat.add_argument("prompt")
    chat.add_argument("--summary", help="the user's preference summary (turned into soft thoughts)")
    chat.add_argument("--aux", help="auxiliary checkpoint directory (default: the shipped one)")
    chat.add_argument("--backbone", help="HF model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    chat.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    chat.add_argument("--engine", default="auto", choices=ENGINES, help="backbone engine (default: auto, vllm where it "
                      "is installed and a GPU is present)")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's presence_penalty, in [-2, 2]")
    chat.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's frequency_penalty, in [-2, 2]")
    chat.add_argument("--stop", action="append", help="stop string (repeatable)")
    chat.set_defaults(func=cmd_chat)

    init = sub.add_parser("aux-init", help="write a freshly initialized auxiliary checkpoint")
    init.add_argument("--out", required=True)
    init.add_argument("--backbone")
    init.add_argument("--encoder", help="HF encoder directory or hub id (default: embedded all-MiniLM-L6-v2); "
                      "embedded:SmolLM2-135M-Instruct has the frozen embedded backbone read the summary")
    init.add_argument("--num-thoughts", type=int, default=8)
    init.add_argument("--copy-thoughts", type=int, default=0,
                      help="further thoughts mixed from the backbone's own embeddings of the summary's tokens")
    init.add_argument("--encoder-training", default="frozen", choices=["frozen", "lora", "full"])
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_aux_init)
    serve = sub.add_parser("serve", help="start a local Ray cluster (127.0.0.1) and the OpenAI-compatible server")
    serve.add_argument("--config", help="Ray Serve config file (default: the packaged serve_local.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--backbone", help="override the app's backbone (HF directory or hub id)")
    serve.add_argument("--aux", help="override the app's auxiliary checkpoint directory")
    serve.add_argument("--dtype", choices=sorted(DTYPES))
    serve.add_argument("--engine", choices=ENGINES, help="backbone engine: hf (reference), vllm, or auto (vllm where it is "
                       "installed and a GPU is present)")
    serve.add_argument("--store", help="preference store: a SQLite file (sqlite:///path too) or postgresql://user@host:port/db, "
                       "password from $PGPASSWORD (default: $SOFTTHOUGHT_STORE, else a SQLite file)")
    serve.add_argument("--ingress-replicas", type=int, help="Ingress replicas (several need a store they can share)")
    serve.add_argument("--api-key", action="append", help="require this bearer key (repeatable; KEY=TENANT puts it in a "
                       "tenant, a plain key is its own tenant)")
    serve.add_argument("--admin-key", action="append", help="bearer key for /admin/* and /health's details (repeatable)")
    serve.add_argument("--num-cpus", type=int, help="CPUs Ray may schedule (default: all)")
    serve.add_argument("--ray-metrics-port", type=int, help="fixed port for Ray's own Prometheus metrics")
    serve.set_defaults(func=cmd_serve)

    rollout = sub.add_parser("rollout", help="switch a running server to a new auxiliary checkpoint, no downtime")
    rollout.add_argument("checkpoint")
    rollout.add_argument("--url", default="http://127.0.0.1:8000")
    rollout.add_argument("--admin-key", default=os.environ.get("SOFTTHOUGHT_ADMIN_KEY"))
    rollout.set_defaults(func=cmd_rollout)

    bench = sub.add_parser("bench", help="benchmark soft thoughts vs text, server overhead, batching, cache, load")
    bench.add_argument("--out", default="benchmarks", help="directory for bench.json, bench.md, bench.png")
    bench.add_argument("--url", help="use a running server instead of starting one (it must load the same models)")
    bench.add_argument("--aux", help="auxiliary checkpoint for the server it starts (default: the shipped one)")
    bench.add_argument("--model", default="softthought")
    bench.add_argument("--api-key", help="with --url: a key that may read /health's details (an admin key)")
    bench.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    bench.add_argument("--engine", action="append", choices=["hf", "vllm"],
                       help="compare these backbone engines instead (repeatable: --engine hf --engine vllm), in one run")
    bench.set_defaults(func=cmd_bench)

    loadtest = sub.add_parser("loadtest", help="load, client disconnects and replica kills against a server; prints what was lost")
    loadtest.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    loadtest.add_argument("--api-key", default=os.environ.get("SOFTTHOUGHT_API_KEY"))
    loadtest.add_argument("--requests", type=int, default=400)
    loadtest.add_argument("--concurrency", type=int, default=16)
    loadtest.add_argument("--max-tokens", type=int, default=16)
    loadtest.add_argument("--users", type=int, default=16, help="users whose summaries are written, used and read back")
    loadtest.add_argument("--disconnects", type=int, default=32, help="streams opened and hung up on after one event")
    loadtest.add_argument("--kill", action="append", choices=["Aux", "Backbone"],
                          help="kill -9 this deployment's replica under load (the server must run on this machine)")
    loadtest.add_argument("--seed", type=int, default=0)
    loadtest.add_argument("--json", help="also write the report here")
    loadtest.set_defaults(func=cmd_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    _quiet()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
