"""Inference shared by the scripts that run a trained model: eval_model.py (chat), api_server.py and serving.py
(the server), eval_bench.py, eval_ppl.py and pipeline.py (scoring), grpo.py (rollouts).

    from inference import load_for_inference, encode_prompt, Reply, generate_pieces

Finding a checkpoint (--model_mode / --model_path, with the nearby ones listed when it is missing), loading it for
inference (LoRA merged, optionally quantised), prompt encoding (chat template or raw continuation, history trimmed
to the context), turning generated token ids into text incrementally (reasoning set apart from the answer,
multi-byte characters never cut), and batched generation for scoring and RL: greedy replies to many prompts
(generate_batch) and groups of sampled replies, each from its own random stream (generate_group, sample_batch).
"""
if __name__ == "__main__":  # before the imports: a library module answers at once, not after torch loads
    raise SystemExit("inference.py is a library module, not a script: chat with eval_model.py, serve with "
                     "api_server.py (see README.md)")
import argparse
import glob
import os
import random
import re
import shlex
import time

import torch
from torch.nn.attention import sdpa_kernel

from checkpoint import LATEST, STAGE_SCRIPTS, load_model, read_weights
from cli import UserError
from dataset import encode_chat, encode_text
from lora import load_lora, merge_lora
from model import DECODE_BACKENDS, KVCache
from train_tokenizer import ANSWER, END_ANSWER, END_THINK, END_TOOL_CALL, SPECIAL_TOKENS, THINK, TOOL_CALL

MODES = {0: "pretrain", 1: "sft", 2: "distill", 3: "dpo", 4: "grpo"}
EOS, IM_END = SPECIAL_TOKENS[0], SPECIAL_TOKENS[2]
TAG_PATTERN = re.compile(f"({re.escape(THINK)}|{re.escape(END_THINK)}|{re.escape(ANSWER)}|{re.escape(END_ANSWER)})")
# What a tag token does to the reply: the section that follows it.
SECTION_AFTER = {THINK: "reasoning", END_THINK: "answer", ANSWER: "answer", END_ANSWER: "answer",
                 TOOL_CALL: "tool_call", END_TOOL_CALL: "answer"}


class PromptTooLong(ValueError):
    """Even the system prompt and the newest user message alone leave no room for the reply."""


# ------------------------------------------------------------------------------------------ prompts and history

def encode_prompt(tokenizer, messages, tools=None, enable_thinking=None):
    """Token ids of a conversation up to the assistant's next reply (dataset.encode_chat: content is plain text).

    tools: OpenAI function schemas offered to the model; enable_thinking False/True closes/opens <think> after the
    generation prompt, None leaves it to the model (train_tokenizer.CHAT_TEMPLATE)."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True, tools=tools,
                       enable_thinking=enable_thinking)[0].tolist()


def encode_raw(tokenizer, text):
    """Token ids for a raw continuation: a document boundary, as before every text in the packed pretraining data,
    then the text itself (as plain text, like the pretraining data)."""
    return [tokenizer.convert_tokens_to_ids(EOS)] + encode_text(tokenizer, text)


def stop_ids(tokenizer, raw):
    """A raw continuation ends at <|endoftext|>; a chat reply at <|im_end|> (or <|endoftext|>)."""
    return tokenizer.convert_tokens_to_ids([EOS] if raw else [IM_END, EOS])


def thinking_start(tokenizer, enable_thinking):
    """The ids the generation prompt ends with for enable_thinking: <think> (True), <think></think> (False), none
    (None); a Reply reads on from them (Reply's start)."""
    tags = {None: [], True: [THINK], False: [THINK, END_THINK]}[enable_thinking]
    return tokenizer.convert_tokens_to_ids(tags)


def split_turns(messages):
    """(the system message as a list of 0 or 1, turns): each turn is a user message and the replies after it."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = []
    for message in messages[len(system):]:
        if message["role"] == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return system, turns


def trim_history(tokenizer, messages, max_prompt_tokens, max_turns=None, tools=None, enable_thinking=None):
    """The messages to send: the system prompt and the newest turn always, then as many of the newest past turns
    as fit in max_prompt_tokens rendered tokens (at most max_turns of them). A turn is a user message with every
    assistant and tool message after it, so a tool call is never cut from its result. Raises PromptTooLong if even
    the system prompt and the newest turn do not fit."""
    system, turns = split_turns(messages)
    past, newest = turns[:-1], turns[-1:]
    if max_turns is not None:
        past = past[len(past) - max_turns:] if max_turns > 0 else []
    while True:
        kept = system + [m for turn in past + newest for m in turn]
        n_tokens = len(encode_prompt(tokenizer, kept, tools, enable_thinking))
        if n_tokens <= max_prompt_tokens:
            return kept
        if not past:
            raise PromptTooLong(f"the prompt has {n_tokens} tokens but only {max_prompt_tokens} fit "
                                f"(max_seq_len minus max_new_tokens); shorten it or lower --max_new_tokens")
        past = past[1:]


# ---------------------------------------------------------------------------------------------- decoding replies

class IncrementalDecoder:
    """Text of a growing token sequence, piece by piece, never cutting a multi-byte character in half.

    A byte-level token can hold part of a UTF-8 character (an emoji spans up to 4 tokens); decoding it alone gives
    U+FFFD. So a piece is released only when the decoded text does not end in one. Each step decodes a short window
    (the previous piece's tokens and the new ones) and keeps the part after the previous piece, so the cost does not
    grow with the length of the reply.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.prefix = 0  # window start: the tokens of the previous released piece
        self.read = 0    # tokens up to here are released

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token_id):
        """The new printable text after appending token_id ("" while a character is incomplete)."""
        self.ids.append(token_id)
        released = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(released):]

    def flush(self):
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        released = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(released):]


