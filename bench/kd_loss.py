"""``salt bench kd-loss``: KD-loss kernels, forward+backward, per implementation and shape.

For each shape ``N,V,Ds,Dt`` (tokens, vocabulary, student hidden, teacher hidden) and kind
(``fused``: :func:`salt.kernels.fused_linear_kd_loss` from hidden states + tied embeddings;
``logits``: :func:`salt.kernels.kd_loss` from ``[N, V]`` logits, ``Ds``/``Dt`` unused):

* median wall time of a jitted forward+backward (``jax.value_and_grad`` of the sum of the per-token
  loss w.r.t. the student's arrays) on this backend (one warm-up call first, not timed);
* the compiled temporary memory (``memory_analysis().temp_size_in_bytes``) and its ratio to the
  first (baseline) implementation's;
* the FLOP floor (the algorithm's minimum: logits once + the gradient matmuls; the fused kernels
  execute more because they recompute logits in the backward, reported as ``executed_flops``) and
  the byte floor (read every input once, write every gradient once), and the achieved fraction of
  the roofline
  ``max(flops / matmul_rate, bytes / bandwidth) / time`` where the matmul rate and bandwidth are
  MEASURED on this backend first (a square matmul and a large elementwise pass);
* the max relative error of each implementation's loss and gradients against the baseline.

``--topology v5e`` (or ``v5e:2x2``, ``v5p``, ``v6e``) instead compiles every implementation ahead
of time for that TPU (no TPU needed) and reports compiled temporary memory, the compiled cost
analysis (flops, bytes accessed) and a roofline time floor from the chip's published peaks.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import click
import jax
import jax.numpy as jnp

from salt.kernels import fused_linear_kd, resolve_impl, tpu_aot
from salt.kernels.fused_linear_kd import fused_linear_kd_loss
from salt.kernels.logits_kd import bwd_flops, fwd_flops, kd_loss

DEFAULT_SHAPES = ("2048,32768,1024,1024",)

# Published per-chip peaks (dense bf16 FLOP/s, HBM bytes/s) for the roofline floor under --topology.
TPU_PEAKS = {
    "TPU v5 lite": (197e12, 819e9),
    "TPU v5": (459e12, 2765e9),
    "TPU v6 lite": (918e12, 1640e9),
}


def _parse_shape(text: str):
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise click.BadParameter(f"shape must be N,V,Ds,Dt (4 positive integers), got {text!r}")
    return values


def executed_flops(kind, impl, n, vocab, d_s, d_t, platform=None):
    """Analytic flops the implementation executes (the fused ones recompute logits backward;
    ``impl`` as resolved on ``platform``, e.g. "pallas" on a GPU runs "pallas_gpu")."""

    if kind == "logits":
        return fwd_flops(n, vocab) + bwd_flops(n, vocab)
    schedule = resolve_impl(impl, gpu_kernel=True, platform=platform)
    return fused_linear_kd.analytic_flops(n, vocab, d_s, d_t, schedule=schedule)


def flop_floor(kind, n, vocab, d_s, d_t):
    """The algorithm's minimum: logits once, gradient matmuls once (the naive schedule)."""
    return executed_flops(kind, "naive", n, vocab, d_s, d_t)


def byte_floor(kind, n, vocab, d_s, d_t, itemsize):
    """Read every input once and write every gradient once."""
    if kind == "logits":
        return itemsize * 3 * n * vocab + 8 * n  # s, t read; ds written; labels, loss
    inputs = (n + vocab) * (d_s + d_t)
    grads = (n + vocab) * d_s
    return itemsize * (inputs + grads) + 8 * n


def _inputs(kind, n, vocab, d_s, d_t, dtype, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.integers(0, vocab, size=n), jnp.int32)
    if kind == "logits":
        s, t = (jnp.asarray(rng.standard_normal((n, vocab), np.float32) * 3, dtype) for _ in range(2))
        return (s, t, y)
    shapes = ((n, d_s), (vocab, d_s), (n, d_t), (vocab, d_t))
    arrays = tuple(jnp.asarray(rng.standard_normal(sh, np.float32) * (3.0 / np.sqrt(sh[1])), dtype)
                   for sh in shapes)
    return arrays + (y,)


