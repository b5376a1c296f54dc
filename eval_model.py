"""Chat with the model of any stage, or answer prompts for scripts.

    python eval_model.py --model_mode 1                                    # chat with results/sft_final.pth
    python eval_model.py --model_mode 0 --prompt "Once upon a time"        # raw continuation (pretrained model)
    python eval_model.py --model_mode 2 --prompts_file questions.jsonl --output_format jsonl --temperature 0
    python eval_model.py --model_path results/latest_checkpoint.pth --lora_path results/lora_sft.pth

--model_mode picks save_dir/{stage}_final.pth: 0 pretrain, 1 SFT, 2 distill (reasoning), 3 DPO; --model_path takes
any checkpoint instead (a *_final.pth, a latest_checkpoint.pth or a *_final/ safetensors folder). Where there is no
checkpoint, the error lists the ones under --save_dir (two folders deep) with their stage and the command to chat.

The chat modes use the ChatML template the model was trained with: /reset forgets the conversation, /system TEXT
sets the system prompt, /exit, Ctrl-D or Ctrl-C at the prompt quits (status 0), and Ctrl-C during a reply stops
that reply (the turn is dropped from the history) and returns to the prompt. A reasoning model's thinking is set
apart from its answer: dim on a terminal, "[reasoning] ... [/reasoning]" then "answer: ..." otherwise. Mode 0 is
plain completion: each line typed at "> " is printed again with its continuation (no turns, no /system).

api_server.py imports the reusable pieces: encode_prompt, trim_history, IncrementalDecoder, split_reasoning,
Reply, generate_pieces, generate_reply and load_for_inference.
"""
import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shlex
import sys
import time

import torch

from checkpoint import LATEST, STAGE_SCRIPTS, check_tokenizer, load_model, read_weights
from cli import NONNEG, NONNEG_INT, POSITIVE, POSITIVE_INT, ArgumentParser, UserError, add_bool_flag, number, run_main
from dataset import ROLES, DataError, encode_chat, encode_text, load_tokenizer
from lora import load_lora, merge_lora
from model import compile_for_decoding
from train_tokenizer import SPECIAL_TOKENS
from train_utils import ROOT

MODES = {0: "pretrain", 1: "sft", 2: "distill", 3: "dpo"}
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
    """Writes reply pieces as they come, the reasoning set apart from the answer even without colours.

    Off a terminal: "[reasoning] … [/reasoning]", then "answer: …" on the next line. On a terminal the reasoning
    is dim and the answer starts on a new line. Either way "…= 7" and "7." cannot run together into "7.7"."""

    def __init__(self, out):
        self.out, self.tty = out, out.isatty()
        self.section, self.pending, self.written = "answer", "", False

    def write(self, section, text):
        if section != self.section:
            text = text.lstrip()  # a section starts at its first visible character
            if not text:
                return
            self._switch(section)
        if self.section == "reasoning":  # trailing whitespace waits: the closing marker may come next
            body = text.rstrip()
            text, self.pending = (self.pending + body, text[len(body):]) if body else ("", self.pending + text)
        self.written = self.written or bool(text.strip())
        self.out.write(text)
        self.out.flush()

    def end(self):
        if self.section == "reasoning":  # cut off while thinking: close the section all the same
            self.out.write(RESET if self.tty else " [/reasoning]")
        self.section, self.pending = "answer", ""
        self.out.write("\n")
        self.out.flush()

    def _switch(self, section):
        if section == "reasoning":
            self.out.write(("\n" if self.written else "") + (DIM if self.tty else "[reasoning] "))
        else:
            self.out.write(RESET + "\n" if self.tty else " [/reasoning]\nanswer: ")
        self.section, self.pending = section, ""


def print_reply(session, prompt_ids, stream, out=None):
    """Generate and print one reply to out (default: the current sys.stdout), piece by piece with stream, else all
    at once; returns the Reply. The printer is closed even when Ctrl-C stops the reply: no terminal is left dim."""
    reply, printer = session.new_reply(prompt_ids), Printer(out or sys.stdout)
    pieces = session.pieces(reply, prompt_ids)
    try:
        for section, text in pieces if stream else list(pieces):
            printer.write(section, text)
    finally:
        printer.end()
    if session.show_speed:
        print(f"[{reply.speed()}]", file=sys.stderr)
    return reply


HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /exit (or "
        "Ctrl-D); Ctrl-C stops a reply")
RAW_HELP = ("plain completion (--model_mode 0): each line you type is printed again with its continuation; /exit "
            "(or Ctrl-D) quits, Ctrl-C stops a continuation")
INTERRUPTED = "[interrupted: the reply was stopped and this turn is not kept]"


