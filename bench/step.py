"""``salt bench step``: the KD train step against the standard train step, in one run.

Both steps are the trainer's own AOT-compiled steps (``salt.runtime.train.step.compiled_step``) on
random parameters of the chosen presets (vocabulary ``--vocab``), random windows, one device
mesh.  Reported:

* median wall time of each step (timed alternately, ``--iters`` each after ``--warmup``
  untimed calls), their ratio, the ratio of the steps' minimum per-process CPU times over the
  same repetitions (robust to other processes: :func:`robust_times`; what ``salt reproduce``
  reports), the mean and standard error of the per-iteration paired ratios, and
  the ratio predicted by the analytic FLOP counts ``1 + teacher forward FLOPs / student train-step
  FLOPs`` (``salt.runtime.model.transformer``); the difference in percentage points.  On a multi-core CPU the
  KD step runs below the prediction: XLA runs the teacher's forward concurrently with the
  student's work on otherwise idle cores.  ``--cores 1`` (like ``taskset -c 0``) serialises the
  work as an accelerator does; the optimizer update (memory-bound, not in the FLOP counts, the same
  in both steps) still dilutes the ratio at small batches.  ``--gradients`` also times the gradient
  computations alone, the work the FLOP counts describe (docs/reproduction.md);
* tokens/s of each step; achieved FLOP/s (analytic FLOPs / time) and its fraction of this
  machine's measured float32 matmul rate (a jitted square matmul, timed first);
* the compiled temporary memory (``memory_analysis().temp_size_in_bytes``) of both steps;
* unless ``--no-compare``: the same two steps with the full-logits loss (``loss_kernels="naive"``,
  the trainer's loss before the fused-linear kernels; attention unchanged), and the fused path's
  time and memory relative to it;
* with ``--kd-topk K``: the KD step is top-K KD (paper eq. 13-14) with the online teacher, and a
  third step is timed in the same interleaved loop: KD from a teacher cache (``salt teacher
  cache``; no teacher forward).  Its timed call includes reading the step's files from a real
  on-disk cache (one step written by :func:`salt.runtime.train.teacher_cache.write_step`, the
  default compact layout), checking their sha256 and decoding them (that part is also reported on
  its own); reported as ratios to the standard and the online-teacher step.  The same step from an
  uncompressed cache (bfloat16 logits, the first layout) is timed in the same loop, and the cache's
  on-disk bytes per token for k = 16, 64, 128 in both layouts (measured from written files, at this
  vocabulary and at the paper's V = 256,000).

Why one module of ~460 lines: the benchmark, its text report and its command share one result
dict; splitting them would only move the dict's keys between files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import types

import click
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from salt.reference.config import ModelConfig, get_preset, param_count
from salt.runtime.model import sharding, transformer as model
from salt.runtime.train import optim, step as step_mod, teacher_cache
from salt.runtime.train.batches import cached_batch_abstract, cached_step_batch
from salt.runtime.train.config import TrainConfig, resolve_kernels
from salt.runtime.train.teacher_cache import bytes_per_token


def restrict_cores(n: int) -> None:
    """Pin this process to the first ``n`` CPU cores it may use, before JAX starts its backend (XLA
    sizes its CPU thread pool from the cores it may run on)."""
    allowed = sorted(os.sched_getaffinity(0))
    if n > len(allowed):
        raise click.BadParameter(f"{n} cores asked for, this process may use {len(allowed)}",
                                 param_hint="--cores")
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and bridge.backends_are_initialized():
        raise click.UsageError("--cores must be set before JAX starts its backend")
    os.sched_setaffinity(0, allowed[:n])


def measure_matmul_rate(n: int = 1024, iters: int = 10) -> float:
    """float32 FLOP/s of a jitted ``[n, n] @ [n, n]`` on the default device (median)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2.0 * n ** 3 / statistics.median(times)


