"""Reference schedules: omega_at / lr_at values at boundary steps, special cases, bad input."""
import math

import numpy as np
import pytest

from salt.reference.schedule import lr_at, lr_values, omega_at, omega_values

OMEGA = 0.667


# ----------------------------------------------------------------------------- omega: step

def test_step_transition_boundaries():
    assert omega_at(1, OMEGA, 36) == OMEGA
    assert omega_at(36, OMEGA, 36) == OMEGA
    assert omega_at(37, OMEGA, 36) == 0.0
    assert omega_at(10**6, OMEGA, 36) == 0.0


def test_baseline_and_rkd_special_cases():
    n = 50
    steps = np.arange(1, n + 1)
    np.testing.assert_array_equal(omega_values(steps, OMEGA, 0), np.zeros(n))          # BASELINE
    np.testing.assert_array_equal(omega_values(steps, OMEGA, n), np.full(n, OMEGA))    # RKD
    for transition in ("linear", "linear-ratio"):  # n_kd1 = n_kd degenerates to "step"
        np.testing.assert_array_equal(
            omega_values(steps, OMEGA, 20, transition, n_kd1=20), omega_values(steps, OMEGA, 20))
        np.testing.assert_array_equal(omega_values(steps, OMEGA, 0, transition, n_kd1=0), np.zeros(n))


# ----------------------------------------------------------------------------- omega: linear

def test_linear_transition_exact_values():
    # paper appendix H: n_kd1 = 32K, n_kd = 36K (scaled down by 1000)
    assert omega_at(32, OMEGA, 36, "linear", n_kd1=32) == OMEGA
    assert omega_at(33, OMEGA, 36, "linear", n_kd1=32) == pytest.approx(OMEGA * 3 / 4, rel=1e-15)
    assert omega_at(34, OMEGA, 36, "linear", n_kd1=32) == pytest.approx(OMEGA * 2 / 4, rel=1e-15)
    assert omega_at(35, OMEGA, 36, "linear", n_kd1=32) == pytest.approx(OMEGA * 1 / 4, rel=1e-15)
    assert omega_at(36, OMEGA, 36, "linear", n_kd1=32) == 0.0
    assert omega_at(37, OMEGA, 36, "linear", n_kd1=32) == 0.0


def test_linear_ratio_transition_exact_values():
    ratio = OMEGA / (1 - OMEGA)
    assert omega_at(1, OMEGA, 36, "linear-ratio", n_kd1=32) == OMEGA
    assert omega_at(32, OMEGA, 36, "linear-ratio", n_kd1=32) == OMEGA
    for step in (33, 34, 35):
        r = ratio * (36 - step) / 4
        assert omega_at(step, OMEGA, 36, "linear-ratio", n_kd1=32) == pytest.approx(r / (1 + r), rel=1e-14)
    assert omega_at(36, OMEGA, 36, "linear-ratio", n_kd1=32) == 0.0
    assert omega_at(37, OMEGA, 36, "linear-ratio", n_kd1=32) == 0.0


def test_linear_ratio_is_monotone_and_above_linear():
    steps = np.arange(1, 60)
    ratio_w = omega_values(steps, OMEGA, 40, "linear-ratio", n_kd1=20)
    linear_w = omega_values(steps, OMEGA, 40, "linear", n_kd1=20)
    assert np.all(np.diff(ratio_w) <= 0) and np.all(np.diff(linear_w) <= 0)
    # r/(1+r) is concave in r: the ratio decay stays above the linear one in between
    inside = (steps > 20) & (steps < 40)
    assert np.all(ratio_w[inside] > linear_w[inside])


def test_linear_ratio_omega_one_is_documented_limit():
    assert omega_at(33, 1.0, 36, "linear-ratio", n_kd1=32) == 1.0
    assert omega_at(35, 1.0, 36, "linear-ratio", n_kd1=32) == 1.0
    assert omega_at(36, 1.0, 36, "linear-ratio", n_kd1=32) == 0.0
    assert omega_at(35, 0.0, 36, "linear-ratio", n_kd1=32) == 0.0
    # the limit is continuous: omega -> 1 approaches it
    assert omega_at(35, 1 - 1e-9, 36, "linear-ratio", n_kd1=32) == pytest.approx(1.0, abs=1e-8)


