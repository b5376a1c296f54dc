r"""Perplexity and bits per byte of a model on a JSONL file, long texts scored with a sliding window.

    python eval_ppl.py --model_path results/sft_final.pth --dataset_path datasets/eval_data.jsonl \
        --batch_size 8 --output_file results/ppl_results.json

Input: pretraining-style {"text": ...} records (every token of the text is scored, the first one predicted from a
document boundary <|endoftext|>, as in the packed pretraining data) or SFT {"conversations": [...]} records (only
the assistant tokens the SFT loss trains: the replies and their closing <|im_end|>). --format auto tells them apart
by the first record.

A sequence longer than the window (--max_seq_len, default the model's context) is read in windows that advance by
--stride tokens (default half the window); each window scores only the tokens no earlier window scored, so every
token is scored exactly once with at least window - stride tokens of left context (the whole prefix if shorter).

Reported: corpus perplexity exp(total NLL / scored tokens), bits per byte (total NLL in bits / UTF-8 bytes of the
scored text: the text, or the assistant replies; <|im_end|> is scored but adds no bytes), per-sample perplexity
(mean, median, p90) and the counts. While it runs, a progress bar (plain lines every 30 s off a terminal) shows
the documents done, the windows scored, tokens/s and the ETA. evaluate_file() runs the same in-process.
"""
import itertools
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import check_tokenizer
from cli import POSITIVE_INT, ArgumentParser, UserError, run_main
from dataset import DataError, encode_chat, load_tokenizer, read_jsonl
from inference import DTYPES, device_flag, encode_raw, inference_device, inference_dtype, load_for_inference
from train_utils import ROOT, format_seconds

FORMATS = {"text": "pretrain", "chat": "chat"}  # --format -> dataset.read_jsonl kind