@dataclasses.dataclass
class _Setup:
    """Random parameters of both presets on one device, the optimizer state, random windows and
    the config whose hyperparameters the steps take."""

    student: ModelConfig
    teacher: ModelConfig
    mesh: object
    params: dict
    t_params: dict
    opt_state: object
    params_abs: dict
    opt_abs: object
    windows: object
    cfg: TrainConfig
    hyper: dict


def _setup(student_name, teacher_name, *, vocab, batch, seq_len, optimizer, dtype, transition, kernels,
           kd_topk, teacher_config=None) -> _Setup:
    student = get_preset(student_name).replace(vocab_size=vocab)
    # teacher_config: a given model (an imported SLM) instead of the preset named teacher_name
    teacher = (teacher_config or get_preset(teacher_name)).replace(vocab_size=vocab)
    mesh = sharding.make_mesh("data=1,model=1")
    params = sharding.shard_params(model.init_params_jax(student, 0), student, mesh)
    t_params = sharding.shard_params(model.init_params_jax(teacher, 1), teacher, mesh)
    params_abs = step_mod.abstract_of(params)
    opt_abs = step_mod.opt_state_abstract(optimizer, params_abs, mesh)
    opt_state = jax.jit(optim.make_direction(optimizer).init,
                        out_shardings=step_mod.shardings_of(opt_abs))(params)
    windows = jax.device_put(
        np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32),
        sharding.batch_sharding(mesh))
    steps_total = 10 ** 6
    cfg = TrainConfig(preset=student_name, data="-", out="-", teacher="-", kd_steps=steps_total,
                      steps=steps_total, batch=batch, seq_len=seq_len, optimizer=optimizer,
                      dtype=dtype, warmup=0, transition=transition, kernels=kernels,
                      kd_steps1=steps_total if transition != "step" else None, kd_topk=kd_topk)
    hyper = jax.device_put(step_mod.hyperparameters(cfg), sharding.replicated(mesh))
    return _Setup(student, teacher, mesh, params, t_params, opt_state, params_abs, opt_abs, windows, cfg, hyper)


def _compile(s: _Setup, kinds, *, loss_kernels, gradients: bool) -> dict:
    """The compiled steps of ``kinds`` (name, teacher config, teacher abstract, windows abstract):
    the trainer's own executables, or with ``loss_kernels`` the same step with that loss; their
    compile times; with ``gradients`` the jitted gradient computations alone."""
    cfg, compiled = s.cfg, {}
    kernels = resolve_kernels(cfg.kernels)
    for kind, t_cfg, t_abs, w_abs in kinds:
        start = time.perf_counter()
        if loss_kernels is None:  # the trainer's own executable
            compiled[kind] = step_mod.compiled_step(s.student, t_cfg, cfg, s.mesh, s.params_abs, s.opt_abs, t_abs,
                                                    w_abs)
        else:
            fn = step_mod.make_step_fn(s.student, t_cfg, cfg.optimizer, transition=cfg.transition, rho=cfg.rho,
                                       dtype=cfg.dtype, kernels=kernels, mesh=s.mesh, loss_kernels=loss_kernels,
                                       kd_topk=cfg.kd_topk if t_cfg else None)
            out_sh = (step_mod.shardings_of(s.params_abs), step_mod.shardings_of(s.opt_abs),
                      sharding.replicated(s.mesh))
            compiled[kind] = step_mod.compile_step(fn, s.params_abs, s.opt_abs, t_abs, w_abs,
                                                   mesh=s.mesh, out_shardings=out_sh)
        compiled[kind + "_compile_s"] = time.perf_counter() - start
    if cfg.kd_topk is not None:
        compiled["cached_bf16"] = compiled["cached"]  # the same step, from the uncompressed cache
    if gradients:  # the gradient computations alone: what the FLOP counts describe (no optimizer update)
        for kind, t_cfg in (("standard_grad", None), ("kd_grad", s.teacher)):
            compiled[kind] = jax.jit(step_mod.make_grad_fn(
                s.student, t_cfg, transition=cfg.transition, rho=cfg.rho, dtype=cfg.dtype, kernels=kernels,
                mesh=s.mesh, loss_kernels=loss_kernels, kd_topk=cfg.kd_topk if t_cfg else None))
    return compiled


