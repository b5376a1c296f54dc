"""The plumbing every training stage shares, written once: command-line flags, devices and DDP, mixed precision,
the LR schedule, the optimizer, the batch plan, exact-resume checkpoints, final weights and model loading, evaluation,
throughput/MFU and logging. The stage scripts (pretrain.py, SFT.py, distill.py, dpo.py) show their own loops.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from Config import LLMConfig
from cli import add_bool_flag
from dataset import LengthBucketBatches, collate_sft
from model import Transformer

ROOT = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------------- flags

def add_training_args(parser, *, batch_size, learning_rate, epochs, max_seq_len=None, save_step=100, min_lr=None,
                      warmup_steps=0, log_interval=10, eval_interval=200):
    """The flags every stage shares; each stage picks its own defaults."""
    a = parser.add_argument
    a("--batch_size", type=int, default=batch_size, help="sequences per micro-batch on each process")
    a("--learning_rate", type=float, default=learning_rate, help="peak learning rate")
    a("--min_lr", type=float, default=min_lr, help="cosine floor (default: learning_rate / 10)")
    a("--warmup_steps", type=int, default=warmup_steps, help="linear warmup, in optimizer steps")
    a("--weight_decay", type=float, default=0.1, help="AdamW decay of matrices (never norms or biases)")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0 disables)")
    a("--epochs", type=int, default=epochs)
    a("--max_steps", type=int, default=None, help="train this many optimizer steps (the LR schedule's length)")
    a("--stop_step", type=int, default=None,
      help="end this session after optimizer step N with a checkpoint, schedule unchanged (resume later)")
    a("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--max_seq_len", type=int, default=max_seq_len, help="context length (default: the model's)")
    a("--save_dir", default="results", help="checkpoints and final weights go here")
    a("--save_step", type=int, default=save_step, help="write latest_checkpoint.pth every N optimizer steps")
    a("--resume_from", default=None, help="a checkpoint path, or 'auto' for save_dir/latest_checkpoint.pth")
    a("--eval_data", nargs="+", default=None, help="held-out JSONL for validation loss/perplexity")
    a("--eval_interval", type=int, default=eval_interval, help="validate every N optimizer steps (and at the end)")
    a("--eval_batches", type=int, default=50, help="at most this many batches per validation")
    a("--log_interval", type=int, default=log_interval, help="log every N optimizer steps")
    a("--seed", type=int, default=1337)
    a("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    a("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
      help="autocast dtype (default: bfloat16 on CUDA when supported, else float16; float32 on CPU)")
    add_bool_flag(parser, "--compile", help="torch.compile the model")
    a("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"), help="tokenizer folder")
    a("--logger", choices=["swanlab", "tensorboard", "none"], default="none", help="experiment tracker")
    add_bool_flag(parser, "--use_wandb", help="alias of --logger swanlab (the seeds' flag)")
    add_bool_flag(parser, "--use_swanlab", help="alias of --logger swanlab")
    a("--project", default="tiny-llm", help="tracker project name")
    a("--num_workers", type=int, default=None, help="processes for tokenizing data (default: CPU count)")
    a("--cache_dir", default=None, help="token cache folder (default: .cache/tokens in the repository)")
    add_bool_flag(parser, "--skip_bad_lines", help="skip (and count) malformed JSONL lines instead of stopping")


# ---------------------------------------------------------------------------------------------- devices and DDP

@dataclass
class Runtime:
    device: torch.device
    dtype: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def is_master(self):
        return self.rank == 0


def setup_runtime(args):
    """Pick the device and dtype (saying so when CUDA is missing) and join the torchrun process group if any."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    if device.startswith("cuda") and not cuda:
        raise SystemExit(f"--device {device} was asked for but CUDA is not available; use --device cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process, never all on cuda:0
    dtype = args.dtype or ("float32" if device == "cpu" else
                           "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    if device == "cpu" and dtype == "float16":
        raise SystemExit("--dtype float16 needs CUDA; on CPU use float32 or bfloat16")
    rt = Runtime(torch.device(device), dtype, rank, local_rank, world_size)
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if rt.device.type == "cuda" else "gloo")
    if not cuda and args.device is None and rt.is_master:
        print(f"CUDA is not available: training on CPU in {dtype}.")
    return rt


def teardown(rt):
    if rt.ddp:
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def master_first(rt):
    """Rank 0 runs the block first (e.g. tokenizing data into the cache), then the others (reading the cache)."""
    if rt.ddp and not rt.is_master:
        dist.barrier()
    yield
    if rt.ddp and rt.is_master:
        dist.barrier()


def autocast(rt):
    """Mixed precision as asked: bf16/fp16 autocast on CUDA, bf16 on CPU only when asked, nothing for fp32."""
    if rt.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=getattr(torch, rt.dtype))


