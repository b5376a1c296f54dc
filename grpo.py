r"""Reinforcement learning with verifiable rewards (GRPO, with DAPO's token-level loss and CISPO as an option): sample
a group of replies to each prompt, score them with reward functions that check the answer, and push the policy
toward the replies that beat their group's average.

    python grpo.py --data_path reasoning.jsonl --sft_path results/distill_final.pth --num_generations 8
    python grpo.py --data_path gsm8k.jsonl --sft_path results/distill_final.pth --beta 0.04 --ppo_epochs 2 \
        --rewards accuracy format=0.2 length --loss_type cispo
    torchrun --nproc_per_node 4 grpo.py ...                     # several GPUs; --resume_from auto continues

Data: reasoning conversations ({"conversations": [...]}) whose final assistant turn is the reference reply; the
model answers the turns before it. Each step (one rollout batch) takes batch_size prompts per micro-batch, samples
G = --num_generations replies to each (batched, with the KV cache), scores them (rewards.py; --rewards picks the
functions and weights) and trains on them for --ppo_epochs optimizer updates.

    advantage    A_i = r_i − mean(r of its group)   (÷ std(r of its group) with --scale_rewards); a group whose
                 rewards are all equal carries no signal: its advantages are exactly 0 (counted as zero_signal)
    ratio        ρ_t = π(o_t | …) / π_old(o_t | …), π_old = the policy that sampled the batch (ρ = 1 in the first
                 update; --ppo_epochs > 1 reuses the batch, so later updates see ρ ≠ 1)
    grpo         ℓ_t = −min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε_high)·A)
    cispo        ℓ_t = −sg(min(ρ_t, 1 + ε_high))·A·log π(o_t | …)   (the clipped ratio weights the gradient; every
                 token keeps its gradient, MiniMax-M1)
    KL           + β·(e^{ref − log π} − (ref − log π) − 1) per token (k3 estimator) against the frozen reference;
                 with β = 0 (the default) no reference is built
    loss         token: Σ ℓ_t over every completion token of the global batch ÷ their count (DAPO: long replies
                 count per token); sequence: the mean over replies of each reply's per-token mean (GRPO's paper)

Log-probabilities are taken at the sampling temperature. With β = 0 a reply whose advantage is 0 has no gradient,
so zero-signal groups are left out of the update's forward and backward passes (still counted in the token mean).
The sampling is exactly reproducible: each reply draws from its own random stream, keyed by (seed, micro-batch
number, prompt, sample), so a resumed run and a run on another number of processes sample the same replies.
Logs: the weighted reward and each reward function's mean, accuracy, KL (β > 0), clip fraction, completion length
and the share of zero-signal groups; --eval_data adds the held-out greedy accuracy and, with --eval_samples K, the
share of right replies among K sampled per held-out problem. Writes save_dir/grpo_final.pth and
save_dir/grpo_curves.png.
"""
import argparse
import hashlib
import random
from typing import NamedTuple

import torch

import train_utils as tu
from checkpoint import tokenizer_fingerprint
from cli import NONNEG, NONNEG_INT, POSITIVE, ArgumentParser, UserError, number, run_main
from Config import describe
from dataset import DataError, load_tokenizer, read_jsonl
from inference import encode_prompt, generate_group, reply_texts, stop_ids
from model import Transformer
from rewards import REWARDS, Completion, format_reward, same_answer

DATA_HELP = """no reasoning data at {path}.
Put a JSONL file of {{"conversations": [..., {{"role": "user", ...}}, {{"role": "assistant", "content":
"<think>…</think><answer>…</answer>"}}]}} records there (the final assistant turn holds the reference answer) or
pass --data_path. Or the built-in demo corpus: python demo_data.py --out_dir data/demo (then --data_path
data/demo/reasoning.jsonl)"""


# ---------------------------------------------------------------------------------------------------------- flags

