"""``salt plan``: will a run fit a TPU pod, and how fast can it go?  Answered on a CPU host.

The trainer's own KD and standard steps (:func:`salt.runtime.train.step.compiled_step`, built from a
:class:`~salt.runtime.train.config.TrainConfig` exactly as ``salt train`` builds them: float32
parameters with the FSDP / tensor-parallel shardings of :mod:`salt.runtime.model.sharding`, the
run's optimizer, compute dtype, kernels and rematerialisation) are compiled ahead of time for
every chip of a TPU topology (libtpu compile-only devices, :mod:`salt.kernels.tpu_aot`).
Per chip the plan reports:

* **memory** from the compiled program (``memory_analysis()``, per device of the SPMD program):
  arguments, temporaries, outputs, the bytes the outputs alias (donated parameters and optimizer
  state), and their total ``arguments + temporaries + outputs - aliased + code`` against the HBM
  the compiler lets a program use; fits or not (a compile the compiler refuses for lack of HBM
  does not fit);
* **the largest per-chip batch that fits**, searched by compiling: the compiled total is close to
  linear in the batch, so after two compiles the next guess is the line's crossing of the HBM
  capacity (at most 16x past the largest batch known to fit; once a batch is known not to fit,
  kept a quarter of the way inside the bracket, and bisection where the line points outside
  it), until the largest fitting and smallest failing batches are adjacent or the compile
  budget is spent (``exact`` says which);
* **analytic FLOPs** (:func:`salt.runtime.model.transformer.forward_flops`: the matmuls, full ``T x T``
  attention, the LM head; a training step is 3 forwards, a KD step adds one teacher forward;
  ``remat`` re-runs the layers' forward once more in the backward).  Not ``cost_analysis()``:
  it counts a ``lax.scan`` body once, not once per layer.  The loss kernels' recomputed logit
  tiles (a few per cent at vocabulary 256K) are not counted;
* **the roofline step time** ``max(executed FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth)``
  with the bytes the minimum a step moves (every argument read once, every output written once);
  collectives over the inter-chip interconnect are not modelled, so this is a floor;
* **the predicted KD overhead**: teacher forward FLOPs over the student's step FLOPs (model
  FLOPs and executed FLOPs with remat) and the roofline ratio, next to the paper's 12.0% measured
  and its 1/8 rule of thumb (a teacher half the student's size: 1/2 x 1/3 forward share ~ 1/8
  with overheads; docs/design.md §6);
* the compile time of each step.

Chip figures (:data:`CHIPS`) are the vendor's, per chip, from Google Cloud's TPU pages:

* v5e  — https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s;
* v5p  — https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e, 2765 GB/s
  (the page notes 96 GiB physical, 95 GiB allocatable by the user);
* v6e  — https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM, 1638 GB/s.

The capacity is taken as GiB (16, 95, 32 GiB: what the chips expose to JAX, as the v5p page
states), bandwidths and FLOP/s as decimal units.

Why one module of ~410 lines: the chip table, the per-chip memory, the batch search and the
report are one computation over the same compiled steps; its pieces are not used elsewhere.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp

from salt.kernels import tpu_aot
from salt.reference.config import ModelConfig, get_preset, param_count
from salt.runtime.model import sharding
from salt.runtime.model import transformer as model
from salt.runtime.train.config import TrainConfig, TrainError
from salt.runtime.train.step import compiled_step, opt_state_abstract

GiB = 2 ** 30
PAPER_KD_OVERHEAD = 0.120     # paper §5.2: measured cost of a KD step over a standard step
RULE_OF_THUMB_KD_OVERHEAD = 1 / 8


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kind: str
    peak_bf16_flops: float    # FLOP/s, dense bf16 (vendor)
    hbm_bytes: int            # vendor's capacity, read as GiB
    hbm_bytes_per_s: float    # vendor's bandwidth
    allocatable_bytes: int    # what libtpu's compiler lets a program use (its out-of-memory limit)
    source: str


# allocatable: the "available HBM" libtpu 0.0.42 names when a compile runs out of memory
# (15.75G, 95.74G, 31.25G: XLA's binary units); a step "fits" when its total is within it.
CHIPS = {c.device_kind: c for c in (
    Chip("v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9, int(15.75 * GiB),
         "https://cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, int(95.74 * GiB),
         "https://cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", "TPU v6 lite", 918e12, 32 * GiB, 1638e9, int(31.25 * GiB),
         "https://cloud.google.com/tpu/docs/v6e"),
)}


class PlanError(ValueError):
    """Bad input to the plan, with a message meant for the user."""


# ----------------------------------------------------------------------------- set-up
def topology_mesh(topology: str, mesh_spec: str):
    """The trainer's ``("data", "model")`` mesh over the compile-only chips of ``topology``."""
    if not tpu_aot.libtpu_available():
        raise PlanError("salt plan needs the 'libtpu' package for TPU ahead-of-time compilation "
                        "(pip install libtpu)")
    try:
        devices = tpu_aot.topology_devices(topology)
    except ValueError as e:
        raise PlanError(f"--topology {topology!r}: {e}") from None
    try:
        return sharding.make_mesh(mesh_spec, devices=devices)
    except ValueError as e:
        raise PlanError(f"--mesh {mesh_spec!r} on {topology} ({len(devices)} chips): {e}") from None


