"""The model is exactly Llama, its KV cache equals the full forward, generation and MoE behave as documented."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from Config import LLMConfig
from model import (KVCache, MoEFeedForward, Transformer, apply_rope, compile_for_decoding, process_logits,
                   rope_frequencies, weighted_cross_entropy)


def small_config(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64, rope_theta=1e4)
    return LLMConfig(**{**base, **kw})


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(small_config(**kw)).eval()


def to_llama(model):
    """The same weights in transformers' LlamaForCausalLM (the mapping is only the "model." prefix)."""
    c = model.config
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope = {"rope_type": s["type"], "rope_theta": c.rope_theta, "factor": float(s["factor"])}
        if s["type"] == "yarn":
            rope["original_max_position_embeddings"] = s["original_max_position_embeddings"]
    hf_config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                            num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
                            rms_norm_eps=c.norm_eps, rope_parameters=rope,
                            tie_word_embeddings=c.tie_word_embeddings, attention_bias=False, mlp_bias=False)
    hf = LlamaForCausalLM(hf_config).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_kv_heads=4, rope_theta=1e6),
    dict(n_kv_heads=1, tie_word_embeddings=False),
    dict(rope_scaling={"type": "linear", "factor": 2.0}),
    dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
])
def test_logits_match_transformers_llama(kw):
    model = make_model(**kw)
    hf = to_llama(model)
    ids = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_ntk_scaling_equals_llama_with_stretched_base():
    d = small_config().head_dim
    model = make_model(rope_scaling={"type": "ntk", "factor": 4.0})
    reference = make_model(rope_theta=1e4 * 4.0 ** (d / (d - 2)))
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)