def _fwd_bwd(kind, impl, omega=0.667, rho=0.25, block_sizes=None):

    if kind == "logits":
        def f(s, t, y):
            return jax.value_and_grad(lambda s: kd_loss(s, t, y, omega, rho, impl=impl).sum())(s)
        return f

    def g(hs, es, ht, et, y):
        loss = lambda a, b: fused_linear_kd_loss(a, b, ht, et, y, omega, rho, impl=impl,  # noqa: E731
                                                 block_sizes=block_sizes).sum()
        return jax.value_and_grad(loss, argnums=(0, 1))(hs, es)
    return g


def measure_backend_peaks(size=2048, repeats=3, dtype_name="float32"):
    """(matmul FLOP/s, elementwise bytes/s) measured on the default backend (the matmul in
    ``dtype_name``, the elementwise pass in float32)."""

    a = jnp.ones((size, size), jnp.dtype(dtype_name))
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(mm(a))
        times.append(time.perf_counter() - start)
    rate = 2 * size**3 / min(times)
    big = jnp.ones((64 * 1024 * 1024,), jnp.float32)  # 256 MiB
    add = jax.jit(lambda x: x * 1.5 + 1.0)
    jax.block_until_ready(add(big))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(add(big))
        times.append(time.perf_counter() - start)
    bandwidth = 2 * big.size * 4 / min(times)
    return rate, bandwidth


def run_benchmark(kind, shape, impls, dtype_name="float32", repeats=3, seed=0, peaks=None) -> list:
    import numpy as np

    n, vocab, d_s, d_t = shape
    dtype = jnp.dtype(dtype_name)
    args = _inputs(kind, n, vocab, d_s, d_t, dtype, seed)
    rate, bandwidth = peaks if peaks else measure_backend_peaks()
    rows, baseline = [], None
    for impl in impls:
        compiled = jax.jit(_fwd_bwd(kind, impl)).lower(*args).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        result = jax.block_until_ready(compiled(*args))  # warm-up, not timed
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        flat = [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(result)]
        if baseline is None:
            baseline = (flat, temp, statistics.median(times))
        err = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                  for a, b in zip(flat, baseline[0]))
        median = statistics.median(times)
        flops = flop_floor(kind, n, vocab, d_s, d_t)
        nbytes = byte_floor(kind, n, vocab, d_s, d_t, dtype.itemsize)
        floor_s = max(flops / rate, nbytes / bandwidth)
        rows.append({
            "kind": kind, "impl": impl, "N": n, "V": vocab, "Ds": d_s, "Dt": d_t, "dtype": dtype_name,
            "backend": jax.default_backend(), "median_s": median, "repeats": repeats,
            "temp_bytes": int(temp), "temp_vs_baseline": temp / max(baseline[1], 1),
            "time_vs_baseline": median / baseline[2],
            "flop_floor": int(flops), "executed_flops": int(executed_flops(kind, impl, n, vocab, d_s, d_t)),
            "byte_floor": int(nbytes),
            "measured_matmul_flops_per_s": rate, "measured_bytes_per_s": bandwidth,
            "roofline_fraction": floor_s / median, "max_rel_err_vs_baseline": err,
        })
    return rows


