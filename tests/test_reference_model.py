"""The NumPy reference model: float64 finite-difference checks of the hand-written backward
(every parameter tensor; MHA/GQA/MQA; causal and prefix-LM), KD-loss gradients, and mask /
rotary sanity properties."""
import math

import numpy as np
import pytest

from salt.reference import losses
from salt.reference.config import flatten_params, get_preset, param_shapes, unflatten_params
from arch_options import OPTION_CONFIGS, perturbed_params
from salt.reference.model import (
    attention_mask, backward, forward, hidden_states, init_params, loss_and_grad, rope, rope_tables)

# Finite differences: 4th-order central stencil, float64. Truncation ~ h^4, round-off
# ~ 1e-16 |f| / h, both far below the tolerance.
FD_STEP = 1e-4
REL_TOL = 1e-6

CONFIGS = {
    "mqa": get_preset("tiny-student"),                                       # 2 heads, 1 kv head
    "mha": get_preset("tiny-teacher"),                                       # 2 heads, 2 kv heads
    "gqa": get_preset("tiny-teacher").replace(name="tiny-gqa", n_layers=2, n_heads=4,
                                              n_kv_heads=2, vocab_size=37),  # 4 heads, 2 kv heads
}


def _fd(f, x0_flat, name, direction):
    def at(step):
        moved = dict(x0_flat)
        moved[name] = x0_flat[name] + step * direction
        return f(unflatten_params(moved))
    h = FD_STEP
    return (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)


def _check_grads(f, params, grads, rng, n_entries=3):
    flat, gflat = flatten_params(params), flatten_params(grads)
    assert set(gflat) == set(flat)
    for name, value in flat.items():
        g = gflat[name]
        assert g.shape == value.shape and g.dtype == np.float64, name
        # directional derivative along a random direction
        direction = np.random.default_rng(rng.integers(1 << 31)).standard_normal(value.shape)
        fd = _fd(f, flat, name, direction)
        an = float(np.sum(g * direction))
        assert abs(fd - an) <= REL_TOL * max(abs(fd), abs(an)), (name, fd, an)
        # individual entries: the largest-magnitude entry and random entries that matter
        # (|g| at least 1% of the tensor's largest), relative error on each
        big = np.flatnonzero(np.abs(g) >= 1e-2 * np.abs(g).max())
        picks = {int(np.argmax(np.abs(g)))} | set(rng.choice(big, size=min(n_entries, big.size),
                                                                replace=False).tolist())
        for idx in picks:
            e = np.zeros(value.size)
            e[idx] = 1.0
            fd = _fd(f, flat, name, e.reshape(value.shape))
            an = float(g.reshape(-1)[idx])
            assert abs(fd - an) <= REL_TOL * max(abs(fd), abs(an)), (name, idx, fd, an)
        # a small (or zero: e.g. embedding rows of unused tokens) entry, relative to the largest
        small = np.flatnonzero(np.abs(g) < 1e-2 * np.abs(g).max())
        if small.size:
            idx = int(rng.choice(small))
            e = np.zeros(value.size)
            e[idx] = 1.0
            fd = _fd(f, flat, name, e.reshape(value.shape))
            assert abs(fd - g.reshape(-1)[idx]) <= REL_TOL * np.abs(g).max(), (name, idx, fd)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("prefix", ["causal", "partial", "full"])
def test_backward_matches_finite_differences(kind, prefix):
    config = CONFIGS[kind]
    rng = np.random.default_rng([sorted(CONFIGS).index(kind), ["causal", "partial", "full"].index(prefix)])
    B, T = 2, 5
    params = init_params(config, seed=3, dtype=np.float64)
    tokens = rng.integers(0, config.vocab_size, (B, T))
    prefix_len = {"causal": None, "partial": np.array([2, 4]), "full": np.array([T, 0])}[prefix]
    w_BxTxV = rng.standard_normal((B, T, config.vocab_size))

    def f(p):
        return float(np.sum(w_BxTxV * forward(p, tokens, config, prefix_len)))

    _, cache = forward(params, tokens, config, prefix_len, return_cache=True)
    grads = backward(params, cache, w_BxTxV, config)
    _check_grads(f, params, grads, rng)


