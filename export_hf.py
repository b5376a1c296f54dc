"""Export a checkpoint to a Hugging Face folder that `transformers` loads with no custom code and no network.

    python export_hf.py --model_path results/sft_final.pth --out_dir hf_model [--tokenizer_path tokenizer] \
        [--dtype float32|bfloat16|float16]

The folder holds config.json, generation_config.json (stops at <|im_end|> and <|endoftext|>), model.safetensors and
the tokenizer with its ChatML template, so `AutoModelForCausalLM.from_pretrained(out_dir)` and
`AutoTokenizer.from_pretrained(out_dir).apply_chat_template(...)` work as for any hub model.

Dense models are exactly `LlamaForCausalLM` (the names already match, see model.py). MoE models are exactly
`Qwen2MoeForCausalLM`, whose routing is ours: softmax over the routed experts, top-k, renormalised only when k > 1
(its norm_topk_prob). Mixtral renormalises top-1 too and has no shared experts; DeepSeek-V2 has another attention.
Qwen2-MoE's two differences are removed by an exact weight transform: the q/k/v biases are switched off
(qkv_bias=False), and its sigmoid gate on the shared expert gets zero weights, so the gate is the constant 0.5,
which the shared down projection, doubled, cancels. Our n shared experts (always added) become its one shared
expert of n·hidden_dim units: a sum of SwiGLU blocks is one SwiGLU with the units side by side. Its
router_aux_loss_coef is our aux_loss_alpha / k: transformers counts each token k times where our balance loss takes
the share of routed slots, so fine-tuning the export with output_router_logits=True balances as hard as we did.

The tokenizer's bos_token is <|endoftext|> and it is prepended by default (add_bos_token), so `tokenizer(text)`,
`pipeline("text-generation")` and lm-eval's document prefix start raw text exactly as eval_ppl.py and raw prompts
do ([<|endoftext|>] + text); apply_chat_template adds no bos, as our chat template has none.
"""
import os

import torch

from checkpoint import check_tokenizer, load_model, unwrap
from cli import ArgumentParser, UserError, run_main
from dataset import EOS, load_tokenizer
from train_utils import ROOT

BOS = EOS  # the document boundary <|endoftext|>, which encode_raw puts before raw text
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rope_parameters(config):
    """transformers' rope_parameters for our rope_theta/rope_scaling. Our "ntk" is a fixed stretched base, which
    is plain RoPE with rope_theta·factor^(d/(d-2)) (transformers' "dynamic" NTK changes with length: not ours)."""
    theta, scaling, d = config.rope_theta, config.rope_scaling, config.head_dim
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    kind, factor = scaling["type"], float(scaling["factor"])
    if kind == "ntk":
        return {"rope_type": "default", "rope_theta": theta * factor ** (d / (d - 2))}
    rope = {"rope_type": kind, "rope_theta": theta, "factor": factor}
    if kind == "yarn":
        rope["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
        rope.update({k: scaling[k] for k in ("beta_fast", "beta_slow") if k in scaling})
    return rope


def special_token_ids(tokenizer):
    """bos/eos/pad ids: bos is the document boundary <|endoftext|> (see BOS), eos the chat turn end <|im_end|>."""
    endoftext = tokenizer.convert_tokens_to_ids(BOS)
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None or endoftext is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path} needs an eos token, a pad token and {BOS} "
                         f"(train it with train_tokenizer.py)")
    return {"bos_token_id": endoftext, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "stop_ids": list(dict.fromkeys((tokenizer.eos_token_id, endoftext)))}