def run_topology(kind, shape, impls, dtype_name, topology) -> list:


    n, vocab, d_s, d_t = shape
    dtype = jnp.dtype(dtype_name)
    S = jax.ShapeDtypeStruct
    if kind == "logits":
        specs = (S((n, vocab), dtype), S((n, vocab), dtype), S((n,), jnp.int32))
    else:
        specs = (S((n, d_s), dtype), S((vocab, d_s), dtype), S((n, d_t), dtype), S((vocab, d_t), dtype),
                 S((n,), jnp.int32))
    peak_flops, peak_bw = TPU_PEAKS.get(tpu_aot.chip_kind(topology), (float("nan"), float("nan")))
    rows = []
    for impl in impls:
        start = time.perf_counter()
        try:
            compiled = tpu_aot.compile_for_topology(_fwd_bwd(kind, impl), *specs, topology=topology)
        except Exception as err:  # e.g. naive needs more HBM than the chip has: report, go on
            rows.append({"kind": kind, "impl": impl, "N": n, "V": vocab, "Ds": d_s, "Dt": d_t,
                         "dtype": dtype_name, "topology": tpu_aot.TOPOLOGIES.get(topology, topology),
                         "chip": tpu_aot.chip_kind(topology),
                         "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            continue
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        analysis = compiled.cost_analysis()
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0] if analysis else {}
        flops = float(analysis.get("flops", 0.0))
        accessed = float(analysis.get("bytes accessed", 0.0))
        analytic = executed_flops(kind, impl, n, vocab, d_s, d_t)
        rows.append({
            "kind": kind, "impl": impl, "N": n, "V": vocab, "Ds": d_s, "Dt": d_t, "dtype": dtype_name,
            "topology": tpu_aot.TOPOLOGIES.get(topology, topology), "chip": tpu_aot.chip_kind(topology),
            "compile_s": compile_s, "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
            "compiled_flops": flops, "analytic_flops": int(analytic), "compiled_bytes_accessed": accessed,
            "roofline_floor_s": max(flops / peak_flops, accessed / peak_bw),
            "note": ("XLA's cost/memory analysis counts a while-loop (scan) body once"
                     if impl == "xla" else ""),
        })
    return rows


def _fmt_bytes(x):
    return f"{x / 2**20:.1f}MiB"


@click.command("kd-loss")
@click.option("--shape", "shapes", multiple=True, default=DEFAULT_SHAPES, show_default=True,
              help="N,V,Ds,Dt (tokens, vocab, student hidden, teacher hidden); repeatable")
@click.option("--kind", "kinds", multiple=True, default=("fused",), show_default=True,
              type=click.Choice(["fused", "logits"]), help="fused-linear loss or loss from logits")
@click.option("--impl", "impls", multiple=True, default=("naive", "xla"), show_default=True,
              type=click.Choice(["naive", "xla", "pallas", "pallas_gpu"]),
              help="first one is the baseline; pallas: the platform's Pallas kernels (GPU: pallas_gpu)")
@click.option("--dtype", "dtype_name", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16"]))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--topology", default=None,
              help="compile for this TPU (v5e, v5p, v6e or e.g. v5e:2x2) instead of timing here")
@click.option("--json", "as_json", is_flag=True, help="print one JSON list instead of a table")
def cli(shapes, kinds, impls, dtype_name, repeats, topology, as_json):
    """KD loss (fused-linear or from logits), forward+backward: time, memory, roofline."""
    from tqdm import tqdm

    parsed = [_parse_shape(s) for s in shapes]
    if topology is None and {"pallas", "pallas_gpu"} & set(impls):
        backend = jax.default_backend()
        if backend not in ("tpu", "gpu") or ("pallas_gpu" in impls and backend != "gpu"):
            raise click.BadParameter(f"the Pallas kernels run on a TPU (pallas) or a GPU (pallas, pallas_gpu), "
                                     f"not on {backend}; use --topology to compile them for a TPU, or --impl "
                                     "naive/xla here", param_hint="--impl")
    if topology is not None:
        if not tpu_aot.libtpu_available():
            raise click.ClickException("--topology needs the 'libtpu' package")
        try:
            tpu_aot.topology_devices(topology)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--topology") from None
    jobs = [(k, s) for k in kinds for s in parsed]
    rows = []
    peaks = None
    if topology is None:
        peaks = measure_backend_peaks()
    for kind, shape in tqdm(jobs, desc="kd-loss bench", file=sys.stderr, disable=len(jobs) < 2):
        if topology is None:
            rows += run_benchmark(kind, shape, impls, dtype_name, repeats, peaks=peaks)
        else:
            rows += run_topology(kind, shape, impls, dtype_name, topology)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        head = f"{r['kind']:6s} {r['impl']:6s} N={r['N']} V={r['V']} Ds={r['Ds']} Dt={r['Dt']} {r['dtype']}"
        if topology is None:
            click.echo(f"{head}: {r['median_s'] * 1e3:9.1f} ms ({r['time_vs_baseline']:.2f}x)  "
                       f"temp {_fmt_bytes(r['temp_bytes'])} ({100 * r['temp_vs_baseline']:.1f}%)  "
                       f"floors {r['flop_floor'] / 1e9:.1f} GFLOP, {_fmt_bytes(r['byte_floor'])}  "
                       f"roofline {100 * r['roofline_fraction']:.1f}%  err {r['max_rel_err_vs_baseline']:.1e}")
        elif "error" in r:
            click.echo(f"{head} on {r['topology']} ({r['chip']}): does not compile: {r['error']}")
        else:
            click.echo(f"{head} on {r['topology']} ({r['chip']}): temp {_fmt_bytes(r['temp_bytes'])}  "
                       f"flops {r['compiled_flops']:.4g} (analytic {r['analytic_flops']:.4g})  "
                       f"bytes {r['compiled_bytes_accessed']:.4g}  floor {r['roofline_floor_s'] * 1e3:.2f} ms  "
                       f"compile {r['compile_s']:.1f}s" + (f"  [{r['note']}]" if r["note"] else ""))
