"""python bench/bench_data.py --tokenizer_dir tokenizer

Data pipeline benchmark on the real files in ../shared/data (paths overridable by flags):
  (a) pretraining token preparation throughput, MB of JSONL per second, 1 and 2 worker processes side by side
      (each run into a fresh cache directory, median of --repeat runs);
  (b) SFT padding at max_seq_len 512, batch size 32: pad fraction with length bucketing against random batches,
      and how many conversations were truncated or dropped for being too long.
"""
import argparse
import glob
import os
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset import LengthBucketBatches, SFTDataset, pad_fraction, prepare_pretrain_tokens  # noqa: E402

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def cpu_seconds():
    """CPU time of this process and its finished workers: on a shared machine wall time alone says little."""
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))


def time_preparation(paths, tokenizer_dir, num_workers, repeat):
    """Median (wall, CPU) seconds to tokenize `paths` from scratch (a fresh cache directory each run)."""
    wall, cpu = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as cache_dir:
            t0, c0 = time.perf_counter(), cpu_seconds()
            prepare_pretrain_tokens(paths, tokenizer_dir, cache_dir=cache_dir, num_workers=num_workers)
            wall.append(time.perf_counter() - t0)
            cpu.append(cpu_seconds() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--tokenizer_dir", default=os.path.join(ROOT, "tokenizer"))
    parser.add_argument("--pretrain", nargs="+", default=sorted(glob.glob(os.path.join(DATA, "pretrain_*.jsonl"))))
    parser.add_argument("--sft", default=os.path.join(DATA, "sft_zh_alpaca_hikariming.jsonl"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.tokenizer_dir, "tokenizer.json")):
        sys.exit(f"no tokenizer.json in {args.tokenizer_dir}: pass --tokenizer_dir or run train_tokenizer.py")
    if not args.pretrain:
        sys.exit(f"no pretrain_*.jsonl in {DATA}: pass --pretrain FILE ...")

    megabytes = sum(os.path.getsize(p) for p in args.pretrain) / 1e6
    rows = []
    for workers in args.workers:
        wall, cpu = time_preparation(args.pretrain, args.tokenizer_dir, workers, args.repeat)
        rows.append((workers, wall, cpu, megabytes / wall))

    with tempfile.TemporaryDirectory() as cache_dir:
        sft = SFTDataset(args.sft, args.tokenizer_dir, args.max_seq_len, cache_dir=cache_dir)
    bucketed = LengthBucketBatches(sft.lengths, args.batch_size, seed=0).batches(0)
    shuffled = LengthBucketBatches(sft.lengths, args.batch_size, seed=0, chunk_batches=1).batches(0)  # = random

    print(f"\n(a) pretraining token preparation: {len(args.pretrain)} files, {megabytes:.1f} MB, "
          f"median of {args.repeat}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'workers':>8} {'wall s':>8} {'CPU s':>8} {'MB/s':>7} {'speed-up':>9}")
    for workers, wall, cpu, rate in rows:
        print(f"{workers:>8} {wall:>8.2f} {cpu:>8.2f} {rate:>7.2f} {rate / rows[0][3]:>8.2f}x")
    print(f"\n(b) SFT padding: {os.path.basename(args.sft)}, max_seq_len {args.max_seq_len}, "
          f"batch size {args.batch_size}: {len(sft):,} conversations kept, {sft.stats['truncated']} truncated, "
          f"{sft.stats['dropped']} dropped")
    print(f"{'batching':>10} {'pad fraction':>13}")
    print(f"{'bucketed':>10} {pad_fraction(sft.lengths, bucketed):>13.3f}")
    print(f"{'random':>10} {pad_fraction(sft.lengths, shuffled):>13.3f}")


if __name__ == "__main__":
    main()
