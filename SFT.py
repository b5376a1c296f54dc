r"""Supervised fine-tuning on conversations: the loss covers only the assistant replies (and their <|im_end|>).

    python SFT.py --data_path sft_512.jsonl --pretrained_path results/pretrain_final.pth
    python SFT.py --data_path sft_1024.jsonl --pretrained_path results/sft_final.pth --max_seq_len 1024 \
        --rope_scaling yarn                                      # long context: continue a 512 model at 1024
    python SFT.py --data_path sft_512.jsonl --lora_rank 8        # LoRA: base frozen, adapters in lora_sft.pth
    torchrun --nproc_per_node 4 SFT.py ...                        # several GPUs; --resume_from auto continues

Model shape comes from the checkpoint. Writes save_dir/sft_final.pth (merged with the adapters when LoRA is on),
save_dir/latest_checkpoint.pth for exact resume, and save_dir/sft_curves.png.
"""
import dataclasses
import os

import torch

import train_utils as tu
from checkpoint import build_model, check_tokenizer, read_weights
from cli import NONNEG_INT, POSITIVE, ArgumentParser, UserError, number, run_main
from Config import LLMConfig, describe
from dataset import SFTDataset, collate_sft
from lora import TARGETS, apply_lora, lora_summary, merge_lora, save_lora
from model import Transformer

DATA_HELP = """no SFT data at {path}.
Put a JSONL file of {{"conversations": [{{"role": "user", "content": ...}}, {{"role": "assistant", ...}}]}} records
there or pass --data_path. Real data:
  modelscope download --dataset gongjy/minimind_dataset sft_mini_512.jsonl --local_dir ./    # MiniMind
  modelscope download --dataset Harris/pretrainSpongeBob sft_512.jsonl --local_dir ./        # SpongeBob seed
Or the built-in demo corpus: python demo_data.py --out_dir data/demo (then --data_path data/demo/sft.jsonl)"""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data_path", nargs="+", default=["sft_512.jsonl"], help="conversation JSONL file(s)")
    p.add_argument("--pretrained_path", default=None, help="start from these weights "
                   "(default: save_dir/pretrain_final.pth)")
    p.add_argument("--rope_scaling", choices=["none", "linear", "ntk", "yarn"], default="none",
                   help="how RoPE stretches when --max_seq_len exceeds the checkpoint's context")
    p.add_argument("--lora_rank", type=NONNEG_INT, default=0,
                   help="train rank-R adapters instead of all weights (0: off)")
    p.add_argument("--lora_alpha", type=POSITIVE, default=16.0, help="adapter scale is lora_alpha / lora_rank")
    p.add_argument("--lora_targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                   help="projections that get adapters")
    p.add_argument("--lora_dropout", type=number(float, 0, 1, high_open=True), default=0.0,
                   help="dropout on the adapters' input")
    tu.add_training_args(p, batch_size=32, learning_rate=1e-4, epochs=1, save_step=1000, eval_interval=100)
    return tu.parse_stage_args(p, argv, inputs={"pretrained_path": "pretrain_final.pth"})


def with_context(config, args):
    """The config at --max_seq_len; a longer context stretches RoPE as --rope_scaling says (and records it)."""
    longer = args.max_seq_len is not None and args.max_seq_len > config.max_seq_len
    if args.rope_scaling != "none" and not longer:
        raise UserError(f"--rope_scaling {args.rope_scaling} stretches RoPE to a longer context: give a --max_seq_len "
                        f"above the checkpoint's {config.max_seq_len}")
    if args.max_seq_len is None or args.max_seq_len == config.max_seq_len:
        return config
    scaling = config.rope_scaling
    if args.rope_scaling != "none":
        original = (config.rope_scaling or {}).get("original_max_position_embeddings", config.max_seq_len)
        scaling = {"type": args.rope_scaling, "factor": args.max_seq_len / original,
                   "original_max_position_embeddings": original}
    return dataclasses.replace(config, max_seq_len=args.max_seq_len, rope_scaling=scaling)


def sft_model(args, ckpt, rt):
    """Resuming: the checkpoint's model (with its adapters). Otherwise: --pretrained_path at the asked context,
    with fresh adapters when --lora_rank is set. Returns (model, config, lora settings or None)."""
    if ckpt is not None:
        model, lora = Transformer(LLMConfig.from_dict(ckpt["config"])), ckpt["extra"]["lora"]
        if lora:
            apply_lora(model, **lora)
        return model.to(rt.device), model.config, lora
    config, state, meta = read_weights(args.pretrained_path)
    check_tokenizer(meta, args.tokenizer_path, args.pretrained_path)
    model = build_model(with_context(config, args), state, args.pretrained_path, rt.device)
    lora = None
    if args.lora_rank:
        lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets,
                "dropout": args.lora_dropout}
        apply_lora(model, **lora)
    return model, model.config, lora


def main(argv=None):
    args = parse_args(argv)
    rt, resume_path, ckpt = tu.begin_run("sft", args, DATA_HELP, inputs=["pretrained_path"])
    model, config, lora = sft_model(args, ckpt, rt)
    args.max_seq_len = config.max_seq_len
    data, eval_data = tu.load_data(SFTDataset, args, rt, config.max_seq_len)
    plan = tu.bucketed_plan(data, args, rt)
    evaluate = (lambda: tu.evaluate(model, tu.chat_eval_batches(eval_data, args, rt), rt)) if eval_data else None
    with tu.TrainingRun("sft", args, rt, model, plan, ckpt, resume_path, evaluate, extra={"lora": lora},
                        data_id=tu.data_identity(data, eval_data)) as run:
        if rt.is_master:
            print(f"model: {describe(config)} | {lora_summary(model) if lora else 'all weights trained'} | "
                  f"context {config.max_seq_len} | {len(data):,} conversations | "
                  f"{run.schedule.steps:,} optimizer steps from {run.step}")
        while run.running():
            lr, micro = run.start_step()
            micro = [collate_sft([data[i] for i in indices], data.pad_id) for indices in micro]
            step_tokens = tu.all_reduce_sum(rt, [sum(float(b["loss_mask"].sum()) for b in micro)])[0]
            loss_sum = torch.zeros((), device=rt.device)
            for i, batch in enumerate(micro):
                x, y, mask = (batch[k].to(rt.device) for k in ("input_ids", "targets", "loss_mask"))
                with run.no_sync(i, len(micro)):
                    with tu.autocast(rt):
                        out = run.train_model(x, targets=y, loss_mask=mask)
                        # out.loss averages this micro-batch's assistant tokens. Weighting it by the micro-batch's share
                        # of the step's tokens makes the step's gradient the mean over every assistant token of the
                        # global batch, whatever the padding (× world_size: DDP averages gradients over processes).
                        loss = out.loss * (mask.sum() / step_tokens * rt.world_size) + out.aux_loss / len(micro)
                    run.scaler.scale(loss).backward()
                loss_sum += loss.detach()
            mean_loss = run.global_loss(loss_sum)
            grad_norm = run.optimizer_step()
            if not run.end_step({"loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                                 "tokens_per_s": step_tokens / run.seconds()}):
                break
        model = run.trained_model()  # under --fsdp: gathered into one plain model on rank 0
        if lora and rt.is_master and not run.running():
            adapters = save_lora(model, os.path.join(args.save_dir, "lora_sft.pth"), {"base": args.pretrained_path})
            print(f"saved adapters {adapters}")
            model = merge_lora(model)
        run.finish(model)


if __name__ == "__main__":
    run_main(main)
