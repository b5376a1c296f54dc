"""Hugging Face export: same logits and greedy tokens in transformers, same chat ids; GGUF: metadata, tokenizer and
weights read back with gguf's own reader, q/k rows in GGML's RoPE layout, MoE refused."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, trained_tiny_model

from Config import LLMConfig
from dataset import encode_chat
from model import Transformer
from train_utils import save_final

VOCAB = 512  # the conftest tokenizer's size
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def tiny_config(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=128, rope_theta=5e4)
    return LLMConfig(**{**base, **kw})


def trained_model(tokenizer, steps=80, **kw):
    return trained_tiny_model(tokenizer, tiny_config(**kw), steps)


def export_and_load(model, tokenizer_dir, out_dir, dtype="float32"):
    from transformers import AutoModelForCausalLM

    from export_hf import export_hf
    export_hf(model, tokenizer_dir, str(out_dir), dtype)
    return AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()


def hf_greedy(hf, ids, n):
    """transformers' greedy decoding of exactly n tokens (EOS stopping off, as ours without stop_ids)."""
    from transformers import GenerationConfig
    config = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    return hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[:, ids.shape[1]:]


# ------------------------------------------------------------------------------------------- Hugging Face folder

@pytest.mark.parametrize("kw", [dict(), dict(rope_scaling=YARN, tie_word_embeddings=False, n_kv_heads=1)])
def test_hf_export_has_our_logits_and_greedy_tokens(tokenizer, tokenizer_dir, tmp_path, kw):
    model = trained_model(tokenizer, **kw)
    hf = export_and_load(model, tokenizer_dir, tmp_path)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() < 1e-4
    prompt = torch.tensor([tokenizer("The model learns to read")["input_ids"]])
    ours = model.generate(prompt, 20, temperature=0)
    assert len(set(ours[0].tolist())) > 2, "the test model should not be degenerate"
    assert torch.equal(hf_greedy(hf, prompt, 20), ours)


def test_hf_export_config_tokenizer_and_chat_template(tokenizer, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer
    model = trained_model(tokenizer, steps=1, rope_scaling=YARN)
    export_and_load(model, tokenizer_dir, tmp_path, dtype="bfloat16")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert config["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 5e4, "factor": 4.0,
                                         "original_max_position_embeddings": 32}
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 2
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|pad|>")}
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|pad|>"])
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    exported = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "猫 and dogs?"},
                {"role": "assistant", "content": "<think>stars</think><answer>rivers</answer>"},
                {"role": "user", "content": "More."}]
    ours, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
    assert exported.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == ours.tolist()


def test_ntk_rope_exports_as_a_stretched_base(tokenizer, tokenizer_dir, tmp_path):
    model = trained_model(tokenizer, steps=1, rope_scaling={"type": "ntk", "factor": 4.0})
    hf = export_and_load(model, tokenizer_dir, tmp_path)
    d = model.config.head_dim
    assert hf.config.rope_parameters["rope_type"] == "default"
    assert hf.config.rope_parameters["rope_theta"] == pytest.approx(5e4 * 4.0 ** (d / (d - 2)))
    ids = torch.randint(0, VOCAB, (1, 120))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("kw", [dict(num_experts_per_tok=2, n_shared_experts=1),
                                dict(num_experts_per_tok=1, n_shared_experts=2)])
def test_moe_exports_to_qwen2_moe_with_our_logits(tokenizer, tokenizer_dir, tmp_path, kw):
    """k=1 checks the raw top-1 probability, two shared experts check their concatenation and the 0.5 gate."""
    model = trained_model(tokenizer, steps=10, use_moe=True, n_routed_experts=4, **kw)
    hf = export_and_load(model, tokenizer_dir, tmp_path)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 64))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() < 1e-4
    prompt = torch.tensor([tokenizer("Cats and dogs")["input_ids"]])
    assert torch.equal(hf_greedy(hf, prompt, 12), model.generate(prompt, 12, temperature=0))


