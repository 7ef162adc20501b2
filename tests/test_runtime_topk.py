"""Top-k KD (``salt train --kd-topk K``) and vocabulary padding in the runtime's step.

* the JAX step's loss, metrics and gradients with ``kd_topk`` against the float64 reference
  (``salt.reference.model`` forward/backward with ``topk_kd_loss_grad``; the reference trainer has
  no top-k KD, so one step's gradient is built from its pieces), and the fused ``xla`` step against
  the ``naive`` full-logits step, on one device and on a mesh;
* the compiled top-k KD step holds no ``[tokens, vocab]`` buffer (CPU ``xla``; TPU ``pallas`` AOT);
* padded vocabularies (teacher and student embeddings with extra rows, differently many) give the
  loss and gradients of the unpadded models; padded rows get no gradient;
* ``salt train --kd-topk`` end to end, and its refusals.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from salt.kernels import tpu_aot
from salt.reference import losses as ref_losses
from salt.reference import model as ref_model
from salt.reference.config import flatten_params, get_preset
from salt.runtime.model import transformer as model, sharding
from salt.runtime.train import step as step_mod
from salt.runtime.train.config import TrainConfig, TrainError
from kernel_tolerances import BF16_TOL, F32_TOL
from test_runtime_step import _compare, _rel, _tokens_by_vocab_shapes

VOCAB, B, T, K = 300, 8, 12, 5
STUDENT = get_preset("tiny-student").replace(vocab_size=VOCAB)
TEACHER = get_preset("tiny-teacher").replace(vocab_size=VOCAB)
HYPER = step_mod.hyperparameters(TrainConfig(preset="tiny-student", data="-", out="-", teacher="-",
                                             kd_steps=10, steps=10, batch=B, seq_len=T, lr=1e-2))
GRAD_REL_TOL = 1e-4  # float32 gradients vs the float64 reference (relative to the largest entry)


@pytest.fixture(scope="module")
def inputs():
    params = model.init_params_jax(STUDENT, 0)
    t_params = model.init_params_jax(TEACHER, 1)
    windows = np.random.default_rng(0).integers(0, VOCAB, (B, T + 1)).astype(np.int32)
    return params, t_params, windows


def _grads(params, t_params, windows, student=STUDENT, teacher=TEACHER, *, kernels="xla", kd_topk=K,
           mesh_spec=None, dtype="float32", vocab=None):
    mesh = None if mesh_spec is None else sharding.make_mesh(mesh_spec)
    fn = step_mod.make_grad_fn(student, teacher, rho=0.25, dtype=dtype, kernels=kernels, mesh=mesh,
                               kd_topk=kd_topk, vocab=vocab)
    w = jnp.asarray(windows)
    if mesh is not None:
        params = sharding.shard_params(params, student, mesh)
        t_params = None if t_params is None else sharding.shard_params(t_params, teacher, mesh)
        w = jax.device_put(w, sharding.batch_sharding(mesh))
    return jax.jit(fn)(params, t_params, w, jnp.int32(1), HYPER)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, K])
def test_step_matches_float64_reference(inputs, k):
    """One KD step's metrics and gradients with kd_topk=k (xla) against the reference model's
    forward/backward with the reference top-k KD loss and gradient (float64)."""
    params, t_params, windows = inputs
    grads, metrics = _grads(params, t_params, windows, kd_topk=k)
    p64, t64 = (jax.tree.map(lambda x: np.asarray(x, np.float64), p) for p in (params, t_params))
    inputs_BxT, labels_BxT = windows[:, :-1], windows[:, 1:]
    s_BxTxV, cache = ref_model.forward(p64, inputs_BxT, STUDENT, return_cache=True)
    t_BxTxV = ref_model.forward(t64, inputs_BxT, TEACHER)
    omega = float(HYPER["omega"])
    loss = ref_losses.topk_kd_loss(s_BxTxV, t_BxTxV, labels_BxT, omega, 0.25, k)
    kd = ref_losses.topk_kd_loss(s_BxTxV, t_BxTxV, labels_BxT, 1.0, 0.25, k)
    ce = ref_losses.ce_loss(s_BxTxV, labels_BxT)
    for name, want in (("loss", loss), ("kd", kd), ("ce", ce)):
        np.testing.assert_allclose(float(metrics[name]), want.mean(), rtol=F32_TOL, err_msg=name)
    d_logits = ref_losses.topk_kd_loss_grad(s_BxTxV, t_BxTxV, labels_BxT, omega, 0.25, k) / (B * T)
    want = flatten_params(ref_model.backward(p64, cache, d_logits, STUDENT))
    got = flatten_params(grads)
    for key in want:
        assert _rel(got[key], want[key]) < GRAD_REL_TOL, key


@pytest.mark.parametrize("mesh_spec", [None, pytest.param("data=4,model=2", marks=pytest.mark.slow)])
def test_fused_step_matches_naive(inputs, mesh_spec):
    """xla on one device and on 8 devices (the kernels under shard_map) against the naive step."""
    params, t_params, windows = inputs
    want = _grads(params, t_params, windows, kernels="naive")
    assert {"kd", "kl"} <= set(want[1])
    _compare(_grads(params, t_params, windows, mesh_spec=mesh_spec), want, F32_TOL, f"xla, {mesh_spec}")


@pytest.mark.slow
def test_fused_step_bfloat16(inputs):
    params, t_params, windows = inputs
    want = _grads(params, t_params, windows, kernels="naive", dtype="bfloat16")
    _compare(_grads(params, t_params, windows, dtype="bfloat16"), want, BF16_TOL, "xla bf16")


def _padded(params, config, extra, seed):
    rows = np.random.default_rng(seed).normal(size=(extra, config.d_model)).astype(np.float32) * 5.0
    return dict(params, embed=jnp.concatenate([params["embed"], jnp.asarray(rows)], axis=0)), \
        config.replace(vocab_size=config.vocab_size + extra)


@pytest.mark.parametrize("kind, kernels", [("topk", "xla"), ("standard", "xla"),
                                            pytest.param("topk", "naive", marks=pytest.mark.slow),
                                            pytest.param("full", "xla", marks=pytest.mark.slow)])
def test_padded_vocabularies_give_the_unpadded_loss(inputs, kind, kernels):
    """Student embedding padded by 20 rows, teacher by 44 (large logits there): with the tokenizer's
    vocabulary given, loss, metrics and gradients equal the unpadded models'; padded rows get none."""
    params, t_params, windows = inputs
    teacher = None if kind == "standard" else TEACHER
    t_arg = None if kind == "standard" else t_params
    kd_topk = K if kind == "topk" else None
    want = _grads(params, t_arg, windows, teacher=teacher, kernels=kernels, kd_topk=kd_topk)
    p_pad, s_pad = _padded(params, STUDENT, 20, 5)
    t_pad, t_cfg = _padded(t_params, TEACHER, 44, 6)
    grads, metrics = _grads(p_pad, None if teacher is None else t_pad, windows, student=s_pad,
                            teacher=None if teacher is None else t_cfg, kernels=kernels, kd_topk=kd_topk,
                            vocab=VOCAB)
    assert not np.asarray(grads["embed"][VOCAB:]).any(), "padded rows got a gradient"
    _compare((dict(grads, embed=grads["embed"][:VOCAB]), metrics), want, F32_TOL, f"padded {kind}")
    if teacher is None:  # the check sees the padding: without the tokenizer's vocabulary the loss moves
        _, unmasked = _grads(p_pad, None, windows, student=s_pad, teacher=None, kernels=kernels, vocab=None)
        assert abs(float(unmasked["loss"]) - float(want[1]["loss"])) > 1e-3
    else:  # differently padded embeddings without the tokenizer's vocabulary: refused
        with pytest.raises(ValueError, match="vocab"):
            _grads(p_pad, t_pad, windows, student=s_pad, teacher=t_cfg, kernels=kernels, kd_topk=kd_topk)


