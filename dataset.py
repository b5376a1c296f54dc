"""JSONL datasets for every training stage: validation, ChatML rendering with exact loss masks, tokens prepared once.

    from dataset import PretrainDataset, SFTDataset, DPODataset, LengthBucketBatches, collate_sft, collate_dpo

Formats, one JSON object per line (blank lines are ignored):
    pretrain            {"text": str}
    SFT and reasoning   {"conversations": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
                         "tools": [OpenAI function schemas] (optional)}; an assistant turn may carry OpenAI-shaped
                        "tool_calls" (content then may be null), a "tool" turn answers them
    DPO                 {"chosen": [turns], "rejected": [turns]}, both sharing every turn but the final assistant one

Each dataset validates and tokenizes its files once, in worker processes, into flat files under `.cache/tokens`
(tokens, plus a loss mask and sequence offsets for chat data), keyed by a hash of the files' bytes, the tokenizer and
every parameter that changes the output. Training reads memory-mapped slices, so RAM stays flat as the data grows.

Mask convention: mask[i] == 1 means token i is a training target (predicted from position i - 1). The collate
functions shift ids and mask together: input_ids = ids[:-1], targets = ids[1:], loss_mask = mask[1:].
"""
if __name__ == "__main__":  # before the imports: a library module answers at once, not after torch loads
    raise SystemExit("dataset.py is a library module, not a script: "
                     "make data with demo_data.py, a tokenizer with train_tokenizer.py; the stage scripts read both "
                     "(see README.md)")
import collections
import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from cli import UserError
from train_tokenizer import (END_THINK, END_TOOL_CALL, END_TOOL_RESPONSE, REASONING_TAGS, SPECIAL_TOKENS, THINK,
                             TOOL_CALL, TOOL_RESPONSE, TOOLS_HEADER)

EOS, IM_START, IM_END = SPECIAL_TOKENS[:3]  # ids 0, 1, 2, fixed by train_tokenizer
# Tags that are special ids inside assistant content (the model's own output); everywhere else they are text.
ASSISTANT_SPLIT = re.compile("(" + "|".join(map(re.escape, REASONING_TAGS + [TOOL_CALL, END_TOOL_CALL])) + ")")
PAD = "<|pad|>"
ROLES = ("system", "user", "assistant", "tool")
READ_KINDS = {"pretrain": "pretrain", "sft": "chat", "dpo": "dpo"}  # cache kind -> record format
EXPECTED = {
    "pretrain": 'a JSONL file of {"text": ...} records',
    "chat": 'a JSONL file of {"conversations": [{"role": ..., "content": ...}, ...]} records',
    "dpo": 'a JSONL file of {"chosen": [turns], "rejected": [turns]} records',
}
# Bump whenever the bytes written to the cache change (rendering, masking, truncation, file layout).
FORMAT_VERSION = 4
META_KEYS = ("format", "kind", "dtype", "tokens", "max_seq_len", "pad_id", "sequences", "skipped", "truncated",
             "dropped", "first_problem", "sources")
DEFAULT_CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "tokens")
CHUNK_BYTES = 1 << 20  # lines per worker job: big enough to amortise pickling, small enough to keep RAM flat
LONG_TEXT_CHARS = 1 << 20  # longer texts are tokenized in pieces: one 50 MB record must not need gigabytes of RAM
# Where train_tokenizer.SPLIT_PATTERN always splits (no pre-token spans these positions): after a newline before a
# non-space, before a space after a non-space, before CJK punctuation after a CJK character. Pieces cut there
# tokenize to exactly the ids of the whole text.
SAFE_CUT = re.compile(r"(?<=\n)(?=\S)|(?<=\S)(?= )|(?<=[\u4e00-\u9fff])(?=[，。！？；：、])")
SKIP_HINT = " (or --skip_bad_lines to skip bad lines)"
# A field that gives away another stage's format -> (that format, the hint naming the script that trains on it).
OTHER_FORMATS = {
    "conversations": ("chat", "looks like conversations (SFT/reasoning data): use SFT.py or distill.py"),
    "text": ("pretrain", "looks like pretraining text: use pretrain.py"),
    "chosen": ("dpo", "looks like DPO pairs: use dpo.py"),
    "rejected": ("dpo", "looks like DPO pairs: use dpo.py"),
}


class DataError(UserError, ValueError):
    """A data file is missing or a line in it is malformed; the message names the file and line."""


# ----------------------------------------------------------------------------------------------- validation

def conversation_problem(turns):
    """Why `turns` is not a trainable conversation, or None if it is."""
    if not isinstance(turns, list) or not turns:
        return "a conversation must be a non-empty list of turns"
    open_calls = 0  # tool calls of the last assistant turn not yet answered by a tool turn
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)):
            return f"turn {i} must be an object with string 'role' and 'content'"
        problem = turn_problem(turn, i, open_calls)
        if problem:
            return problem
        open_calls = (len(turn.get("tool_calls") or []) if turn["role"] == "assistant" else
                      open_calls - 1 if turn["role"] == "tool" else 0)
    if all(turn["role"] != "assistant" for turn in turns):
        return "the conversation has no assistant turn"
    if turns[-1]["role"] != "assistant":
        return "the conversation must end with an assistant turn"
    return None


