"""Chat with the model of any stage, or answer prompts for scripts.

    python eval_model.py --model_mode 1                                    # chat with results/sft_final.pth
    python eval_model.py --model_mode 0 --prompt "Once upon a time"        # raw continuation (pretrained model)
    python eval_model.py --model_mode 2 --prompts_file questions.jsonl --output_format jsonl --temperature 0
    python eval_model.py --model_path results/latest_checkpoint.pth --lora_path results/lora_sft.pth
    python eval_model.py --model_mode 1 --tools demo                       # the model may call the demo tools
    python eval_model.py --model_mode 2 --thinking off --prompt "What is 17 + 25?"   # answer without reasoning

--model_mode picks save_dir/{stage}_final.pth: 0 pretrain, 1 SFT, 2 distill (reasoning), 3 DPO, 4 GRPO; --model_path takes
any checkpoint instead (a *_final.pth, a latest_checkpoint.pth or a *_final/ safetensors folder). Where there is no
checkpoint, the error lists the ones under --save_dir (two folders deep) with their stage and the command to chat.

The chat modes use the ChatML template the model was trained with: /reset forgets the conversation, /system TEXT
sets the system prompt, /exit, Ctrl-D or Ctrl-C at the prompt quits (status 0), and Ctrl-C during a reply stops
that reply (the turn is dropped from the history) and returns to the prompt. A reasoning model's thinking is set
apart from its answer: dim on a terminal, "[reasoning] ... [/reasoning]" then "answer: ..." otherwise. Mode 0 is
plain completion: each line typed at "> " is printed again with its continuation (no turns, no /system).

--thinking on ends the prompt with <think>, so the model reasons before it answers; off ends it with an empty
<think></think>, so it answers at once; auto leaves it to the model (the chat template's enable_thinking).

--tools demo offers the demo world's tools (demo_data.demo_toolbox: lookup(person, attribute) and
calculator(expression), over the world of --demo_seed) and runs the calls the model makes: the arguments are checked
against the tool's schema (a bad call gets an "error: ..." result, which the model sees), the calculator parses
arithmetic and never calls eval, the results go back to the model in tool turns and it replies again, at most
--max_tool_rounds times per question. The chat prints each call and its result on lines of their own,
"[tool call] lookup {...}" and "[tool result] 64" (dim on a terminal), and keeps them in the conversation. A call
that is not run (it is not valid JSON, the rounds are used up, or no tools are offered) ends the turn: the reply
stands as text, shown with the reason. With --output_format jsonl each record gains "tool_calls": the calls run, in
order, as {"name", "arguments", "result"}; the other fields describe the final reply.

A --prompts_file in JSONL may hold "conversations" with earlier tool calls and results (the OpenAI message shape,
as in SFT data); everything after the last user turn is the reference answer and is left out. A record may carry
"tools" (OpenAI function schemas, as in demo_data.py's tools_eval.jsonl): with --tools demo that record is offered
just those tools, each of which must be one of the demo tools; other records get all of them.

The model loading, prompt encoding and reply decoding it uses live in inference.py, shared with the server.
"""
import dataclasses
import importlib
import importlib.util
import itertools
import json
import os
import sys

import torch

from checkpoint import check_tokenizer
from cli import NONNEG, NONNEG_INT, POSITIVE, POSITIVE_INT, ArgumentParser, UserError, add_bool_flag, number, run_main
from dataset import DataError, load_tokenizer, tools_problem, turn_problem
from demo_data import demo_toolbox, split_tool_calls
from inference import (DTYPES, MODES, PromptTooLong, Reply, checkpoint_path, device_flag, encode_prompt, encode_raw,
                       generate_pieces, inference_device, inference_dtype, load_for_inference, split_reasoning,
                       stop_ids, thinking_start, trim_history)
from model import compile_for_decoding
from tools import Toolbox, parse_tool_call, tool_turns
from train_utils import ROOT