def split_reasoning(text):
    """(reasoning, answer) of a reply: the text inside <think>…</think> (to the end if unclosed), and everything
    else without the <answer> tags; both stripped. Reply.push splits a token stream the same way."""
    parts = {"reasoning": [], "answer": []}
    section = "answer"
    for piece in TAG_PATTERN.split(text):
        if piece in (THINK, END_THINK, ANSWER, END_ANSWER):
            section = "reasoning" if piece == THINK else "answer"
        else:
            parts[section].append(piece)
    return "".join(parts["reasoning"]).strip(), "".join(parts["answer"]).strip()


class Reply:
    """One reply as it is generated: push() token ids, get ("reasoning" | "answer" | "tool_call", text) pieces back.

    Tag tokens (<think>, </think>, <answer>, </answer>) switch the section and are not shown; a stop token ends the
    reply and is not shown either. A tool call is not streamed: its JSON comes as one ("tool_call", text) piece
    once </tool_call> closes it (or the reply ends inside it); tools.parse_tool_call reads it. Afterwards: text
    (the whole reply, tags kept), reasoning, answer, tool_calls (the raw texts), token_ids, finish_reason ("stop"
    or "length") and the timings prefill_s and decode_s.

    start: the ids that end the prompt but belong to the reply (thinking_start: the generation prompt's <think> or
    <think></think>). The reply reads on from them, so reasoning after a prompt's <think> is reasoning; text starts
    with them; token_ids holds only the generated ids.
    """

    def __init__(self, tokenizer, stop_ids, prompt_tokens, start=()):
        self.tokenizer, self.stop_ids, self.prompt_tokens = tokenizer, set(stop_ids), prompt_tokens
        self.tags = {tokenizer.convert_tokens_to_ids(tag): section for tag, section in SECTION_AFTER.items()}
        self.decoder = IncrementalDecoder(tokenizer)
        self.section = "answer"
        self.parts = {"reasoning": [], "answer": [], "tool_call": []}
        self.tool_calls = []
        self.token_ids, self.finish_reason = [], "length"
        self.prefill_s = self.decode_s = 0.0
        for token_id in start:
            self.push(token_id)
        self.start, self.token_ids = self.token_ids, []

    def push(self, token_id):
        self.token_ids.append(token_id)
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            return self.flush()
        if token_id in self.tags:
            pieces = self._emit(self.decoder.flush()) + self._close_call()
            self.section = self.tags[token_id]
            return pieces
        return self._emit(self.decoder.push(token_id))

    def flush(self):
        return self._emit(self.decoder.flush()) + self._close_call()

    def _emit(self, text):
        if not text:
            return []
        self.parts[self.section].append(text)
        return [] if self.section == "tool_call" else [(self.section, text)]

    def _close_call(self):
        """The tool call just closed (or cut off), as one piece."""
        if self.section != "tool_call":
            return []
        call, self.parts["tool_call"] = "".join(self.parts["tool_call"]), []
        self.section = "answer"
        self.tool_calls.append(call)
        return [("tool_call", call)]

    @property
    def text(self):
        ids = self.token_ids[:-1] if self.finish_reason == "stop" else self.token_ids
        return self.tokenizer.decode(self.start + ids, skip_special_tokens=False)

    @property
    def reasoning(self):
        return "".join(self.parts["reasoning"]).strip()

    @property
    def answer(self):
        return "".join(self.parts["answer"]).strip()

    def speed(self):
        """Prefill: prompt tokens / time to the first new token. Decode: the tokens after it / the time they took."""
        decoded = len(self.token_ids) - 1
        return (f"prefill {self.prompt_tokens} tok in {self.prefill_s:.3f}s "
                f"({self.prompt_tokens / max(self.prefill_s, 1e-9):.0f} tok/s), decode {decoded} tok in "
                f"{self.decode_s:.3f}s ({decoded / max(self.decode_s, 1e-9):.1f} tok/s)")


