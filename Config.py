"""Model configuration: the LLMConfig dataclass, named presets, JSON round trip and validation.

    python Config.py            # prints every preset with its total and active parameter counts
"""
import dataclasses
import json
from dataclasses import dataclass

from cli import UserError

ROPE_SCALING_TYPES = ("linear", "ntk", "yarn")


class ConfigError(UserError, ValueError):
    """A model shape that cannot be built (e.g. dim not divisible by n_heads); the message names the fields."""


@dataclass
class LLMConfig:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    vocab_size: int = 6464
    hidden_dim: int | None = None  # None: the SwiGLU size 8/3·dim rounded up to multiple_of
    multiple_of: int = 64
    max_seq_len: int = 512
    dropout: float = 0.0
    rope_theta: float = 1e6
    # None, or {"type": "linear" | "ntk" | "yarn", "factor": f, "original_max_position_embeddings": n} to stretch
    # a model trained at n positions over factor·n (the long-context SFT stage).
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    flash_attn: bool = True  # False routes attention through the plain-math path (kept for testing against SDPA)
    use_moe: bool = False
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    aux_loss_alpha: float = 0.01

    def __post_init__(self):
        if self.hidden_dim is None:
            hidden = int(8 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        self.validate()

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise ConfigError(f"invalid LLMConfig: {msg}")

        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        need(self.dim % self.n_heads == 0, f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        need(self.head_dim % 2 == 0, f"head_dim=dim/n_heads={self.head_dim} must be even for RoPE")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive")
        if self.rope_scaling is not None:
            kind, factor = self.rope_scaling.get("type"), self.rope_scaling.get("factor")
            need(kind in ROPE_SCALING_TYPES, f"rope_scaling type={kind!r} must be one of {ROPE_SCALING_TYPES}")
            need(isinstance(factor, (int, float)) and factor >= 1, f"rope_scaling factor={factor!r} must be >= 1")
            need(kind != "yarn" or "original_max_position_embeddings" in self.rope_scaling,
                 "rope_scaling type='yarn' needs original_max_position_embeddings")
        if self.use_moe:
            need(self.n_routed_experts > 0, f"n_routed_experts={self.n_routed_experts} must be positive")
            need(self.n_shared_experts >= 0, f"n_shared_experts={self.n_shared_experts} must be >= 0")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts="
                 f"{self.n_routed_experts}]")
            need(self.aux_loss_alpha >= 0, f"aux_loss_alpha={self.aux_loss_alpha} must be >= 0")

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"invalid LLMConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    def param_counts(self):
        """(total, active) parameter counts; active counts only the experts a token uses (MoE)."""
        d, h, hd = self.dim, self.hidden_dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        ffn = 3 * d * h
        if self.use_moe:
            router = d * self.n_routed_experts
            ffn_total = ffn * (self.n_routed_experts + self.n_shared_experts) + router
            ffn_active = ffn * (self.num_experts_per_tok + self.n_shared_experts) + router
        else:
            ffn_total = ffn_active = ffn
        norms = 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        total = self.n_layers * (attn + ffn_total + norms) + d + embed
        active = self.n_layers * (attn + ffn_active + norms) + d + embed
        return total, active


PRESETS = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=512),
    "base": dict(dim=768, n_layers=16, n_heads=8, n_kv_heads=2, max_seq_len=512),
    "moe": dict(dim=640, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=512, use_moe=True,
                n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
    # Llama-3.2-1B's shape (with this project's vocabulary): 0.99B parameters; see README "Scaling up" for memory.
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, max_seq_len=2048),
}


def get_config(preset, **overrides):
    """A preset by name, with any field overridden (None values are ignored so unset CLI flags inherit)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return LLMConfig(**fields)


def describe(config):
    total, active = config.param_counts()
    text = f"{total / 1e6:.1f}M parameters"
    return text + (f" ({active / 1e6:.1f}M active per token)" if config.use_moe else "")


if __name__ == "__main__":
    for name in PRESETS:
        c = get_config(name)
        print(f"{name:6s} dim={c.dim} layers={c.n_layers} heads={c.n_heads}/{c.n_kv_heads} "
              f"hidden={c.hidden_dim} vocab={c.vocab_size} ctx={c.max_seq_len}: {describe(c)}")