def make_scaler(rt):
    """Loss scaling is for fp16 only; bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == "float16")


def all_reduce_sum(rt, values):
    """Sum a list of floats over all processes."""
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if rt.ddp:
        dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------ optimisation schedule

def lr_at(step, total_steps, warmup_steps, max_lr, min_lr):
    """Linear warmup to max_lr, then cosine to min_lr. `step` counts optimizer steps, never micro-batches."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)  # the last step gets min_lr
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model, lr, weight_decay):
    """AdamW that decays matrices (linear and embedding weights) but not norm gains or biases.

    The fused kernel (CPU and CUDA) updates each tensor in one pass; on CPU it is ~7x faster than the default."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


class BatchPlan:
    """Which items every micro-batch of this rank holds, for the whole run, derived from (seed, epoch) alone.

    `epoch_batches(epoch)` lists this rank's batches of an epoch (the same count on every rank). Micro-batches are
    numbered across epochs, so gradient accumulation runs over an epoch boundary instead of dropping leftovers, and
    resuming at micro-batch m is just starting the numbering at m.
    """

    def __init__(self, epoch_batches, epochs):
        self.epoch_batches, self.epochs = epoch_batches, epochs
        self.per_epoch = len(epoch_batches(0))
        if self.per_epoch == 0:
            raise SystemExit("not enough data for a single batch; lower --batch_size or add data")
        self.total = self.per_epoch * epochs

    def micro_batches(self, start):
        """Yield (epoch, item indices) for micro-batches start, start + 1, ... to the end of the run."""
        epoch, offset = divmod(start, self.per_epoch)
        while epoch < self.epochs:
            for batch in self.epoch_batches(epoch)[offset:]:
                yield epoch, batch
            epoch, offset = epoch + 1, 0


def shuffled_batches(n_items, batch_size, seed, rt):
    """Epoch -> this rank's batches: a seeded shuffle cut into global batches of batch_size × world_size, of which
    rank r takes slice r. N processes thus see exactly the batches of one process with N× the batch size. The
    remainder of an epoch (< one global batch) waits for the next shuffle."""
    global_batch = batch_size * rt.world_size

    def epoch_batches(epoch):
        order = np.random.default_rng([seed, epoch]).permutation(n_items)
        starts = range(rt.rank * batch_size, n_items - global_batch + 1 + rt.rank * batch_size, global_batch)
        return [order[s:s + batch_size] for s in starts]
    return epoch_batches


class Schedule:
    """The run's length in optimizer steps and its learning rate at each step.

    Warmup defaults to 1% of the steps and the cosine floor to learning_rate / 10. The last, possibly shorter,
    optimizer step takes the micro-batches left over at the end of the run."""

    def __init__(self, args, plan):
        steps = math.ceil(plan.total / args.accumulation_steps)
        self.steps = min(steps, args.max_steps) if args.max_steps else steps
        self.accumulation, self.total_micro = args.accumulation_steps, plan.total
        self.warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(0.01 * self.steps)
        self.max_lr = args.learning_rate
        self.min_lr = args.min_lr if args.min_lr is not None else args.learning_rate / 10

    def lr(self, step):
        return lr_at(step, self.steps, self.warmup, self.max_lr, self.min_lr)

    def micro_batches_in_step(self, micro_step):
        return min(self.accumulation, self.total_micro - micro_step)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------- checkpoints and exact resume

def atomic_torch_save(obj, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename: a crash leaves old or new."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state():
    """Python, numpy, torch and CUDA generator states as plain lists (they travel through all_gather_object and
    load with weights_only=True)."""
    name, keys, *rest = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), *rest),
            "torch": torch.get_rng_state().tolist(), "cuda": [s.tolist() for s in cuda]}


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"]:
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def gather_rng_states(rt):
    """Every rank's RNG state (dropout differs per rank), gathered on rank 0."""
    state = rng_state()
    if not rt.ddp:
        return [state]
    states = [None] * rt.world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(path, *, model, optimizer, scaler, step, micro_step, config, args, rt, history, extra=None):
    """The full training state. Every rank must call this (RNG states are gathered); rank 0 writes."""
    states = gather_rng_states(rt)
    if not rt.is_master:
        return
    atomic_torch_save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict(), "step": step, "micro_step": micro_step,
                       "config": config.to_dict(), "args": vars(args), "rng": states, "world_size": rt.world_size,
                       "history": history, "extra": extra or {}}, path)


