"""The plumbing every training stage shares, written once: command-line flags, devices and DDP, mixed precision,
the LR schedule, the optimizer, the batch plan, the run itself (resume, signals, checkpoints: checkpoint.py),
evaluation, throughput/MFU and logging. The stage scripts (pretrain.py, SFT.py, distill.py, dpo.py,
grpo.py) show their loops.
"""
if __name__ == "__main__":  # before the imports: a library module answers at once, not after torch loads
    raise SystemExit("train_utils.py is a library module, not a script: "
                     "the training scripts are pretrain.py, SFT.py, distill.py, dpo.py and grpo.py (see README.md)")
import argparse
import contextlib
import copy
import functools
import itertools
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from checkpoint import (LATEST, CheckpointError, check_tokenizer, claim_save_dir, load_model, load_optimizer_state,
                        load_state_strict, load_training_state, rank0_says, release_save_dir, resume_checkpoint,
                        run_settings, save_checkpoint, save_final, set_rng_state, tokenizer_fingerprint, unwrap)
from cli import NONNEG, NONNEG_INT, POSITIVE, POSITIVE_INT, UserError, add_bool_flag, number
from Config import LLMConfig
from dataset import LengthBucketBatches, collate_sft
from model import Transformer

ROOT = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------------- flags

def add_training_args(parser, *, batch_size, learning_rate, epochs, max_seq_len=None, save_step=100, min_lr=None,
                      log_interval=10, eval_interval=200, batch_help="sequences per micro-batch on each process"):
    """The flags every stage shares; each stage picks its own defaults. Every number is range-checked here."""
    a = parser.add_argument
    a("--batch_size", type=POSITIVE_INT, default=batch_size, help=batch_help)
    a("--learning_rate", type=POSITIVE, default=learning_rate, help="peak learning rate")
    a("--min_lr", type=NONNEG, default=min_lr, help="cosine floor (default: learning_rate / 10)")
    a("--warmup_steps", type=NONNEG_INT, default=None,
      help="linear warmup, in optimizer steps (default: 1%% of the run's steps)")
    a("--weight_decay", type=NONNEG, default=0.1, help="AdamW decay of matrices (never norms or biases)")
    a("--grad_clip", type=NONNEG, default=1.0, help="clip the global gradient norm (0 disables)")
    a("--epochs", type=POSITIVE_INT, default=epochs, help="passes over the data")
    a("--max_steps", type=POSITIVE_INT, default=None,
      help="train exactly this many optimizer steps (the LR schedule's length), over as many epochs as it takes")
    a("--stop_step", type=POSITIVE_INT, default=None,
      help="end this session after optimizer step N with a checkpoint, schedule unchanged (resume later)")
    a("--accumulation_steps", type=POSITIVE_INT, default=1, help="micro-batches per optimizer step")
    a("--max_seq_len", type=number(int, low=2), default=max_seq_len, help="context length (default: the model's)")
    a("--save_dir", default=None, help="checkpoints and final weights go here (default: results; when resuming, "
      "the checkpoint's folder)")
    a("--save_step", type=POSITIVE_INT, default=save_step, help="write latest_checkpoint.pth every N optimizer steps")
    a("--resume_from", default=None, help="a latest_checkpoint.pth, or 'auto' for save_dir/latest_checkpoint.pth: "
      "the run continues with its own settings (flags left out are taken from the checkpoint)")
    add_bool_flag(parser, "--overwrite", help="start a fresh run although save_dir holds an unfinished run or this "
                  "stage's final weights, or although the output would replace an input")
    a("--eval_data", nargs="+", default=None, help="held-out JSONL for validation loss/perplexity")
    a("--eval_interval", type=POSITIVE_INT, default=eval_interval,
      help="validate every N optimizer steps (and at the end)")
    a("--eval_batches", type=POSITIVE_INT, default=50, help="at most this many batches per validation")
    a("--log_interval", type=POSITIVE_INT, default=log_interval, help="log every N optimizer steps")
    a("--seed", type=NONNEG_INT, default=1337, help="seeds the data order, the initial weights and dropout")
    a("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    a("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
      help="autocast dtype (default: bfloat16 on CUDA when supported, else float16; float32 on CPU)")
    add_bool_flag(parser, "--compile", help="torch.compile the model")
    add_bool_flag(parser, "--grad_checkpointing", help="activation checkpointing: keep only each block's input and "
                  "recompute the rest in backward (far less activation memory for about a third more compute)")
    add_bool_flag(parser, "--fsdp", help="shard weights, gradients and AdamW state over the processes (PyTorch FSDP2) "
                  "instead of a full copy on each (DDP); checkpoints still load on any number of processes")
    a("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"), help="tokenizer folder")
    a("--logger", choices=["swanlab", "tensorboard", "none"], default="none", help="experiment tracker")
    add_bool_flag(parser, "--use_wandb", help="alias of --logger swanlab (the seeds' flag)")
    add_bool_flag(parser, "--use_swanlab", help="alias of --logger swanlab")
    a("--project", default="tiny-llm", help="tracker project name")
    a("--num_workers", type=POSITIVE_INT, default=None, help="processes for tokenizing data (default: CPU count)")
    a("--cache_dir", default=None, help="token cache folder (default: .cache/tokens in the repository)")
    add_bool_flag(parser, "--skip_bad_lines", help="skip (and count) malformed JSONL lines instead of stopping")


