"""GRPO rollout speed: grpo.py's batched sampling (inference.generate_group: prompts prefilled once, the group
decoded in one batch with the KV cache) against a loop that generates one reply at a time with model.generate, side by
side in one run.

    python bench/bench_rollout.py --model_path results/distill_final.pth --data_path data/demo/reasoning.jsonl
    python bench/bench_rollout.py --preset tiny --prompts 8 --num_generations 8 --max_new_tokens 128 --rounds 5

Both sample --num_generations replies to each of --prompts prompts (the first of --data_path's conversations, or
of a generated demo corpus) at temperature 1 with the same stop tokens, up to --max_new_tokens each. tokens/s counts
sampled reply tokens (the stop token included) per second of wall time. The rounds interleave the two (after a
warm-up round of each); the table shows the median and the range over rounds, and the ratio of the medians.
"""
import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpo  # noqa: E402
from checkpoint import load_model  # noqa: E402
from Config import PRESETS, describe, get_config  # noqa: E402
from dataset import load_tokenizer  # noqa: E402
from demo_data import generate_demo  # noqa: E402
from inference import cut_at_stop, generate_group, stop_ids  # noqa: E402
from model import Transformer  # noqa: E402


def batched(model, prompts, args, stops):
    streams = [random.Random(f"bench-{i}-{g}") for i in range(len(prompts)) for g in range(args.num_generations)]
    replies = generate_group(model, prompts, args.num_generations, args.max_new_tokens, stops, 1.0, streams)
    return sum(len(r) for r in replies)


def one_at_a_time(model, prompts, args, stops):
    tokens = 0
    for prompt in prompts:
        for _ in range(args.num_generations):
            reply = model.generate(torch.tensor([prompt]), args.max_new_tokens, temperature=1.0, stop_ids=stops)
            tokens += len(cut_at_stop(reply[0].tolist(), stops))
    return tokens


def measure(model, prompts, args, stops):
    """tokens/s of each implementation per round, the rounds interleaved after one warm-up round of each."""
    impls = {"batched (inference.generate_group)": batched, "one at a time (model.generate)": one_at_a_time}
    rates = {name: [] for name in impls}
    for round_ in range(args.rounds + 1):
        for name, run in impls.items():
            start = time.perf_counter()
            tokens = run(model, prompts, args, stops)
            if round_ > 0:
                rates[name].append(tokens / (time.perf_counter() - start))
    return rates


def load_prompts(args, tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data_path or generate_demo(tmp, scale=0.01)["reasoning"]
        prompts, _ = grpo.load_prompts([path], tokenizer, 10 ** 9, skip_bad=False)
    if len(prompts) < args.prompts:
        raise SystemExit(f"{path} has {len(prompts)} prompts; --prompts asks for {args.prompts}")
    return [p.ids for p in prompts[:args.prompts]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None, help="a checkpoint (default: a random model of --preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="random-init model of this size")
    p.add_argument("--data_path", default=None, help="reasoning JSONL (default: a generated demo corpus)")
    p.add_argument("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"))
    p.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch")
    p.add_argument("--num_generations", type=int, default=8, help="replies per prompt")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per implementation (after a warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer_path)
    if args.model_path:
        model, _ = load_model(args.model_path)
    else:
        torch.manual_seed(0)
        model = Transformer(get_config(args.preset, vocab_size=len(tokenizer)))
    model.eval()
    prompts = load_prompts(args, tokenizer)
    rates = measure(model, prompts, args, stop_ids(tokenizer, raw=False))
    print(f"\n{args.model_path or args.preset + ' preset'} ({describe(model.config)}), {args.prompts} prompts × "
          f"{args.num_generations} replies, up to {args.max_new_tokens} new tokens, temperature 1, cpu, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} interleaved rounds")
    print("| rollout | tokens/s (median) | min | max | vs one at a time |")
    print("|---|---:|---:|---:|---:|")
    baseline = statistics.median(rates["one at a time (model.generate)"])
    for name, r in rates.items():
        median = statistics.median(r)
        print(f"| {name} | {median:,.0f} | {min(r):,.0f} | {max(r):,.0f} | {median / baseline:.2f}× |")


if __name__ == "__main__":
    main()