# Flags whose change would silently change what the data position in a checkpoint means.
RESUME_INVARIANTS = ("batch_size", "accumulation_steps", "max_seq_len", "seed", "data_path")


def resolve_resume(args):
    """None, or the checkpoint path to resume from ('auto' = save_dir/latest_checkpoint.pth if it exists)."""
    if args.resume_from is None:
        return None
    if args.resume_from == "auto":
        path = os.path.join(args.save_dir, "latest_checkpoint.pth")
        if not os.path.exists(path):
            print(f"--resume_from auto: no {path} yet, starting from scratch.")
            return None
        return path
    if not os.path.isfile(args.resume_from):
        raise SystemExit(f"--resume_from {args.resume_from}: no such checkpoint file "
                         f"(expected a latest_checkpoint.pth written by a training run)")
    return args.resume_from


def read_resume_checkpoint(args):
    """(path, checkpoint) to resume from, or (None, None) for a fresh run."""
    path = resolve_resume(args)
    return (path, torch.load(path, map_location="cpu", weights_only=True)) if path else (None, None)


def load_training_state(ckpt, path, *, model, optimizer, scaler, args, rt):
    """Restore model, optimizer, scaler and this rank's RNG from a checkpoint written by save_checkpoint."""
    saved = ckpt["args"]
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(args, k)!r}" for k in RESUME_INVARIANTS
               if k in saved and saved.get(k) != getattr(args, k, None)]
    if ckpt["world_size"] != rt.world_size:
        changed.append(f"world_size: {ckpt['world_size']} -> {rt.world_size}")
    if changed:
        raise SystemExit(f"cannot resume exactly from {path}; these settings differ from the saved run: "
                         + "; ".join(changed))
    load_state_strict(unwrap(model), ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rt.rank])


def wrap_model(model, args, rt):
    """torch.compile (if asked) and DDP around the model; the optimizer keeps using the plain model's parameters."""
    model = torch.compile(model) if args.compile else model
    if rt.ddp:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model


