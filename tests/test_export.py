"""Hugging Face export: same logits and greedy tokens in transformers, same chat ids, raw text starting from the bos
<|endoftext|> as eval_ppl does, our aux-loss strength; GGUF: metadata, tokenizer and weights read back with gguf's own
reader, and llama.cpp's graphs (llama, bailingmoe) recomputed from those tensors give our logits; every bad flag is
one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, trained_tiny_model, write_jsonl

from checkpoint import save_final
from cli import run_main
from Config import LLMConfig
from dataset import encode_chat
from inference import encode_raw
from model import Transformer
from train_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

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
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"person": "安娜", "attribute": "age"}}}
    tools = [{"type": "function", "function": {"name": "lookup", "description": "A fact about a person",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "猫 and dogs?"},
                {"role": "assistant", "content": "<think>stars</think><answer>rivers</answer>"},
                {"role": "user", "content": "How old is 安娜?"},
                {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "content": "31"},
                {"role": "assistant", "content": "31."}, {"role": "user", "content": "More."}]
    for kwargs in ({}, {"tools": tools}, {"tools": tools, "enable_thinking": False}, {"enable_thinking": True}):
        ours, _ = encode_chat(tokenizer, messages, add_generation_prompt=True, **kwargs)
        assert exported.apply_chat_template(messages, add_generation_prompt=True, return_dict=False,
                                            **kwargs) == ours.tolist(), kwargs


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


def test_hf_tokenizer_starts_raw_text_with_endoftext_and_scores_as_eval_ppl(tokenizer, tokenizer_dir, tmp_path):
    """tokenizer(text), pipeline() and lm-eval's document prefix (the bos) give eval_ppl's [<|endoftext|>] + text, so
    transformers' loss over the text is eval_ppl's."""
    from transformers import AutoTokenizer, pipeline

    from eval_ppl import evaluate_file
    model = trained_model(tokenizer, steps=20)
    hf = export_and_load(model, tokenizer_dir, tmp_path / "hf")
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (exported.bos_token, exported.bos_token_id) == ("<|endoftext|>", endoftext)
    text = "Cats and dogs read 12 small stories. 猫和狗"
    ids = exported(text)["input_ids"]
    assert ids == encode_raw(tokenizer, text)
    assert pipeline("text-generation", model=hf, tokenizer=exported).preprocess(text)["input_ids"][0].tolist() == ids
    data = write_jsonl(tmp_path / "eval.jsonl", [{"text": text}])
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # predicts ids[1:] from the bos on
    assert loss == pytest.approx(evaluate_file(model, tokenizer, data)["loss"], abs=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_export_balances_experts_with_our_aux_loss(tokenizer, tokenizer_dir, tmp_path, top_k):
    """Fine-tuning the export with output_router_logits=True adds the same balance loss as our training (one MoE
    layer: transformers pools the layers where we average them)."""
    model = trained_model(tokenizer, steps=3, n_layers=1, use_moe=True, num_experts_per_tok=top_k,
                          aux_loss_alpha=0.05)
    hf = export_and_load(model, tokenizer_dir, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["router_aux_loss_coef"] == pytest.approx(0.05 / top_k)
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.train()(ids).aux_loss.item()
        theirs = hf(ids, output_router_logits=True).aux_loss.item() * hf.config.router_aux_loss_coef
    assert ours > 0.05 * 0.9 and theirs == pytest.approx(ours, rel=1e-5)


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
        else:
            assert_q8_0_close(got, want, name)


def assert_q8_0_close(got, want, name):
    """q8_0: blocks of 32 share one fp16 scale max|w|/127, so a value is off by half a step + the scale's rounding."""
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
    assert {tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == set(SPECIAL_TOKENS)
    assert types[VOCAB:] == [gguf.TokenType.UNUSED] * 3
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[fields["tokenizer.ggml.bos_token_id"]] == "<|endoftext|>"
    assert tokens[fields["tokenizer.ggml.padding_token_id"]] == "<|pad|>"
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template == CHAT_TEMPLATE  # tools and thinking too


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


def test_gguf_stretches_the_ntk_base(tokenizer, tokenizer_dir, tmp_path):
    from export_gguf import export_gguf
    ntk = trained_model(tokenizer, steps=1, rope_scaling={"type": "ntk", "factor": 4.0})
    fields, _ = read_gguf(export_gguf(ntk, tokenizer_dir, str(tmp_path / "ntk.gguf")))
    d = ntk.config.head_dim
    assert fields["llama.rope.freq_base"] == pytest.approx(5e4 * 4.0 ** (d / (d - 2)), rel=1e-6)
    assert "llama.rope.scaling.type" not in fields


def moe_expected(mlp):
    """Independent of export_gguf: bailingmoe's router, stacked experts, and the shared experts side by side (None
    when there are none)."""
    def stack(name):
        return torch.stack([getattr(e, name).weight for e in mlp.experts]).detach().numpy()

    def joined(name):
        weights = [getattr(s, name).weight for s in mlp.shared_experts]
        return torch.cat(weights, dim=1 if name == "down_proj" else 0).detach().numpy() if weights else None
    return {"ffn_gate_inp": mlp.router.weight.detach().numpy(), "ffn_gate_exps": stack("gate_proj"),
            "ffn_up_exps": stack("up_proj"), "ffn_down_exps": stack("down_proj"),
            "ffn_gate_shexp": joined("gate_proj"), "ffn_up_shexp": joined("up_proj"),
            "ffn_down_shexp": joined("down_proj")}


@pytest.mark.parametrize("shared", [0, 2])
def test_gguf_moe_is_bailingmoe_with_our_experts(tokenizer, tokenizer_dir, tmp_path, shared):
    import gguf

    from export_gguf import export_gguf
    model = trained_model(tokenizer, steps=2, use_moe=True, n_routed_experts=4, num_experts_per_tok=2,
                          n_shared_experts=shared)
    c = model.config
    fields, tensors = read_gguf(export_gguf(model, tokenizer_dir, str(tmp_path / "m.gguf"), "q8_0"))
    assert fields["general.architecture"] == "bailingmoe"
    keys = ("expert_count", "expert_used_count", "expert_feed_forward_length", "expert_shared_count",
            "expert_weights_norm", "expert_weights_scale", "leading_dense_block_count", "block_count")
    assert [fields["bailingmoe." + k] for k in keys] == [4, 2, c.hidden_dim, max(shared, 1), True, 1.0, 0, c.n_layers]
    assert fields["bailingmoe.attention.head_count_kv"] == c.n_kv_heads
    assert_q8_0_close(gguf_weight(tensors["output.weight"], c), model.embed_tokens.weight.detach().numpy(), "output")
    for i, layer in enumerate(model.layers):
        for name, want in moe_expected(layer.mlp).items():
            t = tensors[f"blk.{i}.{name}.weight"]
            got = gguf_weight(t, c)
            if name == "ffn_gate_inp":  # routing decisions stay exact, as llama.cpp's converter keeps them
                assert t.tensor_type == gguf.GGMLQuantizationType.F32
                np.testing.assert_array_equal(got, want)
            elif want is None:  # no shared experts: one of zeros, which adds exactly nothing
                shape = (c.dim, c.hidden_dim) if name == "ffn_down_shexp" else (c.hidden_dim, c.dim)
                assert got.shape == shape and not got.any(), name
            else:
                assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and got.shape == want.shape, name
                assert_q8_0_close(got, want, name)


# ------------------------------------------------------------ llama.cpp's graphs, recomputed from the file's tensors

def rms_norm(x, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def swiglu(x, gate, up, down):
    g = x @ gate.T
    return (g / (1 + np.exp(-g)) * (x @ up.T)) @ down.T


def ggml_attention(x, w, n_head, n_kv, base):
    """llama.cpp's attention: rope mode 0 (adjacent pairs) on the stored q/k, GQA by head // (n_head / n_kv)."""
    T, hd = x.shape[0], w("attn_q").shape[0] // n_head
    q = (x @ w("attn_q").T).reshape(T, n_head, hd)
    k = (x @ w("attn_k").T).reshape(T, n_kv, hd)
    v = (x @ w("attn_v").T).reshape(T, n_kv, hd)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    heads = []
    for h in range(n_head):
        kv = h // (n_head // n_kv)
        scores = ggml_rope(q[:, h], base) @ ggml_rope(k[:, kv], base).T / np.sqrt(hd) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append(probs / probs.sum(-1, keepdims=True) @ v[:, kv])
    return np.concatenate(heads, axis=1) @ w("attn_output").T


def ggml_moe(x, w, kv):
    """llama.cpp's build_moe_ffn with softmax gating, then bailingmoe's shared expert added ungated."""
    logits = x @ w("ffn_gate_inp").T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :kv("expert_used_count")]
    weights = np.take_along_axis(probs, top, -1)
    if kv("expert_weights_norm"):
        weights /= weights.sum(-1, keepdims=True)
    weights *= kv("expert_weights_scale")
    out = swiglu(x, w("ffn_gate_shexp"), w("ffn_up_shexp"), w("ffn_down_shexp"))
    for t in range(x.shape[0]):
        for e, weight in zip(top[t], weights[t]):
            out[t] += weight * swiglu(x[t], w("ffn_gate_exps")[e], w("ffn_up_exps")[e], w("ffn_down_exps")[e])
    return out


def ggml_logits(path, ids):
    """The logits llama.cpp computes for ids from a GGUF file (llama or bailingmoe graph), in float64 numpy."""
    import gguf
    fields, tensors = read_gguf(path)
    arch = fields["general.architecture"]

    def kv(key):
        return fields[f"{arch}.{key}"]
    weights = {name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
               .astype(np.float64) for name, t in tensors.items()}
    eps, base = kv("attention.layer_norm_rms_epsilon"), kv("rope.freq_base")
    x = weights["token_embd.weight"][ids]
    for i in range(kv("block_count")):
        def w(name):
            return weights[f"blk.{i}.{name}.weight"]
        x = x + ggml_attention(rms_norm(x, eps) * w("attn_norm"), w, kv("attention.head_count"),
                               kv("attention.head_count_kv"), base)
        h = rms_norm(x, eps) * w("ffn_norm")
        x = x + (ggml_moe(h, w, kv) if arch == "bailingmoe" else swiglu(h, w("ffn_gate"), w("ffn_up"), w("ffn_down")))
    head = weights.get("output.weight", weights["token_embd.weight"])
    return (rms_norm(x, eps) * weights["output_norm.weight"]) @ head.T


@pytest.mark.parametrize("kw", [dict(), dict(use_moe=True, num_experts_per_tok=2, n_shared_experts=1),
                                dict(use_moe=True, num_experts_per_tok=1, n_shared_experts=2),
                                dict(use_moe=True, num_experts_per_tok=2, n_shared_experts=0,
                                     tie_word_embeddings=False)])
def test_gguf_under_llama_cpp_graph_gives_our_logits(tokenizer, tokenizer_dir, tmp_path, kw):
    """Dense checks the reference itself; MoE checks k=2 renormalised, k=1 raw top-1, two shared experts joined, and
    none (the zero shared expert)."""
    from export_gguf import export_gguf
    model = trained_model(tokenizer, steps=10, n_routed_experts=4, **kw)
    path = export_gguf(model, tokenizer_dir, str(tmp_path / "m.gguf"), "f32")
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids[None]).logits[0].double().numpy()
    np.testing.assert_allclose(ggml_logits(path, ids.numpy()), ours, atol=1e-4, rtol=0)