def test_padded_embedding_scores_like_the_unpadded_one(inputs):
    """The CE parts that ``salt score`` and ``salt eval`` read (ce, correct, n_greater) from an
    embedding padded with large rows equal the unpadded ones once the tokenizer's vocabulary is given."""
    from salt.runtime.model import losses
    params, _, windows = inputs
    p_pad, s_pad = _padded(params, STUDENT, 20, 7)
    hidden = model.hidden(params, jnp.asarray(windows[:, :-1]), STUDENT)
    want = losses.token_parts(hidden, params["embed"], jnp.asarray(windows[:, 1:]))
    got = losses.token_parts(hidden, p_pad["embed"], jnp.asarray(windows[:, 1:]), vocab=VOCAB)
    for key in ("ce", "correct", "n_greater"):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=F32_TOL, err_msg=key)
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        losses.token_parts(hidden, params["embed"], jnp.asarray(windows[:, 1:]), vocab=VOCAB + 1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["standard", "full", "topk"])
def test_padded_kernels_match_the_reference_with_vocab(inputs, kind):
    """The fused ``xla`` losses on differently padded embeddings (student +20 rows, teacher +44,
    large there) against the float64 reference given the same padded logits and ``vocab``."""
    from kernel_tolerances import assert_close
    from salt.runtime.model import losses
    params, t_params, windows = inputs
    p_pad, s_pad = _padded(params, STUDENT, 20, 8)
    t_pad, t_cfg = _padded(t_params, TEACHER, 44, 9)
    tokens, y = jnp.asarray(windows[:, :-1]), windows[:, 1:]
    h = model.hidden(params, tokens, STUDENT)
    s64 = np.asarray(h, np.float64) @ np.asarray(p_pad["embed"], np.float64).T
    teacher, kd_topk = None, K if kind == "topk" else None
    if kind != "standard":
        ht = model.hidden(t_params, tokens, TEACHER)
        teacher = (ht, t_pad["embed"])
        t64 = np.asarray(ht, np.float64) @ np.asarray(t_pad["embed"], np.float64).T
    got = losses.token_parts(h, p_pad["embed"], jnp.asarray(y), teacher=teacher, omega=0.5, rho=0.25,
                             kd_topk=kd_topk, vocab=VOCAB)
    if kind == "standard":
        want = ref_losses.ce_loss(s64, y, vocab=VOCAB)
    elif kind == "full":
        want = ref_losses.kd_loss(s64, t64, y, 0.5, 0.25, vocab=VOCAB)
    else:
        want = ref_losses.topk_kd_loss(s64, t64, y, 0.5, 0.25, K, vocab=VOCAB)
    assert_close(got["loss"], want, F32_TOL, f"padded {kind} vs reference")