def model_config(preset: str, vocab: int | None, what: str) -> ModelConfig:
    try:
        config = get_preset(preset)
    except ValueError as e:
        raise PlanError(f"--{what}: {e}") from None
    return config if vocab is None else config.replace(vocab_size=int(vocab))


def train_config(student: ModelConfig, teacher: ModelConfig | None, *, batch: int, seq_len: int,
                 mesh_spec: str, optimizer: str, dtype: str, kernels: str, remat: bool,
                 grad_accum: int = 1, vocab_chunks: int | None = None):
    """The TrainConfig a ``salt train`` of this shape would run with (data/out are unused)."""
    extra = {}
    if grad_accum != 1:
        if "grad_accum" not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise PlanError("--grad-accum: this trainer has no gradient accumulation")
        extra["grad_accum"] = grad_accum
    cfg = TrainConfig(preset=student.name, data="-", out="-", teacher="-" if teacher else None,
                      kd_steps=1 if teacher else 0, steps=1, batch=batch, seq_len=seq_len,
                      optimizer=optimizer, dtype=dtype, kernels=kernels, remat=remat,
                      mesh=mesh_spec, vocab_chunks=vocab_chunks, **extra)
    try:
        cfg.validate()
    except TrainError as e:
        raise PlanError(str(e)) from None
    return cfg


def _abstract_params(config: ModelConfig, mesh):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        model.abstract_params(config), sharding.param_shardings(config, mesh))


def compile_step(student, teacher, cfg, mesh, batch: int) -> tuple:
    """(compiled step, compile seconds) of the trainer's step at global ``batch``."""
    params_abs = _abstract_params(student, mesh)
    opt_abs = opt_state_abstract(cfg.optimizer, params_abs, mesh)
    teacher_abs = None if teacher is None else _abstract_params(teacher, mesh)
    windows_abs = jax.ShapeDtypeStruct((batch, cfg.seq_len + 1), jnp.int32,
                                       sharding=sharding.batch_sharding(mesh))
    cfg = dataclasses.replace(cfg, batch=batch)
    t0 = time.perf_counter()
    compiled = compiled_step(student, teacher, cfg, mesh, params_abs, opt_abs, teacher_abs,
                             windows_abs)
    return compiled, time.perf_counter() - t0


