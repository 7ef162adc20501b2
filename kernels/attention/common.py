"""What the implementations of multi-query attention share: the block sizes
(:class:`AttentionBlockSizes`), the mask value and the visibility geometry of (query block, key
block) pairs that the xla path and the TPU kernels both skip by."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

# Finite "minus infinity" for masked scores: exp(MASK - m) is exactly 0 and never NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
    """Tile sizes. They change speed and memory, never the result (beyond rounding).

    block_q, block_k: query / key rows per block in the forward pass (and the xla path).
    block_h: query heads of one key/value head's group processed per grid step (None: as many as fit
      ``max_rows = block_h * block_q`` rows, at most the group size). Must divide H // G.
    block_q_bwd, block_k_bwd: the same for the backward kernels (None: the forward sizes).
    On a real TPU block_q and block_k must be multiples of 128 (the lane width); sequences
    shorter than a block use one block of ``T`` rounded up to 128 (8 in interpret mode), and a
    block is halved (down to 128) while that reduces the padded length (T=300: 128, not 256).
    In interpret mode the sizes are used as given (capped at T rounded up to 8).
    """

    block_q: int = 256
    block_k: int = 256
    block_h: int | None = None
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    max_rows: int = 1024

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_h", "block_q_bwd", "block_k_bwd", "max_rows"):
            value = getattr(self, name)
            if value is None and name not in ("block_q", "block_k", "max_rows"):
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionBlockSizes.{name} must be a positive integer, got {value!r}")
            if name != "block_h" and name != "max_rows" and value % 8:
                raise ValueError(f"AttentionBlockSizes.{name} must be a multiple of 8, got {value}")


def visible_mask(q_pos, k_pos, prefix, seq_len):
    """Key ``k_pos`` visible from query ``q_pos`` (broadcasting int arrays)."""
    return ((k_pos <= q_pos) | (k_pos < prefix)) & (k_pos < seq_len)


def block_visible(qi, kj, prefix, block_q, block_k, seq_len):
    """True iff block (query block qi, key block kj) has at least one visible (query, key) pair.

    The smallest key of the block is kj*block_k and the largest query (qi+1)*block_q - 1; the
    prefix makes keys < prefix visible from every query. Blocks of only padding queries or only
    padding keys (positions >= seq_len) are never computed.
    """
    k0 = kj * block_k
    return ((qi * block_q < seq_len) & (k0 < seq_len)
            & ((k0 < (qi + 1) * block_q) | (k0 < prefix)))


def last_key_block(qi, prefix, block_q, block_k, seq_len):
    """Largest kj with block_visible(qi, kj) (blocks 0..last are exactly the visible ones)."""
    hi = jnp.minimum(seq_len, jnp.maximum((qi + 1) * block_q, prefix))
    return lax.div(hi - 1, jnp.int32(block_k))  # non-negative: truncation == floor


def first_query_block(kj, prefix, block_q, block_k, seq_len):
    """Smallest qi with block_visible(qi, kj), if any (the visible ones are first..last query block
    holding a real query). Clipped to that last block."""
    k0 = kj * block_k
    last_q = (seq_len - 1) // block_q
    return jnp.where(k0 < prefix, 0, jnp.minimum(lax.div(k0, jnp.int32(block_q)), last_q))


def kv_block_index(qi, kj, prefix, block_q, block_k, seq_len):
    """Key block the forward/dq pipelines fetch at grid step (qi, kj): kj, clamped to the last
    visible one, so skipped steps repeat the previous index and no copy is issued."""
    return jnp.minimum(kj, last_key_block(qi, prefix, block_q, block_k, seq_len))


def q_block_index(qi, kj, prefix, block_q, block_k, seq_len):
    """Query block the dk/dv pipeline fetches at step (kj, qi): qi, clamped into the visible
    range [first_query_block, last query block holding a real query]."""
    first = first_query_block(kj, prefix, block_q, block_k, seq_len)
    return jnp.minimum(jnp.maximum(qi, first), (seq_len - 1) // block_q)