def turn_problem(turn, i, open_calls):
    """Why turn i is malformed, or None; open_calls: how many tool calls before it still await a tool turn."""
    role, calls = turn["role"], turn.get("tool_calls")
    if role not in ROLES:
        return f"turn {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})"
    if role == "system" and i > 0:
        return f"turn {i} is a system turn; only the first turn may be one"
    if calls is not None and role != "assistant":
        return f"turn {i}: only assistant turns may have 'tool_calls'"
    if role == "assistant" and calls is not None:
        if not isinstance(calls, list) or not calls:
            return f"turn {i}: 'tool_calls' must be a non-empty list"
        for k, call in enumerate(calls):
            problem = tool_call_problem(call)
            if problem:
                return f"turn {i} tool_calls[{k}]: {problem}"
        if turn.get("content") is not None and not isinstance(turn["content"], str):
            return f"turn {i} must have a string (or null) 'content'"
        return None
    if not isinstance(turn.get("content"), str):
        return f"turn {i} must be an object with string 'role' and 'content'"
    if role == "assistant" and not turn["content"].strip():
        return f"turn {i} has empty assistant content"
    if role == "tool" and open_calls < 1:
        return f"turn {i} is a tool turn without an assistant tool call before it to answer"
    return None


def tool_call_problem(call):
    """Why an assistant tool call ({"type": "function", "function": {"name", "arguments"}}, OpenAI's shape, or
    the bare {"name", "arguments"}) is malformed, or None. Arguments are an object or a JSON string of one."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return 'expected {"type": "function", "function": {"name": ..., "arguments": {...}}}'
    if not isinstance(fn.get("name"), str) or not fn["name"].strip():
        return "missing or empty function 'name'"
    try:
        tool_arguments(fn)
    except ValueError as e:
        return str(e)
    return None


def tool_arguments(fn):
    """A call's arguments as a dict: OpenAI sends them as a JSON string, chat templates take an object."""
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(f"'arguments' of {fn['name']!r} is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(args, dict):
        raise ValueError(f"'arguments' of {fn['name']!r} must be a JSON object, got {type(args).__name__}")
    return args


def tools_problem(tools):
    """Why a record's "tools" list is not a list of OpenAI function schemas, or None."""
    if not isinstance(tools, list):
        return "'tools' must be a list of function schemas"
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"].strip()):
            return f'tools[{k}] must be {{"type": "function", "function": {{"name": ..., "parameters": {{...}}}}}}'
    return None


def _format_hint(record, kind):
    """"; looks like DPO pairs: use dpo.py" when the record has another format's field, else ""."""
    for field, (other, hint) in OTHER_FORMATS.items():
        if other != kind and field in record:
            return f"; {hint}"
    return ""


def record_problem(record, kind):
    """Why a parsed JSON value is not a valid record of `kind` ("pretrain", "chat" or "dpo"), or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if kind == "pretrain":
        if not isinstance(record.get("text"), str):
            return "missing or non-string field 'text'" + _format_hint(record, kind)
        return None if record["text"].strip() else "empty text"
    if kind == "chat":
        if "conversations" not in record:
            return "missing field 'conversations'" + _format_hint(record, kind)
        if "tools" in record and tools_problem(record["tools"]):
            return tools_problem(record["tools"])
        return conversation_problem(record["conversations"])
    for side in ("chosen", "rejected"):
        if side not in record:
            return f"missing field '{side}'" + _format_hint(record, kind)
        problem = conversation_problem(record[side])
        if problem:
            return f"{side}: {problem}"
    if record["chosen"][:-1] != record["rejected"][:-1]:
        return "chosen and rejected must share every turn before the final assistant turn"
    return None


def _parse_line(line, kind):
    """(record, None) for a valid line (bytes), (None, problem) otherwise."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    problem = record_problem(record, kind)
    return (None, problem) if problem else (record, None)


def _validated(lines, path, kind, skip_bad, stats, first_line_no=1, hint=""):
    """Yield (line_no, record) for the valid non-blank lines; count (skip_bad) or raise on the bad ones, the error
    ending with `hint`."""
    for line_no, line in enumerate(lines, first_line_no):
        if not line.strip():
            continue
        record, problem = _parse_line(line, kind)
        if problem is None:
            yield line_no, record
            continue
        message = f"{path}:{line_no}: {problem}"
        if not skip_bad:
            raise DataError(message + hint)
        stats["skipped"] = stats.get("skipped", 0) + 1
        stats.setdefault("first_problem", message)


def _check_source(path, kind):
    """A DataError naming the path and the expected format unless it is a file with a non-blank line."""
    if kind not in EXPECTED:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(EXPECTED)}")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a file; expected {EXPECTED[kind]}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; expected {EXPECTED[kind]}")
    if _is_blank(path):
        raise DataError(f"{path}: empty file (expected {EXPECTED[kind]})")


def _is_blank(path):
    """True for a file of whitespace only; reads up to its first non-blank block."""
    with open(path, "rb") as f:
        return not any(block.strip() for block in iter(lambda: f.read(1 << 16), b""))


def _warn_skipped(skipped, first_problem):
    if skipped:
        print(f"warning: skipped {skipped} bad line(s); the first: {first_problem}", file=sys.stderr)


