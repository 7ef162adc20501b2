"""The compiled step's input, per step: the abstract shapes it is compiled for and the global
arrays built from this process's windows (causal or UL2; from a teacher cache in the KD phase).

Shapes: ``B`` the global batch, ``T`` the tokens per window, ``k`` the cached top-k.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from salt.data import PAD_ID, ul2
from salt.runtime.model import sharding
from salt.runtime.train.config import TrainError
from salt.runtime.train.teacher_cache import CacheError


def _spec(shape, dtype, mesh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def batch_abstract(cfg, mesh):
    """The abstract step input: windows ``[B, T+1]`` (causal), or for UL2 the dict of
    :func:`salt.runtime.train.step.split_batch` (tokens, prefix lengths, target mask)."""
    tokens = _spec((cfg.batch, cfg.seq_len + 1), jnp.int32, mesh)
    if cfg.objective == "causal":
        return tokens
    return {"tokens": tokens, "prefix_len": _spec((cfg.batch,), jnp.int32, mesh),
            "mask": _spec((cfg.batch, cfg.seq_len), jnp.bool_, mesh)}


def step_batch(cfg, loader, step0: int, mesh, sentinels):
    """The global step input of 0-based ``step0`` from this process's windows (UL2 examples are
    a function of seed, step and global slot, so every process builds its own share)."""
    local = loader.batch(step0)
    if cfg.objective == "causal":
        return sharding.global_batch_array(local, mesh, cfg.batch)
    tokens, prefix_B, mask_BxT, _ = ul2.batch(
        local, seed=cfg.seed, step=step0, sentinels=sentinels, pad_id=PAD_ID,
        first_slot=loader.process_index * loader.local_batch, global_batch=cfg.batch)
    return {"tokens": sharding.global_batch_array(tokens, mesh, cfg.batch),
            "prefix_len": sharding.global_batch_array(prefix_B.astype(np.int32), mesh, cfg.batch),
            "mask": sharding.global_batch_array(mask_BxT, mesh, cfg.batch)}


def cached_batch_abstract(cfg, mesh):
    """The abstract input of the KD step from a teacher cache: the windows and the teacher's
    top-k logits (float32) and ids (int32), ``[B, T, k]``, all sharded over the batch."""
    shape = (cfg.batch, cfg.seq_len, cfg.kd_topk)
    return {"tokens": _spec((cfg.batch, cfg.seq_len + 1), jnp.int32, mesh),
            "topk_logits": _spec(shape, jnp.float32, mesh), "topk_ids": _spec(shape, jnp.int32, mesh)}


def cached_step_batch(cfg, cache, loader, step0: int, windows, mesh):
    """The KD step's input from the cache: this process's rows of the cached global batch."""
    try:
        logits, ids = cache.batch(step0, cfg.kd_topk)
    except CacheError as e:
        raise TrainError(str(e)) from None
    rows = slice(loader.process_index * loader.local_batch, (loader.process_index + 1) * loader.local_batch)
    return {"tokens": windows, "topk_logits": sharding.global_batch_array(logits[rows], mesh, cfg.batch),
            "topk_ids": sharding.global_batch_array(ids[rows], mesh, cfg.batch)}
