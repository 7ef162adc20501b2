"""Which JAX platform a process uses, decided once for every entry point (the ``salt`` command,
``salt-lm-eval``)."""
from __future__ import annotations

import glob
import os


def default_jax_platforms() -> None:
    """Skip JAX's TPU probe on hosts without a TPU.

    With ``libtpu`` installed (the test extra brings it, for ahead-of-time TPU compiles) every
    JAX start-up on a CPU or GPU host prints libtpu initialisation warnings. When the user has
    not chosen platforms and the host has no accelerator device files, choose the CPU here.
    """
    if "JAX_PLATFORMS" in os.environ:
        return
    accelerators = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")
    if not any(glob.glob(pattern) for pattern in accelerators):
        os.environ["JAX_PLATFORMS"] = "cpu"
