"""Ahead-of-time compilation for TPU topologies without a TPU (libtpu compile-only devices).

What works (jax 0.10.2, libtpu 0.0.42, checked on a CPU-only machine):

* ``jax.experimental.topologies.get_topology_desc(topology_name=NAME, platform="tpu")`` with
  ``NAME`` of the form ``<chip>:<bounds>``; ``v5e:2x2`` (4 chips of "TPU v5 lite"),
  ``v5p:2x2x1`` (4 chips of "TPU v5"), ``v6e:2x2`` (4 chips of "TPU v6 lite").  The long chip
  names work too (``"TPU v5 lite:2x2"``).  A single chip (``v5e:1x1``) is rejected: the default
  chips-per-host bounds are 2x2x1, so the smallest layout is one host of four chips.
  Names like ``v5litepod-4`` are rejected (they must match ``chip[:=_]bounds``).
* The environment variables ``TPU_ACCELERATOR_TYPE=v5litepod-4``,
  ``TPU_WORKER_HOSTNAMES=localhost``, ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` let libtpu start on a host
  without a TPU; ``JAX_PLATFORMS=cpu`` keeps working for everything else in the process.
  :func:`ensure_env` sets them (with ``setdefault``) before the first topology is made.
* Compiling: give every argument a ``jax.sharding.SingleDeviceSharding`` on one compile-only
  device of the topology (enough for single-chip kernels), then ``jax.jit(fn).lower(...).compile()``.
  The returned ``jax.stages.Compiled`` has ``cost_analysis()`` (flops, bytes accessed; for a
  Pallas kernel these are the numbers given in its ``pl.CostEstimate``) and
  ``memory_analysis()`` (``temp_size_in_bytes`` etc.).  Mosaic lowering errors and VMEM
  overflows raise at ``compile()``.
* Executing is impossible (no TPU): use the compiled object for its analyses only.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import jax

# Short names -> topology names accepted by get_topology_desc (one host, four chips each).
TOPOLOGIES = {
    "v5e": "v5e:2x2",
    "v5p": "v5p:2x2x1",
    "v6e": "v6e:2x2",
}

_ENV_DEFAULTS = {
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def libtpu_available() -> bool:
    """True when the ``libtpu`` package (needed for TPU AOT compilation) is installed."""
    return importlib.util.find_spec("libtpu") is not None


def ensure_env() -> None:
    """Set the environment libtpu needs to start without a TPU (existing values are kept)."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _resolve(topology: str) -> str:
    if not isinstance(topology, str) or not topology:
        raise ValueError(f"topology must be a non-empty string, got {topology!r}")
    return TOPOLOGIES.get(topology, topology)


@functools.lru_cache(maxsize=None)
def topology_devices(topology: str = "v5e:2x2") -> tuple:
    """The compile-only devices of ``topology`` (a key of TOPOLOGIES or a full name)."""
    if not libtpu_available():
        raise RuntimeError("TPU ahead-of-time compilation needs the 'libtpu' package (pip install libtpu)")
    ensure_env()
    from jax.experimental import topologies

    name = _resolve(topology)
    try:
        desc = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as err:  # libtpu raises JaxRuntimeError with its own message
        raise ValueError(
            f"topology={topology!r} ({name!r}) is not a TPU topology libtpu can build: {err}") from err
    return tuple(desc.devices)


def chip_kind(topology: str = "v5e:2x2") -> str:
    """``device_kind`` of the topology's chips, e.g. ``"TPU v5 lite"``."""
    return topology_devices(topology)[0].device_kind


def _with_sharding(spec, sharding):
    if isinstance(spec, jax.ShapeDtypeStruct):
        if spec.sharding is not None:
            return spec
        return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)
    return spec


def compile_for_topology(fn, *args_specs, topology: str = "v5e:2x2", **jit_kwargs) -> jax.stages.Compiled:
    """Compile ``fn`` ahead of time for one chip of a TPU ``topology``.

    ``args_specs`` are pytrees of ``jax.ShapeDtypeStruct`` (leaves without a sharding are placed
    on the topology's first device; other leaves, e.g. Python floats for static arguments, are
    passed through).  ``jit_kwargs`` go to ``jax.jit`` (``static_argnums``, ``static_argnames``,
    ...).  Returns the ``jax.stages.Compiled``; lowering/Mosaic/VMEM errors propagate.
    """
    device = topology_devices(topology)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    placed = jax.tree_util.tree_map(
        lambda s: _with_sharding(s, sharding), args_specs,
        is_leaf=lambda s: isinstance(s, jax.ShapeDtypeStruct))
    return jax.jit(fn, **jit_kwargs).lower(*placed).compile()


def cost_flops(compiled: jax.stages.Compiled) -> float:
    """Total flops from ``compiled.cost_analysis()`` (handles the list-or-dict return forms)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        return float(sum(a.get("flops", 0.0) for a in analysis if a))
    return float((analysis or {}).get("flops", 0.0))