def detect_format(path):
    """"text" or "chat", from the first non-blank line of a JSONL file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; expected a JSONL file of {{\"text\"}} or {{\"conversations\"}} "
                        f"records")
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e})") from e
            if isinstance(record, dict) and "conversations" in record:
                return "chat"
            if isinstance(record, dict) and "text" in record:
                return "text"
            raise DataError(f"{path}:{line_no}: expected a 'text' or a 'conversations' field (or pass --format)")
    raise DataError(f"{path}: no records")


def scored_sequences(tokenizer, path, fmt, max_samples=None):
    """Yield (ids, mask, n_bytes) per record: mask[i] = 1 where token i is scored; n_bytes of the scored text."""
    for n, (_, record) in enumerate(read_jsonl(path, FORMATS[fmt])):
        if max_samples is not None and n >= max_samples:
            return
        if fmt == "text":
            ids = np.array(encode_raw(tokenizer, record["text"]), dtype=np.int64)
            mask = np.ones(len(ids), dtype=np.uint8)
            mask[0] = 0  # the document boundary itself is context, not a target
            yield ids, mask, len(record["text"].encode("utf-8"))
        else:
            ids, mask = encode_chat(tokenizer, record["conversations"])
            replies = (t["content"] for t in record["conversations"] if t["role"] == "assistant")
            yield ids, mask, sum(len(r.encode("utf-8")) for r in replies)


def windows(n_tokens, context, stride):
    """(start, end, first) per window over ids[start:end]: the model reads all of it but the last token (at most
    `context` tokens) and scores positions first..end-1, the ones no earlier window scored.

    Windows end `stride` tokens apart and are as long as the context allows, so each scored token sees at least
    context - stride + 1 tokens before it (or its whole prefix); position 0 has nothing before it and is not scored."""
    first, end = 1, min(context + 1, n_tokens)
    while first < n_tokens:
        yield max(0, end - context - 1), end, first
        first, end = end, min(end + stride, n_tokens)


@torch.no_grad()
def window_nll(model, batch, device):
    """Summed NLL (nats) and scored-token count of each (ids, targets) window; targets -100 are not scored."""
    length = max(len(ids) for ids, _ in batch)
    inputs = torch.zeros(len(batch), length, dtype=torch.long)
    targets = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, (ids, tgt) in enumerate(batch):  # right padding: causal attention keeps pads out of real positions
        inputs[row, :len(ids)] = torch.from_numpy(ids)
        targets[row, :len(tgt)] = torch.from_numpy(tgt)
    logits = model(inputs.to(device)).logits.float()                                      # (B, T, vocab)
    targets = targets.to(device)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")  # (B, T)
    return nll.sum(dim=1).tolist(), (targets != -100).sum(dim=1).tolist()


def window_items(sample, ids, mask, context, stride):
    """(sample, input ids, targets) per window that scores anything; targets[j] = ids[start+j+1] where scored."""
    for start, end, first in windows(len(ids), context, stride):
        scored = mask[first:end].astype(bool)
        if not scored.any():
            continue
        targets = np.full(end - start - 1, -100, dtype=np.int64)
        targets[first - start - 1:] = np.where(scored, ids[first:end], -100)
        yield sample, ids[start:end - 1], targets


def check_window(model, max_seq_len, stride, batch_size):
    """(window, stride): the defaults filled in, then checked (a ValueError names the bad value)."""
    context = model.config.max_seq_len
    window = context if max_seq_len is None else max_seq_len
    if not 1 <= window <= context:
        raise ValueError(f"max_seq_len {window} must be between 1 and the model's context {context}")
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride {stride} must be between 1 and max_seq_len = {window}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return window, stride


class Totals:
    """Summed NLL and scored tokens per sample, filled one batch of windows at a time; reports to a Progress."""

    def __init__(self, model, progress=None):
        self.model, self.progress = model, progress
        self.nll, self.count = {}, {}
        self.docs = self.windows = self.tokens = 0

    def score(self, batch):
        sums, counts = window_nll(self.model, [item[1:] for item in batch], self.model.embed_tokens.weight.device)
        for (sample, _, _), s, c in zip(batch, sums, counts):
            self.nll[sample], self.count[sample] = self.nll.get(sample, 0.0) + s, self.count.get(sample, 0) + c
        self.windows, self.tokens = self.windows + len(batch), self.tokens + sum(counts)
        self.report()

    def report(self):
        if self.progress is not None:
            self.progress.update(self.docs, self.windows, self.tokens)


def evaluate_file(model, tokenizer, path, max_seq_len=None, stride=None, batch_size=8, max_samples=None,
                  fmt="auto", progress=None):
    """The metrics dict for one JSONL file (see the module docstring); progress (a Progress) follows along."""
    window, stride = check_window(model, max_seq_len, stride, batch_size)
    fmt = detect_format(path) if fmt == "auto" else fmt
    totals, n_bytes, batch = Totals(model, progress), 0, []
    model.eval()
    for sample, (ids, mask, size) in enumerate(scored_sequences(tokenizer, path, fmt, max_samples)):
        totals.docs, n_bytes = sample + 1, n_bytes + size
        for item in window_items(sample, ids, mask, window, stride):
            batch.append(item)
            if len(batch) == batch_size:
                totals.score(batch)
                batch = []
    if batch:
        totals.score(batch)
    totals.report()
    return summarize(totals.nll, totals.count, n_bytes, path, fmt, window, stride)


def summarize(nll, count, total_bytes, path, fmt, window, stride):
    total_nll, tokens = sum(nll.values()), sum(count.values())
    if tokens == 0:
        raise DataError(f"{path}: nothing to score")
    sample_ppl = np.array([math.exp(nll[s] / count[s]) for s in nll])
    return {
        "file": path, "format": fmt, "max_seq_len": window, "stride": stride,
        "samples": len(sample_ppl), "tokens": tokens, "bytes": total_bytes,
        "loss": total_nll / tokens, "perplexity": math.exp(total_nll / tokens),
        "bits_per_byte": total_nll / math.log(2) / total_bytes,
        "sample_perplexity": {"mean": float(sample_ppl.mean()), "median": float(np.median(sample_ppl)),
                              "p90": float(np.percentile(sample_ppl, 90))},
    }


# ------------------------------------------------------------------------------------------------- progress

def count_records(path, max_samples=None):
    """How many records eval_ppl will read: the non-blank lines (at most max_samples), for the progress total."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: --dataset_path not found; expected a JSONL file of {{\"text\"}} or "
                        f"{{\"conversations\"}} records")
    with open(path, "rb") as f:
        return sum(1 for _ in itertools.islice((line for line in f if line.strip()), max_samples))