def _time_interleaved(s: _Setup, compiled: dict, names: list, caches: dict, *, iters: int, warmup: int,
                      progress: bool):
    """Each step of ``names`` called in turn, ``warmup`` untimed rounds then ``iters`` timed ones:
    (wall times, per-process CPU times, cache read times) per step kind."""
    step_arr = jax.device_put(np.int32(1), sharding.replicated(s.mesh))
    state = {"params": s.params, "opt": s.opt_state}
    one_process = types.SimpleNamespace(process_index=0, local_batch=s.cfg.batch)  # the loader's sharding fields
    read_s = {"cached": [], "cached_bf16": []}

    def call(kind):
        t_arg = s.t_params if kind.startswith("kd") else None
        if kind.endswith("_grad"):
            jax.block_until_ready(compiled[kind](state["params"], t_arg, s.windows, step_arr, s.hyper))
            return
        inputs = s.windows
        if kind.startswith("cached"):  # the trainer's per-step work: read + decode the step, then upload
            t = time.perf_counter()
            inputs = cached_step_batch(s.cfg, caches[kind], one_process, 0, s.windows, s.mesh)
            jax.block_until_ready(inputs)
            read_s[kind].append(time.perf_counter() - t)
        p, o, m = compiled[kind](state["params"], state["opt"], t_arg, inputs, step_arr, s.hyper)
        jax.block_until_ready((p, o, m))
        state["params"], state["opt"] = p, o  # the step donates its inputs

    for kind in names:
        if kind.endswith("_grad"):
            call(kind)  # jit-compiles it outside the timed calls even with --warmup 0
    for _ in range(warmup):
        for kind in names:
            call(kind)
    times = {kind: [] for kind in names}
    cpu_times = {kind: [] for kind in names}
    for _ in tqdm(range(iters), desc="bench step", file=sys.stderr, disable=not progress):
        for kind in names:
            t, c = time.perf_counter(), time.process_time()
            call(kind)
            times[kind].append(time.perf_counter() - t)
            cpu_times[kind].append(time.process_time() - c)
    return times, cpu_times, read_s


def _memory(c):
    m = c.memory_analysis()
    return None if m is None else int(m.temp_size_in_bytes)


