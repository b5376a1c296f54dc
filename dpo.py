"""Direct preference optimisation: prefer the chosen reply over the rejected one, relative to a frozen reference.

    python dpo.py --data_path dpo.jsonl --sft_path results/sft_final.pth --beta 0.1
    torchrun --nproc_per_node 4 dpo.py ...                      # several GPUs; --resume_from auto continues

loss = −log σ(β·((π_c − π_r) − (ref_c − ref_r))), where π and ref are the policy's and the reference's log-probability
of each reply: summed over the final assistant turn's tokens. The reference is the starting policy unless --ref_path
says otherwise; by default its log-probabilities are computed once before training (--precompute_ref), so only one
model sits in memory. Writes save_dir/dpo_final.pth and save_dir/dpo_curves.png.
"""

import torch
import torch.nn.functional as F

import train_utils as tu
from cli import POSITIVE, ArgumentParser, run_main
from Config import describe
from dataset import DPODataset, collate_dpo

DATA_HELP = """no preference data at {path}.
Put a JSONL file of {{"chosen": [turns], "rejected": [turns]}} records there or pass --data_path. Real data:
  modelscope download --dataset gongjy/minimind_dataset dpo.jsonl --local_dir ./           # MiniMind
Or the built-in demo corpus: python demo_data.py --out_dir data/demo (then --data_path data/demo/dpo.jsonl)"""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data_path", nargs="+", default=["dpo.jsonl"], help="preference JSONL file(s)")
    p.add_argument("--sft_path", default=None, help="the starting policy (default: save_dir/sft_final.pth)")
    p.add_argument("--ref_path", default=None, help="the reference model (default: the starting policy)")
    p.add_argument("--beta", type=POSITIVE, default=0.1, help="strength of the pull toward the reference")
    tu.add_bool_flag(p, "--precompute_ref", default=True,
                     help="compute reference log-probs once up front instead of keeping the reference in memory")
    tu.add_training_args(p, batch_size=8, learning_rate=1e-6, epochs=1, save_step=1000, eval_interval=100)
    return tu.parse_stage_args(p, argv, inputs={"sft_path": "sft_final.pth"})