def reward_spec(text):
    """An argparse type: "name" or "name=weight" of a reward function in rewards.REWARDS."""
    name, _, weight = text.partition("=")
    if name not in REWARDS:
        raise argparse.ArgumentTypeError(f"unknown reward {name!r}; choose from {', '.join(REWARDS)}")
    return name, number(float)(weight) if weight else 1.0


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--data_path", nargs="+", default=["reasoning.jsonl"], help="reasoning conversation JSONL file(s)")
    a("--sft_path", "--pretrained_path", dest="sft_path", default=None,
      help="the starting policy (default: save_dir/distill_final.pth)")
    a("--ref_path", default=None, help="the KL reference (default: the starting policy); loaded only when beta > 0")
    a("--num_generations", type=number(int, low=2), default=8, help="replies sampled per prompt (the group size G)")
    a("--max_new_tokens", type=number(int, low=1), default=128, help="reply length cap, in tokens")
    a("--temperature", type=POSITIVE, default=1.0, help="sampling temperature of the replies")
    a("--rewards", nargs="+", type=reward_spec, default=[("accuracy", 1.0), ("format", 0.5), ("length", 1.0)],
      metavar="NAME[=WEIGHT]", help="reward functions and their weights, summed (rewards.py: " + ", ".join(REWARDS)
      + "; default: accuracy format=0.5 length)")
    tu.add_bool_flag(p, "--scale_rewards", help="divide each group's advantages by its reward std")
    a("--loss_type", choices=["grpo", "cispo"], default="grpo", help="clipped-ratio GRPO or CISPO")
    a("--loss_agg", choices=["token", "sequence"], default="token",
      help="token: mean over all completion tokens of the batch (DAPO); sequence: mean of per-reply means")
    a("--epsilon", type=number(float, 0, 1, high_open=True), default=0.2, help="lower clip of the ratio (1 − ε)")
    a("--epsilon_high", type=NONNEG, default=None,
      help="upper clip of the ratio (1 + ε_high; default: epsilon; CISPO's cap on its weight)")
    a("--ppo_epochs", type=number(int, low=1), default=1, help="optimizer updates per rollout batch")
    a("--beta", type=NONNEG, default=0.0, help="weight of the KL penalty to the reference (0: no reference)")
    a("--eval_samples", type=NONNEG_INT, default=None,
      help="with --eval_data: replies sampled per held-out problem at --temperature for val_sampled_accuracy "
           "(default 4; 0: greedy only)")
    # RL gradients are noisy and Adam moves every weight by about the learning rate each step: on the demo's 1.6M
    # model 3e-5 to 1e-4 raise the sampled accuracy by ~4 points in 150 steps and 2e-4 up lose greedy accuracy;
    # larger models want less.
    tu.add_training_args(p, batch_size=8, learning_rate=1e-4, epochs=1, save_step=100, eval_interval=50,
                         batch_help="prompts per micro-batch on each process (each gets --num_generations replies)")
    args = tu.parse_stage_args(p, argv, inputs={"sft_path": "distill_final.pth"})
    if args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    names = [name for name, _ in args.rewards]
    if len(set(names)) != len(names):
        p.error(f"argument --rewards: a reward is named twice ({' '.join(names)})")
    if args.ref_path is not None and args.beta == 0:
        p.error("--ref_path is the KL reference: it needs --beta > 0")
    if args.eval_samples is not None and not args.eval_data:
        p.error("--eval_samples samples replies to the held-out problems: it needs --eval_data")
    if args.eval_samples is None:
        args.eval_samples = 4
    return args


# ------------------------------------------------------------------------------------------------------ prompts

class Prompt(NamedTuple):
    ids: list          # the conversation up to the reply, rendered with the generation prompt
    reference: str     # the final assistant turn's content


def load_prompts(paths, tokenizer, max_prompt_tokens, skip_bad):
    """Every conversation as a Prompt (in memory: RL prompt sets are small); prompts longer than max_prompt_tokens
    are left out and counted."""
    prompts, too_long = [], 0
    for path in paths:
        for line_no, record in read_jsonl(path, "chat", skip_bad):
            turns = record["conversations"]
            if not isinstance(turns[-1].get("content"), str) or len(turns) < 2:
                raise DataError(f"{path}:{line_no}: the final assistant turn must be the reference reply (text) "
                                f"after at least one turn to answer")
            ids = encode_prompt(tokenizer, turns[:-1], tools=record.get("tools"))
            if len(ids) > max_prompt_tokens:
                too_long += 1
                continue
            prompts.append(Prompt(ids, turns[-1]["content"]))
    if not prompts:
        raise DataError(f"{' '.join(paths)}: no prompt fits in {max_prompt_tokens} tokens (max_seq_len minus "
                        f"--max_new_tokens); lower --max_new_tokens")
    return prompts, too_long


def data_identity(paths, tokenizer_path):
    """The prompts by content (file bytes and tokenizer): a resumed run must find the same ones."""
    digest = hashlib.sha256(tokenizer_fingerprint(tokenizer_path).encode())
    for path in paths or []:
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16] if paths else None


# ----------------------------------------------------------------------------------------------------- rollouts

class Rollout(NamedTuple):
    input_ids: torch.Tensor       # (rows, P + C): left-padded prompt, then the reply, right-padded
    attention_mask: torch.Tensor  # (rows, P + C): 1 on prompt and reply tokens
    reply_mask: torch.Tensor      # (rows, C): 1 on reply tokens (the stop token included)
    prompt_len: int               # P


