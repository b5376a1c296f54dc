r"""Weight-only int8 / int4 quantisation of a Transformer's linear layers, for smaller (and on CPU faster) inference.

    python quantize.py --model_path results/pretrain_final.pth \
        --eval_data ../shared/data/eval_en_wikitext2_raw_test.jsonl

That command compares fp32, bf16, int8 and int4 side by side (weight memory, decode tokens/s, perplexity; --modes
picks which, the first is the speed baseline); without --model_path it times a random-init --preset model.
eval_model.py and api_server.py call `quantize_model(model, mode)` for their --quantize flag.

`quantize_model(model, mode)` replaces the attention and feed-forward projections (MoE experts included) and an
untied lm_head with layers that store integer weights and call PyTorch's own weight-only kernels:

- int8: one symmetric scale per output row, `torch.ops.aten._weight_int8pack_mm` on CPU or CUDA (4× smaller).
- int4: groups of 32 inputs share a scale and a zero point (asymmetric), the "tinygemm" kernels
  `aten._weight_int4pack_mm_for_cpu` on CPU and `aten._weight_int4pack_mm` on CUDA (sm80+) (~6× smaller).

Activations enter the kernels in bfloat16, their fast path (with fp32 inputs the CPU kernels take a reference loop
several times slower); outputs return in the model's dtype, so the rest of the model and its KV cache are unchanged.

Kept in floating point, on purpose: the embedding (a lookup needs the float table anyway), so a TIED lm_head stays
float too (quantising it would store a second, int8 copy of the table: 1.25× the memory instead of 0.25×); the MoE
router (tiny, and its top-k choice is discrete, so small errors flip experts); the norms.

Why not torchao (tried, 0.18): its Int8WeightOnlyConfig converts the int8 weight back to float on every call in
eager mode, 2-3× slower than fp32 on CPU, and its int4 configs have no CPU kernel (CUDA/XPU/NPU only).
The packed int4 layout differs between CPU and CUDA: quantise after moving the model to its device.
"""
import copy
import os
import statistics
import tempfile
import time

import torch
import torch.nn as nn

from cli import POSITIVE_INT, ArgumentParser, UserError, run_main
from Config import PRESETS, describe, get_config
from model import Transformer

