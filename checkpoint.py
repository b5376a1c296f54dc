"""Checkpoints, written once for every stage: atomic writes, the exact-resume training state, final weights, strict
loading, and the claim on a save_dir (one run at a time; nothing of another run overwritten by accident).

    save_dir/latest_checkpoint.pth   model, optimizer, scaler, step, micro_step, config, args, rng (every rank),
                                     world_size, history, extra, meta {stage, tokenizer, total_steps}
    save_dir/{stage}_final.pth       model, config, meta {stage, tokenizer}
    save_dir/{stage}_final/          model.safetensors (meta in its header) + config.json

Every form carries the stage that wrote it and the fingerprint of its tokenizer, and every load checks them. All
files load with torch.load(weights_only=True); a file that cannot be read is one line naming it and the cause.
"""
if __name__ == "__main__":  # before the imports: a library module answers at once, not after torch loads
    raise SystemExit("checkpoint.py is a library module, not a script: "
                     "the training scripts are pretrain.py, SFT.py, distill.py, dpo.py and grpo.py (see README.md)")
import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import os
import pickle
import random
import shutil
import struct
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule

from cli import UserError
from Config import LLMConfig
from model import Transformer

STAGE_SCRIPTS = {"pretrain": "pretrain.py", "sft": "SFT.py", "distill": "distill.py", "dpo": "dpo.py",
                 "grpo": "grpo.py"}
LATEST = "latest_checkpoint.pth"
# Flags that shape only this session (where it runs, how it logs and saves): a resumed run may change them. Every
# other flag defines the run: a resumed run refuses a different value. Both kinds, when left out, take the saved
# value, except those that only make sense for the session that gave them.
SESSION_FLAGS = {"device", "dtype", "compile", "fsdp", "grad_checkpointing", "num_workers", "cache_dir", "logger",
                 "use_wandb", "use_swanlab", "project", "log_interval", "save_step", "eval_interval", "eval_batches",
                 "stop_step", "resume_from", "save_dir", "overwrite"}
NOT_INHERITED = {"stop_step", "resume_from", "save_dir", "overwrite"}


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and the cause."""


# ------------------------------------------------------------------------------------------------ atomic writes

def write_problem(path, error):
    if error.errno == errno.ENOSPC:
        return f"no space left on device: {path} (nothing was replaced; the previous file is intact)"
    return f"cannot write {path}: {error.strerror or error}"


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
    except OSError as e:
        raise CheckpointError(write_problem(path, e)) from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def remove_orphans(save_dir):
    """Delete temporary files and folders that a killed save left behind (their writer is no longer running)."""
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(save_dir), "*.tmp-*")):
        pid = tmp.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp) if os.path.isdir(tmp) and not os.path.islink(tmp) else os.remove(tmp)
            removed.append(os.path.basename(tmp))
    if removed:
        print(f"removed {len(removed)} leftover file(s) of an interrupted save in {save_dir}: {', '.join(removed)}")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------- reading files

def check_archive(path):
    """A file torch.save wrote is a zip archive whose data.pkl describes the tensors. torch.load checks neither the
    archive's structure nor the pickle's CRC-32, so a damaged file would fail deep in the unpickler with whatever
    exception the damage provokes, or load wrong; reading data.pkl through zipfile checks both (tensor bytes are
    left unchecked: verifying them means reading the whole file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: not a checkpoint written by torch.save (no single data.pkl inside)")
            archive.read(pickles[0])
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, UnicodeDecodeError, struct.error) as e:
        cause = (str(e).splitlines() or [type(e).__name__])[0][:80]
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({cause})") from None
    except OSError as e:
        # a damaged directory record sends zipfile seeking to a negative offset
        what = "corrupt or truncated checkpoint" if e.errno == errno.EINVAL else "cannot be read"
        raise CheckpointError(f"{path}: {what} ({e.strerror})") from None