DIM, RESET = "\033[2m", "\033[0m"
THINKING = {"auto": None, "on": True, "off": False}  # --thinking -> the chat template's enable_thinking
MAX_TOOL_ROUNDS = 4


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
    """Everything one reply needs besides the messages and the tools."""
    model: torch.nn.Module
    tokenizer: object
    raw: bool                 # mode 0: continue text, no chat template
    context: int              # prompt + reply tokens must fit here
    max_new_tokens: int
    sampling: dict
    generator: torch.Generator
    history_turns: "int | None"
    show_speed: bool
    enable_thinking: "bool | None"  # --thinking on / off / auto
    max_tool_rounds: int

    def prompt_ids(self, messages, tools=None):
        """(the messages kept after trimming, their prompt token ids); raw mode continues the last message."""
        budget = self.context - self.max_new_tokens
        if self.raw:
            ids = encode_raw(self.tokenizer, messages[-1]["content"])
            if len(ids) > budget:
                raise PromptTooLong(f"the prompt has {len(ids)} tokens but only {budget} fit "
                                    f"(max_seq_len minus max_new_tokens); shorten it or lower --max_new_tokens")
            return messages[-1:], ids
        kept = trim_history(self.tokenizer, messages, budget, self.history_turns, tools, self.enable_thinking)
        return kept, encode_prompt(self.tokenizer, kept, tools, self.enable_thinking)

    def reply(self, prompt_ids, printer=None, stream=True):
        """Generate one Reply; with a printer its text is printed piece by piece (with stream) or all at once. Tool
        calls are not printed here: answer_turn shows them once it knows whether they run."""
        start = [] if self.raw else thinking_start(self.tokenizer, self.enable_thinking)
        reply = Reply(self.tokenizer, stop_ids(self.tokenizer, self.raw), len(prompt_ids), start)
        pieces = generate_pieces(self.model, reply, prompt_ids, self.max_new_tokens, self.sampling, self.generator)
        for section, text in pieces if stream else list(pieces):
            if printer and section != "tool_call":
                printer.write(section, text)
        if self.show_speed:
            print(f"[{reply.speed()}]", file=sys.stderr)
        return reply


class Printer:
    """Writes reply pieces as they come, the reasoning set apart from the answer even without colours.

    Off a terminal: "[reasoning] … [/reasoning]", then "answer: …" on the next line. On a terminal the reasoning
    is dim and the answer starts on a new line. Either way "…= 7" and "7." cannot run together into "7.7". Tool
    calls and results get lines of their own (line()), dim on a terminal like the reasoning. start() writes the
    label ("assistant> ") before the first reply."""

    def __init__(self, out, label=""):
        self.out, self.tty, self.label = out, out.isatty(), label
        self.section, self.pending, self.written = "answer", "", False
        self.line_start = True   # nothing written on the current line since the label
        self.after_line = False  # the last thing written was a line(): end() has no line to finish

    def start(self):
        self.out.write(self.label)
        self.out.flush()

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
        self._put(text)

    def line(self, text):
        """A line of its own (a tool call, a tool result), after whatever the reply printed so far."""
        self._close_reasoning()
        self._put(("" if self.line_start else "\n") + (f"{DIM}{text}{RESET}\n" if self.tty else text + "\n"))
        self.section, self.pending, self.written, self.after_line = "answer", "", False, True

    def end(self):
        self._close_reasoning()  # cut off while thinking: close the section all the same
        self.section, self.pending = "answer", ""
        if not self.after_line:
            self._put("\n")

    def _close_reasoning(self):
        if self.section == "reasoning":
            self._put(RESET if self.tty else " [/reasoning]")

    def _switch(self, section):
        if section == "reasoning":
            self._put(("\n" if self.written else "") + (DIM if self.tty else "[reasoning] "))
        else:
            self._put(RESET + "\n" if self.tty else " [/reasoning]\nanswer: ")
        self.section, self.pending = section, ""

    def _put(self, text):
        if text:
            self.out.write(text)
            self.out.flush()
            self.line_start, self.after_line = text.endswith("\n"), False


