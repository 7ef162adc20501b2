#!/usr/bin/env bash
# Device check for an NVIDIA GPU session (written for one H200; well under 5 minutes).
#
#   OUT=/some/dir bash bench/device_check.sh
#
# 1. Correctness on the GPU: the fused-linear KD loss and its gradients (impl "xla", and "naive")
#    on the GPU against the same "xla" path on the CPU backend, float32, small ragged shape.
# 2. Timing: fused-linear KD, forward+backward (value_and_grad w.r.t. student hidden + embedding),
#    tokens 8192, student hidden 4096, vocab 128256, bfloat16, teacher hidden 4096 (the shape of
#    Liger-Kernel's published fused-linear distillation benchmark: 60.7 ms on an H100) and 2048;
#    median of 5 after a warm-up, plus the measured bf16 matmul rate for the roofline fraction.
# 3. Attention, forward+backward, bf16, the paper's multi-query shapes (B 6, T 1280; H 32 hd 128
#    and H 4 hd 256): "xla" flash path vs "naive" (checked against each other), time as a fraction
#    of the measured bf16 matmul rate (causal FLOPs).
# Results: $OUT/device_check.json and $OUT/device_check.log.  Needs a CUDA-enabled jax in the
# environment (the device machine has no network: nothing is installed here).
set -euo pipefail
OUT="${OUT:-$(pwd)/device_check_out}"
mkdir -p "$OUT"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
unset JAX_PLATFORMS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true

timeout 280 python - "$OUT" <<'PY' 2>&1 | tee "$OUT/device_check.log"
import json, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np

out_dir = sys.argv[1]
report = {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()]}
print(report, flush=True)
if jax.default_backend() != "gpu":
    report["error"] = "no GPU backend in this jax (install a CUDA-enabled jax 0.10.x)"
    json.dump(report, open(f"{out_dir}/device_check.json", "w"), indent=1)
    sys.exit(1)

from salt.kernels.fused_linear_kd import FusedKDBlockSizes, analytic_flops, fused_linear_kd_loss

gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]


def fwd_bwd(impl, chunk=1024):
    blocks = FusedKDBlockSizes(chunk_vocab=chunk)
    def f(hs, es, ht, et, y):
        loss = lambda a, b: fused_linear_kd_loss(a, b, ht, et, y, 0.667, 0.25, impl=impl,
                                                 block_sizes=blocks).sum()
        return jax.value_and_grad(loss, argnums=(0, 1))(hs, es)
    return jax.jit(f)


def inputs(n, v, d_s, d_t, dtype, seed=0):
    rng = np.random.default_rng(seed)
    arrs = [rng.standard_normal(sh, np.float32) * (3.0 / np.sqrt(sh[1]))
            for sh in ((n, d_s), (v, d_s), (n, d_t), (v, d_t))]
    return [a.astype(dtype) for a in arrs] + [rng.integers(0, v, n).astype(np.int32)]


# 1. correctness: GPU (xla, naive) vs CPU xla, float32, ragged shape
args = inputs(1000, 5003, 256, 128, np.float32)
ref = jax.device_get(fwd_bwd("xla")(*[jax.device_put(a, cpu) for a in args]))
checks = {}
for impl in ("xla", "naive"):
    got = jax.device_get(fwd_bwd(impl)(*[jax.device_put(a, gpu) for a in args]))
    errs = [float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64)))
                  / max(float(np.max(np.abs(np.asarray(r, np.float64)))), 1e-30))
            for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref))]
    checks[impl] = {"max_rel_err_vs_cpu_xla": max(errs), "finite": bool(all(
        np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree_util.tree_leaves(got)))}
    print("check", impl, checks[impl], flush=True)
report["checks"] = checks


def save():  # after every section, so a run cut by the timeout still leaves its results
    json.dump(report, open(f"{out_dir}/device_check.json", "w"), indent=1)


save()