def load_file(path, mmap=False):
    """torch.load(weights_only=True) of a checkpoint file (memory-mapped with mmap: only what is read is loaded);
    a damaged or foreign file is a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file (expected a .pth file written by this project)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty or truncated; it is not a usable checkpoint")
    check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: not a checkpoint of this project (it holds objects that a weights-only "
                              f"load refuses)") from None
    except (EOFError, RuntimeError, KeyError, IndexError, ValueError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        cause = (str(e).splitlines() or [type(e).__name__])[0][:80]
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {cause})") from None


def require_keys(ckpt, keys, path, what):
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not {what} of this project (missing {', '.join(missing)})")


def describe_checkpoint(ckpt):
    """'an unfinished sft run (step 3/10)' or 'a finished pretrain run (10/10)', from a training checkpoint."""
    meta = ckpt.get("meta", {})
    total = meta.get("total_steps")
    state = "a finished" if total is not None and ckpt["step"] >= total else "an unfinished"
    return f"{state} {meta.get('stage', 'unknown-stage')} run (step {ckpt['step']}/{total or '?'})"


# --------------------------------------------------------------------------------------------- exact resume

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


def gather_rng_states(rt):
    """Every rank's RNG state (dropout differs per rank), gathered on rank 0."""
    state = rng_state()
    if not rt.ddp:
        return [state]
    states = [None] * rt.world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(path, *, model, optimizer, scaler, step, micro_step, args, rt, history, meta, extra=None):
    """The full training state. Every rank must call this (FSDP shards and RNG states are gathered); rank 0
    writes. Weights that are not finite are never written: the file on disk stays the last good state."""
    model = unwrap(model)
    model_state, optimizer_state = full_training_state(model, optimizer)
    states = gather_rng_states(rt)
    finite = rt.is_master and all(torch.isfinite(t).all() for t in model_state.values())
    if not rank0_says(rt, finite):
        raise SystemExit(f"the weights are not finite after step {step}: stopping without saving; {path} holds the "
                         f"last good state. Try a lower --learning_rate or --dtype bfloat16.")
    if not rt.is_master:
        return
    atomic_torch_save({"model": model_state, "optimizer": optimizer_state,
                       "scaler": scaler.state_dict(), "step": step, "micro_step": micro_step,
                       "config": model.config.to_dict(), "args": run_settings(args), "rng": states,
                       "world_size": rt.world_size, "history": history, "meta": meta, "extra": extra or {}}, path)


def full_training_state(model, optimizer):
    """(model state, optimizer state) exactly as one process training the plain model would save them, whatever
    the number of processes, so that a checkpoint loads anywhere. A model sharded by FSDP is gathered on rank 0
    (every rank must call this; the others get (None, None)), its optimizer state keyed by position as
    optimizer.state_dict() keys it."""
    if not isinstance(model, FSDPModule):
        return model.state_dict(), optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:
        return None, None
    position = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    return model_state, {"state": {position[n]: s for n, s in by_name["state"].items()},
                         "param_groups": [{**g, "params": [position[n] for n in g["params"]]}
                                          for g in by_name["param_groups"]]}