def test_sdpa_equals_plain_attention():
    sdpa, plain = make_model(), make_model(flash_attn=False)
    ids = torch.randint(0, 97, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        assert torch.allclose(sdpa(ids).logits, plain(ids).logits, atol=1e-5)
        assert torch.allclose(sdpa(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits,
                              atol=1e-5)
        caches = [KVCache(m.config, 3, 24, "cpu", torch.float32) for m in (sdpa, plain)]
        for m, cache in zip((sdpa, plain), caches):
            m(ids, cache=cache)
        step = torch.randint(0, 97, (3, 1))
        assert torch.allclose(sdpa(step, cache=caches[0]).logits, plain(step, cache=caches[1]).logits, atol=1e-5)


@pytest.mark.parametrize("prefill", [1, 7, 30])
@pytest.mark.parametrize("use_moe", [False, True])
def test_kv_cache_decode_equals_full_forward(prefill, use_moe):
    model = make_model(use_moe=use_moe)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 2, 40, "cpu", torch.float32)
        steps = [model(ids[:, :prefill], cache=cache).logits]
        for t in range(prefill, 40, 3):  # decode in blocks of 3 too: multi-token steps after a prefix
            steps.append(model(ids[:, t:t + 3], cache=cache).logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_left_padded_batch_matches_unpadded_rows():
    model = make_model()
    rows = [torch.randint(0, 97, (n,)) for n in (12, 5, 9)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            assert torch.allclose(batch[i, width - len(r):], alone, atol=1e-5)
        out = model.generate(ids, 6, attention_mask=mask, temperature=0)
        for i, r in enumerate(rows):
            assert torch.equal(out[i], model.generate(r[None], 6, temperature=0)[0])


def naive_greedy(model, ids, n):
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), dim=1)
    return ids


def test_greedy_generate_matches_uncached_argmax_and_stream():
    model = make_model(seed=3)
    prompt = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        expected = naive_greedy(model, prompt, 12)[:, 5:]
    out = model.generate(prompt, 12, temperature=0)
    assert torch.equal(out, expected)
    streamed = torch.stack(list(model.generate_stream(prompt, 12, temperature=0)), dim=1)
    assert torch.equal(streamed, expected)
    assert torch.equal(model.generate(prompt, 12, temperature=1.0, top_k=1), expected)


def test_rope_without_concatenation_is_bitwise_the_rotate_half_formula():
    """apply_rope rolls x by half a head and keeps the sign in the sin table: decoding's cheaper form must give
    exactly the numbers of Llama's x·cos + rotate_half(x)·sin, so training and greedy tokens do not change."""
    model = make_model(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    d = model.config.head_dim
    angles = torch.outer(torch.arange(64, dtype=torch.float32), rope_frequencies(model.config)[0])
    scale = rope_frequencies(model.config)[1]
    cos, sin = (torch.cat((angles, angles), dim=-1).cos() * scale, torch.cat((angles, angles), dim=-1).sin() * scale)
    assert torch.equal(model.rope_cos, cos)
    x = torch.randn(2, 4, 64, d)
    rotate_half = torch.cat((-x[..., d // 2:], x[..., :d // 2]), dim=-1)
    assert torch.equal(apply_rope(x, model.rope_cos, model.rope_sin), x * cos + rotate_half * sin)


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_decode_gives_transformers_tokens(padded):
    """Our cached greedy decode and LlamaForCausalLM.generate pick the same 40 tokens (a mismatch is allowed only
    at an exact tie between the top two logits)."""
    model = make_model(seed=5, max_seq_len=64)
    hf = to_llama(model)
    prompt = torch.randint(0, 97, (2, 8))
    mask = torch.ones_like(prompt)
    if padded:
        mask[1, :3] = 0
    ours = model.generate(prompt, 40, attention_mask=mask, temperature=0)
    theirs = hf.generate(prompt, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[:, 8:]
    for row in range(2):
        if not torch.equal(ours[row], theirs[row]):
            t = int((ours[row] != theirs[row]).nonzero()[0])
            ids = torch.cat((prompt[row:row + 1], ours[row:row + 1, :t]), dim=1)[:, int((mask[row] == 0).sum()):]
            top2 = model(ids).logits[0, -1].topk(2).values
            assert top2[0] - top2[1] < 1e-5, f"row {row} differs at token {t}, not at a tie"


def test_compiled_generation_equals_eager_without_recompiling_per_step():
    """eval_model.py --compile: a fixed number of graphs, not one per decode step (the cache length is symbolic),
    with and without an attention mask."""
    import copy

    from torch._dynamo.utils import counters
    model = make_model(seed=3)
    compiled = compile_for_decoding(copy.deepcopy(model))
    prompt = torch.randint(0, 97, (2, 7))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # a left-padded row: the decode steps carry a growing attention mask
    torch._dynamo.reset()
    counters.clear()
    for attention_mask in (None, mask):
        expected = model.generate(prompt, 16, attention_mask=attention_mask, temperature=0)
        assert torch.equal(compiled.generate(prompt, 16, attention_mask=attention_mask, temperature=0), expected)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Per mask variant: the prefill, the decode steps, and the last step (the one that fills the cache).
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


def test_max_new_tokens_exact_and_per_row_stop():
    model = make_model(seed=3)
    prompt = torch.randint(0, 97, (2, 5))
    greedy = model.generate(prompt, 10, temperature=0)
    assert greedy.shape == (2, 10)
    stop = int(greedy[0, 3])  # row 0 emits this at step 3; make sure row 1 doesn't emit it earlier
    first_in_row1 = (greedy[1] == stop).nonzero()
    out = model.generate(prompt, 10, temperature=0, stop_ids=[stop], pad_id=-1)
    first0 = int((greedy[0] == stop).nonzero()[0])
    assert torch.equal(out[0, :first0 + 1], greedy[0, :first0 + 1])
    assert (out[0, first0 + 1:] == -1).all()
    if len(first_in_row1) == 0:
        assert torch.equal(out[1], greedy[1])
    out_all = model.generate(prompt[:1], 10, temperature=0, stop_ids=[stop])
    assert out_all.shape[1] == first0 + 1  # generation ends as soon as every row stopped


def test_going_past_max_seq_len_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 5)
    assert model.generate(torch.zeros(1, 60, dtype=torch.long), 4, temperature=0).shape == (1, 4)
    cache = KVCache(model.config, 1, 64, "cpu", torch.float32)
    model(torch.zeros(1, 64, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_sampling_is_reproducible_with_generator_and_respects_top_p():
    model = make_model(seed=1)
    prompt = torch.randint(0, 97, (1, 4))
    draws = [model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    tiny_p = model.generate(prompt, 8, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tiny_p, model.generate(prompt, 8, temperature=0))


def test_process_logits_penalty_and_filters():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(logits, seen, 0, None, None, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # a seen negative logit goes down, never up
    out = process_logits(logits, torch.zeros_like(seen), 1.0, 2, None, 1.0)
    assert torch.isinf(out[0, [1, 3]]).all() and torch.isfinite(out[0, [0, 2]]).all()
    probs = logits.softmax(-1)[0]  # 0.66, 0.012, 0.24, 0.15
    out = process_logits(logits, torch.zeros_like(seen), 1.0, None, 0.8, 1.0)
    assert torch.isfinite(out[0]).tolist() == [True, False, True, False]
    assert probs[0] < 0.8 < probs[0] + probs[2]
    out = process_logits(logits, torch.zeros_like(seen), 1.0, None, 0.0, 1.0)  # top_p 0: greedy, never all -inf
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]


def test_weighted_loss_is_mean_over_weighted_tokens():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    weights = torch.tensor([[0, 1, 1, 0, 2], [1, 0, 0, 0, 3.0]])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    expected = (ce * weights.flatten()).sum() / weights.sum()
    assert torch.allclose(weighted_cross_entropy(logits, targets, weights), expected)
    targets[0, 1] = -100
    w = weights.clone()
    w[0, 1] = 0
    assert torch.allclose(weighted_cross_entropy(logits, targets, weights),
                          (ce * w.flatten()).sum() / w.sum())


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(LLMConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=500))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert abs(model.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 1e-3
    assert abs(model.layers[0].mlp.down_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4


def moe_config(**kw):
    return small_config(use_moe=True, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, **kw)


def test_moe_dispatch_equals_per_token_reference():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config()).eval()
    x = torch.randn(2, 9, 64)
    out, _ = moe(x)
    flat = x.reshape(-1, 64)
    probs = moe.router(flat).softmax(-1)
    expected = []
    for t in range(flat.shape[0]):
        w, e = probs[t].topk(2)
        w = w / w.sum()
        y = sum(wi * moe.experts[int(ei)](flat[t]) for wi, ei in zip(w, e))
        expected.append(y + moe.shared_experts[0](flat[t]))
    assert torch.allclose(out.reshape(-1, 64), torch.stack(expected), atol=1e-5)


def test_moe_without_shared_experts_builds_none():
    moe = MoEFeedForward(small_config(use_moe=True, n_routed_experts=4, n_shared_experts=0, num_experts_per_tok=2))
    assert len(moe.shared_experts) == 0
    assert not any("shared" in name for name, _ in moe.named_parameters())


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gets_gradient_from_language_model_loss(top_k):
    torch.manual_seed(0)
    model = Transformer(small_config(use_moe=True, n_routed_experts=4, num_experts_per_tok=top_k,
                                     aux_loss_alpha=0.0)).train()
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    assert out.aux_loss.item() == 0.0
    out.loss.backward()
    router_grad = model.layers[0].mlp.router.weight.grad.abs().max()
    attention_grad = model.layers[0].self_attn.q_proj.weight.grad.abs().max()
    assert router_grad > 0.01 * attention_grad  # a real signal, not rounding noise (normalised top-1 gives ~1e-10)


def test_aux_loss_is_alpha_when_balanced_and_does_not_grow_with_length():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(aux_loss_alpha=0.1)).train()
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform router probabilities
    _, aux = moe(torch.randn(2, 8, 64))
    assert abs(aux.item() - 0.1) < 1e-6
    torch.manual_seed(1)
    moe = MoEFeedForward(moe_config(aux_loss_alpha=0.1)).train()
    short = moe(torch.randn(1, 16, 64))[1].item()
    long = moe(torch.randn(8, 512, 64))[1].item()
    assert 0.08 < short < 0.2 and 0.08 < long < 0.2


def test_every_expert_gets_gradient_even_without_tokens():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config()).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # push everything to experts 0 and 1
    x = torch.ones(1, 4, 64)
    out, aux = moe(x)
    (out.sum() + aux).backward()
    assert all(p.grad is not None for p in moe.parameters())
