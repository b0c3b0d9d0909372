"""Serving throughput: `phijax serve` under 64 concurrent streaming clients, against
`Sampler.generate` on the same work.

The `configs/bench-cpu-53m.yaml` model (random weights, seed 0), served by `phijax.serve.Server`
in its own process (so the clients do not share its GIL), with a byte-level BPE tokenizer.json
of the model's vocabulary size trained on the Python docs (`bench_tokenizer`, cached). `--clients` (64) asyncio clients
each send `--per-client` (2) streaming completions one after another through the official
`openai` client: token-id prompts of mixed lengths (`--prompts`), mixed output lengths
(`--outputs`), temperature 1, `ignore_eos` so every request makes exactly its max_tokens. A
request arriving while others decode joins at the next segment boundary.

Reported, after one untimed warm-up pass of the same work (compilation):
  serve      new tokens/s (all new tokens / wall time of the pass), and time to first token
             (request sent -> first streamed token) p50 and p99;
  generate   `Sampler.generate` on the same requests, `--max-batch` (64) at a time, in this
             process once the server has stopped: new tokens/s, and serve / generate
             (target >= 0.8); and what serve's engine did in the timed pass (admissions,
             segments, compilations, and their seconds);
  short      on the idle server, a `--long`-token request, then, once its first token has
             arrived, a 4-token request: the short one's time to first token and whether it
             finishes before the long one does (after one untimed round of the same).
The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TARGET = 0.8


def bench_tokenizer(vocab_size: int) -> Path:
    """A byte-level BPE tokenizer.json of `vocab_size` pieces trained with the `tokenizers`
    library on the Python docs that ship with Python (cached): a real Hugging Face tokenizer
    for the server to decode with; the random-weight model makes the text itself meaningless."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from phijax.data.chat import SPECIALS
    from phijax.data.corpus import documents

    path = Path.home() / ".cache" / "phijax" / "bench-serve" / f"bpe-{vocab_size}" / \
        "tokenizer.json"
    if not path.is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(documents(["builtin:python-docs"]), trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return path


def _sampler(config: str, vocab_limit: int):
    from flax import nnx

    from phijax.config import load_config
    from phijax.model import init_model
    from phijax.sampling import Sampler

    cfg = load_config(config, [])
    return Sampler(cfg.model, nnx.to_pure_dict(nnx.state(init_model(cfg.model, 0))),
                   vocab_limit=vocab_limit)


def _count_compiles() -> dict:
    """Compilations in this process from now on: {"compiles": n, "compile_s": seconds}."""
    import jax

    counts = {"compiles": 0, "compile_s": 0.0}

    def listen(event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            counts["compiles"] += 1
            counts["compile_s"] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    return counts


def serve_in_process(conn, config: str, tokenizer: str, max_batch: int, segment: int) -> None:
    """The server process: sends its port, then answers "stats" with the server's counts and
    its compilations so far, until "stop"."""
    import threading

    from phijax.data.tokenizer import load_tokenizer
    from phijax.serve import Server

    compiles = _count_compiles()
    tok = load_tokenizer(tokenizer)
    sampler = _sampler(config, tok.vocab_size)
    server = Server(sampler, tok, "bench", port=0, max_batch=max_batch, segment=segment)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conn.send(server.port)
    while conn.recv() == "stats":
        conn.send({**server.stats, **compiles})
    server.shutdown()
    server.server_close()


def workload(args, vocab_size: int) -> list[dict]:
    """Per request: prompt ids, max_tokens, seed (client c's k-th request is index k*C + c)."""
    rng = np.random.default_rng(0)
    n = args.clients * args.per_client
    prompts = rng.choice(args.prompts, n)
    outputs = rng.choice(args.outputs, n)
    return [{"prompt": rng.integers(1, vocab_size, int(p)).tolist(), "max_tokens": int(o),
             "seed": i} for i, (p, o) in enumerate(zip(prompts, outputs))]


async def _stream(client, request: dict, started: asyncio.Event | None = None):
    """(seconds to the first token, seconds to the end, tokens) of one streamed request;
    `started` is set at its first token."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(
        model="bench", prompt=request["prompt"], max_tokens=request["max_tokens"],
        temperature=1.0, seed=request["seed"], stream=True, logprobs=0,
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.tokens:
                if first is None:
                    first = time.perf_counter() - start
                    if started is not None:
                        started.set()
                tokens += len(choice.logprobs.tokens)
    return first, time.perf_counter() - start, tokens


async def _pass(url: str, requests: list[dict], clients: int):
    """All clients at once, each sending its requests one after another: (wall seconds,
    [(first-token s, total s, tokens)] in request order)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=1800)
    out: list = [None] * len(requests)

    async def one_client(c: int):
        for k in range(c, len(requests), clients):
            out[k] = await _stream(client, requests[k])

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return wall, out


async def _short_during_long(url: str, vocab_size: int, long_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=1800)
    rng = np.random.default_rng(1)
    long = {"prompt": rng.integers(1, vocab_size, 128).tolist(), "max_tokens": long_tokens,
            "seed": 1}
    short = {"prompt": rng.integers(1, vocab_size, 32).tolist(), "max_tokens": 4, "seed": 2}
    start = time.perf_counter()
    started = asyncio.Event()
    long_task = asyncio.ensure_future(_stream(client, long, started))
    await started.wait()
    short_sent = time.perf_counter() - start
    first, total, _ = await _stream(client, short)
    short_done = time.perf_counter() - start
    long_first, long_total, _ = await long_task
    await client.close()
    return {"long_new_tokens": long_tokens, "long_total_s": round(long_total, 2),
            "short_sent_at_s": round(short_sent, 2), "short_first_token_s": round(first, 3),
            "short_total_s": round(total, 3),
            "short_before_long": bool(short_done < long_total)}


def _generate_seconds(sampler, requests: list[dict], max_batch: int) -> float:
    from phijax.sampling import Request

    reqs = [Request(r["prompt"], max_new_tokens=r["max_tokens"], temperature=1.0,
                    seed=r["seed"]) for r in requests]
    start = time.perf_counter()
    for i in range(0, len(reqs), max_batch):
        sampler.generate(reqs[i:i + max_batch])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench-cpu-53m.yaml"))
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--per-client", type=int, default=2)
    p.add_argument("--prompts", type=int, nargs="+", default=[16, 64, 128, 256])
    p.add_argument("--outputs", type=int, nargs="+", default=[16, 64, 128, 192])
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--segment", type=int, default=8)
    p.add_argument("--long", type=int, default=384)
    args = p.parse_args()

    from phijax.config import load_config
    from phijax.data.tokenizer import load_tokenizer

    tokenizer = bench_tokenizer(load_config(args.config, []).model.vocab_size)
    vocab = load_tokenizer(tokenizer).vocab_size
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_in_process,
                       args=(child, args.config, str(tokenizer), args.max_batch, args.segment))
    proc.start()
    url = f"http://127.0.0.1:{parent.recv()}/v1"

    def server_stats() -> dict:
        parent.send("stats")
        return parent.recv()

    sampler = _sampler(args.config, vocab)
    requests = workload(args, vocab)
    asyncio.run(_pass(url, requests, args.clients))  # warm-up: compilation
    before = server_stats()
    wall, out = asyncio.run(_pass(url, requests, args.clients))
    after = server_stats()
    timed = {k: round(after[k] - before[k], 2) for k in
             ("admissions", "segments", "admit_s", "decode_s", "compiles", "compile_s")}
    asyncio.run(_short_during_long(url, vocab, args.long))  # warm-up
    short = asyncio.run(_short_during_long(url, vocab, args.long))
    parent.send("stop")
    proc.join(timeout=120)
    _generate_seconds(sampler, requests, args.max_batch)  # warm-up
    gen_s = _generate_seconds(sampler, requests, args.max_batch)
    report(args, requests, wall, out, gen_s, short, timed)


