"""lm-evaluation-harness (0.4.x) adapter for salt checkpoints: the ``salt`` model.

Needs the optional extra ``salt[eval]``.  Importing this module registers ``SaltLM`` under
the name ``salt`` in the harness's model registry, so after the import
``lm_eval.simple_evaluate(model="salt", model_args="run=RUN,step=S", ...)`` works, as does
passing ``SaltLM(run=...)`` directly.  lm-eval 0.4.x discovers no models from installed
packages (no entry-point group; only its own ``MODEL_MAPPING``), so the harness's own command
line cannot see ``salt`` by itself: the console script ``salt-lm-eval`` is that command line
with this module imported first (``salt-lm-eval --model salt --model_args run=RUN,step=S
--tasks ...``).  ``salt eval --run RUN --tasks ...`` is the same through salt's CLI.

Conventions (the model was trained on documents separated by EOS, no BOS):

* text <-> ids with the tokenizer of the run's token store (``salt.data``);
* every context is conditioned on a leading EOS (the "start of a document" the model saw in
  training); an empty context is EOS alone;
* contexts longer than ``max_length`` (default: the run's training ``seq_len``) keep their
  last tokens;
* ``loglikelihood`` sums the continuation's log-probabilities (float32, from the fused
  cross-entropy kernel) and reports whether every continuation token was the argmax;
* ``loglikelihood_rolling`` scores a whole text in disjoint windows of ``max_length``
  (the harness's ``get_rolling_token_windows``), the first conditioned on EOS;
* ``generate_until`` decodes greedily (``salt.runtime.model.generate``) and cuts the text at the
  first ``until`` string; sampling (``do_sample``/``temperature > 0``) is refused.

Scoring batches have a fixed ``batch_size`` rows and a power-of-two length bucket, so each
bucket compiles once.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from salt.core.platform import default_jax_platforms
from salt.runtime.model import checkpoint
from salt.runtime.model.generate import LoadedModel, bucket_length, greedy_generate
from salt.runtime.model.tokens import token_stats_fn
from salt.runtime.train.config import resolve_kernels


@register_model("salt")
class SaltLM(TemplateLM):
    """A salt checkpoint as an lm-eval ``LM``.

    ``run``: run directory or checkpoint path; ``step``: checkpoint step (default: latest);
    ``store``: token store whose tokenizer to use (default: the run's); ``batch_size``: rows
    per scoring/decoding batch; ``max_length``: context length (default: the run's
    ``seq_len``); ``max_gen_toks``: default generation budget; ``dtype``: compute dtype;
    ``kernels``: attention implementation ("naive" or "xla"; "auto" = "xla").
    ``device`` and ``max_batch_size`` (passed by the harness's CLI) are accepted and ignored:
    JAX places the model on its default device.
    """

    backend = "causal"

    def __init__(self, run, step=None, store=None, batch_size=8, max_length=None,
                 max_gen_toks=256, dtype="float32", kernels="auto", device=None,
                 max_batch_size=None, **unknown):
        super().__init__()
        # the harness bootstraps some standard errors in a fork()ed multiprocessing pool,
        # which can deadlock a process running JAX: ask it for its in-process path
        os.environ.setdefault("DISABLE_MULTIPROC", "1")
        if unknown:
            raise ValueError(f"unknown salt model argument(s): {', '.join(sorted(unknown))} "
                             "(known: run, step, store, batch_size, max_length, max_gen_toks, "
                             "dtype, kernels)")
        self.loaded = LoadedModel(run, _opt_int("step", step), store)
        self.batch_size = _batch_size(batch_size)
        self.max_length = _opt_int("max_length", max_length) or self.loaded.seq_len or 2048
        self.max_gen_toks = _opt_int("max_gen_toks", max_gen_toks)
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        self.dtype = dtype
        if kernels not in ("auto", "naive", "xla"):
            raise ValueError(f"kernels must be auto, naive or xla, got {kernels!r}")
        self.kernels = resolve_kernels(kernels)

    # ------------------------------------------------------------------ tokenizer
    @property
    def eot_token_id(self) -> int:
        return self.loaded.eos_id  # the store's tokenizer's eos (SentencePiece: 3)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.loaded.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.loaded.decode(tokens)

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = []
        for context, continuation in (r.args for r in requests):
            if context:
                ctx, cont = self._encode_pair(context, continuation)
            else:
                ctx, cont = [], self.tok_encode(continuation)
            pairs.append(((context, continuation), [self.eot_token_id] + ctx, cont))
        return self._loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``requests``: (cache key, context ids, continuation ids), the context already
        conditioned (starting with EOS or a rolling window's context)."""
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("a loglikelihood request has an empty continuation")
            seq = (list(ctx) + list(cont))[-(self.max_length + 1):]
            n_cont = min(len(cont), len(seq) - 1)
            rows.append((seq[:-1], seq[1:], n_cont))
        results = self._score_rows(rows, disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def _score_rows(self, rows, disable_tqdm):
        fn = token_stats_fn(self.loaded.config, self.kernels, dtype=self.dtype)  # compiled once per length bucket
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list = [None] * len(rows)
        B = self.batch_size
        bar = tqdm(total=len(rows), desc="salt loglikelihood", disable=disable_tqdm)
        for start in range(0, len(order), B):
            batch = order[start:start + B]
            T = bucket_length(len(rows[batch[0]][0]))
            inputs_BxT = np.full((B, T), self.loaded.pad_id, np.int32)
            targets_BxT = np.full((B, T), self.loaded.pad_id, np.int32)
            for r, i in enumerate(batch):
                inp, tgt, _ = rows[i]
                inputs_BxT[r, :len(inp)] = inp
                targets_BxT[r, :len(tgt)] = tgt
            stats = jax.device_get(fn(self.loaded.params, inputs_BxT, targets_BxT))
            logp_BxT, greedy_BxT = -np.asarray(stats["ce"]), np.asarray(stats["correct"])
            for r, i in enumerate(batch):
                n, n_cont = len(rows[i][0]), rows[i][2]
                span = slice(n - n_cont, n)
                results[i] = (float(np.sum(logp_BxT[r, span], dtype=np.float64)),
                              bool(np.all(greedy_BxT[r, span])))
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            for w in get_rolling_token_windows(token_list=self.tok_encode(text),
                                               prefix_token=self.eot_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                ctx, cont = make_disjoint_window(w)
                windows.append((None, ctx, cont))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owners, scores):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False):
        groups: dict = {}
        for n, (context, gen_kwargs) in enumerate(r.args for r in requests):
            until, budget = self._gen_settings(gen_kwargs)
            groups.setdefault((tuple(until), budget), []).append((n, context))
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="salt generate_until", disable=disable_tqdm)
        for (until, budget), items in groups.items():
            prompts = [[self.eot_token_id] + self.tok_encode(ctx) for _, ctx in items]

            def stop(ids, until=until):
                text = self.tok_decode(ids)
                return any(u in text for u in until)

            new = greedy_generate(self.loaded.params, self.loaded.config, prompts, budget,
                                  eos_id=self.eot_token_id,
                                  batch_size=self.batch_size, max_length=self.max_length,
                                  stop=stop if until else None, dtype=self.dtype,
                                  attention_impl=self.kernels, progress=bar.update)
            for (n, ctx), ids in zip(items, new):
                text = _cut(self.tok_decode(ids), until)
                out[n] = text
                self.cache_hook.add_partial("generate_until", (ctx, requests[n].args[1]), text)
        bar.close()
        return out

    def _gen_settings(self, gen_kwargs):
        kwargs = dict(gen_kwargs or {})
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
            raise ValueError("the salt model decodes greedily only; the task asks for sampling "
                             f"({ {k: kwargs.get(k) for k in ('do_sample', 'temperature')} })")
        until = kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        budget = int(kwargs.get("max_gen_toks") or self.max_gen_toks)
        if budget >= self.max_length:
            budget = self.max_length - 1
        return [u for u in until if u], budget


def _cut(text: str, until) -> str:
    for u in until:
        if u in text:
            text = text[:text.index(u)]
    return text


def _opt_int(name, value):
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _batch_size(value) -> int:
    if value in (None, "", "auto") or str(value).startswith("auto"):
        return 8
    n = _opt_int("batch_size", value)
    if n < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return n


# ----------------------------------------------------------------------------- tasks
def task_manager(names, tasks_dir=None):
    """A harness TaskManager that knows ``names``: only ``tasks_dir``'s tasks when they
    cover every name (indexing the harness's thousands of built-in tasks takes tens of
    seconds), else the built-in tasks as well.  Unknown names raise ValueError listing them
    (with close matches)."""
    from lm_eval.tasks import TaskManager

    include = None
    if tasks_dir is not None:
        include = str(tasks_dir)
        if not pathlib.Path(include).is_dir():
            raise ValueError(f"tasks directory {include!r} does not exist")
        tm = TaskManager(include_path=include, include_defaults=False)
        if not _unknown(tm, names):
            return tm
    tm = TaskManager(include_path=include)
    check_tasks(tm, names, include)
    return tm


def check_tasks(tm, names, include=None) -> None:
    """Raise ValueError naming the tasks ``tm`` does not know, with close matches."""
    missing = _unknown(tm, names)
    if missing:
        import difflib
        hints = {m: difflib.get_close_matches(m, tm.all_tasks, n=3) for m in missing}
        said = "; ".join(f"{m!r}" + (f" (did you mean {', '.join(h)}?)" if h else "")
                         for m, h in hints.items())
        where = f" in {include!r} nor" if include else ""
        raise ValueError(f"unknown task(s): {said}; no such task{where} among the harness's "
                         "tasks (`lm-eval ls tasks` lists them)")


def _unknown(tm, names) -> list[str]:
    known = set(tm.all_tasks)
    return [n for n in names if n not in known and not tm.match_tasks([n])]


def evaluate_tasks(run, step=None, *, tasks, tasks_dir=None, store=None, num_fewshot=None,
                   limit=None, batch_size=8, max_length=None, seed=1234, bootstrap_iters=100000
                   ) -> dict:
    """``salt eval --tasks``: checks the checkpoint and the task names first (clear errors),
    then runs ``lm_eval.simple_evaluate`` with :class:`SaltLM`; returns the harness's
    results dict (JSON-serialisable with :func:`results_json`)."""
    from lm_eval import simple_evaluate

    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise ValueError("--tasks is empty")
    checkpoint.resolve(run, step)  # a missing checkpoint fails before the slow task index
    tm = task_manager(names, tasks_dir)
    lm = SaltLM(run=run, step=step, store=store, batch_size=batch_size, max_length=max_length)
    results = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                              task_manager=tm, bootstrap_iters=bootstrap_iters, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=None,
                              fewshot_random_seed=seed)
    results["salt"] = {"run": str(lm.loaded.run_dir), "step": lm.loaded.step,
                       "store": str(lm.loaded.store.path), "max_length": lm.max_length,
                       "batch_size": lm.batch_size}
    return results


def results_json(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable
    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def write_results(results: dict, path) -> None:
    """Write :func:`results_json` to ``path`` (a temporary file renamed into place)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(results_json(results) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- console script
def lm_eval_main():
    """``salt-lm-eval``: the harness's own command line, with the ``salt`` model registered."""
    default_jax_platforms()
    from lm_eval.__main__ import cli_evaluate
    sys.argv[0] = os.path.basename(sys.argv[0])
    cli_evaluate()