class Progress:
    """Documents done of the total, windows scored, tokens/s and ETA: a tqdm bar on a terminal, otherwise a plain
    line every `every` seconds and one at the end. Both fit an 80-column terminal."""

    def __init__(self, total_docs, out=None, every=30.0):
        self.total, self.out, self.every = total_docs, out or sys.stderr, every
        self.start = self.last = time.perf_counter()
        self.docs = self.windows = self.tokens = 0
        self.bar = None
        if self.out.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_docs, unit="doc", file=self.out, ncols=80, desc="ppl")

    def update(self, docs, windows, tokens):
        """docs read so far, windows and tokens scored so far."""
        self.docs, self.windows, self.tokens = docs, windows, tokens
        if self.bar is not None:
            self.bar.set_postfix_str(f"{windows:,} win, {self.rate():,.0f} tok/s", refresh=False)
            self.bar.update(docs - self.bar.n)
        elif time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            print(self.line(), file=self.out, flush=True)

    def rate(self):
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def line(self, done=False):
        elapsed = time.perf_counter() - self.start
        if done:
            when = f"took {format_seconds(elapsed)}"
        else:
            when = f"ETA {format_seconds(elapsed / self.docs * (self.total - self.docs))}" if self.docs else "ETA ?"
        return (f"ppl: {self.docs:,}/{self.total:,} docs {100 * self.docs / max(self.total, 1):.0f}%, "
                f"{self.windows:,} win, {self.rate():,.0f} tok/s, {when}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line(done=True), file=self.out, flush=True)


# -------------------------------------------------------------------------------------------------------- the CLI

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--model_path", required=True, help="a *_final.pth, a latest_checkpoint.pth or a *_final/ safetensors folder")
    a("--dataset_path", required=True, help='JSONL of {"text"} or {"conversations"} records')
    a("--format", choices=["auto", "text", "chat"], default="auto", help="record format (auto: by the first record)")
    a("--batch_size", type=POSITIVE_INT, default=8, help="windows per forward pass")
    a("--max_seq_len", type=POSITIVE_INT, default=None, help="window length in tokens (default: the model's context)")
    a("--stride", type=POSITIVE_INT, default=None,
      help="tokens between window ends, at most --max_seq_len (default: max_seq_len / 2)")
    a("--max_samples", type=POSITIVE_INT, default=None, help="score only the first N records (default: all)")
    a("--output_file", default=None, help="write the metrics here as JSON")
    a("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"), help="the tokenizer the model was trained with")
    a("--device", type=device_flag, default=None, help="cuda, cuda:1, cpu, mps (default: cuda when available)")
    a("--dtype", choices=DTYPES, default="auto",
      help="weights' dtype (auto: float32 on CPU, bfloat16 on GPU; the NLL itself is always summed in float32)")
    args = p.parse_args(argv)
    if args.stride is not None and args.max_seq_len is not None and args.stride > args.max_seq_len:
        p.error(f"--stride {args.stride} must be at most --max_seq_len {args.max_seq_len} (a window cannot advance "
                f"past its own end)")
    if args.output_file and os.path.isdir(args.output_file):
        p.error(f"--output_file {args.output_file} is a folder; name a .json file")
    if not os.path.exists(args.model_path):
        p.error(f"--model_path {args.model_path}: no such checkpoint")
    return args


def check_flags_against(args, context):
    """--max_seq_len and a --stride without it, against the model's context (known once it is loaded)."""
    if args.max_seq_len is not None and args.max_seq_len > context:
        raise UserError(f"--max_seq_len {args.max_seq_len} exceeds the model's context {context}; choose at most "
                        f"{context}")
    if args.max_seq_len is None and args.stride is not None and args.stride > context:
        raise UserError(f"--stride {args.stride} exceeds the window, the model's context {context} (see "
                        f"--max_seq_len); choose at most {context}")


def report(args, metrics):
    s = metrics["sample_perplexity"]
    print(f"{args.dataset_path} ({metrics['format']}): perplexity {metrics['perplexity']:.3f}, "
          f"bits/byte {metrics['bits_per_byte']:.4f}, loss {metrics['loss']:.4f} over {metrics['tokens']:,} tokens "
          f"in {metrics['samples']:,} samples; per sample mean {s['mean']:.3f}, median {s['median']:.3f}, "
          f"p90 {s['p90']:.3f}" + (f" -> {args.output_file}" if args.output_file else ""), file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    total = count_records(args.dataset_path, args.max_samples)
    fmt = detect_format(args.dataset_path) if args.format == "auto" else args.format
    tokenizer = load_tokenizer(args.tokenizer_path)
    device = inference_device(args.device)
    model, meta = load_for_inference(args.model_path, device, inference_dtype(args.dtype, device))
    check_tokenizer(meta, args.tokenizer_path, args.model_path)
    check_flags_against(args, model.config.max_seq_len)
    progress = Progress(total)
    metrics = evaluate_file(model, tokenizer, args.dataset_path, args.max_seq_len, args.stride, args.batch_size,
                            args.max_samples, fmt, progress)
    progress.close()
    metrics["model"] = args.model_path
    if args.output_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        with open(args.output_file, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2, ensure_ascii=False)
    report(args, metrics)


if __name__ == "__main__":
    run_main(main)
