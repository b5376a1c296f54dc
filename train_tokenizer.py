"""Train the byte-level BPE tokenizer with single-id special tokens and a ChatML chat template.

The shipped tokenizer/ folder is exactly the output of (from the repo root; ~1.5 min, ~2 GB RAM on 2 CPU cores):

    python train_tokenizer.py --vocab_size 6464 --out_dir tokenizer --overwrite \
        --data_path ../shared/data/pretrain_en_gutenberg.jsonl ../shared/data/pretrain_en_tinyshakespeare.jsonl \
                    ../shared/data/pretrain_zh_chinese_poetry.jsonl ../shared/data/pretrain_zh_novels.jsonl \
                    ../shared/data/sft_en_alpaca_20k.jsonl ../shared/data/sft_zh_alpaca_hikariming.jsonl \
                    ../shared/data/sft_zh_sharegpt_multiturn_1k.jsonl \
        --weights 1 1 1 1 2 2 2 --holdout_every 50 \
        --eval_path ../shared/data/eval_zh_cmrc2018_wiki.jsonl ../shared/data/eval_en_wikitext2_raw_test.jsonl \
                    ../shared/data/eval_zh_drcd_wiki_traditional.jsonl

Reads JSONL files as a stream (pretraining `text` records, `conversations` and DPO `chosen`/`rejected` records
alike), so a multi-GB corpus never sits in memory. Every `--holdout_every`-th record of each file is left out of
training and used to report compression (UTF-8 bytes per token) on text the tokenizer has not seen. The output folder
loads with `transformers.AutoTokenizer.from_pretrained(out_dir)` and needs no custom code. An --out_dir that already
holds a tokenizer (the shipped tokenizer/, say) is replaced only with --overwrite.
"""
import json
import os
import re
import sys
import time

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cli import NONNEG_INT, POSITIVE_INT, ArgumentParser, UserError, add_bool_flag, number, run_main

# Order fixes the ids: <|endoftext|> is 0, <|im_start|> 1, <|im_end|> 2, ... <|pad|> 7, then the tool-calling tags
# 8-11 and reserved tokens 12-63, so a later feature gets a single-id token without retraining the tokenizer.
# 64 special tokens + 6400 learned ones = the default --vocab_size 6464 (a multiple of 64, which GPU matmuls like).
THINK, END_THINK, ANSWER, END_ANSWER = REASONING_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TOOL_CALL, END_TOOL_CALL, TOOL_RESPONSE, END_TOOL_RESPONSE = TOOL_TAGS = \
    ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
RESERVED = [f"<|reserved_{i}|>" for i in range(52)]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *REASONING_TAGS, "<|pad|>", *TOOL_TAGS, *RESERVED]

# ChatML with tools and a thinking switch. dataset.chat_pieces builds exactly this string; a test holds the two
# together (for tool-call arguments given as objects; a string is rendered as given, dataset.py normalises it).
#   tools: OpenAI function schemas, one JSON line each, in a system turn (after the system prompt, if any).
#   assistant tool_calls: <tool_call>{"name": ..., "arguments": {...}}</tool_call> after the content, one per call.
#   role "tool": its content inside <tool_response>…</tool_response>.
#   enable_thinking: false closes an empty <think></think> after the generation prompt, so the model answers at
#   once; true opens <think>, so it must reason first; left out, the model decides.
TOOLS_HEADER = ("# Tools\nYou may call these functions. To call one, reply with a tool call holding its name and "
                "JSON arguments; its result comes back in a tool turn.\n")
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
    "{{- '" + TOOLS_HEADER.replace("\n", "\\n") + "' -}}"
    "{%- for tool in tools -%}{{- (tool | tojson) + '\\n' -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and tools -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + (message['content'] or '') -}}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- set args = fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -%}"
    "{{- ('\\n' if (message['content'] or not loop.first) else '') + '<tool_call>{\"name\": ' + (fn['name'] | tojson)"
    " + ', \"arguments\": ' + args + '}</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>tool\\n<tool_response>' + message['content'] + '</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think></think>' -}}"
    "{%- elif enable_thinking is defined and enable_thinking is true -%}{{- '<think>' -}}{%- endif -%}"
    "{%- endif -%}"
)

