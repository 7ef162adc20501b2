"""`salt bench kd-loss` on this CPU at a tiny shape: both kinds run, the xla path agrees with the
naive baseline, and the analytic counts are the kernels' own (a smoke test of the benchmark)."""
import json

from click.testing import CliRunner

import jax
import jax.numpy as jnp

from salt.bench import kd_loss as bench
from salt.kernels.fused_linear_kd import fused_linear_kd_loss
from salt.kernels.logits_kd import bwd_flops, fwd_flops
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
        if r["kind"] == "fused":  # the matmuls of the traced program, plus the elementwise estimate
            assert r["executed_flops"] == fused_matmul_flops(r["impl"]) + fwd_flops(40, 300) + bwd_flops(40, 300)
        else:  # no matmul: the elementwise estimate alone
            assert r["executed_flops"] == fwd_flops(40, 300) + bwd_flops(40, 300)


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
