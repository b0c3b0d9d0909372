"""Teacher runtime throughput against its bound.

A loopback OpenAI-compatible server (tests/teacher_server.py: ThreadingHTTPServer, daemon
threads, HTTP/1.1 keep-alive, deep accept queue) answers every request after `--delay-s`
(100 ms). `--requests` distinct chat calls go through `tools.teacher.Teacher` at `--concurrency`
(64), cache disabled. With a server that is never the bottleneck, the bound is
concurrency / delay = 64 / 0.1 = 640 requests/s; the target is >= 80% of it.

By default the server runs in its own process so that its threads do not share the client's GIL
(`--inproc` puts it in a thread of this process instead). One warm-up round opens the
connections first. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from teacher_server import serve_forever_in_process, start_server  # noqa: E402
from tools.teacher import Teacher, TeacherConfig  # noqa: E402


async def _drive(url: str, n: int, concurrency: int, warmup: int) -> tuple[float, dict]:
    teacher = Teacher(TeacherConfig(base_url=url, model="echo-1", api_key_env="PHIJAX_BENCH_NO_KEY",
                                    concurrency=concurrency, max_retries=2, timeout_s=30.0))
    try:
        await asyncio.gather(*(teacher.chat([{"role": "user", "content": f"warm {i}"}])
                               for i in range(warmup)))
        t0 = time.perf_counter()
        out = await asyncio.gather(*(teacher.chat([{"role": "user", "content": f"q{i}"}],
                                                  max_tokens=16, temperature=0.0)
                                     for i in range(n)))
        elapsed = time.perf_counter() - t0
        assert all(o == [f"echo: q{i}"] for i, o in enumerate(out)), "wrong answers"
        return elapsed, dict(teacher.usage)
    finally:
        await teacher.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--delay-s", type=float, default=0.1)
    ap.add_argument("--inproc", action="store_true", help="server in a thread of this process")
    args = ap.parse_args()

    if args.inproc:
        handle = start_server(delay_s=args.delay_s)
        url, proc, conn = handle.url, None, None
    else:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=serve_forever_in_process, args=(child,),
                           kwargs=dict(delay_s=args.delay_s), daemon=True)
        proc.start()
        url = conn.recv()
    try:
        elapsed, usage = asyncio.run(_drive(url, args.requests, args.concurrency, args.concurrency))
    finally:
        if proc is not None:
            conn.send("stop")
            stats = conn.recv()
            proc.join(timeout=10)
        else:
            stats = handle.stats.snapshot()
            handle.stop()

    rps = args.requests / elapsed
    bound = args.concurrency / args.delay_s
    ratio = rps / bound
    rows = [("requests", f"{args.requests}"), ("concurrency", f"{args.concurrency}"),
            ("server delay", f"{args.delay_s * 1000:.0f} ms"),
            ("server", "in-process thread" if args.inproc else "separate process"),
            ("cpus", f"{os.cpu_count()}"), ("elapsed", f"{elapsed:.2f} s"),
            ("throughput", f"{rps:.1f} req/s"), ("bound", f"{bound:.0f} req/s"),
            ("ratio", f"{ratio:.1%} (target >= 80%)"),
            ("retries", f"{usage['retries']}"), ("server requests", f"{stats['requests']}")]
    w = max(len(k) for k, _ in rows)
    print("teacher throughput (cache disabled)")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    print(json.dumps(dict(benchmark="teacher_throughput", requests=args.requests,
                          concurrency=args.concurrency, delay_s=args.delay_s,
                          server="inproc" if args.inproc else "process", cpus=os.cpu_count(),
                          elapsed_s=round(elapsed, 3), requests_per_s=round(rps, 1),
                          bound_requests_per_s=round(bound, 1), ratio=round(ratio, 3),
                          target_ratio=0.8, meets_target=ratio >= 0.8, retries=usage["retries"])))


if __name__ == "__main__":
    main()
