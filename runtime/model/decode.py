"""KV-cache decoding and temperature sampling for salt models.

The cache holds every layer's rotary-embedded keys and the values, ``k, v`` of shape
``[L, B, S, G, K]`` (``S`` cache positions). :func:`extend` runs ``s`` new tokens at positions
``start … start+s-1`` through the model: each layer computes their ``q, k, v`` with the
transformer's own blocks (:func:`salt.runtime.model.transformer.layer_qkv` /
``layer_output``), writes ``k, v`` into the cache at ``start`` and lets every new query attend
to the cached keys at positions up to its own (causal; the plain float32 softmax of the
``naive`` attention). A decoding step is then one token's work instead of a forward over the
whole sequence. Prefix-LM masks are not supported (sampling is causal).

:func:`sample_fill` fills a batch of fixed-length rows after a per-row prefix with tokens drawn
from ``softmax(logits / temperature)`` over the tokenizer's ``vocab`` ids, one cached step per
position, by the Gumbel-max trick: ``argmax(logits / τ + g)`` with ``g`` standard Gumbel noise
is distributed as ``softmax(logits / τ)``. The noise of row ``b`` at position ``s`` is drawn
from ``fold_in(keys[b], s)``, so rows given the same key use the same random numbers
("common random numbers": :mod:`salt.runtime.eval.xi` pairs completions that way).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from salt.reference.config import ModelConfig
from salt.runtime.model import transformer as model


def init_cache(config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty cache for ``batch`` rows of up to ``length`` positions."""
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _cached_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, visible_TxS):
    """Attention of ``T`` queries over ``S`` cache positions (``visible_TxS``: key visible),
    float32 softmax as the naive attention; result in float32 after rounding to q's dtype."""
    B, T, H, K = q_BxTxHxK.shape
    G = k_BxSxGxK.shape[2]
    R = H // G
    f32 = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)
    q_BxTxGxRxK = q_BxTxHxK.astype(f32).reshape(B, T, G, R, K)
    s_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK.astype(f32)) / np.sqrt(K)
    s_BxGxRxTxS = jnp.where(visible_TxS[None, None, None], s_BxGxRxTxS, -jnp.inf)
    p = jax.nn.softmax(s_BxGxRxTxS, axis=-1)
    o = jnp.einsum("bgrts,bsgk->btgrk", p, v_BxSxGxK.astype(f32))
    return o.reshape(B, T, H, K).astype(q_BxTxHxK.dtype).astype(jnp.float32)


def extend(params: dict, cache: dict, tokens_BxT, start, config: ModelConfig, *, dtype=jnp.float32):
    """Logits ``[B, T, V]`` (float32) of ``tokens_BxT`` at positions ``start … start+T-1``
    given the cache's positions ``< start``, and the cache with their keys and values written.

    ``start`` may be traced (a loop index); ``start + T`` must not exceed the cache length.
    The logits equal :func:`salt.runtime.model.transformer.forward`'s at those positions (up to
    float32 rounding: the cached softmax runs over the whole cache, masked)."""
    dtype = jnp.dtype(dtype)
    T = tokens_BxT.shape[1]
    S = cache["k"].shape[2]
    positions_T = start + jnp.arange(T)
    visible_TxS = jnp.arange(S)[None, :] <= positions_T[:, None]
    h_BxTxD = model.embed_tokens(params, tokens_BxT, config)

    def body(h_BxTxD, xs):
        layer, k_BxSxGxK, v_BxSxGxK = xs
        q, k, v = model.layer_qkv(h_BxTxD, layer, config, dtype, positions_T)
        k_BxSxGxK = jax.lax.dynamic_update_slice(k_BxSxGxK, k.astype(k_BxSxGxK.dtype), (0, start, 0, 0))
        v_BxSxGxK = jax.lax.dynamic_update_slice(v_BxSxGxK, v.astype(v_BxSxGxK.dtype), (0, start, 0, 0))
        attn = _cached_attention(q, k_BxSxGxK, v_BxSxGxK, visible_TxS)
        return model.layer_output(h_BxTxD, attn, layer, config, dtype), (k_BxSxGxK, v_BxSxGxK)

    h_BxTxD, (k_all, v_all) = jax.lax.scan(body, h_BxTxD, (params["layers"], cache["k"], cache["v"]))
    logits_BxTxV = model.logits_from_hidden(params, model.final_norm(params, h_BxTxD, config, dtype))
    return logits_BxTxV, {"k": k_all, "v": v_all}