def memory(compiled) -> dict:
    """Per-chip bytes of a compiled SPMD step; ``total`` is what must be resident at once
    (the donated inputs' bytes, ``aliased``, are counted once; the program's code included)."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
           "outputs": int(m.output_size_in_bytes), "aliased": int(m.alias_size_in_bytes),
           "code": int(m.generated_code_size_in_bytes)}
    out["total"] = (out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
                    + out["code"])
    return out


# ----------------------------------------------------------------------------- FLOPs, roofline
def step_flops(student: ModelConfig, teacher: ModelConfig | None, batch: int, seq_len: int,
               remat: bool) -> dict:
    """Analytic FLOPs of one step over the whole batch: ``model`` (3 student forwards + one
    teacher forward) and ``executed`` (with remat the backward runs the student's layers forward
    again, all but each layer's MLP output projection: no gradient needs its result, only its
    input, so it is dead code in the recomputation)."""
    s = student
    fwd = model.forward_flops(s, batch, seq_len)
    head = 2.0 * batch * seq_len * s.d_model * s.vocab_size
    mlp_out = 2.0 * batch * seq_len * s.d_model * s.d_ff * s.n_layers
    teacher_fwd = 0.0 if teacher is None else model.forward_flops(teacher, batch, seq_len)
    model_flops = 3.0 * fwd + teacher_fwd
    return {"model": model_flops, "executed": model_flops + ((fwd - head - mlp_out) if remat else 0.0),
            "teacher_forward": teacher_fwd}


def roofline(executed_flops_per_chip: float, bytes_per_chip: float, chip: Chip) -> dict:
    compute = executed_flops_per_chip / chip.peak_bf16_flops
    hbm = bytes_per_chip / chip.hbm_bytes_per_s
    return {"step_s": max(compute, hbm), "compute_s": compute, "hbm_s": hbm,
            "bound": "compute" if compute >= hbm else "memory"}


# ----------------------------------------------------------------------------- batch search
def search_max_batch(measure, known: dict, *, capacity: int, max_compiles: int) -> dict:
    """Largest per-chip batch ``b >= 1`` whose step fits in ``capacity`` bytes.

    ``measure(b)`` compiles at per-chip batch ``b`` and returns the total bytes, or None when
    the compiler itself ran out of memory; ``known`` maps batches already compiled to theirs.
    Returns the largest batch seen to fit (None if even 1 does not), the smallest seen not to fit
    (None if every one tried fits), ``exact`` when the two are adjacent, and every compile."""
    seen = dict(known)
    compiles, last_checked = 0, False

    def fits(b):
        return seen[b] is not None and seen[b] <= capacity

    def bounds():
        fit = [b for b in seen if fits(b)]
        nofit = [b for b in seen if not fits(b)]
        return (max(fit) if fit else 0), (min(nofit) if nofit else None)

    while True:
        lo, hi = bounds()
        if (hi is not None and hi - lo <= 1) or compiles >= max_compiles:
            break
        line = _linear_guess(seen, lo, hi, capacity)
        checked = False
        if hi is None:  # growing: trust the line at most 16x past the last fit
            guess = max(lo + 1, 2 * lo if line is None else min(line, 16 * lo))
        elif line is not None and line <= lo and not last_checked:
            guess, checked = lo + 1, True  # the line says lo is the answer: check lo + 1
        elif line is None or line <= lo or line >= hi:
            guess = (lo + hi) // 2  # the line is no help here: bisect
        else:  # the line, kept a quarter of the way inside the bracket
            margin = max(1, (hi - lo) // 4)
            guess = min(max(line, lo + margin), hi - margin)
        last_checked = checked
        seen[guess] = measure(guess)
        compiles += 1
    lo, hi = bounds()
    return {"fits": lo or None, "does_not_fit": hi, "exact": hi is not None and hi - lo == 1,
            "search_compiles": compiles,
            "compiled": [{"per_chip_batch": int(b), "total_bytes": seen[b], "fits": fits(b)}
                         for b in sorted(seen)]}


def _linear_guess(seen: dict, lo: int, hi: int | None, capacity: int):
    """Where the line through the two measured batches nearest the boundary crosses capacity."""
    measured = [b for b in seen if seen[b] is not None]
    edge = [lo] if hi is None else [lo, hi]
    near = sorted(measured, key=lambda b: (min(abs(b - e) for e in edge), b))[:2]
    if len(near) < 2 or seen[near[0]] == seen[near[1]]:
        return None
    (b1, b2), (m1, m2) = near, (seen[near[0]], seen[near[1]])
    slope = (m2 - m1) / (b2 - b1)
    if slope <= 0:
        return None
    return int(math.floor(b1 + (capacity - m1) / slope))


# ----------------------------------------------------------------------------- the plan
def _compile_and_measure(student, teacher, cfg, mesh, batch: int) -> dict:
    """Compile one step; an out-of-memory refusal by the compiler is a result (no memory)."""
    try:
        compiled, compile_s = compile_step(student, teacher, cfg, mesh, batch)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"memory": None, "compile_s": None, "error": str(e).splitlines()[0]}
    return {"memory": memory(compiled), "compile_s": compile_s, "error": None}


def plan(*, topology: str, student: str, teacher: str | None, batch: int, seq_len: int,
         mesh: str = "data=-1,model=1", optimizer: str = "adafactor", dtype: str = "bfloat16",
         kernels: str = "pallas", remat: bool = True, vocab: int | None = None,
         grad_accum: int = 1, vocab_chunks: int | None = None, search: bool = True,
         max_search_compiles: int = 4, progress=None) -> dict:
    """Compile the run's steps for ``topology`` and report memory, fit, FLOPs and roofline per
    chip (see the module docstring).  ``batch`` is the global batch; ``progress(text)`` is told
    what is being compiled."""
    say = progress or (lambda text: None)
    s_cfg = model_config(student, vocab, "student")
    t_cfg = None if teacher is None else model_config(teacher, vocab, "teacher")
    if t_cfg is not None and t_cfg.vocab_size != s_cfg.vocab_size:
        raise PlanError(f"--teacher {teacher} has vocab_size={t_cfg.vocab_size}, the student "
                        f"{s_cfg.vocab_size} (pass --vocab to give both one)")
    mesh_obj = topology_mesh(topology, mesh)
    chip_kind = mesh_obj.devices.flat[0].device_kind
    if chip_kind not in CHIPS:
        raise PlanError(f"--topology {topology!r}: no published figures for chip {chip_kind!r} "
                        f"(known: {', '.join(c.name for c in CHIPS.values())})")
    chip = CHIPS[chip_kind]
    data = mesh_obj.shape["data"]
    chips = int(mesh_obj.devices.size)
    cfg = train_config(s_cfg, t_cfg, batch=batch, seq_len=seq_len, mesh_spec=mesh,
                       optimizer=optimizer, dtype=dtype, kernels=kernels, remat=remat,
                       grad_accum=grad_accum, vocab_chunks=vocab_chunks)
    if batch % (data * grad_accum):
        raise PlanError(f"--batch {batch} must be a multiple of the mesh's data axis ({data})"
                        + (f" times --grad-accum ({grad_accum})" if grad_accum != 1 else ""))
    per_chip = batch // data
    capacity = chip.allocatable_bytes

    def compile_at(kind, t, b):
        say(f"compiling the {kind} step for {topology} at per-chip batch {b}")
        step = _compile_and_measure(s_cfg, t, cfg, mesh_obj, b * data)
        mem = step["memory"]
        say(f"  {kind} step, per-chip batch {b}: " + (
            f"{mem['total'] / GiB:.2f} GiB of {capacity / GiB:.2f} "
            f"({'fits' if mem['total'] <= capacity else 'does not fit'}), "
            f"compiled in {step['compile_s']:.1f} s" if mem else step["error"]))
        return step

    kinds = [("standard", None)] + ([("kd", t_cfg)] if t_cfg is not None else [])
    steps = {}
    for kind, t in kinds:  # both steps at the asked batch first, then the searches
        steps[kind] = _with_fit_and_roofline(compile_at(kind, t, per_chip), step_flops(s_cfg, t, batch, seq_len, remat),
                                             chip, chips, batch * seq_len)
    # with K microbatches the global batch must split into K: search in multiples of `unit`
    unit = grad_accum // math.gcd(grad_accum, data)
    for kind, t in kinds if search else ():
        def measure(m, t=t, kind=kind):
            mem_m = compile_at(kind, t, m * unit)["memory"]
            return None if mem_m is None else mem_m["total"]
        mem = steps[kind]["memory"]
        found = search_max_batch(measure, {per_chip // unit: None if mem is None else mem["total"]},
                                 capacity=capacity, max_compiles=max_search_compiles)
        for key in ("fits", "does_not_fit"):
            found[key] = None if found[key] is None else found[key] * unit
        for c in found["compiled"]:
            c["per_chip_batch"] *= unit
        found["unit"] = unit
        steps[kind]["max_per_chip_batch"] = found
    result = {
        "topology": topology, "chip": dataclasses.asdict(chip), "chips": chips,
        "mesh": dict(mesh_obj.shape), "student": s_cfg.to_dict(),
        "student_params": param_count(s_cfg),
        "teacher": None if t_cfg is None else t_cfg.to_dict(),
        "teacher_params": None if t_cfg is None else param_count(t_cfg),
        "batch": batch, "seq_len": seq_len, "per_chip_batch": per_chip, "grad_accum": grad_accum,
        "optimizer": optimizer, "dtype": dtype, "kernels": kernels, "remat": remat,
        "vocab_chunks": vocab_chunks, "steps": steps,
    }
    if "kd" in steps:
        result["kd_overhead"] = _kd_overhead(steps["standard"], steps["kd"])
    return result


def _with_fit_and_roofline(step: dict, flops: dict, chip: Chip, chips: int, tokens: int) -> dict:
    """A compiled step's fit in HBM, its FLOPs (whole step and per chip) and roofline time."""
    mem = step["memory"]
    capacity = chip.allocatable_bytes
    step["fits"] = mem is not None and mem["total"] <= capacity
    step["hbm_fraction"] = None if mem is None else mem["total"] / capacity
    step["flops"] = flops
    step["flops_per_chip"] = {k: v / chips for k, v in flops.items()}
    moved = 0 if mem is None else mem["arguments"] + mem["outputs"]
    step["roofline"] = roofline(step["flops_per_chip"]["executed"], moved, chip)
    step["tokens_per_s"] = tokens / step["roofline"]["step_s"]
    return step


