"""The JAX model against the float64 NumPy reference: logits, hidden states, gradients, the
ω / lr schedules, bf16 compute, and depth-independent lowering of the paper-2.8b step."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salt.kernels.logits_kd import kd_loss
from matmul_count import matmul_flops
from salt.reference import model as ref_model
from salt.reference.config import flatten_params, get_preset
from salt.runtime.model import losses, transformer as model
from salt.runtime.train import optim

LOGITS_REL_TOL = 1e-5   # float32 logits vs the float64 reference (issue 4)
GRAD_REL_TOL = 1e-4     # float32 gradients vs the float64 reference (issue 4)

CONFIGS = {
    "mqa": get_preset("tiny-student"),
    "mha": get_preset("tiny-teacher"),
    "gqa": get_preset("tiny-teacher").replace(name="tiny-gqa", n_layers=2, n_heads=4,
                                              n_kv_heads=2, vocab_size=37),
}


def _inputs(config, B=3, T=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, size=(B, T + 1)).astype(np.int32)


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


GOLDEN_MODELS = ("mqa_causal", "gqa_prefix", "mha_prefix")


def _load_golden(golden_dir, name):
    import json
    from salt.reference.config import ModelConfig, unflatten_params
    path = golden_dir / f"model_{name}.npz"
    if not path.exists():
        pytest.skip(f"{path.name} not generated yet")
    with np.load(path, allow_pickle=False) as z:
        files = dict(z)
    config = ModelConfig.from_dict(json.loads(str(files["config_json"])))
    flat = {k[len("param/"):]: v for k, v in files.items() if k.startswith("param/")}
    return config, unflatten_params(flat), files


def _golden_outputs(config, params32, files):
    """logits, hidden, CE loss+grads and KD loss+parts+grads in one jitted call."""
    omega, rho = float(files["kd/omega"]), float(files["kd/rho"])

    @jax.jit
    def run(params, window, prefix_len, mask, teacher_logits):
        inputs, labels = window[:, :-1], window[:, 1:]
        hid = model.hidden(params, inputs, config, prefix_len)
        logits = model.forward(params, inputs, config, prefix_len)

        def ce(p):  # the trainer's path: hidden states + tied embedding through the fused kernel
            h = model.hidden(p, inputs, config, prefix_len)
            return losses.batch_mean(losses.token_parts(h, p["embed"], labels)["loss"], mask)

        def kd(p):  # the golden teacher is given as logits: the logits-level kernel's naive path
            lg = model.forward(p, inputs, config, prefix_len)
            loss, parts = kd_loss(lg, teacher_logits, labels, omega, rho, impl="naive", return_parts=True)
            parts["loss"] = loss
            means = {k: losses.batch_mean(parts[k], mask) for k in ("loss", "ce", "kd", "kl")}
            return means["loss"], means

        ce_loss, ce_grads = jax.value_and_grad(ce)(params)
        (_, kd_means), kd_grads = jax.value_and_grad(kd, has_aux=True)(params)
        return logits, hid, ce_loss, ce_grads, kd_means, kd_grads

    return run(params32, jnp.asarray(files["window"]), jnp.asarray(files["prefix_len"]),
               jnp.asarray(files["mask"]), jnp.asarray(files["kd/teacher_logits"], jnp.float32))


@pytest.mark.slow
@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_matches_golden_reference(golden_dir, name):
    """float32 logits/hidden within 1e-5 and gradients within 1e-4 (relative to the largest
    entry) of the float64 reference, on the golden inputs (MQA/GQA/MHA, causal/prefix-LM,
    masked targets, CE and KD losses)."""
    config, params64, files = _load_golden(golden_dir, name)
    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params64)
    logits, hid, ce_loss, ce_grads, kd_means, kd_grads = _golden_outputs(config, params32, files)
    assert logits.dtype == jnp.float32
    assert _rel(logits, files["logits"]) < LOGITS_REL_TOL
    assert _rel(hid, files["hidden"]) < LOGITS_REL_TOL
    assert abs(float(ce_loss) - float(files["ce/loss"])) < LOGITS_REL_TOL * float(files["ce/loss"])
    for key in ("loss", "ce", "kd", "kl"):
        ref = float(files[f"kd/{key}"])
        assert abs(float(kd_means[key]) - ref) < LOGITS_REL_TOL * max(abs(ref), 1.0), key
    for tag, grads in (("ce", ce_grads), ("kd", kd_grads)):
        ours = flatten_params(grads)
        for key in ours:
            ref = files[f"{tag}/grads/{key}"]
            assert _rel(ours[key], ref) < GRAD_REL_TOL, (tag, key)


def test_forward_matches_reference_directly():
    """Independent of the golden files: the live reference, prefix-LM, GQA."""
    config = CONFIGS["gqa"]
    params64 = ref_model.init_params(config, 1, np.float64)
    tokens = _inputs(config)[:, :-1]
    prefix_len = np.array([0, 4, 9], np.int32)
    ref_logits = ref_model.forward(params64, tokens, config, prefix_len)
    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params64)
    fwd = jax.jit(lambda p, x, pl: model.forward(p, x, config, pl))
    assert _rel(fwd(params32, jnp.asarray(tokens), jnp.asarray(prefix_len)), ref_logits) < LOGITS_REL_TOL


def test_bfloat16_compute_stays_close_and_float32_out():
    config = CONFIGS["mqa"]
    params = model.init_params(config, 0)
    tokens = jnp.asarray(_inputs(config)[:, :-1])
    fwd = jax.jit(lambda p, x: (model.forward(p, x, config),
                                model.forward(p, x, config, dtype=jnp.bfloat16)))
    f32, bf16 = fwd(params, tokens)
    assert bf16.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    # bf16 has an 8-bit mantissa (relative rounding 2^-8 = 0.4%); a few layers of rounding
    assert 0 < _rel(bf16, f32) < 0.05


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
    config = CONFIGS["mqa"]
    params = model.init_params(config, 0)
    windows = jnp.asarray(_inputs(config))

    def loss(p, remat):
        h = model.hidden(p, windows[:, :-1], config, remat=remat)
        return losses.batch_mean(losses.token_parts(h, p["embed"], windows[:, 1:])["loss"])

    both = jax.jit(lambda p: (jax.grad(loss)(p, False), jax.grad(loss)(p, True)))
    g0, g1 = map(flatten_params, both(params))
    for key in g0:
        np.testing.assert_allclose(np.asarray(g1[key]), np.asarray(g0[key]), rtol=1e-6,
                                   atol=1e-7, err_msg=key)


def test_bad_inputs_raise():
    config = CONFIGS["mqa"]
    params = model.init_params(config, 0)
    with pytest.raises(ValueError, match="attention_impl"):
        model.forward(params, jnp.zeros((1, 3), jnp.int32), config, attention_impl="cuda")
    with pytest.raises(ValueError, match="tokens"):
        model.forward(params, jnp.zeros((3,), jnp.int32), config)
    with pytest.raises(ValueError, match="seed"):
        model.init_params(config, 1.5)
    with pytest.raises(ValueError, match="layers/wq"):
        bad = model.init_params(config, 0)
        bad["layers"]["wq"] = jnp.zeros((1, 2, 3))
        model.check_params(bad, config)


def test_omega_schedule_matches_reference(golden_dir):
    import json
    from salt.reference.schedule import omega_values
    cases = [(0.667, 10, "step", None), (0.667, 10, "linear", 4), (0.667, 10, "linear-ratio", 4),
             (1.0, 6, "linear", 2), (1.0, 6, "linear-ratio", 2), (0.5, 8, "linear-ratio", 0),
             (0.5, 8, "linear", 8), (0.667, 0, "step", None)]
    steps = np.arange(1, 16)
    for omega, n_kd, transition, n_kd1 in cases:
        ours = np.asarray(losses.omega_at(jnp.asarray(steps), omega, n_kd, transition, n_kd1))
        ref = omega_values(steps, omega, n_kd, transition, n_kd1)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7,
                                   err_msg=str((omega, n_kd, transition, n_kd1)))
    with np.load(golden_dir / "schedule.npz", allow_pickle=False) as z:
        cases = json.loads(str(z["omega_cases_json"]))
        for name, args in cases.items():
            ours = np.asarray(losses.omega_at(jnp.asarray(z["steps"]), args["omega"], args["n_kd"],
                                              args["transition"], args.get("n_kd1")))
            np.testing.assert_allclose(ours, z[f"omega/{name}"], rtol=1e-6, atol=1e-7, err_msg=name)
    # one rule for a missing n_kd1, as in the reference: required by the non-step transitions
    from salt.reference.schedule import omega_at as ref_omega_at
    for transition in ("linear", "linear-ratio"):
        with pytest.raises(ValueError, match="n_kd1 is required"):
            ref_omega_at(1, 0.5, 10, transition, None)
        with pytest.raises(ValueError, match="n_kd1 is required"):
            losses.omega_at(1, 0.5, 10, transition, None)


def test_lr_schedule_matches_reference(golden_dir):
    import json
    from salt.reference.schedule import lr_values
    steps = np.arange(1, 25)
    for peak, warmup, total, final in [(1e-3, 4, 20, 1e-4), (3e-3, 0, 10, 0.0), (1e-3, 10, 10, 1e-4)]:
        ours = np.asarray(optim.lr_at(jnp.asarray(steps), peak, warmup, total, final))
        np.testing.assert_allclose(ours, lr_values(steps, peak, warmup, total, final),
                                   rtol=1e-6, atol=1e-12)
    with np.load(golden_dir / "schedule.npz", allow_pickle=False) as z:
        for name, args in json.loads(str(z["lr_cases_json"])).items():
            ours = np.asarray(optim.lr_at(jnp.asarray(z["steps"]), **args))
            np.testing.assert_allclose(ours, z[f"lr/{name}"], rtol=1e-6, atol=1e-12, err_msg=name)
        paper = json.loads(str(z["paper_lr_json"]))
        ours = np.asarray(optim.lr_at(jnp.asarray(z["paper_steps"]), **paper))
        np.testing.assert_allclose(ours, z["lr/paper"], rtol=1e-6, atol=1e-12)


def test_optax_schedule_uses_count_plus_one():
    schedule = optim.make_schedule(1e-3, 4, 20, 1e-4)
    from salt.reference.schedule import lr_at as ref_lr_at
    for count in range(0, 20):
        assert float(schedule(count)) == pytest.approx(ref_lr_at(count + 1, 1e-3, 4, 20, 1e-4), rel=1e-6)


@pytest.mark.parametrize("name", ["mqa", "gqa"])
def test_flop_counts_equal_the_matmuls_of_the_traced_program(name):
    """The analytic counts against the matmuls JAX actually traces (``dot_general`` flops walked
    through the layer scan): the forward (plain attention, full T x T), and forward + backward."""
    config = CONFIGS[name]
    B, T = 2, 8
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    params = model.abstract_params(config)
    assert matmul_flops(lambda p, x: model.forward(p, x, config), params, tokens) == \
        model.forward_flops(config, B, T)
    train = jax.grad(lambda p, x: model.forward(p, x, config).sum())
    assert matmul_flops(train, params, tokens) == model.train_step_flops(config, B, T)


def test_dense_layer_matmul_equals_einsum_for_any_leading_axes():
    """``_matmul`` (the dense layers' one matmul; it merges the leading axes into rows) is the
    plain contraction over the last axis, for 2-D and 3-D inputs, values and gradients."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    for shape, spec in (((6, 4), "nd,df->nf"), ((2, 3, 4), "btd,df->btf")):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        np.testing.assert_allclose(model._matmul(x, w, jnp.float32), np.einsum(spec, x, w), rtol=1e-6, atol=1e-6)
        g_got = jax.grad(lambda a, b: (model._matmul(a, b, jnp.float32) ** 2).sum(), argnums=(0, 1))(x, w)
        g_want = jax.grad(lambda a, b, s=spec: (jnp.einsum(s, a, b) ** 2).sum(), argnums=(0, 1))(x, w)
        for got, want in zip(g_got, g_want):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_paper_2_8b_train_step_lowers_as_a_loop():
    """The 92-layer KD step (with the 44-layer teacher) lowers on abstract shapes, no parameters
    allocated, with the layers as one loop (lax.scan), not 92 unrolled copies."""
    from salt.runtime.train import step as step_mod
    student, teacher = get_preset("paper-2.8b"), get_preset("paper-1.5b")
    params = model.abstract_params(student)
    windows = jax.ShapeDtypeStruct((8, 1281), jnp.int32)
    opt_state = jax.eval_shape(optim.make_direction("adafactor").init, params)
    lowered = step_mod.compile_step(step_mod.make_step_fn(student, teacher, "adafactor", remat=True),
                                 params, opt_state, model.abstract_params(teacher), windows,
                                 lower_only=True)
    text = lowered.as_text()
    assert "while" in text  # the layer loop stays a loop, not 92 unrolled copies


@pytest.mark.slow
def test_kernel_paths_match_the_plain_xla_path():
    """``kernels="xla"`` routes attention and the losses through salt.kernels' pure-JAX
    implementations (no [tokens, vocab] logits); the per-position parts (KD and CE) and the KD
    gradients agree with the full-logits ``naive`` path."""
    config, t_config = CONFIGS["gqa"], CONFIGS["gqa"].replace(name="tiny-gqa-teacher", d_model=24)
    params, t_params = model.init_params(config, 4), model.init_params(t_config, 5)
    windows = jnp.asarray(_inputs(config, T=12, seed=3))

    def loss(p, impl):
        h = model.hidden(p, windows[:, :-1], config, attention_impl=impl)
        t_h = model.hidden(t_params, windows[:, :-1], t_config, attention_impl=impl)
        parts = losses.token_parts(h, p["embed"], windows[:, 1:], teacher=(t_h, t_params["embed"]),
                                   omega=0.667, rho=0.25, impl=impl)
        ce_parts = losses.token_parts(h, p["embed"], windows[:, 1:], impl=impl)
        return losses.batch_mean(parts["loss"]), (h, parts, ce_parts)

    run = jax.jit(lambda p: (jax.value_and_grad(loss, has_aux=True)(p, "naive"),
                             jax.value_and_grad(loss, has_aux=True)(p, "xla")))
    ((l0, (h0, parts0, ce0)), g0), ((l1, (h1, parts1, ce1)), g1) = run(params)
    assert _rel(h1, h0) < LOGITS_REL_TOL
    for key in ("ce", "kd", "kl", "correct", "n_greater"):
        assert _rel(parts1[key], parts0[key]) < LOGITS_REL_TOL, key
    for key in ("loss", "ce", "correct", "n_greater"):
        assert _rel(ce1[key], ce0[key]) < LOGITS_REL_TOL, key
    assert abs(float(l1) - float(l0)) < LOGITS_REL_TOL * abs(float(l0))
    g0, g1 = flatten_params(g0), flatten_params(g1)
    for key in g0:
        assert _rel(g1[key], g0[key]) < GRAD_REL_TOL, key


@pytest.mark.slow
def test_init_params_jax_layout_and_scale():
    config = get_preset("tiny-student").replace(vocab_size=512, d_model=32, d_ff=64)
    params = model.init_params_jax(config, 7)
    model.check_params(params, config)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert float(jnp.std(params["embed"])) == pytest.approx(1 / math.sqrt(32), rel=0.1)
    assert float(jnp.std(params["layers"]["w_down"])) == pytest.approx(
        1 / math.sqrt(64) / math.sqrt(4), rel=0.1)
    np.testing.assert_array_equal(params["final_norm"], 1.0)
    same = model.init_params_jax(config, 7)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-qwen2", "gemma", "qwen3"])
def test_architecture_options_match_reference(kind):
    """Every architecture option of reference/config.py in the JAX model: logits (1e-5) and the
    CE gradients through the fused loss kernel, which takes the head matrix (a separate
    ``lm_head`` when untied; 1e-4), against the float64 reference."""
    from arch_options import OPTION_CONFIGS, perturbed_params
    config = OPTION_CONFIGS[kind]
    params64 = perturbed_params(config, seed=2)
    window = _inputs(config, B=2, T=7, seed=3)
    prefix_len = np.array([0, 3], np.int32)
    ref_logits = ref_model.forward(params64, window[:, :-1], config, prefix_len)
    _, ref_grads, ref_metrics = ref_model.loss_and_grad(params64, window, config, prefix_len=prefix_len)
    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params64)

    @jax.jit
    def run(params, window, prefix_len):
        def ce(p):
            h = model.hidden(p, window[:, :-1], config, prefix_len)
            return losses.batch_mean(losses.token_parts(h, model.head_matrix(p), window[:, 1:])["loss"])
        return model.forward(params, window[:, :-1], config, prefix_len), jax.value_and_grad(ce)(params)

    logits, (loss, grads) = run(params32, jnp.asarray(window), jnp.asarray(prefix_len))
    assert _rel(logits, ref_logits) < LOGITS_REL_TOL
    assert abs(float(loss) - ref_metrics["ce"]) < LOGITS_REL_TOL * ref_metrics["ce"]
    ours, ref = flatten_params(grads), flatten_params(ref_grads)
    assert set(ours) == set(ref)
    for key in ours:
        assert _rel(ours[key], ref[key]) < GRAD_REL_TOL, key


@pytest.mark.slow
def test_init_params_jax_has_the_options_layout():
    from arch_options import OPTION_CONFIGS
    from salt.reference.config import param_shapes
    for config in OPTION_CONFIGS.values():
        params = model.init_params_jax(config, 0)
        model.check_params(params, config)
        want = flatten_params(param_shapes(config))
        assert {k: tuple(v.shape) for k, v in flatten_params(params).items()} == want