def read_jsonl(path, kind, skip_bad=False, stats=None):
    """Stream (line_no, record) from a JSONL file, validating each line as `kind` ("pretrain", "chat" or "dpo").

    A bad line raises DataError("path:line: problem"). With skip_bad=True it is skipped instead: the count goes to
    stats["skipped"] (pass a dict to receive it, with stats["first_problem"]) and a warning is printed at the end.
    """
    _check_source(path, kind)
    stats = {} if stats is None else stats
    skipped_before = stats.get("skipped", 0)
    with open(path, "rb") as f:
        yield from _validated(f, path, kind, skip_bad, stats)
    _warn_skipped(stats.get("skipped", 0) - skipped_before, stats.get("first_problem"))


# ------------------------------------------------------------------------------------ chat rendering and masks

def chat_pieces(messages, add_generation_prompt=False, tools=None, enable_thinking=None):
    """The rendered conversation as (text, special) pieces, plus the trained character spans.

    Special pieces are the template's own markers (<|im_start|>, <|im_end|>, the tool-call and tool-response tags,
    the thinking switch) and the reasoning and tool-call tags inside assistant content; they become single ids.
    Everything else, message content included, is plain text: a user who types "<|im_end|>" gets those characters,
    not a turn boundary. Each span [start, end) covers one assistant turn's content, its tool calls and its closing
    <|im_end|>, not the "\\n" after it. tools and enable_thinking: see train_tokenizer.CHAT_TEMPLATE.
    """
    pieces, spans, pos = [], [], 0

    def add(text, special=False):
        nonlocal pos
        if text and pieces and not special and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + text, False)  # one run of text is tokenized as one string
        elif text:
            pieces.append((text, special))
        pos += len(text)

    if tools:
        system = messages[0]["content"] + "\n\n" if messages and messages[0]["role"] == "system" else ""
        add(IM_START, True)
        add("system\n" + system + TOOLS_HEADER + "".join(json_text(tool) + "\n" for tool in tools))
        add(IM_END, True)
        add("\n")
        messages = messages[1:] if system else messages
    for message in messages:
        add(IM_START, True)
        add(message["role"] + "\n")
        start = pos
        if message["role"] == "assistant":
            content = message.get("content") or ""
            if content.startswith(THINK + END_THINK):
                # An empty think block is the thinking-off switch (enable_thinking=False writes it into the prompt),
                # not a choice the model learns: left untrained, a model whose prompt leaves the switch unset
                # thinks, and one whose prompt closes the block answers at once.
                start += len(THINK + END_THINK)
            for i, part in enumerate(ASSISTANT_SPLIT.split(content)):
                add(part, special=i % 2 == 1)
            for k, call in enumerate(message.get("tool_calls") or []):
                add("\n" if content or k else "")
                add(TOOL_CALL, True)
                add(tool_call_text(call))
                add(END_TOOL_CALL, True)
        elif message["role"] == "tool":
            add(TOOL_RESPONSE, True)
            add(message["content"])
            add(END_TOOL_RESPONSE, True)
        else:
            add(message["content"])
        add(IM_END, True)
        if message["role"] == "assistant":
            spans.append((start, pos))
        add("\n")
    if add_generation_prompt:
        add(IM_START, True)
        add("assistant\n")
        if enable_thinking is not None:
            add(THINK, True)
        if enable_thinking is False:
            add(END_THINK, True)
    return pieces, spans


def json_text(obj):
    """JSON as the chat template's tojson writes it (json.dumps defaults, non-ASCII kept)."""
    return json.dumps(obj, ensure_ascii=False)


def tool_call_text(call):
    """The JSON inside <tool_call>…</tool_call>: {"name": ..., "arguments": {...}}, arguments normalised."""
    fn = call.get("function", call)
    return f'{{"name": {json_text(fn["name"])}, "arguments": {json_text(tool_arguments(fn))}}}'


def render_chat(messages, add_generation_prompt=False, tools=None, enable_thinking=None):
    """ChatML text exactly as train_tokenizer.CHAT_TEMPLATE renders it, plus the trained character spans."""
    pieces, spans = chat_pieces(messages, add_generation_prompt, tools, enable_thinking)
    return "".join(text for text, _ in pieces), spans