def runnable_calls(reply, toolbox, rounds_done, max_rounds):
    """(the reply's tool calls parsed, None) when they are to run; ([], why not) otherwise: there are none (why:
    None), no tools are offered, the rounds are used up, or one of them does not parse (then none of them runs)."""
    if not reply.tool_calls:
        return [], None
    if toolbox is None:
        return [], "no tools are offered (--tools demo offers them)"
    if rounds_done >= max_rounds:
        return [], f"--max_tool_rounds {max_rounds} reached"
    parsed = [parse_tool_call(text) for text in reply.tool_calls]
    problem = next((why for call, why in parsed if call is None), None)
    return ([], problem) if problem else ([call for call, _ in parsed], None)


def answer_turn(session, messages, toolbox=None, printer=None, stream=True):
    """Reply to the conversation's last message, running the tool calls of each reply with the toolbox and
    replying again with their results, until a reply makes no call that runs. Returns (the conversation with the
    new assistant and tool turns, the final Reply, the calls run as {"name", "arguments", "result"}). A printer
    shows the replies and, on lines of their own, each call with its result, or a call that did not run with why.

    A prompt that does not fit raises PromptTooLong, before anything is printed if it is the first one."""
    tools = toolbox.schemas if toolbox else None
    kept, ids = session.prompt_ids(messages, tools)
    ran = []
    if printer:
        printer.start()
    try:
        for rounds in itertools.count():
            reply = session.reply(ids, printer, stream)
            calls, why = runnable_calls(reply, toolbox, rounds, session.max_tool_rounds)
            if not calls:
                if printer:
                    for text in reply.tool_calls:
                        printer.line(f"[tool call not run: {why}] {text}")
                return kept + [{"role": "assistant", "content": reply.text}], reply, ran
            turns = tool_turns(toolbox, split_tool_calls(reply.text)[0], calls)
            for call, turn in zip(calls, turns[1:]):
                ran.append({**call, "result": turn["content"]})
                if printer:
                    printer.line(f"[tool call] {call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}")
                    printer.line(f"[tool result] {turn['content']}")
            kept, ids = session.prompt_ids(kept + turns, tools)
    finally:
        if printer:
            printer.end()  # also when Ctrl-C stops a reply: no terminal is left dim


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


def chat(session, system_prompt, stream, toolbox=None):
    """The interactive loop until /exit, Ctrl-D or Ctrl-C at the prompt: a multi-turn chat, or in raw mode a
    fresh continuation of each line."""
    if importlib.util.find_spec("readline") and sys.stdin.isatty():
        importlib.import_module("readline")  # importing it gives input() line editing and history
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
            history = chat_turn(session, history + [{"role": "user", "content": line}], stream, toolbox)


def chat_command(session, line, system, history):
    """(system, history) after a /command; None for /exit."""
    command, _, rest = line.partition(" ")
    if command in ("/exit", "/quit"):
        return None
    if session.raw and command in ("/reset", "/system"):
        print(f"{command} is a chat command: --model_mode 0 continues each line on its own, with no conversation "
              f"or system prompt (use --model_mode 1-4 to chat)")
    elif command in ("/reset", "/system"):
        if command == "/system":
            system = [{"role": "system", "content": rest.strip()}] if rest.strip() else []
        print("(conversation cleared)")
        return system, list(system)
    else:
        print(RAW_HELP if session.raw else HELP)
    return system, history


