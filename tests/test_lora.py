"""LoRA starts as the base model, trains only its adapters, merges exactly, and saves/loads only the adapters."""
import copy
import os

import pytest
import torch
import torch.nn as nn

from checkpoint import load_state_strict
from Config import LLMConfig
from lora import (TARGETS, LoRALinear, apply_lora, count_parameters, load_lora, lora_config, lora_state_dict,
                  lora_summary, merge_lora, save_lora)
from model import Transformer
from train_utils import build_optimizer

MOE = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2)


def small_config(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64, rope_theta=1e4)
    return LLMConfig(**{**base, **kw})


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(small_config(**kw)).eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (2, 16), generator=g), torch.randint(0, 97, (2, 16), generator=g)


def train(model, steps=3, lr=1e-2):
    """A few AdamW steps on next-token loss (+ the MoE aux loss), so B becomes non-zero."""
    optimizer = build_optimizer(model, lr, weight_decay=0.1)
    x, y = batch()
    for _ in range(steps):
        out = model(x, targets=y)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def logits(model, seed=2):
    with torch.no_grad():
        return model(batch(seed)[0]).logits


def expected_trainable(c, rank, targets=TARGETS):
    """rank·(in + out) for each wrapped projection, counted from the config, not from the model."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    sizes = {"q_proj": c.dim + q, "k_proj": c.dim + kv, "v_proj": c.dim + kv, "o_proj": q + c.dim,
             "gate_proj": c.dim + c.hidden_dim, "up_proj": c.dim + c.hidden_dim, "down_proj": c.hidden_dim + c.dim}
    ffns = c.n_routed_experts + c.n_shared_experts if c.use_moe else 1
    per_layer = sum(sizes[t] * (ffns if t.endswith(("gate_proj", "up_proj", "down_proj")) else 1) for t in targets)
    return c.n_layers * rank * per_layer


def test_fresh_adapters_give_the_base_logits():
    base = make_model()
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    assert torch.equal(logits(model), logits(base))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            assert not m.lora_B.any() and m.lora_A.abs().sum() > 0  # B = 0, A random (or nothing would ever train)


@pytest.mark.parametrize("kw", [{}, MOE], ids=["dense", "moe"])
def test_training_changes_only_the_adapters(kw):
    model = apply_lora(make_model(**kw), rank=4, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model)
    after = model.state_dict()
    adapters = set(lora_state_dict(model))
    for k in before:
        if k in adapters:
            assert not torch.equal(before[k], after[k]), f"adapter {k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    assert any(k.startswith("embed_tokens") for k in before) and any(k.endswith("norm.weight") for k in before)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    trainable, total = count_parameters(model)
    assert trainable == expected_trainable(model.config, 4) == sum(after[k].numel() for k in adapters)
    assert f"{trainable:,} trainable of {total:,}" in lora_summary(model)


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_wraps_its_projections(target):
    model = apply_lora(make_model(), rank=2, alpha=4, targets=[target])
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {n for n, _ in make_model().named_modules() if n.endswith("." + target)}
    for n in wrapped:
        m = model.get_submodule(n)
        assert m.lora_A.shape == (2, m.base.in_features) and m.lora_B.shape == (m.base.out_features, 2)
    x, y = batch()
    model(x, targets=y).loss.backward()
    assert all(model.get_submodule(n).lora_B.grad.abs().sum() > 0 for n in wrapped)
    assert count_parameters(model)[0] == expected_trainable(model.config, 2, [target])
    assert lora_config(model)["targets"] == [target]


def test_moe_experts_are_wrapped_and_the_router_is_frozen():
    model = apply_lora(make_model(**MOE), rank=2, alpha=4, targets="gate_proj,down_proj")
    mlp = model.layers[0].mlp
    for ffn in [*mlp.experts, *mlp.shared_experts]:
        assert isinstance(ffn.gate_proj, LoRALinear) and isinstance(ffn.down_proj, LoRALinear)
        assert type(ffn.up_proj) is nn.Linear
    assert len(mlp.experts) == 4 and len(mlp.shared_experts) == 1
    assert type(mlp.router) is nn.Linear and not mlp.router.weight.requires_grad


@pytest.mark.parametrize("kw", [{}, MOE], ids=["dense", "moe"])
def test_merge_equals_the_adapted_model_and_loads_as_a_plain_checkpoint(kw):
    base_logits = logits(make_model(**kw))
    model = train(apply_lora(make_model(**kw), rank=4, alpha=16))
    adapted = logits(model)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapters really changed the model
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    fresh = Transformer(model.config).eval()
    assert list(model.state_dict()) == list(fresh.state_dict())
    load_state_strict(fresh, model.state_dict(), "merged")
    assert torch.equal(logits(fresh), logits(model))


def test_save_and_load_reproduce_the_adapted_model(tmp_path):
    model = train(apply_lora(make_model(), rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], dropout=0.1))
    model.eval()
    path = save_lora(model, str(tmp_path / "adapter.pth"), meta={"base": "pretrain_final.pth"})
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt["lora"]) == set(lora_state_dict(model))
    assert all(k.endswith((".lora_A", ".lora_B")) for k in ckpt["lora"])
    assert ckpt["lora_config"] == {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj", "down_proj"]}
    adapter_bytes = 4 * sum(v.numel() for v in ckpt["lora"].values())
    assert os.path.getsize(path) < adapter_bytes + 64_000 < 4 * count_parameters(model)[1]

    loaded, meta = load_lora(make_model(), path)
    assert meta == {"base": "pretrain_final.pth"}
    assert torch.equal(logits(loaded.eval()), logits(model))
    assert lora_config(loaded) == ckpt["lora_config"]


def test_loading_adapters_into_the_wrong_model_names_the_problem(tmp_path):
    path = save_lora(apply_lora(make_model(), rank=4, alpha=8), str(tmp_path / "adapter.pth"))
    with pytest.raises(ValueError, match=r"shape mismatches.*layers\.0\.self_attn\.q_proj\.lora_A"):
        load_lora(make_model(dim=32), path)
    with pytest.raises(ValueError, match=r"missing keys.*layers\.2\.self_attn\.q_proj\.lora_A"):
        load_lora(make_model(n_layers=3), path)

    ckpt = torch.load(path, weights_only=True)
    ckpt["lora"]["layers.9.mlp.up_proj.lora_B"] = ckpt["lora"].pop("layers.1.mlp.up_proj.lora_B")
    torch.save(ckpt, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layers\.1\.mlp\.up_proj\.lora_B'\]; "
                                         r"unexpected keys \['layers\.9\.mlp\.up_proj\.lora_B'\]"):
        load_lora(make_model(), str(tmp_path / "renamed.pth"))

    torch.save({"model": make_model().state_dict()}, tmp_path / "full.pth")
    with pytest.raises(ValueError, match="not a LoRA adapter file"):
        load_lora(make_model(), str(tmp_path / "full.pth"))


def test_bad_targets_and_settings_are_errors():
    with pytest.raises(ValueError, match="unknown LoRA targets \\['qkv'\\]") as err:
        apply_lora(make_model(), rank=4, alpha=8, targets=["q_proj", "qkv"])
    assert all(t in str(err.value) for t in TARGETS)
    with pytest.raises(ValueError, match="no LoRA targets"):
        apply_lora(make_model(), rank=4, alpha=8, targets=[])
    with pytest.raises(ValueError, match=r"\['k_proj'\] match no nn.Linear"):
        apply_lora(nn.ModuleDict({"q_proj": nn.Linear(4, 4)}), rank=2, alpha=2, targets=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="rank >= 1"):
        apply_lora(make_model(), rank=0, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(apply_lora(make_model(), rank=4, alpha=8), rank=4, alpha=8)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora_state_dict(make_model())


def test_adapter_dropout_is_active_only_in_training():
    model = apply_lora(make_model(), rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    assert torch.equal(logits(model), logits(model))
    model.train()
    assert not torch.equal(logits(model), logits(model))
