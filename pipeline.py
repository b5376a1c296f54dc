"""The whole pipeline in one command: data → pretrain → SFT → reasoning distillation → GRPO → DPO → evaluation,
ending in a scoreboard that shows what each stage changed.

    python pipeline.py                                  # built-in demo corpus, tiny model, ~10 min on 2 CPU cores
    python pipeline.py --data_dir data/real --preset small --out_dir runs/small      # your own data, a real size

--data_dir holds pretrain.jsonl, sft.jsonl, reasoning.jsonl, dpo.jsonl and, optionally, the held-out files
pretrain_eval.jsonl, sft_eval.jsonl, reasoning_eval.jsonl, dpo_eval.jsonl, tools_eval.jsonl (the layout
demo_data.py writes). Task metrics (answer, reasoning and tool-use accuracy) need the demo corpus' eval records,
which carry their answers; the tool-use questions are answered with the demo tools really executed
(demo_data.demo_toolbox).
Running it again redoes every stage (the stages get --overwrite); it ends by printing the commands that chat with,
serve and export what it trained.
"""
import argparse
import itertools
import json
import math
import os
import time

import numpy as np
import torch

import distill
import dpo
import grpo
import pretrain
import SFT
import train_utils as tu
from checkpoint import load_model, read_weights
from cli import NONNEG_INT, POSITIVE, POSITIVE_INT, ArgumentParser, UserError, run_main
from Config import PRESETS
from dataset import DPODataset, PretrainDataset, SFTDataset, collate_dpo, load_tokenizer, read_jsonl
from demo_data import (demo_toolbox, generate_demo, is_terse, parse_reasoning, prompt_turns, score_direct,
                       score_reasoning, score_sft, score_tool_answer, score_tool_call, split_tool_calls)
from inference import encode_prompt, generate_batch, sample_batch, stop_ids
from tools import parse_tool_call, tool_turns

# GRPO comes right after distillation, whose reasoning it improves (its scoreboard row against distill's shows
# what RL added); DPO then polishes the style of the RL model, the one served.
STAGES = ["pretrain", "sft", "distill", "grpo", "dpo"]
FILES = ["pretrain", "sft", "reasoning", "dpo"]
EVAL_ONLY = ["tools"]  # held-out tool-use questions; their training conversations are in sft.jsonl
SAMPLES = 4  # replies sampled per held-out word problem for "reasoning acc, sampled"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data_dir", default=None, help="your data (default: generate the demo corpus)")
    p.add_argument("--demo_scale", type=POSITIVE, default=1.0, help="size of the generated demo corpus")
    p.add_argument("--out_dir", default="results/pipeline", help="data, checkpoints and the scoreboard go here")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size for pretraining")
    p.add_argument("--max_seq_len", type=POSITIVE_INT, default=1024,
                   help="the context from SFT on (pretraining keeps the preset's, e.g. 256 for tiny): a tool-use "
                        "conversation of the demo corpus takes up to ~1000 tokens, the two tool schemas alone ~350")
    p.add_argument("--tokenizer_path", default=os.path.join(tu.ROOT, "tokenizer"), help="tokenizer folder")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--seed", type=NONNEG_INT, default=1337, help="every stage's --seed")
    p.add_argument("--pretrain_epochs", type=POSITIVE_INT, default=1, help="passes over pretrain.jsonl")
    p.add_argument("--sft_epochs", type=POSITIVE_INT, default=3, help="passes over sft.jsonl")
    p.add_argument("--distill_epochs", type=POSITIVE_INT, default=8, help="passes over reasoning.jsonl (+ replay)")
    p.add_argument("--replay", type=NONNEG_INT, default=800,
                   help="SFT conversations mixed into reasoning distillation, so plain answers are not forgotten")
    p.add_argument("--grpo_steps", type=POSITIVE_INT, default=150,
                   help="GRPO steps on the word problems of reasoning.jsonl (8 prompts × 8 sampled replies each)")
    p.add_argument("--dpo_epochs", type=POSITIVE_INT, default=1, help="passes over dpo.jsonl")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=16, help="every stage's --batch_size")
    p.add_argument("--eval_items", type=POSITIVE_INT, default=200, help="held-out questions answered per stage")
    p.add_argument("--tool_items", type=NONNEG_INT, default=100,
                   help="held-out tool-use questions answered per stage, tools executed (0: skip)")
    return p.parse_args(argv)