def chat_turn(session, messages, stream, toolbox=None):
    """Answer the last user message, tool rounds included; returns the history to continue with (without this
    turn when a prompt is too long or Ctrl-C stopped a reply). Raw mode prints the prompt, then its continuation."""
    printer = Printer(sys.stdout, messages[-1]["content"] if session.raw else "assistant> ")
    try:
        history, _, _ = answer_turn(session, messages, toolbox, printer, stream)
    except PromptTooLong as e:
        print(f"error: {e}")
        return messages[:-1]
    except KeyboardInterrupt:
        print(INTERRUPTED)
        return messages[:-1]
    return [] if session.raw else history


# ------------------------------------------------------------------------------------------- non-interactive use

def prompt_problem(record):
    """Why a JSONL record is not {"prompt": str} or {"conversations": [turns up to a user turn, optionally
    followed by its reference answer]}, or None. Turns are checked as in training data (dataset.turn_problem)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "prompt" in record:
        ok = isinstance(record["prompt"], str) and record["prompt"].strip()
        return None if ok else "'prompt' must be a non-empty string"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "expected a 'prompt' string or a non-empty 'conversations' list"
    open_calls = 0  # tool calls of the last assistant turn not yet answered by a tool turn
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)):
            return f"turn {i} must be an object with string 'role' and 'content'"
        problem = turn_problem(turn, i, open_calls)
        if problem:
            return problem
        open_calls = (len(turn.get("tool_calls") or []) if turn["role"] == "assistant" else
                      open_calls - 1 if turn["role"] == "tool" else 0)
    if not conversation_prompt(turns):
        return "the conversation has no user turn to answer"
    return None


def conversation_prompt(turns):
    """The turns to answer: up to the last user turn. What follows it is the reference answer (with its tool calls
    and results) and is left out."""
    last_user = max((i for i, turn in enumerate(turns) if turn["role"] == "user"), default=-1)
    return turns[:last_user + 1]


def offered_tools(toolbox, schemas):
    """A Toolbox of just the given tools of `toolbox` (a prompts-file record's "tools"), None for none; raises
    ValueError naming a tool that is not one of toolbox's."""
    if toolbox is None:
        raise ValueError("'tools' needs --tools demo (eval_model.py runs the demo tools only)")
    problem = tools_problem(schemas)
    if problem:
        raise ValueError(problem)
    offered = Toolbox()
    for k, schema in enumerate(schemas):
        if schema not in toolbox.schemas:
            raise ValueError(f"tools[{k}] ({schema['function']['name']!r}) is not one of the --tools demo tools: "
                             f"{', '.join(toolbox.functions)} as demo_data.py defines them")
        offered.add(*toolbox.functions[schema["function"]["name"]])
    return offered if schemas else None


def parse_prompt_line(path, line_no, line, toolbox=None):
    """(label, messages, toolbox) of one JSONL prompt line; a bad line raises DataError naming path:line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from e
    problem = prompt_problem(record)
    if problem:
        raise DataError(f"{path}:{line_no}: {problem}")
    if "tools" in record:
        try:
            toolbox = offered_tools(toolbox, record["tools"])
        except ValueError as e:
            raise DataError(f"{path}:{line_no}: {e}") from None
    if "prompt" in record:
        return record["prompt"], [{"role": "user", "content": record["prompt"]}], toolbox
    return record["conversations"], conversation_prompt(record["conversations"]), toolbox


def read_prompts(path, toolbox=None):
    """[(label, messages, toolbox)] from a file: JSONL for .jsonl/.json ("prompt" or "conversations" per line,
    optionally "tools"), otherwise one prompt per non-blank line. toolbox: what --tools offers."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: --prompts_file not found")
    jsonl = path.endswith((".jsonl", ".json"))
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            text = line.rstrip("\n")
            prompts.append(parse_prompt_line(path, line_no, line, toolbox) if jsonl else
                           (text, [{"role": "user", "content": text}], toolbox))
    if not prompts:
        raise DataError(f"{path}: --prompts_file holds no prompts")
    return prompts


