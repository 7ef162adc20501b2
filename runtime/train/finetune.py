"""Supervised fine-tuning of a salt checkpoint (paper Table 3): ``salt finetune``.

Data: a JSONL file, one ``{"prompt": str, "completion": str}`` object per line (blank lines
are skipped; anything else that is not such an object is an error naming its line).  An
example is the token sequence ``EOS prompt completion EOS`` (the model saw documents after an
EOS in pre-training; the final EOS teaches it to stop); the loss is the mean next-token
cross-entropy over the *completion* tokens and that final EOS only, across the batch (a masked
mean: prompt and padding positions have weight 0).

Training: the paper's recipe as defaults (Adafactor, linear warm-up over 200 steps to a peak
of 1e-4, cosine decay, here to 1e-5), global-norm clipping 1.0, batches of ``batch``
examples padded to ``seq_len`` (default: the base run's window length), so one compiled step
serves the run.  The examples of step ``j`` follow from ``(seed, j)`` alone (a permutation per
epoch), so ``--resume`` continues bit-identically; checkpoints as in ``salt train``
(``OUT/checkpoints/<step>/``, every ``checkpoint_every`` steps, at the end and on SIGTERM),
with ``meta.run_config`` naming the token store and ``seq_len`` so that ``salt eval``, the
harness adapter and a further ``salt finetune`` can load the result.

Evaluation after training: greedy decoding (``salt.runtime.model.generate``) of the held-out split
(``eval_data``, or a seeded ``eval_fraction`` of the examples, never trained on) with
exact match (stripped strings equal) and ROUGE-1/2/L F1 (``rouge-score``), written to
``OUT/eval.json`` and the predictions to ``OUT/predictions.jsonl``.

Why one module of ~410 lines: reading the examples, the loss on completions, the loop and the
greedy evaluation are one recipe (paper Table 3) that changes as a whole.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from salt.core import outputs
from salt.core.inputs import file_problem
from salt.core.lock import DirLock, LockError
from salt.runtime.model import checkpoint, losses, tokens
from salt.runtime.train import metrics_log, optim
from salt.runtime.train.config import DTYPES, NonFiniteLoss, TrainError, check_fields, resolve_kernels, setting
from salt.runtime.model.generate import LoadedModel, greedy_generate
from salt.runtime.train.metrics_log import MetricsSink
from salt.runtime.train.run_dir import config_changes
from salt.runtime.train.stop import StopFlag

HYPER_FIELDS = ("lr", "final_lr", "warmup", "steps", "clip", "weight_decay")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run; ``salt finetune``'s options are generated from the fields' metadata."""

    run: str = setting(dataclasses.MISSING, "model", "Run directory or checkpoint to start from.", path=True)
    data: str = setting(dataclasses.MISSING, "data", 'JSONL file, one {"prompt": ..., "completion": ...} per line.',
                        path=True)
    out: str = setting(dataclasses.MISSING, "run", "Output run directory (checkpoints, metrics, eval).", path=True)
    step: int | None = setting(None, "model", "Checkpoint step of --run (default: latest).")
    store: str | None = setting(None, "data", "Token store whose tokenizer to use (default: the one --run was "
                                "trained on).", path=True)
    eval_data: str | None = setting(None, "data", "Held-out JSONL to evaluate on (default: --eval-fraction of "
                                    "--data, never trained on).", path=True)
    eval_fraction: float = setting(0.1, "data", "Share of --data held out for evaluation when --eval-data is not "
                                   "given.", min=0)
    steps: int = setting(1000, "optimizer", "Optimizer steps.", min=1)
    batch: int = setting(8, "data", "Examples per step.", min=1)
    seq_len: int | None = setting(None, "data", "Tokens per example, padded (default: the base run's seq_len).",
                                  min=2)
    optimizer: str = setting("adafactor", "optimizer", "The optimizer.", choices=optim.OPTIMIZERS)
    lr: float = setting(1e-4, "optimizer", "Peak learning rate.", min=0)
    final_lr: float = setting(1e-5, "optimizer", "Learning rate at the last step (cosine).", min=0)
    warmup: int = setting(200, "optimizer", "Linear warm-up steps.", min=0)
    clip: float = setting(1.0, "optimizer", "Global-norm gradient clipping (0: off).", min=0)
    weight_decay: float = setting(0.0, "optimizer", "Decoupled weight decay.", min=0)
    seed: int = setting(0, "data", "Seed of the example order and the held-out split.", min=0, max=2**63 - 1)
    dtype: str = setting("float32", "model", "Compute dtype.", choices=DTYPES)
    kernels: str = setting("auto", "model", "Attention implementation.", choices=("auto", "xla", "naive"))
    checkpoint_every: int = setting(0, "run", "Save every N steps (always at the end and on SIGTERM).", min=0)
    max_new_tokens: int | None = setting(None, "run", "Greedy decoding budget on the held-out split (default: "
                                         "longest completion + 1).", min=1)
    eval_batch: int = setting(8, "run", "Prompts per decoding batch.", min=1)
    resume: bool = setting(False, "run", "Continue the run in --out from its latest checkpoint.")
    force: bool = setting(False, "run", "Resume even if the configuration changed.")

    RESUMABLE_CHANGES = ("resume", "force", "checkpoint_every", "out", "eval_batch",
                         "max_new_tokens")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def bad(field, why):
            raise TrainError(f"{field}={getattr(self, field)!r}: {why}")
        check_fields(self)
        if self.warmup > self.steps:
            bad("warmup", f"must be an integer in [0, steps={self.steps}] (the paper's recipe "
                          "warms up over 200 steps: pass --warmup for shorter runs)")
        if not self.eval_fraction < 1.0:
            bad("eval_fraction", "must lie in [0, 1)")
        try:
            optim.check_hyperparameters(lr=self.lr, final_lr=self.final_lr, warmup=self.warmup,
                                        clip=self.clip, weight_decay=self.weight_decay)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if self.final_lr > self.lr:
            bad("final_lr", f"must be <= lr={self.lr}")


