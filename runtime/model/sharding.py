"""Device mesh and partition rules.

The mesh has two axes, ``("data", "model")``.  Parameter rules (the last two dims of each
matrix; the stacked layer axis is never sharded):

* FSDP over ``data``: the ``d_model`` dim of every matrix (and the embedding's ``d_model``).
* tensor parallel over ``model``: attention heads (``wq``/``wo`` head dims, ``wk``/``wv`` when
  the number of kv heads divides evenly), the feed-forward dim ``d_ff``, and the vocabulary
  of the embedding.
* norm scales are replicated.

A dim is sharded over an axis only when the axis size divides it; otherwise it is
replicated along that axis (GSPMD keeps the computation correct either way).  Batches are
sharded over ``data`` along the batch dim.
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from salt.reference.config import ModelConfig, param_shapes

AXES = ("data", "model")


def parse_mesh(spec: str) -> dict:
    """``"data=D,model=M"`` -> ``{"data": D, "model": M}`` (either may be omitted: size 1;
    ``data=-1`` means "all remaining devices")."""
    sizes = {"data": 1, "model": 1}
    if spec is None or not str(spec).strip():
        return sizes
    seen = set()
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(data|model)\s*=\s*(-1|[0-9]+)\s*", part)
        if not m:
            raise ValueError(f"mesh must look like 'data=D,model=M', got {spec!r} (bad part {part!r})")
        name, size = m.group(1), int(m.group(2))
        if name in seen:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        if size == 0:
            raise ValueError(f"mesh axis {name} must have size >= 1, got 0 in {spec!r}")
        seen.add(name)
        sizes[name] = size
    return sizes


def make_mesh(spec: str = "data=1,model=1", devices=None) -> Mesh:
    """A ``Mesh`` over the first ``data*model`` devices (all devices when data=-1)."""
    sizes = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    if sizes["data"] == -1:
        if len(devices) % sizes["model"]:
            raise ValueError(f"mesh {spec!r}: model={sizes['model']} does not divide the "
                             f"{len(devices)} devices")
        sizes["data"] = len(devices) // sizes["model"]
    if sizes["model"] == -1:
        raise ValueError(f"mesh {spec!r}: only the data axis may be -1")
    n = sizes["data"] * sizes["model"]
    if n > len(devices):
        raise ValueError(f"mesh {spec!r} needs {n} devices but only {len(devices)} are available")
    grid = np.array(devices[:n]).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, AXES)


def _axis(mesh: Mesh, axis: str, dim: int):
    return axis if mesh.shape[axis] > 1 and dim % mesh.shape[axis] == 0 else None


def param_specs(config: ModelConfig, mesh: Mesh) -> dict:
    """PartitionSpec for every parameter (same tree as ``param_shapes``)."""
    shapes = param_shapes(config)
    D, F, V = config.d_model, config.d_ff, config.vocab_size
    G, H = config.n_kv_heads, config.n_heads
    data_d = _axis(mesh, "data", D)
    heads = _axis(mesh, "model", H)
    kv_heads = _axis(mesh, "model", G)
    ffn = _axis(mesh, "model", F)
    layers = {
        "attn_norm": P(None, None),
        "mlp_norm": P(None, None),
        "wq": P(None, data_d, heads),
        "wk": P(None, data_d, kv_heads),
        "wv": P(None, data_d, kv_heads),
        "wo": P(None, heads, data_d),
        "w_gate": P(None, data_d, ffn),
        "w_up": P(None, data_d, ffn),
        "w_down": P(None, ffn, data_d),
    }
    if config.qkv_bias:  # biases and q/k norm scales are small: replicated
        layers.update(bq=P(None, None), bk=P(None, None), bv=P(None, None))
    if config.qk_norm:
        layers.update(q_norm=P(None, None), k_norm=P(None, None))
    assert set(layers) == set(shapes["layers"])
    specs = {"embed": P(_axis(mesh, "model", V), data_d), "layers": layers, "final_norm": P(None)}
    if "lm_head" in shapes:
        specs["lm_head"] = specs["embed"]
    return specs


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Per-window arrays (windows ``[B, T+1]``, masks ``[B, T]``, prefix lengths ``[B]``): batch
    over ``data``."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_params(params: dict, config: ModelConfig, mesh: Mesh) -> dict:
    """Place host or device params onto the mesh following the partition rules."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, param_shardings(config, mesh))


def global_batch_array(local_windows, mesh: Mesh, global_batch: int):
    """This process's rows ``[local_B, T+1]`` -> the global sharded array ``[B, T+1]``."""
    local = np.asarray(local_windows)
    shape = (global_batch,) + local.shape[1:]
    if jax.process_count() == 1:
        if local.shape[0] != global_batch:
            raise ValueError(f"batch has {local.shape[0]} rows, expected {global_batch}")
        return jax.device_put(local, batch_sharding(mesh, local.ndim))
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local, shape)


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when the environment asks for multi-host
    (``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or a
    cluster environment JAX detects itself when ``SALT_DISTRIBUTED=1``)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"]}
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kwargs)
        return True
    if os.environ.get("SALT_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False