def with_system(messages, system_prompt):
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def answer_all(session, prompts, args):
    """Answer each prompt independently (tool rounds included); text (streamed if asked) or one JSON object per
    line on stdout. Raw mode prints each prompt before its continuation."""
    for label, messages, toolbox in prompts:
        if session.raw and len(messages) > 1:
            raise UserError("--model_mode 0 continues raw text; conversations need a chat model (modes 1-4)")
        messages = with_system(messages, args.system_prompt)
        if args.output_format == "text":
            printer = Printer(sys.stdout, messages[-1]["content"] if session.raw else "")
            answer_turn(session, messages, toolbox, printer, args.stream)
            continue
        _, reply, ran = answer_turn(session, messages, toolbox)
        reasoning, answer = split_reasoning(reply.text)  # a call that did not run is answer text, tags and all
        record = {"prompt": label, "answer": answer, "reasoning": reasoning, "text": reply.text,
                  "tokens": len(reply.token_ids), "prompt_tokens": reply.prompt_tokens,
                  "finish_reason": reply.finish_reason}
        if args.tools == "demo":
            record["tool_calls"] = ran
        print(json.dumps(record, ensure_ascii=False), flush=True)


# -------------------------------------------------------------------------------------------------------- the CLI

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
      "(.jsonl) with a 'prompt' string or 'conversations' per line, and optionally 'tools' (a subset of the demo "
      "tools' schemas, offered to that prompt; needs --tools demo)")
    a("--output_format", choices=["text", "jsonl"], default="text",
      help="jsonl: one object per prompt with prompt, answer, reasoning, text, tokens, prompt_tokens, finish_reason "
      "and, with --tools demo, tool_calls (each call run: name, arguments, result) (needs --prompt or "
      "--prompts_file)")
    a("--thinking", choices=list(THINKING), default="auto",
      help="on: the model reasons first (the prompt ends with <think>); off: it answers at once (the prompt ends "
      "with <think></think>); auto: the model decides (chat models only)")
    a("--tools", choices=["none", "demo"], default="none",
      help="demo: offer the demo world's lookup(person, attribute) and calculator(expression) and run the calls "
      "the model makes (arguments checked, never eval), feeding the results back (chat models only)")
    a("--max_tool_rounds", type=POSITIVE_INT, default=None,
      help=f"with --tools demo: at most this many replies with tool calls per question (default: {MAX_TOOL_ROUNDS})")
    a("--demo_seed", type=NONNEG_INT, default=None,
      help="with --tools demo: the demo world the tools look facts up in (default: 0, the pipeline's world; "
      "demo_data.py --seed N made world N)")
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
    for flag in ("max_tool_rounds", "demo_seed"):
        if getattr(args, flag) is not None and args.tools != "demo":
            parser.error(f"--{flag} applies to the tool loop: add --tools demo")


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
    unset = {"system_prompt": None, "history_turns": None, "thinking": "auto", "tools": "none"}
    for flag, default in unset.items():
        if raw and getattr(args, flag) != default:
            raise UserError(f"--{flag} needs a chat model: {why} continues raw text (use --model_mode 1-4)")


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
    return Session(model, tokenizer, raw, context, max_new, sampling, generator, args.history_turns, args.show_speed,
                   THINKING[args.thinking], args.max_tool_rounds or MAX_TOOL_ROUNDS)


def main(argv=None):
    args = parse_args(argv)
    toolbox = demo_toolbox(args.demo_seed or 0) if args.tools == "demo" else None
    prompts = [(p, [{"role": "user", "content": p}], toolbox) for p in args.prompt or []]
    prompts += read_prompts(args.prompts_file, toolbox) if args.prompts_file else []  # a bad file stops before the load
    session = build_session(args)
    if not (args.prompt or args.prompts_file):
        chat(session, args.system_prompt, args.stream, toolbox)
        return
    try:
        answer_all(session, prompts, args)
    except PromptTooLong as e:
        raise UserError(str(e)) from None


if __name__ == "__main__":
    run_main(main)