def report(args, requests, wall, out, gen_s, short, timed) -> None:
    new = sum(r["max_tokens"] for r in requests)
    assert sum(o[2] for o in out) == new, "a request got fewer tokens than it asked for"
    first = np.array([o[0] for o in out])
    serve_rate, gen_rate = new / wall, new / gen_s
    result = {"bench": "serve_throughput", "config": Path(args.config).name,
              "clients": args.clients, "requests": len(requests), "new_tokens": new,
              "prompt_lengths": args.prompts, "output_lengths": args.outputs,
              "max_batch": args.max_batch, "segment": args.segment,
              "serve_new_tokens_per_s": round(serve_rate, 1),
              "generate_new_tokens_per_s": round(gen_rate, 1),
              "ratio": round(serve_rate / gen_rate, 3), "target": TARGET,
              "ttft_p50_s": round(float(np.percentile(first, 50)), 3),
              "ttft_p99_s": round(float(np.percentile(first, 99)), 3), **short,
              **{f"serve_{k}": v for k, v in timed.items()}}
    print(f"\n{'run':<58} {'seconds':>8} {'new tok/s':>10}")
    print(f"{'phijax serve, ' + str(args.clients) + ' streaming clients':<58} {wall:>8.2f} "
          f"{serve_rate:>10,.1f}")
    print(f"{'Sampler.generate, same requests, ' + str(args.max_batch) + ' at a time':<58} "
          f"{gen_s:>8.2f} {gen_rate:>10,.1f}")
    print(f"ratio serve / generate: {result['ratio']} (target >= {TARGET}); time to first token "
          f"p50 {result['ttft_p50_s']} s, p99 {result['ttft_p99_s']} s")
    print(f"serve's engine in the timed pass: {timed['admissions']} admissions "
          f"({timed['admit_s']} s), {timed['segments']} segments ({timed['decode_s']} s), "
          f"{timed['compiles']} compilations ({timed['compile_s']} s)")
    print(f"short during long: first token after {short['short_first_token_s']} s, done at "
          f"{short['short_sent_at_s'] + short['short_total_s']:.2f} s; the {args.long}-token "
          f"request took {short['long_total_s']} s (short first: {short['short_before_long']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
