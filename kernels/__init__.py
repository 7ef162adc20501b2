"""Fused KD-loss and multi-query attention kernels (Pallas TPU, pure-JAX chunked, naive).

Public entry points: ``kd_loss``, ``fused_linear_kd_loss``, ``mqa_attention``.
"""
