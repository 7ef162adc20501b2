"""The reference Transformer in NumPy: initialisation, forward and a hand-written backward.

The architecture and the parameter layout are the ones fixed in ``salt.reference.config``
(read its module docstring); this file implements them op by op, readable first.
Every op runs in the dtype of the parameters, so casting the parameters to float64
gives the float64 reference that defines the golden values.

Initialisation (``init_params``), deterministic for a given seed: one
``numpy.random.default_rng(seed)`` draws a float64 standard normal tensor for every
parameter in the order of ``flatten_params(param_shapes(config))`` (sorted flattened
names: ``embed``, ``final_norm``, ``layers/attn_norm``, ``layers/mlp_norm``,
``layers/w_down``, ``layers/w_gate``, ``layers/w_up``, ``layers/wk``, ``layers/wo``,
``layers/wq``, ``layers/wv``), even for the norms (drawn then discarded), then scales it:

* ``embed``: std ``1/sqrt(d_model)`` (so ``embed[x] * sqrt(d_model)`` has unit scale);
* matrices ``wq, wk, wv, w_gate, w_up``: std ``1/sqrt(fan_in)`` (fan_in = the ``D`` or
  ``F`` input axis);
* output projections ``wo, w_down``: std ``1/sqrt(fan_in) / sqrt(2 * n_layers)``;
* norm scales ``attn_norm, mlp_norm, final_norm`` (and ``q_norm, k_norm``): ones;
* with the architecture options of ``salt.reference.config``: biases ``bq, bk, bv`` zeros (drawn
  and discarded like the norms); a separate head ``lm_head``: std ``1/sqrt(d_model)``.

and finally casts to ``dtype``. The JAX runtime loads these exact arrays.

Forward/backward entry points:

* ``forward(params, tokens_BxT, config, prefix_len_B=None, return_cache=False)``
  -> ``logits_BxTxV`` (or ``(logits_BxTxV, cache)``; ``cache["hidden_BxTxD"]`` is the
  final normed hidden state, the input of the tied LM head);
* ``hidden_states(...)`` -> the final normed hidden state alone;
* ``backward(params, cache, dlogits_BxTxV, config)`` -> gradients, same nested structure;
* ``loss_and_grad(params, tokens_BxT1, config, teacher_logits=None, omega=0.0, rho=1.0,
  mask=None, prefix_len=None)`` -> ``(loss, grads, metrics)`` with the docs/design.md §2
  loss averaged over valid target positions.

Why one module of ~410 lines: the readable reference is the forward and its hand-written backward
read top to bottom, layer by layer; splitting them would separate each op from its gradient.
"""
from __future__ import annotations

import math

import numpy as np

from salt.reference import losses
from salt.reference.config import (ModelConfig, embed_multiplier, flatten_params, param_shapes, rope_inv_freq,
                                   unflatten_params)

GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


# ----------------------------------------------------------------------------- init

