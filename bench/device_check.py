"""The device check's sections (run by bench/device_check.sh; docs/gpu.md).

    python -m salt.bench.device_check OUT_DIR [--skip-gpu]

Writes ``OUT_DIR/device_check.json`` after every section (a run cut short keeps what it has):

1. ``environment``: Python, jax, jaxlib, numpy versions, backend and devices.
2. ``cpu_interpret`` (any host): the Pallas GPU kernel (``impl="pallas_gpu"``) in interpret mode on the
   CPU against the ``xla`` path on the CPU, float32, a ragged shape: loss, ``d h_s`` and ``d E_s``.
3. GPU sections (skipped with one line when JAX has no GPU):
   ``gpu_check``: ``pallas_gpu`` compiled on the GPU against ``xla`` on the GPU (float32 at full
   matmul precision, ragged; bfloat16 at N 1024, V 32768, D 1024) and against the CPU result;
   ``bf16_matmul_flops_per_s``: an 8192³ bfloat16 matmul, the rate the roofline fractions use;
   ``timings``: forward + backward (``value_and_grad`` w.r.t. student hidden + embedding), bf16, median
   of 5 after a warm-up, at Liger's shape (N 8192, V 128256, D_s = D_t = 4096; Liger's chunked
   distillation loss: 60.7 ms on an H100, torch 213.2 ms) and the paper's (N 8192, V 256000, D_s = D_t =
   1024): ``pallas_gpu`` at two tile sizes and ``xla``, with executed and minimum flops and their
   fractions of the measured matmul rate.

Only jax and numpy are needed (plus click, for the :mod:`salt.bench.kd_loss` helpers: carried as a
wheel when the image lacks it, see bench/prepare_device_wheels.sh).  No ``salt.reference`` (numba).
Each section imports what it uses inside its own function, on purpose: a first-contact check must
record a broken jaxlib, Triton or kernel import as that section's failure and go on with the others.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

LIGER = {"N": 8192, "V": 128256, "Ds": 4096, "Dt": 4096, "liger_ms": 60.7, "torch_ms": 213.2,
         "source": "Liger-Kernel's published chunked distillation loss benchmark, H100, bf16"}
PAPER = {"N": 8192, "V": 256000, "Ds": 1024, "Dt": 1024}


def _save(report, out_dir):
    """Write the report so far (temp file + rename: a run killed mid-write keeps the last one)."""
    path = os.path.join(out_dir, "device_check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def _rel_err(got, ref):
    import jax
    import numpy as np

    errs = []
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        if not np.isfinite(g).all():
            return float("inf")
        errs.append(float(np.max(np.abs(g - r)) / max(float(np.max(np.abs(r))), 1e-30)))
    return max(errs)


def _fused(impl, block_sizes=None):
    import jax

    from salt.bench.kd_loss import _fwd_bwd
    return jax.jit(_fwd_bwd("fused", impl, block_sizes=block_sizes))


def _args(n, vocab, d_s, d_t, dtype, device=None, seed=0):
    import jax

    from salt.bench.kd_loss import _inputs
    with jax.default_device(device) if device is not None else _nullcontext():
        return _inputs("fused", n, vocab, d_s, d_t, dtype, seed)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _median_time(fn, args, repeats=5):
    import jax

    jax.block_until_ready(fn(*args))  # warm-up (compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def environment():
    import jax
    import jaxlib
    import numpy as np

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "numpy": np.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def cpu_interpret():
    """The GPU kernel in interpret mode on the CPU vs the xla path on the CPU (float32, ragged)."""
    import jax
    import jax.numpy as jnp

    from salt.kernels.fused_linear_kd import FusedKDBlockSizes
    cpu = jax.devices("cpu")[0]
    blocks = FusedKDBlockSizes(block_tokens=16, block_vocab=128, chunk_vocab=128, gpu_chunk_tokens=32)
    with jax.default_device(cpu):
        args = _args(77, 600, 48, 32, jnp.float32)
        interp = jax.jit(_interpret_fwd_bwd(blocks))
        start = time.perf_counter()
        got = jax.device_get(interp(*args))
        seconds = time.perf_counter() - start
        ref = jax.device_get(_fused("xla", blocks)(*args))
    return {"shape": [77, 600, 48, 32], "dtype": "float32", "max_rel_err_vs_cpu_xla": _rel_err(got, ref),
            "seconds": seconds}


def _interpret_fwd_bwd(blocks):
    import jax

    from salt.kernels.fused_linear_kd import fused_linear_kd_loss

    def f(hs, es, ht, et, y):
        loss = lambda a, b: fused_linear_kd_loss(a, b, ht, et, y, 0.667, 0.25, impl="pallas_gpu",  # noqa: E731
                                                 interpret=True, block_sizes=blocks).sum()
        return jax.value_and_grad(loss, argnums=(0, 1))(hs, es)
    return f


def gpu_check():
    """pallas_gpu on the GPU vs xla on the GPU (and the float32 case vs xla on the CPU)."""
    import jax
    import jax.numpy as jnp

    gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
    rows = []
    for shape, dtype in (((1000, 5003, 256, 128), jnp.float32), ((1024, 32768, 1024, 1024), jnp.bfloat16)):
        args = _args(*shape, dtype)
        row = {"shape": list(shape), "dtype": jnp.dtype(dtype).name}
        try:
            with jax.default_matmul_precision("highest"):  # float32: no TF32 in either path
                ref_gpu = jax.device_get(_fused("xla")(*jax.device_put(args, gpu)))
                got = jax.device_get(_fused("pallas_gpu")(*jax.device_put(args, gpu)))
                row["max_rel_err_vs_gpu_xla"] = _rel_err(got, ref_gpu)
                if dtype == jnp.float32:
                    ref_cpu = jax.device_get(_fused("xla")(*jax.device_put(args, cpu)))
                    row["max_rel_err_vs_cpu_xla"] = _rel_err(got, ref_cpu)
        except Exception as err:  # a Triton compile error: record it, go on to the timings
            row["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
        rows.append(row)
        print("gpu_check", row, flush=True)
    return rows


def matmul_rate(size=8192):
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((size, size), jnp.bfloat16), jax.devices("gpu")[0])
    return 2 * size**3 / _median_time(jax.jit(lambda x: x @ x), [a])


def timings(shape, rate, report, out_dir):
    import jax
    import jax.numpy as jnp

    from salt.bench.kd_loss import executed_flops, flop_floor
    from salt.kernels.fused_linear_kd import FusedKDBlockSizes
    n, vocab, d_s, d_t = (shape[k] for k in ("N", "V", "Ds", "Dt"))
    args = jax.device_put(_args(n, vocab, d_s, d_t, jnp.bfloat16), jax.devices("gpu")[0])
    rows = report.setdefault("timings", [])
    for impl, blocks in (("pallas_gpu", None), ("pallas_gpu", FusedKDBlockSizes(block_tokens=64)),
                         ("xla", FusedKDBlockSizes(chunk_vocab=4096))):
        row = {"impl": impl, "N": n, "V": vocab, "Ds": d_s, "Dt": d_t, "dtype": "bfloat16",
               "block_sizes": None if blocks is None else dataclasses.asdict(blocks)}
        try:
            fn = _fused(impl, blocks)
            compiled = fn.lower(*args).compile()
            row["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            seconds = _median_time(compiled, args)
            executed = executed_flops("fused", impl, n, vocab, d_s, d_t, platform="gpu")
            minimum = flop_floor("fused", n, vocab, d_s, d_t)
            row.update(median_ms=seconds * 1e3, executed_flops=int(executed), minimum_flops=int(minimum),
                       executed_fraction_of_matmul_rate=executed / seconds / rate,
                       minimum_fraction_of_matmul_rate=minimum / seconds / rate)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
        rows.append(row)
        print("time", row, flush=True)
        _save(report, out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m salt.bench.device_check")
    parser.add_argument("out_dir")
    parser.add_argument("--skip-gpu", action="store_true", help="run the CPU sections only")
    opts = parser.parse_args(argv)
    os.makedirs(opts.out_dir, exist_ok=True)
    report = {"environment": environment()}
    print("environment", report["environment"], flush=True)
    _save(report, opts.out_dir)

    report["cpu_interpret"] = cpu_interpret()
    print("cpu_interpret", report["cpu_interpret"], flush=True)
    _save(report, opts.out_dir)
    ok = report["cpu_interpret"]["max_rel_err_vs_cpu_xla"] < 1e-4

    import jax
    if opts.skip_gpu or jax.default_backend() != "gpu":
        report["gpu"] = f"skipped: JAX's backend is {jax.default_backend()!r}, not 'gpu'"
        print("GPU sections", report["gpu"], flush=True)
        _save(report, opts.out_dir)
        return 0 if ok else 1

    report["gpu_check"] = gpu_check()
    _save(report, opts.out_dir)
    report["bf16_matmul_flops_per_s"] = rate = matmul_rate()
    print("bf16 matmul TFLOP/s", rate / 1e12, flush=True)
    _save(report, opts.out_dir)
    report["liger"] = LIGER
    for shape in (LIGER, PAPER):
        timings(shape, rate, report, opts.out_dir)
    print("wrote", os.path.join(opts.out_dir, "device_check.json"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