def test_export_gguf_cli(tokenizer, tokenizer_dir, tmp_path):
    import export_gguf
    model = trained_model(tokenizer, steps=1)
    path = save_final(model, model.config, str(tmp_path), "sft", tokenizer_dir)
    out = tmp_path / "m.gguf"
    export_gguf.main(["--model_path", path, "--out", str(out), "--outtype", "q8_0", "--tokenizer_path", tokenizer_dir])
    fields, tensors = read_gguf(out)
    assert fields["general.name"] == "tiny-llm" and len(tensors) == 2 + 9 * model.config.n_layers


# --------------------------------------------------------------------------------------------------- bad input

def saved_checkpoint(tokenizer, tokenizer_dir, tmp_path):
    model = trained_model(tokenizer, steps=1)
    return save_final(model, model.config, str(tmp_path), "sft", tokenizer_dir)


def error_line(capsys, main, argv):
    """The last stderr line of `python script.py argv` run in-process (run_main): exit status 2. A UserError is that
    one line alone; argparse puts its usage above it."""
    with pytest.raises(SystemExit) as stop:
        run_main(main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2, lines
    assert len(lines) == 1 or lines[0].startswith("usage:"), lines
    return lines[-1]


@pytest.mark.parametrize("case", ["out_is_a_folder", "out_folder_missing", "out_is_the_checkpoint", "empty_name"])
def test_export_gguf_bad_input_is_one_line(tokenizer, tokenizer_dir, tmp_path, capsys, case):
    import export_gguf
    ckpt = saved_checkpoint(tokenizer, tokenizer_dir, tmp_path)
    args = {"--model_path": ckpt, "--out": str(tmp_path / "m.gguf"), "--tokenizer_path": tokenizer_dir}
    change, expected = {
        "out_is_a_folder": ({"--out": str(tmp_path)}, "is a folder; give the .gguf file"),
        "out_folder_missing": ({"--out": str(tmp_path / "no" / "m.gguf")}, "does not exist; create it first"),
        "out_is_the_checkpoint": ({"--out": ckpt}, "is the checkpoint itself"),
        "empty_name": ({"--name": " "}, "argument --name: must not be empty"),
    }[case]
    argv = [item for pair in {**args, **change}.items() for item in pair]
    assert expected in error_line(capsys, export_gguf.main, argv)
    assert os.path.getsize(ckpt) > 0 and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("case", ["out_is_a_file", "out_is_the_tokenizer", "out_is_the_weights_folder"])
def test_export_hf_bad_input_is_one_line(tokenizer, tokenizer_dir, tmp_path, capsys, case):
    import export_hf
    ckpt = saved_checkpoint(tokenizer, tokenizer_dir, tmp_path)
    (tmp_path / "file").write_text("x")
    args = {"--model_path": ckpt, "--out_dir": str(tmp_path / "hf"), "--tokenizer_path": tokenizer_dir}
    change, expected = {
        "out_is_a_file": ({"--out_dir": str(tmp_path / "file")}, "is a file; give a folder"),
        "out_is_the_tokenizer": ({"--out_dir": tokenizer_dir}, "is the input folder"),
        "out_is_the_weights_folder": ({"--model_path": str(tmp_path / "sft_final"),
                                       "--out_dir": str(tmp_path / "sft_final")}, "is the input folder"),
    }[case]
    argv = [item for pair in {**args, **change}.items() for item in pair]
    assert expected in error_line(capsys, export_hf.main, argv)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("script", ["export_gguf.py", "export_hf.py"])
def test_export_scripts_report_a_missing_checkpoint_in_one_line(tmp_path, script):
    out = ["--out", str(tmp_path / "m.gguf")] if script == "export_gguf.py" else ["--out_dir", str(tmp_path / "hf")]
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), "--model_path", str(tmp_path / "gone.pth"),
                           *out], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"{script}: error: {tmp_path / 'gone.pth'}: no such checkpoint (expected a .pth file or a *_final/ "
        f"safetensors folder)"]


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
