"""Serving throughput of api_server.py: K concurrent streaming clients, batched against sequential serving.

    python bench/bench_serve.py --preset small --clients 1 8 32 --max_tokens 32 --rounds 2

Two servers run on loopback with the same weights (random init of --preset, or --model_path): "batched" decodes up
to max(--clients) requests together, "sequential" has --max_batch_size 1 (each request waits for the previous one,
as a server without batching does). For each K, K clients send streaming chat requests at once (sampling at
temperature 1, so every reply is different); the runs alternate batched / sequential. Reported: generated tokens
per second of wall time over all clients (usage.completion_tokens from the stream), as the median with the
min–max over the rounds; time to first token p50/p95 (request sent → first content chunk) over all requests of
all rounds; the batched throughput against one stream (the batched server's 1-client median) and against the
sequential server; and the load average before and after. The clients run on the same machine as the servers
and read each stream as lightly as they can (a chunk is parsed only until the first content and for the usage).
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import save_final  # noqa: E402
from Config import PRESETS, describe, get_config  # noqa: E402
from dataset import load_tokenizer  # noqa: E402
from model import Transformer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="random weights of this preset")
    p.add_argument("--model_path", default=None, help="serve this checkpoint instead of a random --preset model")
    p.add_argument("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per run")
    p.add_argument("--max_tokens", type=int, default=32, help="tokens per reply")
    p.add_argument("--rounds", type=int, default=2, help="runs per (K, server); TTFT percentiles pool them")
    p.add_argument("--device", default="cpu", help="the servers' --device")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the servers' --dtype")
    return p.parse_args(argv)


def random_checkpoint(preset, tokenizer_path, out_dir):
    vocab = len(load_tokenizer(tokenizer_path))
    config = get_config(preset, vocab_size=vocab)
    torch.manual_seed(0)
    print(f"random {preset} model: {describe(config)}, context {config.max_seq_len}", file=sys.stderr)
    return save_final(Transformer(config), config, out_dir, "bench", tokenizer_path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model_path, max_batch_size):
    """`python api_server.py` on a free loopback port; returns (process, base URL) once /health answers."""
    port = free_port()
    cmd = [sys.executable, os.path.join(ROOT, "api_server.py"), "--model_path", model_path, "--tokenizer_path",
           args.tokenizer_path, "--port", str(port), "--max_batch_size", str(max_batch_size), "--device",
           args.device, "--dtype", args.dtype, "--log_level", "warning"]
    process = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}: {' '.join(cmd)}")
        try:
            httpx.get(url + "/health", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"the server at {url} did not start")


async def one_request(client, url, i, max_tokens):
    """(time to first token, completion tokens) of one streamed chat request."""
    body = {"messages": [{"role": "user", "content": f"Request {i}: tell me a long story about the river."}],
            "max_tokens": max_tokens, "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]" or (first and '"usage"' not in line):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start, tokens


async def run_clients(url, k, max_tokens):
    """(tokens/s over the whole run, [TTFT per request]) for k simultaneous clients."""
    limits = httpx.Limits(max_connections=k + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, i, max_tokens) for i in range(k)))
        wall = time.perf_counter() - start
    return sum(tokens for _, tokens in results) / wall, [ttft for ttft, _ in results]


def percentile_ms(values, q):
    return float(np.percentile(values, q)) * 1000


def main(argv=None):
    args = parse_args(argv)
    args.load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path or random_checkpoint(args.preset, args.tokenizer_path, tmp)
        servers = {"batched": start_server(args, model_path, max(args.clients)),
                   "sequential": start_server(args, model_path, 1)}
        try:
            for _, url in servers.values():  # warm-up
                asyncio.run(run_clients(url, 2, 4))
            rows = []
            for k in args.clients:
                speed = {name: [] for name in servers}
                ttft = {name: [] for name in servers}
                for _ in range(args.rounds):
                    for name, (_, url) in servers.items():
                        tokens_per_s, ttfts = asyncio.run(run_clients(url, k, args.max_tokens))
                        speed[name].append(tokens_per_s)
                        ttft[name] += ttfts
                        print(f"K={k} {name}: {tokens_per_s:.1f} tokens/s", file=sys.stderr)
                rows.append((k, speed, ttft))
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait()
    print_table(args, rows)


def print_table(args, rows):
    model = args.model_path or f"random `{args.preset}`"
    print(f"\n{model}, {args.max_tokens} tokens per reply, {args.rounds} rounds, {args.device} {args.dtype}, "
          f"{os.cpu_count()} cpus, load average {args.load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"tokens/s = median (min–max) over rounds, TTFT over all requests\n")
    one = next((float(np.median(speed["batched"])) for k, speed, _ in rows if k == 1), None)
    print("| clients | batched tok/s | sequential tok/s | batched vs one stream | batched vs sequential | "
          "TTFT p50 / p95 batched (ms) | TTFT p50 / p95 sequential (ms) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k, speed, ttft in rows:
        b, s = float(np.median(speed["batched"])), float(np.median(speed["sequential"]))
        vs_one = f"{b / one:.1f}×" if one else ""
        print(f"| {k} | {b:.1f} ({min(speed['batched']):.1f}–{max(speed['batched']):.1f}) | {s:.1f} "
              f"({min(speed['sequential']):.1f}–{max(speed['sequential']):.1f}) | {vs_one} | {b / s:.2f}× | "
              f"{percentile_ms(ttft['batched'], 50):.0f} / {percentile_ms(ttft['batched'], 95):.0f} | "
              f"{percentile_ms(ttft['sequential'], 50):.0f} / {percentile_ms(ttft['sequential'], 95):.0f} |")


if __name__ == "__main__":
    main()