def generate_pieces(model, reply, prompt_ids, max_new_tokens, sampling, generator=None):
    """Generate into `reply` (a Reply) token by token, yielding its text pieces as they come."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.embed_tokens.weight.device)
    start = time.perf_counter()
    tokens = model.generate_stream(input_ids, max_new_tokens, stop_ids=sorted(reply.stop_ids), generator=generator,
                                   **sampling)
    for step, token in enumerate(tokens):
        token_id = token.item()  # waits for the device, so the timings are real
        if step == 0:
            reply.prefill_s = time.perf_counter() - start
        yield from reply.push(token_id)
    yield from reply.flush()
    reply.decode_s = time.perf_counter() - start - reply.prefill_s


# ----------------------------------------------------------------------------------- batched group sampling

def sample_rows(logits, temperature, streams):
    """The next token of each row of (rows, vocab) logits: argmax when streams is None, else a draw at this
    temperature by inverting the row's cumulative distribution with one uniform number from its own stream (as
    serving.sample), so a row's draws do not depend on the other rows in the batch."""
    if streams is None:
        return logits.argmax(dim=-1)
    cdf = (logits.float() / temperature).softmax(dim=-1).cumsum(dim=-1)
    u = torch.tensor([1.0 - s.random() for s in streams], device=logits.device)  # in (0, 1]
    return (cdf < (u * cdf[:, -1])[:, None]).sum(dim=-1)                         # first cdf >= u·total


@torch.no_grad()
def generate_group(model, prompts, group, max_new_tokens, stops, temperature=1.0, streams=None, dtype=torch.float32):
    """`group` replies to each prompt (lists of ids; the stop id ends a reply that has one), prompt by prompt:
    greedy without streams, else sampled at `temperature`, row i drawing from streams[i] (GRPO's rollouts,
    eval_bench's --samples).

    The prompts are prefilled once, left-padded into one batch; their KV cache is then repeated for the group and
    every row decodes in one batched forward per token until all rows stopped or max_new_tokens."""
    device = model.embed_tokens.weight.device
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts], device=device)          # (B, P)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    cache = KVCache(model.config, len(prompts), length + max_new_tokens - 1, device, dtype)
    stop = torch.tensor(stops, device=device)
    with sdpa_kernel(DECODE_BACKENDS):
        logits = model(ids, cache=cache, attention_mask=mask, last_only=True).logits[:, -1]
        cache.keys = [k.repeat_interleave(group, dim=0) for k in cache.keys]                   # (B·G, KV, S, hd)
        cache.values = [v.repeat_interleave(group, dim=0) for v in cache.values]
        logits, mask = logits.repeat_interleave(group, dim=0), mask.repeat_interleave(group, dim=0)
        done = torch.zeros(len(logits), dtype=torch.bool, device=device)
        steps = []
        for step in range(max_new_tokens):
            token = sample_rows(logits, temperature, streams)
            steps.append(token)
            done |= torch.isin(token, stop)
            if done.all() or step == max_new_tokens - 1:
                break
            mask = torch.cat((mask, mask.new_ones(len(mask), 1)), dim=1)
            logits = model(token[:, None], cache=cache, attention_mask=mask, last_only=True).logits[:, -1]
    return [cut_at_stop(row, stops) for row in torch.stack(steps, dim=1).tolist()]


def cut_at_stop(ids, stops):
    """ids up to and including the first stop id (all of them if none)."""
    end = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
    return ids[:end]


def room_to_answer(model, prompts, max_new_tokens):
    """max_new_tokens, cut to what the longest prompt leaves of the context."""
    length = max(len(p) for p in prompts)
    room = min(max_new_tokens, model.config.max_seq_len - length)
    if room < 1:
        raise ValueError(f"a prompt of {length} tokens leaves no room to answer in max_seq_len "
                         f"{model.config.max_seq_len}")
    return room