def export_tokenizer(tokenizer_dir):
    """Our tokenizer with bos <|endoftext|> prepended to plain text (transformers rewrites the post-processor)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.bos_token = BOS
    tokenizer.add_bos_token = True
    return tokenizer


def hf_config(config, ids, dtype):
    """LlamaConfig for a dense model, Qwen2MoeConfig for an MoE one (see the module docstring)."""
    from transformers import LlamaConfig, Qwen2MoeConfig
    common = dict(vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.n_layers,
                  num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                  head_dim=config.head_dim, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
                  rope_parameters=rope_parameters(config), tie_word_embeddings=config.tie_word_embeddings,
                  hidden_act="silu", bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                  pad_token_id=ids["pad_token_id"], dtype=dtype)
    if not config.use_moe:
        return LlamaConfig(intermediate_size=config.hidden_dim, attention_bias=False, mlp_bias=False, **common)
    return Qwen2MoeConfig(
        num_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
        norm_topk_prob=config.num_experts_per_tok > 1, moe_intermediate_size=config.hidden_dim,
        shared_expert_intermediate_size=config.n_shared_experts * config.hidden_dim,
        intermediate_size=config.hidden_dim,
        decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=False, use_sliding_window=False,
        output_router_logits=False, router_aux_loss_coef=config.aux_loss_alpha / config.num_experts_per_tok,
        **common)


def moe_layer_state(mlp, prefix):
    """One MoEFeedForward as Qwen2MoeSparseMoeBlock weights (experts fused into 3-D tensors, as transformers 5)."""
    experts, shared = mlp.experts, mlp.shared_experts
    state = {
        prefix + "gate.weight": mlp.router.weight,
        prefix + "experts.gate_up_proj": torch.stack([torch.cat((e.gate_proj.weight, e.up_proj.weight))
                                                      for e in experts]),               # (E, 2·hidden, dim)
        prefix + "experts.down_proj": torch.stack([e.down_proj.weight for e in experts]),  # (E, dim, hidden)
        prefix + "shared_expert_gate.weight": mlp.router.weight.new_zeros(1, mlp.router.weight.shape[1]),
    }
    for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        weights = [getattr(s, name).weight for s in shared]
        joined = torch.cat(weights, dim=dim) if weights else None
        if joined is None:  # no shared experts: a zero-width shared expert adds exactly nothing
            width = mlp.router.weight.shape[1]
            joined = mlp.router.weight.new_zeros((0, width) if dim == 0 else (width, 0))
        state[f"{prefix}shared_expert.{name}.weight"] = joined * 2 if name == "down_proj" else joined
    return state


def hf_state_dict(model):
    """Our weights under transformers' names: "model." + ours for a dense model; MoE blocks rewritten."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".mlp." in name and model.config.use_moe:
            continue
        state[name if name == "lm_head.weight" else "model." + name] = tensor
    if model.config.use_moe:
        for i, layer in enumerate(model.layers):
            state.update(moe_layer_state(layer.mlp, f"model.layers.{i}.mlp."))
    return state


def to_hf_model(model, tokenizer, dtype=torch.float32):
    """The transformers model (LlamaForCausalLM or Qwen2MoeForCausalLM) holding exactly our weights."""
    from transformers import AutoModelForCausalLM
    model = unwrap(model)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but the model only "
                         f"vocab_size={model.config.vocab_size}: they do not belong together")
    config = hf_config(model.config, special_token_ids(tokenizer), dtype)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.to(dtype).eval()


def export_hf(model, tokenizer_dir, out_dir, dtype="float32"):
    """Write the Hugging Face folder (see the module docstring); returns out_dir."""
    from transformers import GenerationConfig
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} must be one of {sorted(DTYPES)}")
    tokenizer = export_tokenizer(tokenizer_dir)
    hf = to_hf_model(model, tokenizer, DTYPES[dtype])
    ids = special_token_ids(tokenizer)
    hf.generation_config = GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["stop_ids"],
                                            pad_token_id=ids["pad_token_id"])
    hf.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def check_out_dir(out_dir, *inputs):
    """--out_dir must be a folder (new or existing) that is none of the input folders: writing the export there
    would replace the checkpoint's own model.safetensors/config.json or the tokenizer."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file; give a folder to write the Hugging Face model into")
    for path in inputs:
        if os.path.isdir(path) and os.path.realpath(out_dir) == os.path.realpath(path):
            raise UserError(f"--out_dir {out_dir} is the input folder {path}; choose a new folder")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", required=True,
                        help="a *_final.pth, latest_checkpoint.pth or *_final/ safetensors folder")
    parser.add_argument("--out_dir", required=True, help="output folder (created; existing files are overwritten)")
    parser.add_argument("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"),
                        help="the tokenizer folder the model was trained with")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_out_dir(args.out_dir, args.model_path, args.tokenizer_path)
    model, meta = load_model(args.model_path)
    check_tokenizer(meta, args.tokenizer_path, args.model_path)
    try:
        export_hf(model.eval(), args.tokenizer_path, args.out_dir, args.dtype)
    except ValueError as e:
        raise UserError(f"{args.model_path}: {e}") from None
    except OSError as e:
        raise UserError(f"--out_dir {args.out_dir}: cannot write it ({e.strerror or e})") from None
    kind = "Qwen2MoeForCausalLM" if model.config.use_moe else "LlamaForCausalLM"
    print(f"wrote {kind} ({args.dtype}) to {os.path.abspath(args.out_dir)}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({args.out_dir!r})")


if __name__ == "__main__":
    run_main(main)