# Pre-tokenizer split (Qwen2/GPT-4 style). BPE merges never cross these pieces. Alternatives, in order:
#   English contractions ('s 't 're 've 'm 'll 'd) | a letter run with at most one leading non-letter (" the",
#   "，他们" — Chinese runs are letters too) | ONE digit, optionally after a space (numbers become digit sequences,
#   which helps arithmetic) | punctuation runs, optionally after a space, with trailing newlines | newlines |
#   spaces (the last space of a run is left to join the next word).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
MAX_VOCAB = 1 << 18  # 262144: above every LLM vocabulary in use; more is a typo, not a tokenizer


class DataError(UserError, ValueError):
    """Malformed or missing input data; the message names the path (and line). run_main prints it as one line."""


def check_jsonl_path(path):
    """Fail early, naming the path, when an input is not an existing file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file (expected a JSONL file)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file (expected a JSONL file)")


def check_out_dir(out_dir, overwrite):
    """Refuse to replace an existing tokenizer (such as the shipped tokenizer/) unless asked to."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir}: exists and is not a folder; choose another --out_dir")
    if os.path.isfile(os.path.join(out_dir, "tokenizer.json")) and not overwrite:
        raise UserError(f"--out_dir {out_dir} already holds a tokenizer (tokenizer.json); pass --overwrite to replace "
                        f"it, or choose another --out_dir")


