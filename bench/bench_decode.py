"""Prefill and decode speed of our KV-cache generation against transformers' LlamaForCausalLM.generate, side by side.

    python bench/bench_decode.py --preset small --batch_sizes 1 8 --prompt_len 128 --new_tokens 128 --runs 5

Both run greedy decoding of exactly --new_tokens tokens (EOS stopping off for both) from the same random prompt, on
the same weights: the model (random init, or --model_path) is exported with export_hf.py and loaded back with
`AutoModelForCausalLM.from_pretrained`. Prefill = the first new token (prompt forward + one step); decode = every
later token. Runs alternate ours / transformers after a warm-up run; the table shows each one's median with the
min–max over the runs, the ratio of medians, and the load average before and after (other work on the machine
shows up there, not silently in the figures). --compile adds our model compiled as eval_model.py --compile does
(model.compile_for_decoding); its warm-up run compiles it.
"""
import argparse
import copy
import functools
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import load_model  # noqa: E402
from Config import PRESETS, describe, get_config  # noqa: E402
from export_hf import export_hf  # noqa: E402
from model import Transformer, compile_for_decoding  # noqa: E402


class Timing:
    """Wall-clock time of the first new token and of the whole generation."""

    def __init__(self):
        self.start, self.first, self.tokens = time.perf_counter(), None, 0

    def token(self):
        self.tokens += 1
        if self.first is None:
            self.first = time.perf_counter() - self.start

    def result(self, batch, prompt_len):
        total = time.perf_counter() - self.start
        return {"prefill": batch * prompt_len / self.first, "decode": batch * (self.tokens - 1) / (total - self.first),
                "tokens": self.tokens}


def run_ours(model, prompt, new_tokens):
    timing, steps = Timing(), []
    for nxt in model.generate_stream(prompt, new_tokens, temperature=0):
        timing.token()
        steps.append(nxt)
    return timing.result(*prompt.shape), torch.stack(steps, dim=1)


def run_hf(hf, prompt, new_tokens):
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):  # generate() calls put() with the prompt first, then with each new token
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                timing.token()

        def end(self):
            pass

    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    timing = Timing()
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config, streamer=Streamer())
    return timing.result(*prompt.shape), out[:, prompt.shape[1]:]


def measure(impls, batch, args):
    """Prefill/decode tokens/s of each implementation as (median, min, max) over args.runs alternating runs (after a
    warm-up, which also compiles the compiled model), and whether each gave transformers' tokens."""
    prompt = torch.randint(0, args.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
    results, tokens = {name: [] for name in impls}, {}
    with torch.no_grad():
        for run in range(args.runs + 1):
            for name, generate in impls.items():
                result, tokens[name] = generate(prompt, args.new_tokens)
                if tokens[name].shape[1] != args.new_tokens:
                    raise RuntimeError(f"expected {args.new_tokens} new tokens, got {tokens[name].shape[1]} ({name})")
                if run > 0:
                    results[name].append(result)
    same = {name: torch.equal(t, tokens["transformers"]) for name, t in tokens.items()}
    spread = {name: {k: (statistics.median(v), min(v), max(v)) for k in ("prefill", "decode")
                     for v in [[r[k] for r in runs]]}
              for name, runs in results.items()}
    return spread, same


def build_models(args, workdir):
    from transformers import AutoModelForCausalLM
    if args.model_path:
        model, _ = load_model(args.model_path)
    else:
        torch.manual_seed(0)
        model = Transformer(get_config(args.preset, max_seq_len=args.prompt_len + args.new_tokens))
    model = model.to(getattr(torch, args.dtype)).eval()
    export_hf(model, args.tokenizer_path, workdir, args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(workdir, dtype=getattr(torch, args.dtype)).eval()
    return model, hf


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="random-init model of this size")
    p.add_argument("--model_path", default=None, help="benchmark a checkpoint instead of a random preset model")
    p.add_argument("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"))
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="measured runs per implementation (after one warm-up)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--compile", action="store_true", help="also time a compiled copy of ours")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new_tokens must be at least 2 (the first new token is counted as prefill)")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        model, hf = build_models(args, workdir)
        args.vocab_size = model.config.vocab_size
        impls = {"ours": functools.partial(run_ours, model)}
        if args.compile:
            impls["ours, compiled"] = functools.partial(run_ours, compile_for_decoding(copy.deepcopy(model)))
        impls["transformers"] = functools.partial(run_hf, hf)
        report(model.config, impls, args)


def report(config, impls, args):
    import transformers
    load_before = os.getloadavg()[0]
    rows = [(batch, *measure(impls, batch, args)) for batch in args.batch_sizes]
    print(f"\n{args.model_path or args.preset + ' preset'} ({describe(config)}), {args.dtype}, prompt "
          f"{args.prompt_len} + {args.new_tokens} new tokens, greedy, median (min–max) of {args.runs} runs, cpu, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("| batch | impl | prefill tok/s | decode tok/s (min–max) | decode vs HF | prefill vs HF | same tokens as HF |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for batch, spread, same in rows:
        theirs = spread["transformers"]
        for name, r in spread.items():
            ratios = " | " if name == "transformers" else \
                f"{r['decode'][0] / theirs['decode'][0]:.2f}× | {r['prefill'][0] / theirs['prefill'][0]:.2f}×"
            decode = "{:,.1f} ({:,.1f}–{:,.1f})".format(*r["decode"])
            print(f"| {batch} | {name} | {r['prefill'][0]:,.0f} | {decode} | {ratios} | {same[name]} |")


if __name__ == "__main__":
    main()