def reply_logps(logits, targets, loss_mask):
    """Summed log-probability of the masked target tokens of each row: (rows, T, vocab) → (rows,)."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * loss_mask).sum(dim=-1)


def dpo_loss(policy, reference, beta):
    """Per-pair DPO loss and reward statistics from (chosen, rejected) log-probs of shape (pairs, 2)."""
    rewards = beta * (policy - reference)                                  # implicit rewards, (pairs, 2)
    margin = rewards[:, 0] - rewards[:, 1]
    stats = {"reward_acc": (margin > 0).float(), "margin": margin, "chosen_reward": rewards[:, 0],
             "rejected_reward": rewards[:, 1]}
    return -F.logsigmoid(margin), stats


def pair_logps(model, batch, device):
    """(pairs, 2) log-probs of a collate_dpo batch (B chosen rows, then B rejected rows) in one forward pass."""
    out = model(batch["input_ids"].to(device))
    logps = reply_logps(out.logits, batch["targets"].to(device), batch["loss_mask"].to(device))
    return torch.stack(logps.chunk(2), dim=1), out.aux_loss


@torch.no_grad()
def reference_logps(reference, data, args, rt):
    """Reference log-probs of every pair, (pairs, 2): each process scores its share, then all are summed."""
    table = torch.zeros(len(data), 2, dtype=torch.float64, device=rt.device)
    reference.eval()
    for indices in tu.eval_indices(len(data), args.batch_size, rt, max_batches=len(data)):
        with tu.autocast(rt):
            logps, _ = pair_logps(reference, collate_dpo([data[i] for i in indices], data.pad_id), rt.device)
        table[list(indices)] = logps.double()
    if rt.ddp:
        torch.distributed.all_reduce(table)
    return table.float()


@torch.no_grad()
def evaluate_preferences(model, reference, data, ref_table, args, rt):
    """Held-out DPO loss and preference (reward) accuracy, summed over processes."""
    model.eval()
    totals = [0.0, 0.0, 0.0]  # loss, correct, pairs
    for indices in tu.eval_indices(len(data), args.batch_size, rt, args.eval_batches):
        batch = collate_dpo([data[i] for i in indices], data.pad_id)
        with tu.autocast(rt):
            policy, _ = pair_logps(model, batch, rt.device)
            ref = ref_table[list(indices)] if ref_table is not None else pair_logps(reference, batch, rt.device)[0]
        losses, stats = dpo_loss(policy, ref, args.beta)
        totals = [a + b for a, b in zip(totals, [losses.sum().item(), stats["reward_acc"].sum().item(), len(indices)])]
    model.train()
    loss, correct, pairs = tu.all_reduce_sum(rt, totals)
    return {"val_loss": loss / pairs, "val_reward_acc": correct / pairs}


def main(argv=None):
    args = parse_args(argv)
    rt, resume_path, ckpt = tu.begin_run("dpo", args, DATA_HELP, inputs=["sft_path", "ref_path"])
    model = tu.load_start(args, ckpt, rt)
    config = model.config
    args.max_seq_len = config.max_seq_len
    data, eval_data = tu.load_data(DPODataset, args, rt, config.max_seq_len)
    reference = None if ckpt is not None and args.precompute_ref else \
        tu.load_frozen(args.ref_path or args.sft_path, args, rt, max_seq_len=args.max_seq_len)
    if ckpt is not None:
        ref_tables = ckpt["extra"]["ref_tables"]
    elif args.precompute_ref:
        ref_tables = {"train": reference_logps(reference, data, args, rt),
                      "eval": reference_logps(reference, eval_data, args, rt) if eval_data else None}
        reference = None  # free its memory: every reference number is in the tables now
    else:
        ref_tables = {"train": None, "eval": None}
    plan = tu.bucketed_plan(data, args, rt)
    evaluate = (lambda: evaluate_preferences(model, reference, eval_data, ref_tables["eval"], args, rt)
                ) if eval_data else None
    with tu.TrainingRun("dpo", args, rt, model, plan, ckpt, resume_path, evaluate, extra={"ref_tables": ref_tables},
                        data_id=tu.data_identity(data, eval_data)) as run:
        if rt.is_master:
            print(f"policy: {describe(config)} | beta {args.beta} | {len(data):,} pairs | "
                  f"{run.schedule.steps:,} optimizer steps from {run.step}")
        while run.running():
            lr, micro = run.start_step()
            step_pairs = tu.all_reduce_sum(rt, [sum(len(indices) for indices in micro)])[0]
            loss_sum = torch.zeros((), device=rt.device)
            sums = {"tokens": 0.0}
            for i, indices in enumerate(micro):
                batch = collate_dpo([data[j] for j in indices], data.pad_id)
                with run.no_sync(i, len(micro)):
                    with tu.autocast(rt):
                        policy, aux_loss = pair_logps(run.train_model, batch, rt.device)
                        if ref_tables["train"] is not None:
                            ref = ref_tables["train"][list(indices)]
                        else:
                            with torch.no_grad():
                                ref = pair_logps(reference, batch, rt.device)[0]
                        losses, stats = dpo_loss(policy, ref, args.beta)
                        # Sum over this micro-batch's pairs ÷ the step's pairs: the mean over the global batch.
                        loss = losses.sum() / step_pairs * rt.world_size + aux_loss / len(micro)
                    run.scaler.scale(loss).backward()
                loss_sum += loss.detach()
                sums["tokens"] += batch["loss_mask"].sum().item()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v.sum().item()
            mean_loss = run.global_loss(loss_sum)
            grad_norm = run.optimizer_step()
            totals = dict(zip(sums, tu.all_reduce_sum(rt, list(sums.values()))))
            tokens_per_s = totals.pop("tokens") / run.seconds()
            if not run.end_step({"loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                                 **{k: v / step_pairs for k, v in totals.items()}, "tokens_per_s": tokens_per_s}):
                break
        run.finish()


if __name__ == "__main__":
    run_main(main)
