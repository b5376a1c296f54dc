"""Training throughput and MFU of the real pretrain.py loop, eager and compiled, side by side in one run.

    python bench/bench_train.py --preset small --steps 8 --batch_size 8                      # CPU
    python bench/bench_train.py --preset base --steps 30 --batch_size 32 --device cuda --dtype bfloat16

MFU = FLOPs/token × tokens/s ÷ peak, FLOPs/token = 6·N + 12·layers·dim·seq_len (see the guide). On CPU the peak is
the fp32 matmul rate measured in this run (before and after training, the higher one); on GPU the bf16 spec.
Trains on real text from ../shared/data when it is there, on the generated demo corpus otherwise.
"""
import argparse
import os
import statistics
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pretrain  # noqa: E402
import train_utils as tu  # noqa: E402
from Config import describe, get_config  # noqa: E402

REAL_TEXT = os.path.join(ROOT, "..", "shared", "data", "pretrain_en_gutenberg.jsonl")


def training_text(workdir):
    if os.path.isfile(REAL_TEXT):
        return REAL_TEXT, "real (pretrain_en_gutenberg.jsonl)"
    from demo_data import generate_demo
    return generate_demo(os.path.join(workdir, "demo"))["pretrain"], "generated demo corpus"


def run(args, data_path, workdir, compile_):
    """Train args.warmup + args.steps steps; returns tokens/s of each step after the warm-up ones."""
    save_dir = os.path.join(workdir, "compiled" if compile_ else "eager")
    argv = ["--data_path", data_path, "--preset", args.preset, "--batch_size", str(args.batch_size),
            "--max_steps", str(args.warmup + args.steps), "--save_dir", save_dir, "--save_step", "1000000",
            "--log_interval", "1000000", "--cache_dir", os.path.join(workdir, "cache"), "--compile", str(compile_)]
    argv += ["--device", args.device] if args.device else []
    argv += ["--dtype", args.dtype] if args.dtype else []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    pretrain.main(argv)
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    ckpt = torch.load(os.path.join(save_dir, "latest_checkpoint.pth"), map_location="cpu", weights_only=True)
    return [r["tokens_per_s"] for r in ckpt["history"]["train"][args.warmup:]], memory


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="measured optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="steps not measured (compilation, allocator warm-up)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--modes", default="eager,compiled")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = get_config(args.preset)
    flops = tu.flops_per_token(config, config.max_seq_len)
    with tempfile.TemporaryDirectory() as workdir:
        data_path, data_name = training_text(workdir)
        peaks = [tu.peak_flops(device)] if device.type == "cuda" else [tu.measure_cpu_peak_flops((2048,), 3.0)]
        results = {mode: run(args, data_path, workdir, mode == "compiled") for mode in args.modes.split(",")}
        if device.type == "cpu":
            peaks.append(tu.measure_cpu_peak_flops((2048,), 3.0))
    peak = max(peaks)
    print(f"\n{args.preset} preset ({describe(config)}), batch {args.batch_size} × {config.max_seq_len}, "
          f"{data_name}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"peak: {peak / 1e9:,.1f} GFLOP/s ({'measured fp32 matmul' if device.type == 'cpu' else 'bf16 spec'})")
    print(f"| mode | tokens/s (median of {args.steps}) | MFU | peak GPU memory |")
    print("|---|---:|---:|---:|")
    medians = {}
    for mode, (tps, memory) in results.items():
        medians[mode] = statistics.median(tps)
        gib = f"{memory:.1f} GiB" if memory is not None else "-"
        print(f"| {mode} | {medians[mode]:,.0f} | {100 * flops * medians[mode] / peak:.1f}% | {gib} |")
    if len(medians) == 2:
        print(f"compiled / eager: {medians['compiled'] / medians['eager']:.2f}×")


if __name__ == "__main__":
    main()
