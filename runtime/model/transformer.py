"""The pure-JAX SALT transformer (architecture and parameter layout of ``reference/config.py``).

Parameters are a nested dict of float32 arrays in THE layout of
:func:`salt.reference.config.param_shapes`; the layers are stacked along a leading axis
and run with :func:`jax.lax.scan`, so compile time does not grow with depth.

Precision: parameters stay float32.  With ``dtype=jnp.bfloat16`` the matrix multiplications
run on bfloat16 operands (float32 accumulation), while the residual stream, the RMS norms,
the attention softmax and the logits stay float32.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from salt.reference.config import ModelConfig, embed_multiplier, flatten_params, param_shapes, rope_inv_freq
from salt.kernels.attention import mqa_attention

ATTENTION_IMPLS = ("naive", "xla", "pallas")


# ----------------------------------------------------------------------------- parameters
def init_params(config: ModelConfig, seed: int) -> dict:
    """Initial parameters (float32 ``jnp`` arrays) for ``config`` from an integer ``seed``.

    Uses the NumPy reference's ``init_params`` when it is available (built on the host: for
    tests and tools that compare with the reference); otherwise :func:`init_params_jax`.
    The trainer initialises with :func:`init_params_jax` on the devices instead.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    ref_init = _reference_init()
    if ref_init is None:
        return init_params_jax(config, int(seed))
    params = ref_init(config, int(seed))
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, dtype=np.float32)), params)


def _reference_init() -> Callable | None:
    # imported here, guarded: ``salt.reference`` imports numba (the eq. 11 twin), which an image
    # may lack (the GPU device check's); models are then initialised by init_params_jax
    try:
        from salt.reference.model import init_params as ref_init
    except ImportError:
        return None
    return ref_init


def init_params_jax(config: ModelConfig, seed: int, *, out_shardings=None) -> dict:
    """Initialisation in one jitted JAX program (no host copy; ``out_shardings`` places it
    directly on a mesh, for models too large for the NumPy reference init). Same scheme as
    the reference (normal, std 1/sqrt(fan_in), output projections also / sqrt(2 L), embedding
    std 1/sqrt(d_model), norm scales one) but different random numbers."""
    fn = jax.jit(functools.partial(_init_params_jax, config), out_shardings=out_shardings)
    return fn(jnp.uint32(seed))


def _init_params_jax(config: ModelConfig, seed) -> dict:
    shapes = param_shapes(config)
    names = ["embed"] + [f"layers/{n}" for n in sorted(shapes["layers"])] + ["final_norm"]
    keys = dict(zip(names, jax.random.split(jax.random.PRNGKey(seed), len(names))))
    out_scale = 1.0 / math.sqrt(2.0 * config.n_layers)

    def normal(name, shape, std):
        return std * jax.random.normal(keys[name], shape, jnp.float32)

    if "lm_head" in shapes:
        keys["lm_head"] = jax.random.fold_in(keys["embed"], 1)
    layers = {}
    for name, shape in shapes["layers"].items():
        if name.endswith("norm"):
            layers[name] = jnp.ones(shape, jnp.float32)
        elif name in ("bq", "bk", "bv"):
            layers[name] = jnp.zeros(shape, jnp.float32)
        else:
            std = 1.0 / math.sqrt(shape[1]) * (out_scale if name in ("wo", "w_down") else 1.0)
            layers[name] = normal(f"layers/{name}", shape, std)
    out = {
        "embed": normal("embed", shapes["embed"], 1.0 / math.sqrt(config.d_model)),
        "layers": layers,
        "final_norm": jnp.ones(shapes["final_norm"], jnp.float32),
    }
    if "lm_head" in shapes:
        out["lm_head"] = normal("lm_head", shapes["lm_head"], 1.0 / math.sqrt(config.d_model))
    return out


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> dict:
    """``jax.ShapeDtypeStruct`` tree of the parameters (for lowering without real arrays)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s), dtype), param_shapes(config),
                        is_leaf=lambda x: isinstance(x, tuple))


def check_params(params: dict, config: ModelConfig) -> None:
    """Raise ValueError naming the first parameter whose shape differs from the layout."""
    want = flatten_params(param_shapes(config))
    got = flatten_params(params)
    if set(want) != set(got):
        raise ValueError(f"parameter names differ from the layout of {config.name}: "
                         f"missing {sorted(set(want) - set(got))}, "
                         f"unexpected {sorted(set(got) - set(want))}")
    for name, shape in want.items():
        if tuple(got[name].shape) != tuple(shape):
            raise ValueError(f"parameter {name} has shape {tuple(got[name].shape)}, "
                             f"expected {tuple(shape)} for {config.name}")


# ----------------------------------------------------------------------------- building blocks
def rmsnorm(x, scale, eps):
    """``x / sqrt(mean(x**2) + eps) * scale`` in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def norm_scale(w, config: ModelConfig):
    """The RMS norm's multiplier: ``w``, or ``norm_offset + w`` (Gemma's ``1 + w``)."""
    return w + config.norm_offset if config.norm_offset else w


def gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x * jax.nn.sigmoid(x)


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "silu": silu}