def unwrap(model):
    """The plain Transformer inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# -------------------------------------------------------------------------------- final weights and model loading

def tokenizer_fingerprint(tokenizer_dir):
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def save_final(model, config, save_dir, stage, tokenizer_dir):
    """save_dir/{stage}_final.pth (state dict + config, loads with weights_only=True) and a safetensors copy with
    its config.json in save_dir/{stage}_final/."""
    from safetensors.torch import save_model
    model = unwrap(model)
    meta = {"stage": stage, "tokenizer": tokenizer_fingerprint(tokenizer_dir)}
    path = os.path.join(save_dir, f"{stage}_final.pth")
    atomic_torch_save({"model": model.state_dict(), "config": config.to_dict(), "meta": meta}, path)
    folder = os.path.join(save_dir, f"{stage}_final")
    os.makedirs(folder, exist_ok=True)
    save_model(model, os.path.join(folder, "model.safetensors"), metadata={k: str(v) for k, v in meta.items()})
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config.to_json())
    return path


def load_state_strict(model, state, source):
    """load_state_dict that names every missing, unexpected or mis-shaped key instead of leaving random weights."""
    own = model.state_dict()
    problems = []
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def read_weights(path):
    """(LLMConfig, state dict, meta) from a final .pth, a latest_checkpoint.pth or a safetensors folder."""
    if os.path.isdir(path):
        from safetensors.torch import load_file
        files = [os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{path}: expected a folder with config.json and model.safetensors, "
                                        f"{os.path.basename(f)} is missing")
        with open(files[0]) as f:
            config_dict, state, meta = json.load(f), load_file(files[1]), {}
    elif os.path.isfile(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
            raise ValueError(f"{path}: not a checkpoint of this project (expected keys 'model' and 'config')")
        config_dict, state, meta = ckpt["config"], ckpt["model"], ckpt.get("meta", {})
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint (expected a .pth file or a safetensors folder)")
    config = LLMConfig.from_dict(config_dict)
    if config.tie_word_embeddings and "lm_head.weight" not in state:  # safetensors stores a tied tensor once
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    return config, state, meta


def build_model(config, state, source, device="cpu"):
    """A Transformer of `config` holding exactly `state` (see load_state_strict)."""
    model = Transformer(config)
    load_state_strict(model, state, source)
    return model.to(device)


def load_model(path, device="cpu", **config_overrides):
    """A Transformer from a checkpoint (see read_weights); returns (model, meta).

    config_overrides change fields of the saved config (e.g. a longer max_seq_len with rope_scaling)."""
    config, state, meta = read_weights(path)
    config = dataclasses.replace(config, **{k: v for k, v in config_overrides.items() if v is not None})
    return build_model(config, state, path, device), meta


def check_tokenizer(meta, tokenizer_dir, source):
    """Refuse weights trained with another tokenizer: their token ids would mean different text."""
    expected = meta.get("tokenizer")
    if expected is not None and expected != tokenizer_fingerprint(tokenizer_dir):
        raise SystemExit(f"{source} was trained with another tokenizer (fingerprint {expected}) than "
                         f"{tokenizer_dir} ({tokenizer_fingerprint(tokenizer_dir)}); pass the matching "
                         f"--tokenizer_path")


# ------------------------------------------------------------------------------------------ evaluation and speed

def require_files(paths, help_text):
    """Stop with help_text (where to get data) when an input file is missing."""
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(help_text.format(path=path))


def load_data(dataset_class, args, rt, max_seq_len):
    """The training and (with --eval_data) held-out datasets; rank 0 tokenizes into the cache first."""
    def load(paths, skip_bad):
        return dataset_class(paths, args.tokenizer_path, max_seq_len, cache_dir=args.cache_dir, skip_bad=skip_bad,
                             num_workers=args.num_workers)
    with master_first(rt):
        return load(args.data_path, args.skip_bad_lines), load(args.eval_data, False) if args.eval_data else None


def bucketed_plan(data, args, rt):
    """Batches of similar-length conversations (little padding), deterministic per (seed, epoch)."""
    buckets = LengthBucketBatches(data.lengths, args.batch_size, args.seed, rt.rank, rt.world_size)
    return BatchPlan(buckets.batches, args.epochs)


def eval_indices(n_items, batch_size, rt, max_batches):
    """Held-out items in a fixed order: the first max_batches global batches, each split across processes."""
    limit = min(n_items, max_batches * batch_size * rt.world_size)
    for start in range(rt.rank * batch_size, limit, batch_size * rt.world_size):
        yield range(start, min(start + batch_size, limit))


def chat_eval_batches(data, args, rt):
    """Held-out conversations (an SFTDataset) as (input_ids, targets, loss_mask) batches for evaluate()."""
    for indices in eval_indices(len(data), args.batch_size, rt, args.eval_batches):
        batch = collate_sft([data[i] for i in indices], data.pad_id)
        yield batch["input_ids"], batch["targets"], batch["loss_mask"]


@torch.no_grad()
def evaluate(model, batches, rt):
    """Token-weighted mean loss over (input_ids, targets, loss_mask-or-None) batches, summed over all processes."""
    was_training = model.training
    model.eval()
    loss_sum, weight = 0.0, 0.0
    for input_ids, targets, loss_mask in batches:
        with autocast(rt):
            out = model(input_ids.to(rt.device), targets=targets.to(rt.device),
                        loss_mask=None if loss_mask is None else loss_mask.to(rt.device))
        n = float((targets != -100).sum()) if loss_mask is None else float(loss_mask.sum())
        loss_sum, weight = loss_sum + out.loss.item() * n, weight + n
    model.train(was_training)
    loss_sum, weight = all_reduce_sum(rt, [loss_sum, weight])
    loss = loss_sum / max(weight, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def flops_per_token(config, seq_len):
    """Training FLOPs per token: 6·N (active parameters incl. the head) + 12·layers·dim·seq_len (attention)."""
    return 6 * config.param_counts()[1] + 12 * config.n_layers * config.dim * seq_len


# Dense bf16 peaks (spec sheets), matched against torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "A10": 125e12}


def measure_cpu_peak_flops(size=1024, seconds=0.5):
    """The fp32 matmul rate of this CPU with the current torch threads (the MFU denominator on CPU)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t))
    return best


