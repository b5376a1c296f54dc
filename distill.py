r"""Distillation, both meanings: reasoning distillation (SFT on <think>…</think><answer>…</answer> replies with the
tag tokens up-weighted) and teacher→student distillation (match a larger model's output distribution).

    python distill.py --data_path r1_1024.jsonl --sft_path results/sft_final.pth --special_token_weight 5.0
    python distill.py --data_path sft_512.jsonl --sft_path results/sft_final.pth \
        --teacher_path big/sft_final.pth --alpha 0.5 --temperature 2.0
    torchrun --nproc_per_node 4 distill.py ...                  # several GPUs; --resume_from auto continues

Reasoning: the loss weights each assistant target token by 1, or by --special_token_weight where the target is one
of <think> </think> <answer> </answer> (single tokens), and normalises by the summed weight.
Teacher→student: loss = (1 − α)·CE + α·T²·KL(teacher ‖ student) over the same assistant tokens; the teacher is
frozen and must share the tokenizer. Writes save_dir/distill_final.pth and save_dir/distill_curves.png.
"""

import torch
import torch.nn.functional as F

import train_utils as tu
from cli import NONNEG, POSITIVE, ArgumentParser, UserError, number, run_main
from Config import describe
from dataset import SFTDataset, collate_sft
from model import weighted_cross_entropy
from train_tokenizer import REASONING_TAGS, SPECIAL_TOKENS

TAG_IDS = torch.tensor([SPECIAL_TOKENS.index(t) for t in REASONING_TAGS])

DATA_HELP = """no distillation data at {path}.
Reasoning data is conversations whose assistant turns read <think>…</think><answer>…</answer>:
  modelscope download --dataset Harris/pretrainSpongeBob r1_1024.jsonl --local_dir ./      # SpongeBob seed
  modelscope download --dataset gongjy/minimind_dataset r1_mix_1024.jsonl --local_dir ./   # MiniMind
Or the built-in demo corpus: python demo_data.py --out_dir data/demo (then --data_path data/demo/reasoning.jsonl)"""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data_path", nargs="+", default=["r1_1024.jsonl"], help="conversation JSONL file(s)")
    p.add_argument("--sft_path", default=None, help="the student's starting weights (default: save_dir/sft_final.pth)")
    p.add_argument("--special_token_weight", type=NONNEG, default=5.0,
                   help="loss weight of <think> </think> <answer> </answer> where they are assistant targets")
    p.add_argument("--teacher_path", default=None, help="a larger trained model to distil from (same tokenizer)")
    p.add_argument("--alpha", type=number(float, 0, 1), default=0.5,
                   help="share of the KL term in the teacher→student loss")
    p.add_argument("--temperature", type=POSITIVE, default=2.0, help="softening of both distributions in the KL term")
    tu.add_training_args(p, batch_size=16, learning_rate=1e-6, epochs=1, save_step=1000, eval_interval=100)
    args = tu.parse_stage_args(p, argv, inputs={"sft_path": "sft_final.pth"})
    if args.teacher_path is None and {"alpha", "temperature"} & args.given_flags:
        p.error("--alpha and --temperature shape the teacher's KL term: they need --teacher_path")
    return args


def target_weights(targets, loss_mask, tag_weight):
    """loss_mask × tag_weight where the target is a reasoning tag, loss_mask × 1 elsewhere: prompt tokens keep
    weight 0 even when they are tags, and no ordinary sub-word can be a tag (tags are single special ids)."""
    is_tag = torch.isin(targets, TAG_IDS.to(targets.device))
    return loss_mask * torch.where(is_tag, tag_weight, 1.0)


def kl_to_teacher(student_logits, teacher_logits, weights, temperature):
    """T²·KL(teacher ‖ student) at temperature T, averaged over target positions with these weights."""
    keep = weights > 0
    s = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)  # (N, vocab)
    t = F.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(dim=-1)                                   # (N,)
    w = weights[keep]
    return temperature ** 2 * (kl * w).sum() / w.sum().clamp(min=1e-8)


def load_teacher(args, student_config, rt):
    teacher = tu.load_frozen(args.teacher_path, args, rt)
    if teacher.config.vocab_size != student_config.vocab_size:
        raise UserError(f"teacher vocab_size {teacher.config.vocab_size} != student vocab_size "
                         f"{student_config.vocab_size}: teacher and student must share the tokenizer")
    return teacher


def main(argv=None):
    args = parse_args(argv)
    rt, resume_path, ckpt = tu.begin_run("distill", args, DATA_HELP, inputs=["sft_path", "teacher_path"])
    model = tu.load_start(args, ckpt, rt)
    config = model.config
    args.max_seq_len = config.max_seq_len
    teacher = load_teacher(args, config, rt) if args.teacher_path else None
    data, eval_data = tu.load_data(SFTDataset, args, rt, config.max_seq_len)
    plan = tu.bucketed_plan(data, args, rt)
    evaluate = (lambda: tu.evaluate(model, tu.chat_eval_batches(eval_data, args, rt), rt)) if eval_data else None
    with tu.TrainingRun("distill", args, rt, model, plan, ckpt, resume_path, evaluate,
                        data_id=tu.data_identity(data, eval_data)) as run:
        if rt.is_master:
            mode = f"teacher {describe(teacher.config)}" if teacher else f"tag weight {args.special_token_weight}"
            print(f"student: {describe(config)} | {mode} | {len(data):,} conversations | "
                  f"{run.schedule.steps:,} optimizer steps from {run.step}")
        while run.running():
            lr, micro = run.start_step()
            micro = [collate_sft([data[i] for i in indices], data.pad_id) for indices in micro]
            for batch in micro:
                batch["weights"] = target_weights(batch["targets"], batch["loss_mask"], args.special_token_weight)
            step_weight, step_tokens = tu.all_reduce_sum(rt, [sum(float(b["weights"].sum()) for b in micro),
                                                              sum(float(b["loss_mask"].sum()) for b in micro)])
            loss_sum = torch.zeros((), device=rt.device)
            for i, batch in enumerate(micro):
                x, y, w = (batch[k].to(rt.device) for k in ("input_ids", "targets", "weights"))
                with run.no_sync(i, len(micro)):
                    with tu.autocast(rt):
                        out = run.train_model(x)
                        loss = weighted_cross_entropy(out.logits, y, w)
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_logits = teacher(x).logits
                            kl = kl_to_teacher(out.logits, teacher_logits, w, args.temperature)
                            loss = (1 - args.alpha) * loss + args.alpha * kl
                        # A weighted mean over this micro-batch, re-weighted to its share of the step (see SFT.py).
                        loss = loss * (w.sum() / step_weight * rt.world_size) + out.aux_loss / len(micro)
                    run.scaler.scale(loss).backward()
                loss_sum += loss.detach()
            mean_loss = run.global_loss(loss_sum)
            grad_norm = run.optimizer_step()
            if not run.end_step({"loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                                 "tokens_per_s": step_tokens / run.seconds()}):
                break
        run.finish()


if __name__ == "__main__":
    run_main(main)
