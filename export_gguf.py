"""Export a dense checkpoint to one GGUF file (llama architecture) for llama.cpp and Ollama.

    python export_gguf.py --model_path results/sft_final.pth --out model-q8_0.gguf --outtype q8_0 \
        [--tokenizer_path tokenizer]

--outtype f16 (half the fp32 size, lossless for bf16-trained weights in practice) or q8_0 (llama.cpp's 8-bit blocks
of 32 with one fp16 scale, ~quarter size); f32 is there for exact checks. Norm weights always stay f32, as
llama.cpp's own converter keeps them. Then, with llama.cpp / Ollama:

    llama-cli -m model-q8_0.gguf -cnv -p "You are a helpful assistant."     # chat with the stored ChatML template
    llama-server -m model-q8_0.gguf --port 8080                              # OpenAI-compatible server
    ollama create tiny-llm -f Modelfile && ollama run tiny-llm               # Modelfile: see README

What is written follows llama.cpp's convert_hf_to_gguf.py for LlamaForCausalLM: the llama.* hyper-parameters,
tensor names from gguf's own name map, and q_proj/k_proj rows permuted from Hugging Face's rotate-half RoPE layout
(pairs i and i + d/2) to GGML's interleaved one (pairs 2i and 2i + 1). The tokenizer is a "gpt2" byte-level BPE
(tokens, merges, special tokens as CONTROL), with pre-tokenizer "qwen2": llama.cpp cannot take a custom split
regex, and qwen2's differs from ours only in one place (ours keeps a space before a digit with the digit: " 5" is
one piece for us, " " + "5" for qwen2). MoE checkpoints are refused (see check_dense).
"""
import argparse
import json
import os

import numpy as np
import torch

from export_hf import rope_parameters, special_token_ids
from train_utils import ROOT, check_tokenizer, load_model, unwrap

OUTTYPES = ("f32", "f16", "q8_0")
PRE_TOKENIZER = "qwen2"


def check_dense(config):
    if config.use_moe:
        raise ValueError("GGUF export handles dense models only (llama architecture). For this MoE checkpoint run "
                         "export_hf.py (it writes Qwen2MoeForCausalLM, which matches our routing exactly), then "
                         "llama.cpp's convert_hf_to_gguf.py on that folder (its qwen2moe architecture)")


def permute_rope_rows(weight, n_heads):
    """(n_heads·hd, dim) q/k rows from rotate-half order (pairs i, i+hd/2) to interleaved (pairs 2i, 2i+1)."""
    rows, dim = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, dim).swapaxes(1, 2).reshape(rows, dim)


def gguf_tensors(model):
    """(gguf name, float32 numpy array) for every weight; a tied lm_head is left out (llama.cpp reuses token_embd)."""
    import gguf
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    for name, tensor in state.items():
        array = tensor.detach().float().cpu().numpy()
        if name.endswith("q_proj.weight"):
            array = permute_rope_rows(array, config.n_heads)
        elif name.endswith("k_proj.weight"):
            array = permute_rope_rows(array, config.n_kv_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for parameter {name!r}")
        yield gguf_name, array


def encode_tensor(array, outtype):
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors f32, matrices as outtype (q8_0 via gguf.quants)."""
    import gguf
    if array.ndim == 1 or outtype == "f32":
        return array.astype(np.float32), None
    if outtype == "f16":
        return array.astype(np.float16), None
    if array.shape[-1] % 32:
        raise ValueError(f"q8_0 needs rows that are a multiple of 32 values, got a tensor of shape {array.shape}")
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def add_hyperparameters(writer, config, outtype):
    import gguf
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    rope = rope_parameters(config)  # "ntk" is already plain RoPE with a stretched base here
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(rope["factor"])
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", 32))
        writer.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", 1))
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer(writer, tokenizer_dir, vocab_size):
    """Byte-level BPE as llama.cpp's "gpt2" model: token strings, merges, types, special ids, chat template."""
    import gguf
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model only "
                         f"vocab_size={vocab_size}: they do not belong together")
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    padding = range(len(tokens), vocab_size)  # embedding rows no token uses
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in padding])
    writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(padding))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    ids = special_token_ids(tokenizer)
    writer.add_bos_token_id(ids["bos_token_id"])
    writer.add_eos_token_id(ids["eos_token_id"])
    writer.add_pad_token_id(ids["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def export_gguf(model, tokenizer_dir, out_path, outtype="f16", name="tiny-llm"):
    """Write the GGUF file (see the module docstring); returns out_path."""
    import gguf
    model = unwrap(model)
    check_dense(model.config)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} must be one of {OUTTYPES}")
    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    add_hyperparameters(writer, model.config, outtype)
    add_tokenizer(writer, tokenizer_dir, model.config.vocab_size)
    with torch.no_grad():
        for gguf_name, array in gguf_tensors(model):
            data, raw_dtype = encode_tensor(array, outtype)
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Export a dense checkpoint to GGUF for llama.cpp / Ollama.")
    parser.add_argument("--model_path", required=True,
                        help="a *_final.pth, latest_checkpoint.pth or *_final/ safetensors folder")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16", help="matrix storage type (norms stay f32)")
    parser.add_argument("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"),
                        help="the tokenizer folder the model was trained with")
    parser.add_argument("--name", default="tiny-llm", help="general.name stored in the file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, meta = load_model(args.model_path)
    check_tokenizer(meta, args.tokenizer_path, args.model_path)
    try:
        export_gguf(model.eval(), args.tokenizer_path, args.out, args.outtype, args.name)
    except ValueError as e:
        raise SystemExit(f"export_gguf.py: error: {args.model_path}: {e}") from None
    size = os.path.getsize(args.out) / 2 ** 20
    print(f"wrote {os.path.abspath(args.out)} ({args.outtype}, {size:.1f} MiB); try: llama-cli -m {args.out} -cnv")


if __name__ == "__main__":
    main()