def peak_flops(device):
    if device.type == "cpu":
        return measure_cpu_peak_flops()
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------------------------- the run itself

class TrainingRun:
    """What every stage's loop shares around its own forward and backward passes: optimizer and loss scaler, the LR
    schedule, the data position (restored exactly on resume), logging, periodic validation and checkpoints.

    A stage loop reads:  while run.running(): lr, micro = run.start_step(); <forward/backward each micro-batch>;
    loss = run.global_loss(...); grad_norm = run.optimizer_step(); run.end_step(metrics) (False: stop here).
    """

    def __init__(self, stage, args, rt, model, plan, ckpt=None, resume_path=None, evaluate=None, extra=None):
        self.stage, self.args, self.rt, self.model, self.evaluate = stage, args, rt, model, evaluate
        self.extra = extra or {}
        self.optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
        self.scaler = make_scaler(rt)
        self.schedule = Schedule(args, plan)
        self.step = self.micro_step = 0
        history = None
        if ckpt is not None:
            load_training_state(ckpt, resume_path, model=model, optimizer=self.optimizer, scaler=self.scaler,
                                args=args, rt=rt)
            self.step, self.micro_step, history = ckpt["step"], ckpt["micro_step"], ckpt["history"]
        else:
            seed_everything(args.seed + rt.rank)  # dropout masks differ across ranks
        self.train_model = wrap_model(model, args, rt)
        self.logger = TrainLogger(args, rt, stage, self.schedule.steps, self.step, history)
        self.batches = plan.micro_batches(self.micro_step)
        self.latest = os.path.join(args.save_dir, "latest_checkpoint.pth")
        self.started = time.perf_counter()

    def running(self):
        return self.step < self.schedule.steps

    def start_step(self):
        """Set this step's learning rate; returns it and the item indices of each of the step's micro-batches."""
        self.started = time.perf_counter()
        lr = self.schedule.lr(self.step)
        set_lr(self.optimizer, lr)
        n = self.schedule.micro_batches_in_step(self.micro_step)
        self.micro_step += n
        return lr, [indices for _, indices in itertools.islice(self.batches, n)]

    def no_sync(self, i, n):
        """DDP all-reduces gradients only on the last micro-batch of an optimizer step."""
        return contextlib.nullcontext() if not self.rt.ddp or i == n - 1 else self.train_model.no_sync()

    def global_loss(self, local_loss):
        """The step's loss averaged over processes; a NaN/inf on any process stops every process before the
        optimizer step, so the last checkpoint stays the last good state."""
        mean, bad = all_reduce_sum(self.rt, [local_loss.item() / self.rt.world_size,
                                             float(not torch.isfinite(local_loss))])
        if bad:
            raise SystemExit(f"loss is {local_loss.item()} at step {self.step + 1}: stopping. {self.latest} still "
                             f"holds the last good state; try a lower --learning_rate or --dtype bfloat16.")
        return mean

    def optimizer_step(self):
        """Unscale (fp16), clip the global gradient norm, step, update the loss scale, clear the gradients.
        Returns the norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.item()

    def seconds(self):
        """Wall time since start_step."""
        return time.perf_counter() - self.started

    def end_step(self, metrics):
        """Count the step, log it, validate and checkpoint when due. False when this session should stop here."""
        self.step += 1
        last = self.step == self.schedule.steps
        self.logger.log(self.step, metrics)
        if self.evaluate is not None and (self.step % self.args.eval_interval == 0 or last):
            self.logger.log_eval(self.step, self.evaluate())
        if self.step % self.args.save_step == 0 or last or self.step == self.args.stop_step:
            save_checkpoint(self.latest, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                            step=self.step, micro_step=self.micro_step, config=unwrap(self.model).config,
                            args=self.args, rt=self.rt, history=self.logger.history, extra=self.extra)
        return self.step != self.args.stop_step

    def finish(self, final_model=None):
        """Curves; the final weights (final_model, default the trained model) if the run reached its last step;
        process-group teardown. Returns the final weights' path or None."""
        curves, path = self.logger.close(), None
        if self.rt.is_master and not self.running():
            model = final_model or self.model
            path = save_final(model, unwrap(model).config, self.args.save_dir, self.stage, self.args.tokenizer_path)
            print(f"saved {path}; curves in {curves}")
        elif self.rt.is_master:
            print(f"stopped at step {self.step}/{self.schedule.steps}; continue with --resume_from {self.latest}")
        teardown(self.rt)
        return path


