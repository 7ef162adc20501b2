"""What the implementations of the fused-linear KD / CE loss share: the block sizes
(:class:`FusedKDBlockSizes`), the flop counts of each schedule (:func:`analytic_flops`), the label
logit ``θ`` and the problem's dimensions."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from salt.kernels._common import LANES, SUBLANES, check_block
from salt.kernels._online import bwd_flops, fwd_flops


@dataclasses.dataclass(frozen=True)
class FusedKDBlockSizes:
    """``block_tokens`` x ``block_vocab`` Pallas tiles (multiples of 8 and 128: the TPU tiling,
    :func:`salt.kernels._common.check_block`; 16 rows fill bfloat16's packed tiles);
    ``chunk_vocab``: vocab columns per step of the ``xla`` scan; ``xla_block_tokens``: rows per
    block of the ``xla`` path (the vocabulary scan runs block by block, so its ``[rows,
    chunk_vocab]`` float32 tiles stay small; None: all rows at once).  ``None`` Pallas fields are
    chosen from the hidden sizes and dtype so the kernels fit :data:`VMEM_BUDGET_BYTES` (TPU) or by
    :func:`salt.kernels.fused_linear_kd_gpu.choose_gpu_blocks` (GPU; given ones must then be powers
    of two >= 16).  ``gpu_chunk_tokens``: token rows per ``dS`` chunk of the GPU backward (None:
    as many as keep it under :data:`salt.kernels.fused_linear_kd_gpu.GRAD_CHUNK_BYTES`)."""

    block_tokens: int | None = None
    block_vocab: int | None = None
    chunk_vocab: int = 1024
    xla_block_tokens: int | None = 2048
    gpu_chunk_tokens: int | None = None

    def __post_init__(self):
        check_block("block_tokens", self.block_tokens, SUBLANES)
        check_block("block_vocab", self.block_vocab, LANES)
        if not (isinstance(self.chunk_vocab, int) and self.chunk_vocab > 0):
            raise ValueError(f"chunk_vocab must be a positive integer, got {self.chunk_vocab!r}")
        if self.xla_block_tokens is not None and not (
                isinstance(self.xla_block_tokens, int) and not isinstance(self.xla_block_tokens, bool)
                and self.xla_block_tokens > 0):
            raise ValueError(f"xla_block_tokens must be a positive integer or None, got {self.xla_block_tokens!r}")
        if self.gpu_chunk_tokens is not None and not (
                isinstance(self.gpu_chunk_tokens, int) and not isinstance(self.gpu_chunk_tokens, bool)
                and self.gpu_chunk_tokens > 0):
            raise ValueError(f"gpu_chunk_tokens must be a positive integer or None, got {self.gpu_chunk_tokens!r}")


def logits_flops(n, vocab, d_s, d_t):
    """Flops of forming both logit matrices once: ``2·N·V·(D_s + D_t)``."""
    return 2 * n * vocab * (d_s + d_t)


def grad_matmul_flops(n, vocab, d_s):
    """Flops of ``dS @ E_s`` and ``dSᵀ @ h_s``: ``4·N·V·D_s``."""
    return 4 * n * vocab * d_s


def analytic_flops(n, vocab, d_s, d_t, *, backward=True, schedule="pallas"):
    """Flops of forward (+ backward) per schedule.  ``"pallas"``: forward forms the logits once;
    each of the two backward kernels recomputes them (3 logit passes in all) and does one gradient
    matmul.  ``"xla"`` and ``"pallas_gpu"``: the backward recomputes them once (2 passes).
    ``"naive"``: one pass.  Plus ~20 (forward) and ~10 (per backward pass) elementwise flops per
    logit pair."""
    passes = {"pallas": 3, "xla": 2, "pallas_gpu": 2, "naive": 1}[schedule]
    fwd = logits_flops(n, vocab, d_s, d_t) + fwd_flops(n, vocab)
    if not backward:
        return fwd
    bwd_elementwise = (2 if schedule == "pallas" else 1) * bwd_flops(n, vocab)
    return (fwd + (passes - 1) * logits_flops(n, vocab, d_s, d_t) + grad_matmul_flops(n, vocab, d_s)
            + bwd_elementwise)


def label_logit(hs, es, y):
    """``θ_n = h_n · E[y_n]`` in float32 (the threshold of the ``n_gt`` count)."""
    es_y = jnp.take(es, y, axis=0, mode="clip")
    return jnp.sum(hs.astype(jnp.float32) * es_y.astype(jnp.float32), axis=1)


def dims(hs, es, teacher):
    """``(N, V, D_s, D_t)`` (``D_t = 0`` without a teacher)."""
    return hs.shape[0], es.shape[0], hs.shape[1], 0 if teacher is None else teacher[0].shape[1]
