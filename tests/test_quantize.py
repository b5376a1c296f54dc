"""Weight-only int8/int4: integer storage, the kernels compute x·Wᵀ of the dequantised weights, logits stay close,
generation with the KV cache still works, the right layers (and only those) are quantised."""
import copy

import pytest
import torch
import torch.nn as nn
from conftest import trained_tiny_model

from cli import run_main
from Config import LLMConfig
from model import Transformer
from quantize import Int4Linear, Int8Linear, quantize_model, weight_bytes

VOCAB = 512


def tiny_config(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=128, rope_theta=1e4)
    return LLMConfig(**{**base, **kw})


def trained_model(tokenizer, steps=60, **kw):
    return trained_tiny_model(tokenizer, tiny_config(**kw), steps)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def projection_bytes(model):
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if "_proj." in name)


@pytest.fixture(scope="module")
def model(tokenizer):
    return trained_model(tokenizer)


def test_int8_logits_close_and_greedy_generation_mostly_equal(model, tokenizer):
    quantized = quantize_model(copy.deepcopy(model), "int8")
    ids = torch.tensor([tokenizer("The model learns to read and write small stories")["input_ids"]])
    with torch.no_grad():
        assert relative_error(quantized(ids).logits, model(ids).logits) < 0.02
    ours, theirs = quantized.generate(ids, 24, temperature=0), model.generate(ids, 24, temperature=0)
    assert (ours == theirs).float().mean().item() >= 0.8


def test_int8_weights_are_int8_and_memory_drops_4x(model):
    before = projection_bytes(model)
    quantized = quantize_model(copy.deepcopy(model), "int8")
    q_proj = quantized.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Int8Linear) and q_proj.weight.dtype == torch.int8
    assert q_proj.weight.shape == model.layers[0].self_attn.q_proj.weight.shape
    assert all(isinstance(layer.mlp.down_proj, Int8Linear) for layer in quantized.layers)
    assert before / projection_bytes(quantized) > 3.8  # int8 plus one bf16 scale per row
    # The tied head and the embedding stay one float table.
    assert isinstance(quantized.lm_head, nn.Linear) and quantized.lm_head.weight is quantized.embed_tokens.weight
    assert weight_bytes(quantized) < weight_bytes(model)


def test_kernels_compute_the_dequantised_product():
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=False)
    x = torch.randn(5, 128)
    int8 = Int8Linear(linear)
    w8 = int8.weight.float() * int8.scales.float()[:, None]
    assert torch.allclose(int8(x), x.bfloat16().float() @ w8.T, rtol=2e-2, atol=2e-2)
    # Rounding to the nearest step costs half a step; the bf16 scale (8 significant bits) at most 127·2^-8 more.
    assert ((w8 - linear.weight).abs() <= 1.0 * int8.scales.float()[:, None]).all()
    int4 = Int4Linear(linear)
    assert int4.weight.dtype == torch.uint8 and int4.weight.numel() == 128 * 96 // 2  # two 4-bit values per byte
    identity = int4(torch.eye(128)).T  # column j of x·Wᵀ for x = e_j is W[:, j]: the dequantised weight
    assert relative_error(identity, linear.weight) < 0.1
    assert torch.allclose(int4(x), x.bfloat16().float() @ identity.T, rtol=2e-2, atol=2e-2)


def test_quantised_generation_uses_the_kv_cache_correctly(model, tokenizer):
    """Cached greedy decoding equals re-running the whole sequence each step (batch 2, left padding)."""
    for mode in ("int8", "int4"):
        quantized = quantize_model(copy.deepcopy(model), mode)
        ids = torch.tensor([tokenizer("Cats and dogs")["input_ids"]] * 2)
        mask = torch.ones_like(ids)
        mask[1, :1] = 0
        generated = quantized.generate(ids, 10, temperature=0, attention_mask=mask)
        seq, seq_mask = ids, mask
        for step in range(10):
            with torch.no_grad():
                nxt = quantized(seq, attention_mask=seq_mask).logits[:, -1].argmax(-1)
            assert torch.equal(nxt, generated[:, step]), mode
            seq, seq_mask = torch.cat((seq, nxt[:, None]), 1), torch.cat((seq_mask, torch.ones(2, 1).long()), 1)


def test_int4_logits_close_and_storage_smaller(model, tokenizer):
    quantized = quantize_model(copy.deepcopy(model), "int4")
    assert isinstance(quantized.layers[1].mlp.up_proj, Int4Linear)
    ids = torch.tensor([tokenizer("Stars and rivers")["input_ids"]])
    with torch.no_grad():
        assert relative_error(quantized(ids).logits, model(ids).logits) < 0.1
    assert projection_bytes(model) / projection_bytes(quantized) > 5  # 4 bits + a bf16 scale and zero per 32 weights