@pytest.mark.parametrize("omega", [0.0, 0.667, 1.0])
@pytest.mark.parametrize("kind", ["mqa", "gqa"])
def test_kd_loss_and_grad_matches_finite_differences(kind, omega):
    config = CONFIGS[kind]
    rng = np.random.default_rng(int(omega * 1000) + len(kind))
    B, T = 2, 4
    params = init_params(config, seed=5, dtype=np.float64)
    window = rng.integers(0, config.vocab_size, (B, T + 1))
    teacher = 3.0 * rng.standard_normal((B, T, config.vocab_size))
    mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=bool)
    prefix_len = np.array([0, 2])
    rho = 0.25

    def f(p):  # the loss from the forward pass alone (no backward per evaluation)
        logits = forward(p, window[:, :-1], config, prefix_len)
        return losses.mean_over_mask(
            losses.kd_loss(logits, teacher, window[:, 1:], omega, rho, mask), mask)

    loss, grads, metrics = loss_and_grad(params, window, config, teacher, omega, rho, mask, prefix_len)
    assert metrics["n_valid"] == 6
    assert math.isclose(metrics["loss"], (1 - omega) * metrics["ce"] + omega * metrics["kd"],
                        rel_tol=1e-12)
    assert metrics["kl"] >= 0
    _check_grads(f, params, grads, rng, n_entries=2)


def test_plain_ce_without_teacher_matches_omega_zero():
    config = CONFIGS["mqa"]
    rng = np.random.default_rng(0)
    params = init_params(config, seed=1, dtype=np.float64)
    window = rng.integers(0, config.vocab_size, (2, 6))
    teacher = rng.standard_normal((2, 5, config.vocab_size))
    a = loss_and_grad(params, window, config)
    b = loss_and_grad(params, window, config, teacher, 0.0, 0.25)
    assert math.isclose(a[0], b[0], rel_tol=1e-12)
    for k, v in flatten_params(a[1]).items():
        np.testing.assert_allclose(v, flatten_params(b[1])[k], rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="omega"):
        loss_and_grad(params, window, config, None, 0.5)


def test_causal_mask_hides_the_future():
    config = CONFIGS["gqa"]
    params = init_params(config, seed=0, dtype=np.float64)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, (1, 8))
    changed = tokens.copy()
    changed[0, 5] = (changed[0, 5] + 1) % config.vocab_size
    a, b = forward(params, tokens, config), forward(params, changed, config)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-6


