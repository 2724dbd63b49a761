#!/usr/bin/env python3
"""Loopback load test of `moelab serve`.

1. Load: N concurrent streaming chat clients (default 32) send requests back to back for D
   seconds (default 60). Every response must be 200 with a complete stream (ends with
   `data: [DONE]`, usage chunk present); 5xx and cut streams are counted and fail the run.
2. Scaling: aggregate decode tokens/s with 1 stream, then with 8 concurrent streams (each
   for S seconds, default 20), and their ratio.

Uses httpx (installed with the openai package: target/pyenv/bin/python has it).

usage: target/pyenv/bin/python scripts/load-test.py --url http://127.0.0.1:8080
       [--clients 32] [--duration 60] [--scaling-seconds 20] [--json OUT]
Exit status 1 if any request failed (5xx, transport error, cut stream).
"""
import argparse
import asyncio
import json
import random
import statistics
import sys
import time

import httpx


def prompts(seed):
    rng = random.Random(seed)
    while True:
        k = rng.randrange(4)
        if k == 0:
            yield f"What is {rng.randrange(10, 10000)} + {rng.randrange(10, 10000)}?"
        elif k == 1:
            yield f"What is {rng.randrange(10, 1000)} * {rng.randrange(2, 100)}?"
        elif k == 2:
            yield f"Evaluate ({rng.randrange(1, 50)} + {rng.randrange(1, 50)}) * {rng.randrange(1, 9)}."
        else:
            yield "Sort " + " ".join(str(rng.randrange(100)) for _ in range(rng.randrange(3, 7))) + "."


class Stats:
    def __init__(self):
        self.status = {}
        self.errors = []
        self.cut = 0
        self.tokens = 0
        self.latency = []
        self.ttft = []

    def summary(self, elapsed):
        n = sum(self.status.values())
        pct = lambda xs, q: (sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan"))
        return {
            "requests": n,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "5xx": sum(v for k, v in self.status.items() if k >= 500),
            "transport_errors": len(self.errors),
            "cut_streams": self.cut,
            "completion_tokens": self.tokens,
            "seconds": round(elapsed, 2),
            "tokens_per_s": round(self.tokens / elapsed, 1),
            "latency_p50_s": round(pct(self.latency, 0.5), 3),
            "latency_p99_s": round(pct(self.latency, 0.99), 3),
            "ttft_p50_s": round(pct(self.ttft, 0.5), 3),
            "ttft_p99_s": round(pct(self.ttft, 0.99), 3),
        }


async def one(client, url, prompt, stats, headers):
    body = {"model": "moelab", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 256}
    t0 = time.perf_counter()
    first = None
    done = False
    usage = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            stats.status[r.status_code] = stats.status.get(r.status_code, 0) + 1
            if r.status_code != 200:
                await r.aread()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if chunk.get("error"):
                    # the server ended the reply (its shutdown): a cut stream, not a crash
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif first is None and chunk["choices"] and (
                        chunk["choices"][0]["delta"].get("content") or
                        chunk["choices"][0]["delta"].get("reasoning_content")):
                    first = time.perf_counter()
    except httpx.HTTPError as e:
        stats.errors.append(repr(e))
        return
    if not done or usage is None:
        stats.cut += 1
        return
    stats.tokens += usage["completion_tokens"]
    stats.latency.append(time.perf_counter() - t0)
    if first is not None:
        stats.ttft.append(first - t0)


async def run(url, clients, seconds, seed, headers):
    stats = Stats()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def worker(i):
            gen = prompts(seed * 1000 + i)
            while time.perf_counter() < deadline:
                await one(client, url, next(gen), stats, headers)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        return stats.summary(time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--scaling-seconds", type=float, default=20)
    ap.add_argument("--key", help="API key, if the server has keys")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    headers = {"Authorization": f"Bearer {a.key}"} if a.key else {}

    print(f"load: {a.clients} streaming clients for {a.duration:.0f} s against {a.url}", flush=True)
    load = asyncio.run(run(a.url, a.clients, a.duration, 1, headers))
    print(json.dumps(load, indent=1), flush=True)
    result = {"load": load}
    if a.scaling_seconds > 0:
        one_s = asyncio.run(run(a.url, 1, a.scaling_seconds, 2, headers))
        print(f"1 stream:  {one_s['tokens_per_s']} tokens/s", flush=True)
        eight = asyncio.run(run(a.url, 8, a.scaling_seconds, 3, headers))
        ratio = eight["tokens_per_s"] / one_s["tokens_per_s"] if one_s["tokens_per_s"] else 0.0
        print(f"8 streams: {eight['tokens_per_s']} tokens/s aggregate = {ratio:.2f}x one stream", flush=True)
        result.update({"one_stream": one_s, "eight_streams": eight, "ratio_8_vs_1": round(ratio, 2)})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    failed = [(k, v) for k, v in result.items() if isinstance(v, dict)
              and (v["5xx"] or v["transport_errors"] or v["cut_streams"] or v["requests"] == 0)]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        sys.exit(1)
    print("ok: no 5xx, every stream complete")


if __name__ == "__main__":
    main()