def run_benchmark(student_name: str, teacher_name: str, *, vocab: int, batch: int, seq_len: int,
                  optimizer: str = "adafactor", dtype: str = "float32", iters: int = 10,
                  warmup: int = 2, transition: str = "step", matmul_n: int = 1024,
                  kernels: str = "auto", loss_kernels: str | None = None,
                  kd_topk: int | None = None, gradients: bool = False, progress: bool = True,
                  teacher_config: ModelConfig | None = None) -> dict:
    s = _setup(student_name, teacher_name, vocab=vocab, batch=batch, seq_len=seq_len, optimizer=optimizer,
               dtype=dtype, transition=transition, kernels=kernels, kd_topk=kd_topk, teacher_config=teacher_config)
    kinds = [("standard", None, None, step_mod.abstract_of(s.windows)),
             ("kd", s.teacher, step_mod.abstract_of(s.t_params), step_mod.abstract_of(s.windows))]
    if kd_topk is not None:
        kinds.append(("cached", None, None, cached_batch_abstract(s.cfg, s.mesh)))
    compiled = _compile(s, kinds, loss_kernels=loss_kernels, gradients=gradients)
    names = [k[0] for k in kinds] + (["cached_bf16"] if kd_topk is not None else []) + \
        (["standard_grad", "kd_grad"] if gradients else [])
    with tempfile.TemporaryDirectory(prefix="salt-bench-cache-") as tmp:
        caches = (_one_step_caches(tmp, s.t_params, s.teacher, s.windows, kd_topk, vocab, kernels)
                  if kd_topk is not None else {})
        times, cpu_times, read_s = _time_interleaved(s, compiled, names, caches, iters=iters, warmup=warmup,
                                                     progress=progress)
    matmul_rate = measure_matmul_rate(matmul_n)

    student, teacher = s.student, s.teacher
    student_flops = model.train_step_flops(student, batch, seq_len)
    teacher_flops = model.forward_flops(teacher, batch, seq_len)
    t_std = statistics.median(times["standard"])
    t_kd = statistics.median(times["kd"])
    predicted = 1.0 + teacher_flops / student_flops
    measured = t_kd / t_std
    tokens = batch * seq_len
    result = {
        "student": student.to_dict(), "teacher": teacher.to_dict(), "kd_topk": kd_topk,
        "student_params": param_count(student), "teacher_params": param_count(teacher),
        "batch": batch, "seq_len": seq_len, "optimizer": optimizer, "dtype": dtype,
        "kernels": resolve_kernels(kernels),
        "loss_kernels": loss_kernels or resolve_kernels(kernels),
        "iters": iters, "device": str(jax.devices()[0].device_kind),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "standard_step_s": t_std, "kd_step_s": t_kd,
        "measured_ratio": measured, "predicted_ratio": predicted,
        "difference_pp": 100.0 * (measured - predicted),
        "paired_ratio": paired_ratio(times["kd"], times["standard"]),
        "times_s": times,
        "cpu_times_s": cpu_times,
        **robust_times(cpu_times),
        "standard_tokens_per_s": tokens / t_std, "kd_tokens_per_s": tokens / t_kd,
        "student_train_flops": student_flops, "teacher_forward_flops": teacher_flops,
        "standard_flops_per_s": student_flops / t_std,
        "kd_flops_per_s": (student_flops + teacher_flops) / t_kd,
        "matmul_flops_per_s": matmul_rate,
        "standard_fraction_of_matmul": student_flops / t_std / matmul_rate,
        "kd_fraction_of_matmul": (student_flops + teacher_flops) / t_kd / matmul_rate,
        "standard_temp_bytes": _memory(compiled["standard"]),
        "kd_temp_bytes": _memory(compiled["kd"]),
        "standard_compile_s": compiled["standard_compile_s"],
        "kd_compile_s": compiled["kd_compile_s"],
        "xla_standard_flops": _xla_flops(compiled["standard"]),
        "xla_kd_flops": _xla_flops(compiled["kd"]),
    }
    if gradients:
        g_std, g_kd = statistics.median(times["standard_grad"]), statistics.median(times["kd_grad"])
        result.update({"standard_grad_s": g_std, "kd_grad_s": g_kd, "grad_ratio": g_kd / g_std,
                       "paired_grad_ratio": paired_ratio(times["kd_grad"], times["standard_grad"]),
                       "grad_difference_pp": 100.0 * (g_kd / g_std - predicted)})
    if kd_topk is not None:
        result.update(_cached_result(times, read_s, compiled, iters=iters, vocab=vocab, batch=batch,
                                     seq_len=seq_len, t_std=t_std, t_kd=t_kd))
    return result


