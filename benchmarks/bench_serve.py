"""Serving throughput and latency: SmolLM2-135M-Instruct behind `allformers serve`, driven by the
real `openai` client at 1, 2, 4, 8, 16 and 32 concurrent streams.

The server runs in its own process (so the client's parsing does not share its interpreter),
with torch on all cores but one.
Each level sends `max(16, 4 x streams)` streamed chat requests (272 in all), `streams` at a time.
Prints a table, then one JSON object (last) with, per level, aggregate tokens/s, p50/p99
time-to-first-token and inter-token latency, and failed requests.
Targets: tokens/s at 16 streams >= 6x the single-stream figure; 0 failed of >= 200 requests.

    python benchmarks/bench_serve.py            # the full run (several minutes on a quiet machine)
    python benchmarks/bench_serve.py --quick    # 1, 2, 4 streams, 4 requests each, 16 tokens: proves it runs
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["a dragon who learns to cook", "the history of the bicycle", "why the sky is blue", "a lighthouse keeper",
          "how bread rises", "a trip to the moon", "the life of a honeybee", "a robot that paints",
          "the water cycle", "a detective in Paris", "how volcanoes form", "a friendly ghost"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, slots: int):
    cmd = [sys.executable, "-m", "allformers.cli.main", "serve", args.model, "--port", str(port),
           "--slots", str(slots), "--max-len", str(args.max_len), "--max-queue", "512", "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up in 10 minutes")


async def one_request(client, model: str, i: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    times, tokens = [], None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}],
            max_tokens=max_tokens, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if tokens is None or not times:
            raise RuntimeError("no text or no usage in the stream")
    except Exception as e:  # a failed request is counted, not fatal
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "start": t0, "end": time.perf_counter(), "ttft": times[0] - t0,
            "itl": list(np.diff(times)), "tokens": tokens}


async def run_level(url: str, model: str, streams: int, n_requests: int, max_tokens: int, offset: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    queue = list(range(offset, offset + n_requests))
    results = []

    async def worker():
        while queue:
            results.append(await one_request(client, model, queue.pop(0), max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if r["ok"]]
    itl = [x for r in ok for x in r["itl"]]
    ttft = [r["ttft"] for r in ok]
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if xs else None  # noqa: E731 (ms)
    return {"streams": streams, "requests": n_requests, "failed": n_requests - len(ok),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:3],
            "tokens": sum(r["tokens"] for r in ok), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="what `allformers serve` should load (default: SmolLM2-135M-Instruct)")
    p.add_argument("--levels", default="1,2,4,8,16,32", help="concurrent streams, comma-separated")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: max(16, 4 x streams))")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    p.add_argument("--max-len", type=int, default=512, help="the server's tokens per slot")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="the server's torch threads (default: all cores but one, which the client and the "
                        "server's event loop need: a torch thread that loses its core stalls every op)")
    p.add_argument("--quick", action="store_true", help="1, 2, 4 streams, 4 requests each, 16 tokens")
    args = p.parse_args()
    if args.quick:
        args.levels, args.requests, args.max_tokens = "1,2,4", 4, 16
    levels = [int(x) for x in args.levels.split(",")]
    proc, url = start_server(args, free_port(), slots=max(levels))
    try:
        asyncio.run(run_level(url, args.model, 1, 1, 8, offset=10_000))  # warm-up, not counted
        rows, offset = [], 0
        for streams in levels:
            n = args.requests or max(16, 4 * streams)
            row = asyncio.run(run_level(url, args.model, streams, n, args.max_tokens, offset))
            offset += n
            rows.append(row)
            print(f"{streams:>3} streams: {row['tokens_per_s']:8.1f} tokens/s   TTFT p50 {row['ttft_ms_p50']} ms "
                  f"p99 {row['ttft_ms_p99']} ms   ITL p50 {row['itl_ms_p50']} ms p99 {row['itl_ms_p99']} ms   "
                  f"failed {row['failed']}/{row['requests']}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    by = {r["streams"]: r for r in rows}
    total, failed = sum(r["requests"] for r in rows), sum(r["failed"] for r in rows)
    speedup = round(by[16]["tokens_per_s"] / by[1]["tokens_per_s"], 2) if 16 in by and 1 in by else None
    result = {"benchmark": "serve", "model": args.model, "max_tokens": args.max_tokens, "threads": args.threads,
              "cpus": os.cpu_count(), "quick": args.quick, "levels": rows, "requests": total, "failed": failed,
              "speedup_16_vs_1": speedup,
              "targets": {"speedup_16_vs_1 >= 6": None if speedup is None else speedup >= 6,
                          "0 failed of >= 200": failed == 0 and total >= 200}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
