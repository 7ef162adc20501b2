"""``salt bench attention``: MQA/GQA flash attention, forward+backward, per implementation.

For each shape (``B,T,H,KV,hd``) and implementation: the median wall time of a jitted
forward+backward (``jax.vjp`` with a random cotangent) on this backend, the compiled temporary
memory, and the causal FLOP count (``4·B·H·T²·hd`` forward, 2.5× that backward, halved for the
causal mask). Results of every implementation are checked against ``naive`` on the same inputs
(relative max error, printed) so the timing is of a correct computation. With ``--topology``
(e.g. ``v5e``) the Pallas kernels are also compiled ahead of time for that TPU and their
compiled temporary memory reported (no TPU needed; libtpu must be installed).
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import click

from salt.kernels import tpu_aot
from salt.kernels.attention import mqa_attention

DEFAULT_SHAPES = ("2,1024,8,1,64", "1,2048,4,1,128")


def _parse_shape(text: str):
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 5 or min(values) < 1:
        raise click.BadParameter(f"shape must be B,T,H,KV,hd (5 positive integers), got {text!r}")
    if values[2] % values[3]:
        raise click.BadParameter(f"shape {text!r}: H={values[2]} not divisible by KV={values[3]}")
    return values


def causal_flops(B, T, H, hd):
    """Matmul FLOPs of causal attention fwd (2 matmuls) + bwd (5 matmuls), half the blocks."""
    return 7 * 2 * B * H * T * T * hd // 2


def _fwd_bwd(impl, block_sizes=None):
    import jax

    def f(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: mqa_attention(q, k, v, impl=impl,
                                                         block_sizes=block_sizes), q, k, v)
        return out, vjp(do)
    return f


def run_benchmark(shape, impls, dtype_name="float32", repeats=5, seed=0, topology=None) -> list:
    import jax
    import jax.numpy as jnp
    import numpy as np

    B, T, H, KV, hd = shape
    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(seed)
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), dtype) for s in
                   ((B, T, H, hd), (B, T, KV, hd), (B, T, KV, hd), (B, T, H, hd)))
    rows, baseline = [], None
    for impl in impls:
        fn = jax.jit(_fwd_bwd(impl))
        compiled = fn.lower(q, k, v, do).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        result = jax.block_until_ready(compiled(q, k, v, do))  # warm-up, not timed
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v, do))
            times.append(time.perf_counter() - start)
        flat = [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(result)]
        if baseline is None:
            baseline = flat
        err = max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
                  for a, b in zip(flat, baseline))
        median = statistics.median(times)
        rows.append({
            "impl": impl, "B": B, "T": T, "H": H, "KV": KV, "hd": hd, "dtype": dtype_name,
            "backend": jax.default_backend(), "median_s": median, "repeats": repeats,
            "temp_bytes": int(temp), "flops": causal_flops(B, T, H, hd),
            "tflops_per_s": causal_flops(B, T, H, hd) / median / 1e12,
            f"max_rel_err_vs_{impls[0]}": err,
        })
    if topology:

        spec = jax.ShapeDtypeStruct
        compiled = tpu_aot.compile_for_topology(
            _fwd_bwd("pallas"), spec(q.shape, dtype), spec(k.shape, dtype), spec(v.shape, dtype),
            spec(do.shape, dtype), topology=topology)
        rows.append({"impl": "pallas", "B": B, "T": T, "H": H, "KV": KV, "hd": hd,
                     "dtype": dtype_name, "backend": f"tpu-aot:{topology}",
                     "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
                     "flops": causal_flops(B, T, H, hd)})
    return rows


@click.command("attention")
@click.option("--shape", "shapes", multiple=True, default=DEFAULT_SHAPES, show_default=True,
              help="B,T,H,KV,hd (repeatable)")
@click.option("--impl", "impls", multiple=True, default=("naive", "xla"), show_default=True,
              type=click.Choice(["naive", "xla", "pallas"]), help="first one is the baseline")
@click.option("--dtype", "dtype_name", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16"]))
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--topology", default=None, help="also AOT-compile the Pallas kernels for this TPU")
@click.option("--json", "as_json", is_flag=True, help="print one JSON list instead of a table")
def cli(shapes, impls, dtype_name, repeats, topology, as_json):
    """Time MQA/GQA attention forward+backward per implementation; report temp memory."""
    parsed = [_parse_shape(s) for s in shapes]
    rows = []
    for shape in parsed:
        rows += run_benchmark(shape, list(impls), dtype_name, repeats, topology=topology)
        if not as_json:
            for row in rows[-len(impls) - (1 if topology else 0):]:
                ms = f"{row['median_s'] * 1e3:9.2f} ms" if "median_s" in row else "        -   "
                print(f"{row['backend']:>14} {row['impl']:>6} B={row['B']} T={row['T']} H={row['H']} "
                      f"KV={row['KV']} hd={row['hd']}: {ms}  temp {row['temp_bytes'] / 2**20:8.1f} MiB",
                      file=sys.stdout)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