@torch.no_grad()
def generate_batch(model, tokenizer, prompts, max_new_tokens, stops):
    """Greedy replies (text, special tokens kept) to several prompt id lists, left-padded into one batch."""
    pad_id = tokenizer.pad_token_id
    length = max(len(p) for p in prompts)
    max_new_tokens = room_to_answer(model, prompts, max_new_tokens)
    ids = torch.tensor([[pad_id] * (length - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    device = model.embed_tokens.weight.device
    out = model.generate(ids.to(device), max_new_tokens, attention_mask=mask.to(device), temperature=0.0,
                         stop_ids=stops, pad_id=pad_id)
    replies = []
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        replies.append(tokenizer.decode(row[:end], skip_special_tokens=False))
    return replies


@torch.no_grad()
def sample_batch(model, tokenizer, prompts, max_new_tokens, stops, samples, temperature, keys):
    """`samples` replies (text) to each prompt at `temperature`; the k-th reply to prompt i draws from the stream
    keyed by (keys[i], k)."""
    streams = [random.Random(f"{key}-{k}") for key in keys for k in range(samples)]
    replies = generate_group(model, prompts, samples, room_to_answer(model, prompts, max_new_tokens), stops,
                             temperature, streams)
    texts = reply_texts(tokenizer, replies, stops)
    return [texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def reply_texts(tokenizer, replies, stops):
    """generate_group's replies as text, special tokens kept, without the stop token that ended them."""
    return tokenizer.batch_decode([r[:-1] if r[-1] in stops else r for r in replies], skip_special_tokens=False)


# ------------------------------------------------------------------------------------------------- model loading

def inference_device(name=None):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; use --device cpu")
    return torch.device(name)


def inference_dtype(name, device):
    """float32 on CPU, bfloat16 on GPUs that have it (float16 otherwise), unless --dtype says."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_for_inference(path, device, dtype=torch.float32, lora_path=None, quantize="none"):
    """(model, meta) ready to generate: weights from `path`, LoRA adapters merged in, optionally quantised."""
    model, meta = load_model(path, device)
    if lora_path:
        load_lora(model, lora_path)
        merge_lora(model)
    model = model.to(dtype)
    if quantize != "none":
        from quantize import quantize_model  # only when asked: plain inference needs none of it
        model = quantize_model(model, quantize)
    return model.eval(), meta


def checkpoint_path(args):
    """--model_path, or save_dir/{stage}_final.pth for --model_mode; a missing one lists the checkpoints nearby."""
    if args.model_path:
        if not os.path.exists(args.model_path):
            raise UserError(f"--model_path {args.model_path}: no such checkpoint\n" + describe_nearby(args.save_dir))
        return args.model_path
    mode = 1 if args.model_mode is None else args.model_mode
    stage = MODES[mode]
    path = os.path.join(args.save_dir, f"{stage}_final.pth")
    if not os.path.exists(path):
        raise UserError(f"no {stage} checkpoint at {path} (--model_mode {mode} = {stage}); train it with "
                        f"`python {STAGE_SCRIPTS[stage]} --save_dir {args.save_dir}` or pass --model_path\n"
                        + describe_nearby(args.save_dir))
    return path


def nearby_checkpoints(save_dir):
    """The *_final.pth files, *_final/ folders and latest_checkpoint.pth files in save_dir and in its subfolders
    two levels down (the pipeline writes results/pipeline/checkpoints), sorted."""
    found = []
    for depth in range(3):
        folder = os.path.join(glob.escape(save_dir), *["*"] * depth)
        found += glob.glob(os.path.join(folder, "*_final.pth")) + glob.glob(os.path.join(folder, LATEST))
        found += [p for p in glob.glob(os.path.join(folder, "*_final")) if os.path.isdir(p)]
    return sorted(found)


def checkpoint_stage(path):
    """"sft stage" from the checkpoint's metadata; a file that cannot be read says why instead."""
    try:
        stage = read_weights(path)[2].get("stage")
    except UserError as e:  # one bad file must not hide the others in the list
        return f"unreadable: {e}"
    return f"{stage} stage" if stage else "stage not recorded"


def describe_nearby(save_dir):
    """One line per checkpoint under save_dir: its stage and the command that chats with it."""
    paths = nearby_checkpoints(save_dir)
    if not paths:
        return f"no checkpoints in {save_dir} or two folders below it (see --save_dir)"
    return "\n".join([f"checkpoints under {save_dir}:"] + [
        f"  {path} ({checkpoint_stage(path)}): python eval_model.py --model_path {shlex.quote(path)}"
        for path in paths])


DTYPES = ["auto", "float32", "bfloat16", "float16"]


def device_flag(name):
    """--device as an argparse type: cpu, cuda, cuda:N or mps, and only one this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name} was asked for but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{name} was asked for but MPS is not available; use --device cpu")
    return name