def test_export_hf_cli_from_a_saved_checkpoint(tokenizer, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import export_hf
    model = trained_model(tokenizer, steps=1)
    path = save_final(model, model.config, str(tmp_path), "sft", tokenizer_dir)
    out = tmp_path / "hf"
    export_hf.main(["--model_path", path, "--out_dir", str(out), "--tokenizer_path", tokenizer_dir])
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(hf.model.embed_tokens.weight, model.embed_tokens.weight)


# ------------------------------------------------------------------------------------------------------------ GGUF

def read_gguf(path):
    import gguf
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def unpermute(array, n_heads):
    """Inverse of export_gguf.permute_rope_rows."""
    rows, dim = array.shape
    return array.reshape(n_heads, rows // n_heads // 2, 2, dim).swapaxes(1, 2).reshape(rows, dim)


def expected_gguf_weights(model):
    """Our weights by GGUF name, q/k in our (rotate-half) layout."""
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    out = {}
    for name, tensor in model.state_dict().items():
        stem = name.removesuffix(".weight")
        if stem.startswith("layers."):
            _, i, rest = stem.split(".", 2)
            gguf_name = f"blk.{i}.{parts[rest]}"
        else:
            gguf_name = names[stem]
        out[gguf_name + ".weight"] = tensor.float().numpy()
    if model.config.tie_word_embeddings:
        del out["output.weight"]
    return out


def gguf_weight(tensor, config):
    """A tensor read back as float32 in our layout (dequantised, q/k rows un-permuted)."""
    import gguf
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
    if ".attn_q." in tensor.name:
        return unpermute(array, config.n_heads)
    if ".attn_k." in tensor.name:
        return unpermute(array, config.n_kv_heads)
    return array


@pytest.mark.parametrize("outtype,kw", [("f16", dict()), ("q8_0", dict(tie_word_embeddings=False, rope_scaling=YARN))])
def test_gguf_metadata_and_weights_read_back(tokenizer, tokenizer_dir, tmp_path, outtype, kw):
    import gguf

    from export_gguf import export_gguf
    model = trained_model(tokenizer, steps=5, **kw)
    path = export_gguf(model, tokenizer_dir, str(tmp_path / "m.gguf"), outtype)
    fields, tensors = read_gguf(path)
    c = model.config
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.context_length"], fields["llama.embedding_length"], fields["llama.block_count"],
            fields["llama.feed_forward_length"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.rope.dimension_count"]) == \
        (c.max_seq_len, c.dim, c.n_layers, c.hidden_dim, c.n_heads, c.n_kv_heads, c.head_dim)
    assert fields["llama.rope.freq_base"] == pytest.approx(5e4)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    if c.rope_scaling:
        assert (fields["llama.rope.scaling.type"], fields["llama.rope.scaling.factor"],
                fields["llama.rope.scaling.original_context_length"]) == ("yarn", 4.0, 32)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    assert fields["general.file_type"] == file_type
    expected = expected_gguf_weights(model)
    assert set(tensors) == set(expected)
    matrix_type = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    for name, want in expected.items():
        t = tensors[name]
        assert tuple(reversed(t.shape.tolist())) == want.shape, name
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if want.ndim == 1 else matrix_type), name
        got = gguf_weight(t, c)
        if want.ndim == 1:  # norms stay f32
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif outtype == "f16":
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
        else:  # q8_0: blocks of 32 share one fp16 scale max|w|/127: off by half a step + the scale's rounding
            step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert (np.abs(got - want).reshape(-1, 32) <= step * 0.57).all(), name


def test_gguf_tokenizer(tokenizer, tokenizer_dir, tmp_path):
    import gguf

    from export_gguf import export_gguf
    model = trained_model(tokenizer, steps=1, vocab_size=VOCAB + 3)  # 3 embedding rows no token uses
    fields, _ = read_gguf(export_gguf(model, tokenizer_dir, str(tmp_path / "m.gguf"), "f16"))
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB + 3 and fields["llama.vocab_size"] == VOCAB + 3
    assert tokens[:VOCAB] == tokenizer.convert_ids_to_tokens(list(range(VOCAB)))
    specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>",
                "<|pad|>"}
    assert {tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == specials
    assert types[VOCAB:] == [gguf.TokenType.UNUSED] * 3
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[fields["tokenizer.ggml.bos_token_id"]] == "<|endoftext|>"
    assert tokens[fields["tokenizer.ggml.padding_token_id"]] == "<|pad|>"
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template


def ggml_rope(x, theta):
    """GGML's rope for the llama architecture (mode 0): rotates adjacent pairs (2i, 2i+1). x: (T, d)."""
    T, d = x.shape
    angles = np.arange(T)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None]  # (T, d/2)
    even, odd = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = even * np.cos(angles) - odd * np.sin(angles)
    out[:, 1::2] = even * np.sin(angles) + odd * np.cos(angles)
    return out


def test_permuted_q_k_under_ggml_rope_give_our_attention_scores():
    """Why the permutation: llama.cpp's interleaved RoPE on the permuted rows must score like our rotate-half."""
    from export_gguf import permute_rope_rows
    from model import apply_rope
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_kv_heads=4, rope_theta=1e4))
    attn, hd, T = model.layers[0].self_attn, model.config.head_dim, 16
    x = torch.randn(T, model.config.dim)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    for head in range(model.config.n_heads):
        rows = slice(head * hd, (head + 1) * hd)
        q = apply_rope((x @ attn.q_proj.weight[rows].T)[None, None], cos, sin)[0, 0]
        k = apply_rope((x @ attn.k_proj.weight[rows].T)[None, None], cos, sin)[0, 0]
        wq = permute_rope_rows(attn.q_proj.weight.detach().numpy(), model.config.n_heads)[rows]
        wk = permute_rope_rows(attn.k_proj.weight.detach().numpy(), model.config.n_heads)[rows]
        qg, kg = ggml_rope(x.numpy() @ wq.T, 1e4), ggml_rope(x.numpy() @ wk.T, 1e4)
        np.testing.assert_allclose(qg @ kg.T, (q @ k.T).detach().numpy(), atol=1e-5)