def _cached_result(times, read_s, compiled, *, iters, vocab, batch, seq_len, t_std, t_kd) -> dict:
    """The teacher-cache step's figures: its time against the standard and online-KD steps, the
    read time, the uncompressed layout beside it, and the cache's bytes per token."""
    t_cached = statistics.median(times["cached"])
    t_bf16 = statistics.median(times["cached_bf16"])
    return {
        "cached_step_s": t_cached, "cached_ratio": t_cached / t_std, "cached_vs_online": t_cached / t_kd,
        "cache_read_s": statistics.median(read_s["cached"][-iters:]),
        "cached_bf16_step_s": t_bf16, "cache_bf16_read_s": statistics.median(read_s["cached_bf16"][-iters:]),
        "cached_vs_bf16": t_cached / t_bf16,
        "paired_cached_vs_bf16": paired_ratio(times["cached"], times["cached_bf16"]),
        "cached_tokens_per_s": batch * seq_len / t_cached, "cached_temp_bytes": _memory(compiled["cached"]),
        "cached_compile_s": compiled["cached_compile_s"],
        "cache_bytes_per_token": {str(v): {str(k): bytes_per_token(k, v, batch=batch, seq_len=seq_len)
                                           for k in CACHE_KS} for v in sorted({vocab, PAPER_VOCAB})},
        "cache_bf16_bytes_per_token": {
            str(v): {str(k): bytes_per_token(k, v, values_dtype="bfloat16", batch=batch, seq_len=seq_len)
                     for k in CACHE_KS} for v in sorted({vocab, PAPER_VOCAB})}}


def robust_times(cpu_times: dict) -> dict:
    """The KD-step overhead robust to other processes: each step's *minimum* per-process CPU
    time over the interleaved repetitions, and their ratio.

    Per-process CPU time (``time.process_time``: every thread of this process) counts only the
    time the step's own work ran, not the time it waited while other processes held the cores;
    the minimum over repetitions drops what interference remains (cache and memory-bandwidth
    contention, a repetition that shared a core). It counts the work of all threads: on several
    cores it is the step's total work, not its elapsed time (which concurrency can hide), the
    quantity a serialised accelerator step pays."""
    t_std, t_kd = min(cpu_times["standard"]), min(cpu_times["kd"])
    out = {"standard_step_cpu_s": t_std, "kd_step_cpu_s": t_kd,
           "cpu_ratio": t_kd / t_std if t_std > 0 else float("nan")}
    if "cached" in cpu_times:
        out["cached_step_cpu_s"] = min(cpu_times["cached"])
        out["cached_cpu_ratio"] = out["cached_step_cpu_s"] / t_std if t_std > 0 else float("nan")
    return out


def paired_ratio(a_s, b_s) -> dict:
    """Mean and standard error of the per-iteration ratios ``a_i / b_i`` of two interleaved timings
    (iteration ``i`` times both back to back, so slow drifts of the machine cancel)."""
    ratios = [a / b for a, b in zip(a_s, b_s)]
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    return {"mean": statistics.fmean(ratios), "se": se, "n": len(ratios)}


CACHE_KS = (16, 64, 128)
PAPER_VOCAB = 256_000


def _one_step_caches(path, t_params, teacher, windows, k, vocab, kernels):
    """Real one-step teacher caches of the teacher on ``windows``, opened: ``cached`` in the
    default compact layout, ``cached_bf16`` uncompressed (bfloat16 logits)."""
    run = teacher_cache.make_topk_fn(teacher, vocab, k, resolve_kernels(kernels))
    top, ids, lse = jax.device_get(run(t_params, windows))
    identity = {"path": "random parameters (salt bench step)", "step": 0, "manifest_sha256": None}
    return {kind: teacher_cache.write_one_step(pathlib.Path(path) / kind, top, ids, lse, vocab=vocab,
                                               teacher=identity, values_dtype=values)
            for kind, values in (("cached", teacher_cache.DEFAULT_VALUES), ("cached_bf16", "bfloat16"))}


