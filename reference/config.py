"""Model configuration, presets and the exact parameter layout.

This file is the contract every part of SALT shares (reference, kernels, runtime):
the names, shapes and order of the parameters, and the architecture conventions.

Architecture (docs/design.md §5), written once here so that all implementations agree:

* tokens ``x_BxT`` -> ``h = embed[x] * sqrt(d_model)``  (tied embedding ``embed_VxD``)
* per layer ``l`` (layers are stacked along a leading axis ``L`` for ``lax.scan``):
    - ``a = rmsnorm(h) * attn_norm[l]``  with ``rmsnorm(x) = x / sqrt(mean(x**2, -1) + norm_eps)``
    - ``q = a @ wq[l]`` -> ``[B, T, n_heads, head_dim]``;
      ``k = a @ wk[l]``, ``v = a @ wv[l]`` -> ``[B, T, n_kv_heads, head_dim]``
    - rotary embedding on q and k, "half split" convention: with ``half = head_dim // 2``,
      ``inv_freq[i] = rope_base ** (-2 i / head_dim)``, ``angle[t, i] = t * inv_freq[i]`` (t = 0-based position),
      ``x1, x2 = x[..., :half], x[..., half:]``,
      ``rope(x) = concat(x1 cos - x2 sin, x2 cos + x1 sin)``
    - query head ``j`` uses key/value head ``j // (n_heads // n_kv_heads)``
    - scores ``q.k / sqrt(head_dim)``; key ``s`` visible from query ``t`` iff ``s <= t`` or
      ``s < prefix_len[b]`` (prefix-LM; ``prefix_len = 0`` is causal); softmax over keys
    - ``h = h + concat_heads(attn) @ wo[l]``
    - ``m = rmsnorm(h) * mlp_norm[l]``;  ``h = h + (gelu_tanh(m @ w_gate[l]) * (m @ w_up[l])) @ w_down[l]``
      with ``gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``
* ``logits_BxTxV = (rmsnorm(h) * final_norm) @ embed.T``
* no biases anywhere.

Training windows hold ``T + 1`` tokens: inputs are ``w[:, :-1]``, labels ``w[:, 1:]``.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        for field in ("vocab_size", "n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{field} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


def param_shapes(config: ModelConfig) -> dict:
    """Nested dict of parameter shapes: the one parameter layout of SALT.

    Flattened names (for .npz files and checkpoints) join the keys with "/",
    e.g. ``layers/wq``.
    """
    c = config
    L, D, F, hd = c.n_layers, c.d_model, c.d_ff, c.head_dim
    return {
        "embed": (c.vocab_size, D),
        "layers": {
            "attn_norm": (L, D),
            "wq": (L, D, c.n_heads * hd),
            "wk": (L, D, c.n_kv_heads * hd),
            "wv": (L, D, c.n_kv_heads * hd),
            "wo": (L, c.n_heads * hd, D),
            "mlp_norm": (L, D),
            "w_gate": (L, D, F),
            "w_up": (L, D, F),
            "w_down": (L, F, D),
        },
        "final_norm": (D,),
    }


def flatten_params(tree: dict, prefix: str = "") -> dict:
    """{"layers": {"wq": x}} -> {"layers/wq": x} (sorted keys)."""
    out = {}
    for key in sorted(tree):
        value = tree[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, name + "/"))
        else:
            out[name] = value
    return out


def unflatten_params(flat: dict) -> dict:
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def param_count(config: ModelConfig, *, embedding: bool = True) -> int:
    """Exact number of parameters (tied embedding counted once)."""
    flat = flatten_params(param_shapes(config))
    return sum(math.prod(s) for n, s in flat.items() if embedding or n != "embed")


PAPER_VOCAB = 256000
# The paper's SALT hyperparameters (docs/design.md §2, §4), written once: distillation weight ω,
# teacher temperature ρ (Q = softmax(ρ·t)) and the selection score's top-k.
PAPER_OMEGA, PAPER_RHO, PAPER_K = 0.667, 0.25, 10

PRESETS: dict[str, ModelConfig] = {
    # The paper's models (docs/design.md §5, paper appendix E and §I).
    "paper-1.5b": ModelConfig("paper-1.5b", PAPER_VOCAB, 44, 1024, 8192, 4, 4),
    "paper-2.8b": ModelConfig("paper-2.8b", PAPER_VOCAB, 92, 1024, 8192, 4, 1),
    "paper-8.6b": ModelConfig("paper-8.6b", PAPER_VOCAB, 32, 4096, 16384, 32, 1),
    # Unit-test sizes (vocabulary small enough for float64 finite differences).
    "tiny-teacher": ModelConfig("tiny-teacher", 64, 1, 16, 32, 2, 2),
    "tiny-student": ModelConfig("tiny-student", 64, 2, 16, 32, 2, 1),
    # CPU experiment sizes (salt reproduce): student ~2x the teacher's non-embedding size.
    # The vocabulary is set from the tokenizer at run time (see with_vocab).
    "small-teacher": ModelConfig("small-teacher", 4096, 2, 128, 512, 4, 4),
    "small-student": ModelConfig("small-student", 4096, 4, 128, 512, 4, 1),
    # The default `salt reproduce` student (docs/reproduction.md): 4 layers d_model 192, MQA,
    # d_ff 4·d; with small-teacher as its SLM (~2.2x the teacher's non-embedding size).
    "repro-student": ModelConfig("repro-student", 4096, 4, 192, 768, 4, 1),
}

# Presets whose vocabulary follows the data's tokenizer rather than the preset.
VOCAB_FROM_DATA = {"tiny-teacher", "tiny-student", "small-teacher", "small-student",
                   "repro-student"}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
