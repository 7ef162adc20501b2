"""The UL2 objective in the trainer: the JAX KD step on UL2 examples equals the float64 reference
(bidirectional prefix, loss and KD on targets only), gradient accumulation stays exact with
uneven target counts, and a UL2 SALT run resumes bit-identically."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salt.data import PAD_ID, ul2
from salt.reference import model as ref_model
from salt.reference.config import flatten_params, get_preset
from salt.runtime.model import transformer as model
from salt.runtime.train import step as step_mod
from salt.runtime.train.trainer import TrainConfig, TrainError, train
from tiny_corpus import make_tiny_corpus

LOGITS_REL_TOL = 1e-5   # float32 vs the float64 reference, as tests/test_runtime_model.py
GRAD_REL_TOL = 1e-4
SENTINELS = list(range(4, 12))
B, T = 10, 24


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _ul2_batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    windows = rng.integers(12, vocab, size=(B, T + 1)).astype(np.int32)
    tokens, prefix_B, mask_BxT, objective_B = ul2.batch(windows, seed=seed, step=3, sentinels=SENTINELS,
                                                        pad_id=PAD_ID)
    assert set(objective_B) == {0, 1, 2, 3}  # the ten slots hold every objective
    return tokens, prefix_B.astype(np.int32), mask_BxT


@pytest.fixture(scope="module")
def models():
    student = get_preset("tiny-student")
    teacher = get_preset("tiny-teacher")
    return (student, model.init_params(student, 1)), (teacher, model.init_params(teacher, 2))


def _hyper(omega=0.667):
    cfg = TrainConfig(preset="tiny-student", data="-", out="-", teacher="-", kd_steps=10, steps=20,
                      omega=omega)
    return jax.tree.map(jnp.asarray, step_mod.hyperparameters(cfg))


@pytest.mark.slow
def test_kd_step_on_ul2_examples_equals_the_reference(models):
    (student, s_params), (teacher, t_params) = models
    tokens, prefix_B, mask_BxT = _ul2_batch(student.vocab_size)
    grad_fn = jax.jit(step_mod.make_grad_fn(student, teacher, rho=0.25, kernels="xla"))
    batch = {"tokens": jnp.asarray(tokens), "prefix_len": jnp.asarray(prefix_B), "mask": jnp.asarray(mask_BxT)}
    grads, metrics = grad_fn(s_params, t_params, batch, jnp.int32(1), _hyper())

    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), s_params)
    t64 = jax.tree.map(lambda x: np.asarray(x, np.float64), t_params)
    t_logits = ref_model.forward(t64, tokens[:, :-1], teacher, prefix_B)
    loss, ref_grads, ref_metrics = ref_model.loss_and_grad(p64, tokens, student, t_logits, 0.667, 0.25,
                                                           mask=mask_BxT, prefix_len=prefix_B)
    for key in ("loss", "ce", "kd", "kl", "accuracy"):
        ref = float(ref_metrics[key])
        assert abs(float(metrics[key]) - ref) < LOGITS_REL_TOL * max(abs(ref), 1.0), key
    ours, ref = flatten_params(grads), flatten_params(ref_grads)
    for key in ours:
        assert _rel(ours[key], ref[key]) < GRAD_REL_TOL, key


@pytest.mark.slow
def test_unscored_positions_do_not_reach_the_loss(models):
    """Positions outside the target mask contribute nothing: a window whose mask is all False
    can hold any tokens without changing the loss, the metrics or the gradients."""
    (student, s_params), (teacher, t_params) = models
    tokens, prefix_B, mask_BxT = _ul2_batch(student.vocab_size, seed=1)
    mask_BxT[0] = False
    grad_fn = jax.jit(step_mod.make_grad_fn(student, teacher, rho=0.25, kernels="xla"))
    batch = {"tokens": tokens, "prefix_len": prefix_B, "mask": mask_BxT}
    g_a, m_a = grad_fn(s_params, t_params, batch, jnp.int32(1), _hyper())
    other = tokens.copy()
    other[0] = np.random.default_rng(9).integers(12, student.vocab_size, size=T + 1)
    g_b, m_b = grad_fn(s_params, t_params, dict(batch, tokens=other), jnp.int32(1), _hyper())
    for key in ("loss", "ce", "kd", "kl", "accuracy"):
        assert float(m_a[key]) == pytest.approx(float(m_b[key]), rel=1e-6), key
    for key, value in flatten_params(g_a).items():
        assert _rel(value, flatten_params(g_b)[key]) < 1e-5, key
    # and the mask is what decides: scoring every position gives another loss
    _, m_all = grad_fn(s_params, t_params, dict(batch, mask=np.ones_like(mask_BxT)), jnp.int32(1), _hyper())
    assert abs(float(m_all["loss"]) - float(m_a["loss"])) > 1e-3


@pytest.mark.slow
def test_grad_accumulation_with_uneven_target_counts_is_exact(models):
    (student, s_params), (teacher, t_params) = models
    tokens, prefix_B, mask_BxT = _ul2_batch(student.vocab_size, seed=2)
    batch = {"tokens": tokens, "prefix_len": prefix_B, "mask": mask_BxT}
    one = jax.jit(step_mod.make_grad_fn(student, teacher, rho=0.25, kernels="xla"))
    five = jax.jit(step_mod.make_grad_fn(student, teacher, rho=0.25, kernels="xla", grad_accum=5))
    g1, m1 = one(s_params, t_params, batch, jnp.int32(1), _hyper())
    g5, m5 = five(s_params, t_params, batch, jnp.int32(1), _hyper())
    for key in ("loss", "ce", "kd", "accuracy", "omega"):
        np.testing.assert_allclose(float(m5[key]), float(m1[key]), rtol=1e-5, err_msg=key)
    for key, value in flatten_params(g5).items():
        assert _rel(value, flatten_params(g1)[key]) < 1e-5, key


@pytest.fixture(scope="module")
def ul2_data(tmp_path_factory):
    from salt.data import prepare
    root = tmp_path_factory.mktemp("ul2")
    src = make_tiny_corpus(root / "src", n_docs=30, words=200)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False, sentinels=8)
    prepare(root / "plain", [src], vocab_size=300, val_fraction=0.2, progress=False)
    teacher = root / "teacher"
    train(TrainConfig(preset="tiny-teacher", data=str(root / "data"), out=str(teacher), steps=2,
                      batch=8, seq_len=16, optimizer="adamw", lr=1e-2, objective="ul2"), progress=False)
    return root


def _salt_cfg(root, out, **kw):
    return TrainConfig(preset="tiny-student", data=str(root / "data"), out=str(root / out),
                       teacher=str(root / "teacher"), kd_steps=3, steps=6, batch=8, seq_len=16,
                       optimizer="adamw", lr=3e-3, final_lr=3e-4, objective="ul2", **kw)


@pytest.mark.slow
def test_ul2_salt_run_resumes_bit_identically(ul2_data):
    """A UL2 SALT run (KD phase then standard phase) resumed from its step-4 checkpoint ends with
    the same parameters, bit for bit, as the uninterrupted run: the examples depend only on
    (seed, step, slot)."""
    import dataclasses
    import shutil
    from salt.runtime.model import checkpoint

    whole = train(_salt_cfg(ul2_data, "whole"), progress=False)
    assert whole["last_step"] == 6
    cfg = _salt_cfg(ul2_data, "parts", checkpoint_every=2, keep_checkpoints=(4,))
    train(cfg, progress=False)
    run = ul2_data / "parts"
    assert checkpoint.all_steps(run)[-1] == 6
    shutil.rmtree(checkpoint.checkpoint_root(run) / "6")  # as if killed after step 4's save
    resumed = train(dataclasses.replace(cfg, resume=True), progress=False)
    assert resumed["start_step"] == 4 and resumed["last_step"] == 6
    a = flatten_params(checkpoint.load_params(ul2_data / "whole")[1])
    b = flatten_params(checkpoint.load_params(run)[1])
    for key, value in a.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(b[key]), err_msg=key)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["phase"] for r in rows] == ["kd"] * 3 + ["standard"] * 3


def test_ul2_needs_a_store_with_sentinels(ul2_data):
    with pytest.raises(TrainError, match="--sentinels"):
        train(TrainConfig(preset="tiny-student", data=str(ul2_data / "plain"), out=str(ul2_data / "x"),
                          steps=2, batch=8, seq_len=16, objective="ul2"), progress=False)
    assert not (ul2_data / "x").exists()
    with pytest.raises(TrainError, match="objective"):
        train(TrainConfig(preset="tiny-student", data=str(ul2_data / "data"), out=str(ul2_data / "y"),
                          steps=2, batch=8, seq_len=16, objective="ul2", runtime="reference",
                          optimizer="adamw"), progress=False)