def rope(x_BxTxHxK, base: float, inv_freq=None, positions_T=None):
    """Rotary embedding of ``H`` heads (query or key/value), half-split convention, positions
    0..T-1 (computed in float32), or the integer positions ``positions_T`` (a KV-cache decoder's
    tokens after the cached ones).
    ``inv_freq``: the frequencies (NumPy, ``salt.reference.config.rope_inv_freq``) when they are
    not ``base ** (-2 i / K)``."""
    T, K = x_BxTxHxK.shape[1], x_BxTxHxK.shape[3]
    half = K // 2
    if inv_freq is None:
        inv_freq_J = base ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / K)
    else:
        inv_freq_J = jnp.asarray(np.asarray(inv_freq, np.float32))
    pos_T = jnp.arange(T, dtype=jnp.float32) if positions_T is None else positions_T.astype(jnp.float32)
    angle_TxJ = pos_T[:, None] * inv_freq_J[None, :]
    cos = jnp.cos(angle_TxJ)[None, :, None, :]
    sin = jnp.sin(angle_TxJ)[None, :, None, :]
    x = x_BxTxHxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(T: int, prefix_len_B=None):
    """Boolean visibility ``[B or 1, T(query), T(key)]``: causal, or prefix-LM."""
    t = jnp.arange(T)
    causal_TxT = t[None, :] <= t[:, None]
    if prefix_len_B is None:
        return causal_TxT[None]
    prefix = jnp.asarray(prefix_len_B)[:, None, None]
    return causal_TxT[None] | (t[None, None, :] < prefix)


def _attention(q, k, v, prefix_len_B, impl: str, mesh=None):
    """Attention through :func:`salt.kernels.mqa_attention` (its ``naive`` path is the plain
    full-size softmax, the cross-check of the ``xla`` and ``pallas`` kernels)."""
    if impl == "naive":
        return mqa_attention(q, k, v, prefix_len=prefix_len_B, impl="naive").astype(jnp.float32)
    kernel_impl = impl

    def kernel(q, k, v, prefix):
        return mqa_attention(q, k, v, prefix_len=prefix, impl=kernel_impl).astype(jnp.float32)

    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, prefix_len_B)
    return _sharded_kernel_attention(kernel, q, k, v, prefix_len_B, mesh)


def _sharded_kernel_attention(kernel, q, k, v, prefix_len_B, mesh):
    """Custom kernels (Pallas) cannot be partitioned by GSPMD: run them under ``shard_map``,
    batch over ``data`` and, when the head counts allow it, query (and kv) heads over
    ``model``; otherwise the heads are replicated along ``model``."""
    from jax.sharding import PartitionSpec as P
    m = mesh.shape.get("model", 1)  # a data-only mesh (score, eval) has no model axis
    H, G = q.shape[2], k.shape[2]
    data = "data" if q.shape[0] % mesh.shape["data"] == 0 else None
    if m > 1 and G == 1 and H % m == 0:
        q_spec, kv_spec = P(data, None, "model", None), P(data, None, None, None)
    elif m > 1 and G % m == 0:
        q_spec = kv_spec = P(data, None, "model", None)
    else:
        q_spec = kv_spec = P(data, None, None, None)
    prefix = jnp.zeros((q.shape[0],), jnp.int32) if prefix_len_B is None else prefix_len_B
    fn = jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(data)),
                       out_specs=q_spec, check_vma=False)
    return fn(q, k, v, jnp.asarray(prefix, jnp.int32))


def _matmul(x_BxTxD, w_DxF, dtype):
    """``x @ w`` over the last axis, as one 2-D ``[B·T, D] @ [D, F]`` matmul (float32 result).

    The leading axes are merged first (a free reshape; a sharded batch axis stays sharded): XLA's
    CPU backend runs the weight gradient of a 2-D matmul much faster than that of the 3-D form,
    whose contraction over two axes it lays out with transposed copies (``salt bench step``)."""
    y = jnp.matmul(x_BxTxD.reshape(-1, x_BxTxD.shape[-1]).astype(dtype), w_DxF.astype(dtype),
                   preferred_element_type=jnp.float32)
    return y.reshape(*x_BxTxD.shape[:-1], w_DxF.shape[-1])


def _layer(h_BxTxD, layer: dict, config: ModelConfig, prefix_len_B, dtype, attention_impl,
           mesh=None):
    q, k, v = layer_qkv(h_BxTxD, layer, config, dtype)
    attn = _attention(q, k, v, prefix_len_B, attention_impl, mesh)
    return layer_output(h_BxTxD, attn, layer, config, dtype)