@functools.lru_cache(maxsize=16)
def _fill_fn(config: ModelConfig, vocab: int, dtype: str):
    """Compiled ``(params, tokens_BxT1, prefix_len_B, keys_Bx2, temperature) -> tokens_BxT1``."""
    compute_dtype = jnp.dtype(dtype)

    def run(params, tokens_BxT1, prefix_len_B, keys_Bx2, temperature):
        B, T1 = tokens_BxT1.shape
        cache = init_cache(config, B, T1 - 1, compute_dtype)

        def gumbel_V(key, s):
            return jax.random.gumbel(jax.random.fold_in(key, s), (vocab,), jnp.float32)

        def step(s, carry):
            tokens_BxT1, cache = carry
            token_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxT1, s, 1, axis=1)
            logits_Bx1xV, cache = extend(params, cache, token_Bx1, s, config, dtype=compute_dtype)
            noise_BxV = jax.vmap(gumbel_V, in_axes=(0, None))(keys_Bx2, s)
            drawn_B = jnp.argmax(logits_Bx1xV[:, 0, :vocab] / temperature + noise_BxV, axis=-1)
            given_B = jax.lax.dynamic_slice_in_dim(tokens_BxT1, s + 1, 1, axis=1)[:, 0]
            next_B = jnp.where(s + 1 < prefix_len_B, given_B, drawn_B.astype(tokens_BxT1.dtype))
            tokens_BxT1 = jax.lax.dynamic_update_slice_in_dim(tokens_BxT1, next_B[:, None], s + 1, axis=1)
            return tokens_BxT1, cache

        tokens_BxT1, _ = jax.lax.fori_loop(0, T1 - 1, step, (tokens_BxT1, cache))
        return tokens_BxT1

    return jax.jit(run)


def sample_fill(params: dict, config: ModelConfig, tokens_BxT1, prefix_len_B, keys_Bx2, *,
                temperature: float = 1.0, vocab: int | None = None, dtype: str = "float32") -> np.ndarray:
    """Rows ``tokens_BxT1`` whose positions ``>= prefix_len_B[b]`` are replaced by tokens sampled
    one at a time from the model given everything before them (temperature ``temperature``,
    ids below ``vocab``, default the model's whole vocabulary).

    ``prefix_len_B`` in ``[1, T1]`` (the first token is always given); ``keys_Bx2``: one
    ``jax.random.PRNGKey`` per row (rows with equal keys share their Gumbel noise).
    Compiles once per ``(B, T1)``."""
    tokens_BxT1 = np.asarray(tokens_BxT1, dtype=np.int32)
    prefix_len_B = np.asarray(prefix_len_B, dtype=np.int32)
    keys_Bx2 = np.asarray(keys_Bx2, dtype=np.uint32)
    vocab = config.vocab_size if vocab is None else int(vocab)
    if tokens_BxT1.ndim != 2 or tokens_BxT1.shape[1] < 1:
        raise ValueError(f"tokens must be [batch, length >= 1], got shape {tokens_BxT1.shape}")
    B, T1 = tokens_BxT1.shape
    if prefix_len_B.shape != (B,) or prefix_len_B.min(initial=1) < 1 or prefix_len_B.max(initial=1) > T1:
        raise ValueError(f"prefix_len must be {B} integers in [1, {T1}]")
    if keys_Bx2.shape != (B, 2):
        raise ValueError(f"keys must be [{B}, 2] (one PRNG key per row), got shape {keys_Bx2.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 1 <= vocab <= config.vocab_size:
        raise ValueError(f"vocab must be in [1, {config.vocab_size}], got {vocab}")
    if T1 == 1:
        return tokens_BxT1.copy()
    fn = _fill_fn(config, vocab, str(jnp.dtype(dtype)))
    return np.asarray(fn(params, tokens_BxT1, prefix_len_B, keys_Bx2, jnp.float32(temperature)))