def _xla_flops(compiled):
    """XLA's own FLOP estimate of a compiled step (None when unavailable)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:  # noqa: BLE001 (cost analysis is optional, backend dependent)
        return None


def _mean_se(p: dict) -> str:
    return f"{p['mean']:.3f} ± {p['se']:.3f} s.e. (n={p['n']})"


def format_report(r: dict) -> str:
    mb = lambda b: "n/a" if b is None else f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
    lines = [
        f"student {r['student']['name']} ({r['student_params']:,} params), teacher "
        f"{r['teacher']['name']} ({r['teacher_params']:,}); batch {r['batch']} x seq {r['seq_len']}, "
        f"{r['optimizer']}, {r['dtype']}, {r['device']} (CPU cores: {r['cpu_cores']}), median of {r['iters']}",
        f"{'step':<10}{'time':>12}{'tokens/s':>12}{'GFLOP/s':>10}{'of matmul':>11}{'temp mem':>12}",
        f"{'standard':<10}{r['standard_step_s'] * 1e3:>10.1f}ms{r['standard_tokens_per_s']:>12,.0f}"
        f"{r['standard_flops_per_s'] / 1e9:>10.2f}{100 * r['standard_fraction_of_matmul']:>10.1f}%"
        f"{mb(r['standard_temp_bytes']):>12}",
        f"{'kd':<10}{r['kd_step_s'] * 1e3:>10.1f}ms{r['kd_tokens_per_s']:>12,.0f}"
        f"{r['kd_flops_per_s'] / 1e9:>10.2f}{100 * r['kd_fraction_of_matmul']:>10.1f}%"
        f"{mb(r['kd_temp_bytes']):>12}",
        f"KD/standard time ratio: measured {r['measured_ratio']:.3f}, FLOP-predicted "
        f"{r['predicted_ratio']:.3f} ({r['difference_pp']:+.1f} percentage points); paired per-iteration ratio "
        f"{_mean_se(r['paired_ratio'])}",
        f"robust to other processes (minimum per-process CPU time over the {r['iters']} repetitions): "
        f"standard {r['standard_step_cpu_s'] * 1e3:.1f} ms, KD {r['kd_step_cpu_s'] * 1e3:.1f} ms, "
        f"ratio {r['cpu_ratio']:.3f}",
        f"float32 matmul rate of this machine: {r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s",
    ]
    if r["cpu_cores"] > 1 and r["device"] == "cpu":
        lines.append(f"on {r['cpu_cores']} CPU cores XLA may run the teacher's forward alongside the student's work "
                     "(the KD step then costs less than its FLOPs); --cores 1 serialises the work as an accelerator "
                     "does (docs/reproduction.md)")
    if "grad_ratio" in r:
        lines.insert(5, f"gradient computations alone (forward + backward, no optimizer update): standard "
                        f"{r['standard_grad_s'] * 1e3:.1f} ms, KD {r['kd_grad_s'] * 1e3:.1f} ms, ratio "
                        f"{r['grad_ratio']:.3f} ({r['grad_difference_pp']:+.1f} percentage points; paired "
                        f"{_mean_se(r['paired_grad_ratio'])})")
    if r.get("kd_topk") is not None:
        lines[4:4] = [
            f"{'cached':<10}{r['cached_step_s'] * 1e3:>10.1f}ms{r['cached_tokens_per_s']:>12,.0f}"
            f"{'':>10}{'':>11}{mb(r['cached_temp_bytes']):>12}"]
        lines += [
            f"KD is top-{r['kd_topk']} KD (paper eq. 13-14); 'cached': KD from a teacher cache (no teacher "
            "forward; the timed call includes reading and decoding the step's files from disk)",
            f"time ratios: online-teacher KD/standard {r['measured_ratio']:.3f}, cached KD/standard "
            f"{r['cached_ratio']:.3f}, cached/online KD {r['cached_vs_online']:.3f}",
            f"of the cached step's time, reading + hashing + decoding + uploading the step's cache files: "
            f"{r['cache_read_s'] * 1e3:.1f} ms",
            f"the same step from an uncompressed cache (bfloat16 logits): {r['cached_bf16_step_s'] * 1e3:.1f} ms "
            f"(of which reading {r['cache_bf16_read_s'] * 1e3:.1f} ms); compact/uncompressed time "
            f"{r['cached_vs_bf16']:.3f}, paired {_mean_se(r['paired_cached_vs_bf16'])}",
        ]
        for layout, key in (("compact", "cache_bytes_per_token"), ("bfloat16 logits + ids + float32 lse",
                                                                   "cache_bf16_bytes_per_token")):
            for v, per_k in r[key].items():
                lines.append(f"teacher cache on disk ({layout}), V = {int(v):,}: "
                             + ", ".join(f"k={k} {b:.1f} B/token" for k, b in per_k.items()))
    base = r.get("full_logits")
    if base:
        lines += [
            f"full-logits loss (loss kernels {base['loss_kernels']}, the trainer's loss before the fused "
            f"kernels; same attention):",
            f"{'standard':<10}{base['standard_step_s'] * 1e3:>10.1f}ms{mb(base['standard_temp_bytes']):>12}"
            f"   fused/full-logits time {r['standard_step_s'] / base['standard_step_s']:.3f}",
            f"{'kd':<10}{base['kd_step_s'] * 1e3:>10.1f}ms{mb(base['kd_temp_bytes']):>12}"
            f"   fused/full-logits time {r['kd_step_s'] / base['kd_step_s']:.3f}",
            f"KD/standard time ratio with full logits: {base['measured_ratio']:.3f} "
            f"({base['difference_pp']:+.1f} pp vs the FLOP prediction)",
        ]
        if base.get("kd_topk") is not None:
            lines.append(f"{'cached':<10}{base['cached_step_s'] * 1e3:>10.1f}ms{mb(base['cached_temp_bytes']):>12}"
                         f"   fused/full-logits time {r['cached_step_s'] / base['cached_step_s']:.3f}")
    return "\n".join(lines)


@click.command("cli")
@click.option("--student", default="small-student", show_default=True, help="Student preset.")
@click.option("--teacher", default="small-teacher", show_default=True, help="Teacher preset.")
@click.option("--vocab", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Vocabulary size (replaces the presets').")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--optimizer", type=click.Choice(["adafactor", "adamw"]), default="adafactor", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--kernels", type=click.Choice(["auto", "pallas", "xla", "naive"]), default="auto",
              show_default=True, help="Attention / KD-loss implementation (as salt train).")
@click.option("--compare/--no-compare", default=True, show_default=True,
              help="Also time the steps with the full-logits loss (--kernels naive's loss).")
@click.option("--kd-topk", "kd_topk", type=click.IntRange(min=1), default=None,
              help="Top-K KD; also time the KD step from a teacher cache (no teacher forward) and "
                   "report the cache's bytes per token.")
@click.option("--gradients", is_flag=True,
              help="Also time the gradient computations alone (no optimizer update: the work the FLOP "
                   "prediction counts), interleaved with the steps.")
@click.option("--cores", type=click.IntRange(min=1), default=None,
              help="Run on the first N of the CPU cores this process may use (as taskset; default: all). "
                   "--cores 1 serialises the steps as an accelerator does: on more cores XLA runs the "
                   "teacher's forward concurrently with the student's work.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def cli(student, teacher, vocab, batch, seq_len, optimizer, dtype, iters, warmup, kernels, compare, kd_topk,
        gradients, cores, as_json):
    """KD-step vs standard-step time (vs the FLOP prediction), tokens/s, FLOP/s, memory; with
    --kd-topk also the KD step from a teacher cache."""
    if cores is not None:
        restrict_cores(cores)
    common = dict(vocab=vocab, batch=batch, seq_len=seq_len, optimizer=optimizer, dtype=dtype, iters=iters,
                  warmup=warmup, kernels=kernels, kd_topk=kd_topk, gradients=gradients)
    try:
        result = run_benchmark(student, teacher, **common)
        if compare:
            result["full_logits"] = run_benchmark(student, teacher, loss_kernels="naive", **common)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=2) if as_json else format_report(result))