def test_config_validation():
    base = dict(preset="tiny-student", data="-", out="-", teacher="-", kd_steps=2, steps=4)
    TrainConfig(**base, kd_topk=3).validate()
    for bad, message in ((0, "kd_topk"), (2.5, "kd_topk"), (True, "kd_topk")):
        with pytest.raises(TrainError, match=message):
            TrainConfig(**base, kd_topk=bad).validate()
    with pytest.raises(TrainError, match="only applies to the KD phase"):
        TrainConfig(**dict(base, kd_steps=0, teacher=None), kd_topk=3).validate()
    with pytest.raises(TrainError, match="reference runtime"):
        TrainConfig(**base, kd_topk=3, runtime="reference").validate()


# ----------------------------------------------------------------------------- memory

BIG_VOCAB, BIG_T = 16384, 64  # [B*T, V] float32 = 32 MiB; the tiny models' params are ~1 MiB


def _abstract_kd_step(kernels, mesh, vocab=BIG_VOCAB, seq_len=BIG_T, batch=B, dtype="float32", kd_topk=16):
    student, t_config = STUDENT.replace(vocab_size=vocab), TEACHER.replace(vocab_size=vocab)

    def abstract(config):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            model.abstract_params(config), sharding.param_shardings(config, mesh))

    params_abs, t_abs = abstract(student), abstract(t_config)
    opt_abs = step_mod.opt_state_abstract("adafactor", params_abs, mesh)
    windows_abs = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32, sharding=sharding.batch_sharding(mesh))
    fn = step_mod.make_step_fn(student, t_config, "adafactor", kernels=kernels, mesh=mesh, dtype=dtype,
                               kd_topk=kd_topk)
    return step_mod.compile_step(fn, params_abs, opt_abs, t_abs, windows_abs, mesh=mesh)