def test_gguf_refuses_moe_and_stretches_the_ntk_base(tokenizer, tokenizer_dir, tmp_path):
    from export_gguf import export_gguf
    moe = trained_model(tokenizer, steps=1, use_moe=True)
    with pytest.raises(ValueError, match="dense models only.*export_hf.py.*Qwen2MoeForCausalLM"):
        export_gguf(moe, tokenizer_dir, str(tmp_path / "moe.gguf"))
    ntk = trained_model(tokenizer, steps=1, rope_scaling={"type": "ntk", "factor": 4.0})
    fields, _ = read_gguf(export_gguf(ntk, tokenizer_dir, str(tmp_path / "ntk.gguf")))
    d = ntk.config.head_dim
    assert fields["llama.rope.freq_base"] == pytest.approx(5e4 * 4.0 ** (d / (d - 2)), rel=1e-6)
    assert "llama.rope.scaling.type" not in fields


def test_export_gguf_cli(tokenizer, tokenizer_dir, tmp_path):
    import export_gguf
    model = trained_model(tokenizer, steps=1)
    path = save_final(model, model.config, str(tmp_path), "sft", tokenizer_dir)
    out = tmp_path / "m.gguf"
    export_gguf.main(["--model_path", path, "--out", str(out), "--outtype", "q8_0", "--tokenizer_path", tokenizer_dir])
    fields, tensors = read_gguf(out)
    assert fields["general.name"] == "tiny-llm" and len(tensors) == 2 + 9 * model.config.n_layers


def test_decode_benchmark_runs_both_implementations(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_decode", os.path.join(ROOT, "bench", "bench_decode.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--preset", "tiny", "--batch_sizes", "1", "2", "--prompt_len", "8", "--new_tokens", "4", "--runs", "1"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")
            or line.startswith("| 2 |")]
    assert [(r[0], r[1]) for r in rows] == [("| 1", "ours"), ("| 1", "transformers"), ("| 2", "ours"),
                                            ("| 2", "transformers")]
    assert rows[0][-1] == "True |" and rows[2][-1] == "True |"  # greedy tokens identical