MODES = ("int8", "int4")
VARIANTS = ("fp32", "bf16") + MODES  # what the comparison CLI can time
INT4_GROUP = 32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Int8Linear(nn.Module):
    """y = x·Wᵀ with W = scales[:, None]·W_int8 (per-output-row symmetric scales)."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()                                      # (out, in)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)                # (N, in)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)  # (N, out)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4Linear(nn.Module):
    """4-bit weights in groups of INT4_GROUP inputs: W = (q - 8)·scale + zero with q in [0, 15]."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        out_features, in_features = w.shape
        groups = w.view(out_features, in_features // INT4_GROUP, INT4_GROUP)  # (out, in/G, G)
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).view(out_features, in_features)
        zero = low + 8 * scale  # the kernels subtract 8 from q: (q - 8)·scale + zero = low + q·scale
        scales_and_zeros = torch.cat((scale, zero), dim=-1).transpose(0, 1).contiguous()  # (in/G, out, 2)
        self.on_cpu = w.device.type == "cpu"
        self.register_buffer("weight", self.pack(q))
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16))
        self.in_features, self.out_features = in_features, out_features

    def pack(self, q):
        if self.on_cpu:
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)                  # two 4-bit values per byte
        return torch.ops.aten._convert_weight_to_int4pack(pairs, 8)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if self.on_cpu else torch.ops.aten._weight_int4pack_mm
        y = mm(x2, self.weight, INT4_GROUP, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def quantized_layers(model):
    """(parent module, attribute name, nn.Linear) for every layer quantize_model replaces."""
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if not isinstance(child, nn.Linear):
                continue
            untied_head = child_name == "lm_head" and not model.config.tie_word_embeddings
            if child_name in PROJECTIONS or untied_head:
                found.append((module, child_name, child))
    return found


def check_supported(mode, device, layers):
    """Raise a clear error where the chosen kernels cannot run (see the module docstring)."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{mode} quantisation needs a CPU or CUDA model, this one is on {device}")
    if mode == "int4" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        raise ValueError(f"int4 needs a CUDA GPU of compute capability >= 8.0 (the tinygemm kernel); "
                         f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
    if mode == "int4" and device.type == "cpu" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise ValueError(f"int4 on CPU needs torch >= 2.6 (aten._weight_int4pack_mm_for_cpu); this is "
                         f"torch {torch.__version__}")
    # The CUDA packing (8 inner k-tiles of 16) needs inputs in multiples of 128; the CPU one of the group size.
    multiple = 128 if device.type == "cuda" else INT4_GROUP
    for _, name, linear in layers:
        if mode == "int4" and linear.in_features % multiple:
            raise ValueError(f"int4 on {device.type} needs layer inputs in multiples of {multiple}; {name} has "
                             f"{linear.in_features}")


def quantize_model(model, mode):
    """Replace the linear layers of `model` (in place) by int8 or int4 weight-only layers; returns the model.

    The model is for inference afterwards (eval mode; no gradients flow through the integer weights).
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {MODES}")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("quantize_model found no nn.Linear projections to quantise (already quantised?)")
    check_supported(mode, layers[0][2].weight.device, layers)
    layer_class = Int8Linear if mode == "int8" else Int4Linear
    for parent, name, linear in layers:
        setattr(parent, name, layer_class(linear))
    return model.eval()


def weight_bytes(model):
    """Bytes of every parameter and persistent buffer, a tied tensor counted once."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------------------------- side-by-side comparison

def variant(model, mode):
    """A copy of the fp32 model as fp32, bf16, int8 or int4."""
    model = copy.deepcopy(model)
    if mode == "fp32":
        return model
    if mode == "bf16":
        return model.to(torch.bfloat16)
    return quantize_model(model, mode)


@torch.no_grad()
def perplexity(model, windows):
    losses = [model(x[None], targets=y[None]).loss.item() for x, y in windows]
    return float(torch.tensor(losses).mean().exp())


def decode_speed(models, prompt, new_tokens, runs):
    """Median decode tokens/s of each model (batch 1, greedy), runs alternating between models after a warm-up."""
    times = {mode: [] for mode in models}
    for run in range(runs + 1):
        for mode, model in models.items():
            start = time.perf_counter()
            model.generate(prompt, new_tokens, temperature=0)
            if run > 0:
                times[mode].append(time.perf_counter() - start)
    return {mode: new_tokens / statistics.median(t) for mode, t in times.items()}


def eval_windows(args, config):
    """Up to --eval_windows packed windows of the model's context from --eval_data ([] without it)."""
    from dataset import PretrainDataset, load_tokenizer
    if not args.eval_data:
        return []
    vocab = len(load_tokenizer(args.tokenizer_path))
    if vocab > config.vocab_size:
        raise UserError(f"--tokenizer_path {args.tokenizer_path} has {vocab} tokens but the model only "
                        f"{config.vocab_size}; pass the tokenizer the model was trained with")
    with tempfile.TemporaryDirectory() as cache_dir:
        data = PretrainDataset([args.eval_data], args.tokenizer_path, config.max_seq_len, cache_dir=cache_dir,
                               num_workers=1)
        return [data[i] for i in range(min(args.eval_windows, len(data)))]


def parse_args(argv=None):
    from train_utils import ROOT
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--model_path", default=None,
      help="a *_final.pth, latest_checkpoint.pth or *_final/ folder (default: a random-init --preset model)")
    a("--preset", choices=sorted(PRESETS), default=None,
      help="the random-init model's shape, only without --model_path (default: small)")
    a("--eval_data", default=None, help='pretraining JSONL ({"text"} per line) for the perplexity column (default: '
      'no perplexity)')
    a("--eval_windows", type=POSITIVE_INT, default=16, help="perplexity over this many max_seq_len windows")
    a("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"), help="the tokenizer the model was trained with")
    a("--modes", nargs="+", choices=VARIANTS, default=list(VARIANTS),
      help="the variants to compare, the first is the speed baseline: fp32, bf16 (the float model cast), int8 "
      "(one scale per row), int4 (groups of 32; layer inputs in multiples of 32 on CPU, 128 on CUDA)")
    a("--prompt_len", type=POSITIVE_INT, default=64, help="decode benchmark: tokens in the random prompt")
    a("--new_tokens", type=POSITIVE_INT, default=64, help="decode benchmark: tokens generated per run")
    a("--runs", type=POSITIVE_INT, default=3, help="decode benchmark: timed runs per variant (the median is shown)")
    args = p.parse_args(argv)
    repeated = sorted({m for m in args.modes if args.modes.count(m) > 1})
    if repeated:
        p.error(f"--modes lists {', '.join(repeated)} more than once")
    if args.model_path and args.preset:
        p.error("--preset shapes a random-init model; it has no effect with --model_path (pass one of them)")
    for flag in ("model_path", "eval_data"):
        if getattr(args, flag) and not os.path.exists(getattr(args, flag)):
            p.error(f"--{flag} {getattr(args, flag)}: no such file")
    return args


def source_model(args):
    """The float32 model to compare: the checkpoint (its tokenizer checked when perplexity is asked for), or a
    random-init --preset model (seed 0)."""
    from checkpoint import check_tokenizer, load_model
    if not args.model_path:
        torch.manual_seed(0)
        return Transformer(get_config(args.preset or "small")).eval()
    model, meta = load_model(args.model_path)
    if args.eval_data:
        check_tokenizer(meta, args.tokenizer_path, args.model_path)
    return model.float().eval()


def build_variants(model, args):
    if args.prompt_len + args.new_tokens > model.config.max_seq_len:
        raise UserError(f"--prompt_len {args.prompt_len} + --new_tokens {args.new_tokens} exceed the model's "
                        f"context {model.config.max_seq_len}; lower them")
    variants = {}
    for mode in args.modes:
        try:
            variants[mode] = variant(model, mode)
        except ValueError as e:  # quantize_model: a device or a layer shape its kernels do not take
            raise UserError(f"--modes {mode}: {e}") from None
    return variants


def main(argv=None):
    args = parse_args(argv)
    model = source_model(args)
    models = build_variants(model, args)
    windows = eval_windows(args, model.config)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    speed = decode_speed(models, prompt, args.new_tokens, args.runs)
    name = args.model_path or f"{args.preset or 'small'} preset (random init)"
    print(f"\n{name} ({describe(model.config)}), cpu, {torch.get_num_threads()} threads; decode: batch 1, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, median of {args.runs}; perplexity: {len(windows)} "
          f"windows of {model.config.max_seq_len}")
    print(f"| mode | weights MiB | decode tok/s | vs {args.modes[0]} | perplexity |")
    print("|---|---:|---:|---:|---:|")
    for mode, m in models.items():
        ppl = f"{perplexity(m, windows):.2f}" if windows else "-"
        print(f"| {mode} | {weight_bytes(m) / 2 ** 20:.1f} | {speed[mode]:.1f} | "
              f"{speed[mode] / speed[args.modes[0]]:.2f}× | {ppl} |")


if __name__ == "__main__":
    run_main(main)