def layer_qkv(h_BxTxD, layer: dict, config: ModelConfig, dtype, positions_T=None):
    """One layer's attention inputs ``q [B, T, H, K]``, ``k, v [B, T, G, K]`` in ``dtype``
    (rotary at positions 0..T-1, or ``positions_T``)."""
    B, T, _ = h_BxTxD.shape
    H, G, K = config.n_heads, config.n_kv_heads, config.head_dim
    c = config
    a = rmsnorm(h_BxTxD, norm_scale(layer["attn_norm"], c), c.norm_eps)
    q, k, v = (_matmul(a, layer[w], dtype) for w in ("wq", "wk", "wv"))
    if c.qkv_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, G, K), v.reshape(B, T, G, K)
    if c.qk_norm:
        q = rmsnorm(q, norm_scale(layer["q_norm"], c), c.norm_eps)
        k = rmsnorm(k, norm_scale(layer["k_norm"], c), c.norm_eps)
    inv_freq = None if c.rope_scaling == "none" else rope_inv_freq(c)
    q = rope(q, c.rope_base, inv_freq, positions_T).astype(dtype)
    k = rope(k, c.rope_base, inv_freq, positions_T).astype(dtype)
    return q, k, v.astype(dtype)


def layer_output(h_BxTxD, attn_BxTxHxK, layer: dict, config: ModelConfig, dtype):
    """The rest of a layer after attention: output projection, residual, gated MLP."""
    B, T, _ = h_BxTxD.shape
    H, K = config.n_heads, config.head_dim
    c = config
    h_BxTxD = h_BxTxD + _matmul(attn_BxTxHxK.reshape(B, T, H * K), layer["wo"], dtype)
    m = rmsnorm(h_BxTxD, norm_scale(layer["mlp_norm"], c), c.norm_eps)
    gate = ACTIVATIONS[c.activation](_matmul(m, layer["w_gate"], dtype))
    up = _matmul(m, layer["w_up"], dtype)
    return h_BxTxD + _matmul(gate * up, layer["w_down"], dtype)


# ----------------------------------------------------------------------------- model
def embed_tokens(params: dict, tokens_BxT, config: ModelConfig):
    """The residual stream's input ``embed[x] * embed_multiplier`` (float32; √d_model unless the
    architecture says otherwise)."""
    h = jnp.take(params["embed"], tokens_BxT, axis=0).astype(jnp.float32)
    return h * embed_multiplier(config)


def final_norm(params: dict, h_BxTxD, config: ModelConfig, dtype=jnp.float32):
    """The final RMS norm of the residual stream, in ``dtype`` (the LM head's input)."""
    return rmsnorm(h_BxTxD, norm_scale(params["final_norm"], config), config.norm_eps).astype(dtype)


def hidden(params: dict, tokens_BxT, config: ModelConfig, prefix_len_B=None, *,
           dtype=jnp.float32, attention_impl: str = "naive", remat: bool = False, mesh=None):
    """Final normed hidden states ``[B, T, D]`` (before the LM head), in ``dtype``.

    ``mesh``: the device mesh the arrays are sharded on, needed only with kernel attention
    (``attention_impl`` other than "naive") on more than one device (see ``shard_map`` above)."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    if tokens_BxT.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens_BxT.shape}")
    dtype = jnp.dtype(dtype)
    h = embed_tokens(params, tokens_BxT, config)

    def body(h_BxTxD, layer):
        return _layer(h_BxTxD, layer, config, prefix_len_B, dtype, attention_impl, mesh), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    h, _ = jax.lax.scan(body, h, params["layers"])
    return final_norm(params, h, config, dtype)


def head_matrix(params: dict):
    """The LM head ``[V, D]`` the logits and the fused losses take: the tied embedding, or the
    separate ``lm_head`` of a model with ``tied_head=False``."""
    return params["lm_head"] if "lm_head" in params else params["embed"]


def logits_from_hidden(params: dict, hidden_BxTxD):
    """LM head: ``hidden @ head.T`` (:func:`head_matrix`) with float32 accumulation and result."""
    return jnp.einsum("btd,vd->btv", hidden_BxTxD, head_matrix(params).astype(hidden_BxTxD.dtype),
                      preferred_element_type=jnp.float32)


def forward(params: dict, tokens_BxT, config: ModelConfig, prefix_len_B=None, *,
            dtype=jnp.float32, attention_impl: str = "naive", remat: bool = False, mesh=None):
    """Logits ``[B, T, V]`` (float32) for ``tokens_BxT`` (int)."""
    h = hidden(params, tokens_BxT, config, prefix_len_B, dtype=dtype,
               attention_impl=attention_impl, remat=remat, mesh=mesh)
    return logits_from_hidden(params, h)


# ----------------------------------------------------------------------------- FLOP counts
def forward_flops(config: ModelConfig, batch: int, seq_len: int) -> float:
    """Analytic forward FLOPs (2 per multiply-add) of the matmuls: projections, attention
    scores/values (full T x T, as computed), and the LM head."""
    c = config
    D, F, H, G, K, T = c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim, seq_len
    per_token_layer = 2 * D * (H * K + 2 * G * K) + 2 * H * K * D + 3 * 2 * D * F
    attn_per_token_layer = 2 * 2 * H * K * T
    head = 2 * D * c.vocab_size
    return float(batch * T * (c.n_layers * (per_token_layer + attn_per_token_layer) + head))


def train_step_flops(config: ModelConfig, batch: int, seq_len: int) -> float:
    """Forward + backward (= 3x forward) FLOPs of one training step."""
    return 3.0 * forward_flops(config, batch, seq_len)
