"""salt.kernels.mqa_attention (naive / xla / pallas-interpret) against a float64 NumPy reference.

Error measure: max |x - ref| / max |ref| over the whole array (fixed tolerances: float32 1e-5,
bfloat16 inputs 2e-2); NaN or inf never passes.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salt.kernels import default_impl
from salt.kernels.attention import AttentionBlockSizes, mqa_attention
from salt.kernels.attention import common as attn_common
from salt.kernels.attention import tpu as attn_tpu
from salt.reference.model import attention_mask

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


# ---------------------------------------------------------------------------------------------
# float64 NumPy reference: straightforward masked softmax and its hand-written backward.
# ---------------------------------------------------------------------------------------------

def reference_attention(q, k, v, prefix_B, do=None):
    """q [B,T,H,d], k/v [B,T,KV,d] (float64); returns o and, with do, (dq, dk, dv)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, d = q.shape
    G = H // k.shape[2]
    k_h = np.repeat(k, G, axis=2)  # query head j uses kv head j // G
    v_h = np.repeat(v, G, axis=2)
    scale = 1.0 / math.sqrt(d)
    s = np.einsum("bthd,bshd->bhts", q, k_h) * scale
    mask = attention_mask(T, np.asarray(prefix_B))[:, None]  # [B, 1, T, S]
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", p, v_h)
    if do is None:
        return o
    do = np.asarray(do, np.float64)
    dv_h = np.einsum("bhts,bthd->bshd", p, do)
    dp = np.einsum("bthd,bshd->bhts", do, v_h)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
    dq = np.einsum("bhts,bshd->bthd", ds, k_h) * scale
    dk_h = np.einsum("bhts,bthd->bshd", ds, q) * scale
    fold = lambda x: x.reshape(B, T, -1, G, d).sum(3)  # sum the group's query heads
    return o, (dq, fold(dk_h), fold(dv_h))


def rel_err(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    assert np.all(np.isfinite(x)), "non-finite values in the result"
    scale = np.max(np.abs(ref))
    # An all-zero reference (e.g. dq with a single visible key) is compared absolutely.
    return float(np.max(np.abs(x - ref)) / (scale if scale > 0 else 1.0))


def make_inputs(seed, B, T, H, KV, d, dtype):
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal(shape).astype(np.float32)
                   for shape in ((B, T, H, d), (B, T, KV, d), (B, T, KV, d), (B, T, H, d)))
    # Round to the test dtype first, so the float64 reference sees exactly the kernel's inputs.
    q, k, v, do = (jnp.asarray(x, dtype) for x in (q, k, v, do))
    return (q, k, v, do), [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v, do)]


