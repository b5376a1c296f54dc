"""Export a checkpoint to one GGUF file for llama.cpp and Ollama: dense models as llama, MoE models as bailingmoe.

    python export_gguf.py --model_path results/sft_final.pth --out model-q8_0.gguf --outtype q8_0 \
        [--tokenizer_path tokenizer]

--outtype f16 (half the fp32 size, lossless for bf16-trained weights in practice) or q8_0 (llama.cpp's 8-bit blocks
of 32 with one fp16 scale, ~quarter size); f32 is there for exact checks. Norm weights and the MoE router always stay
f32, as llama.cpp's own converter keeps them. Then, with llama.cpp / Ollama:

    llama-cli -m model-q8_0.gguf -cnv -p "You are a helpful assistant."     # chat with the stored ChatML template
    llama-server -m model-q8_0.gguf --port 8080                              # OpenAI-compatible server
    llama-perplexity -m model-q8_0.gguf -f text.txt --override-kv tokenizer.ggml.add_bos_token=bool:true
    ollama create tiny-llm -f Modelfile && ollama run tiny-llm               # Modelfile: see README

Dense models follow llama.cpp's convert_hf_to_gguf.py for LlamaForCausalLM: the llama.* hyper-parameters, tensor
names from gguf's own name map, q_proj/k_proj rows permuted from Hugging Face's rotate-half RoPE layout (pairs i and
i + d/2) to GGML's interleaved one (pairs 2i and 2i + 1).

MoE models are written as llama.cpp's "bailingmoe" architecture, because its graph is our MoEFeedForward term for
term: softmax router, top-k, the top-k weights renormalised when expert_weights_norm is set (ours: when k > 1),
times expert_weights_scale (1), plus the shared experts' SwiGLU added ungated, with llama attention (same q/k
permutation). "qwen2moe", where the Hugging Face export goes, cannot carry our function in llama.cpp: its graph never
renormalises the top-k weights (norm_topk_prob is not read), and it multiplies the shared expert by a bias-free
gate computed as silu(g)/g, which is NaN for the zero gate that is exact in transformers and a function of x for any
other (no weights make it the constant our always-on shared expert needs).

The tokenizer is a "gpt2" byte-level BPE (tokens, merges, special tokens as CONTROL), with pre-tokenizer "qwen2":
llama.cpp cannot take a custom split regex, and qwen2's differs from ours only in one place (ours keeps a space
before a digit with the digit: " 5" is one piece for us, " " + "5" for qwen2). bos is <|endoftext|> (the document
boundary eval_ppl.py and raw prompts start with) and add_bos_token is false, so chat prompts get exactly the ids of
our chat template; override it to true, as above, to score or continue raw text as eval_ppl.py does.
"""
import argparse
import contextlib
import json
import os

import gguf
import numpy as np
import torch

from checkpoint import check_tokenizer, load_model, unwrap
from cli import ArgumentParser, UserError, run_main
from dataset import load_tokenizer
from export_hf import rope_parameters, special_token_ids
from train_utils import ROOT

OUTTYPES = ("f32", "f16", "q8_0")
PRE_TOKENIZER = "qwen2"
ARCHS = {False: gguf.MODEL_ARCH.LLAMA, True: gguf.MODEL_ARCH.BAILINGMOE}  # by config.use_moe
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def permute_rope_rows(weight, n_heads):
    """(n_heads·hd, dim) q/k rows from rotate-half order (pairs i, i+hd/2) to interleaved (pairs 2i, 2i+1)."""
    rows, dim = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, dim).swapaxes(1, 2).reshape(rows, dim)


def shared_expert_weight(mlp, name):
    """The shared experts side by side as one SwiGLU of n·hidden units (a sum of SwiGLUs is one wider SwiGLU).
    bailingmoe always runs a shared expert, so with none we write one of zeros: silu(0)·0 adds exactly nothing."""
    weights = [getattr(s, name).weight for s in mlp.shared_experts]
    if weights:
        return torch.cat(weights, dim=1 if name == "down_proj" else 0)
    return torch.zeros_like(getattr(mlp.experts[0], name).weight)


def moe_layer_state(mlp, prefix):
    """One MoEFeedForward under the Hugging Face MoE names gguf's map knows: router, experts stacked (E, out, in)."""
    state = {prefix + "gate.weight": mlp.router.weight}
    for name in EXPERT_WEIGHTS:
        state[f"{prefix}experts.{name}.weight"] = torch.stack([getattr(e, name).weight for e in mlp.experts])
        state[f"{prefix}shared_experts.{name}.weight"] = shared_expert_weight(mlp, name)
    return state


def export_state(model):
    """Our weights under "model."-prefixed Hugging Face names. A tied lm_head is left out for llama (llama.cpp reuses
    token_embd) but written for bailingmoe, which requires output.weight."""
    moe = model.config.use_moe
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if moe or not model.config.tie_word_embeddings:
                state[name] = tensor
        elif not (moe and ".mlp." in name):
            state["model." + name] = tensor
    if moe:
        for i, layer in enumerate(model.layers):
            state.update(moe_layer_state(layer.mlp, f"model.layers.{i}.mlp."))
    return state