def target_mask(offsets, spans):
    """uint8 mask: 1 for each token whose character range overlaps a trained span.

    Overlap (not containment) keeps every trained character covered even when byte-level BPE merges a token
    across a span edge, e.g. the header's "\\n" with leading newlines of the content.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), dtype=np.uint8)
    for start, end in spans:
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return mask


def _backend(tokenizer):
    """The fast `tokenizers.Tokenizer` behind a transformers tokenizer (or the Tokenizer itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


_PLAIN = {}  # id(backend) -> (backend, its plain-text copy); the backend is kept so its id stays unique


def plain_tokenizer(tokenizer):
    """A copy of the tokenizer that encodes special-token strings as ordinary text (`encode_special_tokens`).

    A copy rather than a flag flipped on the shared object: the server encodes on several threads at once."""
    backend = _backend(tokenizer)
    if backend.encode_special_tokens:
        return backend
    if id(backend) not in _PLAIN:
        plain = Tokenizer.from_str(backend.to_str())
        plain.no_truncation()
        plain.no_padding()
        plain.encode_special_tokens = True
        _PLAIN[id(backend)] = (backend, plain)
    return _PLAIN[id(backend)][1]


def encode_text(tokenizer, text):
    """Token ids of text as text: "<|endoftext|>" inside it is 13 characters, never the document boundary."""
    # encode_batch releases the GIL while it works (encode does not): a server thread tokenizing a long prompt then
    # leaves the event loop free.
    return plain_tokenizer(tokenizer).encode_batch([text], add_special_tokens=False)[0].ids


def _text_pieces(text):
    """Yield (start, piece): the text cut at the first SAFE_CUT after every LONG_TEXT_CHARS characters."""
    start = 0
    while len(text) - start > LONG_TEXT_CHARS:
        cut = SAFE_CUT.search(text, start + LONG_TEXT_CHARS)
        if cut is None:  # no safe place left: the rest stays whole
            break
        yield start, text[start:cut.start()]
        start = cut.start()
    yield start, text[start:]


def _encode_plain(plain, texts, with_offsets=False, dtype=np.int64):
    """Yield (ids, char offsets (n, 2) or None) of each text, encoded as plain text by the `plain` tokenizer.

    Texts up to LONG_TEXT_CHARS go through one batch call; a longer one is tokenized piece by piece (same ids,
    see SAFE_CUT), so memory is bounded by a piece rather than by the record."""
    encode = plain.encode_batch if with_offsets else plain.encode_batch_fast  # fast: no offsets
    short = iter(encode([t for t in texts if len(t) <= LONG_TEXT_CHARS], add_special_tokens=False))
    for text in texts:
        if len(text) <= LONG_TEXT_CHARS:
            pieces = [(0, next(short))]
        else:
            pieces = ((start, encode([piece], add_special_tokens=False)[0]) for start, piece in _text_pieces(text))
        ids, offsets = [], []
        for start, encoding in pieces:
            ids.append(np.array(encoding.ids, dtype=dtype))
            if with_offsets:
                offsets.append(np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2) + start)
        yield np.concatenate(ids), np.concatenate(offsets) if with_offsets else None


def _encode_pieces_batch(tokenizer, piece_lists):
    """(ids, char offsets) of each list of chat_pieces, all plain runs tokenized in one batch call.

    Plain runs between two special pieces are tokenized as one string, so the ids equal tokenizing the rendered
    string whole with special-token matching (as `apply_chat_template` does) whenever the content holds no
    special-token text."""
    plain = plain_tokenizer(tokenizer)
    runs = _encode_plain(plain, [text for pieces in piece_lists for text, special in pieces if not special],
                         with_offsets=True)
    results = []
    for pieces in piece_lists:
        ids, offsets, pos = [], [], 0
        for text, special in pieces:
            if special:
                piece_ids, piece_offsets = np.array([plain.token_to_id(text)]), np.array([[0, len(text)]])
            else:
                piece_ids, piece_offsets = next(runs)
            ids.append(piece_ids)
            offsets.append(piece_offsets + pos)
            pos += len(text)
        results.append((np.concatenate(ids), np.concatenate(offsets)))
    return results


def encode_chat(tokenizer, messages, last_turn_only=False, add_generation_prompt=False, tools=None,
                enable_thinking=None):
    """Token ids (int64) and target mask (uint8) of a conversation.

    Only the template's markers and assistant reasoning and tool-call tags are special ids (see chat_pieces). The
    mask marks every assistant turn's content, tool calls and closing <|im_end|> (only the final turn with
    last_turn_only, as DPO needs), never headers, system/user/tool turns or the "\\n" after <|im_end|>.
    """
    return _encode_many(tokenizer, [messages], last_turn_only, add_generation_prompt, [tools], enable_thinking)[0]


def truncate_chat(ids, mask, max_tokens):
    """Cut a conversation after the last complete assistant reply that fits in max_tokens; None if none fits.

    Each masked run ends with an assistant turn's <|im_end|>, so cutting at a run's end keeps whole replies only.
    """
    if len(ids) <= max_tokens:
        return ids, mask
    trained = mask.astype(bool)
    run_ends = np.flatnonzero(trained & ~np.append(trained[1:], False)) + 1
    fitting = run_ends[run_ends <= max_tokens]
    if len(fitting) == 0:
        return None
    return ids[:fitting[-1]], mask[:fitting[-1]]


# --------------------------------------------------------------------------------------- token preparation

@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything that decides a cache's content (besides the data files themselves)."""
    kind: str  # "pretrain", "sft" or "dpo"
    tokenizer_file: str
    skip_bad: bool
    max_seq_len: "int | None"  # SFT/DPO: sequences are cut or dropped to max_seq_len + 1 tokens


@functools.lru_cache(maxsize=4)
def _load_tokenizer(tokenizer_file):
    return Tokenizer.from_file(tokenizer_file)