def parameter_names(model, optimizer):
    """The names of the optimizer's parameters in the order optimizer.state_dict() numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def run_settings(args):
    """The flags as a checkpoint keeps them (everything but the bookkeeping of which were given)."""
    return {k: v for k, v in vars(args).items() if k != "given_flags"}


def resume_checkpoint(args, stage):
    """(path, checkpoint) to resume from, or (None, None) for a fresh run; updates `args` to continue the run.

    Flags left out take the run's saved values; a run-defining flag given with another value is refused (it
    would be ignored or would silently change what the saved data position and schedule mean)."""
    path = resume_path(args)
    if path is None:
        return None, None
    ckpt = load_file(path)
    if isinstance(ckpt, dict) and "optimizer" not in ckpt and "model" in ckpt:
        found = ckpt.get("meta", {}).get("stage")
        raise CheckpointError(f"{path} holds {f'the {found} stage' if found else 'a model'}'s final weights, not a "
                              f"training checkpoint: start a new run from it (e.g. SFT.py --pretrained_path, "
                              f"distill.py/dpo.py/grpo.py --sft_path), or resume an interrupted run with its "
                              f"latest_checkpoint.pth")
    require_keys(ckpt, ("model", "optimizer", "scaler", "step", "micro_step", "config", "args", "rng", "world_size",
                        "history", "meta"), path, "a training checkpoint")
    found = ckpt["meta"].get("stage")
    if found != stage:
        raise CheckpointError(f"{path} is a checkpoint of a {found} run: resume it with "
                              f"{STAGE_SCRIPTS.get(found, 'the script that wrote it')}")
    inherit_settings(args, ckpt["args"], path)
    if args.save_dir is None:
        args.save_dir = os.path.dirname(os.path.abspath(path))
    return path, ckpt


def resume_path(args):
    """The checkpoint --resume_from names ('auto': save_dir/latest_checkpoint.pth if there is one), or None."""
    if args.resume_from is None:
        return None
    if args.resume_from != "auto":
        return args.resume_from
    path = os.path.join(args.save_dir, LATEST)
    if not os.path.exists(path):
        print(f"--resume_from auto: no {path} yet, starting from scratch.")
        return None
    return path


def inherit_settings(args, saved, path):
    conflicts = []
    for key, value in saved.items():
        if key in NOT_INHERITED or not hasattr(args, key):
            continue
        if key not in args.given_flags:
            setattr(args, key, value)
        elif key not in SESSION_FLAGS and getattr(args, key) != value:
            conflicts.append(f"--{key} {show(getattr(args, key))} (the run has {show(value)})")
    if conflicts:
        raise CheckpointError(f"{path} continues a run with other settings: {'; '.join(conflicts)}. Leave these "
                              f"flags out to continue the run as it was, or start a new run in another --save_dir")


def show(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def load_training_state(ckpt, path, *, model, data_id):
    """Restore the weights into the plain (not yet sharded) model; the data must be the same (by content) as
    saved. Any number of processes may resume a run (train_utils.fit_world_size keeps its global batch)."""
    if ckpt["extra"].get("data") != data_id:
        raise CheckpointError(f"{path}: the data differs from the run's (same paths, but the files' content or the "
                              f"tokenizer changed): resuming would continue at a position in other data")
    load_state_strict(unwrap(model), ckpt["model"], path)


def load_optimizer_state(ckpt, *, model, optimizer, scaler):
    """Restore the optimizer (each FSDP process takes its shards of the saved full state) and the loss scaler."""
    if isinstance(model, FSDPModule):
        names = parameter_names(model, optimizer)
        saved = ckpt["optimizer"]
        by_name = {"state": {names[i]: s for i, s in saved["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])


# ------------------------------------------------------------------------------------------ the save_dir claim

_LOCKS = {}  # realpath(save_dir) -> open lock file (a flock is held while it is open)


def claim_save_dir(args, rt, stage, resuming, inputs=()):
    """Rank 0 takes save_dir for this run: a lock file (two runs cannot share a save_dir), leftovers of a killed
    save removed, and without --overwrite a fresh run refuses to replace an unfinished run's checkpoint, this stage's
    finished run, or one of its own inputs. Every rank stops if rank 0 refuses."""
    problem = None
    if rt.is_master:
        try:
            take_save_dir(args, stage, resuming, inputs)
        except UserError as e:
            problem = e
    if rank0_says(rt, problem and str(problem)) and not rt.is_master:
        raise SystemExit(2)  # rank 0 prints why
    if problem is not None:
        raise problem


def rank0_says(rt, message):
    """Rank 0's message (or None) on every rank; without DDP just the message."""
    if not rt.ddp:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def take_save_dir(args, stage, resuming, inputs):
    os.makedirs(args.save_dir, exist_ok=True)
    lock_save_dir(args.save_dir, stage)
    remove_orphans(args.save_dir)
    if resuming or args.overwrite:
        return
    final = os.path.realpath(os.path.join(args.save_dir, f"{stage}_final.pth"))
    for flag in inputs:
        if getattr(args, flag, None) in (final, final[:-len(".pth")]):
            raise UserError(f"--{flag} {getattr(args, flag)} would be overwritten by this run's output: choose another "
                            f"--save_dir, or pass --overwrite")
    latest = os.path.join(args.save_dir, LATEST)
    if os.path.exists(latest):
        try:
            ckpt = load_file(latest, mmap=True)
            known = isinstance(ckpt, dict) and "step" in ckpt
            what = describe_checkpoint(ckpt) if known else f"a {LATEST} of unknown kind"
        except CheckpointError as e:
            ckpt, what = {}, f"an unreadable checkpoint ({e})"
        if not what.startswith("a finished") or ckpt.get("meta", {}).get("stage") == stage:
            raise UserError(f"{args.save_dir} holds {what}: continue it with --resume_from auto, pass --overwrite "
                            f"to start over, or choose another --save_dir")


