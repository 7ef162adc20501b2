"""Golden values of the SALT reference: small float64 ``.npz`` files other parts test against.

``generate(directory)`` writes every file below (fixed seeds; each written atomically);
``check(directory)`` recomputes everything and reports drift per file and key. The CLI is
``salt golden generate|check [--dir tests/golden]``. Load with
``np.load(path, allow_pickle=False)``; every float array is float64, token arrays int32, masks
bool, and ``*_json`` keys are 0-d unicode strings (``json.loads(str(f["config_json"]))``;
configs load with ``ModelConfig.from_dict``). Parameter trees are stored flattened with a
prefix: ``param/embed``, ``param/layers/wq``, ... (``flatten_params`` names);
:func:`load_params` rebuilds the nested tree.

Conventions: training windows are ``[B, T+1]`` (inputs ``w[:, :-1]``, labels ``w[:, 1:]``);
``mask`` ``[B, T]`` marks valid TARGET positions; scalar losses are means
over valid positions (``mean_over_mask``); per-position values are 0 where masked.

``losses.npz`` — docs/design.md §2 losses, three cases ``<c>`` in ``v37`` (V = 37, B=3, T=5,
logits ~ 3 N(0,1)), ``v1000`` (V = 1000, B=2, T=3) and ``big`` (V = 37, B=2, T=4, logits of
magnitude 1e4, one position with all student logits equal to 1e4):

* ``<c>/student_logits``, ``<c>/teacher_logits`` ``[B,T,V]``, ``<c>/labels`` int32 ``[B,T]``
  (in range everywhere), ``<c>/mask`` bool ``[B,T]`` (some positions False);
* ``<c>/ce_loss`` ``[B,T]``, ``<c>/ce_grad`` ``[B,T,V]`` (per position, ``ce_loss(_grad)``);
* KD grid of n (omega, rho) pairs: ``<c>/omegas``, ``<c>/rhos`` ``[n]``; ``<c>/kd_loss``
  ``[n,B,T]`` (``kd_loss``), ``<c>/kd_grad`` ``[n,B,T,V]`` (``kd_loss_grad``, per position, NOT
  divided by the count), ``<c>/kl`` ``[n,B,T]`` (``kl_monitor`` at that rho),
  ``<c>/kd_mean_loss`` ``[n]`` (mean over the mask). ``v37`` and ``big``: the full grid
  omega in {0, 0.667, 1} x rho in {0.25, 1, 4} (omega-major); ``v1000``: 5 pairs;
* top-k KD (eq. 13-14): ``<c>/topk_ks``, ``<c>/topk_omegas``, ``<c>/topk_rhos`` ``[m]``,
  ``<c>/topk_loss`` ``[m,B,T]``, ``<c>/topk_grad`` ``[m,B,T,V]`` (``topk_kd_loss(_grad)``).

``score.npz`` — eq. 11 selection score (docs/design.md §4), N=7 sequences, T=10, V=50, logits on a
0.5 grid (ties), sequence 5 a copy of sequence 1 (tied scores), sequence 6 fully masked:

* ``teacher_logits`` ``[N,T,V]`` (``teacher_logits[b, i]`` predicts ``targets[b, i]``),
  ``targets`` int32 ``[N,T]``, ``mask`` bool ``[N,T]``, ``ks`` int64 ``[3]`` = 1, 3, 10;
* ``token_costs`` ``[N,T]`` (-log softmax at the target, 0 where masked),
  ``in_topk`` bool ``[3,N,T]``;
* ``scores_zero``, ``scores_exclude`` ``[3,N]`` (``selection_score`` for each k; ``-inf`` for a
  sequence with no value to take the median of);
* ``top_m`` int64 ``[3,4]``: ``top_m_indices(scores_zero[i], 4)`` (ties by lower index).

``schedule.npz`` — ``steps`` int64 ``[24]`` = 1..24 (1-based);
``omega/<case>`` ``[24]`` = ``omega_at(step, **args)`` with the arguments in
``omega_cases_json`` (cases ``step``, ``linear``, ``linear-ratio``, ``linear-ratio-w1``,
``baseline``, ``rkd``); ``lr/<case>`` ``[24]`` = ``lr_at(step, **args)`` with ``lr_cases_json``;
``paper_steps`` int64 and ``lr/paper`` = the paper's schedule (1e-3, 4000 warm-up, 208K steps,
1e-4) at a few steps.

``model_<name>.npz`` — reference model forward/backward for ``mqa_causal`` (tiny-student, causal),
``gqa_prefix`` (V=37, 2 layers, 4 heads / 2 kv heads, prefix-LM) and ``mha_prefix``
(tiny-teacher, prefix-LM), B=3, T=8:

* ``config_json``, ``param/<name>`` (``init_params(config, seed, float64)``), ``window``
  int32 ``[B,T+1]``, ``tokens`` = ``window[:, :-1]`` (the forward input) and ``labels`` =
  ``window[:, 1:]`` int32 ``[B,T]``, ``prefix_len`` int32 ``[B]``, ``mask`` bool ``[B,T]``;
* ``logits`` ``[B,T,V]`` and ``hidden`` ``[B,T,D]`` (final normed hidden) of ``tokens``;
* ``dlogits`` ``[B,T,V]`` (fixed random) and ``dlogits_grads/<name>`` = ``backward`` of it;
* ``ce/loss`` (scalar, mean CE over the mask), ``ce/grads/<name>``;
* ``kd/teacher_logits`` ``[B,T,V]``, ``kd/omega`` = 0.667, ``kd/rho`` = 0.25, ``kd/loss``,
  ``kd/ce``, ``kd/kd``, ``kd/kl`` (scalar means over the mask), ``kd/grads/<name>``.

``train.npz`` — reference training steps (``salt.reference.trainer.train``, float64), tiny
presets with V = 64, B = 2, T = 8:

* ``student_config_json``, ``teacher_config_json``, ``student_init/<name>`` (=
  ``init_params(student, 0, float64)``), ``teacher/<name>`` (= ``init_params(teacher, 1,
  float64)``), ``tokens`` int32 ``[8, B, T+1]`` (batch of step ``j`` is ``tokens[j-1]``);
* two runs ``<r>`` in ``adamw`` (8 steps, AdamW defaults b1=0.9 b2=0.95 eps=1e-8 wd=1e-4,
  clip 1.0, ``lr_schedule(1e-2, 2, 8, 1e-3)``, step transition, n_kd=4, omega=0.667,
  rho=0.25) and ``sgd`` (4 steps, lr 0.5, no clipping, linear transition n_kd1=1, n_kd=3):
  ``<r>/hparams_json``, per-step ``[steps]`` arrays ``<r>/step``, ``<r>/omega``, ``<r>/lr``,
  ``<r>/loss``, ``<r>/ce``, ``<r>/kd``, ``<r>/kl`` (NaN where no teacher pass ran),
  ``<r>/grad_norm`` (before clipping), ``<r>/accuracy``; ``<r>/final/<name>`` final params.

Determinism and drift: every input comes from ``numpy.random.default_rng`` with a fixed seed,
and every value is recomputed by deterministic code (the Numba score runs one sequential loop
per token, so its bits do not depend on the thread count). ``check`` still compares with a
tolerance rather than bitwise, because BLAS builds may sum in different orders: for float arrays
``max_rel = max|new - stored| / max|stored|`` (norm-wise, over finite entries; non-finite entries
must match exactly) must be <= 1e-12, and <= 1e-9 for ``train.npz`` (a few optimizer steps
amplify last-bit differences). Integer, bool and string arrays must be equal.

Why one module of ~460 lines: each golden file's builder sits beside the others so that `salt
golden check` regenerates exactly what is committed; the builders share the case helpers and
nothing else uses them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import zipfile

import numpy as np
from tqdm import tqdm

from salt.core import outputs
from salt.reference import losses, schedule, score
from salt.reference.config import ModelConfig, flatten_params, get_preset, unflatten_params
from salt.reference.model import backward, forward, init_params, loss_and_grad
from salt.reference.optim import SGD, AdamW
from salt.reference.trainer import lr_schedule, train

DEFAULT_TOL = 1e-12
TRAIN_TOL = 1e-9
OMEGAS = (0.0, 0.667, 1.0)
RHOS = (0.25, 1.0, 4.0)


def _json(obj) -> np.ndarray:
    return np.array(json.dumps(obj, sort_keys=True))


def _put_tree(out: dict, prefix: str, tree: dict) -> None:
    for name, value in flatten_params(tree).items():
        out[f"{prefix}/{name}"] = np.asarray(value, dtype=np.float64)


# ----------------------------------------------------------------------------- losses

def _loss_case(rng, vocab, batch, seq, scale, grid, topk):
    student = scale * rng.standard_normal((batch, seq, vocab))
    teacher = scale * rng.standard_normal((batch, seq, vocab))
    labels = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    mask = rng.random((batch, seq)) > 0.25
    mask[0, 0], mask[-1, -1] = True, False  # at least one valid and one masked position
    return student, teacher, labels, mask, grid, topk


def _build_losses() -> dict:
    rng = np.random.default_rng(20240101)
    full_grid = [(w, r) for w in OMEGAS for r in RHOS]
    cases = {
        "v37": _loss_case(rng, 37, 3, 5, 3.0, full_grid,
                          [(1, 0.667, 0.25), (5, 0.667, 0.25), (5, 1.0, 4.0), (37, 1.0, 1.0)]),
        "v1000": _loss_case(rng, 1000, 2, 3, 5.0,
                            [(0.0, 1.0), (0.667, 0.25), (0.667, 4.0), (1.0, 0.25), (1.0, 1.0)],
                            [(10, 0.667, 0.25), (1000, 0.667, 0.25), (1, 1.0, 1.0)]),
        "big": _loss_case(rng, 37, 2, 4, 1e4, full_grid, [(5, 0.667, 0.25), (1, 1.0, 4.0)]),
    }
    cases["big"][0][0, 1, :] = 1e4  # all student logits equal: P uniform
    out = {}
    for c, (s, t, y, mask, grid, topk) in cases.items():
        out.update({f"{c}/student_logits": s, f"{c}/teacher_logits": t, f"{c}/labels": y,
                    f"{c}/mask": mask,
                    f"{c}/ce_loss": losses.ce_loss(s, y, mask),
                    f"{c}/ce_grad": losses.ce_loss_grad(s, y, mask)})
        out[f"{c}/omegas"] = np.array([w for w, _ in grid])
        out[f"{c}/rhos"] = np.array([r for _, r in grid])
        kd = np.stack([losses.kd_loss(s, t, y, w, r, mask) for w, r in grid])
        out[f"{c}/kd_loss"] = kd
        out[f"{c}/kd_grad"] = np.stack([losses.kd_loss_grad(s, t, y, w, r, mask) for w, r in grid])
        out[f"{c}/kl"] = np.stack([losses.kl_monitor(s, t, r, mask) for _, r in grid])
        out[f"{c}/kd_mean_loss"] = np.array([losses.mean_over_mask(v, mask) for v in kd])
        out[f"{c}/topk_ks"] = np.array([k for k, _, _ in topk], dtype=np.int64)
        out[f"{c}/topk_omegas"] = np.array([w for _, w, _ in topk])
        out[f"{c}/topk_rhos"] = np.array([r for _, _, r in topk])
        out[f"{c}/topk_loss"] = np.stack([losses.topk_kd_loss(s, t, y, w, r, k, mask)
                                          for k, w, r in topk])
        out[f"{c}/topk_grad"] = np.stack([losses.topk_kd_loss_grad(s, t, y, w, r, k, mask)
                                          for k, w, r in topk])
    return out


# ----------------------------------------------------------------------------- score

def _build_score() -> dict:
    rng = np.random.default_rng(20240102)
    n, seq, vocab = 7, 10, 50
    logits = np.round(2.0 * rng.standard_normal((n, seq, vocab)) * 2.0) / 2.0  # 0.5 grid: ties
    # targets at assorted ranks of the teacher's order, so that every k and the ties matter
    rank = rng.choice([0, 0, 1, 2, 3, 5, 9, 10, 20, 40], size=(n, seq))
    order = np.argsort(-logits, axis=-1, kind="stable")
    targets = np.take_along_axis(order, rank[..., None], axis=-1)[..., 0].astype(np.int32)
    mask = np.ones((n, seq), dtype=bool)
    mask[2, 7:] = False   # padded tail (odd count of values)
    mask[3, 0] = False
    mask[6, :] = False    # nothing to score: -inf
    logits[5], targets[5], mask[5] = logits[1], targets[1], mask[1]  # tie with sequence 1
    ks = np.array([1, 3, 10], dtype=np.int64)
    costs, _ = score.token_costs(logits, targets, 1, mask)
    out = {"teacher_logits": logits, "targets": targets, "mask": mask, "ks": ks,
           "token_costs": costs}
    out["in_topk"] = np.stack([score.token_costs(logits, targets, int(k), mask)[1] for k in ks])
    out["scores_zero"] = np.stack([score.selection_score(logits, targets, int(k), "zero", mask)
                                   for k in ks])
    out["scores_exclude"] = np.stack([
        score.selection_score(logits, targets, int(k), "exclude", mask) for k in ks])
    out["top_m"] = np.stack([score.top_m_indices(s, 4) for s in out["scores_zero"]])
    return out


# ----------------------------------------------------------------------------- schedule

OMEGA_CASES = {
    "step": dict(omega=0.667, n_kd=10, transition="step"),
    "linear": dict(omega=0.667, n_kd=10, transition="linear", n_kd1=4),
    "linear-ratio": dict(omega=0.667, n_kd=10, transition="linear-ratio", n_kd1=4),
    "linear-ratio-w1": dict(omega=1.0, n_kd=10, transition="linear-ratio", n_kd1=4),
    "baseline": dict(omega=0.667, n_kd=0, transition="step"),
    "rkd": dict(omega=0.667, n_kd=24, transition="step"),
}
LR_CASES = {
    "warmup-cosine": dict(peak_lr=1e-3, warmup_steps=4, total_steps=20, final_lr=1e-4),
    "no-warmup": dict(peak_lr=1e-3, warmup_steps=0, total_steps=20, final_lr=0.0),
}
PAPER_LR = dict(peak_lr=1e-3, warmup_steps=4000, total_steps=208000, final_lr=1e-4)


def _build_schedule() -> dict:
    steps = np.arange(1, 25, dtype=np.int64)
    out = {"steps": steps, "omega_cases_json": _json(OMEGA_CASES), "lr_cases_json": _json(LR_CASES),
           "paper_lr_json": _json(PAPER_LR)}
    for name, args in OMEGA_CASES.items():
        out[f"omega/{name}"] = np.array([schedule.omega_at(int(j), **args) for j in steps])
    for name, args in LR_CASES.items():
        out[f"lr/{name}"] = np.array([schedule.lr_at(int(j), **args) for j in steps])
    paper_steps = np.array([1, 2000, 4000, 4001, 36000, 100000, 207999, 208000, 210000], np.int64)
    out["paper_steps"] = paper_steps
    out["lr/paper"] = np.array([schedule.lr_at(int(j), **PAPER_LR) for j in paper_steps])
    return out


# ----------------------------------------------------------------------------- model

MODEL_CASES = {
    "mqa_causal": (get_preset("tiny-student"), 101, False),
    "gqa_prefix": (get_preset("tiny-teacher").replace(name="tiny-gqa", vocab_size=37, n_layers=2,
                                                      n_heads=4, n_kv_heads=2), 102, True),
    "mha_prefix": (get_preset("tiny-teacher"), 103, True),
}


def _build_model(name: str) -> dict:
    config, seed, prefix = MODEL_CASES[name]
    rng = np.random.default_rng(seed)
    B, T, V = 3, 8, config.vocab_size
    params = init_params(config, seed, np.float64)
    tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    prefix_len = (np.array([0, 3, T]) if prefix else np.zeros(B, np.int64)).astype(np.int32)
    mask = rng.random((B, T)) > 0.2
    mask[0, 0] = True
    if prefix:  # UL2-style: no loss on the prefix's own positions
        mask &= np.arange(T)[None, :] >= prefix_len[:, None] - 1
        mask[2, -1] = True
    inputs = tokens[:, :-1]
    out = {"config_json": _json(config.to_dict()), "window": tokens, "tokens": inputs,
           "labels": tokens[:, 1:], "prefix_len": prefix_len, "mask": mask}
    _put_tree(out, "param", params)
    logits, cache = forward(params, inputs, config, prefix_len, return_cache=True)
    out["logits"], out["hidden"] = logits, cache["hidden_BxTxD"]
    dlogits = rng.standard_normal((B, T, V))
    out["dlogits"] = dlogits
    _put_tree(out, "dlogits_grads", backward(params, cache, dlogits, config))
    loss, grads, _ = loss_and_grad(params, tokens, config, mask=mask, prefix_len=prefix_len)
    out["ce/loss"] = np.float64(loss)
    _put_tree(out, "ce/grads", grads)
    teacher_logits = 2.0 * rng.standard_normal((B, T, V))
    omega, rho = 0.667, 0.25
    loss, grads, m = loss_and_grad(params, tokens, config, teacher_logits, omega, rho, mask,
                                   prefix_len)
    out.update({"kd/teacher_logits": teacher_logits, "kd/omega": np.float64(omega),
                "kd/rho": np.float64(rho), "kd/loss": np.float64(loss),
                "kd/ce": np.float64(m["ce"]), "kd/kd": np.float64(m["kd"]),
                "kd/kl": np.float64(m["kl"])})
    _put_tree(out, "kd/grads", grads)
    return out


# ----------------------------------------------------------------------------- training

TRAIN_RUNS = {
    "adamw": dict(steps=8, optimizer="adamw", lr=dict(peak_lr=1e-2, warmup_steps=2, total_steps=8,
                                                      final_lr=1e-3),
                  clip_norm=1.0, omega=0.667, rho=0.25, n_kd=4, transition="step", n_kd1=None),
    "sgd": dict(steps=4, optimizer="sgd", lr=0.5, clip_norm=None, omega=0.667, rho=0.25, n_kd=3,
                transition="linear", n_kd1=1),
}


def _build_train() -> dict:
    student, teacher = get_preset("tiny-student"), get_preset("tiny-teacher")
    rng = np.random.default_rng(20240105)
    B, T, n_steps = 2, 8, 8
    base = rng.integers(0, student.vocab_size, 7)
    stream = np.tile(base, (B * (T + 1) * n_steps) // 7 + 1)[: B * (T + 1) * n_steps]
    noise = rng.random(stream.size) < 0.1
    stream[noise] = rng.integers(0, student.vocab_size, int(noise.sum()))
    tokens = stream.reshape(n_steps, B, T + 1).astype(np.int32)
    s_params = init_params(student, 0, np.float64)
    t_params = init_params(teacher, 1, np.float64)
    out = {"student_config_json": _json(student.to_dict()),
           "teacher_config_json": _json(teacher.to_dict()), "tokens": tokens}
    _put_tree(out, "student_init", s_params)
    _put_tree(out, "teacher", t_params)
    for run, hp in TRAIN_RUNS.items():
        if hp["optimizer"] == "adamw":
            opt = AdamW()
            hp_json = dict(hp, adamw=dataclasses.asdict(opt))
        else:
            opt = SGD()
            hp_json = dict(hp)
        lr = lr_schedule(**hp["lr"]) if isinstance(hp["lr"], dict) else hp["lr"]
        result = train(student, lambda step0: tokens[step0], hp["steps"], optimizer=opt, lr=lr,
                       teacher=(teacher, t_params), omega=hp["omega"], rho=hp["rho"],
                       n_kd=hp["n_kd"], transition=hp["transition"], n_kd1=hp["n_kd1"],
                       params=s_params, dtype=np.float64, clip_norm=hp["clip_norm"])
        out[f"{run}/hparams_json"] = _json(hp_json)
        for key in ("step", "omega", "lr", "loss", "ce", "kd", "kl", "grad_norm", "accuracy"):
            dtype = np.int64 if key == "step" else np.float64
            out[f"{run}/{key}"] = np.array([h[key] for h in result.history], dtype=dtype)
        _put_tree(out, f"{run}/final", result.params)
    return out


# ----------------------------------------------------------------------------- files

BUILDERS = {
    "losses.npz": _build_losses,
    "score.npz": _build_score,
    "schedule.npz": _build_schedule,
    **{f"model_{name}.npz": (lambda name=name: _build_model(name)) for name in MODEL_CASES},
    "train.npz": _build_train,
}
TOLERANCES = {"train.npz": TRAIN_TOL}


def load_params(npz, prefix: str) -> dict:
    """The nested parameter tree stored under ``prefix/`` (e.g. ``"param"``) of a loaded npz."""
    start = prefix.rstrip("/") + "/"
    flat = {k[len(start):]: np.asarray(npz[k]) for k in npz.keys() if k.startswith(start)}
    if not flat:
        raise ValueError(f"no parameters under {start!r} (keys: {sorted(npz.keys())[:8]} ...)")
    return unflatten_params(flat)


def golden_files() -> list[str]:
    return list(BUILDERS)


def build(name: str) -> dict:
    """The arrays of golden file ``name`` (e.g. ``"losses.npz"``), recomputed in memory."""
    if name not in BUILDERS:
        raise ValueError(f"unknown golden file {name!r}; choose from {', '.join(BUILDERS)}")
    return BUILDERS[name]()


def _select(names):
    if names is None:
        return list(BUILDERS)
    for name in names:
        if name not in BUILDERS:
            raise ValueError(f"unknown golden file {name!r}; choose from {', '.join(BUILDERS)}")
    return list(names)


def write_npz_atomic(path: pathlib.Path, arrays: dict) -> None:
    """``np.savez_compressed`` to a temporary file in the same folder, then rename over ``path``."""
    outputs.save_npz(path, compressed=True, **arrays)


def generate(directory, names=None, progress: bool = True) -> list[pathlib.Path]:
    """Recompute and write the golden files into ``directory`` (created if missing)."""
    directory = pathlib.Path(directory)
    names = _select(names)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in tqdm(names, desc="golden generate", file=sys.stderr, disable=not progress):
        write_npz_atomic(directory / name, build(name))
        written.append(directory / name)
    return written


@dataclasses.dataclass
class Drift:
    """One compared key. ``ok`` False means drift; ``note`` says why (shape, missing, ...)."""
    file: str
    key: str
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


def compare_arrays(new, stored, tol: float) -> tuple[float, float, bool, str]:
    """(max_abs, max_rel, ok, note) of a recomputed array against the stored one."""
    new, stored = np.asarray(new), np.asarray(stored)
    if new.shape != stored.shape:
        return math.inf, math.inf, False, f"shape {stored.shape} -> {new.shape}"
    if new.dtype.kind != stored.dtype.kind:
        return math.inf, math.inf, False, f"dtype {stored.dtype} -> {new.dtype}"
    if stored.dtype.kind != "f":
        equal = bool(np.array_equal(new, stored))
        return (0.0, 0.0, True, "") if equal else (math.inf, math.inf, False, "values differ")
    finite = np.isfinite(stored)
    if not np.array_equal(finite, np.isfinite(new)) or not np.array_equal(
            new[~finite], stored[~finite], equal_nan=True):
        return math.inf, math.inf, False, "non-finite entries differ"
    if not finite.any():
        return 0.0, 0.0, True, ""
    diff = np.abs(new[finite] - stored[finite])
    max_abs = float(diff.max())
    scale = float(np.abs(stored[finite]).max())
    max_rel = max_abs / scale if scale > 0 else max_abs
    return max_abs, max_rel, max_rel <= tol, ""


def check(directory, names=None, progress: bool = True) -> list[Drift]:
    """Recompute every golden file and compare with the stored one, key by key."""
    directory = pathlib.Path(directory)
    rows = []
    for name in tqdm(_select(names), desc="golden check", file=sys.stderr, disable=not progress):
        path = directory / name
        if not path.is_file():
            rows.append(Drift(name, "*", math.inf, math.inf, False, f"missing file {path}"))
            continue
        try:
            stored = _read_npz(path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            rows.append(Drift(name, "*", math.inf, math.inf, False, f"unreadable file {path}: {e}"))
            continue
        tol = TOLERANCES.get(name, DEFAULT_TOL)
        new = build(name)
        for key in sorted(set(new) | set(stored)):
            if key not in stored:
                rows.append(Drift(name, key, math.inf, math.inf, False, "not in the stored file"))
            elif key not in new:
                rows.append(Drift(name, key, math.inf, math.inf, False, "no longer generated"))
            else:
                rows.append(Drift(name, key, *compare_arrays(new[key], stored[key], tol)))
    return rows


def _read_npz(path: pathlib.Path) -> dict:
    """Every array of a (small) golden file, read without pickle."""
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ValueError("not an .npz archive")
    with loaded:
        return {key: loaded[key] for key in loaded.files}


def find_golden_dir(start=None) -> pathlib.Path:
    """``tests/golden`` in the current directory or one of its parents, else in the repository
    that holds this package (an editable install)."""
    start = pathlib.Path(start or os.getcwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "tests" / "golden").is_dir():
            return folder / "tests" / "golden"
    repo = pathlib.Path(__file__).resolve().parent.parent
    if (repo / "tests").is_dir():
        return repo / "tests" / "golden"
    raise ValueError(f"no tests/golden folder found from {start} or {repo}; pass --dir")


__all__ = ["BUILDERS", "Drift", "build", "check", "compare_arrays", "find_golden_dir", "generate",
           "golden_files", "load_params", "write_npz_atomic", "ModelConfig"]