def _token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _encode_chunk(job):
    """Validate and tokenize one chunk of lines (runs in a worker process); results are in line order."""
    spec, path, first_line_no, lines = job
    tok = _load_tokenizer(spec.tokenizer_file)
    stats = collections.Counter()
    records = [r for _, r in _validated(lines, path, READ_KINDS[spec.kind], spec.skip_bad, stats, first_line_no,
                                        hint=SKIP_HINT)]
    dtype = _token_dtype(tok.get_vocab_size())
    if spec.kind == "pretrain":
        eos = np.array([tok.token_to_id(EOS)], dtype=dtype)  # the only boundary: "<|endoftext|>" in a text is text
        docs = _encode_plain(plain_tokenizer(tok), [r["text"] for r in records], dtype=dtype)
        tokens = np.concatenate([part for ids, _ in docs for part in (ids, eos)] or [np.zeros(0, dtype)])
        return {"tokens": tokens, "mask": None, "lengths": None, "sequences": len(records), **stats}
    if spec.kind == "sft":
        sequences = _chat_sequences(tok, records, spec.max_seq_len + 1, stats)
    else:
        sequences = _dpo_sequences(tok, records, spec.max_seq_len + 1, stats)
    return {"tokens": np.concatenate([ids for ids, _ in sequences] or [[]]).astype(dtype),
            "mask": np.concatenate([mask for _, mask in sequences] or [[]]).astype(np.uint8),
            "lengths": np.array([len(ids) for ids, _ in sequences], dtype=np.int64),
            "sequences": len(sequences) // (2 if spec.kind == "dpo" else 1), **stats}


def _encode_many(tok, conversations, last_turn_only, add_generation_prompt=False, tools=None, enable_thinking=None):
    """encode_chat for a batch, tokenized in one call; tools: one list (or None) per conversation."""
    tools = tools or [None] * len(conversations)
    rendered = [chat_pieces(c, add_generation_prompt, t, enable_thinking) for c, t in zip(conversations, tools)]
    encoded = _encode_pieces_batch(tok, [pieces for pieces, _ in rendered])
    return [(ids, target_mask(offsets, spans[-1:] if last_turn_only else spans))
            for (ids, offsets), (_, spans) in zip(encoded, rendered)]


def _chat_sequences(tok, records, max_tokens, stats):
    """SFT sequences cut to max_tokens at a reply boundary; conversations whose first reply does not fit are
    dropped. Counts go to stats["truncated"] and stats["dropped"]."""
    sequences = []
    encoded = _encode_many(tok, [r["conversations"] for r in records], last_turn_only=False,
                           tools=[r.get("tools") for r in records])
    for ids, mask in encoded:
        fitted = truncate_chat(ids, mask, max_tokens)
        if fitted is None:
            stats["dropped"] += 1
            continue
        if len(fitted[0]) < len(ids):
            stats["truncated"] += 1
        sequences.append(fitted)
    return sequences


def _dpo_sequences(tok, records, max_tokens, stats):
    """Chosen, rejected, chosen, rejected, ...; pairs where either side exceeds max_tokens are dropped."""
    chosen = _encode_many(tok, [r["chosen"] for r in records], last_turn_only=True)
    rejected = _encode_many(tok, [r["rejected"] for r in records], last_turn_only=True)
    sequences = []
    for pair in zip(chosen, rejected):
        if max(len(ids) for ids, _ in pair) > max_tokens:
            stats["dropped"] += 1
        else:
            sequences.extend(pair)
    return sequences


def _jobs(spec, paths):
    """Stream each file as jobs of about CHUNK_BYTES of consecutive lines."""
    for path in paths:
        with open(path, "rb") as f:
            lines, size, first_line_no = [], 0, 1
            for line_no, line in enumerate(f, 1):
                lines.append(line)
                size += len(line)
                if size >= CHUNK_BYTES:
                    yield spec, path, first_line_no, lines
                    lines, size, first_line_no = [], 0, line_no + 1
            if lines:
                yield spec, path, first_line_no, lines


def _ordered_map(fn, jobs, num_workers):
    """map(fn, jobs) on worker processes, in input order, with at most 2 * num_workers jobs in flight.

    Pool.imap would read the whole `jobs` iterator ahead (the whole file into RAM); this keeps memory flat.
    """
    if num_workers == 1:
        yield from map(fn, jobs)
        return
    # The workers are forked copies of this process. What it has left for its garbage collector (a finished
    # torch.distributed process group, whose destructor waits for threads a fork does not have) must not be
    # collected there: frozen objects are never collected, in the children either.
    gc.freeze()
    try:
        pool = multiprocessing.Pool(num_workers)
    finally:
        gc.unfreeze()
    with pool:
        pending = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= 2 * num_workers:
                yield _worker_result(pending.popleft())
        while pending:
            yield _worker_result(pending.popleft())


def _worker_result(result):
    """A worker's return value. Its DataError is raised again as one line, without the chained
    multiprocessing.pool.RemoteTraceback (the worker's stack says nothing about the user's data)."""
    try:
        return result.get()
    except DataError as e:
        raise DataError(str(e)) from None


@contextlib.contextmanager
def _single_threaded_tokenizers():
    """Each worker process is one core: the tokenizers thread pool on top would oversubscribe the CPU, and a pool
    started before fork() can deadlock the children. Set while the workers fork, restored afterwards."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _sha256(path):
    """SHA-256 of a file's bytes: about 1.4 s per GB on one core here (blake2b: 2.7 s, sha1: 1.6 s)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _keys(spec, paths):
    """(fingerprint, cache key), from one hash of each data file's bytes.

    The fingerprint identifies the data by content alone (a moved file keeps it, a same-size edit with its mtime
    restored does not). The cache key adds the absolute paths, the tokenizer's hash and every parameter that
    changes the cache's bytes."""
    digests = [_sha256(p) for p in paths]
    fingerprint = _digest({"kind": spec.kind, "files": digests})
    key = {"format": FORMAT_VERSION, "kind": spec.kind, "skip_bad": spec.skip_bad, "max_seq_len": spec.max_seq_len,
           "files": [list(pair) for pair in zip(paths, digests)], "tokenizer": _sha256(spec.tokenizer_file)}
    return fingerprint, _digest(key)[:20]


def _cache_files(stem, kind):
    files = {"tokens": stem + ".tokens.bin"}
    if kind != "pretrain":
        files.update(mask=stem + ".mask.bin", offsets=stem + ".offsets.npy")
    return files


def _read_meta(path):
    """(metadata, None), or (None, why the file is no usable cache metadata)."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:  # empty, truncated, not JSON or not UTF-8
        return None, f"unreadable cache metadata ({e})"
    if not isinstance(meta, dict) or not set(META_KEYS) <= meta.keys():
        return None, "cache metadata without its fields"
    if meta["format"] != FORMAT_VERSION or meta["dtype"] not in ("uint16", "uint32") or \
            not isinstance(meta["tokens"], int):
        return None, "cache metadata of another format"
    return meta, None


def _load_meta(stem, kind):
    """The metadata of a complete cache, or None. The metadata file is written last, so a preparation that was
    killed leaves no metadata (or, with the files damaged since, a size that does not match) and is redone; so is
    one whose metadata file is damaged (with a note saying so)."""
    if not os.path.exists(stem + ".json"):
        return None
    meta, problem = _read_meta(stem + ".json")
    if problem:
        print(f"note: {stem}.json: {problem}; tokenizing again", file=sys.stderr)
        return None
    files = _cache_files(stem, kind)
    expected = {"tokens": meta["tokens"] * np.dtype(meta["dtype"]).itemsize, "mask": meta["tokens"]}
    if any(not os.path.exists(p) or (name in expected and os.path.getsize(p) != expected[name])
           for name, p in files.items()):
        return None
    return meta


def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _prepare(spec, paths, cache_dir, num_workers):
    """Tokenize `paths` into the cache unless a complete cache with the same fingerprint exists.

    Returns (stem, meta, fingerprint); the cache files are stem + ".tokens.bin" (and ".mask.bin", ".offsets.npy"
    for chat), the fingerprint identifies the data files by content (see _keys).
    Under DDP, prepare on one rank first (then barrier) so the other ranks find the cache instead of redoing it.
    """
    paths = [os.path.abspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for path in paths:
        _check_source(path, READ_KINDS[spec.kind])
    cache_dir = os.path.abspath(cache_dir or DEFAULT_CACHE_DIR)
    fingerprint, key = _keys(spec, paths)
    stem = os.path.join(cache_dir, f"{spec.kind}-{key}")
    meta = _load_meta(stem, spec.kind)
    if meta is None:
        os.makedirs(cache_dir, exist_ok=True)
        t0 = time.perf_counter()
        meta = _write_cache(spec, paths, stem, num_workers or min(8, os.cpu_count() or 1))
        source = f"prepared in {time.perf_counter() - t0:.1f}s"
    else:
        source = "cached"
    print(f"{spec.kind} data: {meta['sequences']:,} sequences, {meta['tokens']:,} tokens, "
          f"{meta['truncated']} truncated, {meta['dropped']} dropped (too long), {meta['skipped']} bad lines skipped "
          f"({source}: {stem}.*)")
    _warn_skipped(meta["skipped"], meta["first_problem"])
    return stem, meta, fingerprint


def _write_cache(spec, paths, stem, num_workers):
    """Stream the workers' results into temporary files, rename them into place, then write the metadata last."""
    files = _cache_files(stem, spec.kind)
    tmp = {name: f"{p}.tmp{os.getpid()}" for name, p in files.items()}
    stats, lengths, n_tokens, first_problem = collections.Counter(), [], 0, None
    dtype = _token_dtype(_load_tokenizer(spec.tokenizer_file).get_vocab_size())
    try:
        with contextlib.ExitStack() as stack, _single_threaded_tokenizers():
            token_f = stack.enter_context(open(tmp["tokens"], "wb"))
            mask_f = stack.enter_context(open(tmp["mask"], "wb")) if "mask" in tmp else None
            for chunk in _ordered_map(_encode_chunk, _jobs(spec, paths), num_workers):
                token_f.write(chunk["tokens"].tobytes())
                n_tokens += len(chunk["tokens"])
                if mask_f:
                    mask_f.write(chunk["mask"].tobytes())
                    lengths.append(chunk["lengths"])
                stats.update({k: chunk.get(k, 0) for k in ("sequences", "skipped", "truncated", "dropped")})
                first_problem = first_problem or chunk.get("first_problem")  # chunks arrive in line order
        if "offsets" in tmp:
            with open(tmp["offsets"], "wb") as f:
                np.save(f, np.concatenate([[0], np.cumsum(np.concatenate(lengths or [[]]))]).astype(np.int64))
        for name, p in files.items():
            os.replace(tmp[name], p)
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    meta = {"format": FORMAT_VERSION, "kind": spec.kind, "dtype": np.dtype(dtype).name, "tokens": n_tokens,
            "max_seq_len": spec.max_seq_len, "pad_id": _load_tokenizer(spec.tokenizer_file).token_to_id(PAD),
            **{k: stats[k] for k in ("sequences", "skipped", "truncated", "dropped")},
            "first_problem": first_problem, "sources": paths}
    _write_json(stem + ".json", meta)
    return meta


def _tokenizer_file(tokenizer_dir):
    """tokenizer_dir/tokenizer.json, or a DataError naming the folder and what a tokenizer folder holds."""
    path = os.path.join(os.path.abspath(tokenizer_dir), "tokenizer.json")
    if not os.path.isdir(tokenizer_dir):
        raise DataError(f"{tokenizer_dir}: no such tokenizer folder (expected a folder with tokenizer.json: the "
                        f"shipped tokenizer/, or train_tokenizer.py's --out_dir); check --tokenizer_path")
    if not os.path.isfile(path):
        raise DataError(f"{tokenizer_dir}: no tokenizer.json in this folder; check --tokenizer_path or train one "
                        f"with train_tokenizer.py --out_dir {tokenizer_dir}")
    return path


def load_tokenizer(tokenizer_dir):
    """The transformers tokenizer of a local folder; never looks anything up on a model hub."""
    _tokenizer_file(tokenizer_dir)
    from transformers import AutoTokenizer  # imported here: the data pipeline itself needs only `tokenizers`
    return AutoTokenizer.from_pretrained(os.path.abspath(tokenizer_dir), local_files_only=True)


def prepare_pretrain_tokens(paths, tokenizer_dir, cache_dir=None, num_workers=None, skip_bad=False):
    """Tokenize pretraining JSONL once (each document followed by <|endoftext|>); returns the flat token file.

    The file holds uint16 ids (uint32 for vocabularies over 65536) and is reused while the data files, the
    tokenizer and skip_bad stay the same. num_workers processes (default: CPU count, at most 8) tokenize chunks.
    """
    spec = _Spec("pretrain", _tokenizer_file(tokenizer_dir), skip_bad, None)
    stem, _, _ = _prepare(spec, paths, cache_dir, num_workers)
    return stem + ".tokens.bin"


# ------------------------------------------------------------------------------------------------- datasets

class _CachedDataset(Dataset):
    """A prepared cache, memory-mapped lazily: DataLoader workers then map the files themselves instead of being
    sent a pickled copy of every token. `fingerprint` names the data files' content (equal means the same data)."""

    def __init__(self, spec, paths, cache_dir, num_workers):
        self.stem, self.meta, self.fingerprint = _prepare(spec, paths, cache_dir, num_workers)
        self.kind, self.pad_id = spec.kind, self.meta["pad_id"]
        self.stats = {k: self.meta[k] for k in ("sequences", "tokens", "skipped", "truncated", "dropped")}
        self._arrays = None

    def arrays(self):
        """The cache as read-only arrays: "tokens" (and "mask", "offsets" for chat data)."""
        if self._arrays is None:
            files = _cache_files(self.stem, self.kind)
            self._arrays = {"tokens": np.memmap(files["tokens"], dtype=self.meta["dtype"], mode="r")}
            if "mask" in files:
                self._arrays["mask"] = np.memmap(files["mask"], dtype=np.uint8, mode="r")
                self._arrays["offsets"] = np.load(files["offsets"])
        return self._arrays

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def _sequence(self, j):
        """(ids int64, mask uint8) tensors of the j-th stored sequence."""
        a = self.arrays()
        start, end = a["offsets"][j], a["offsets"][j + 1]
        return (torch.from_numpy(a["tokens"][start:end].astype(np.int64)),
                torch.from_numpy(a["mask"][start:end].copy()))


def _skipped_note(meta):
    return f" ({meta['skipped']} bad line(s) skipped, the first: {meta['first_problem']})" if meta["skipped"] else ""


def _none_left(meta, items, too_long):
    """The DataError for chat data that left no sequence: why, with the counts and the --max_seq_len it used."""
    reasons = []
    if meta["dropped"]:
        reasons.append(f"all {meta['dropped']} {items} {too_long.format(meta['max_seq_len'])}: raise --max_seq_len")
    if meta["skipped"]:
        reasons.append(f"{meta['skipped']} bad line(s) skipped, the first: {meta['first_problem']}")
    return DataError(f"{', '.join(meta['sources'])}: no {items} left: {'; '.join(reasons)}")


class PretrainDataset(_CachedDataset):
    """Packed pretraining windows: window i is tokens[i*L : i*L + L + 1] for L = max_seq_len.

    Stride L means every token (except the first) is a target exactly once and nothing is padded; documents are
    separated by <|endoftext|>, and the final partial window (fewer than L targets) is left out.
    """

    def __init__(self, paths, tokenizer_dir, max_seq_len, cache_dir=None, num_workers=None, skip_bad=False):
        super().__init__(_Spec("pretrain", _tokenizer_file(tokenizer_dir), skip_bad, None), paths, cache_dir,
                         num_workers)
        self.max_seq_len = max_seq_len
        self.n_windows = (self.meta["tokens"] - 1) // max_seq_len
        if self.n_windows <= 0:
            raise DataError(f"{', '.join(self.meta['sources'])}: only {self.meta['tokens']} tokens"
                            f"{_skipped_note(self.meta)}; one window of --max_seq_len {max_seq_len} needs "
                            f"{max_seq_len + 1}: add data or lower --max_seq_len")

    def __len__(self):
        return self.n_windows

    def __getitem__(self, i):
        """(input_ids, targets): int64 tensors of length max_seq_len, targets = inputs shifted by one."""
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} out of range 0..{self.n_windows - 1}")
        start = i * self.max_seq_len
        window = torch.from_numpy(self.arrays()["tokens"][start:start + self.max_seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


class SFTDataset(_CachedDataset):
    """Conversations (SFT or reasoning) as variable-length (ids, mask) items of at most max_seq_len + 1 tokens.

    Over-long conversations are cut after the last whole assistant reply that fits, or dropped if even the first
    does not; `stats` holds the counts and `lengths` every item's length (for LengthBucketBatches).
    """

    def __init__(self, paths, tokenizer_dir, max_seq_len, cache_dir=None, skip_bad=False, num_workers=None):
        super().__init__(_Spec("sft", _tokenizer_file(tokenizer_dir), skip_bad, max_seq_len), paths, cache_dir,
                         num_workers)
        if self.meta["sequences"] == 0:
            raise _none_left(self.meta, "conversations", "are longer than --max_seq_len {} tokens even when cut after "
                                                          "their first reply")
        self.lengths = np.diff(self.arrays()["offsets"])

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self._sequence(i)


class DPODataset(_CachedDataset):
    """Preference pairs as ((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)); masks cover only the final
    assistant turn. Pairs where either side exceeds max_seq_len + 1 tokens are dropped (counted in `stats`)."""

    def __init__(self, paths, tokenizer_dir, max_seq_len, cache_dir=None, skip_bad=False, num_workers=None):
        super().__init__(_Spec("dpo", _tokenizer_file(tokenizer_dir), skip_bad, max_seq_len), paths, cache_dir,
                         num_workers)
        if self.meta["sequences"] == 0:
            raise _none_left(self.meta, "pairs", "have a side longer than --max_seq_len {} tokens")
        sides = np.diff(self.arrays()["offsets"]).reshape(-1, 2)  # stored as chosen, rejected, chosen, ...
        self.lengths = sides.max(axis=1)  # a pair is padded to its longer side

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self._sequence(2 * i), self._sequence(2 * i + 1)


# ----------------------------------------------------------------------------------------- batching, collate

def collate_sft(items, pad_id):
    """Right-pad (ids, mask) items to the longest; returns input_ids, targets (B, T-1) and a float loss_mask."""
    longest = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.float32)
    for row, (item_ids, item_mask) in enumerate(items):
        ids[row, :len(item_ids)] = item_ids
        mask[row, :len(item_mask)] = item_mask
    return {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:].contiguous()}