def median_time(fn, args, repeats=5):
    jax.block_until_ready(fn(*args))  # warm-up (compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# bf16 matmul rate (roofline reference)
a = jax.device_put(jnp.ones((8192, 8192), jnp.bfloat16), gpu)
mm_s = median_time(jax.jit(lambda x: x @ x), [a])
report["bf16_matmul_flops_per_s"] = 2 * 8192**3 / mm_s
print("bf16 matmul TFLOP/s", report["bf16_matmul_flops_per_s"] / 1e12, flush=True)

# 2. timing at the Liger shape
timings = []
for d_t in (4096, 2048):
    n, v, d_s = 8192, 128256, 4096
    dev_args = [jax.device_put(x, gpu) for x in inputs(n, v, d_s, d_t, jnp.bfloat16)]
    for impl, chunk in (("xla", 1024), ("xla", 4096), ("naive", 0)):
        try:
            fn = fwd_bwd(impl, chunk or 1024)
            temp = fn.lower(*dev_args).compile().memory_analysis().temp_size_in_bytes
            t = median_time(fn, dev_args)
            flops = analytic_flops(n, v, d_s, d_t, schedule=impl)
            row = {"impl": impl, "chunk_vocab": chunk, "N": n, "V": v, "Ds": d_s, "Dt": d_t, "dtype": "bfloat16", "median_ms": t * 1e3,
                   "temp_bytes": int(temp), "executed_tflops_per_s": flops / t / 1e12,
                   "fraction_of_matmul_rate": flops / t / report["bf16_matmul_flops_per_s"]}
        except Exception as err:  # e.g. naive out of memory: record it, keep going
            row = {"impl": impl, "chunk_vocab": chunk, "Dt": d_t, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        timings.append(row)
        print("time", row, flush=True)
    del dev_args
report["timings"] = timings
save()

# 3. attention: the paper's multi-query shapes (sequence 1280, 7680 tokens), bf16, forward+backward;
#    xla flash path checked against naive on the same inputs, time as a fraction of the matmul rate.
from salt.bench.attention import causal_flops
from salt.kernels.attention import mqa_attention


def attention_fwd_bwd(impl):
    def f(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: mqa_attention(q, k, v, impl=impl), q, k, v)
        return out, vjp(do)
    return jax.jit(f)


attention = []
for B, T, H, KV, hd in ((6, 1280, 32, 1, 128), (6, 1280, 4, 1, 256)):
    rng = np.random.default_rng(1)
    qkvd = [jax.device_put(jnp.asarray(rng.standard_normal(sh, np.float32), jnp.bfloat16), gpu)
            for sh in ((B, T, H, hd), (B, T, KV, hd), (B, T, KV, hd), (B, T, H, hd))]
    results = {}
    for impl in ("xla", "naive"):
        try:
            fn = attention_fwd_bwd(impl)
            t = median_time(fn, qkvd)
            results[impl] = jax.device_get(fn(*qkvd))
            flops = causal_flops(B, T, H, hd)
            row = {"impl": impl, "B": B, "T": T, "H": H, "KV": KV, "hd": hd, "dtype": "bfloat16",
                   "median_ms": t * 1e3, "causal_tflops_per_s": flops / t / 1e12,
                   "fraction_of_matmul_rate": flops / t / report["bf16_matmul_flops_per_s"]}
        except Exception as err:
            row = {"impl": impl, "B": B, "T": T, "H": H, "hd": hd, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        attention.append(row)
        print("attention", row, flush=True)
    if len(results) == 2:
        errs = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                      / max(float(np.max(np.abs(np.asarray(b, np.float64)))), 1e-30))
                for a, b in zip(jax.tree_util.tree_leaves(results["xla"]), jax.tree_util.tree_leaves(results["naive"]))]
        attention[-2]["max_rel_err_vs_naive"] = max(errs)
        print("attention xla vs naive", max(errs), flush=True)
report["attention"] = attention
save()
print("wrote", f"{out_dir}/device_check.json")
PY
