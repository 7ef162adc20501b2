"""The KV-cache decoder (salt.runtime.model.decode) against the full forward, and its temperature
sampler against the model's own distribution."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_tolerances import F32_TOL, assert_close
from salt.reference.config import ModelConfig
from salt.runtime.model import decode
from salt.runtime.model import transformer as model

MQA = ModelConfig("dec-mqa", 40, 2, 16, 32, 4, 1)
GQA = ModelConfig("dec-gqa", 40, 3, 24, 48, 6, 2)
SMALL_V = ModelConfig("dec-v8", 8, 2, 16, 32, 2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("config", [MQA, GQA], ids=lambda c: c.name)
def test_cached_logits_equal_full_forward(config):
    params = model.init_params(config, 3)
    tokens_BxT = np.random.default_rng(0).integers(0, config.vocab_size, (3, 13)).astype(np.int32)
    full_BxTxV = np.asarray(model.forward(params, jnp.asarray(tokens_BxT), config), np.float64)
    cache = decode.init_cache(config, 3, 16)
    got = []
    # a prefill of 5, single tokens, then a block of 3 and single tokens again
    for start, stop in [(0, 5), (5, 6), (6, 7), (7, 10), (10, 11), (11, 12), (12, 13)]:
        logits, cache = decode.extend(params, cache, jnp.asarray(tokens_BxT[:, start:stop]), start, config)
        got.append(np.asarray(logits))
    assert_close(np.concatenate(got, axis=1), full_BxTxV, F32_TOL, f"{config.name} cached logits")


def test_cached_logits_under_jit_with_traced_start():
    params = model.init_params(MQA, 1)
    tokens_BxT = np.random.default_rng(1).integers(0, MQA.vocab_size, (2, 9)).astype(np.int32)
    full = np.asarray(model.forward(params, jnp.asarray(tokens_BxT), MQA), np.float64)
    step = jax.jit(lambda p, c, t, s: decode.extend(p, c, t, s, MQA))
    cache = decode.init_cache(MQA, 2, 9)
    got = []
    for s in range(9):
        logits, cache = step(params, cache, jnp.asarray(tokens_BxT[:, s:s + 1]), jnp.int32(s))
        got.append(np.asarray(logits))
    assert_close(np.concatenate(got, axis=1), full, F32_TOL, "jitted one-token steps")


def test_sample_fill_keeps_prefixes_and_validates():
    params = model.init_params(MQA, 2)
    tokens = np.random.default_rng(2).integers(0, MQA.vocab_size, (4, 7)).astype(np.int32)
    prefix = np.array([1, 3, 7, 6])
    keys = np.stack([np.asarray(jax.random.PRNGKey(i)) for i in range(4)])
    out = decode.sample_fill(params, MQA, tokens, prefix, keys, vocab=30)
    for b in range(4):
        assert (out[b, :prefix[b]] == tokens[b, :prefix[b]]).all()
        assert (out[b, prefix[b]:] < 30).all()
    # same key, same prefix -> same completion (common random numbers)
    same = decode.sample_fill(params, MQA, tokens[[1, 1]], prefix[[1, 1]], keys[[0, 0]])
    assert (same[0] == same[1]).all()
    with pytest.raises(ValueError, match="prefix_len"):
        decode.sample_fill(params, MQA, tokens, np.array([0, 1, 1, 1]), keys)
    with pytest.raises(ValueError, match="temperature"):
        decode.sample_fill(params, MQA, tokens, prefix, keys, temperature=0.0)


def _chi2_critical(df: int, z: float) -> float:
    """Upper quantile of chi-square(df) at the normal quantile ``z`` (Wilson–Hilferty; within
    about 1% of the exact value for df >= 10)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampler_matches_model_distribution_two_steps(temperature):
    """Joint frequencies of the two sampled tokens (x3, x4) after a fixed prefix of 3 against
    softmax(logits / τ) from the full forward: P(x3) · P(x4 | x3). Pearson chi-square over the
    64 cells (cells with expected count < 5 pooled) must stay below the chi-square quantile at
    z = 4.27 (p = 1e-5): a correct sampler fails with probability 1e-5; a sampler that ignored τ
    or drew the second token from the wrong context exceeds it by orders of magnitude at 60,000
    draws. Fixed seed, so the outcome is deterministic."""
    params = model.init_params(SMALL_V, 5)
    prefix = np.array([1, 4, 6], np.int32)
    n = 60_000
    tokens = np.zeros((n, 5), np.int32)
    tokens[:, :3] = prefix
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(11), n))
    out = decode.sample_fill(params, SMALL_V, tokens, np.full(n, 3), keys, temperature=temperature)
    counts = np.zeros((8, 8))
    np.add.at(counts, (out[:, 3], out[:, 4]), 1)

    def probs(seq):
        logits = model.forward(params, jnp.asarray([seq], jnp.int32), SMALL_V)[0, -1]
        return np.asarray(jax.nn.softmax(np.asarray(logits, np.float64) / temperature))

    p3 = probs(prefix)
    joint = np.stack([p3[a] * probs(np.append(prefix, a)) for a in range(8)])
    expected = n * joint.ravel()
    observed = counts.ravel()
    big = expected >= 5
    e = np.append(expected[big], expected[~big].sum())
    o = np.append(observed[big], observed[~big].sum())
    stat = float(((o - e) ** 2 / np.maximum(e, 1e-12)).sum())
    df = len(e) - 1
    assert stat < _chi2_critical(df, 4.27), (stat, df)