@pytest.mark.slow
def test_cpu_topk_step_holds_no_tokens_by_vocab_buffer():
    """V = 16384 (a [tokens, vocab] f32 buffer = 32 MiB would dominate): the naive top-k KD step
    holds such buffers, the xla one neither in its HLO nor in its temporaries."""
    mesh = sharding.make_mesh("data=1")
    tokens, one_buffer = B * BIG_T, B * BIG_T * BIG_VOCAB * 4
    naive = _abstract_kd_step("naive", mesh)
    fused = _abstract_kd_step("xla", mesh)
    assert _tokens_by_vocab_shapes(naive, tokens, BIG_VOCAB)
    assert naive.memory_analysis().temp_size_in_bytes >= one_buffer
    assert _tokens_by_vocab_shapes(fused, tokens, BIG_VOCAB) == []
    temp = fused.memory_analysis().temp_size_in_bytes
    assert temp < 0.5 * one_buffer, f"fused top-k KD step: {temp} temporary bytes"


@pytest.mark.tpu_aot
@pytest.mark.skipif(not tpu_aot.libtpu_available(), reason="libtpu is not installed")
def test_tpu_aot_topk_step_holds_no_tokens_by_vocab_buffer():
    """The top-k KD step with the Pallas kernels (CE and the teacher's top-k), AOT-compiled for
    v5e:2x2 (data=4), bf16, V = 32768 per chip's 2 x 128 tokens, k = 64: it compiles and holds no
    [tokens, vocab] buffer shape.  Memory is read from the peak (``peak_memory_in_bytes`` less the
    arguments and outputs): with the top-k kernel in the program ``temp_size_in_bytes`` reads 0,
    which cannot be true.  Bound: the full-vocabulary step's (a quarter of one bf16 [tokens, vocab]
    array) plus five f32 [V, D] embedding-sized buffers lane-padded to 128 columns for this model's
    D = 16 (the top-k part's scatter-add embedding gradient, its scan carry, update and cast, and
    one more with the kernel: measured 84.1 MB, against 66.7 MB for the scan's top-k, whose temp
    reads 46.3 MB).  One f32 [tokens, vocab] array (33.6 MB) more would break it."""
    vocab, seq_len, batch = 32768, 128, 8
    mesh = sharding.make_mesh("data=4", devices=tpu_aot.topology_devices("v5e:2x2"))
    compiled = _abstract_kd_step("pallas", mesh, vocab=vocab, seq_len=seq_len, batch=batch, dtype="bfloat16",
                                 kd_topk=64)
    tokens_per_chip = batch // 4 * seq_len
    assert _tokens_by_vocab_shapes(compiled, tokens_per_chip, vocab) == []
    m = compiled.memory_analysis()
    live = m.peak_memory_in_bytes - m.argument_size_in_bytes - m.output_size_in_bytes
    embed_grad_f32_tiled = vocab * 128 * 4
    assert 0 < live < 0.25 * tokens_per_chip * vocab * 2 + 5 * embed_grad_f32_tiled, f"{live} live bytes per chip"


# ----------------------------------------------------------------------------- salt train

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from salt.data import prepare
    from tiny_corpus import make_tiny_corpus
    root = tmp_path_factory.mktemp("topk_train")
    src = make_tiny_corpus(root / "src", n_docs=20, words=200, seed=2)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    return root


def _train(*args):
    from salt.cli.main import cli
    return CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=False)


def _base(data, preset, out, steps, *extra):
    return ["--preset", preset, "--data", data / "data", "--out", data / out, "--steps", steps, "--batch", 4,
            "--seq-len", 8, "--optimizer", "adamw", "--quiet", "--json", *extra]


@pytest.mark.slow
def test_salt_train_kd_topk(data):
    result = _train(*_base(data, "tiny-teacher", "teacher", 2))
    assert result.exit_code == 0, result.output
    result = _train(*_base(data, "tiny-student", "student", 3, "--teacher", data / "teacher",
                           "--kd-steps", 2, "--kd-topk", 4))
    assert result.exit_code == 0, result.output
    rows = [json.loads(r) for r in (data / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["kd", "kd", "standard"]
    assert all(np.isfinite(r["kd"]) for r in rows[:2])
    recorded = json.loads((data / "student" / "run_config.json").read_text())["train"]
    assert recorded["kd_topk"] == 4
    for extra, message in ((["--kd-topk", 301], "larger than the vocabulary"),
                           (["--kd-topk", 0], "--kd-topk")):
        result = _train(*_base(data, "tiny-student", "refused", 3, "--teacher", data / "teacher",
                               "--kd-steps", 2, *extra))
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output
        assert not (data / "refused").exists()