# ----------------------------------------------------------------------------- data
def read_examples(path) -> list[dict]:
    """The examples of a JSONL file: dicts with ``prompt``, ``completion`` and ``line``
    (1-based).  Raises TrainError naming the file and line of the first bad one."""
    p = pathlib.Path(path)
    problem = file_problem(p)
    if problem:
        raise TrainError(f"data file {str(path)!r} {problem}")
    examples = []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{str(path)}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TrainError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TrainError(f"{where}: expected a JSON object with \"prompt\" and "
                                 f"\"completion\", got {type(obj).__name__}")
            for field in ("prompt", "completion"):
                if not isinstance(obj.get(field), str):
                    raise TrainError(f"{where}: field {field!r} is missing or not a string")
            if not obj["completion"]:
                raise TrainError(f"{where}: the completion is empty")
            examples.append({"prompt": obj["prompt"], "completion": obj["completion"], "line": n})
    if not examples:
        raise TrainError(f"data file {str(path)!r} has no examples")
    return examples


def split_examples(examples, eval_fraction: float, seed: int):
    """(train, held-out): a seeded ``eval_fraction`` of the examples is held out (at least
    one when the fraction is > 0), the rest trained on."""
    n_eval = 0 if eval_fraction == 0 else max(1, int(round(eval_fraction * len(examples))))
    if n_eval >= len(examples):
        raise TrainError(f"eval_fraction={eval_fraction} of {len(examples)} examples leaves "
                         "none to train on")
    held = set(np.random.default_rng([seed, 1]).permutation(len(examples))[:n_eval].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def encode_examples(examples, encode, seq_len: int, source: str, *, eos_id: int, pad_id: int):
    """``(inputs_NxT, targets_NxT, mask_NxT)`` int32 / float32: ``EOS prompt completion EOS``
    shifted by one, the mask 1 where the target is a completion token or the final EOS; the
    tokenizer's ``eos_id``, ``pad_id`` after the example (masked)."""
    N = len(examples)
    inputs = np.full((N, seq_len), pad_id, np.int32)
    targets = np.full((N, seq_len), pad_id, np.int32)
    mask = np.zeros((N, seq_len), np.float32)
    for i, ex in enumerate(examples):
        prompt, completion = encode(ex["prompt"]), encode(ex["completion"])
        ids = [eos_id] + prompt + completion + [eos_id]
        n = len(ids) - 1
        if n > seq_len:
            raise TrainError(f"{source}:{ex['line']}: the example has {n} tokens (prompt "
                             f"{len(prompt)} + completion {len(completion)} + EOS), more than "
                             f"seq_len={seq_len}; pass a larger --seq-len or shorten it")
        inputs[i, :n] = ids[:-1]
        targets[i, :n] = ids[1:]
        mask[i, len(prompt):n] = 1.0
    return inputs, targets, mask


def batch_indices(step: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Example indices of 1-based ``step``: the stream of per-epoch permutations of ``n``,
    cut into consecutive batches (a function of (seed, step) only)."""
    k = (step - 1) * batch + np.arange(batch)
    out = np.empty(batch, np.int64)
    for epoch in np.unique(k // n):
        perm = np.random.default_rng([seed, 0, int(epoch)]).permutation(n)
        sel = k // n == epoch
        out[sel] = perm[k[sel] % n]
    return out


# ----------------------------------------------------------------------------- the step
def masked_ce(params, inputs_BxT, targets_BxT, mask_BxT, config, *, dtype, attention_impl):
    """Mean cross-entropy and accuracy over the positions with ``mask`` 1 (docs/design.md §2
    with a 0/1 weight per position), from the per-token entry
    (:func:`salt.runtime.model.tokens.per_token`: fused with the LM head unless ``attention_impl``
    is "naive")."""
    parts = tokens.per_token(params, inputs_BxT, targets_BxT, config, impl=attention_impl, dtype=dtype)
    # "loss" (= ce without a teacher) carries the gradient; the monitored parts do not
    return (losses.batch_mean(parts["loss"], mask_BxT),
            losses.batch_mean(parts["correct"], mask_BxT))


def make_step(config, cfg: FinetuneConfig):
    """The jitted step ``(params, opt_state, inputs, targets, mask, step, hyper) -> (params,
    opt_state, metrics)``; the schedule's constants are runtime scalars (``hyper``), so runs
    with the same model, optimizer, dtype and kernels in one process share it."""
    return _step(config, cfg.optimizer, cfg.dtype, _attention_impl(cfg.kernels))


def _attention_impl(kernels: str) -> str:
    impl = resolve_kernels(kernels)
    return "xla" if impl == "pallas" else impl  # no Pallas path here yet


@functools.lru_cache(maxsize=8)
def _step(config, optimizer: str, dtype: str, impl: str):
    dtype = jnp.dtype(dtype)
    direction = optim.make_direction(optimizer)

    def loss_fn(params, inputs, targets, mask):
        loss, acc = masked_ce(params, inputs, targets, mask, config, dtype=dtype, attention_impl=impl)
        return loss, {"loss": loss, "accuracy": acc}

    def step_fn(params, opt_state, inputs, targets, mask, step, hyper):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, inputs, targets, mask)
        grads, metrics["grad_norm"] = optim.clip_by_global_norm(grads, hyper["clip"])
        lr = optim.lr_at(step, hyper["lr"], hyper["warmup"], hyper["steps"], hyper["final_lr"])
        metrics["lr"] = lr
        metrics["tokens"] = jnp.sum(mask)
        updates, opt_state = direction.update(grads, opt_state, params)
        return optim.apply_update(params, updates, lr, hyper["weight_decay"]), opt_state, metrics

    return jax.jit(step_fn, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------- the run
def finetune(cfg: FinetuneConfig, *, progress: bool = True) -> dict:
    """Fine-tune per ``cfg``, then evaluate the held-out split; returns a summary dict.
    Bad input raises TrainError before anything is written.  ``--out`` follows the output rule
    (docs/safety.md: absent, empty, or a fine-tuning run with --resume; never inside or holding
    an input) and is locked while this runs."""
    cfg.validate()
    out = pathlib.Path(cfg.out)
    try:
        outputs.check_output_dir(out, "finetune", mode="resume" if cfg.resume else "create",
                                 inputs=[cfg.run, cfg.data, cfg.eval_data, cfg.store])
        with DirLock(out):
            return _finetune_locked(cfg, out, progress)
    except (outputs.OutputError, LockError) as e:
        raise TrainError(str(e)) from None


def _start_step(cfg: FinetuneConfig, out: pathlib.Path) -> int:
    """0, or with ``--resume`` the newest intact checkpoint of ``out`` (same configuration unless
    ``--force``); a run whose checkpoints are all damaged is refused."""
    saved_steps = checkpoint.all_steps(out)
    intact = checkpoint.newest_intact(out) if saved_steps else None
    if saved_steps and intact is None:
        raise TrainError(f"cannot resume {cfg.out!r}: none of its checkpoints {saved_steps} is intact "
                         "(see above); nothing was changed; restore a checkpoint or choose another --out")
    if not (cfg.resume and saved_steps):
        return 0
    diffs = config_changes(_read_json(out / "run_config.json").get("finetune", {}), cfg)
    if diffs and not cfg.force:
        raise TrainError(f"cannot resume {cfg.out!r} with a different configuration (pass "
                         "--force to override): " + "; ".join(diffs))
    return intact


def _examples(cfg: FinetuneConfig, base: LoadedModel, seq_len: int):
    """(training examples, held-out examples, the training arrays of :func:`encode_examples`);
    the held-out ones are length-checked too."""
    examples = read_examples(cfg.data)
    if cfg.eval_data is not None:
        train_ex, eval_ex = examples, read_examples(cfg.eval_data)
    else:
        train_ex, eval_ex = split_examples(examples, cfg.eval_fraction, cfg.seed)
    train_arrays = encode_examples(train_ex, base.encode, seq_len, cfg.data, eos_id=base.eos_id,
                                   pad_id=base.pad_id)
    if eval_ex:
        encode_examples(eval_ex, base.encode, seq_len, cfg.eval_data or cfg.data,  # length check
                        eos_id=base.eos_id, pad_id=base.pad_id)
    return train_ex, eval_ex, train_arrays


def _finetune_locked(cfg: FinetuneConfig, out: pathlib.Path, progress: bool) -> dict:
    start_step = _start_step(cfg, out)
    try:
        base = LoadedModel(cfg.run, cfg.step, cfg.store)
    except (ValueError, OSError) as e:
        raise TrainError(f"--run {cfg.run!r}: {e}") from None
    seq_len = cfg.seq_len or base.seq_len
    if seq_len is None:
        raise TrainError(f"run {cfg.run!r} does not record its seq_len; pass --seq-len")
    train_ex, eval_ex, train_arrays = _examples(cfg, base, seq_len)

    config = base.config
    init = optim.make_direction(cfg.optimizer).init
    if start_step:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params_abs, opt_abs = (jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)
            for tree in (jax.eval_shape(lambda p: p, base.params), jax.eval_shape(init, base.params)))
        params, opt_state, _ = checkpoint.restore(out, start_step, params_abs, opt_abs)
    else:
        params, opt_state = base.params, jax.jit(init)(base.params)
    step_fn = make_step(config, cfg)
    hyper = {k: jnp.float32(getattr(cfg, k)) for k in HYPER_FIELDS}

    out.mkdir(parents=True, exist_ok=True)
    store_path = str(pathlib.Path(base.store.path).absolute())
    identity = {"path": str(pathlib.Path(base.run_dir).absolute()), "step": int(base.step)}
    if start_step == 0 or not (out / "run_config.json").exists():
        outputs.write_json(out / "run_config.json", {
            "finetune": cfg.to_dict(), "model": config.to_dict(), "base": identity,
            "tokenizer_sha256": base.store.tokenizer_sha256, "seq_len": seq_len,
            "n_train": len(train_ex), "n_eval": len(eval_ex)})
    meta = {"config": config.to_dict(), "tokenizer_sha256": base.store.tokenizer_sha256,
            "vocab_size": int(base.store.vocab_size), "teacher": None,
            "preset": base.meta.get("preset"), "base": identity,
            "run_config": {"data": store_path, "seq_len": seq_len, "finetune": cfg.to_dict()}}
    history, last_saved, step = [], (start_step or None), start_step
    bar = _progress(cfg.steps, start_step, progress)
    t0 = time.perf_counter()
    try:
        with StopFlag() as stop, MetricsSink(out, start_step) as sink:
            for step in range(start_step + 1, cfg.steps + 1):
                idx = batch_indices(step, cfg.batch, len(train_ex), cfg.seed)
                inputs, targets, mask = (a[idx] for a in train_arrays)
                params, opt_state, m = step_fn(params, opt_state, inputs, targets, mask,
                                               jnp.int32(step), hyper)
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                record = {"step": step, "loss": m["loss"], "accuracy": m["accuracy"],
                          "lr": m["lr"], "grad_norm": m["grad_norm"], "tokens": int(m["tokens"])}
                if not math.isfinite(m["loss"]):
                    raise NonFiniteLoss(step, m["loss"], last_saved)
                sink.write([record])
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                if periodic or step == cfg.steps or stop.requested:
                    checkpoint.save(out, step, params, opt_state, meta, keep=set())
                    last_saved = step
                if stop.requested:
                    break
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    interrupted = step < cfg.steps
    summary = {"out": str(out), "base": identity, "start_step": start_step, "last_step": step,
               "last_checkpoint": last_saved, "interrupted": interrupted,
               "n_train": len(train_ex), "n_eval": len(eval_ex), "seq_len": seq_len,
               "train_s": train_s, "final": history[-1] if history else None,
               "first": history[0] if history else None}
    if not interrupted and eval_ex:
        summary["eval"] = evaluate_examples(params, config, base, eval_ex, cfg, out, seq_len)
        metrics_log.write_eval(out, {step: summary["eval"]})
    return summary


def evaluate_examples(params, config, base: LoadedModel, examples, cfg: FinetuneConfig, out,
                      seq_len: int) -> dict:
    """Greedy completions of the held-out prompts: exact match and ROUGE F1 means, written
    to ``OUT/eval.json`` and ``OUT/predictions.jsonl`` (temporary files renamed into place)."""
    from rouge_score import rouge_scorer

    prompts = [[base.eos_id] + base.encode(ex["prompt"]) for ex in examples]
    longest = max(len(base.encode(ex["completion"])) for ex in examples)
    budget = cfg.max_new_tokens or longest + 1
    new = greedy_generate(params, config, prompts, budget, eos_id=base.eos_id, batch_size=cfg.eval_batch,
                          dtype=cfg.dtype, attention_impl=_attention_impl(cfg.kernels))
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    rows, totals = [], {k: 0.0 for k in ("exact_match",) + ROUGE_TYPES}
    for ex, ids in zip(examples, new):
        prediction = base.decode(ids)
        scores = scorer.score(ex["completion"], prediction)
        row = {"line": ex["line"], "prompt": ex["prompt"], "completion": ex["completion"],
               "prediction": prediction,
               "exact_match": float(prediction.strip() == ex["completion"].strip()),
               **{k: scores[k].fmeasure for k in ROUGE_TYPES}}
        for k in totals:
            totals[k] += row[k]
        rows.append(row)
    result = {k: v / len(rows) for k, v in totals.items()}
    result.update(n=len(rows), max_new_tokens=budget, source=cfg.eval_data or
                  f"{cfg.data} (held-out eval_fraction={cfg.eval_fraction}, seed={cfg.seed})")
    out = pathlib.Path(out)
    outputs.write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    outputs.write_json(out / "eval.json", result)
    return result


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _progress(total, initial, enabled):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="finetune", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True)