def read_line(label):
    """The next line typed, stripped; None at Ctrl-D or Ctrl-C (both leave the chat, status 0)."""
    try:
        return input(label).strip()
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def chat(session, system_prompt, stream):
    """The interactive loop until /exit, Ctrl-D or Ctrl-C at the prompt: a multi-turn chat, or in raw mode a
    fresh continuation of each line."""
    if importlib.util.find_spec("readline") and sys.stdin.isatty():
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(system)
    print(RAW_HELP if session.raw else HELP, file=sys.stderr)
    while (line := read_line("> " if session.raw else "user> ")) is not None:
        if line.startswith("/"):
            state = chat_command(session, line, system, history)
            if state is None:
                return
            system, history = state
        elif line:
            history = chat_turn(session, history + [{"role": "user", "content": line}], stream)


def chat_command(session, line, system, history):
    """(system, history) after a /command; None for /exit."""
    command, _, rest = line.partition(" ")
    if command in ("/exit", "/quit"):
        return None
    if session.raw and command in ("/reset", "/system"):
        print(f"{command} is a chat command: --model_mode 0 continues each line on its own, with no conversation "
              f"or system prompt (use --model_mode 1-3 to chat)")
    elif command in ("/reset", "/system"):
        if command == "/system":
            system = [{"role": "system", "content": rest.strip()}] if rest.strip() else []
        print("(conversation cleared)")
        return system, list(system)
    else:
        print(RAW_HELP if session.raw else HELP)
    return system, history


def chat_turn(session, messages, stream):
    """Answer the last user message; returns the history to continue with (without this turn when the prompt is
    too long or Ctrl-C stopped the reply). Raw mode prints the prompt, then its continuation."""
    try:
        kept, ids = session.prompt_ids(messages)
        print(messages[-1]["content"] if session.raw else "assistant> ", end="", flush=True)
        reply = print_reply(session, ids, stream)
    except PromptTooLong as e:
        print(f"error: {e}")
        return messages[:-1]
    except KeyboardInterrupt:
        print(INTERRUPTED)
        return messages[:-1]
    return [] if session.raw else kept + [{"role": "assistant", "content": reply.text}]


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
    if not prompts:
        raise DataError(f"{path}: --prompts_file holds no prompts")
    return prompts


def with_system(messages, system_prompt):
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def answer_all(session, prompts, args):
    """Answer each prompt independently; text (streamed if asked) or one JSON object per line on stdout. Raw mode
    prints each prompt before its continuation."""
    for label, messages in prompts:
        if session.raw and len(messages) > 1:
            raise UserError("--model_mode 0 continues raw text; conversations need a chat model (modes 1-3)")
        _, ids = session.prompt_ids(with_system(messages, args.system_prompt))
        if args.output_format == "text":
            if session.raw:
                print(messages[-1]["content"], end="", flush=True)
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


def add_sampling_args(a):
    a("--max_seq_len", type=number(int, low=2), default=None,
      help="prompt + reply budget in tokens (default: the model's context, also the most)")
    a("--max_new_tokens", type=POSITIVE_INT, default=None, help="reply length cap (default: min(512, max_seq_len / 2))")
    a("--temperature", type=NONNEG, default=0.7, help="0 = greedy")
    a("--top_p", type=number(float, low=0, high=1), default=0.9,
      help="nucleus sampling, in [0, 1]; 1 = off, 0 = greedy (as --temperature 0)")
    a("--top_k", type=NONNEG_INT, default=0, help="sample from the k most likely tokens; 0 = off")
    a("--repetition_penalty", type=POSITIVE, default=1.0, help="> 1 discourages repeats; 1 = off")
    a("--seed", type=number(int, low=0, high=2 ** 64 - 1), default=1337, help="sampling seed")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--model_mode", type=int, choices=sorted(MODES), default=None,
      help="which save_dir/{stage}_final.pth to load: " + ", ".join(f"{k} {v}" for k, v in MODES.items()) +
      "; 0 continues raw text (default: 1, or with --model_path 0 if the checkpoint is a pretrained one)")
    a("--save_dir", default="results", help="where the stage scripts wrote their weights")
    a("--model_path", default=None, help="load this checkpoint instead of the --model_mode one")
    a("--lora_path", default=None, help="LoRA adapters (SFT.py --lora_rank writes save_dir/lora_sft.pth) to merge in")
    a("--quantize", choices=["none", "int8", "int4"], default="none", help="weight-only quantised linear layers")
    a("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"), help="the tokenizer the model was trained with")
    a("--device", type=device_flag, default=None, help="cuda, cuda:1, cpu, mps (default: cuda when available)")
    a("--dtype", choices=DTYPES, default="auto", help="weights' dtype (auto: float32 on CPU, bfloat16 on GPU)")
    add_sampling_args(a)
    add_bool_flag(p, "--stream", True, help="print the reply token by token")
    a("--history_turns", type=NONNEG_INT, default=None,
      help="keep at most this many past turns (default: all that fit)")
    a("--system_prompt", default=None, help="a system message before every conversation (chat modes only)")
    add_bool_flag(p, "--compile", help="torch.compile the model (dynamic shapes): the first reply waits for the "
                  "compilation (about a minute on 2 CPU cores), later ones decode ~1.4x faster on CPU")
    add_bool_flag(p, "--show_speed", help="print prefill and decode tokens/s after each reply (stderr)")
    a("--prompt", action="append", default=None, help="answer this prompt and exit (repeatable)")
    a("--prompts_file", default=None, help="answer every prompt in this file and exit: one per line, or JSONL "
      "(.jsonl) with a 'prompt' string or 'conversations' per line")
    a("--output_format", choices=["text", "jsonl"], default="text",
      help="jsonl: one object per prompt with prompt, answer, reasoning, text, tokens, finish_reason "
      "(needs --prompt or --prompts_file)")
    for name in ("--dim", "--n_layers", "--n_heads"):
        a(name, type=POSITIVE_INT, default=None, help="accepted for the seeds' commands; the checkpoint's shape wins")
    args = p.parse_args(argv)
    check_flags(p, args)
    return args


