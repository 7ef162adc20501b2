"""`salt bench kd-loss` on this CPU at a tiny shape: both kinds run, the xla path agrees with the
naive baseline, and the executed flops it reports are the traced program's matmuls plus an
elementwise estimate of XLA's order (a smoke test of the benchmark)."""
import json

from click.testing import CliRunner

import jax
import jax.numpy as jnp

from salt.bench import kd_loss as bench
from salt.kernels.fused_linear_kd import fused_linear_kd_loss
from salt.kernels.logits_kd import kd_loss
from matmul_count import matmul_flops


def test_bench_runs_both_kinds(monkeypatch):
    # The measured peaks (a 256 MiB elementwise pass) are not the point here: fixed stand-ins.
    monkeypatch.setattr(bench, "measure_backend_peaks", lambda: (1e11, 1e10))
    result = CliRunner().invoke(bench.cli, ["--kind", "logits", "--kind", "fused", "--shape", "40,300,16,8",
                                            "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {(r["kind"], r["impl"]) for r in rows} == {(k, i) for k in ("logits", "fused") for i in ("naive", "xla")}
    for r in rows:
        assert r["max_rel_err_vs_baseline"] <= 1e-5, r
        assert r["median_s"] > 0 and r["temp_bytes"] >= 0 and r["roofline_fraction"] > 0, r
        # counted independently: the matmuls exactly from the traced program; the elementwise rest
        # (an estimate per logit pair) against XLA's own count of the loop-free naive loss
        elementwise = r["executed_flops"] - (fused_matmul_flops(r["impl"]) if r["kind"] == "fused" else 0)
        assert 0.5 * xla_elementwise_flops(40, 300) <= elementwise <= 2.0 * xla_elementwise_flops(40, 300), r


def xla_elementwise_flops(n, vocab):
    """XLA's flop count (``cost_analysis``) of the naive logits loss, forward + backward: no loop
    and no matmul, so every flop XLA counts is elementwise work on the ``[n, vocab]`` logits."""
    S = jax.ShapeDtypeStruct
    f = lambda s, t, y: jax.value_and_grad(lambda s: kd_loss(s, t, y, 0.667, 0.25, impl="naive").sum())(s)  # noqa: E731
    analysis = jax.jit(f).lower(S((n, vocab), jnp.float32), S((n, vocab), jnp.float32),
                                S((n,), jnp.int32)).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return analysis["flops"]


def fused_matmul_flops(impl):
    S = jax.ShapeDtypeStruct

    def fwd_bwd(hs, es, ht, et, y):
        loss = lambda a, b: fused_linear_kd_loss(a, b, ht, et, y, 0.5, 0.25, impl=impl).sum()  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))(hs, es)

    return matmul_flops(fwd_bwd, S((40, 16), jnp.float32), S((300, 16), jnp.float32), S((40, 8), jnp.float32),
                        S((300, 8), jnp.float32), S((40,), jnp.int32))


def test_bench_bad_shape_is_a_clean_error():
    result = CliRunner().invoke(bench.cli, ["--shape", "40,300,16"])
    assert result.exit_code != 0 and "N,V,Ds,Dt" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
