"""LLMConfig: presets, parameter counts, JSON round trip, validation."""
import pytest
import torch

from Config import PRESETS, LLMConfig, get_config
from model import Transformer


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_counts_match_the_built_model(name):
    config = get_config(name)
    with torch.device("meta"):
        model = Transformer(config)
    built = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert config.param_counts()[0] == built


def test_preset_sizes_are_as_documented():
    assert round(get_config("small").param_counts()[0] / 1e6) == 26
    assert round(get_config("base").param_counts()[0] / 1e6) == 104
    total, active = get_config("moe").param_counts()
    assert round(total / 1e6) == 145 and active < total
    assert round(get_config("1b").param_counts()[0] / 1e6, 1) == 986.4  # Llama-3.2-1B's shape, our vocabulary


def test_hidden_dim_defaults_to_rounded_swiglu_size():
    assert LLMConfig(dim=512, multiple_of=64).hidden_dim == 1408  # 8/3·512 = 1365.3 → 1408
    assert LLMConfig(dim=512, hidden_dim=1000).hidden_dim == 1000


def test_json_round_trip():
    config = get_config("moe", max_seq_len=1024,
                        rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512})
    assert LLMConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown fields.*colour"):
        LLMConfig.from_dict({**config.to_dict(), "colour": "red"})


@pytest.mark.parametrize("fields, message", [
    (dict(dim=100, n_heads=8), "dim=100 is not divisible by n_heads=8"),
    (dict(n_heads=8, n_kv_heads=3), "n_heads=8 is not divisible by n_kv_heads=3"),
    (dict(use_moe=True, n_routed_experts=2, num_experts_per_tok=3), "num_experts_per_tok=3"),
    (dict(rope_scaling={"type": "cubic", "factor": 2}), "rope_scaling type='cubic'"),
    (dict(rope_scaling={"type": "yarn", "factor": 2}), "original_max_position_embeddings"),
    (dict(n_layers=0), "n_layers=0"),
    (dict(dropout=1.5), "dropout=1.5"),
])
def test_invalid_combinations_name_the_fields(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        LLMConfig(**fields)


def test_unknown_preset_and_unset_overrides():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_config("huge")
    assert get_config("small", dim=None, n_layers=4).n_layers == 4
