"""Chat with the model of any stage, or answer prompts for scripts.

    python eval_model.py --model_mode 1                                    # chat with results/sft_final.pth
    python eval_model.py --model_mode 0 --prompt "Once upon a time"        # raw continuation (pretrained model)
    python eval_model.py --model_mode 2 --prompts_file questions.jsonl --output_format jsonl --temperature 0
    python eval_model.py --model_path results/latest_checkpoint.pth --lora_path results/lora_sft.pth

--model_mode picks save_dir/{stage}_final.pth: 0 pretrain, 1 SFT, 2 distill (reasoning), 3 DPO; --model_path takes
any checkpoint instead (a *_final.pth, a latest_checkpoint.pth or a *_final/ safetensors folder). Mode 0 continues
raw text; the chat modes use the ChatML template the model was trained with. In the chat, /reset forgets the
conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits.

api_server.py imports the reusable pieces: encode_prompt, trim_history, IncrementalDecoder, split_reasoning,
Reply, generate_pieces, generate_reply and load_for_inference.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time

import torch
from transformers import AutoTokenizer

from dataset import ROLES, DataError, encode_chat, encode_text
from lora import load_lora, merge_lora
from model import compile_for_decoding
from train_tokenizer import SPECIAL_TOKENS
from train_utils import ROOT, add_bool_flag, check_tokenizer, load_model

MODES = {0: "pretrain", 1: "sft", 2: "distill", 3: "dpo"}
TRAINED_BY = {"pretrain": "pretrain.py", "sft": "SFT.py", "distill": "distill.py", "dpo": "dpo.py"}
EOS, IM_END = SPECIAL_TOKENS[0], SPECIAL_TOKENS[2]
THINK, END_THINK, ANSWER, END_ANSWER = SPECIAL_TOKENS[3:7]
TAG_PATTERN = re.compile(f"({re.escape(THINK)}|{re.escape(END_THINK)}|{re.escape(ANSWER)}|{re.escape(END_ANSWER)})")
DIM, RESET = "\033[2m", "\033[0m"


class PromptTooLong(ValueError):
    """Even the system prompt and the newest user message alone leave no room for the reply."""


# ------------------------------------------------------------------------------------------ prompts and history

def encode_prompt(tokenizer, messages):
    """Token ids of a conversation up to the assistant's next reply (dataset.encode_chat: content is plain text)."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0].tolist()


def encode_raw(tokenizer, text):
    """Token ids for a raw continuation: a document boundary, as before every text in the packed pretraining data,
    then the text itself (as plain text, like the pretraining data)."""
    return [tokenizer.convert_tokens_to_ids(EOS)] + encode_text(tokenizer, text)


def stop_ids(tokenizer, raw):
    """A raw continuation ends at <|endoftext|>; a chat reply at <|im_end|> (or <|endoftext|>)."""
    return tokenizer.convert_tokens_to_ids([EOS] if raw else [IM_END, EOS])


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


def trim_history(tokenizer, messages, max_prompt_tokens, max_turns=None):
    """The messages to send: the system prompt and the newest turn always, then as many of the newest past turns
    as fit in max_prompt_tokens rendered tokens (at most max_turns of them). Raises PromptTooLong if even the
    system prompt and the newest turn do not fit."""
    system, turns = split_turns(messages)
    past, newest = turns[:-1], turns[-1:]
    if max_turns is not None:
        past = past[len(past) - max_turns:] if max_turns > 0 else []
    while True:
        kept = system + [m for turn in past + newest for m in turn]
        n_tokens = len(encode_prompt(tokenizer, kept))
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
    """One reply as it is generated: push() token ids, get ("reasoning" | "answer", text) pieces back.

    Tag tokens (<think>, </think>, <answer>, </answer>) switch the section and are not shown; a stop token ends the
    reply and is not shown either. Afterwards: text (the whole reply, tags kept), reasoning, answer, token_ids,
    finish_reason ("stop" or "length") and the timings prefill_s and decode_s.
    """

    def __init__(self, tokenizer, stop_ids, prompt_tokens):
        self.tokenizer, self.stop_ids, self.prompt_tokens = tokenizer, set(stop_ids), prompt_tokens
        self.tags = dict(zip(tokenizer.convert_tokens_to_ids([THINK, END_THINK, ANSWER, END_ANSWER]),
                             ("reasoning", "answer", "answer", "answer")))
        self.decoder = IncrementalDecoder(tokenizer)
        self.section = "answer"
        self.parts = {"reasoning": [], "answer": []}
        self.token_ids, self.finish_reason = [], "length"
        self.prefill_s = self.decode_s = 0.0

    def push(self, token_id):
        self.token_ids.append(token_id)
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            return self.flush()
        if token_id in self.tags:
            pieces = self.flush()
            self.section = self.tags[token_id]
            return pieces
        return self._emit(self.decoder.push(token_id))

    def flush(self):
        return self._emit(self.decoder.flush())

    def _emit(self, text):
        if not text:
            return []
        self.parts[self.section].append(text)
        return [(self.section, text)]

    @property
    def text(self):
        ids = self.token_ids[:-1] if self.finish_reason == "stop" else self.token_ids
        return self.tokenizer.decode(ids, skip_special_tokens=False)

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