def gguf_tensors(model):
    """(gguf name, float32 numpy array) for every tensor the file holds."""
    config = model.config
    names = gguf.get_tensor_name_map(ARCHS[config.use_moe], config.n_layers)
    for name, tensor in export_state(model).items():
        array = tensor.detach().float().cpu().numpy()
        if name.endswith("q_proj.weight"):
            array = permute_rope_rows(array, config.n_heads)
        elif name.endswith("k_proj.weight"):
            array = permute_rope_rows(array, config.n_kv_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for parameter {name!r}")
        yield gguf_name, array


def encode_tensor(name, array, outtype):
    """(data, raw_dtype) for GGUFWriter.add_tensor: vectors and the router f32, the rest as outtype."""
    if array.ndim == 1 or outtype == "f32" or name.endswith("ffn_gate_inp.weight"):
        return array.astype(np.float32), None
    if outtype == "f16":
        return array.astype(np.float16), None
    if array.shape[-1] % 32:
        raise ValueError(f"q8_0 needs rows that are a multiple of 32 values, but {name} has shape {array.shape}; "
                         f"use --outtype f16")
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def add_hyperparameters(writer, config, outtype):
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    add_rope(writer, config)
    if config.use_moe:
        add_moe(writer, config)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_rope(writer, config):
    rope = rope_parameters(config)  # "ntk" is already plain RoPE with a stretched base here
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(rope["factor"])
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", 32))
        writer.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", 1))


def add_moe(writer, config):
    """bailingmoe's MoE keys: every layer MoE, top-k renormalised exactly when ours is (k > 1), scale 1."""
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.hidden_dim)
    writer.add_expert_shared_count(max(config.n_shared_experts, 1))  # see shared_expert_weight
    writer.add_expert_weights_norm(config.num_experts_per_tok > 1)
    writer.add_expert_weights_scale(1.0)
    writer.add_leading_dense_block_count(0)


def add_tokenizer(writer, tokenizer_dir, vocab_size):
    """Byte-level BPE as llama.cpp's "gpt2" model: token strings, merges, types, special ids, chat template."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model only "
                         f"vocab_size={vocab_size}: they do not belong together")
    merges = token_merges(tokenizer_dir)
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    padding = range(len(tokens), vocab_size)  # embedding rows no token uses
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in padding])
    writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(padding))
    writer.add_token_merges(merges)
    ids = special_token_ids(tokenizer)
    writer.add_bos_token_id(ids["bos_token_id"])
    writer.add_eos_token_id(ids["eos_token_id"])
    writer.add_pad_token_id(ids["pad_token_id"])
    writer.add_add_bos_token(False)  # see the module docstring
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def token_merges(tokenizer_dir):
    """The BPE merges of tokenizer.json as "left right" strings (the file may store them as pairs)."""
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def export_gguf(model, tokenizer_dir, out_path, outtype="f16", name="tiny-llm"):
    """Write the GGUF file (see the module docstring) through a temporary file, so a failed export leaves no
    half-written .gguf behind; returns out_path."""
    model = unwrap(model)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} must be one of {OUTTYPES}")
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        with contextlib.closing(gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCHS[model.config.use_moe]])) as writer:
            write_gguf(writer, model, tokenizer_dir, outtype, name)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


def write_gguf(writer, model, tokenizer_dir, outtype, name):
    writer.add_name(name)
    add_hyperparameters(writer, model.config, outtype)
    add_tokenizer(writer, tokenizer_dir, model.config.vocab_size)
    with torch.no_grad():
        for gguf_name, array in gguf_tensors(model):
            data, raw_dtype = encode_tensor(gguf_name, array, outtype)
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()


def check_out_path(path, model_path):
    """--out must name a file in an existing folder (not a folder, not the checkpoint itself)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.realpath(path) == os.path.realpath(model_path):
        raise UserError(f"--out {path} is the checkpoint itself; give a new .gguf file name")
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a folder; give the .gguf file to write, e.g. "
                        f"{os.path.join(path, 'model.gguf')}")
    if not os.path.isdir(folder):
        raise UserError(f"--out {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--out {path}: folder {folder} is not writable")


def non_empty(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", required=True,
                        help="a *_final.pth, latest_checkpoint.pth or *_final/ safetensors folder")
    parser.add_argument("--out", required=True, help="the .gguf file to write (replaced if it exists)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16", help="matrix storage type (norms stay f32)")
    parser.add_argument("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"),
                        help="the tokenizer folder the model was trained with")
    parser.add_argument("--name", type=non_empty, default="tiny-llm", help="general.name stored in the file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_out_path(args.out, args.model_path)
    model, meta = load_model(args.model_path)
    check_tokenizer(meta, args.tokenizer_path, args.model_path)
    try:
        export_gguf(model.eval(), args.tokenizer_path, args.out, args.outtype, args.name)
    except ValueError as e:
        raise UserError(f"{args.model_path}: {e}") from None
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot write it ({e.strerror or e})") from None
    size = os.path.getsize(args.out) / 2 ** 20
    arch = gguf.MODEL_ARCH_NAMES[ARCHS[model.config.use_moe]]
    print(f"wrote {os.path.abspath(args.out)} ({arch}, {args.outtype}, {size:.1f} MiB); "
          f"try: llama-cli -m {args.out} -cnv")


if __name__ == "__main__":
    run_main(main)