def _kd_overhead(std: dict, kd: dict) -> dict:
    """The KD step against the standard one: FLOPs, roofline time and temporaries."""
    both = std["memory"] is not None and kd["memory"] is not None
    return {
        "paper_measured": PAPER_KD_OVERHEAD, "rule_of_thumb": RULE_OF_THUMB_KD_OVERHEAD,
        "model_flops": kd["flops"]["model"] / std["flops"]["model"] - 1.0,
        "executed_flops": kd["flops"]["executed"] / std["flops"]["executed"] - 1.0,
        "roofline": kd["roofline"]["step_s"] / std["roofline"]["step_s"] - 1.0,
        "temporaries_ratio": (kd["memory"]["temporaries"] / max(std["memory"]["temporaries"], 1)
                              if both else None),
    }


# ----------------------------------------------------------------------------- report
def format_plan(r: dict) -> str:
    gib = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    chip = r["chip"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"{r['topology']}: {r['chips']} x {chip['device_kind']} ({chip['name']}: "
        f"{chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {gib(chip['hbm_bytes'])} GiB HBM "
        f"({gib(chip['allocatable_bytes'])} allocatable), {chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s; "
        f"{chip['source']}), mesh {mesh}",
        f"student {r['student']['name']} ({r['student_params']:,} params)"
        + (f", teacher {r['teacher']['name']} ({r['teacher_params']:,})" if r["teacher"] else "")
        + f"; batch {r['batch']} x {r['seq_len']} ({r['per_chip_batch']} per chip"
        + (f", {r['grad_accum']} microbatches" if r["grad_accum"] != 1 else "")
        + (f", vocabulary-parallel loss in {r['vocab_chunks']} chunks" if r.get("vocab_chunks") else "")
        + f"), {r['optimizer']}, {r['dtype']}, kernels {r['kernels']}, remat {'on' if r['remat'] else 'off'}",
        "",
        f"{'per chip, GiB':<16}{'args':>8}{'temps':>8}{'outputs':>9}{'aliased':>9}{'total':>8}"
        f"{'of HBM':>8}  {'fits':<5}{'compile':>9}",
    ]
    for kind, s in r["steps"].items():
        m = s["memory"]
        if m is None:
            lines.append(f"{kind + ' step':<16}{'compiler out of memory: ' + s['error']}")
            continue
        lines.append(f"{kind + ' step':<16}{gib(m['arguments']):>8}{gib(m['temporaries']):>8}"
                     f"{gib(m['outputs']):>9}{gib(m['aliased']):>9}{gib(m['total']):>8}"
                     f"{100 * s['hbm_fraction']:>7.0f}%  {'yes' if s['fits'] else 'NO':<5}"
                     f"{s['compile_s']:>8.1f}s")
    lines += ["", f"{'per chip':<16}{'model TFLOP':>12}{'executed':>10}{'roofline':>10}"
                  f"{'bound':>8}{'tokens/s (pod)':>16}  largest per-chip batch that fits"]
    for kind, s in r["steps"].items():
        f, rl = s["flops_per_chip"], s["roofline"]
        lines.append(f"{kind + ' step':<16}{f['model'] / 1e12:>12.3f}{f['executed'] / 1e12:>10.3f}"
                     f"{rl['step_s'] * 1e3:>8.1f}ms{rl['bound']:>8}{s['tokens_per_s']:>16,.0f}  "
                     f"{_found(s.get('max_per_chip_batch'))}")
    if "kd_overhead" in r:
        o = r["kd_overhead"]
        ratio = "" if o["temporaries_ratio"] is None else \
            f"; KD/standard temporaries {o['temporaries_ratio']:.2f}x"
        lines += ["", f"KD step overhead: {100 * o['model_flops']:.1f}% (model FLOPs), "
                      f"{100 * o['executed_flops']:.1f}% (executed, remat), {100 * o['roofline']:.1f}% "
                      f"(roofline); paper {100 * o['paper_measured']:.1f}% measured, "
                      f"{100 * o['rule_of_thumb']:.1f}% rule of thumb{ratio}"]
    lines.append("roofline: max(executed FLOPs / peak, (arguments + outputs) / HBM bandwidth); "
                 "collectives not modelled")
    return "\n".join(lines)


def _found(search: dict | None) -> str:
    if search is None:
        return "not searched"
    if search["fits"] is None:
        return "none (batch 1 does not fit)" if search["exact"] or search["does_not_fit"] == 1 else \
            f"none found ({search['search_compiles']} compiles)"
    if search["exact"]:
        return f"{search['fits']} ({search['does_not_fit']} does not)"
    bound = search["does_not_fit"]
    return (f">= {search['fits']}" + (f", < {bound}" if bound else "")
            + f" (search budget of {search['search_compiles']} compiles spent)")