def generate_reply(model, tokenizer, prompt_ids, max_new_tokens, stops, sampling, generator=None):
    """The whole Reply at once (no streaming)."""
    reply = Reply(tokenizer, stops, len(prompt_ids))
    for _ in generate_pieces(model, reply, prompt_ids, max_new_tokens, sampling, generator):
        pass
    return reply


# ------------------------------------------------------------------------------------------------- model loading

def inference_device(name=None):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for but CUDA is not available; use --device cpu")
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
    """--model_path, or save_dir/{stage}_final.pth for --model_mode; a missing file stops with what to do."""
    if args.model_path:
        if not os.path.exists(args.model_path):
            raise SystemExit(f"--model_path {args.model_path}: no such checkpoint")
        return args.model_path
    mode = 1 if args.model_mode is None else args.model_mode
    stage = MODES[mode]
    path = os.path.join(args.save_dir, f"{stage}_final.pth")
    if not os.path.exists(path):
        raise SystemExit(f"no {stage} checkpoint at {path} (--model_mode {mode} = {stage}); train it "
                         f"with `python {TRAINED_BY[stage]} --save_dir {args.save_dir}` or pass --model_path")
    return path


def warn_ignored_shape(args, config):
    """The seeds pass --dim/--n_layers/--n_heads; the checkpoint's own shape is what loads."""
    for name in ("dim", "n_layers", "n_heads"):
        given = getattr(args, name)
        if given is not None and given != getattr(config, name):
            print(f"warning: --{name} {given} ignored: the checkpoint has {name}={getattr(config, name)}",
                  file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- the session

@dataclasses.dataclass
class Session:
    """Everything one reply needs besides the messages."""
    model: torch.nn.Module
    tokenizer: object
    raw: bool                 # mode 0: continue text, no chat template
    context: int              # prompt + reply tokens must fit here
    max_new_tokens: int
    sampling: dict
    generator: torch.Generator
    history_turns: "int | None"
    show_speed: bool

    def prompt_ids(self, messages):
        """(the messages kept after trimming, their prompt token ids); raw mode continues the last message."""
        budget = self.context - self.max_new_tokens
        if self.raw:
            ids = encode_raw(self.tokenizer, messages[-1]["content"])
            if len(ids) > budget:
                raise PromptTooLong(f"the prompt has {len(ids)} tokens but only {budget} fit "
                                    f"(max_seq_len minus max_new_tokens); shorten it or lower --max_new_tokens")
            return messages[-1:], ids
        kept = trim_history(self.tokenizer, messages, budget, self.history_turns)
        return kept, encode_prompt(self.tokenizer, kept)

    def pieces(self, reply, prompt_ids):
        return generate_pieces(self.model, reply, prompt_ids, self.max_new_tokens, self.sampling, self.generator)

    def new_reply(self, prompt_ids):
        return Reply(self.tokenizer, stop_ids(self.tokenizer, self.raw), len(prompt_ids))


class Printer:
    """Writes reply pieces as they come: the reasoning dim on a terminal, marked [think]…[/think] otherwise."""

    def __init__(self, out):
        self.out, self.tty = out, out.isatty()
        self.section = "answer"

    def write(self, section, text):
        if section != self.section:
            self._switch(section)
        self.out.write(text)
        self.out.flush()

    def end(self):
        self._switch("answer")
        self.out.write("\n")
        self.out.flush()

    def _switch(self, section):
        if section == self.section:
            return
        entering = section == "reasoning"
        if self.tty:
            self.out.write(DIM if entering else RESET)
        else:
            self.out.write("[think]" if entering else "[/think]")
        self.section = section


def print_reply(session, prompt_ids, stream, out=sys.stdout):
    """Generate and print one reply (piece by piece with stream, else all at once); returns the Reply."""
    reply, printer = session.new_reply(prompt_ids), Printer(out)
    pieces = session.pieces(reply, prompt_ids)
    for section, text in pieces if stream else list(pieces):
        printer.write(section, text)
    printer.end()
    if session.show_speed:
        print(f"[{reply.speed()}]", file=sys.stderr)
    return reply


def chat(session, system_prompt, stream):
    """The interactive loop: multi-turn chat (a fresh continuation per line in raw mode) until /exit or EOF."""
    if importlib.util.find_spec("readline") and sys.stdin.isatty():
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(system)
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/system":
                system = [{"role": "system", "content": rest.strip()}] if rest.strip() else []
            if command in ("/reset", "/system"):
                history = list(system)
                print("(conversation cleared)")
            else:
                print(HELP)
            continue
        history = chat_turn(session, history + [{"role": "user", "content": line}], stream)


def chat_turn(session, messages, stream):
    """Answer the last user message; returns the history to continue with (unchanged when the prompt is too long)."""
    try:
        kept, ids = session.prompt_ids(messages)
    except PromptTooLong as e:
        print(f"error: {e}")
        return messages[:-1]
    print("assistant> ", end="", flush=True)
    reply = print_reply(session, ids, stream)
    return [] if session.raw else kept + [{"role": "assistant", "content": reply.text}]


HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /exit"


# ------------------------------------------------------------------------------------------- non-interactive use

def prompt_problem(record):
    """Why a JSONL record is not {"prompt": str} or {"conversations": [turns ending with a user turn, optionally
    followed by its reference answer]}, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "prompt" in record:
        ok = isinstance(record["prompt"], str) and record["prompt"].strip()
        return None if ok else "'prompt' must be a non-empty string"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "expected a 'prompt' string or a non-empty 'conversations' list"
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(turn.get("content"), str)):
            return f"turn {i} must be an object with a role ({', '.join(ROLES)}) and a string content"
        if turn["role"] == "system" and i > 0:
            return f"turn {i} is a system turn; only the first turn may be one"
    prompt = conversation_prompt(turns)
    if not prompt or prompt[-1]["role"] != "user":
        return "the conversation must end with a user turn (or a user turn and its reference answer)"
    return None


def conversation_prompt(turns):
    """The turns to answer: a final assistant turn is the reference answer and is left out."""
    return turns[:-1] if turns[-1]["role"] == "assistant" else turns


def parse_prompt_line(path, line_no, line):
    """(label, messages) of one JSONL prompt line; a bad line raises DataError naming path:line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from e
    problem = prompt_problem(record)
    if problem:
        raise DataError(f"{path}:{line_no}: {problem}")
    if "prompt" in record:
        return record["prompt"], [{"role": "user", "content": record["prompt"]}]
    return record["conversations"], conversation_prompt(record["conversations"])


def read_prompts(path):
    """[(label, messages)] from a file: JSONL for .jsonl/.json ("prompt" or "conversations" per line), otherwise
    one prompt per non-blank line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: --prompts_file not found")
    jsonl = path.endswith((".jsonl", ".json"))
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            text = line.rstrip("\n")
            prompts.append(parse_prompt_line(path, line_no, line) if jsonl else
                           (text, [{"role": "user", "content": text}]))
    return prompts


def with_system(messages, system_prompt):
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def answer_all(session, prompts, args):
    """Answer each prompt independently; text (streamed if asked) or one JSON object per line on stdout."""
    for label, messages in prompts:
        if session.raw and len(messages) > 1:
            raise SystemExit("--model_mode 0 continues raw text; conversations need a chat model (modes 1-3)")
        _, ids = session.prompt_ids(with_system(messages, args.system_prompt))
        if args.output_format == "text":
            print_reply(session, ids, args.stream)
            continue
        reply = generate_reply(session.model, session.tokenizer, ids, session.max_new_tokens,
                               stop_ids(session.tokenizer, session.raw), session.sampling, session.generator)
        if session.show_speed:
            print(f"[{reply.speed()}]", file=sys.stderr)
        print(json.dumps({"prompt": label, "answer": reply.answer, "reasoning": reply.reasoning, "text": reply.text,
                          "tokens": len(reply.token_ids), "prompt_tokens": reply.prompt_tokens,
                          "finish_reason": reply.finish_reason}, ensure_ascii=False), flush=True)


# -------------------------------------------------------------------------------------------------------- the CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model_mode", type=int, choices=sorted(MODES), default=None,
      help="which save_dir/{stage}_final.pth to load: " + ", ".join(f"{k} {v}" for k, v in MODES.items()) +
      " (default 1; with --model_path: 0 if the checkpoint says it is a pretrained one); 0 continues raw text")
    a("--save_dir", default="results", help="where the stage scripts wrote their weights")
    a("--model_path", default=None, help="load this checkpoint instead of the --model_mode one")
    a("--lora_path", default=None, help="LoRA adapters (SFT.py --lora_rank writes save_dir/lora_sft.pth) to merge in")
    a("--quantize", choices=["none", "int8", "int4"], default="none", help="weight-only quantised linear layers")
    a("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"))
    a("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    a("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
      help="weights' dtype (auto: float32 on CPU, bfloat16 on GPU)")
    a("--max_seq_len", type=int, default=None, help="prompt + reply budget in tokens (default and most: the model's)")
    a("--max_new_tokens", type=int, default=None, help="reply length cap (default: min(512, max_seq_len / 2))")
    a("--temperature", type=float, default=0.7, help="0 = greedy")
    a("--top_p", type=float, default=0.9)
    a("--top_k", type=int, default=0, help="0 = off")
    a("--repetition_penalty", type=float, default=1.0)
    a("--seed", type=int, default=1337)
    add_bool_flag(p, "--stream", True, help="print the reply token by token")
    a("--history_turns", type=int, default=None, help="keep at most this many past turns (default: all that fit)")
    a("--system_prompt", default=None, help="a system message before every conversation")
    add_bool_flag(p, "--compile", help="torch.compile the model (dynamic shapes): the first reply waits for the "
                  "compilation (about a minute on 2 CPU cores), later ones decode ~1.4x faster on CPU")
    add_bool_flag(p, "--show_speed", help="print prefill and decode tokens/s after each reply (stderr)")
    a("--prompt", action="append", default=None, help="answer this prompt and exit (repeatable)")
    a("--prompts_file", default=None, help="answer every prompt in this file and exit: one per line, or JSONL "
      "(.jsonl) with a 'prompt' string or 'conversations' per line")
    a("--output_format", choices=["text", "jsonl"], default="text",
      help="jsonl: one object per prompt with prompt, answer, reasoning, text, tokens, finish_reason")
    for name in ("--dim", "--n_layers", "--n_heads"):
        a(name, type=int, default=None, help="accepted for the seeds' commands; the checkpoint's shape wins")
    return p.parse_args(argv)


def build_session(args):
    device = inference_device(args.device)
    path = checkpoint_path(args)
    model, meta = load_for_inference(path, device, inference_dtype(args.dtype, device), args.lora_path, args.quantize)
    check_tokenizer(meta, args.tokenizer_path, path)
    warn_ignored_shape(args, model.config)
    if args.compile:
        compile_for_decoding(model)
    context = model.config.max_seq_len
    if args.max_seq_len is not None and args.max_seq_len > context:
        print(f"warning: --max_seq_len {args.max_seq_len} exceeds the model's context {context}; using {context}",
              file=sys.stderr)
    context = min(args.max_seq_len or context, context)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else min(512, context // 2)
    if not 0 < max_new < context:
        raise SystemExit(f"--max_new_tokens {max_new} must be at least 1 and leave room for a prompt in "
                         f"max_seq_len {context}")
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k or None,
                "repetition_penalty": args.repetition_penalty}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    raw = args.model_mode == 0 if args.model_mode is not None else meta.get("stage") == "pretrain"
    quantized = f", {args.quantize} weights" if args.quantize != "none" else ""
    print(f"{path}: {meta.get('stage', 'unknown')} stage, {model.config.param_counts()[0]:,} parameters{quantized}, "
          f"context {context}, on {device}" + (" (raw text continuation)" if raw else ""), file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    return Session(model, tokenizer, raw, context, max_new, sampling, generator, args.history_turns, args.show_speed)


def main(argv=None):
    args = parse_args(argv)
    session = build_session(args)
    if args.prompt or args.prompts_file:
        prompts = [(p, [{"role": "user", "content": p}]) for p in args.prompt or []]
        prompts += read_prompts(args.prompts_file) if args.prompts_file else []
        try:
            answer_all(session, prompts, args)
        except PromptTooLong as e:
            raise SystemExit(f"error: {e}")
        return
    chat(session, args.system_prompt, args.stream)


if __name__ == "__main__":
    main()