def pack(prompts, replies, pad_id, device):
    """A Rollout of each reply after its left-padded prompt (one prompt per reply)."""
    P, C = max(len(p) for p in prompts), max(len(r) for r in replies)
    rows = len(replies)
    input_ids = torch.full((rows, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(rows, P + C, dtype=torch.long)
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        input_ids[i, P - len(prompt):P + len(reply)] = torch.tensor(prompt + reply)
        attention_mask[i, P - len(prompt):P + len(reply)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return Rollout(input_ids, attention_mask, attention_mask[:, P:].float(), P)


def reply_logps(model, rollout, temperature):
    """log π(o_t | prompt, o_<t) of every reply token at the sampling temperature, (rows, C); 0 past a reply."""
    x, mask = rollout.input_ids[:, :-1], rollout.attention_mask[:, :-1]
    logits = model(x, attention_mask=mask).logits[:, rollout.prompt_len - 1:].float() / temperature  # (rows, C, V)
    targets = rollout.input_ids[:, rollout.prompt_len:]
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(dim=-1)
    return logp * rollout.reply_mask


# ------------------------------------------------------------------------------------------------------- the loss

def group_advantages(rewards, group, scale):
    """r − mean(group) (÷ std(group) if scale), per reply; exactly 0 where a group's rewards are all equal. Also
    returns which groups those are."""
    r = rewards.view(-1, group)                                                 # (prompts, G)
    flat = r.max(dim=1).values == r.min(dim=1).values
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / r.std(dim=1, keepdim=True).clamp(min=1e-6)
    return advantages.masked_fill(flat[:, None], 0.0).flatten(), flat


def token_losses(logp, old_logp, advantages, loss_type, epsilon, epsilon_high, ref_logp=None, beta=0.0):
    """Per-token loss ℓ_t (rows, C), and per token whether the ratio was clipped and the KL (None without β)."""
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    if loss_type == "grpo":
        clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
        loss = -torch.min(ratio * adv, clipped * adv)
        was_clipped = ((adv > 0) & (ratio > 1 + epsilon_high)) | ((adv < 0) & (ratio < 1 - epsilon))
    else:
        loss = -ratio.clamp(max=1 + epsilon_high).detach() * adv * logp
        was_clipped = ratio > 1 + epsilon_high
    kl = None
    if beta > 0:
        log_ref_ratio = ref_logp - logp
        kl = log_ref_ratio.exp() - log_ref_ratio - 1
        loss = loss + beta * kl
    return loss, was_clipped, kl


def aggregate(loss, reply_mask, how, total_tokens, total_replies):
    """This micro-batch's share of the batch loss: token-level over total_tokens, or per-reply means over
    total_replies (the totals are the whole global batch's, so the shares add up to the batch mean)."""
    if how == "token":
        return (loss * reply_mask).sum() / total_tokens
    return ((loss * reply_mask).sum(dim=1) / reply_mask.sum(dim=1)).sum() / total_replies


# ---------------------------------------------------------------------------------------------------- the stage

class Batch(NamedTuple):
    rollout: Rollout
    advantages: torch.Tensor       # (rows,)
    old_logp: torch.Tensor | None  # (rows, C), None when the batch is used once (then π_old = π, ρ = 1)
    ref_logp: torch.Tensor | None  # (rows, C), None without β


def sample_replies(ctx, prompts, group, streams):
    """(replies as id lists, their texts without the stop token): `group` per prompt, greedy without streams."""
    with tu.autocast(ctx.rt), tu.full_weights(ctx.model):  # under --fsdp each process stops when its rows do
        replies = generate_group(ctx.model, [p.ids for p in prompts], group, ctx.args.max_new_tokens, ctx.stops,
                           ctx.args.temperature, streams, ctx.dtype)
    return replies, reply_texts(ctx.tokenizer, replies, ctx.stops)


def score(prompts, replies, texts, args):
    """{reward name: (rows,) raw values}, accuracy always among them; rows are `group` replies per prompt."""
    G = len(replies) // len(prompts)
    completions = [Completion(text, prompts[i // G].reference, len(reply), args.max_new_tokens)
                   for i, (reply, text) in enumerate(zip(replies, texts))]
    names = ["accuracy"] + [name for name, _ in args.rewards if name != "accuracy"]
    return {name: torch.tensor([REWARDS[name](c) for c in completions]) for name in names}


def make_batch(ctx, items, micro_step, sums):
    """Sample, score and pack the replies to one micro-batch of prompts (dataset indices `items`); add its
    statistics to sums."""
    args, G, device = ctx.args, ctx.args.num_generations, ctx.rt.device
    prompts = [ctx.data[i] for i in items]
    streams = [random.Random(f"grpo-{args.seed}-{micro_step}-{i}-{g}") for i in items for g in range(G)]
    ctx.model.eval()
    replies, texts = sample_replies(ctx, prompts, G, streams)
    values = score(prompts, replies, texts, args)
    rewards = sum(weight * values[name] for name, weight in args.rewards)
    advantages, flat = group_advantages(rewards, G, args.scale_rewards)
    for name, v in [("reward", rewards), *values.items(), ("zero_signal", flat)]:
        sums[name] = sums.get(name, 0.0) + v.sum().item()
    sums["tokens"] = sums.get("tokens", 0.0) + sum(len(r) for r in replies)
    rows = trained_rows(advantages, args.beta)
    rollout = pack([prompts[i // G].ids for i in rows], [replies[i] for i in rows], ctx.pad_id, device)
    with torch.no_grad(), tu.autocast(ctx.rt):
        old = reply_logps(ctx.model, rollout, args.temperature) if args.ppo_epochs > 1 else None
        ref = reply_logps(ctx.reference, rollout, args.temperature) if ctx.reference is not None else None
    ctx.model.train()
    return Batch(rollout, advantages[rows].to(device), old, ref)


def trained_rows(advantages, beta):
    """The replies the update needs. Without the KL term a reply whose advantage is 0 (every reply of a
    zero-signal group) has loss and gradient exactly 0, so it is left out of the forward and backward passes; it
    still counts in the token-level mean's denominator. One row stays when none is left, so that every process
    runs a backward pass (DDP's gradient all-reduce waits for all of them)."""
    if beta > 0:
        return list(range(len(advantages)))
    return advantages.nonzero().flatten().tolist() or [0]


def add_update_stats(sums, reply_mask, clipped, kl, updates):
    """Add one micro-batch's clipped tokens and KL (per update, averaged over the updates) to sums."""
    sums["clip_frac"] = sums.get("clip_frac", 0.0) + (clipped * reply_mask).sum().item() / updates
    if kl is not None:
        sums["kl"] = sums.get("kl", 0.0) + (kl.detach() * reply_mask).sum().item() / updates


def step_metrics(totals_by_name, args, groups):
    """The logged metrics from the global sums: rewards and accuracy per reply, clip fraction and KL per token."""
    t = totals_by_name
    replies, tokens = groups * args.num_generations, t["tokens"]
    metrics = {"reward": t["reward"] / replies, "accuracy": t["accuracy"] / replies,
               **{f"reward_{n}": t[n] / replies for n, _ in args.rewards if n != "accuracy"},
               "clip_frac": t["clip_frac"] / tokens}
    if "kl" in t:
        metrics["kl"] = t["kl"] / tokens
    metrics.update(completion_len=tokens / replies, zero_signal=t["zero_signal"] / groups)
    return metrics


@torch.no_grad()
def evaluate_accuracy(ctx, eval_data):
    """Held-out greedy replies: the share with the right answer and the share in the <think>/<answer> format; with
    --eval_samples K, also the share of right replies among K sampled per problem at --temperature (what RL
    raises first), each from its own stream keyed by (seed, problem, sample) so every evaluation draws alike."""
    model, args, K = ctx.model, ctx.args, ctx.args.eval_samples
    model.eval()
    correct = formatted = sampled = n = 0.0
    for indices in tu.eval_indices(len(eval_data), args.batch_size, ctx.rt, args.eval_batches):
        prompts = [eval_data[i] for i in indices]
        _, texts = sample_replies(ctx, prompts, 1, streams=None)
        for prompt, text in zip(prompts, texts):
            correct += same_answer(text, prompt.reference)
            formatted += format_reward(Completion(text, prompt.reference, 0, args.max_new_tokens))
        if K:
            streams = [random.Random(f"grpo-eval-{args.seed}-{i}-{k}") for i in indices for k in range(K)]
            _, texts = sample_replies(ctx, prompts, K, streams)
            sampled += sum(same_answer(text, prompts[j // K].reference) for j, text in enumerate(texts)) / K
        n += len(prompts)
    model.train()
    correct, formatted, sampled, n = tu.all_reduce_sum(ctx.rt, [correct, formatted, sampled, n])
    metrics = {"val_accuracy": correct / n, "val_format": formatted / n}
    if K:
        metrics["val_sampled_accuracy"] = sampled / n
    return metrics


class Context(NamedTuple):
    """What rollouts and evaluation read: the plain policy, the reference, the tokenizer and the data."""
    model: Transformer
    reference: Transformer | None
    tokenizer: object
    data: list
    args: argparse.Namespace
    rt: tu.Runtime
    stops: list
    pad_id: int
    dtype: torch.dtype


def build_context(args, rt, ckpt):
    model = tu.load_start(args, ckpt, rt)
    args.max_seq_len = model.config.max_seq_len
    if args.max_new_tokens >= args.max_seq_len:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in max_seq_len "
                        f"{args.max_seq_len}")
    tokenizer = load_tokenizer(args.tokenizer_path)
    room = args.max_seq_len - args.max_new_tokens
    data, too_long = load_prompts(args.data_path, tokenizer, room, args.skip_bad_lines)
    eval_data = load_prompts(args.eval_data, tokenizer, room, args.skip_bad_lines)[0] if args.eval_data else None
    if too_long and rt.is_master:
        print(f"left out {too_long} prompt(s) longer than {room} tokens (max_seq_len − --max_new_tokens)")
    reference = tu.load_frozen(args.ref_path or args.sft_path, args, rt, max_seq_len=args.max_seq_len) \
        if args.beta > 0 else None
    # Decoding writes the KV cache in the autocast dtype (the dtype attention computes in).
    dtype = getattr(torch, rt.dtype) if rt.dtype != "float32" else next(model.parameters()).dtype
    ctx = Context(model, reference, tokenizer, data, args, rt, stop_ids(tokenizer, raw=False),
                  tokenizer.pad_token_id, dtype)
    return ctx, eval_data


def main(argv=None):
    args = parse_args(argv)
    rt, resume_path, ckpt = tu.begin_run("grpo", args, DATA_HELP, inputs=["sft_path", "ref_path"])
    ctx, eval_data = build_context(args, rt, ckpt)
    plan = tu.BatchPlan(tu.shuffled_batches(len(ctx.data), args.batch_size, args.seed, rt), args.epochs)
    evaluate = (lambda: evaluate_accuracy(ctx, eval_data)) if eval_data else None
    data_id = {"train": data_identity(args.data_path, args.tokenizer_path),
               "eval": data_identity(args.eval_data, args.tokenizer_path)}
    with tu.TrainingRun("grpo", args, rt, ctx.model, plan, ckpt, resume_path, evaluate, data_id=data_id) as run:
        if rt.is_master:
            rewards = " ".join(f"{n}={w:g}" for n, w in args.rewards)
            print(f"policy: {describe(ctx.model.config)} | {len(ctx.data):,} prompts × {args.num_generations} "
                  f"replies | rewards {rewards} | {args.loss_type}, {args.loss_agg}-level, beta {args.beta} | "
                  f"{run.schedule.steps:,} steps from {run.step}")
        while run.running():
            lr, micro = run.start_step()
            first, sums = run.micro_step - len(micro), {}
            batches = [make_batch(ctx, items, first + k, sums) for k, items in enumerate(micro)]
            groups, tokens = tu.all_reduce_sum(rt, [sum(len(items) for items in micro), sums["tokens"]])
            losses = []
            for _ in range(args.ppo_epochs):  # each pass over the rollout batch is one optimizer update
                loss_sum = torch.zeros((), device=rt.device)
                for i, b in enumerate(batches):
                    with run.no_sync(i, len(batches)):
                        with tu.autocast(rt):
                            logp = reply_logps(run.train_model, b.rollout, args.temperature)
                            old = b.old_logp if b.old_logp is not None else logp.detach()
                            loss, clipped, kl = token_losses(logp, old, b.advantages, args.loss_type, args.epsilon,
                                                             args.epsilon_high, b.ref_logp, args.beta)
                            # This micro-batch's share of the mean over the global batch (every process's replies).
                            loss = aggregate(loss, b.rollout.reply_mask, args.loss_agg, tokens,
                                             groups * args.num_generations) * rt.world_size
                        run.scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                    add_update_stats(sums, b.rollout.reply_mask, clipped, kl, args.ppo_epochs)
                losses.append(run.global_loss(loss_sum))
                grad_norm = run.optimizer_step()
            totals = dict(zip(sums, tu.all_reduce_sum(rt, list(sums.values()))))
            if not run.end_step({"loss": sum(losses) / len(losses), "lr": lr, "grad_norm": grad_norm,
                                 **step_metrics(totals, args, groups), "tokens_per_s": tokens / run.seconds()}):
                break
        run.finish()


if __name__ == "__main__":
    run_main(main)
