"""Pretraining: next-token prediction on raw text, packed into windows with no padding.

    python pretrain.py --data_path pretrain.jsonl --preset small --batch_size 32 --learning_rate 5e-4
    python pretrain.py --resume_from auto                  # continue exactly from save_dir/latest_checkpoint.pth
    torchrun --nproc_per_node 4 pretrain.py --data_path pretrain.jsonl   # several GPUs (gloo processes on CPU)

Writes save_dir/latest_checkpoint.pth every --save_step optimizer steps, then save_dir/pretrain_final.pth (+ a
safetensors folder) and save_dir/pretrain_curves.png. No data yet? `python demo_data.py` makes a small corpus.
"""

import torch

import train_utils as tu
from cli import POSITIVE_INT, ArgumentParser, run_main
from Config import PRESETS, LLMConfig, describe, get_config
from dataset import PretrainDataset, load_tokenizer
from model import Transformer

DATA_HELP = """no pretraining data at {path}.
Put a JSONL file of {{"text": "..."}} records there or pass --data_path. Real corpora:
  pip install modelscope
  modelscope download --dataset gongjy/minimind_dataset pretrain_hq.jsonl --local_dir ./     # MiniMind, 1.6 GB
  modelscope download --dataset Harris/pretrainSpongeBob pretrain.jsonl --local_dir ./       # SpongeBob seed
Or try everything in minutes on the built-in demo corpus:
  python demo_data.py --out_dir data/demo && python pretrain.py --data_path data/demo/pretrain.jsonl --preset tiny"""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data_path", nargs="+", default=["pretrain.jsonl"], help="pretraining JSONL file(s)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size (see Config.py)")
    p.add_argument("--dim", type=POSITIVE_INT, default=None, help="override the preset's width")
    p.add_argument("--n_layers", type=POSITIVE_INT, default=None, help="override the preset's depth")
    p.add_argument("--n_heads", type=POSITIVE_INT, default=None, help="override the preset's attention heads")
    p.add_argument("--n_kv_heads", type=POSITIVE_INT, default=None, help="override the preset's key/value heads")
    tu.add_bool_flag(p, "--use_moe", default=None, help="mixture-of-experts feed-forward layers")
    tu.add_training_args(p, batch_size=32, learning_rate=5e-4, epochs=1, save_step=1000)
    return tu.parse_stage_args(p, argv)


def model_config(args, ckpt, vocab_size):
    """The checkpoint's config when resuming; otherwise the preset with the flags that were set."""
    if ckpt is not None:
        return LLMConfig.from_dict(ckpt["config"])
    return get_config(args.preset, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=args.n_kv_heads, use_moe=args.use_moe, max_seq_len=args.max_seq_len,
                      vocab_size=vocab_size)


def cpu_estimate(config, args, flops, peak, schedule, plan):
    """How long this run will take on this CPU (at the ~60% MFU the training loop reaches here), with a quicker
    first try when an epoch takes more than ten minutes; None for runs of a minute or less."""
    step = flops * args.batch_size * args.accumulation_steps * config.max_seq_len / (0.6 * peak)
    epoch = step * plan.per_epoch / args.accumulation_steps
    if step * schedule.steps <= 60:
        return None
    line = (f"on CPU: about {step:.1f} s per optimizer step, {tu.format_seconds(epoch)} per epoch, "
            f"{tu.format_seconds(step * schedule.steps)} in all (estimated from this CPU's matmul rate)")
    if args.preset != "tiny" and epoch > 600:
        line += "; for a first try in minutes use --preset tiny"
    return line


def eval_batches(data, args, rt):
    for indices in tu.eval_indices(len(data), args.batch_size, rt, args.eval_batches):
        yield *collate_windows(data, indices), None


def collate_windows(data, indices):
    pairs = [data[int(i)] for i in indices]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def main(argv=None):
    args = parse_args(argv)
    rt, resume_path, ckpt = tu.begin_run("pretrain", args, DATA_HELP)
    tokenizer = load_tokenizer(args.tokenizer_path)
    config = model_config(args, ckpt, len(tokenizer))
    args.max_seq_len = config.max_seq_len
    tu.seed_everything(args.seed)  # the same initial weights on every rank and in every run with this seed
    model = Transformer(config).to(rt.device)
    data, eval_data = tu.load_data(PretrainDataset, args, rt, config.max_seq_len)
    plan = tu.BatchPlan(tu.shuffled_batches(len(data), args.batch_size, args.seed, rt), args.epochs)
    evaluate = (lambda: tu.evaluate(model, eval_batches(eval_data, args, rt), rt)) if eval_data else None
    tokens_per_micro = args.batch_size * config.max_seq_len * rt.world_size
    flops = tu.flops_per_token(config, config.max_seq_len)
    peak = tu.peak_flops(rt.device) if rt.is_master else None
    with tu.TrainingRun("pretrain", args, rt, model, plan, ckpt, resume_path, evaluate,
                        data_id=tu.data_identity(data, eval_data)) as run:
        if rt.is_master:
            print(f"model: {describe(config)} | {len(data):,} windows of {config.max_seq_len} tokens | "
                  f"{plan.per_epoch:,} micro-batches per epoch | {run.schedule.steps:,} optimizer steps "
                  f"from {run.step}")
            estimate = cpu_estimate(config, args, flops, peak, run.schedule, plan) if rt.device.type == "cpu" else None
            if estimate:
                print(estimate)
        while run.running():
            lr, micro = run.start_step()
            loss_sum = torch.zeros((), device=rt.device)
            for i, indices in enumerate(micro):
                x, y = collate_windows(data, indices)
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                with run.no_sync(i, len(micro)):
                    with tu.autocast(rt):
                        out = run.train_model(x, targets=y)
                        loss = (out.loss + out.aux_loss) / len(micro)
                    run.scaler.scale(loss).backward()
                loss_sum += loss.detach()
            mean_loss = run.global_loss(loss_sum)
            grad_norm = run.optimizer_step()
            tokens_per_s = len(micro) * tokens_per_micro / run.seconds()
            metrics = {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
            if peak:
                metrics["mfu"] = flops * tokens_per_s / peak
            if not run.end_step(metrics):
                break
        run.finish()


if __name__ == "__main__":
    run_main(main)
