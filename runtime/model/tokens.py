"""Per-token statistics of a model: the one forward + loss entry that evaluation, scoring, the
cloze task, the lm-eval adapter and fine-tuning call.

``per_token`` runs the model to its final hidden states and hands them, with the LM head (``head_matrix``),
to the runtime's one loss entry (:func:`salt.runtime.model.losses.token_parts`), so no
``[tokens, vocab]`` logits exist unless ``impl`` is "naive".  It is differentiable (fine-tuning
takes its gradient).  ``token_stats_fn`` and ``window_stats_fn`` are its compiled forms, cached per
model config so that many checkpoints of one run compile once; :class:`WindowStats` feeds
``[n, T + 1]`` windows to the latter over the local devices, padded to one compiled shape.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from salt.reference.config import ModelConfig
from salt.runtime.model import losses, transformer


def per_token(params: dict, inputs_BxT, targets_BxT, config: ModelConfig, *, impl: str, mesh=None,
              vocab: int | None = None, dtype=jnp.float32) -> dict:
    """``{"loss", "ce", "correct", "n_greater"}``, each ``[B, T]``: the target's cross-entropy
    (``loss`` carries its gradient; ``ce`` is the same value, monitored), whether it is the (first)
    argmax, and how many vocabulary entries have a strictly larger logit.
    ``impl``: a resolved kernel choice ("pallas", "xla" or "naive"); ``mesh``: the mesh (axis
    ``data``) the batch is sharded on; ``vocab``: the tokenizer's vocabulary when the LM head is
    padded beyond it (padded columns take no probability and are not counted)."""
    hidden_BxTxD = transformer.hidden(params, inputs_BxT, config, dtype=dtype, attention_impl=impl, mesh=mesh)
    parts = losses.token_parts(hidden_BxTxD, transformer.head_matrix(params), targets_BxT, impl=impl, mesh=mesh,
                               vocab=vocab)
    return {"loss": parts["loss"], "ce": parts["ce"], "correct": parts["correct"] > 0.5,
            "n_greater": parts["n_greater"]}


@functools.lru_cache(maxsize=32)
def token_stats_fn(config: ModelConfig, impl: str, *, mesh=None, vocab: int | None = None,
                   dtype: str = "float32"):
    """Compiled ``(params, inputs_BxT, targets_BxT) -> per_token(...)``."""
    return jax.jit(functools.partial(_per_token_args, config=config, impl=impl, mesh=mesh, vocab=vocab,
                                     dtype=jnp.dtype(dtype)))


@functools.lru_cache(maxsize=32)
def window_stats_fn(config: ModelConfig, impl: str, *, mesh=None, vocab: int | None = None):
    """Compiled ``(params, windows_BxT1) -> per_token(params, w[:, :-1], w[:, 1:], ...)``: position
    ``j`` predicts token ``j + 1`` of each window."""
    def stats(params, windows_BxT1):
        return per_token(params, windows_BxT1[:, :-1], windows_BxT1[:, 1:], config, impl=impl, mesh=mesh,
                         vocab=vocab)
    return jax.jit(stats)


def _per_token_args(params, inputs_BxT, targets_BxT, *, config, impl, mesh, vocab, dtype):
    return per_token(params, inputs_BxT, targets_BxT, config, impl=impl, mesh=mesh, vocab=vocab, dtype=dtype)


class WindowStats:
    """Per-token statistics of one model over batches of ``[n, T + 1]`` windows (``n`` at most
    :attr:`batch`), the batch sharded over the local devices (axis ``data``) and padded with
    zeros to one compiled shape; results come back as NumPy arrays cut to the ``n`` real rows."""

    def __init__(self, params: dict, config: ModelConfig, *, batch_size: int, impl: str,
                 vocab: int | None = None):
        devices = jax.devices()
        self.batch = -(-batch_size // len(devices)) * len(devices)  # a multiple of the device count
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self._rows = NamedSharding(self.mesh, P("data"))
        self._params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self._fn = window_stats_fn(config, impl, mesh=self.mesh, vocab=vocab)

    def __call__(self, windows_NxT1: np.ndarray) -> dict:
        windows_NxT1 = np.asarray(windows_NxT1, dtype=np.int32)
        n = windows_NxT1.shape[0]
        if not 0 < n <= self.batch:
            raise ValueError(f"expected 1 to {self.batch} windows, got {n}")
        if n < self.batch:
            pad = np.zeros((self.batch - n, windows_NxT1.shape[1]), np.int32)
            windows_NxT1 = np.concatenate([windows_NxT1, pad])
        out = self._fn(self._params, jax.device_put(jnp.asarray(windows_NxT1), self._rows))
        return {name: np.asarray(value)[:n] for name, value in out.items()}