# Input paths that define a run; resolved at parse time so that the same file spelled differently is the same input.
INPUT_PATHS = ("data_path", "eval_data", "tokenizer_path", "pretrained_path", "sft_path", "teacher_path", "ref_path")


def given_flags(parser, argv=None):
    """The destinations of the flags present on the command line, whatever their values (argparse fills in a
    default only for attributes the namespace lacks, so a sentinel marks the flags left out)."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not unset}


def parse_stage_args(parser, argv=None, inputs=None):
    """A stage's flags, parsed and checked: which were given (a resumed run takes the others from its checkpoint),
    input paths resolved, cross-flag constraints checked. `inputs` maps a path flag left out to a file name in
    save_dir (SFT's --pretrained_path defaults to save_dir/pretrain_final.pth)."""
    args = parser.parse_args(argv)
    args.given_flags = given_flags(parser, argv)
    if args.save_dir is None and args.resume_from in (None, "auto"):
        args.save_dir = "results"
    for flag, name in (inputs or {}).items():
        if getattr(args, flag) is None and args.save_dir is not None:
            setattr(args, flag, os.path.join(args.save_dir, name))
    for flag in INPUT_PATHS:
        value = getattr(args, flag, None)
        if value is not None:
            setattr(args, flag, [os.path.realpath(v) for v in value] if isinstance(value, list) else
                    os.path.realpath(value))
    if args.min_lr is not None and args.min_lr > args.learning_rate:
        parser.error(f"--min_lr {args.min_lr} is above --learning_rate {args.learning_rate}")
    if args.stop_step is not None and args.max_steps is not None and args.stop_step > args.max_steps:
        parser.error(f"--stop_step {args.stop_step} is after the last step (--max_steps {args.max_steps})")
    return args


# ---------------------------------------------------------------------------------------------- devices and DDP

@dataclass
class Runtime:
    device: torch.device
    dtype: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    fsdp: bool = False

    @property
    def ddp(self):
        """More than one process: gradients and metrics are reduced over them (by DDP, or FSDP with --fsdp)."""
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
        raise UserError(f"--device {device} was asked for but CUDA is not available; use --device cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process, never all on cuda:0
    dtype = args.dtype or ("float32" if device == "cpu" else
                           "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    if device == "cpu" and dtype == "float16":
        raise UserError("--dtype float16 needs CUDA; on CPU use float32 or bfloat16")
    fsdp = bool(getattr(args, "fsdp", False))
    if fsdp and dtype == "float16":
        raise UserError("--fsdp trains in bfloat16 or float32 (the float16 loss scaler is not shard-aware here): "
                        "pass --dtype bfloat16 (or float32)")
    if fsdp and args.compile:
        raise UserError("--fsdp and --compile together are not supported: leave out one of them")
    rt = Runtime(torch.device(device), dtype, rank, local_rank, world_size, fsdp)
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    backend = "nccl" if rt.device.type == "cuda" else "gloo"
    if world_size > 1:
        dist.init_process_group(backend=backend)
    elif fsdp:  # FSDP needs a process group even when it has only this process to shard over
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    if not cuda and args.device is None and rt.is_master:
        print(f"CUDA is not available: training on CPU in {dtype}.")
    return rt


def teardown(rt):
    if dist.is_initialized():
        dist.barrier()
        # gloo's worker thread frees each finished collective (the barrier holds the ones before it) and, for
        # tensors made in Python, needs the GIL to do so. Sleeping hands it the GIL now: otherwise the process
        # group's destructor, run later with the GIL held (when DDP's reducer is freed at exit), joins that worker
        # thread while it waits for the GIL, and the process hangs forever.
        time.sleep(0.1)
        dist.destroy_process_group()


@contextlib.contextmanager
def master_first(rt):
    """Rank 0 runs the block first (e.g. tokenizing data into the cache), then the others (reading the cache). If
    rank 0 fails with a UserError (a bad data line), the other ranks stop too instead of waiting forever."""
    if rt.ddp and not rt.is_master and rank0_says(rt, None):
        raise SystemExit(2)  # rank 0 prints why
    try:
        yield
    except UserError as e:
        if rt.ddp and rt.is_master:
            rank0_says(rt, str(e))
        raise
    if rt.ddp and rt.is_master:
        rank0_says(rt, None)


def wrap_model(model, args, rt):
    """torch.compile (if asked) and DDP around the model; the optimizer keeps using the plain model's parameters.
    A model sharded by shard_model needs no wrapper: FSDP hooks into its modules in place."""
    model = torch.compile(model) if args.compile else model
    if rt.ddp and not rt.fsdp:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model


def shard_model(model, rt):
    """FSDP2 in place: each block, then the rest (embeddings, final norm, head), is one unit whose weights are
    gathered just before use and freed after; gradients are reduce-scattered in fp32. Under bf16 the gathered
    weights are bf16 (half the traffic); the fp32 shards stay the master weights."""
    policy = MixedPrecisionPolicy() if rt.dtype == "float32" else MixedPrecisionPolicy(
        param_dtype=getattr(torch, rt.dtype), reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


_GATHERED = set()  # ids of sharded models inside full_weights (nested use is free)


@contextlib.contextmanager
def full_weights(model):
    """Under FSDP: every process holds the whole model inside the block, so its forward passes need no collectives
    and processes may run different numbers of them (generation that stops early, uneven evaluation batches).
    Without FSDP: nothing to do."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units or id(model) in _GATHERED:
        yield
        return
    _GATHERED.add(id(model))
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # the root never reshards after forward
        _GATHERED.discard(id(model))


def meta_copy(model):
    """The module tree of `model` (any wrappers such as LoRA included) with its parameters on the meta device:
    no memory, a blueprint that materialize() fills with weights."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def materialize(blueprint, state, source):
    """The blueprint's module tree on CPU holding exactly `state`; tied parameters stay tied."""
    fresh = {}
    for module in blueprint.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in fresh:
                fresh[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
            setattr(module, name, fresh[id(p)])
    load_state_strict(blueprint, state, source)
    return blueprint.cpu()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def begin_run(stage, args, data_help, inputs=()):
    """Everything before a stage builds its model: the resumed run's settings, the input files, devices and DDP,
    and the claim on save_dir. Returns (runtime, resume path or None, checkpoint or None)."""
    resume_path, ckpt = resume_checkpoint(args, stage)
    require_files(args.data_path + (args.eval_data or []), data_help)
    rt = setup_runtime(args)
    if ckpt is not None:
        fit_world_size(args, ckpt, resume_path, rt)
    claim_save_dir(args, rt, stage, resuming=ckpt is not None, inputs=inputs)
    return rt, resume_path, ckpt


def fit_world_size(args, ckpt, path, rt):
    """A run saved by N processes continues on M with the same global batch: batch_size × processes stays, so
    every optimizer step takes the same sequences (shuffled_batches and bucketed_plan cut global batches) and the
    saved data position means the same place; the per-process batch_size adapts."""
    saved = ckpt["world_size"]
    if saved == rt.world_size:
        return
    global_batch = args.batch_size * saved
    if global_batch % rt.world_size:
        raise CheckpointError(f"{path} was trained with micro-batches of {global_batch} sequences ({saved} processes "
                              f"× --batch_size {args.batch_size}), which {rt.world_size} processes cannot share "
                              f"evenly: resume on a number of processes that divides {global_batch}")
    if rt.is_master:
        print(f"resuming a run of {saved} process(es) on {rt.world_size}: --batch_size {args.batch_size} -> "
              f"{global_batch // rt.world_size} per process (still {global_batch} sequences per micro-batch, "
              f"{args.accumulation_steps} micro-batch(es) per optimizer step)")
    args.batch_size = global_batch // rt.world_size


def restore_rng(ckpt, seed, rt):
    """Each process continues its own random stream (dropout masks). On another number of processes no stream can
    continue (each process holds other sequences than before): each starts a new one from (seed, step, rank).
    Data order and GRPO sampling do not use these streams (they are keyed by seed and position)."""
    if ckpt["world_size"] == rt.world_size:
        set_rng_state(ckpt["rng"][rt.rank])
    else:
        seed_everything(int(np.random.SeedSequence([seed, ckpt["step"], rt.rank]).generate_state(1)[0]))


def load_start(args, ckpt, rt):
    """The model a post-pretraining stage trains: resuming, the checkpoint's shape (its weights come with the run's
    state); else the previous stage's weights at --sft_path, checked against the tokenizer."""
    if ckpt is not None:
        return Transformer(LLMConfig.from_dict(ckpt["config"])).to(rt.device)
    model, meta = load_model(args.sft_path, rt.device, max_seq_len=args.max_seq_len)
    check_tokenizer(meta, args.tokenizer_path, args.sft_path)
    return model


def load_frozen(path, args, rt, **config_overrides):
    """A model that is read and never trained (a reference policy, a teacher), checked against the tokenizer."""
    model, meta = load_model(path, rt.device, **config_overrides)
    check_tokenizer(meta, args.tokenizer_path, path)
    return model.requires_grad_(False).eval()


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
            raise UserError("not enough data for a single batch; lower --batch_size or add data")
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

    --max_steps is honoured exactly: the plan runs as many epochs as it takes (refused only when --epochs was given
    and is too few). Warmup defaults to 1% of the steps, the cosine floor to learning_rate / 10. The last, possibly
    shorter, optimizer step takes the micro-batches left over at the end of the run."""

    def __init__(self, args, plan):
        if args.max_steps:
            fit_epochs(args, plan)
            steps = args.max_steps
        else:
            steps = math.ceil(plan.total / args.accumulation_steps)
        self.steps = steps
        self.accumulation, self.total_micro = args.accumulation_steps, min(plan.total, steps * args.accumulation_steps)
        self.warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(0.01 * steps)
        if self.warmup > steps:
            raise UserError(f"--warmup_steps {self.warmup} is longer than the run ({steps} optimizer steps): "
                            f"the learning rate would never reach its peak; lower --warmup_steps")
        self.max_lr = args.learning_rate
        self.min_lr = args.min_lr if args.min_lr is not None else args.learning_rate / 10

    def lr(self, step):
        return lr_at(step, self.steps, self.warmup, self.max_lr, self.min_lr)

    def micro_batches_in_step(self, micro_step):
        return min(self.accumulation, self.total_micro - micro_step)


def fit_epochs(args, plan):
    """Give the plan enough epochs for --max_steps optimizer steps (args.epochs records it for resume)."""
    needed = math.ceil(args.max_steps * args.accumulation_steps / plan.per_epoch)
    if needed <= plan.epochs:
        return
    if "epochs" in getattr(args, "given_flags", ()):
        raise UserError(f"--max_steps {args.max_steps} needs {needed} epochs of this data ({plan.per_epoch} "
                        f"micro-batches each) but --epochs is {args.epochs}: leave --epochs out or lower --max_steps")
    args.epochs = plan.epochs = needed
    plan.total = plan.per_epoch * needed


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------------ evaluation and speed

def require_files(paths, help_text):
    """Stop with help_text (where to get data) when an input file is missing."""
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(help_text.format(path=path))


def load_data(dataset_class, args, rt, max_seq_len):
    """The training and (with --eval_data) held-out datasets; rank 0 tokenizes into the cache first."""
    def load(paths, skip_bad):  # --skip_bad_lines covers the held-out files too: one rule, as the error says
        return dataset_class(paths, args.tokenizer_path, max_seq_len, cache_dir=args.cache_dir, skip_bad=skip_bad,
                             num_workers=args.num_workers)
    with master_first(rt):
        return (load(args.data_path, args.skip_bad_lines),
                load(args.eval_data, args.skip_bad_lines) if args.eval_data else None)


def data_identity(data, eval_data):
    """What a resumed run must find again: the training and held-out data by content (the token caches' keys)."""
    return {"train": data.fingerprint, "eval": eval_data.fingerprint if eval_data is not None else None}


def bucketed_plan(data, args, rt):
    """Batches of similar-length conversations (little padding), deterministic per (seed, epoch); as with
    shuffled_batches, N processes see exactly the batches of one process with N× the batch size (see
    LengthBucketBatches). A last global batch that is not full sits the epoch out, on one process too."""
    buckets = LengthBucketBatches(data.lengths, args.batch_size, args.seed, rt.rank, rt.world_size)
    return BatchPlan(lambda epoch: [b for b in buckets.batches(epoch) if len(b) == args.batch_size], args.epochs)


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


def memory_estimate(config, batch_size, seq_len, dtype="float32", grad_checkpointing=False, processes=1, fsdp=False,
                    trainable=None):
    """Bytes each process holds in a training step, by part: fp32 weights, gradients and AdamW's two moments of
    the `trainable` parameters (default all; LoRA trains few), each split over the processes by FSDP; the weights
    in use in the compute dtype (FSDP: the gathered units; bf16 without FSDP: autocast's copy of every weight);
    DDP's gradient buckets; and the activations of one micro-batch of batch_size × seq_len tokens.

    Activations count the tensors autograd keeps for backward (dropout 0), term by term as this model's forward
    saves them (tests/test_scale.py checks the sum against PyTorch's own tracker). A real peak adds short-lived
    buffers (the logits' gradient, allocator caching, the CUDA context): leave ~10% headroom."""
    total = config.param_counts()[0]
    trainable = total if trainable is None else trainable
    shards = processes if fsdp else 1
    parts = {"weights": 4 * total / shards, "gradients": 4 * trainable / shards, "AdamW": 8 * trainable / shards}
    width = 4 if dtype == "float32" else 2
    if fsdp:
        root = config.vocab_size * config.dim * (1 if config.tie_word_embeddings else 2) + config.dim
        block = (total - root) / config.n_layers
        # The block in use, the next one prefetched and the root unit (embeddings, head), plus one block's
        # unsharded fp32 gradients before they are reduce-scattered.
        parts["gathered"] = width * (2 * block + root) + 4 * block
    elif width == 2:
        parts["bf16 copies"] = 2 * total
    if processes > 1 and not fsdp:
        parts["DDP buckets"] = 4 * trainable
    parts["activations"] = batch_size * seq_len * activation_bytes_per_token(config, dtype, grad_checkpointing)
    return parts


def activation_bytes_per_token(config, dtype="float32", grad_checkpointing=False):
    """Bytes autograd keeps per token of a micro-batch. RMSNorm works in fp32 (its input and normalised output,
    8·dim each); under autocast every projection casts its input to bf16 anew, in fp32 the projections of one
    input share it; q, k, v and the attention output are kept for SDPA's backward, with its per-head log-sum-exp;
    the feed-forward keeps gate, up, silu(gate) and their product (4·hidden)."""
    d, h, hidden, V = config.dim, config.n_heads, config.hidden_dim, config.vocab_size
    kv = config.n_kv_heads * config.head_dim
    low = dtype != "float32"
    w = 2 if low else 4                                       # bytes of a compute-dtype element
    qkv_inputs, mlp_inputs = (3, 2) if low else (1, 1)        # copies of a projection input
    attention = 16 * d + qkv_inputs * w * d + 2 * w * d + 2 * w * kv + 4 * h + 8
    if config.use_moe:
        k, shared = config.num_experts_per_tok, config.n_shared_experts
        routed = 4 * d + mlp_inputs * w * d + w * d + 4 * w * hidden + 40  # gathered rows, expert, weighted output
        shared_input = mlp_inputs * w * d if low else 0       # in fp32 the shared experts read the router's input
        ffn = w * d + k * routed + shared * (shared_input + 4 * w * hidden) + 4 * config.n_routed_experts
    else:
        ffn = mlp_inputs * w * d + 4 * w * hidden
    layer = attention + ffn
    head = w * V + 4 * V + 8 * d + w * d + 16                  # logits, fp32 log-softmax, final norm, head input
    if grad_checkpointing:  # each block keeps only its fp32 input; backward rebuilds one block at a time
        return config.n_layers * 4 * d + layer + head
    return config.n_layers * layer + head


def memory_summary(config, args, rt, trainable):
    """One line: the estimate for this run's settings, printed before training."""
    parts = memory_estimate(config, args.batch_size, config.max_seq_len, rt.dtype, args.grad_checkpointing,
                            rt.world_size, rt.fsdp, trainable)
    how = ", ".join([rt.dtype, f"micro-batch {args.batch_size} × {config.max_seq_len} tokens"] +
                    (["activation checkpointing"] if args.grad_checkpointing else []) +
                    ([f"FSDP over {rt.world_size}"] if rt.fsdp else [f"DDP over {rt.world_size}"] if rt.ddp else []))
    return (f"memory estimate per process ({how}): " + " + ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
            + f" = {format_bytes(sum(parts.values()))}")


def format_bytes(n):
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


# Dense bf16 peaks (spec sheets), matched against torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "A10": 125e12}


def measure_cpu_peak_flops(sizes=(1024, 2048), seconds=1.0):
    """The fp32 matmul rate of this CPU with the current torch threads (the MFU denominator on CPU): the best of
    many timed matmuls at two sizes after a warm-up, so a moment of noise cannot make the peak look low (a low peak
    is what turns into an MFU above 100%)."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        warm_until = time.perf_counter() + 0.2
        while time.perf_counter() < warm_until:
            a @ b
        deadline = time.perf_counter() + seconds / len(sizes)
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
    schedule, the data position (restored exactly on resume), logging, periodic validation and checkpoints, and a
    clean stop on SIGTERM (preemption) or Ctrl-C: a checkpoint at the next step boundary, then a non-zero exit.

    A stage loop reads:  with TrainingRun(...) as run: while run.running(): lr, micro = run.start_step();
    <forward/backward each micro-batch>; loss = run.global_loss(...); grad_norm = run.optimizer_step();
    run.end_step(metrics) (False: stop here); then run.finish(). Leaving the `with` block, however it is left,
    gives back the signal handlers and the save_dir lock.
    `data_id` identifies the training data by content (datasets' `fingerprint`); a resume on other data is refused.
    """

    def __init__(self, stage, args, rt, model, plan, ckpt=None, resume_path=None, evaluate=None, extra=None,
                 data_id=None):
        self.stage, self.args, self.rt, self.model, self.evaluate = stage, args, rt, model, evaluate
        self.extra = {**(extra or {}), "data": data_id}
        self.schedule = Schedule(args, plan)
        self.meta = {"stage": stage, "tokenizer": tokenizer_fingerprint(args.tokenizer_path),
                     "total_steps": self.schedule.steps}
        self.step = self.micro_step = 0
        history = None
        if ckpt is not None:
            check_tokenizer(ckpt["meta"], args.tokenizer_path, resume_path)
            load_training_state(ckpt, resume_path, model=model, data_id=data_id)
            self.step, self.micro_step, history = ckpt["step"], ckpt["micro_step"], ckpt["history"]
        model.grad_checkpointing = args.grad_checkpointing
        self.blueprint = meta_copy(model) if rt.fsdp else None
        if rt.fsdp:
            shard_model(model, rt)  # before the optimizer: FSDP replaces the parameters by their shards
        self.optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
        self.scaler = make_scaler(rt)
        if ckpt is not None:
            load_optimizer_state(ckpt, model=model, optimizer=self.optimizer, scaler=self.scaler)
            restore_rng(ckpt, args.seed, rt)
        else:
            seed_everything(args.seed + rt.rank)  # dropout masks differ across ranks
        self.train_model = wrap_model(model, args, rt)
        self.trained = None
        if rt.is_master:  # a sharded parameter's numel() is still the whole tensor's
            print(memory_summary(model.config, args, rt, sum(p.numel() for p in model.parameters() if p.requires_grad)))
        self.logger = TrainLogger(args, rt, stage, self.schedule.steps, self.step, history)
        self.batches = plan.micro_batches(self.micro_step)
        self.latest = os.path.join(args.save_dir, LATEST)
        self.started = time.perf_counter()
        self.signal = None
        self.stop_requested = False
        self.old_handlers = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._restore_handlers()
        release_save_dir(self.args.save_dir)

    def _on_signal(self, signum, frame):
        """First signal: finish the step, save, stop. A second one: stop now, the usual way."""
        if self.signal is not None:
            self._restore_handlers()
            signal.raise_signal(signum)
            return
        self.signal = signum
        if self.rt.is_master:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                  f"(again to stop at once)", file=sys.stderr, flush=True)

    def _restore_handlers(self):
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)

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
        """DDP all-reduces gradients only on the last micro-batch of an optimizer step. FSDP reduce-scatters after
        every micro-batch: holding unsharded gradients across micro-batches would cost the memory it saves."""
        if not self.rt.ddp or self.rt.fsdp or i == n - 1:
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def global_loss(self, local_loss):
        """The step's loss averaged over processes; a NaN/inf on any process stops every process before the
        optimizer step, so the last checkpoint stays the last good state. The same all-reduce tells every process
        whether any of them was asked to stop (a signal reaches each torchrun worker on its own)."""
        mean, bad, stop = all_reduce_sum(self.rt, [local_loss.item() / self.rt.world_size,
                                                   float(not torch.isfinite(local_loss)),
                                                   float(self.signal is not None)])
        if bad:
            raise SystemExit(f"loss is {local_loss.item()} at step {self.step + 1}: stopping. {self.latest} still "
                             f"holds the last good state; try a lower --learning_rate or --dtype bfloat16.")
        self.stop_requested = self.stop_requested or bool(stop)
        return mean

    def optimizer_step(self):
        """Unscale (fp16), clip the global gradient norm, step, update the loss scale, clear the gradients.
        Returns the norm before clipping. A non-finite norm stops the run before the update (fp16 excepted: its
        loss scaler skips such steps by design)."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip or float("inf"))
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            raise SystemExit(f"the gradient norm is {grad_norm.item()} at step {self.step + 1}: stopping before the "
                             f"update. {self.latest} still holds the last good state; try a lower --learning_rate.")
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
            with full_weights(self.model):
                self.logger.log_eval(self.step, self.evaluate())
        stop = self.step == self.args.stop_step or self.stop_requested
        if self.step % self.args.save_step == 0 or last or stop:
            save_checkpoint(self.latest, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                            step=self.step, micro_step=self.micro_step, args=self.args, rt=self.rt,
                            history=self.logger.history, meta=self.meta, extra=self.extra)
            self.logger.note(f"step {self.step}: saved {self.latest}")
        return not stop

    def trained_model(self):
        """The trained model as one process would hold it. Under --fsdp, once the run reached its last step, the
        shards are gathered into a plain CPU copy on rank 0 (every process must call this; later calls are free)."""
        if self.blueprint is None or self.running():
            return self.model
        if self.trained is None:
            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            self.trained = materialize(self.blueprint, state, "the gathered shards") if self.rt.is_master else \
                self.model
        return self.trained

    def finish(self, final_model=None):
        """Curves; the final weights (final_model, default the trained model) if the run reached its last step;
        process-group teardown. Returns the final weights' path or None. A run stopped by a signal exits here,
        with status 130 (Ctrl-C) or 143 (SIGTERM), after its checkpoint was written."""
        trained = self.trained_model()
        curves, path = self.logger.close(), None
        if self.rt.is_master and not self.running():
            model = final_model or trained
            path = save_final(model, unwrap(model).config, self.args.save_dir, self.stage, self.args.tokenizer_path)
            print(f"saved {path}; curves in {curves}")
        elif self.rt.is_master:
            print(f"stopped at step {self.step}/{self.schedule.steps}; continue with --resume_from {self.latest}")
        teardown(self.rt)
        if self.stop_requested:
            raise SystemExit(130 if self.signal in (None, signal.SIGINT) else 143)
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
        self.tty = sys.stdout.isatty()
        if not self.enabled:
            return
        logger = "swanlab" if (args.use_wandb or args.use_swanlab) else args.logger
        if logger == "swanlab":
            self.tracker = start_swanlab(args, stage)
        elif logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(args.save_dir, "tensorboard", stage))

    def _bar(self):
        """The progress bar, made at the first step (so the stage's summary line is printed before it), at most 80
        columns wide with the few numbers that fit; the plain log lines have them all."""
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.start, desc=self.stage,
                            ncols=min(80, shutil.get_terminal_size().columns),
                            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {remaining}{postfix}")
        return self.bar

    def log(self, step, metrics):
        """Record training metrics of optimizer step `step` (1-based); print every log_interval steps."""
        if not self.enabled:
            return
        self.history["train"].append({"step": step, **metrics})
        self._track(step, metrics)
        if self.tty:
            short = {k: metrics[k] for k in ("loss", "tokens_per_s", "mfu") if k in metrics}
            self._bar().set_postfix_str(format_metrics(short, sep=" "), refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.log_interval == 0 or step == self.total:
            eta = (time.perf_counter() - self.t0) / max(step - self.start, 1) * (self.total - step)
            print(f"{self.stage} step {step}/{self.total} | {format_metrics(metrics)} | eta {format_seconds(eta)}",
                  flush=True)

    def note(self, line):
        """A line of its own (a saved checkpoint, a validation result), above the bar on a terminal."""
        if self.enabled:
            (self.bar.write if self.bar is not None else functools.partial(print, flush=True))(line)

    def log_eval(self, step, metrics):
        if not self.enabled:
            return
        self.history["eval"].append({"step": step, **metrics})
        self._track(step, metrics)
        self.note(f"{self.stage} step {step}/{self.total} | {format_metrics(metrics)}")

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
    swanlab.init(project=args.project, experiment_name=stage, config=run_settings(args), mode=mode,
                 logdir=os.path.join(args.save_dir, "swanlog"))
    return swanlab


def format_metrics(metrics, sep=" | "):
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
    return sep.join(parts)


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# Metrics every stage logs; anything else a stage logs (DPO's reward accuracy and margins) gets a panel of its own.
STANDARD_METRICS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
# Stage metrics counted in tokens, not on the 0-1 scale the others share: each gets a panel to itself.
OWN_PANEL_METRICS = {"completion_len"}
VALIDATION_LOSS = {"step", "val_loss", "val_ppl"}


def plot_curves(history, path, title):
    """Loss (train and validation), learning rate, throughput and any stage-specific metrics (training and
    validation) against optimizer steps, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, evals = history["train"], history["eval"]
    logged = {k for r in train for k in r}
    extra = sorted(logged - STANDARD_METRICS - OWN_PANEL_METRICS)
    eval_extra = sorted({k for r in evals for k in r} - VALIDATION_LOSS)  # GRPO validates by accuracy
    own = sorted(logged & OWN_PANEL_METRICS)
    panels = 3 + bool(extra or eval_extra) + len(own)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="train loss", linewidth=0.8)
    scored = [r for r in evals if "val_loss" in r]
    if scored:
        axes[0].plot([r["step"] for r in scored], [r["val_loss"] for r in scored], "o-", label="validation loss")
    axes[0].set_title(f"{title}: loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set_title("learning rate")
    axes[2].plot(steps, [r.get("tokens_per_s", 0) for r in train])
    axes[2].set_title("tokens/s")
    for key in extra:
        axes[3].plot(steps, [r.get(key, float("nan")) for r in train], label=key, linewidth=0.8)
    for key in eval_extra:
        axes[3].plot([r["step"] for r in evals], [r.get(key, float("nan")) for r in evals], "o-", label=key)
    if extra or eval_extra:
        names = extra + eval_extra  # the legend names them all; a title of more would run into the next panel
        axes[3].set_title(f"{title}: " + (", ".join(names) if len(names) <= 4 else "stage metrics"))
        axes[3].legend()
    for ax, key in zip(axes[panels - len(own):], own):
        ax.plot(steps, [r.get(key, float("nan")) for r in train], linewidth=0.8)
        ax.set_title(f"{title}: {key}")
    for ax in axes:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