def lock_save_dir(save_dir, stage):
    key = os.path.realpath(save_dir)
    if key in _LOCKS:  # this process already holds it (an earlier stage of pipeline.py)
        return
    f = open(os.path.join(save_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{save_dir} is in use by another run ({holder}); wait for it to end or choose another "
                        f"--save_dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}, {stage}")
    f.flush()
    _LOCKS[key] = f


def release_save_dir(save_dir):
    f = _LOCKS.pop(os.path.realpath(save_dir), None) if save_dir else None
    if f is not None:
        f.close()


# --------------------------------------------------------------------------------------------- final weights

def unwrap(model):
    """The plain Transformer inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def tokenizer_fingerprint(tokenizer_dir):
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"{tokenizer_dir}: no tokenizer.json in this folder; check --tokenizer_path")
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def save_final(model, config, save_dir, stage, tokenizer_dir):
    """save_dir/{stage}_final.pth (state dict + config, loads with weights_only=True) and a safetensors copy with
    its config.json in save_dir/{stage}_final/. The folder is built under a temporary name and swapped in whole."""
    from safetensors.torch import save_model
    model = unwrap(model)
    meta = {"stage": stage, "tokenizer": tokenizer_fingerprint(tokenizer_dir)}
    path = os.path.join(save_dir, f"{stage}_final.pth")
    atomic_torch_save({"model": model.state_dict(), "config": config.to_dict(), "meta": meta}, path)
    folder = os.path.join(save_dir, f"{stage}_final")
    tmp, old = f"{folder}.tmp-{os.getpid()}", f"{folder}.old.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata=meta)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config.to_json())
        if os.path.isdir(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
    except OSError as e:
        raise CheckpointError(write_problem(folder, e)) from None
    finally:
        for leftover in (tmp, old):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)
    return path


# --------------------------------------------------------------------------------------------- loading weights

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
    if not problems and model.config.tie_word_embeddings and not torch.equal(state["lm_head.weight"],
                                                                            state["embed_tokens.weight"]):
        problems.append("the config ties lm_head to embed_tokens but the checkpoint's two tensors differ")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def read_weights(path):
    """(LLMConfig, state dict, meta) from a final .pth, a latest_checkpoint.pth or a safetensors folder."""
    if os.path.isdir(path):
        config_dict, state, meta = read_safetensors_folder(path)
    elif os.path.isfile(path):
        ckpt = load_file(path)
        require_keys(ckpt, ("model", "config"), path, "a checkpoint")
        config_dict, state, meta = ckpt["config"], ckpt["model"], ckpt.get("meta", {})
    else:
        raise CheckpointError(f"{path}: no such checkpoint (expected a .pth file or a *_final/ safetensors folder)")
    try:
        config = LLMConfig.from_dict(config_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model config is not valid ({e})") from None
    if config.tie_word_embeddings and "lm_head.weight" not in state:  # safetensors stores a tied tensor once
        state = {**state, "lm_head.weight": state.get("embed_tokens.weight")}
    return config, state, meta


def read_safetensors_folder(path):
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file as load_safetensors
    files = [os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")]
    for f in files:
        if not os.path.isfile(f):
            raise CheckpointError(f"{path}: expected a folder with config.json and model.safetensors, "
                                  f"{os.path.basename(f)} is missing")
    try:
        with open(files[0]) as f:
            config_dict = json.load(f)
        with safe_open(files[1], framework="pt") as f:
            meta = dict(f.metadata() or {})
        return config_dict, load_safetensors(files[1]), meta
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as e:
        raise CheckpointError(f"{path}: corrupt weights folder ({type(e).__name__}: {e})") from None


def build_model(config, state, source, device="cpu"):
    """A Transformer of `config` holding exactly `state` (see load_state_strict)."""
    if any(v is None for v in state.values()):
        raise CheckpointError(f"{source}: embed_tokens.weight is missing")
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
    """Refuse weights trained with another tokenizer (their token ids would mean different text), and weights that
    do not say which tokenizer they were trained with."""
    expected = meta.get("tokenizer")
    if expected is None:
        raise CheckpointError(f"{source} does not record its tokenizer's fingerprint (not written by this "
                              f"project's stage scripts?): its token ids cannot be checked against {tokenizer_dir}")
    if expected != tokenizer_fingerprint(tokenizer_dir):
        raise CheckpointError(f"{source} was trained with another tokenizer (fingerprint {expected}) than "
                              f"{tokenizer_dir} ({tokenizer_fingerprint(tokenizer_dir)}); pass the matching "
                              f"--tokenizer_path")
