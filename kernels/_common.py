"""What every kernel module agrees on: which implementation runs (``impl``), the ``a @ b.T``
contraction (:data:`NT`), the TPU's tile geometry (:data:`LANES`, :data:`SUBLANES`,
:data:`PACKED_SUBLANES`), the lane-dense layout of per-row vectors, the one block-size choice
(:func:`choose_blocks`) and the VMEM budget it checks against (:data:`VMEM_BUDGET_BYTES`).

The one decision of the implementation: :func:`default_impl` is what ``impl=None`` and
``--kernels auto`` mean on a platform; :func:`resolve_impl` turns a requested ``impl`` into the one an
operation runs.  ``"pallas"`` asks for the operation's Pallas kernel *for the platform*: the
TPU (Mosaic) kernel on a TPU and on the CPU (there in interpret mode, or compiled ahead of time
for a TPU topology), the GPU (Triton) kernel ``"pallas_gpu"`` on a GPU where the operation has one
(today the fused-linear KD / CE losses) and the operation's ``"xla"`` path on a GPU where it has
none (attention, the loss from logits, the teacher's top-k).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# dot_general dimension numbers of ``a @ b.T`` (contract the last dims, no batch dims): the logit
# tiles ``h @ E.T`` and the attention scores ``q @ k.T`` of every kernel.
NT = (((1,), (1,)), ((), ()))

IMPLS = ("pallas", "xla", "naive")
GPU_IMPL = "pallas_gpu"

# ----------------------------------------------------------------------------------------------
# TPU tile geometry.  A vector register is SUBLANES x LANES 32-bit words and Mosaic lays a block's
# last two dims out in tiles of that shape: Pallas TPU requires the last dim of a block to be a
# multiple of LANES and the second-to-last a multiple of SUBLANES (or the whole array dimension),
# for bfloat16 too (compiling the loss kernels for v5e with bf16 blocks of 8 rows works; 4 rows
# fail; tests/test_kernels_tpu_aot_kd.py).  bfloat16's native tile is PACKED_SUBLANES rows (two
# 16-bit rows per 32-bit sublane): the default choice (:func:`choose_blocks`) rounds token blocks
# to it so a bf16 block is whole tiles, but a given block size need only be a multiple of SUBLANES.
# ----------------------------------------------------------------------------------------------
LANES = 128
SUBLANES = 8
PACKED_SUBLANES = 16

# Budget for Pallas TPU blocks chosen by :func:`choose_blocks`: below the smallest default scoped
# VMEM limit of the supported chips (16 MiB on v5e).  The TPU AOT tests compile the default choice
# at the paper's shapes (Mosaic fails on a VMEM overflow).
VMEM_BUDGET_BYTES = 15 * 1024 * 1024


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``x``."""
    return -(-x // multiple) * multiple


def default_impl(platform: str | None = None) -> str:
    """``impl=None`` / ``--kernels auto``: "pallas" on a TPU or a GPU, "xla" elsewhere
    (``platform``: JAX's default backend when None)."""
    return "pallas" if (platform or jax.default_backend()) in ("tpu", "gpu") else "xla"


def resolve_impl(impl, *, gpu_kernel: bool = False, platform: str | None = None) -> str:
    """The implementation an operation runs for the requested ``impl`` (None: :func:`default_impl`);
    ``gpu_kernel``: the operation has a Pallas GPU kernel (then ``"pallas_gpu"`` may also be asked
    for explicitly, e.g. in interpret mode on the CPU)."""
    platform = platform or jax.default_backend()
    if impl is None:
        impl = default_impl(platform)
    allowed = IMPLS + ((GPU_IMPL,) if gpu_kernel else ())
    if impl not in allowed:
        raise ValueError(f"impl must be one of {allowed} or None, got {impl!r}")
    if impl == "pallas" and platform == "gpu":
        return GPU_IMPL if gpu_kernel else "xla"
    return impl


# ----------------------------------------------------------------------------------------------
# Block sizes of the (token blocks, vocabulary blocks) grids of the loss kernels.
# ----------------------------------------------------------------------------------------------

def check_block(name: str, value, multiple: int, optional: bool = True) -> None:
    """ValueError unless ``value`` is a positive multiple of ``multiple`` (or None when ``optional``:
    chosen by :func:`choose_blocks`); a field of a block-sizes dataclass."""
    if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int)
                                                or value < 1 or value % multiple):
        raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")


