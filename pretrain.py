"""Pretraining: next-token prediction on raw text, packed into windows with no padding.

    python pretrain.py --data_path pretrain.jsonl --preset small --batch_size 32 --learning_rate 5e-4
    python pretrain.py --resume_from auto                  # continue exactly from save_dir/latest_checkpoint.pth
    torchrun --nproc_per_node 4 pretrain.py --data_path pretrain.jsonl   # several GPUs (gloo processes on CPU)

Writes save_dir/latest_checkpoint.pth every --save_step optimizer steps, then save_dir/pretrain_final.pth (+ a
safetensors folder) and save_dir/pretrain_curves.png. No data yet? `python demo_data.py` makes a small corpus.
"""
import argparse
import os
import time

import torch
from transformers import AutoTokenizer

import train_utils as tu
from Config import PRESETS, LLMConfig, describe, get_config
from dataset import PretrainDataset
from model import Transformer

DATA_HELP = """no pretraining data at {path}.
Put a JSONL file of {{"text": "..."}} records there or pass --data_path. Real corpora:
  pip install modelscope
  modelscope download --dataset gongjy/minimind_dataset pretrain_hq.jsonl --local_dir ./     # MiniMind, 1.6 GB
  modelscope download --dataset Harris/pretrainSpongeBob pretrain.jsonl --local_dir ./       # SpongeBob seed
Or try everything in minutes on the built-in demo corpus:
  python demo_data.py --out_dir data/demo && python pretrain.py --data_path data/demo/pretrain.jsonl --preset tiny"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", nargs="+", default=["pretrain.jsonl"], help="pretraining JSONL file(s)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size (see Config.py)")
    p.add_argument("--dim", type=int, default=None, help="override the preset's width")
    p.add_argument("--n_layers", type=int, default=None)
    p.add_argument("--n_heads", type=int, default=None)
    p.add_argument("--n_kv_heads", type=int, default=None)
    tu.add_bool_flag(p, "--use_moe", default=None, help="mixture-of-experts feed-forward layers")
    tu.add_bool_flag(p, "--skip_bad_lines", help="skip (and count) malformed JSONL lines instead of stopping")
    tu.add_training_args(p, batch_size=32, learning_rate=5e-4, epochs=1, save_step=1000)
    return p.parse_args(argv)


def model_config(args, ckpt, vocab_size):
    """The checkpoint's config when resuming; otherwise the preset with the flags that were set."""
    if ckpt is not None:
        return LLMConfig.from_dict(ckpt["config"])
    return get_config(args.preset, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=args.n_kv_heads, use_moe=args.use_moe, max_seq_len=args.max_seq_len,
                      vocab_size=vocab_size)


def eval_batches(data, args, rt):
    """The first --eval_batches global batches of the held-out windows, in a fixed order, split across ranks."""
    limit = min(len(data), args.eval_batches * args.batch_size * rt.world_size)
    for start in range(rt.rank * args.batch_size, limit, args.batch_size * rt.world_size):
        x, y = collate_windows(data, range(start, min(start + args.batch_size, limit)))
        yield x, y, None


def collate_windows(data, indices):
    pairs = [data[int(i)] for i in indices]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def main(argv=None):
    args = parse_args(argv)
    for path in args.data_path:
        if not os.path.isfile(path):
            raise SystemExit(DATA_HELP.format(path=path))
    rt = tu.setup_runtime(args)
    resume_path, ckpt = tu.read_resume_checkpoint(args)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    config = model_config(args, ckpt, len(tokenizer))
    args.max_seq_len = config.max_seq_len
    tu.seed_everything(args.seed)  # the same initial weights on every rank and in every run with this seed
    model = Transformer(config).to(rt.device)
    optimizer = tu.build_optimizer(model, args.learning_rate, args.weight_decay)
    scaler = tu.make_scaler(rt)
    with tu.master_first(rt):
        data = PretrainDataset(args.data_path, args.tokenizer_path, config.max_seq_len, cache_dir=args.cache_dir,
                               num_workers=args.num_workers, skip_bad=args.skip_bad_lines)
        eval_data = PretrainDataset(args.eval_data, args.tokenizer_path, config.max_seq_len,
                                    cache_dir=args.cache_dir) if args.eval_data else None
    plan = tu.BatchPlan(tu.shuffled_batches(len(data), args.batch_size, args.seed, rt), args.epochs)
    schedule = tu.Schedule(args, plan)
    step, micro_step, history = 0, 0, None
    if ckpt is not None:
        tu.load_training_state(ckpt, resume_path, model=model, optimizer=optimizer, scaler=scaler, args=args, rt=rt)
        step, micro_step, history = ckpt["step"], ckpt["micro_step"], ckpt["history"]
    else:
        tu.seed_everything(args.seed + rt.rank)  # dropout masks differ across ranks
    train_model = tu.wrap_model(model, args, rt)
    tokens_per_micro = args.batch_size * config.max_seq_len * rt.world_size
    flops = tu.flops_per_token(config, config.max_seq_len)
    peak = tu.peak_flops(rt.device) if rt.is_master else None
    if rt.is_master:
        print(f"model: {describe(config)} | {len(data):,} windows of {config.max_seq_len} tokens | "
              f"{plan.per_epoch:,} micro-batches per epoch | {schedule.steps:,} optimizer steps from step {step}")
    logger = tu.TrainLogger(args, rt, "pretrain", schedule.steps, step, history)
    batches = plan.micro_batches(micro_step)
    latest = os.path.join(args.save_dir, "latest_checkpoint.pth")
    train_model.train()
    while step < schedule.steps:
        t0 = time.perf_counter()
        lr = schedule.lr(step)
        tu.set_lr(optimizer, lr)
        n_micro = schedule.micro_batches_in_step(micro_step)
        loss_sum = torch.zeros((), device=rt.device)
        for i in range(n_micro):
            _, indices = next(batches)
            x, y = collate_windows(data, indices)
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            with tu.no_sync_unless_last(train_model, rt, i, n_micro):
                with tu.autocast(rt):
                    out = train_model(x, targets=y)
                    loss = (out.loss + out.aux_loss) / n_micro
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        micro_step += n_micro
        mean_loss = tu.global_loss(rt, loss_sum, step, latest)
        grad_norm = tu.optimizer_step(model, optimizer, scaler, args.grad_clip)
        step += 1
        tokens_per_s = n_micro * tokens_per_micro / (time.perf_counter() - t0)
        metrics = {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        if peak:
            metrics["mfu"] = flops * tokens_per_s / peak
        logger.log(step, metrics)
        if eval_data is not None and (step % args.eval_interval == 0 or step == schedule.steps):
            logger.log_eval(step, tu.evaluate(model, eval_batches(eval_data, args, rt), rt))
        if step % args.save_step == 0 or step in (schedule.steps, args.stop_step):
            tu.save_checkpoint(latest, model=model, optimizer=optimizer, scaler=scaler, step=step,
                               micro_step=micro_step, config=config, args=args, rt=rt, history=logger.history)
        if step == args.stop_step:
            break
    curves = logger.close()
    if rt.is_master and step == schedule.steps:
        print(f"saved {tu.save_final(model, config, args.save_dir, 'pretrain', args.tokenizer_path)}; "
              f"curves in {curves}")
    elif rt.is_master:
        print(f"stopped at step {step}/{schedule.steps}; continue with --resume_from {latest}")
    tu.teardown(rt)


if __name__ == "__main__":
    main()