def test_prefix_positions_see_each_other():
    config = CONFIGS["gqa"]
    params = init_params(config, seed=0, dtype=np.float64)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, config.vocab_size, (1, 8))
    changed = tokens.copy()
    changed[0, 3] = (changed[0, 3] + 1) % config.vocab_size
    prefix = np.array([4])
    a, b = forward(params, tokens, config, prefix), forward(params, changed, config, prefix)
    # position 1 is in the prefix and sees position 3; causal, it would not
    assert np.abs(a[:, :3] - b[:, :3]).max() > 1e-6
    ca, cb = forward(params, tokens, config), forward(params, changed, config)
    np.testing.assert_array_equal(ca[:, :3], cb[:, :3])
    # a prefix still does not reveal what lies after it
    changed2 = tokens.copy()
    changed2[0, 6] = (changed2[0, 6] + 1) % config.vocab_size
    np.testing.assert_array_equal(a[:, :6], forward(params, changed2, config, prefix)[:, :6])
    # prefix_len = T is fully bidirectional; prefix_len 0 and 1 are both causal
    mask = attention_mask(4, np.array([4, 0, 1]))
    assert mask[0].all()
    np.testing.assert_array_equal(mask[1], np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(mask[2], mask[1])


def test_rotary_scores_depend_only_on_relative_position():
    hd = 8
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal(hd), rng.standard_normal(hd)
    T = 12
    cos, sin = rope_tables(T, hd, 10000.0, np.float64)
    qs = rope(np.broadcast_to(q, (1, T, 1, hd)), cos, sin)[0, :, 0]
    ks = rope(np.broadcast_to(k, (1, T, 1, hd)), cos, sin)[0, :, 0]
    dots = qs @ ks.T
    for offset in range(-3, 4):
        vals = [dots[t, t - offset] for t in range(T) if 0 <= t - offset < T]
        np.testing.assert_allclose(vals, vals[0], rtol=1e-12, atol=1e-12)
    # rotation preserves the norm, and the inverse undoes it
    np.testing.assert_allclose(np.linalg.norm(qs, axis=-1), np.linalg.norm(q), rtol=1e-12)
    back = rope(rope(qs[None, :, None], cos, sin, inverse=True), cos, sin)
    np.testing.assert_allclose(back[0, :, 0], qs, rtol=1e-12, atol=1e-12)
    # position 0 is the identity; the half-split convention at position 1
    np.testing.assert_allclose(qs[0], q, atol=0)
    half = hd // 2
    inv = 10000.0 ** (-2.0 * np.arange(half) / hd)
    want = np.concatenate([q[:half] * np.cos(inv) - q[half:] * np.sin(inv),
                           q[half:] * np.cos(inv) + q[:half] * np.sin(inv)])
    np.testing.assert_allclose(qs[1], want, rtol=1e-14)


def test_init_is_deterministic_and_follows_the_layout():
    config = get_preset("tiny-student")
    a = flatten_params(init_params(config, seed=7))
    b = flatten_params(init_params(config, seed=7))
    c = flatten_params(init_params(config, seed=8))
    shapes = flatten_params(param_shapes(config))
    assert set(a) == set(shapes)
    for n in a:
        assert a[n].shape == shapes[n] and a[n].dtype == np.float32
        np.testing.assert_array_equal(a[n], b[n])
    assert not np.array_equal(a["layers/wq"], c["layers/wq"])
    np.testing.assert_array_equal(a["final_norm"], 1.0)
    np.testing.assert_array_equal(a["layers/attn_norm"], 1.0)
    # scales: embed ~ 1/sqrt(D); w_down ~ 1/sqrt(F)/sqrt(2L)
    big = init_params(config.replace(vocab_size=4096), seed=0, dtype=np.float64)
    assert abs(big["embed"].std() * math.sqrt(config.d_model) - 1) < 0.02
    assert abs(big["layers"]["wq"].std() * math.sqrt(config.d_model) - 1) < 0.2
    f64 = init_params(config, seed=7, dtype=np.float64)
    np.testing.assert_array_equal(f64["layers"]["wq"].astype(np.float32), a["layers/wq"])


def test_float32_forward_close_to_float64():
    config = CONFIGS["gqa"]
    p64 = init_params(config, seed=0, dtype=np.float64)
    p32 = init_params(config, seed=0, dtype=np.float32)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 7))
    l64 = forward(p64, tokens, config, np.array([3, 0]))
    l32 = forward(p32, tokens, config, np.array([3, 0]))
    assert l32.dtype == np.float32
    np.testing.assert_allclose(l32, l64, rtol=0, atol=1e-4)
    h = hidden_states(p64, tokens, config)
    np.testing.assert_allclose(h @ p64["embed"].T, forward(p64, tokens, config), rtol=1e-13)


def test_bad_inputs_raise_clear_errors():
    config = CONFIGS["mqa"]
    params = init_params(config, seed=0, dtype=np.float64)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        forward(params, np.array([[0, config.vocab_size]]), config)
    with pytest.raises(ValueError, match="tokens"):
        forward(params, np.zeros((2, 3, 4), int), config)
    with pytest.raises(ValueError, match="prefix_len"):
        forward(params, np.zeros((2, 3), int), config, np.array([0, 4]))
    with pytest.raises(ValueError, match="prefix_len"):
        forward(params, np.zeros((2, 3), int), config, np.array([0]))
    with pytest.raises(ValueError, match="mask"):
        loss_and_grad(params, np.zeros((2, 4), int), config, mask=np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="mask"):
        loss_and_grad(params, np.zeros((2, 4), int), config, mask=np.ones((2, 2), bool))
    for not_0_or_1 in (2, 0.5):  # never silently read as True
        with pytest.raises(ValueError, match="mask must contain only 0/1"):
            loss_and_grad(params, np.zeros((2, 4), int), config, mask=np.full((2, 3), not_0_or_1))
    with pytest.raises(ValueError, match=r"params\['embed'\] has shape \(37, 16\), expected \(64, 16\)"):
        forward(init_params(CONFIGS["gqa"], seed=0), np.zeros((1, 3), int), CONFIGS["mha"])
    with pytest.raises(ValueError, match="teacher"):
        loss_and_grad(params, np.zeros((2, 4), int), config, np.zeros((2, 3, 7)), 0.5, 1.0)
    with pytest.raises(ValueError, match="seed"):
        init_params(config, seed=-1)