def record_texts(record, where):
    """The strings of one JSONL record: its `text`, or the `content` of every turn."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    texts = []
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        texts.append(record["text"])
    for key in ("conversations", "chosen", "rejected"):
        turns = record.get(key, [])
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                  for t in turns):
            raise DataError(f"{where}: '{key}' must be a list of {{\"role\", \"content\"}} turns")
        texts.extend(turn["content"] for turn in turns)
    if not texts and not any(k in record for k in ("text", "conversations", "chosen", "rejected")):
        raise DataError(f"{where}: expected a 'text' or 'conversations' (or 'chosen'/'rejected') field")
    return texts


def iter_texts(paths, holdout_every=0, held_out=False):
    """Yield every text of pretraining records and every turn of conversation/DPO records, one line at a time.

    With holdout_every=N > 0, record number N-1, 2N-1, ... of each file (counting non-blank lines from 0) is the
    held-out slice: skipped when held_out is False, the only records yielded when it is True.
    """
    for path in paths:
        check_jsonl_path(path)
        with open(path, "rb") as f:
            index = -1
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                index += 1
                if holdout_every > 0 and (index % holdout_every == holdout_every - 1) != held_out:
                    continue
                yield from record_texts(parse_line(line, f"{path}:{line_no}"), f"{path}:{line_no}")


def parse_line(line, where):
    """The JSON value of one line (bytes), or a DataError naming `where`."""
    try:
        return json.loads(line)
    except UnicodeDecodeError:
        raise DataError(f"{where}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg})") from None


def split_special(texts):
    """Cut special tokens out of training text, as encoding does: the `tokenizers` trainer would otherwise learn
    merges such as "<think" and "</" from tags in the corpus, wasting vocabulary on pieces never used."""
    for text in texts:
        yield from filter(None, SPECIAL_SPLIT.split(text))


def build_tokenizer(texts, vocab_size, show_progress=False):
    """Train byte-level BPE on an iterator of strings; returns a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(split_special(texts), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, f"special token {token} got id {tok.token_to_id(token)}, expected {i}"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|pad|>")],
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def bytes_per_token(tokenizer, texts, batch_size=1000):
    """UTF-8 bytes per token over an iterable of strings (higher = better compression). No special tokens added.

    Accepts a transformers fast tokenizer or a `tokenizers.Tokenizer`; streams texts in batches. NaN when there is
    nothing to measure (e.g. an empty held-out slice).
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    n_bytes = n_tokens = 0
    batch = []

    def flush():
        nonlocal n_bytes, n_tokens
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        n_tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    flush()
    return n_bytes / n_tokens if n_tokens else float("nan")


def weighted_texts(paths, weights, holdout_every, stats):
    """Training stream: each file read weights[i] times, held-out records skipped; counts texts and bytes."""
    for path, weight in zip(paths, weights):
        for _ in range(weight):
            for text in iter_texts([path], holdout_every, held_out=False):
                stats["texts"] += 1
                stats["bytes"] += len(text.encode("utf-8"))
                yield text


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Train the byte-level BPE tokenizer (single-id special tokens, ChatML chat template) on JSONL "
                    "files and report its compression in UTF-8 bytes per token. The docstring at the top of this file "
                    "has the exact command that built the shipped tokenizer/ folder.")
    parser.add_argument("--data_path", nargs="+", required=True,
                        help="training JSONL file(s): {'text': ...} and/or {'conversations': [{'role', 'content'}]} "
                             "records (DPO 'chosen'/'rejected' turns are read too)")
    parser.add_argument("--vocab_size", type=number(int, low=256 + len(SPECIAL_TOKENS), high=MAX_VOCAB), default=6464,
                        help=f"total vocabulary incl. the {len(SPECIAL_TOKENS)} special tokens (at least 256 bytes + "
                             f"those {len(SPECIAL_TOKENS)})")
    parser.add_argument("--out_dir", default="tokenizer",
                        help="output folder, created if needed; relative to the current directory")
    add_bool_flag(parser, "--overwrite", help="replace the tokenizer already in --out_dir (refused without it)")
    parser.add_argument("--weights", type=POSITIVE_INT, nargs="+", default=None,
                        help="how many times each --data_path file is read for training, one integer >= 1 per file "
                             "in the same order (default: 1 each); up-weights a style in the vocabulary")
    parser.add_argument("--holdout_every", type=NONNEG_INT, default=50,
                        help="leave every N-th record of each file out of training and report compression on it "
                             "(N >= 2; 0: train on everything, no held-out report)")
    parser.add_argument("--eval_path", nargs="*", default=[],
                        help="extra JSONL file(s) to report bytes/token on (never trained on)")
    args = parser.parse_args(argv)
    if args.weights is None:
        args.weights = [1] * len(args.data_path)
    if len(args.weights) != len(args.data_path):
        parser.error(f"--weights needs one integer >= 1 per --data_path file ({len(args.data_path)}), "
                     f"got {len(args.weights)}: {args.weights}")
    if args.holdout_every == 1:
        parser.error("argument --holdout_every: must be 0 (off) or >= 2, got 1 (it would hold out every record)")
    return args


def main(argv=None):
    args = parse_args(argv)
    out_dir = os.path.abspath(args.out_dir)
    check_out_dir(args.out_dir, args.overwrite)  # before the training, not after minutes of it
    for path in args.data_path + args.eval_path:
        check_jsonl_path(path)
    try:
        stats = {"texts": 0, "bytes": 0}
        t0 = time.time()
        tokenizer = build_tokenizer(weighted_texts(args.data_path, args.weights, args.holdout_every, stats),
                                    args.vocab_size, show_progress=sys.stderr.isatty())
        if stats["texts"] == 0:
            raise DataError(f"no text found in {', '.join(args.data_path)}")
        print(f"trained a {len(tokenizer)}-token byte-level BPE on {stats['texts']:,} texts "
              f"({stats['bytes'] / 1e6:.1f} MB incl. weights) in {time.time() - t0:.1f}s")
        if len(tokenizer) < args.vocab_size:
            print(f"note: the training text supports only {len(tokenizer)} tokens, fewer than --vocab_size "
                  f"{args.vocab_size}; add text or lower --vocab_size", file=sys.stderr)
        tokenizer.save_pretrained(out_dir)
        print(f"saved {out_dir}")

        print("compression, UTF-8 bytes per token (higher is better):")
        if args.holdout_every:
            for path in args.data_path:
                held = bytes_per_token(tokenizer, iter_texts([path], args.holdout_every, held_out=True))
                print(f"  {held:.3f}  held-out 1/{args.holdout_every} of {path}")
            total = bytes_per_token(tokenizer, iter_texts(args.data_path, args.holdout_every, held_out=True))
            print(f"  {total:.3f}  held-out 1/{args.holdout_every} of all --data_path files")
        for path in args.eval_path:
            print(f"  {bytes_per_token(tokenizer, iter_texts([path])):.3f}  eval {path}")
    except OSError as e:  # an unreadable input or an unwritable --out_dir
        raise UserError(str(e)) from None


if __name__ == "__main__":
    run_main(main)