def test_omega_values_matches_scalar():
    steps = np.arange(1, 45).reshape(4, 11)
    for transition in ("step", "linear", "linear-ratio"):
        got = omega_values(steps, OMEGA, 36, transition, n_kd1=30)
        want = [[omega_at(int(j), OMEGA, 36, transition, n_kd1=30) for j in row] for row in steps]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(step=0), "step"),
    (dict(step=1.5), "step"),
    (dict(omega=1.5), "omega"),
    (dict(omega=-0.1), "omega"),
    (dict(omega=float("nan")), "omega"),
    (dict(n_kd=-1), "n_kd"),
    (dict(n_kd=3.0), "n_kd"),
    (dict(transition="cosine"), "transition"),
    (dict(transition="linear"), "n_kd1"),
    (dict(transition="linear-ratio"), "n_kd1"),
    (dict(transition="linear", n_kd1=40), "n_kd1"),
    (dict(transition="linear", n_kd1=-1), "n_kd1"),
    (dict(n_kd1=37), "n_kd1"),
])
def test_omega_bad_input(kwargs, match):
    args = dict(step=5, omega=OMEGA, n_kd=36)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        omega_at(**args)


def test_omega_values_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        omega_values(np.array([0, 1]), OMEGA, 3)
    with pytest.raises(ValueError, match="steps"):
        omega_values(np.array([1.0]), OMEGA, 3)


# ----------------------------------------------------------------------------- learning rate

PAPER = dict(peak_lr=1e-3, warmup_steps=4000, total_steps=208_000, final_lr=1e-4)


def test_lr_warmup_boundaries():
    assert lr_at(1, **PAPER) == pytest.approx(1e-3 / 4000, rel=1e-15)
    assert lr_at(2000, **PAPER) == pytest.approx(0.5e-3, rel=1e-15)
    assert lr_at(4000, **PAPER) == 1e-3
    assert lr_at(4001, **PAPER) < 1e-3


def test_lr_cosine_boundaries():
    mid = 4000 + (208_000 - 4000) // 2
    assert lr_at(mid, **PAPER) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-14)
    assert lr_at(208_000, **PAPER) == 1e-4
    assert lr_at(300_000, **PAPER) == 1e-4
    step = 4000 + 51_000  # a quarter of the decay: 0.5 (1 + cos(pi/4))
    assert lr_at(step, **PAPER) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-14)


def test_lr_no_warmup_and_constant():
    assert lr_at(1, 1.0, 0, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)), rel=1e-15)
    np.testing.assert_array_equal(lr_values(np.arange(1, 20), 2e-3, 3, 12, 2e-3)[3:], 2e-3)


def test_lr_values_monotone_and_matches_scalar():
    steps = np.arange(1, 130)
    values = lr_values(steps, 1.0, 10, 100, 0.1)
    np.testing.assert_array_equal(values, [lr_at(int(j), 1.0, 10, 100, 0.1) for j in steps])
    assert np.all(np.diff(values[:10]) > 0) and np.all(np.diff(values[9:]) <= 0)


def test_lr_matches_optax_definition():
    optax = pytest.importorskip("optax")
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=1e-3, warmup_steps=40, decay_steps=2080, end_value=1e-4)
        steps = np.array([1, 2, 39, 40, 41, 100, 1000, 2079, 2080, 2500])
        want = np.asarray(jax.jit(schedule)(jnp.asarray(steps)))  # all steps in one call
        assert want.dtype == np.float64
    np.testing.assert_allclose(lr_values(steps, 1e-3, 40, 2080, 1e-4), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(step=0), "step"),
    (dict(peak_lr=0.0), "peak_lr"),
    (dict(peak_lr=-1e-3), "peak_lr"),
    (dict(peak_lr=float("inf")), "peak_lr"),
    (dict(final_lr=-1e-4), "final_lr"),
    (dict(final_lr=2e-3), "final_lr"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=300_000), "warmup_steps"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10.5), "total_steps"),
])
def test_lr_bad_input(kwargs, match):
    args = dict(step=5, **PAPER)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lr_at(**args)