@pytest.mark.parametrize("kind", sorted(OPTION_CONFIGS))
@pytest.mark.parametrize("prefix", ["causal", "partial"])
def test_architecture_options_backward_matches_finite_differences(kind, prefix):
    config = OPTION_CONFIGS[kind]
    rng = np.random.default_rng([sorted(OPTION_CONFIGS).index(kind), len(prefix)])
    B, T = 2, 5
    params = perturbed_params(config, seed=4)
    assert set(flatten_params(params)) == set(flatten_params(param_shapes(config)))
    tokens = rng.integers(0, config.vocab_size, (B, T))
    prefix_len = {"causal": None, "partial": np.array([2, 4])}[prefix]
    w_BxTxV = rng.standard_normal((B, T, config.vocab_size))

    def f(p):
        return float(np.sum(w_BxTxV * forward(p, tokens, config, prefix_len)))

    _, cache = forward(params, tokens, config, prefix_len, return_cache=True)
    grads = backward(params, cache, w_BxTxV, config)
    _check_grads(f, params, grads, rng)


def test_architecture_options_change_the_function_and_layout():
    """Each option is used: the layout gains exactly its parameters, and the logits differ from
    the same weights without it."""
    from salt.reference.config import rope_inv_freq
    base = get_preset("tiny-student")
    assert base.head_dim == 8 and "lm_head" not in param_shapes(base)
    untied = base.replace(tied_head=False)
    assert param_shapes(untied)["lm_head"] == (base.vocab_size, base.d_model)
    assert set(param_shapes(base.replace(qkv_bias=True))["layers"]) - set(param_shapes(base)["layers"]) \
        == {"bq", "bk", "bv"}
    assert param_shapes(base.replace(qk_norm=True))["layers"]["q_norm"] == (base.n_layers, base.head_dim)
    assert base.replace(attn_head_dim=12).head_dim == 12
    assert param_shapes(base.replace(attn_head_dim=12))["layers"]["wq"] == (2, 16, 24)
    params = perturbed_params(base, 1)
    tokens = np.arange(6).reshape(1, 6)
    ref = forward(params, tokens, base)
    for change in (dict(activation="silu"), dict(embed_scale=1.0), dict(norm_offset=1.0),
                   dict(rope_scaling="linear", rope_factor=4.0), dict(rope_base=500.0)):
        assert not np.allclose(forward(params, tokens, base.replace(**change)), ref), change
    # llama3 scaling: high frequencies kept, low ones divided by the factor, the middle smoothed
    c = base.replace(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=64)
    plain, scaled = rope_inv_freq(base), rope_inv_freq(c)
    assert scaled[0] == plain[0] and np.allclose(scaled[2:], plain[2:] / 8)
    assert plain[1] / 8 < scaled[1] < plain[1]


def test_default_options_keep_the_config_dict():
    """SALT's own presets serialise without the options (old runs and caches read the same)."""
    from salt.reference.config import PRESETS, ModelConfig
    for config in PRESETS.values():
        d = config.to_dict()
        assert set(d) == {"name", "vocab_size", "n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads",
                          "rope_base", "norm_eps"}
        assert ModelConfig.from_dict(d) == config
    c = OPTION_CONFIGS["llama-qwen2"]
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="activation"):
        get_preset("tiny-student").replace(activation="relu")
    with pytest.raises(ValueError, match="rope_scaling"):
        get_preset("tiny-student").replace(rope_scaling="yarn")
