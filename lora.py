"""LoRA: train a low-rank update B·A next to each frozen projection instead of the projection itself.

A wrapped projection computes y = W·x + (alpha / rank)·B·A·dropout(x), with A (rank, in) and B (out, rank).
B starts at zero, so the wrapped model starts exactly equal to the base model. Used by SFT.py's --lora_rank,
--lora_alpha and --lora_targets; call apply_lora before building the optimizer and before DDP/torch.compile wrap
the model.

State-dict names: a wrapped `layers.0.self_attn.q_proj` holds `q_proj.base.weight` (the frozen original) and
`q_proj.lora_A`, `q_proj.lora_B`. save_lora writes only the lora_A/lora_B tensors; merge_lora folds them into the base
weights and restores plain nn.Linear modules, so a merged model has exactly the original Transformer keys again.
"""
if __name__ == "__main__":  # before the imports: a library module answers at once, not after torch loads
    raise SystemExit("lora.py is a library module, not a script: "
                     "train adapters with SFT.py --lora_rank 8 (see README.md)")
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, atomic_torch_save, load_file, load_state_strict, unwrap

# Matched against a module's last name, so the projections of every MoE expert and shared expert match too.
# The router and the (tied) lm_head are never adapted.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAMES = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init: uniform ±1/√in
        self.dropout = nn.Dropout(dropout)
        self.train(base.training)  # a new module starts in training mode; an eval model must not get live dropout

    def forward(self, x):
        # (..., in) → (..., rank) → (..., out): never forms the (out, in) product B·A
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scale * update

    def merged_weight(self):
        """W + scale·B·A, computed in fp32 and returned in the base weight's dtype."""
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())  # (out, in)
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)


def parse_targets(targets):
    """A list of unique target names from a sequence or a "q_proj,v_proj" / "q_proj v_proj" string."""
    if isinstance(targets, str):
        targets = targets.replace(",", " ").split()
    targets = list(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; valid targets are {list(TARGETS)}")
    if not targets:
        raise ValueError(f"no LoRA targets given; valid targets are {list(TARGETS)}")
    return targets


def apply_lora(model, rank, alpha, targets=TARGETS, dropout=0.0):
    """Freeze every parameter of `model` and wrap each nn.Linear whose last name is in `targets` in a LoRALinear,
    in place. Afterwards only the adapters (lora_A, lora_B) require grad. Returns the model."""
    targets = parse_targets(targets)
    if rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1); got rank={rank}, alpha={alpha}, "
                         f"dropout={dropout}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora it first or start from a plain model")
    matches = {t: [] for t in targets}
    for name, module in model.named_modules():
        last = name.rpartition(".")[2]
        if isinstance(module, nn.Linear) and last in matches:
            matches[last].append(name)
    unmatched = [t for t, names in matches.items() if not names]
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} match no nn.Linear module of the model")
    model.requires_grad_(False)  # embeddings, norms, router, every base projection
    for names in matches.values():
        for name in names:
            model.set_submodule(name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return model


def lora_modules(model):
    """(name, LoRALinear) pairs; an error if the model has none (a plain model saved as an "adapter" is a bug)."""
    found = [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)]
    if not found:
        raise ValueError("the model has no LoRA adapters (apply_lora or load_lora first)")
    return found


def lora_config(model):
    """The settings apply_lora was called with, read back from the wrapped modules."""
    modules = lora_modules(model)
    wrapped = {name.rpartition(".")[2] for name, _ in modules}
    first = modules[0][1]  # apply_lora gives every module the same settings
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.dropout.p,
            "targets": [t for t in TARGETS if t in wrapped]}


def lora_state_dict(model):
    """Only the adapter tensors, under their full model names (e.g. layers.0.self_attn.q_proj.lora_A)."""
    lora_modules(model)
    return {k: v for k, v in unwrap(model).state_dict().items() if k.rpartition(".")[2] in ADAPTER_NAMES}


def save_lora(model, path, meta=None):
    """Write the adapters, their config and the caller's `meta` (plain Python values, e.g. the base checkpoint's
    path) atomically; the file loads with torch.load(..., weights_only=True)."""
    atomic_torch_save({"lora": lora_state_dict(model), "lora_config": lora_config(model), "meta": meta or {}}, path)
    return path


def load_lora(model, path):
    """Apply LoRA with the config saved in `path` to a plain model and load its adapters strictly; returns
    (model, meta). Missing, unexpected or mis-shaped adapter keys are an error that names them."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or "lora" not in ckpt or "lora_config" not in ckpt:
        raise CheckpointError(f"{path}: not a LoRA adapter file (expected keys 'lora' and 'lora_config'; "
                              f"SFT.py --lora_rank writes save_dir/lora_sft.pth)")
    apply_lora(model, **ckpt["lora_config"])
    # The model's own base tensors plus the file's adapters: the shared strict loader then checks exactly the
    # adapter keys (a missing one is not papered over by the freshly initialised adapter).
    base = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] not in ADAPTER_NAMES}
    load_state_strict(model, {**base, **ckpt["lora"]}, path)
    return model, ckpt["meta"]


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight (W + scale·B·A) and put the plain nn.Linear back, in place.

    The result has exactly the original Transformer state-dict keys (save it as a full checkpoint). Its parameters
    stay frozen as apply_lora left them; call model.requires_grad_(True) to train it further."""
    for name, module in lora_modules(model):
        module.base.weight.copy_(module.merged_weight())
        unwrap(model).set_submodule(name, module.base)
    return model


def count_parameters(model):
    """(trainable, total) parameter counts; tied weights are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_summary(model):
    """One log line: the adapter settings and how many parameters train."""
    config = lora_config(model)
    trainable, total = count_parameters(model)
    return (f"LoRA rank {config['rank']}, alpha {config['alpha']} on {', '.join(config['targets'])} "
            f"({len(lora_modules(model))} modules): {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / total:.2f}%)")
