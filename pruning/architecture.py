"""What a pruned model looks like, and what it costs, from the base config alone.

`ModelSpec` holds the dimensions of a base model that the cost model needs; it is
built from a transformers config by `pruning.adapter.spec_from_config` (the only
place that reads config attribute names). `Architecture` is one `LayerShape` per
decoder layer. Both are frozen, validated on construction and round-trip through
JSON, so they can be stored in an Optuna study and handed between stages.

Attention units. A layer keeps `kv_heads` whole GQA groups (a key/value head with
its query heads) and, inside every kept group, the same number `heads_per_group`
of query heads. Keeping the ratio uniform inside a layer is what lets the stock
attention code (`repeat_kv` with `num_key_value_groups`) and its KV cache run the
pruned layer unchanged, so `generate()` keeps working; pruning query heads inside
groups gives the search a finer grain than whole groups on GQA models (8 query
heads in 2 groups: 8 choices instead of 2).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any


class ArchitectureError(ValueError):
    """An architecture that does not fit its base model; the message says what to change."""


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions of a base decoder model that fix every parameter count."""

    base_model: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    group_size: int  # query heads per key/value head
    head_dim: int
    intermediate_size: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group_size

    def shared_params(self) -> int:
        """Embedding, LM head (unless tied) and the final norm."""
        embeddings = self.vocab_size * self.hidden_size
        return embeddings * (1 if self.tie_embeddings else 2) + self.hidden_size

    def attention_params(self, kv_heads: int, heads_per_group: int) -> int:
        """q/k/v/o projections (+ biases) and the input norm of one layer; 0 when dropped."""
        if kv_heads == 0:
            return 0
        h, d = self.hidden_size, self.head_dim
        q_out, kv_out = kv_heads * heads_per_group * d, kv_heads * d
        weights = h * q_out + 2 * h * kv_out + q_out * h
        biases = (q_out + 2 * kv_out if self.qkv_bias else 0) + (h if self.o_bias else 0)
        return weights + biases + h

    def mlp_params(self, channels: int) -> int:
        """gate/up/down projections (+ biases) and the post-attention norm; 0 when dropped."""
        if channels == 0:
            return 0
        h = self.hidden_size
        biases = 2 * channels + h if self.mlp_bias else 0
        return 3 * h * channels + biases + h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ArchitectureError(f"model spec is missing {sorted(missing)}; was it written by this tool?")
        return cls(**{k: data[k] for k in names})


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer keeps. `kv_heads == 0` drops attention; `ffn_channels == 0` drops the MLP."""

    kv_heads: int
    heads_per_group: int
    ffn_channels: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ArchitectureError(f"{f.name} must be a non-negative int, got {value!r}")
        if (self.kv_heads == 0) != (self.heads_per_group == 0):
            raise ArchitectureError(
                f"kv_heads={self.kv_heads} and heads_per_group={self.heads_per_group}: "
                "set both to 0 to drop attention, or both to at least 1"
            )

    @property
    def attention_dropped(self) -> bool:
        return self.kv_heads == 0

    @property
    def mlp_dropped(self) -> bool:
        return self.ffn_channels == 0

    @property
    def query_heads(self) -> int:
        return self.kv_heads * self.heads_per_group


@dataclass(frozen=True)
class Architecture:
    """One `LayerShape` per decoder layer of `spec`'s base model."""

    spec: ModelSpec
    layers: tuple[LayerShape, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        s = self.spec
        if len(self.layers) != s.num_layers:
            raise ArchitectureError(
                f"architecture has {len(self.layers)} layers but {s.base_model} has {s.num_layers}; "
                "give one LayerShape per decoder layer"
            )
        for i, layer in enumerate(self.layers):
            limits = (
                ("kv_heads", layer.kv_heads, s.num_kv_heads),
                ("heads_per_group", layer.heads_per_group, s.group_size),
                ("ffn_channels", layer.ffn_channels, s.intermediate_size),
            )
            for name, value, limit in limits:
                if value > limit:
                    raise ArchitectureError(
                        f"layer {i}: {name}={value} but {s.base_model} has only {limit}; lower it to <= {limit}"
                    )

    @classmethod
    def full(cls, spec: ModelSpec) -> Architecture:
        shape = LayerShape(spec.num_kv_heads, spec.group_size, spec.intermediate_size)
        return cls(spec, (shape,) * spec.num_layers)

    def params(self) -> int:
        """Parameter count of the sliced model, embeddings and LM head included (as model cards count)."""
        s = self.spec
        attention = sum(s.attention_params(x.kv_heads, x.heads_per_group) for x in self.layers)
        return s.shared_params() + attention + sum(s.mlp_params(x.ffn_channels) for x in self.layers)

    def is_full(self) -> bool:
        return self == Architecture.full(self.spec)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "layers": [asdict(x) for x in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        try:
            layers = tuple(LayerShape(**x) for x in data["layers"])
            return cls(ModelSpec.from_dict(data["spec"]), layers)
        except (KeyError, TypeError) as err:
            raise ArchitectureError(f"not an architecture record ({err}); expected keys 'spec' and 'layers'") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        return cls.from_dict(json.loads(text))


def format_count(n: float) -> str:
    """A parameter count as people write it: 6.74B, 350M, 12.3K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))