def test_untied_head_is_quantised_router_is_not(tokenizer):
    untied = quantize_model(trained_model(tokenizer, steps=1, tie_word_embeddings=False), "int8")
    assert isinstance(untied.lm_head, Int8Linear) and untied.embed_tokens.weight.dtype == torch.float32
    moe = trained_model(tokenizer, steps=1, use_moe=True, n_routed_experts=4, num_experts_per_tok=2)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        reference = moe(ids).logits
        quantize_model(moe, "int8")
        assert relative_error(moe(ids).logits, reference) < 0.03
    mlp = moe.layers[0].mlp
    assert isinstance(mlp.router, nn.Linear) and mlp.router.weight.dtype == torch.float32
    assert isinstance(mlp.experts[3].gate_proj, Int8Linear) and isinstance(mlp.shared_experts[0].down_proj, Int8Linear)
    assert moe.generate(ids, 4, temperature=0).shape == (2, 4)


def test_bad_modes_and_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'.*int8.*int4"):
        quantize_model(copy.deepcopy(model), "int3")
    quantized = quantize_model(copy.deepcopy(model), "int8")
    with pytest.raises(ValueError, match="no nn.Linear projections.*already quantised"):
        quantize_model(quantized, "int8")
    odd = Transformer(tiny_config(dim=80, n_heads=4, n_kv_heads=2, hidden_dim=160))
    with pytest.raises(ValueError, match="int4 on cpu needs layer inputs in multiples of 32"):
        quantize_model(odd, "int4")


def test_comparison_cli_prints_every_mode(capsys):
    import quantize
    quantize.main(["--preset", "tiny", "--modes", "fp32", "int8", "int4", "--prompt_len", "8", "--new_tokens", "4",
                   "--runs", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| fp32", "| int8", "| int4"]


QUANTIZE_CASES = {  # (flags, what the one error line must say)
    "unknown mode": (["--modes", "int3"], "argument --modes: invalid choice: 'int3'"),
    "repeated mode": (["--modes", "int8", "fp32", "int8"], "--modes lists int8 more than once"),
    "zero runs": (["--runs", "0"], "argument --runs: must be >= 1, got 0"),
    "zero prompt": (["--prompt_len", "0"], "argument --prompt_len: must be >= 1"),
    "negative new tokens": (["--new_tokens", "-1"], "argument --new_tokens: must be >= 1"),
    "zero eval windows": (["--eval_windows", "0"], "argument --eval_windows: must be >= 1"),
    "word for a number": (["--runs", "three"], "argument --runs: expected an integer"),
    "missing checkpoint": (["--model_path", "nope.pth"], "--model_path nope.pth: no such file"),
    "missing eval data": (["--eval_data", "nope.jsonl"], "--eval_data nope.jsonl: no such file"),
    "preset with a checkpoint": (["--model_path", __file__, "--preset", "tiny"], "--preset shapes a random-init"),
    "decode past the context": (["--prompt_len", "200", "--new_tokens", "100"],
                                "--prompt_len 200 + --new_tokens 100 exceed the model's context 256"),
}


@pytest.mark.parametrize("case", sorted(QUANTIZE_CASES))
def test_comparison_cli_refuses_bad_flags_in_one_line(case, capsys):
    import quantize
    flags, message = QUANTIZE_CASES[case]
    with pytest.raises(SystemExit) as stopped:
        model = [] if "--model_path" in flags else ["--preset", "tiny"]
        run_main(quantize.main, [*model, "--modes", "fp32", "--runs", "1", *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert stopped.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert message in errors[0], errors[0]


def test_comparison_cli_names_the_mode_a_model_cannot_take(tokenizer_dir, tmp_path, capsys):
    import quantize
    from checkpoint import save_final
    odd = Transformer(tiny_config(dim=80, n_heads=4, n_kv_heads=2, hidden_dim=160))
    path = save_final(odd, odd.config, str(tmp_path), "pretrain", tokenizer_dir)
    with pytest.raises(SystemExit) as stopped:
        run_main(quantize.main, ["--model_path", path, "--modes", "fp32", "int4", "--prompt_len", "4", "--runs", "1"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("error: --modes int4: int4 on cpu needs layer inputs in multiples of "
                                                 "32; q_proj has 80")
