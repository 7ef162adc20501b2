"""Fused KD-loss and multi-query attention kernels (Pallas TPU, pure-JAX chunked, naive).

Public entry points: ``kd_loss``, ``fused_linear_kd_loss``, ``mqa_attention``; each takes
``impl`` in {"pallas", "xla", "naive"} (default: :func:`default_impl`, "pallas" on TPU and GPU,
"xla" elsewhere; "pallas" on a GPU is the Pallas GPU kernel where the operation has one, the
fused-linear losses' ``"pallas_gpu"``, else the "xla" path: :func:`resolve_impl`) and
``interpret=True`` to run the Pallas kernel on the CPU.
"""
from salt.kernels._common import default_impl, resolve_impl  # noqa: F401
from salt.kernels.attention import AttentionBlockSizes, mqa_attention  # noqa: F401
from salt.kernels.fused_linear_kd import fused_linear_ce_loss, fused_linear_kd_loss  # noqa: F401
from salt.kernels.logits_kd import kd_loss  # noqa: F401