def collate_dpo(items, pad_id):
    """One batch of 2B rows from B (chosen, rejected) pairs: the B chosen rows first, then the B rejected rows."""
    return collate_sft([chosen for chosen, _ in items] + [rejected for _, rejected in items], pad_id)


class LengthBucketBatches:
    """Batches of similar-length items, deterministic for (seed, epoch), so that padding stays small.

    Per epoch: shuffle all indices, take chunks of `chunk_batches` global batches (batch_size × world_size items),
    sort each chunk by length, cut it into global batches and shuffle them; rank r takes slice r of every global
    batch. So N processes see exactly the batches of one process with N× the batch size (what lets a run resume on
    another number of processes). Remainder: with world_size > 1 a last global batch that is not full sits the
    epoch out (a random set of items each epoch when shuffling); with world_size 1 every index appears exactly once,
    the last batch may be smaller. Resume at batch k with batches(epoch)[k:].
    """

    def __init__(self, lengths, batch_size, seed=0, rank=0, world_size=1, shuffle=True, chunk_batches=100):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.chunk_batches = shuffle, chunk_batches

    def batches(self, epoch):
        """This rank's batches (lists of item indices) for `epoch`."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        size = self.batch_size * self.world_size
        chunk, global_batches = size * self.chunk_batches, []
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            idx = idx[np.argsort(self.lengths[idx], kind="stable")]
            global_batches += [idx[i:i + size] for i in range(0, len(idx), size)]
        steps = rng.permutation(len(global_batches)) if self.shuffle else np.arange(len(global_batches))
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [global_batches[s][mine].tolist() for s in steps
                if self.world_size == 1 or len(global_batches[s]) == size]

    def __len__(self):
        """Batches per epoch on each rank."""
        if self.world_size == 1:
            return -(-len(self.lengths) // self.batch_size)
        return len(self.lengths) // (self.batch_size * self.world_size)


def pad_fraction(lengths, batches):
    """Pad tokens / all tokens when each batch is padded to its longest item."""
    lengths = np.asarray(lengths)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - sum(int(lengths[b].sum()) for b in batches) / padded
