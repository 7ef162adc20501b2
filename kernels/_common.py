"""What every kernel module agrees on: which implementation runs (``impl``), and the ``a @ b.T``
contraction (:data:`NT`).

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

# dot_general dimension numbers of ``a @ b.T`` (contract the last dims, no batch dims): the logit
# tiles ``h @ E.T`` and the attention scores ``q @ k.T`` of every kernel.
NT = (((1,), (1,)), ((), ()))

IMPLS = ("pallas", "xla", "naive")
GPU_IMPL = "pallas_gpu"


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