def check_flags(parser, args):
    """What a flag's type cannot check alone: flags that contradict each other, a file that is not there."""
    if args.max_new_tokens is not None and args.max_seq_len is not None and args.max_new_tokens >= args.max_seq_len:
        parser.error(f"--max_new_tokens {args.max_new_tokens} must be below --max_seq_len {args.max_seq_len} "
                     f"(the prompt needs room too)")
    if args.output_format == "jsonl" and not (args.prompt or args.prompts_file):
        parser.error("--output_format jsonl needs --prompt or --prompts_file (the interactive chat prints text)")
    if args.lora_path and not os.path.isfile(args.lora_path):
        parser.error(f"--lora_path {args.lora_path}: no such file (SFT.py --lora_rank writes save_dir/lora_sft.pth)")


def reply_budget(args, model_context):
    """(context, max_new_tokens): --max_seq_len capped at the model's context, and the reply's share of it."""
    if args.max_seq_len is not None and args.max_seq_len > model_context:
        print(f"warning: --max_seq_len {args.max_seq_len} exceeds the model's context {model_context}; using "
              f"{model_context}", file=sys.stderr)
    context = min(args.max_seq_len or model_context, model_context)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else min(512, context // 2)
    if max_new >= context:
        raise UserError(f"--max_new_tokens {max_new} leaves no room for a prompt in the model's context of "
                        f"{context} tokens; choose at most {context - 1}")
    return context, max_new


def check_raw_flags(args, raw, path):
    """Chat-only flags make no sense for a raw continuation: refuse them instead of ignoring them."""
    why = "--model_mode 0" if args.model_mode == 0 else f"{path} is a pretrained model"
    for flag in ("system_prompt", "history_turns"):
        if raw and getattr(args, flag) is not None:
            raise UserError(f"--{flag} needs a chat model: {why} continues raw text (use --model_mode 1-3)")


def build_session(args):
    device = inference_device(args.device)
    path = checkpoint_path(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    model, meta = load_for_inference(path, device, inference_dtype(args.dtype, device), args.lora_path, args.quantize)
    check_tokenizer(meta, args.tokenizer_path, path)
    warn_ignored_shape(args, model.config)
    raw = args.model_mode == 0 if args.model_mode is not None else meta.get("stage") == "pretrain"
    check_raw_flags(args, raw, path)
    context, max_new = reply_budget(args, model.config.max_seq_len)
    if args.compile:
        compile_for_decoding(model)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k or None,
                "repetition_penalty": args.repetition_penalty}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    quantized = f", {args.quantize} weights" if args.quantize != "none" else ""
    print(f"{path}: {meta.get('stage', 'unrecorded')} stage, {model.config.param_counts()[0]:,} parameters"
          f"{quantized}, context {context}, on {device}" + (" (raw text continuation)" if raw else ""),
          file=sys.stderr)
    return Session(model, tokenizer, raw, context, max_new, sampling, generator, args.history_turns, args.show_speed)


def main(argv=None):
    args = parse_args(argv)
    prompts = [(p, [{"role": "user", "content": p}]) for p in args.prompt or []]
    prompts += read_prompts(args.prompts_file) if args.prompts_file else []  # a bad file stops before the load
    session = build_session(args)
    if not (args.prompt or args.prompts_file):
        chat(session, args.system_prompt, args.stream)
        return
    try:
        answer_all(session, prompts, args)
    except PromptTooLong as e:
        raise UserError(str(e)) from None


if __name__ == "__main__":
    run_main(main)
