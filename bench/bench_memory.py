"""Peak memory and step time of a training step with and without activation checkpointing, side by side, next to
the estimate train_utils.memory_estimate prints before training; and the table of which preset fits which GPU.

    python bench/bench_memory.py --preset small --batch_size 8 --steps 5                 # CPU
    python bench/bench_memory.py --preset 1b --batch_size 4 --device cuda --dtype bfloat16
    python bench/bench_memory.py --fit_table                                             # README's table

Each mode runs in a fresh process (so one mode's allocations cannot hide the other's) on random tokens: one
untimed warm-up step, then --steps timed steps (median reported). Memory, on CUDA: torch.cuda.max_memory_allocated.
On CPU: the peak of live tensors over a step as PyTorch's own tracker (torch.distributed._tools.mem_tracker) counts
them, in a separate untimed step, and the process's peak RSS (ru_maxrss) above its RSS before the first step.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_utils as tu  # noqa: E402
from Config import PRESETS, describe, get_config  # noqa: E402
from model import Transformer  # noqa: E402

GPUS = {"80 GB (H100, A100)": 80e9, "24 GB (4090, L4, A10)": 24e9, "16 GB (A4000, 4060 Ti)": 16e9}
MAX_BATCH = 1024
USABLE = 0.9  # of a GPU's memory: CUDA context, allocator fragmentation, short-lived buffers
FIT_PROCESSES = 8


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args):
    """One mode in this process: {"step_s": median seconds, "peak": bytes, "rss": bytes above the start}."""
    device = torch.device(args.device)
    config = get_config(args.preset)
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    optimizer = tu.build_optimizer(model, 1e-4, 0.1)
    rt = tu.Runtime(device, args.dtype)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, config.max_seq_len), device=device)

    def step():
        with tu.autocast(rt):
            out = model(ids, targets=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    start_rss = rss()
    step()  # the optimizer state exists from here on
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    result = {"step_s": statistics.median(times), "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
              - start_rss}
    if device.type == "cuda":
        result["peak"] = torch.cuda.max_memory_allocated(device)
    else:
        from torch.distributed._tools.mem_tracker import MemTracker
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            step()
        result["peak"] = tracker.get_tracker_snapshot("peak")[device]["Total"]
    return result


def run_mode(args, checkpointing):
    """measure() in a fresh interpreter."""
    cmd = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--batch_size", str(args.batch_size),
           "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype, "--grad_checkpointing",
           str(int(checkpointing)), "--child"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def largest_batch(config, dtype, checkpointing, fsdp, capacity):
    """The largest micro-batch at the preset's context that the estimate fits in `capacity` bytes (0: none)."""
    def fits(batch):
        parts = tu.memory_estimate(config, batch, config.max_seq_len, dtype, checkpointing,
                                   FIT_PROCESSES, fsdp)
        return sum(parts.values()) <= USABLE * capacity
    batch = 0
    while batch < MAX_BATCH and fits(batch + 1):
        batch += 1
    return batch


def fit_table():
    """Markdown: per preset and GPU, the largest bf16 micro-batch that fits, by how the processes hold the model."""
    modes = [("DDP", False, False), ("DDP + ckpt", True, False), (f"FSDP×{FIT_PROCESSES}", False, True),
             (f"FSDP×{FIT_PROCESSES} + ckpt", True, True)]
    print(f"Largest micro-batch per GPU at the preset's max_seq_len, bf16, {FIT_PROCESSES} GPUs, from "
          f"train_utils.memory_estimate with {USABLE:.0%} of the GPU usable (0: does not fit)\n")
    print("| preset | GPU | " + " | ".join(m for m, _, _ in modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for name in PRESETS:
        config = get_config(name)
        for gpu, capacity in GPUS.items():
            batches = [largest_batch(config, "bfloat16", ckpt, fsdp, capacity) for _, ckpt, fsdp in modes]
            cells = [f"{b}+" if b == MAX_BATCH else str(b) for b in batches]
            print(f"| {name} ({config.param_counts()[0] / 1e6:.0f}M, ctx {config.max_seq_len}) | {gpu} | "
                  + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--fit_table", action="store_true", help="print the README's fit table and stop")
    p.add_argument("--grad_checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.fit_table:
        return fit_table()
    if args.child:
        return print(json.dumps(measure(args)))
    config = get_config(args.preset)
    print(f"{args.preset}: {describe(config)}, micro-batch {args.batch_size} × {config.max_seq_len} tokens, "
          f"{args.dtype} on {args.device} ({torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} at the start)")
    rows = []
    for checkpointing in (False, True):
        measured = run_mode(args, checkpointing)
        estimate = tu.memory_estimate(config, args.batch_size, config.max_seq_len, args.dtype, checkpointing)
        rows.append((checkpointing, measured, estimate))
        print(f"  grad_checkpointing={checkpointing}: step {measured['step_s']:.2f} s, peak tensors "
              f"{tu.format_bytes(measured['peak'])}, estimate {tu.format_bytes(sum(estimate.values()))} (activations "
              f"{tu.format_bytes(estimate['activations'])}), peak RSS above start {tu.format_bytes(measured['rss'])}")
    (_, plain, plain_est), (_, ckpt, ckpt_est) = rows
    print(f"checkpointing / plain: step time x{ckpt['step_s'] / plain['step_s']:.2f}, peak memory "
          f"x{ckpt['peak'] / plain['peak']:.2f} (estimate x{sum(ckpt_est.values()) / sum(plain_est.values()):.2f}), "
          f"peak RSS growth x{ckpt['rss'] / plain['rss']:.2f}")


if __name__ == "__main__":
    main()