def choose_blocks(n, vocab, block_tokens=None, block_vocab=None, *, token_options=(), vocab_options=(),
                  vmem_bytes=None, prefer="tokens", none_fit="smallest"):
    """``(block_tokens, block_vocab)`` of a (token blocks, vocabulary blocks) grid over ``n`` rows
    and ``vocab`` columns.  Each is the given value or one of its ``*_options``, capped at ``n``
    rounded up to :data:`PACKED_SUBLANES` and ``vocab`` rounded up to :data:`LANES` (a block never
    exceeds the array by more than one tile).  Among the candidates: those whose
    ``vmem_bytes(bt, bv)`` fits :data:`VMEM_BUDGET_BYTES` (all when ``vmem_bytes`` is None) first;
    of those the largest area, ties to the larger ``prefer`` side ("tokens": more flops per
    embedding byte read; "vocab": fewer merge rounds per tile); if none fits, the ``none_fit``
    ("smallest" or "largest") area (Mosaic then reports the overflow).  (The two policies are the
    two callers' historical choices, kept so that no kernel's tiles, and so no result, change.)"""
    n_cap, v_cap = round_up(n, PACKED_SUBLANES), round_up(vocab, LANES)
    best = None
    for bt in [block_tokens] if block_tokens else token_options:
        for bv in [block_vocab] if block_vocab else vocab_options:
            bt_eff, bv_eff = min(bt, n_cap), min(bv, v_cap)
            fits = vmem_bytes is None or vmem_bytes(bt_eff, bv_eff) <= VMEM_BUDGET_BYTES
            area = bt_eff * bv_eff
            key = (fits, area if fits or none_fit == "largest" else -area,
                   bt_eff if prefer == "tokens" else bv_eff)
            if best is None or key > best[0]:
                best = (key, (bt_eff, bv_eff))
    return best[1]


# ----------------------------------------------------------------------------------------------
# Row layout.  Per-row vectors (labels, label logits, statistics, running carries) cross the
# Pallas boundary and live in VMEM scratch LANE-DENSE, as ``[rows, LANES]`` with the value repeated
# along the lanes (JAX's own flash attention keeps its ``l``/``m`` the same way): a ``[rows, 1]``
# block would be padded to full lanes in VMEM anyway and moved by narrow, strided DMAs.  Kernels
# load a block and use lane 0 (:func:`load_row`) and store a broadcast (:func:`store_row`).
# ----------------------------------------------------------------------------------------------

def to_lanes(x_N):
    """``[N]`` -> the lane-dense ``[N, LANES]`` operand (the value repeated along the lanes)."""
    return jnp.broadcast_to(x_N[:, None], (x_N.shape[0], LANES))


def from_lanes(x_NxL):
    """A lane-dense ``[N, LANES]`` kernel output -> ``[N]``."""
    return x_NxL[:, 0]


def load_row(ref):
    """A lane-dense row block ``[bt, LANES]`` -> the ``[bt, 1]`` column of values."""
    return ref[...][:, :1]


def store_row(ref, value_Bx1):
    """Store a ``[bt, 1]`` column into a lane-dense ``[bt, LANES]`` block (repeated along lanes)."""
    ref[...] = jnp.broadcast_to(value_Bx1, ref.shape).astype(ref.dtype)


def row_spec(block_tokens, token_axis=0):
    """BlockSpec of a lane-dense per-row ``[N, LANES]`` operand on a 2-D grid whose axis
    ``token_axis`` walks rows."""
    if token_axis == 0:
        return pl.BlockSpec((block_tokens, LANES), lambda i, j: (i, 0))
    return pl.BlockSpec((block_tokens, LANES), lambda j, i: (i, 0))


def row_scratch(block_tokens, n_rows):
    """``n_rows`` lane-dense float32 VMEM scratch blocks ``[block_tokens, LANES]``."""
    return [pltpu.VMEM((block_tokens, LANES), jnp.float32)] * n_rows


def row_outputs(n, n_rows):
    """Shapes of ``n_rows`` lane-dense float32 per-row outputs ``[N, LANES]``."""
    return [jax.ShapeDtypeStruct((n, LANES), jnp.float32)] * n_rows


def bind(refs, *groups):
    """A kernel's positional refs as one dict per group of names (the groups in call order)."""
    out, i = [], 0
    for names in groups:
        out.append(dict(zip(names, refs[i:i + len(names)])))
        i += len(names)
    if i != len(refs):
        raise ValueError(f"kernel got {len(refs)} refs, the names account for {i}")
    return out