def data_files(args):
    """{name: path} of the training and (when present) held-out files."""
    if args.data_dir is None:
        return generate_demo(os.path.join(args.out_dir, "data"), seed=0, scale=args.demo_scale)
    paths = {}
    for name in FILES + EVAL_ONLY:
        for suffix in ("", "_eval"):
            path = os.path.join(args.data_dir, f"{name}{suffix}.jsonl")
            if os.path.isfile(path):
                paths[name + suffix] = path
            elif not suffix and name in FILES:
                raise UserError(f"{path} is missing: --data_dir needs {', '.join(f + '.jsonl' for f in FILES)}")
    return paths


def replay(args, sft_path):
    """[path of the first --replay SFT conversations], or [] when --replay is 0."""
    if args.replay == 0:
        return []
    path = os.path.join(args.out_dir, "sft_replay.jsonl")
    with open(sft_path, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as dst:
        dst.writelines(itertools.islice(src, args.replay))
    return [path]


def stage_commands(args, files):
    """Each stage's arguments: the previous stage's final weights in, the held-out file for validation."""
    save = ["--save_dir", os.path.join(args.out_dir, "checkpoints"), "--tokenizer_path", args.tokenizer_path,
            "--seed", str(args.seed), "--batch_size", str(args.batch_size), "--log_interval", "50",
            "--save_step", "1000000", "--overwrite", *(["--device", args.device] if args.device else [])]
    ckpt = os.path.join(args.out_dir, "checkpoints")

    def held_out(name):
        return ["--eval_data", files[name + "_eval"], "--eval_interval", "1000000"] if name + "_eval" in files else []

    return {
        "pretrain": (pretrain.main, ["--data_path", files["pretrain"], "--preset", args.preset, "--learning_rate",
                                     "3e-3", "--epochs", str(args.pretrain_epochs), *held_out("pretrain"), *save]),
        # Short windows pretrain best for the tokens; SFT then continues at the longer context (RoPE with
        # rope_theta 1e6 barely turns its slow dimensions over 1024 positions, so no scaling is needed).
        "sft": (SFT.main, ["--data_path", files["sft"], "--pretrained_path", f"{ckpt}/pretrain_final.pth",
                           "--max_seq_len", str(args.max_seq_len), "--learning_rate", "1e-3",
                           "--epochs", str(args.sft_epochs), *held_out("sft"), *save]),
        "distill": (distill.main, ["--data_path", files["reasoning"], *replay(args, files["sft"]),
                                   "--sft_path", f"{ckpt}/sft_final.pth",
                                   "--learning_rate", "2e-3", "--epochs", str(args.distill_epochs),
                                   "--special_token_weight", "5", *held_out("reasoning"), *save]),
        # The later --batch_size wins: GRPO's counts prompts, each answered 8 times. A right worked reply takes up
        # to ~110 tokens, so a cap of 160 keeps the length penalty (its last quarter) off right replies; a warmup
        # of a fifth of the run (at most 30 steps) lets Adam's moments settle on the noisy RL gradient first.
        "grpo": (grpo.main, ["--data_path", files["reasoning"], "--sft_path", f"{ckpt}/distill_final.pth",
                             "--learning_rate", "1e-4", "--warmup_steps", str(min(30, args.grpo_steps // 5)),
                             "--scale_rewards", "--max_steps", str(args.grpo_steps), "--max_new_tokens", "160",
                             "--num_generations", "8", *held_out("reasoning"), *save, "--batch_size", "8"]),
        "dpo": (dpo.main, ["--data_path", files["dpo"], "--sft_path", f"{ckpt}/grpo_final.pth",
                           "--learning_rate", "1e-4", "--beta", "0.1", "--epochs", str(args.dpo_epochs),
                           *held_out("dpo"), *save]),
    }


# ---------------------------------------------------------------------------------------------- evaluation

def unigram_perplexity(train_tokens, eval_tokens, vocab_size):
    """Perplexity of the eval tokens under the training tokens' unigram distribution (add-one smoothed): the
    score of a model that learned word frequencies and nothing else."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[np.asarray(eval_tokens, dtype=np.int64)].mean()))


def heldout_perplexity(model, data, rt, batch_size, chat):
    """Token-weighted perplexity over every held-out window (text) or assistant token (chat)."""
    args = argparse.Namespace(batch_size=batch_size, eval_batches=len(data))
    batches = tu.chat_eval_batches(data, args, rt) if chat else (
        (*pretrain.collate_windows(data, idx), None) for idx in tu.eval_indices(len(data), batch_size, rt, len(data)))
    return tu.evaluate(model, batches, rt)["val_ppl"]


@torch.no_grad()
def answer(model, tokenizer, conversations, max_new_tokens=64, batch_size=32, tools=None, enable_thinking=None):
    """Greedy replies to a list of conversations (special tokens kept in the text). tools: one list of function
    schemas (or None) per conversation; enable_thinking: the chat template's thinking switch."""
    stops, replies = stop_ids(tokenizer, raw=False), []
    tools = tools or [None] * len(conversations)
    for start in range(0, len(conversations), batch_size):
        prompts = [encode_prompt(tokenizer, c, t, enable_thinking)
                   for c, t in zip(conversations[start:start + batch_size], tools[start:start + batch_size])]
        replies += generate_batch(model, tokenizer, prompts, max_new_tokens, stops)
    return replies


@torch.no_grad()
def sampled_answers(model, tokenizer, conversations, samples, seed, max_new_tokens=128, batch_size=16):
    """`samples` replies to each conversation at temperature 1, the temperature GRPO samples and learns at; the
    k-th reply to conversation i draws from a random stream keyed by (seed, i, k)."""
    stops, replies = stop_ids(tokenizer, raw=False), []
    for start in range(0, len(conversations), batch_size):
        prompts = [encode_prompt(tokenizer, c) for c in conversations[start:start + batch_size]]
        keys = [f"scoreboard-{seed}-{i}" for i in range(start, start + len(prompts))]
        replies += sample_batch(model, tokenizer, prompts, max_new_tokens, stops, samples, 1.0, keys)
    return replies


@torch.no_grad()
def tool_dialogues(model, tokenizer, records, toolbox, max_new_tokens=96, max_replies=4, min_room=16):
    """Answer each record's question with its tools offered, executing the calls: generate, run every call of a
    reply with `toolbox` (tools.tool_turns), feed the results back and generate again, in batches, until a reply
    makes no call, a call does not parse (the reply then stands as text, as the server returns it), the
    conversation leaves less than min_room tokens of the context, or max_replies replies were made. Returns (first
    reply, final reply ("" when it never ended), number of calls made) per record."""
    conversations = [prompt_turns(r) for r in records]
    first, final, n_calls = [""] * len(records), [""] * len(records), [0] * len(records)
    active = list(range(len(records)))
    for reply_no in range(max_replies):
        lengths = {i: len(encode_prompt(tokenizer, conversations[i], records[i]["tools"])) for i in active}
        # shortest first, so a batch's longest prompt (which caps its replies' length) is close to the others
        active = sorted((i for i in active if lengths[i] <= model.config.max_seq_len - min_room), key=lengths.get)
        replies = answer(model, tokenizer, [conversations[i] for i in active], max_new_tokens,
                         tools=[records[i]["tools"] for i in active])
        still = []
        for i, reply in zip(active, replies):
            first[i] = reply if reply_no == 0 else first[i]
            content, raw = split_tool_calls(reply)
            calls = [parse_tool_call(text)[0] for text in raw]
            if not calls or None in calls:
                final[i] = reply
                continue
            conversations[i] = conversations[i] + tool_turns(toolbox, content, calls)
            n_calls[i] += len(calls)
            still.append(i)
        active = still
    return first, final, n_calls


@torch.no_grad()
def preference_accuracy(model, data, rt, batch_size):
    """Share of held-out pairs where the model gives the chosen reply a higher log-probability than the rejected."""
    model.eval()
    wins = 0
    for start in range(0, len(data), batch_size):
        indices = range(start, min(start + batch_size, len(data)))
        logps, _ = dpo.pair_logps(model, collate_dpo([data[i] for i in indices], data.pad_id), rt.device)
        wins += int((logps[:, 0] > logps[:, 1]).sum())
    return wins / len(data)


def eval_records(path, limit):
    return [r for _, r in read_jsonl(path, "chat")][:limit]


def tool_scores(model, tokenizer, records):
    """The tool-use columns: of the questions that need tools, the share whose first call parses, names the right
    tool, has the right arguments; of all, the share answered right end to end (score_tool_answer)."""
    first, final, n_calls = tool_dialogues(model, tokenizer, records, demo_toolbox(seed=0))
    row = {"tool_acc": float(np.mean([score_tool_answer(r, f, n) for r, f, n in zip(records, final, n_calls)]))}
    calls = [score_tool_call(r, reply) for r, reply in zip(records, first) if r["calls"]]
    if calls:
        row.update({f"tool_{key}": float(np.mean([c[key] for c in calls]))
                    for key in ("parses", "right_tool", "right_args")})
    return row


def scoreboard(args, files, rt):
    """One row per stage: held-out perplexities and the task metrics each stage targets."""
    tokenizer = load_tokenizer(args.tokenizer_path)
    ckpt = os.path.join(args.out_dir, "checkpoints")
    max_len = read_weights(f"{ckpt}/pretrain_final.pth")[0].max_seq_len
    load = {"pretrain": PretrainDataset, "sft": SFTDataset, "reasoning": SFTDataset, "dpo": DPODataset}
    held = {name: load[name](files[name + "_eval"], args.tokenizer_path, max_len)
            for name in FILES if name + "_eval" in files}
    sft_items = eval_records(files["sft_eval"], args.eval_items) if "sft_eval" in files else []
    reasoning_items = eval_records(files["reasoning_eval"], args.eval_items) if "reasoning_eval" in files else []
    tool_items = eval_records(files["tools_eval"], args.tool_items) if "tools_eval" in files else []
    rows = []
    for k, stage in enumerate(STAGES, 1):
        print(f"evaluating {stage} ({k}/{len(STAGES)}): held-out perplexity, {len(sft_items)} questions, "
              f"{len(reasoning_items)} word problems (thinking on and off), {len(tool_items)} tool-use questions",
              flush=True)
        model, _ = load_model(f"{ckpt}/{stage}_final.pth", rt.device)
        model.eval()
        row = {"stage": stage}
        if "pretrain" in held:
            row["text_ppl"] = heldout_perplexity(model, held["pretrain"], rt, args.batch_size, chat=False)
        if "sft" in held:
            row["chat_ppl"] = heldout_perplexity(model, held["sft"], rt, args.batch_size, chat=True)
        if sft_items and "answer" in sft_items[0]:
            replies = answer(model, tokenizer, [prompt_turns(r) for r in sft_items])
            row["sft_acc"] = float(np.mean([score_sft(r, a) for r, a in zip(sft_items, replies)]))
            row["full_answers"] = float(np.mean([not is_terse(r, a) for r, a in zip(sft_items, replies)]))
        if reasoning_items and "answer" in reasoning_items[0]:
            conversations = [prompt_turns(r) for r in reasoning_items]
            replies = answer(model, tokenizer, conversations, max_new_tokens=128)
            row["think_format"] = float(np.mean([parse_reasoning(a) is not None for a in replies]))
            row["reasoning_acc"] = float(np.mean([score_reasoning(r, a) for r, a in zip(reasoning_items, replies)]))
            sampled = sampled_answers(model, tokenizer, conversations, SAMPLES, args.seed)
            row["sampled_acc"] = float(np.mean([score_reasoning(r, a) for r, texts in zip(reasoning_items, sampled)
                                                for a in texts]))
            replies = answer(model, tokenizer, conversations, max_new_tokens=16, enable_thinking=False)
            row["no_think_acc"] = float(np.mean([score_direct(r, a) for r, a in zip(reasoning_items, replies)]))
        if tool_items and "calls" in tool_items[0]:
            row.update(tool_scores(model, tokenizer, tool_items))
        if "dpo" in held:
            row["pref_acc"] = preference_accuracy(model, held["dpo"], rt, args.batch_size)
        rows.append(row)
    if "pretrain" in held:
        train = PretrainDataset(files["pretrain"], args.tokenizer_path, max_len).arrays()["tokens"]
        eval_tokens = held["pretrain"].arrays()["tokens"]
        rows.insert(0, {"stage": "unigram", "text_ppl": unigram_perplexity(train, eval_tokens, len(tokenizer))})
    return rows


COLUMNS = [("text_ppl", "held-out text ppl", "{:.2f}"), ("chat_ppl", "held-out answer ppl", "{:.2f}"),
           ("sft_acc", "answer acc", "{:.1%}"), ("full_answers", "full answers", "{:.1%}"),
           ("think_format", "<think> format", "{:.1%}"), ("reasoning_acc", "reasoning acc", "{:.1%}"),
           ("sampled_acc", "reasoning acc, sampled", "{:.1%}"),
           ("no_think_acc", "reasoning acc, thinking off", "{:.1%}"), ("pref_acc", "prefers chosen", "{:.1%}"),
           ("tool_parses", "call parses", "{:.1%}"), ("tool_right_tool", "right tool", "{:.1%}"),
           ("tool_right_args", "right arguments", "{:.1%}"), ("tool_acc", "tool answer acc", "{:.1%}")]


def format_scoreboard(rows):
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| stage | " + " | ".join(title for _, title, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [fmt.format(r[key]) if key in r else "" for key, _, fmt in cols]
        lines.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def next_commands(args):
    """What to do with the trained models: chat, serve, export (the commands for this run's folders)."""
    ckpt = os.path.join(args.out_dir, "checkpoints")
    return "\n".join([
        "next:",
        f"  python eval_model.py --save_dir {ckpt} --model_mode 1      # chat with the SFT model (2: distill, 3: DPO, 4: GRPO)",
        f"  python api_server.py --model_path {ckpt}/dpo_final.pth     # OpenAI-compatible server + web chat",
        f"  python export_hf.py --model_path {ckpt}/dpo_final.pth --out_dir {args.out_dir}/hf   # Hugging Face"])


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)
    files = data_files(args)
    timings = {}
    commands = stage_commands(args, files)
    for k, (stage, (run, argv_stage)) in enumerate(commands.items(), 1):
        print(f"\n=== stage {k}/{len(commands) + 1}: {stage} ===", flush=True)
        t0 = time.perf_counter()
        run(argv_stage)
        timings[stage] = time.perf_counter() - t0
    print(f"\n=== stage {len(commands) + 1}/{len(commands) + 1}: evaluation ===", flush=True)
    t0 = time.perf_counter()
    rt = tu.Runtime(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")), "float32")
    rows = scoreboard(args, files, rt)
    timings["evaluation"] = time.perf_counter() - t0
    table = format_scoreboard(rows)
    total = time.perf_counter() - started
    summary = "stage minutes: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items())
    print(f"\n{table}\n\n{summary}; total {total / 60:.1f} min\n\n{next_commands(args)}")
    with open(os.path.join(args.out_dir, "scoreboard.json"), "w") as f:
        json.dump({"rows": rows, "seconds": timings, "total_seconds": total}, f, indent=1)
    with open(os.path.join(args.out_dir, "scoreboard.md"), "w") as f:
        f.write(table + "\n")
    return rows


if __name__ == "__main__":
    run_main(main)
