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

Architecture options (the fields after ``norm_eps``; their defaults are SALT's architecture above,
and :meth:`ModelConfig.to_dict` leaves out those at their default, so the presets are unchanged).
They cover the Llama family (Llama 2 / 3.x, Mistral, SmolLM2), Qwen2 / 2.5, Qwen3 and Gemma 1
(docs/interop.md maps them to the Hugging Face fields):

* ``activation``: ``"gelu_tanh"`` (above) or ``"silu"`` (``x * sigmoid(x)``) in the gated MLP;
* ``tied_head``: True: ``logits = hidden @ embed.T``; False: a separate ``lm_head_VxD``
  (``logits = hidden @ lm_head.T``; the fused losses take that matrix in place of ``embed``);
* ``embed_scale``: the multiplier of ``embed[x]`` (None: ``sqrt(d_model)``; Llama: 1.0);
* ``norm_offset``: every RMS norm multiplies by ``norm_offset + w`` (0: ``w``; Gemma: 1, ``1 + w``);
* ``attn_head_dim``: the head dimension when it is not ``d_model / n_heads`` (Gemma 7B: 256);
* ``qkv_bias``: ``q = a @ wq[l] + bq[l]`` (and ``bk``, ``bv``; Qwen2);
* ``qk_norm``: RMS norm over each head's ``head_dim`` of q and k (scales ``q_norm[l]``,
  ``k_norm[l]``, shape ``[head_dim]``) before the rotary embedding (Qwen3);
* ``rope_scaling``: ``"none"``; ``"linear"`` (``inv_freq / rope_factor``); ``"llama3"`` (Llama 3.1's
  wavelength-dependent rescaling with ``rope_factor``, ``rope_low_freq_factor``,
  ``rope_high_freq_factor``, ``rope_original_max_len``; :func:`rope_inv_freq`).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


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
    # architecture options (module docstring); the defaults are SALT's own architecture
    activation: str = "gelu_tanh"
    tied_head: bool = True
    embed_scale: float | None = None
    norm_offset: float = 0.0
    attn_head_dim: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    def __post_init__(self):
        for field in ("vocab_size", "n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{field} must be a positive integer, got {value!r}")
        if self.attn_head_dim is not None and (not isinstance(self.attn_head_dim, int)
                                               or isinstance(self.attn_head_dim, bool) or self.attn_head_dim < 1):
            raise ValueError(f"ModelConfig.attn_head_dim must be a positive integer or None, "
                             f"got {self.attn_head_dim!r}")
        if self.attn_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"ModelConfig.rope_scaling must be one of {ROPE_SCALINGS}, "
                             f"got {self.rope_scaling!r}")
        for field in ("tied_head", "qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"ModelConfig.{field} must be true or false, got {getattr(self, field)!r}")
        if self.embed_scale is not None and not (isinstance(self.embed_scale, (int, float))
                                                 and math.isfinite(self.embed_scale)):
            raise ValueError(f"ModelConfig.embed_scale must be a finite number or None, got {self.embed_scale!r}")
        if self.rope_scaling != "none" and not self.rope_factor > 0:
            raise ValueError(f"ModelConfig.rope_factor must be positive, got {self.rope_factor!r}")
        if self.rope_scaling == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor and self.rope_original_max_len > 0):
            raise ValueError("ModelConfig: llama3 RoPE scaling needs 0 < rope_low_freq_factor < "
                             f"rope_high_freq_factor and rope_original_max_len > 0, got "
                             f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}, "
                             f"{self.rope_original_max_len}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.attn_head_dim is None else self.attn_head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a dict; architecture options at their default are left out (so the
        configs of SALT's own architecture read as before)."""
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in ARCH_OPTIONS and d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


ACTIVATIONS = ("gelu_tanh", "silu")
ROPE_SCALINGS = ("none", "linear", "llama3")
ARCH_OPTIONS = ("activation", "tied_head", "embed_scale", "norm_offset", "attn_head_dim", "qkv_bias",
                "qk_norm", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_len")


def embed_multiplier(config: ModelConfig) -> float:
    """The factor of ``embed[x]`` (``sqrt(d_model)`` unless ``embed_scale`` is set)."""
    return math.sqrt(config.d_model) if config.embed_scale is None else float(config.embed_scale)


def rope_inv_freq(config: ModelConfig):
    """float64 ``inv_freq[i]`` of the rotary embedding, ``i < head_dim / 2``, after ``rope_scaling``
    (the formulas of Hugging Face's ``rope_type`` "linear" and "llama3")."""
    K = config.head_dim
    inv_freq = config.rope_base ** (-2.0 * np.arange(K // 2, dtype=np.float64) / K)
    if config.rope_scaling == "linear":
        return inv_freq / config.rope_factor
    if config.rope_scaling == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_len
        wavelen = 2.0 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled)
    return inv_freq


def param_shapes(config: ModelConfig) -> dict:
    """Nested dict of parameter shapes: the one parameter layout of SALT.

    Flattened names (for .npz files and checkpoints) join the keys with "/",
    e.g. ``layers/wq``.
    """
    c = config
    L, D, F, hd = c.n_layers, c.d_model, c.d_ff, c.head_dim
    layers = {
        "attn_norm": (L, D),
        "wq": (L, D, c.n_heads * hd),
        "wk": (L, D, c.n_kv_heads * hd),
        "wv": (L, D, c.n_kv_heads * hd),
        "wo": (L, c.n_heads * hd, D),
        "mlp_norm": (L, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if c.qkv_bias:
        layers.update(bq=(L, c.n_heads * hd), bk=(L, c.n_kv_heads * hd), bv=(L, c.n_kv_heads * hd))
    if c.qk_norm:
        layers.update(q_norm=(L, hd), k_norm=(L, hd))
    shapes = {"embed": (c.vocab_size, D), "layers": layers, "final_norm": (D,)}
    if not c.tied_head:
        shapes["lm_head"] = (c.vocab_size, D)
    return shapes


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
    """Exact number of parameters (tied embedding counted once; ``embedding=False`` leaves out
    the embedding and a separate head)."""
    flat = flatten_params(param_shapes(config))
    return sum(math.prod(s) for n, s in flat.items() if embedding or n not in ("embed", "lm_head"))


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