def check_against_reference(impl, H, KV, dtype, prefix, *, T=19, d=16, blocks=None, grads=True,
                            interpret=False, seed=0):
    B = 1 if prefix is None else len(prefix)
    (q, k, v, do), (q64, k64, v64, do64) = make_inputs(seed, B, T, H, KV, d, dtype)
    prefix_arr = None if prefix is None else jnp.asarray(prefix, jnp.int32)
    prefix_ref = np.zeros(B, int) if prefix is None else np.asarray(prefix)
    f = lambda q, k, v: mqa_attention(q, k, v, prefix_arr, impl=impl, interpret=interpret,
                                      block_sizes=blocks)
    tol = TOL[dtype]
    if not grads:
        out = f(q, k, v)
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, reference_attention(q64, k64, v64, prefix_ref)) <= tol
        return
    # One jitted program for forward + backward: compiles once instead of dispatching eagerly.
    out, grads_out = jax.jit(lambda q, k, v, do: (lambda o, vjp: (o, vjp(do)))(*jax.vjp(f, q, k, v)))(
        q, k, v, do)
    o_ref, grads_ref = reference_attention(q64, k64, v64, prefix_ref, do64)
    assert out.dtype == dtype and out.shape == q.shape
    errors = {"o": rel_err(out, o_ref)}
    for name, g, g_ref, x in zip(("dq", "dk", "dv"), grads_out, grads_ref, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
        errors[name] = rel_err(g, g_ref)
    assert max(errors.values()) <= tol, errors


SMALL_BLOCKS = AttentionBlockSizes(block_q=8, block_k=16, block_q_bwd=16, block_k_bwd=8)
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
# Per-example prefix lengths: causal, partial (inside a key block), on a block edge, full (T=19).
PREFIXES = [0, 5, 16, 19]


# ---------------------------------------------------------------------------------------------
# naive and xla
# ---------------------------------------------------------------------------------------------

# bfloat16 for the shared-kv layouts (GQA, MQA); MHA only needs float32 on top of them.
@pytest.mark.slow
@pytest.mark.parametrize("H,KV,dtype", [(H, KV, jnp.float32) for H, KV in HEADS]
                         + [(H, KV, jnp.bfloat16) for H, KV in HEADS if KV < H])
def test_xla_matches_reference_prefix_lm(H, KV, dtype):
    check_against_reference("xla", H, KV, dtype, PREFIXES, blocks=SMALL_BLOCKS)


@pytest.mark.parametrize("H,KV,dtype", [(4, 2, jnp.float32), (4, 1, jnp.bfloat16)])
def test_naive_matches_reference_prefix_lm(H, KV, dtype):
    check_against_reference("naive", H, KV, dtype, PREFIXES)


def test_xla_matches_reference_causal_default_blocks():
    # prefix None = causal; default block sizes (one block covers the whole ragged sequence).
    check_against_reference("xla", 4, 1, jnp.float32, None, T=37)


def test_xla_many_blocks_and_odd_sizes():
    # block_q != block_k, several blocks of each, T not a multiple of either.
    blocks = AttentionBlockSizes(block_q=8, block_k=24)
    check_against_reference("xla", 6, 2, jnp.float32, [0, 11, 45, 33], T=45, d=8, blocks=blocks)


@pytest.mark.parametrize("T", [1, 3])
def test_xla_tiny_sequences(T):
    check_against_reference("xla", 2, 1, jnp.float32, [0, T], T=T, d=8, blocks=SMALL_BLOCKS)


def test_xla_large_logits_finite():
    # Scores of magnitude ~1e3: the online softmax must not overflow.
    (q, k, v, _), (q64, k64, v64, _) = make_inputs(3, 2, 24, 2, 1, 8, jnp.float32)
    q, q64 = q * 300.0, q64 * 300.0
    prefix = jnp.array([0, 10], jnp.int32)
    out = mqa_attention(q, k, v, prefix, impl="xla", block_sizes=SMALL_BLOCKS)
    assert rel_err(out, reference_attention(q64, k64, v64, np.array([0, 10]))) <= 1e-5


def test_causal_flag_and_prefix_conventions():
    (q, k, v, _), _ = make_inputs(1, 2, 13, 4, 2, 8, jnp.float32)
    T = 13
    for impl in ("xla",):  # the lambdas below are used only inside their own iteration
        jitted = jax.jit(lambda p: mqa_attention(q, k, v, p, impl=impl, block_sizes=SMALL_BLOCKS))  # noqa: B023
        run = lambda p, **kw: (mqa_attention(q, k, v, p, impl=impl, block_sizes=SMALL_BLOCKS, **kw)  # noqa: B023
                               if kw or p is None else jitted(p))  # noqa: B023
        none, zero = run(None), run(jnp.zeros(2, jnp.int32))
        np.testing.assert_array_equal(np.asarray(none), np.asarray(zero))
        full, bidir = run(jnp.full(2, T, jnp.int32)), run(None, causal=False)
        np.testing.assert_array_equal(np.asarray(full), np.asarray(bidir))
        # Out-of-range prefix lengths are clipped to [0, T].
        np.testing.assert_array_equal(np.asarray(run(jnp.array([-3, 99], jnp.int32))),
                                      np.asarray(run(jnp.array([0, T], jnp.int32))))
        assert not np.allclose(np.asarray(none), np.asarray(full))


def test_jit_with_traced_prefix():
    (q, k, v, _), (q64, k64, v64, _) = make_inputs(2, 3, 20, 4, 1, 8, jnp.float32)
    f = jax.jit(lambda q, k, v, p: mqa_attention(q, k, v, p, impl="xla", block_sizes=SMALL_BLOCKS))
    prefix = np.array([3, 0, 20])
    out = f(q, k, v, jnp.asarray(prefix, jnp.int32))
    assert rel_err(out, reference_attention(q64, k64, v64, prefix)) <= 1e-5


def test_xla_does_not_materialise_scores():
    """Compiled fwd+bwd temp memory of the xla path stays well below one f32 [B, H, T, T] array."""
    B, T, H, KV, d = 1, 2048, 4, 1, 32
    spec = jax.ShapeDtypeStruct
    args = (spec((B, T, H, d), jnp.float32), spec((B, T, KV, d), jnp.float32),
            spec((B, T, KV, d), jnp.float32), spec((B, T, H, d), jnp.float32))

    def fwd_bwd(impl):
        def f(q, k, v, do):
            out, vjp = jax.vjp(lambda q, k, v: mqa_attention(q, k, v, impl=impl), q, k, v)
            return out, vjp(do)
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    scores_bytes = B * H * T * T * 4
    xla_temp = fwd_bwd("xla")
    assert xla_temp < scores_bytes / 4, (xla_temp, scores_bytes)
    assert fwd_bwd("naive") >= scores_bytes  # the measure does see a materialised [T, T]


# ---------------------------------------------------------------------------------------------
# pallas (TPU kernels in the TPU interpreter)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pallas_gqa_prefix_lm_f32():
    # GQA, both heads of a group in one block (block_h=2); per-example prefix lengths.
    check_against_reference("pallas", 4, 2, jnp.float32, PREFIXES, blocks=SMALL_BLOCKS,
                            interpret=True)


@pytest.mark.slow
def test_pallas_mqa_prefix_lm_bf16():
    check_against_reference("pallas", 4, 1, jnp.bfloat16, [0, 7, 19], blocks=SMALL_BLOCKS,
                            interpret=True)


def test_pallas_mha_causal_forward():
    check_against_reference("pallas", 2, 2, jnp.float32, None, T=30,
                            blocks=AttentionBlockSizes(block_q=16, block_k=8), grads=False,
                            interpret=True)


@pytest.mark.slow
def test_pallas_tpu_config_with_padded_head_dim():
    """The exact TPU configuration (128-row blocks, hd 64 zero-padded to a 128-lane slice), run in
    the TPU interpreter: forward and gradients against the float64 reference."""
    import dataclasses

    from jax.experimental.pallas import tpu as pltpu

    B, T, H, KV, d = 2, 20, 2, 1, 64
    (q, k, v, do), (q64, k64, v64, do64) = make_inputs(6, B, T, H, KV, d, jnp.float32)
    cfg, t_pad = attn_tpu.make_config(T, H // KV, 1.0 / math.sqrt(d), AttentionBlockSizes(),
                                     interpret=False, head_dim=d)
    assert (cfg.head_dim, cfg.block_q, t_pad) == (128, 128, 128)
    cfg = dataclasses.replace(cfg, interpret=pltpu.InterpretParams())
    prefix = np.array([0, 9])

    def f(q, k, v):
        q2, k2, v2 = (attn_tpu.layout(x, t_pad, cfg.head_dim) for x in (q, k, v))
        out = attn_tpu.flash(q2, k2, v2, jnp.asarray(prefix, jnp.int32), cfg)
        return out.reshape(B, t_pad, H, cfg.head_dim)[:, :T, :, :d]

    out, vjp = jax.vjp(f, q, k, v)
    o_ref, grads_ref = reference_attention(q64, k64, v64, prefix, do64)
    assert rel_err(out, o_ref) <= 1e-5
    for g, g_ref in zip(vjp(do), grads_ref):
        assert rel_err(g, g_ref) <= 1e-5


@pytest.mark.slow
def test_pallas_race_detection():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
    from jax.experimental.pallas import tpu as pltpu

    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    # Small but with 2 blocks on every grid axis (the race detector is slow per grid point).
    B, T, H, KV, d = 2, 14, 2, 1, 8
    blocks = AttentionBlockSizes(block_q=8, block_k=8, block_q_bwd=8, block_k_bwd=8)
    (q, k, v, do), _ = make_inputs(4, B, T, H, KV, d, jnp.float32)
    cfg, t_pad, q2, k2, v2 = attn_tpu.kernel_inputs(q, k, v, blocks, params)
    assert (t_pad // cfg.block_q, t_pad // cfg.block_k) == (2, 2)
    do2 = attn_tpu.layout(do, t_pad, cfg.head_dim)
    prefix = jnp.array([0, 9], jnp.int32)
    o2, lse = attn_tpu.pallas_forward(q2, k2, v2, prefix, cfg)
    jax.block_until_ready(o2)
    assert not tpu_interpret.races.races_found, "race in the forward kernel"
    di = attn_tpu.row_dot(do2, o2, cfg)
    jax.block_until_ready(attn_tpu.pallas_dq(q2, k2, v2, do2, lse, di, prefix, cfg))
    assert not tpu_interpret.races.races_found, "race in the dq kernel"
    jax.block_until_ready(attn_tpu.pallas_dkv(q2, k2, v2, do2, lse, di, prefix, cfg))
    assert not tpu_interpret.races.races_found, "race in the dk/dv kernel"


# ---------------------------------------------------------------------------------------------
# Block skipping (compute and DMA)
# ---------------------------------------------------------------------------------------------

def brute_force_block_visibility(T, t_pad, bq, bk, prefix):
    """[nq, nk] bool: some (query, key) pair of the block is visible, from the element mask."""
    mask_TxS = attention_mask(T, np.array([prefix]))[0]
    padded = np.zeros((t_pad, t_pad), bool)
    padded[:T, :T] = mask_TxS
    return padded.reshape(t_pad // bq, bq, t_pad // bk, bk).any(axis=(1, 3))


@pytest.mark.slow
def test_pallas_skips_fully_masked_blocks():
    # MQA with two head blocks (block_h=1): dk/dv reduce over head blocks and query blocks.
    B, T, H, KV, d = 3, 21, 2, 1, 8
    blocks = AttentionBlockSizes(block_q=8, block_k=8, block_h=1, block_q_bwd=16, block_k_bwd=8)
    (q, k, v, _), _ = make_inputs(5, B, T, H, KV, d, jnp.float32)
    prefix = np.array([0, 11, 21])
    fwd, dq, dkv, cfg, t_pad = attn_tpu.block_counts(q, k, v, prefix, blocks)
    n_hb = (H // KV) // cfg.block_h
    for b in range(B):
        vis_f = brute_force_block_visibility(T, t_pad, cfg.block_q, cfg.block_k, prefix[b])
        vis_b = brute_force_block_visibility(T, t_pad, cfg.block_q_bwd, cfg.block_k_bwd, prefix[b])
        # forward / dq: per (head block, q block) the number of computed key blocks
        np.testing.assert_array_equal(np.asarray(fwd[b]),
                                      np.broadcast_to(vis_f.sum(1), fwd[b].shape))
        np.testing.assert_array_equal(np.asarray(dq[b]),
                                      np.broadcast_to(vis_b.sum(1), dq[b].shape))
        # dk/dv: per key block, computed (head block, q block) pairs
        np.testing.assert_array_equal(np.asarray(dkv[b]),
                                      np.broadcast_to(n_hb * vis_b.sum(0), dkv[b].shape))
    # Causal rows really skip work (T=21 padded to 32: 3x3 real blocks, 6 visible when causal).
    assert t_pad == 32 and cfg.block_h == 1
    assert int(fwd[0].sum()) == 6 * KV * n_hb
    assert int(fwd[2].sum()) == 3 * 3 * KV * n_hb  # full prefix: only padding is skipped


@pytest.mark.parametrize("bq,bk", [(8, 8), (8, 24), (16, 8), (24, 16)])
def test_dma_clamping_fetches_only_visible_blocks(bq, bk):
    """The index maps' clamped block indices walk exactly the visible blocks, each fetched once."""
    T = 45
    t_pad = -(-T // math.lcm(bq, bk)) * math.lcm(bq, bk)
    nq, nk = t_pad // bq, t_pad // bk
    for prefix in (0, 1, 7, 23, 45):
        vis = brute_force_block_visibility(T, t_pad, bq, bk, prefix)
        for qi in range(nq):
            for kj in range(nk):
                assert bool(attn_common.block_visible(qi, kj, prefix, bq, bk, T)) == vis[qi, kj]
            # forward / dq: key blocks fetched while the k axis runs 0..nk-1
            fetched = [int(attn_common.kv_block_index(qi, kj, prefix, bq, bk, T)) for kj in range(nk)]
            assert fetched == sorted(fetched)  # monotone: a block is never fetched twice
            if vis[qi].any():
                assert sorted(set(fetched)) == list(np.flatnonzero(vis[qi])), (prefix, qi)
            else:  # a block of padding queries: one (repeated) fetch at most
                assert len(set(fetched)) == 1 and qi * bq >= T
        for kj in range(nk):
            # dk/dv: query blocks fetched while the q axis runs 0..nq-1
            fetched = [int(attn_common.q_block_index(qi, kj, prefix, bq, bk, T)) for qi in range(nq)]
            assert fetched == sorted(fetched)
            if vis[:, kj].any():
                assert sorted(set(fetched)) == list(np.flatnonzero(vis[:, kj])), (prefix, kj)
            else:  # a block of padding keys
                assert len(set(fetched)) == 1 and kj * bk >= T


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    q = jnp.zeros((2, 8, 4, 8))
    kv = jnp.zeros((2, 8, 2, 8))
    with pytest.raises(ValueError, match="impl"):
        mqa_attention(q, kv, kv, impl="cuda")
    with pytest.raises(ValueError, match="rank 4"):
        mqa_attention(q[0], kv, kv)
    with pytest.raises(ValueError, match="not divisible"):
        mqa_attention(q, jnp.zeros((2, 8, 3, 8)), jnp.zeros((2, 8, 3, 8)))
    with pytest.raises(ValueError, match="does not match"):
        mqa_attention(q, jnp.zeros((2, 9, 2, 8)), jnp.zeros((2, 9, 2, 8)))
    with pytest.raises(ValueError, match="same shape"):
        mqa_attention(q, kv, jnp.zeros((2, 8, 1, 8)))
    with pytest.raises(ValueError, match="dtype"):
        mqa_attention(q, kv.astype(jnp.bfloat16), kv)
    with pytest.raises(ValueError, match="prefix_len"):
        mqa_attention(q, kv, kv, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="prefix_len"):
        mqa_attention(q, kv, kv, jnp.zeros(2, jnp.float32))
    with pytest.raises(ValueError, match="block_q"):
        AttentionBlockSizes(block_q=12)
    with pytest.raises(ValueError, match="block_h"):
        mqa_attention(q, kv, kv, impl="pallas", interpret=True,
                      block_sizes=AttentionBlockSizes(block_h=3))
    with pytest.raises(ValueError, match="multiple of 128"):
        mqa_attention(q, kv, kv, impl="pallas", block_sizes=AttentionBlockSizes(block_q=64))


def test_default_impl_on_cpu_is_xla():
    assert default_impl() == "xla"


def test_tpu_block_fitting_limits_padding():
    # On the TPU a default block is halved (down to 128 lanes) while that shortens the padding.
    default = AttentionBlockSizes()
    for T, block, t_pad in [(300, 128, 384), (1280, 256, 1280), (1100, 128, 1152), (100, 128, 128),
                            (129, 256, 256)]:
        cfg, padded = attn_tpu.make_config(T, 4, 1.0, default, interpret=False)
        assert (cfg.block_q, cfg.block_k, padded) == (block, block, t_pad), T
    # Head sizes are padded to whole lane tiles on the TPU only.
    assert attn_tpu.make_config(64, 1, 1.0, default, interpret=False, head_dim=64)[0].head_dim == 128
    assert attn_tpu.make_config(64, 1, 1.0, default, interpret=False, head_dim=256)[0].head_dim == 256
    assert attn_tpu.make_config(64, 1, 1.0, default, interpret=True, head_dim=16)[0].head_dim == 16
    # Interpret mode keeps the requested sizes (capped at T rounded up to 8).
    cfg, padded = attn_tpu.make_config(19, 4, 1.0, SMALL_BLOCKS, interpret=True)
    assert (cfg.block_q, cfg.block_k, cfg.block_q_bwd, cfg.block_k_bwd, padded) == (8, 16, 16, 8, 32)