# ----------------------------------------------------------------------------------------------------- logging

class TrainLogger:
    """Rank 0 only: a live progress bar on a terminal, plain lines otherwise; swanlab or tensorboard if asked;
    a PNG of the curves at the end. The history survives resume (it is saved in the checkpoint)."""

    def __init__(self, args, rt, stage, total_steps, start_step, history=None):
        self.enabled = rt.is_master
        self.stage, self.total, self.start = stage, total_steps, start_step
        self.save_dir, self.log_interval = args.save_dir, args.log_interval
        self.history = history or {"train": [], "eval": []}
        self.t0 = time.perf_counter()
        self.bar = self.tracker = self.tb = None
        if not self.enabled:
            return
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True)
        logger = "swanlab" if (args.use_wandb or args.use_swanlab) else args.logger
        if logger == "swanlab":
            self.tracker = start_swanlab(args, stage)
        elif logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(args.save_dir, "tensorboard", stage))

    def log(self, step, metrics):
        """Record training metrics of optimizer step `step` (1-based); print every log_interval steps."""
        if not self.enabled:
            return
        self.history["train"].append({"step": step, **metrics})
        self._track(step, metrics)
        done = step - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        text = format_metrics(metrics)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.log_interval == 0 or step == self.total:
            print(f"{self.stage} step {step}/{self.total} | {text} | eta {format_seconds(eta)}", flush=True)

    def log_eval(self, step, metrics):
        if not self.enabled:
            return
        self.history["eval"].append({"step": step, **metrics})
        self._track(step, metrics)
        line = f"{self.stage} step {step}/{self.total} | {format_metrics(metrics)}"
        (self.bar.write if self.bar is not None else print)(line)

    def _track(self, step, metrics):
        if self.tracker is not None:
            self.tracker.log(metrics, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self):
        """Close the bar and trackers and write save_dir/{stage}_curves.png; returns its path."""
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            self.tracker.finish()
        if self.tb is not None:
            self.tb.close()
        return plot_curves(self.history, os.path.join(self.save_dir, f"{self.stage}_curves.png"), self.stage)


def start_swanlab(args, stage):
    """swanlab in the cloud when logged in (SWANLAB_API_KEY or a saved login), else offline logs in save_dir."""
    import swanlab
    logged_in = os.environ.get("SWANLAB_API_KEY") or os.path.exists(
        os.path.join(os.path.expanduser("~"), ".swanlab", ".netrc"))
    mode = os.environ.get("SWANLAB_MODE") or ("cloud" if logged_in else "offline")
    swanlab.init(project=args.project, experiment_name=stage, config=vars(args), mode=mode,
                 logdir=os.path.join(args.save_dir, "swanlog"))
    return swanlab


def format_metrics(metrics):
    parts = []
    for k, v in metrics.items():
        if k == "lr":
            parts.append(f"lr {v:.2e}")
        elif k == "tokens_per_s":
            parts.append(f"{v:,.0f} tok/s")
        elif k == "mfu":
            parts.append(f"MFU {100 * v:.1f}%")
        else:
            parts.append(f"{k} {v:.4f}")
    return " | ".join(parts)


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plot_curves(history, path, title):
    """Loss (train and validation), learning rate and throughput against optimizer steps, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, evals = history["train"], history["eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="train loss", linewidth=0.8)
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    axes[0].set_title(f"{title}: loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set_title("learning rate")
    axes[2].plot(steps, [r.get("tokens_per_s", 0) for r in train])
    axes[2].set_title("tokens/s")
    for ax in axes:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
