"""Reference optimisers (against optax's own update, float64) and the reference trainer."""
import math

import numpy as np
import pytest

from salt.reference.config import flatten_params, get_preset
from salt.reference.model import init_params, loss_and_grad
from salt.reference.optim import SGD, AdamW, clip_by_global_norm, global_norm, make_optimizer
from salt.reference.trainer import train, window_batches


def _tree(rng, scale=1.0):
    return {"a": scale * rng.standard_normal((3, 4)),
            "layers": {"w": scale * rng.standard_normal((2, 5)), "n": scale * rng.standard_normal(5)}}


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_matches_optax_float64(kind):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    params = _tree(rng)
    grads_seq = [_tree(rng, scale=s) for s in (0.1, 3.0, 0.5, 2.0, 0.05, 1.0)]
    lrs = [1e-3, 5e-3, 2e-2, 1e-2, 3e-3, 1e-3]
    clip = 1.5
    if kind == "adamw":
        ours = AdamW(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
        tx = optax.chain(optax.clip_by_global_norm(clip),
                         optax.adamw(lambda c: jnp.asarray(lrs)[c], b1=0.9, b2=0.95, eps=1e-8,
                                     weight_decay=0.1))
    else:
        ours = SGD()
        tx = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lambda c: jnp.asarray(lrs)[c]))
    def optax_step(g, state_j, jp):
        upd, state_j = tx.update(g, state_j, jp)
        return optax.apply_updates(jp, upd), state_j

    optax_step = jax.jit(optax_step)  # one compilation, not one per eager op (seconds)
    with jax.enable_x64(True):
        jp = jax.tree.map(jnp.asarray, params)
        state_j = tx.init(jp)
        p, state = params, ours.init(params)
        clipped_any = False
        for g, lr in zip(grads_seq, lrs):
            gc, norm = clip_by_global_norm(g, clip)
            clipped_any |= norm >= clip
            p, state = ours.update(gc, state, p, lr)
            jp, state_j = optax_step(jax.tree.map(jnp.asarray, g), state_j, jp)
            for k, v in flatten_params(p).items():
                want = np.asarray(flatten_params(jax.tree.map(np.asarray, jp))[k])
                np.testing.assert_allclose(v, want, rtol=1e-12, atol=1e-15)
        assert clipped_any


def test_clipping_conventions():
    rng = np.random.default_rng(1)
    g = _tree(rng)
    n = global_norm(g)
    assert math.isclose(n, math.sqrt(sum(float(np.sum(v ** 2)) for v in flatten_params(g).values())))
    same, n2 = clip_by_global_norm(g, n * 1.01)
    assert n2 == n and same is g
    clipped, _ = clip_by_global_norm(g, n / 4)
    assert math.isclose(global_norm(clipped), n / 4, rel_tol=1e-12)
    unclipped, _ = clip_by_global_norm(g, None)
    assert unclipped is g
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm(g, -1.0)
    with pytest.raises(ValueError, match="b2"):
        AdamW(b2=1.0)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("adafactor")
    with pytest.raises(ValueError, match="learning rate"):
        SGD().update(g, SGD().init(g), g, float("nan"))


def _pattern_tokens(vocab, n=4000, period=7, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, vocab, period)
    return np.tile(base, n // period + 1)[:n].astype(np.int32)


def test_window_batches_deterministic_order():
    tokens = np.arange(50, dtype=np.int32)
    fn = window_batches(tokens, batch=3, seq_len=4, seed=0)  # 10 windows of 5 tokens
    b0 = fn(0)
    assert b0.shape == (3, 5) and b0.dtype == np.int32
    np.testing.assert_array_equal(b0, window_batches(tokens, 3, 4, seed=0)(0))
    for row in b0:
        assert row[0] % 5 == 0 and np.array_equal(row, np.arange(row[0], row[0] + 5))
    seen = np.concatenate([fn(s)[:, 0] for s in range(4)])[:10]  # first epoch: every window once
    assert sorted(seen.tolist()) == list(range(0, 50, 5))
    np.testing.assert_array_equal(window_batches(tokens, 2, 4, seed=None)(1)[:, 0], [10, 15])
    with pytest.raises(ValueError, match="window"):
        window_batches(np.arange(3), 1, 4)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-2)])
