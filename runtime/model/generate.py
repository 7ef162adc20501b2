"""Greedy decoding for salt checkpoints (shared by ``salt finetune`` and the harness adapter).

Fixed shapes, no KV cache: a batch of ``B`` prompts is written left-aligned into a
``[B, T]`` buffer whose length ``T`` is a *bucket* (a power of two, at least 16) holding the
longest prompt plus its new tokens.  One decoding step runs the whole buffer through the
model and takes the argmax at each row's last filled position; because attention is causal,
the padding after that position cannot change it.  ``CHUNK`` steps run inside one compiled
``fori_loop``; between chunks the host checks stop conditions (EOS, token budgets, the
caller's ``stop`` test, e.g. lm-eval's ``until`` strings) and stops when every row is done.
So a run compiles once per (batch, bucket) shape, and a step costs a full forward of ``T``
positions (``O(T²)`` attention per step): fine for the CPU and small models this project
trains. Sampling long continuations (``salt xi``) uses the KV-cache decoder of
:mod:`salt.runtime.model.decode` instead: one token's work per step.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from salt.data import TokenStore
from salt.data.tokenizer import encode_document, space_mark_byte_ids
from salt.reference.config import ModelConfig
from salt.runtime.model import checkpoint, transformer as model

CHUNK = 8
MIN_BUCKET = 16


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=16)
def _chunk_fn(config: ModelConfig, dtype: str, attention_impl: str, steps: int):
    """Compiled ``(params, tokens_BxT, cur_B, limit_B, done_B, eos_id) -> (tokens_BxT, cur_B,
    done_B)`` running ``steps`` greedy steps; rows with ``done`` are left untouched; a row is
    done once it wrote ``eos_id``."""
    compute_dtype = jnp.dtype(dtype)

    def run(params, tokens_BxT, cur_B, limit_B, done_B, eos_id):
        rows_B = jnp.arange(tokens_BxT.shape[0])

        def one_step(_, carry):
            tokens_BxT, cur_B, done_B = carry
            h_BxTxD = model.hidden(params, tokens_BxT, config, dtype=compute_dtype,
                                   attention_impl=attention_impl)
            last_B = jnp.maximum(cur_B - 1, 0)
            h_Bx1xD = jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)
            logits_BxV = model.logits_from_hidden(params, h_Bx1xD)[:, 0]
            next_B = jnp.argmax(logits_BxV, axis=-1).astype(tokens_BxT.dtype)
            write_B = ~done_B
            col_B = jnp.minimum(cur_B, tokens_BxT.shape[1] - 1)
            old_B = tokens_BxT[rows_B, col_B]
            tokens_BxT = tokens_BxT.at[rows_B, col_B].set(jnp.where(write_B, next_B, old_B))
            cur_B = cur_B + write_B.astype(cur_B.dtype)
            done_B = done_B | (write_B & (next_B == eos_id)) | (cur_B >= limit_B)
            return tokens_BxT, cur_B, done_B

        return jax.lax.fori_loop(0, steps, one_step, (tokens_BxT, cur_B, done_B))

    return jax.jit(run)


def greedy_generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, *, eos_id: int, batch_size: int = 8, max_length: int | None = None,
                    stop: Callable[[list[int]], bool] | None = None, dtype: str = "float32",
                    attention_impl: str = "naive", progress: Callable[[int], None] | None = None
                    ) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (lists of token ids), in the prompts' order.

    Each continuation ends before the first ``eos_id`` (the tokenizer's eos, e.g.
    ``TokenStore.eos_id``; not returned), after
    ``max_new_tokens`` tokens, or as soon as ``stop(new_ids)`` is true (checked every
    ``CHUNK`` tokens; the caller trims its stop string, e.g. lm-eval's ``until``).
    ``max_length``: when given, a prompt longer than ``max_length - max_new_tokens`` keeps
    only its last tokens (the usual left truncation of few-shot contexts); must exceed
    ``max_new_tokens``.  ``progress(n)`` is called with the number of finished prompts.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length is not None and max_length <= max_new_tokens:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt with "
                         f"max_new_tokens={max_new_tokens}")
    prompts = [list(p) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty (start it with a token, e.g. EOS)")
        if max_length is not None and len(p) > max_length - max_new_tokens:
            prompts[i] = p[len(p) - (max_length - max_new_tokens):]
    out: list[list[int] | None] = [None] * len(prompts)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    # longest first, so one bucket's prompts share batches
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        T = bucket_length(max(len(prompts[i]) for i in rows) + max_new_tokens)
        for i, new in zip(rows, _generate_batch(params, config, [prompts[i] for i in rows],
                                                 max_new_tokens, T, batch_size, stop, dtype,
                                                 attention_impl, eos_id)):
            out[i] = new
        if progress is not None:
            progress(len(rows))
    return out  # type: ignore[return-value]


def _generate_batch(params, config, prompts, max_new_tokens, T, B, stop, dtype, attention_impl, eos_id):
    # positions past a row's cursor are never attended (causal) before they are written: any id
    tokens_BxT = np.full((B, T), eos_id, np.int32)
    cur_B = np.zeros(B, np.int32)
    limit_B = np.zeros(B, np.int32)
    done_B = np.ones(B, bool)  # padding rows stay done
    for r, p in enumerate(prompts):
        tokens_BxT[r, :len(p)] = p
        cur_B[r] = len(p)
        limit_B[r] = len(p) + max_new_tokens
        done_B[r] = False
    fn = _chunk_fn(config, dtype, attention_impl, CHUNK)
    while not done_B.all():
        tokens_BxT, cur_B, done_B = (np.array(a) for a in jax.device_get(
            fn(params, tokens_BxT, cur_B, limit_B, done_B, np.int32(eos_id))))
        if stop is not None:
            for r, p in enumerate(prompts):
                if not done_B[r] and stop(_new_ids(tokens_BxT[r], len(p), cur_B[r], eos_id)):
                    done_B[r] = True
    return [_new_ids(tokens_BxT[r], len(p), cur_B[r], eos_id) for r, p in enumerate(prompts)]


def _new_ids(row_T, prompt_len: int, cur: int, eos_id: int) -> list[int]:
    new = [int(t) for t in row_T[prompt_len:cur]]
    if eos_id in new:
        new = new[:new.index(eos_id)]
    return new


# ----------------------------------------------------------------------------- loading
class LoadedModel:
    """A checkpoint ready for scoring and decoding: model config, params, the tokenizer of
    the run's token store, and the training window length (the default context length)."""

    def __init__(self, run, step: int | None = None, store=None):

        self.run_dir, self.step = checkpoint.resolve(run, step)
        meta = checkpoint.read_meta(self.run_dir, self.step)
        run_config = meta.get("run_config") or {}
        if store is None:
            store = run_config.get("data")
            if not store:
                raise ValueError(f"checkpoint {str(self.run_dir)!r} (step {self.step}) does not "
                                 "name its token store; pass the store directory explicitly")
            if not _is_dir(store):
                raise ValueError(f"the token store {store!r} of run {str(self.run_dir)!r} does "
                                 "not exist (moved?); pass the store directory explicitly")
        self.store = TokenStore(store)
        if meta.get("tokenizer_sha256") != self.store.tokenizer_sha256:
            raise ValueError(f"checkpoint {str(self.run_dir)!r} (step {self.step}) was trained "
                             f"with tokenizer sha256 {meta.get('tokenizer_sha256')}, but the "
                             f"store {str(self.store.path)!r} uses {self.store.tokenizer_sha256}")
        self.config, self.params, self.meta = checkpoint.load_params(self.run_dir, self.step)
        self.sp = self.store.processor()
        self.eos_id, self.pad_id = self.store.eos_id, self.store.pad_id
        self._space_mark = space_mark_byte_ids(self.sp)
        self.seq_len = int(run_config.get("seq_len") or 0) or None

    def encode(self, text: str) -> list[int]:
        return encode_document(self.sp, text, self._space_mark)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def _is_dir(path) -> bool:
    import pathlib
    return pathlib.Path(path).is_dir()
