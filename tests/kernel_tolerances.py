"""The fixed tolerances of the KD-kernel tests and the comparison they use (issue 5).

Inputs in float32: 1e-5 relative; bfloat16 inputs: 2e-2. A non-finite value never passes.
"""
import numpy as np

F32_TOL = 1e-5
BF16_TOL = 2e-2


def assert_close(actual, expected, tol, what):
    actual = np.asarray(actual, dtype=np.float64)
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    err = np.abs(actual - expected)
    bound = tol * (np.abs(expected) + 1.0)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (
        f"{what}: |{actual[worst]} - {expected[worst]}| = {err[worst]:.3g} > {bound[worst]:.3g} at {worst}")