def init_params(config: ModelConfig, seed: int, dtype=np.float32) -> dict:
    """Deterministic initial parameters (see the module docstring for the scheme)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    out = {}
    two_l = 2.0 * config.n_layers
    for name, shape in flatten_params(param_shapes(config)).items():
        draw = rng.standard_normal(shape)
        leaf = name.split("/")[-1]
        if leaf.endswith("norm"):
            value = np.ones(shape)
        elif leaf in ("bq", "bk", "bv"):
            value = np.zeros(shape)
        elif leaf in ("embed", "lm_head"):
            value = draw / math.sqrt(config.d_model)
        else:
            fan_in = shape[-2]
            std = 1.0 / math.sqrt(fan_in)
            if leaf in ("wo", "w_down"):
                std /= math.sqrt(two_l)
            value = draw * std
        out[name] = value.astype(dtype)
    return unflatten_params(out)


def cast_params(params: dict, dtype) -> dict:
    """A copy of the nested params with every leaf cast to ``dtype``."""
    return unflatten_params({k: np.asarray(v, dtype=dtype) for k, v in flatten_params(params).items()})


def check_params(params: dict, config: ModelConfig) -> None:
    """ValueError naming the first parameter whose name or shape differs from the layout."""
    want = flatten_params(param_shapes(config))
    have = flatten_params(params)
    if set(want) != set(have):
        raise ValueError(f"params: names {sorted(have)} do not match the layout {sorted(want)}")
    for name, shape in want.items():
        if tuple(np.shape(have[name])) != tuple(shape):
            raise ValueError(f"params[{name!r}] has shape {np.shape(have[name])}, expected {shape}")


# ----------------------------------------------------------------------------- ops

def rmsnorm(x, scale, eps):
    """Returns (y, rinv) with y = x * rinv * scale, rinv = 1/sqrt(mean(x^2) + eps)."""
    rinv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * rinv * scale, rinv


def rmsnorm_backward(dy, x, rinv, scale):
    """Gradients (dx, dscale) of y = x * rinv(x) * scale; dscale summed over leading axes."""
    dscale = np.sum((dy * x * rinv).reshape(-1, x.shape[-1]), axis=0)
    dxhat = dy * scale
    dx = rinv * dxhat - x * rinv ** 3 * np.mean(dxhat * x, axis=-1, keepdims=True)
    return dx, dscale


def dense(x_NxI, w_IxO):
    """``x @ w`` over the last axis of ``x`` (any leading axes), as one 2-D matrix product."""
    out = x_NxI.reshape(-1, x_NxI.shape[-1]) @ w_IxO
    return out.reshape(*x_NxI.shape[:-1], w_IxO.shape[-1])


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_K * (x + GELU_C * x * x * x)))


def gelu_tanh_grad(x):
    th = np.tanh(GELU_K * (x + GELU_C * x * x * x))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_K * (1.0 + 3.0 * GELU_C * x * x)


def silu(x):
    return x / (1.0 + np.exp(-x))


def silu_grad(x):
    sig = 1.0 / (1.0 + np.exp(-x))
    return sig * (1.0 + x * (1.0 - sig))


ACTIVATIONS = {"gelu_tanh": (gelu_tanh, gelu_tanh_grad), "silu": (silu, silu_grad)}


def rope_tables(seq_len: int, head_dim: int, base: float, dtype, inv_freq=None):
    """cos/sin tables [T, head_dim/2]: angle[t, i] = t * inv_freq[i], by default
    ``inv_freq[i] = base ** (-2 i / head_dim)`` (``salt.reference.config.rope_inv_freq``)."""
    half = head_dim // 2
    if inv_freq is None:
        inv_freq = base ** (-2.0 * np.arange(half, dtype=np.float64) / head_dim)
    angle_TxJ = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angle_TxJ).astype(dtype), np.sin(angle_TxJ).astype(dtype)


def rope(x_BxTxHxK, cos_TxJ, sin_TxJ, inverse=False):
    """Half-split rotary embedding; ``inverse=True`` rotates back (= the transpose)."""
    half = x_BxTxHxK.shape[-1] // 2
    x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:]
    c = cos_TxJ[None, :, None, :]
    s = sin_TxJ[None, :, None, :]
    if inverse:
        s = -s
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _norm_scale(w, config: ModelConfig):
    """The RMS norm's multiplier: ``w``, or ``norm_offset + w`` (Gemma's ``1 + w``)."""
    return w + w.dtype.type(config.norm_offset) if config.norm_offset else w


def head_matrix(params: dict, config: ModelConfig):
    """The LM head ``[V, D]``: the tied embedding, or ``lm_head``."""
    return params["embed"] if config.tied_head else params["lm_head"]


def attention_mask(seq_len: int, prefix_len_B) -> np.ndarray:
    """Boolean [B, T(query), S(key)]: key s visible from query t iff s <= t or s < prefix_len[b]."""
    t = np.arange(seq_len)
    causal_TxS = t[None, :] <= t[:, None]
    prefix_BxS = t[None, :] < np.asarray(prefix_len_B)[:, None]
    return causal_TxS[None] | prefix_BxS[:, None, :]


def _check_tokens(tokens_BxT, config):
    tokens_BxT = np.asarray(tokens_BxT)
    if tokens_BxT.ndim != 2 or not np.issubdtype(tokens_BxT.dtype, np.integer):
        raise ValueError(f"tokens must be an integer array [B, T], got dtype {tokens_BxT.dtype} "
                         f"shape {tokens_BxT.shape}")
    if tokens_BxT.size and (tokens_BxT.min() < 0 or tokens_BxT.max() >= config.vocab_size):
        bad = tokens_BxT[(tokens_BxT < 0) | (tokens_BxT >= config.vocab_size)][0]
        raise ValueError(f"tokens: id {int(bad)} outside the vocabulary [0, {config.vocab_size})")
    return tokens_BxT


def _check_prefix(prefix_len_B, batch, seq_len):
    if prefix_len_B is None:
        return np.zeros(batch, dtype=np.int64)
    prefix_len_B = np.asarray(prefix_len_B)
    if prefix_len_B.ndim == 0:
        prefix_len_B = np.full(batch, prefix_len_B)
    if prefix_len_B.shape != (batch,) or not np.issubdtype(prefix_len_B.dtype, np.integer):
        raise ValueError(f"prefix_len must be an integer array of shape ({batch},), got "
                         f"{prefix_len_B.dtype} {prefix_len_B.shape}")
    if prefix_len_B.min() < 0 or prefix_len_B.max() > seq_len:
        raise ValueError(f"prefix_len values must lie in [0, {seq_len}], got {prefix_len_B.tolist()}")
    return prefix_len_B.astype(np.int64)


# ----------------------------------------------------------------------------- forward

def forward(params: dict, tokens_BxT, config: ModelConfig, prefix_len_B=None,
            return_cache: bool = False):
    """Logits [B, T, V] (and the cache that ``backward`` needs when ``return_cache``)."""
    check_params(params, config)
    tokens_BxT = _check_tokens(tokens_BxT, config)
    B, T = tokens_BxT.shape
    prefix_len_B = _check_prefix(prefix_len_B, B, T)
    embed = params["embed"]
    dtype = embed.dtype
    c = config
    H, G, K = c.n_heads, c.n_kv_heads, c.head_dim
    R = H // G
    cos_TxJ, sin_TxJ = rope_tables(T, K, c.rope_base, dtype, _inv_freq(c))
    mask_Bx1x1xTxS = attention_mask(T, prefix_len_B)[:, None, None]
    scale = 1.0 / math.sqrt(K)
    act = ACTIVATIONS[c.activation][0]

    h_BxTxD = embed[tokens_BxT] * dtype.type(embed_multiplier(c))
    layers = []
    for l in range(c.n_layers):
        p = {k: v[l] for k, v in params["layers"].items()}
        lc = {"h_in": h_BxTxD}
        a_BxTxD, lc["attn_rinv"] = rmsnorm(h_BxTxD, _norm_scale(p["attn_norm"], c), c.norm_eps)
        q, k, v = dense(a_BxTxD, p["wq"]), dense(a_BxTxD, p["wk"]), dense(a_BxTxD, p["wv"])
        if c.qkv_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        q, k, v_BxTxGxK = q.reshape(B, T, H, K), k.reshape(B, T, G, K), v.reshape(B, T, G, K)
        if c.qk_norm:
            lc.update(q_raw=q, k_raw=k)
            q, lc["q_rinv"] = rmsnorm(q, _norm_scale(p["q_norm"], c), c.norm_eps)
            k, lc["k_rinv"] = rmsnorm(k, _norm_scale(p["k_norm"], c), c.norm_eps)
        qr = rope(q, cos_TxJ, sin_TxJ)
        kr = rope(k, cos_TxJ, sin_TxJ)
        # query head j = kv * R + r uses key/value head kv = j // R (R = H / G queries per kv head)
        q_BxGxRxTxK = qr.reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4)
        k_BxGx1xSxK = kr.transpose(0, 2, 1, 3)[:, :, None]
        v_BxGx1xSxK = v_BxTxGxK.transpose(0, 2, 1, 3)[:, :, None]
        scores = (q_BxGxRxTxK @ k_BxGx1xSxK.swapaxes(-1, -2)) * dtype.type(scale)
        scores = np.where(mask_Bx1x1xTxS, scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs_BxGxRxTxS = np.exp(scores)
        probs_BxGxRxTxS /= probs_BxGxRxTxS.sum(axis=-1, keepdims=True)
        o_BxGxRxTxK = probs_BxGxRxTxS @ v_BxGx1xSxK
        o_BxTxHK = o_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(B, T, H * K)
        h_BxTxD = h_BxTxD + dense(o_BxTxHK, p["wo"])
        lc.update(a=a_BxTxD, q=q_BxGxRxTxK, k=k_BxGx1xSxK, v=v_BxGx1xSxK,
                  probs=probs_BxGxRxTxS, o=o_BxTxHK, h_mid=h_BxTxD)
        m_BxTxD, lc["mlp_rinv"] = rmsnorm(h_BxTxD, _norm_scale(p["mlp_norm"], c), c.norm_eps)
        gate_BxTxF = dense(m_BxTxD, p["w_gate"])
        up_BxTxF = dense(m_BxTxD, p["w_up"])
        z_BxTxF = act(gate_BxTxF) * up_BxTxF
        h_BxTxD = h_BxTxD + dense(z_BxTxF, p["w_down"])
        lc.update(m=m_BxTxD, gate=gate_BxTxF, up=up_BxTxF, z=z_BxTxF)
        layers.append(lc)
    hidden_BxTxD, final_rinv = rmsnorm(h_BxTxD, _norm_scale(params["final_norm"], c), c.norm_eps)
    logits_BxTxV = dense(hidden_BxTxD, head_matrix(params, c).T)
    if not return_cache:
        return logits_BxTxV
    cache = {"tokens": tokens_BxT, "prefix_len": prefix_len_B, "layers": layers,
             "h_final": h_BxTxD, "final_rinv": final_rinv, "hidden_BxTxD": hidden_BxTxD,
             "cos": cos_TxJ, "sin": sin_TxJ}
    return logits_BxTxV, cache


def _inv_freq(config: ModelConfig):
    """None for the default rotary frequencies (computed by ``rope_tables`` as always)."""
    return None if config.rope_scaling == "none" else rope_inv_freq(config)


def hidden_states(params: dict, tokens_BxT, config: ModelConfig, prefix_len_B=None):
    """The final normed hidden state [B, T, D] (the input of the LM head)."""
    return forward(params, tokens_BxT, config, prefix_len_B, return_cache=True)[1]["hidden_BxTxD"]


# ----------------------------------------------------------------------------- backward

def backward(params: dict, cache: dict, dlogits_BxTxV, config: ModelConfig) -> dict:
    """Gradients of ``sum(dlogits * logits)`` w.r.t. every parameter (nested like params)."""
    c = config
    embed = params["embed"]
    dtype = embed.dtype
    tokens_BxT = cache["tokens"]
    B, T = tokens_BxT.shape
    D, H, G, K = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    R = H // G
    dlogits_BxTxV = np.asarray(dlogits_BxTxV, dtype=dtype)
    if dlogits_BxTxV.shape != (B, T, c.vocab_size):
        raise ValueError(f"dlogits has shape {dlogits_BxTxV.shape}, expected {(B, T, c.vocab_size)}")
    scale = dtype.type(1.0 / math.sqrt(K))
    cos_TxJ, sin_TxJ = cache["cos"], cache["sin"]

    act_grad = ACTIVATIONS[c.activation]
    # LM head: logits = hidden @ head.T (head = embed when tied)
    hidden_NxD = cache["hidden_BxTxD"].reshape(-1, D)
    dlogits_NxV = dlogits_BxTxV.reshape(-1, c.vocab_size)
    d_head = dlogits_NxV.T @ hidden_NxD
    d_embed = d_head if c.tied_head else np.zeros_like(embed)
    dhidden_BxTxD = (dlogits_NxV @ head_matrix(params, c)).reshape(B, T, D)
    dh, d_final_norm = rmsnorm_backward(dhidden_BxTxD, cache["h_final"], cache["final_rinv"],
                                        _norm_scale(params["final_norm"], c))

    dlayers = {k: np.zeros_like(v) for k, v in params["layers"].items()}
    for l in reversed(range(c.n_layers)):
        p = {k: v[l] for k, v in params["layers"].items()}
        lc = cache["layers"][l]
        # MLP: h = h_mid + z @ w_down
        m_NxD = lc["m"].reshape(-1, D)
        dh_NxD = dh.reshape(-1, D)
        dlayers["w_down"][l] = lc["z"].reshape(-1, c.d_ff).T @ dh_NxD
        dz = dense(dh, p["w_down"].T)
        gate, up = lc["gate"], lc["up"]
        dup = dz * act_grad[0](gate)
        dgate = dz * up * act_grad[1](gate)
        dlayers["w_gate"][l] = m_NxD.T @ dgate.reshape(-1, c.d_ff)
        dlayers["w_up"][l] = m_NxD.T @ dup.reshape(-1, c.d_ff)
        dm = dense(dgate, p["w_gate"].T) + dense(dup, p["w_up"].T)
        dx, dlayers["mlp_norm"][l] = rmsnorm_backward(dm, lc["h_mid"], lc["mlp_rinv"],
                                                      _norm_scale(p["mlp_norm"], c))
        dh = dh + dx
        # attention: h_mid = h_in + o @ wo
        dlayers["wo"][l] = lc["o"].reshape(-1, H * K).T @ dh.reshape(-1, D)
        do_BxGxRxTxK = dense(dh, p["wo"].T).reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4)
        probs = lc["probs"]
        dprobs = do_BxGxRxTxK @ lc["v"].swapaxes(-1, -2)
        dv_BxGxSxK = (probs.swapaxes(-1, -2) @ do_BxGxRxTxK).sum(axis=2)
        dscores = probs * (dprobs - np.sum(dprobs * probs, axis=-1, keepdims=True)) * scale
        dq_BxGxRxTxK = dscores @ lc["k"]
        dk_BxGxSxK = (dscores.swapaxes(-1, -2) @ lc["q"]).sum(axis=2)
        dqr = dq_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(B, T, H, K)
        dkr = dk_BxGxSxK.transpose(0, 2, 1, 3)
        dq = rope(dqr, cos_TxJ, sin_TxJ, inverse=True)
        dk = rope(dkr, cos_TxJ, sin_TxJ, inverse=True)
        if c.qk_norm:
            dq, dlayers["q_norm"][l] = rmsnorm_backward(dq, lc["q_raw"], lc["q_rinv"], _norm_scale(p["q_norm"], c))
            dk, dlayers["k_norm"][l] = rmsnorm_backward(dk, lc["k_raw"], lc["k_rinv"], _norm_scale(p["k_norm"], c))
        dq, dk = dq.reshape(-1, H * K), dk.reshape(-1, G * K)
        dv = dv_BxGxSxK.transpose(0, 2, 1, 3).reshape(-1, G * K)
        if c.qkv_bias:
            dlayers["bq"][l], dlayers["bk"][l], dlayers["bv"][l] = dq.sum(0), dk.sum(0), dv.sum(0)
        a_NxD = lc["a"].reshape(-1, D)
        dlayers["wq"][l] = a_NxD.T @ dq
        dlayers["wk"][l] = a_NxD.T @ dk
        dlayers["wv"][l] = a_NxD.T @ dv
        da = (dq @ p["wq"].T + dk @ p["wk"].T + dv @ p["wv"].T).reshape(B, T, D)
        dx, dlayers["attn_norm"][l] = rmsnorm_backward(da, lc["h_in"], lc["attn_rinv"],
                                                       _norm_scale(p["attn_norm"], c))
        dh = dh + dx

    # embedding gather: h0 = embed[tokens] * embed_multiplier  -> scatter-add
    np.add.at(d_embed, tokens_BxT.reshape(-1), dh.reshape(-1, D) * dtype.type(embed_multiplier(c)))
    grads = {"embed": d_embed, "layers": dlayers, "final_norm": d_final_norm}
    if not c.tied_head:
        grads["lm_head"] = d_head
    return grads


# ----------------------------------------------------------------------------- loss

def split_window(tokens_BxT1):
    """Training window [B, T+1] -> (inputs [B, T], labels [B, T])."""
    tokens_BxT1 = np.asarray(tokens_BxT1)
    if tokens_BxT1.ndim != 2 or tokens_BxT1.shape[1] < 2:
        raise ValueError(f"tokens must be a [B, T+1] window with T >= 1, got shape {tokens_BxT1.shape}")
    return tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]


def loss_and_grad(params: dict, tokens_BxT1, config: ModelConfig, teacher_logits=None,
                  omega: float = 0.0, rho: float = 1.0, mask=None, prefix_len=None):
    """Mean docs/design.md §2 loss over valid target positions, its gradients and metrics.

    ``tokens_BxT1``: windows [B, T+1] (inputs ``w[:, :-1]``, labels ``w[:, 1:]``).
    ``teacher_logits``: [B, T, V] for the KD phase, or None (then ``omega`` must be 0 and the
    loss is plain CE). ``mask``: optional [B, T] (bool or 0/1) of valid target positions.
    Metrics (means over valid positions, floats): ``loss``, ``ce``, ``accuracy``, ``n_valid``,
    and with a teacher ``kd`` (soft CE) and ``kl`` (KL(Q||P)).
    """
    inputs_BxT, labels_BxT = split_window(tokens_BxT1)
    B, T = inputs_BxT.shape
    mask_BxT = losses.as_mask(mask, (B, T))
    n_valid = int(mask_BxT.sum())
    if n_valid == 0:
        raise ValueError("mask selects no target position; the mean loss is undefined")
    if teacher_logits is None and omega != 0:
        raise ValueError(f"omega={omega!r} needs teacher_logits (got None)")
    logits_BxTxV, cache = forward(params, inputs_BxT, config, prefix_len, return_cache=True)
    dtype = logits_BxTxV.dtype

    metrics = {}
    if teacher_logits is None:
        parts = {"ce": losses.ce_loss(logits_BxTxV, labels_BxT, mask=mask_BxT)}
        parts["loss"] = parts["ce"]
        dloss_BxTxV = losses.ce_loss_grad(logits_BxTxV, labels_BxT, mask=mask_BxT)
    else:
        if np.shape(teacher_logits) != logits_BxTxV.shape:
            raise ValueError(f"teacher_logits has shape {np.shape(teacher_logits)}, "
                             f"expected {logits_BxTxV.shape}")
        parts = losses.loss_parts(logits_BxTxV, teacher_logits, labels_BxT, omega, rho, mask=mask_BxT)
        dloss_BxTxV = losses.kd_loss_grad(logits_BxTxV, teacher_logits, labels_BxT, omega, rho,
                                          mask=mask_BxT)
        metrics["kd"] = losses.mean_over_mask(parts["kd"], mask_BxT)
        metrics["kl"] = losses.mean_over_mask(parts["kl"], mask_BxT)
    metrics["ce"] = losses.mean_over_mask(parts["ce"], mask_BxT)
    loss = losses.mean_over_mask(parts["loss"], mask_BxT)
    # losses are float64; the gradient of the mean goes back in the parameters' dtype
    dlogits_BxTxV = (dloss_BxTxV / n_valid).astype(dtype)
    grads = backward(params, cache, dlogits_BxTxV, config)
    correct = (logits_BxTxV.argmax(axis=-1) == labels_BxT) & mask_BxT
    metrics.update(loss=float(loss), accuracy=float(correct.sum()) / n_valid, n_valid=n_valid)
    return float(loss), grads, metrics