def test_loss_goes_down_through_both_phases(optimizer, lr):
    student = get_preset("tiny-student")
    teacher_cfg = get_preset("tiny-teacher")
    teacher_params = init_params(teacher_cfg, seed=11)
    batch_fn = window_batches(_pattern_tokens(student.vocab_size), batch=4, seq_len=16, seed=0)
    result = train(student, batch_fn, 30, optimizer=optimizer, lr=lr,
                   teacher=(teacher_cfg, teacher_params), omega=0.667, rho=0.25, n_kd=10, seed=0)
    h = result.history
    assert len(h) == 30 and [r["step"] for r in h] == list(range(1, 31))
    assert [r["phase"] for r in h] == ["kd"] * 10 + ["standard"] * 20
    assert all(r["omega"] == 0.667 for r in h[:10]) and all(r["omega"] == 0.0 for r in h[10:])
    assert all(np.isfinite(r["kd"]) and r["kl"] >= 0 for r in h[:10])
    assert all(math.isnan(r["kd"]) for r in h[10:])  # no teacher pass in the standard phase
    for r in h[:10]:
        assert math.isclose(r["loss"], 0.333 * r["ce"] + 0.667 * r["kd"], rel_tol=1e-9)
    for r in h[10:]:
        assert r["loss"] == r["ce"]
    ce = [r["ce"] for r in h]
    assert ce[-1] < 0.5 * ce[0], ce
    assert np.mean(ce[-5:]) < np.mean(ce[5:10])
    assert all(r["lr"] == lr for r in h)
    # the returned params are the trained ones
    final = loss_and_grad(result.params, batch_fn(30), student)[0]
    assert final < ce[0]


def test_train_is_deterministic_and_validates():
    cfg = get_preset("tiny-student")
    batch_fn = window_batches(_pattern_tokens(cfg.vocab_size, n=600), batch=2, seq_len=8, seed=1)
    a = train(cfg, batch_fn, 3, optimizer="adamw", lr=lambda s: 1e-3 * (s + 1), seed=4)
    b = train(cfg, batch_fn, 3, optimizer="adamw", lr=lambda s: 1e-3 * (s + 1), seed=4)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert [r["lr"] for r in a.history] == [1e-3, 2e-3, 3e-3]
    with pytest.raises(ValueError, match="teacher"):
        train(cfg, batch_fn, 2, omega=0.5, n_kd=1)
    with pytest.raises(ValueError, match="vocab_size"):
        t = get_preset("tiny-teacher").replace(vocab_size=32)
        train(cfg, batch_fn, 2, teacher=(t, init_params(t, 0)), omega=0.5, n_kd=1)
    with pytest.raises(ValueError, match="lr"):
        train(cfg, batch_fn, 1, lr=-1.0)
    with pytest.raises(ValueError, match="params"):
        train(cfg, batch_fn, 1, params=init_params(get_preset("tiny-teacher"), 0))


def test_train_accepts_dict_batches_with_mask_and_prefix():
    cfg = get_preset("tiny-student")
    windows = window_batches(_pattern_tokens(cfg.vocab_size, n=600), batch=2, seq_len=8, seed=1)

    def batch_fn(step0):
        mask = np.ones((2, 8), bool)
        mask[:, :3] = False
        return {"tokens": windows(step0), "mask": mask, "prefix_len": np.array([3, 3])}

    r = train(cfg, batch_fn, 2, optimizer="sgd", lr=0.1, dtype=np.float64)
    want = loss_and_grad(init_params(cfg, 0, np.float64), windows(0), cfg,
                         mask=batch_fn(0)["mask"], prefix_len=np.array([3, 3]))[0]
    assert math.isclose(r.history[0]["loss"], want, rel_tol=1e-12)


def test_lr_schedule_and_linear_transition():
    from salt.reference.schedule import lr_at, omega_at
    from salt.reference.trainer import lr_schedule

    fn = lr_schedule(1e-2, 2, 6, 1e-3)
    assert [fn(s) for s in range(6)] == [lr_at(j, 1e-2, 2, 6, 1e-3) for j in range(1, 7)]
    with pytest.raises(ValueError, match="final_lr"):
        lr_schedule(1e-3, 2, 6, 1e-2)
    student, teacher = get_preset("tiny-student"), get_preset("tiny-teacher")
    batch_fn = window_batches(_pattern_tokens(student.vocab_size, n=600), batch=2, seq_len=8)
    r = train(student, batch_fn, 6, lr=fn, teacher=(teacher, init_params(teacher, 1)), omega=0.667,
              rho=0.25, n_kd=4, transition="linear", n_kd1=2)
    want = [omega_at(j, 0.667, 4, "linear", 2) for j in range(1, 7)]
    assert [h["omega"] for h in r.history] == want
    assert want[1] == 0.667 and 0 < want[2] < 0.667 and want[3] == 0.0
    assert [h["lr"] for h in r.history] == [fn(s) for s in range(6)]
    # a KD-phase step with omega_j = 0 runs no teacher pass (kd metric absent)
    assert math.isnan(r.history[3]["kd"]) and np.isfinite(r.history[2]["kd"])


def test_train_on_a_token_array():
    cfg = get_preset("tiny-student")
    tokens = _pattern_tokens(cfg.vocab_size, n=600)
    a = train(cfg, tokens, 2, batch=2, seq_len=8, optimizer="sgd", lr=0.1, seed=3)
    b = train(cfg, window_batches(tokens, 2, 8, seed=3), 2, optimizer="sgd", lr=0.1, seed=3)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    with pytest.raises(ValueError, match="seq_len"):
        train(cfg, tokens, 1, batch=2)
    with pytest.raises(ValueError, match="batch_fn"):
        train(cfg, window_batches(tokens, 2, 8), 1, batch=2, seq_len=8)
