"""Mesh parsing, partition rules, and the sharded trainer on 8 fake CPU devices: the losses of
5 steps equal the 1-device run within 1e-5 (student and teacher sharded)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from salt.reference.config import get_preset
from salt.runtime.model import transformer as model, sharding
from salt.runtime.train.trainer import TrainConfig, train
from tiny_corpus import make_tiny_corpus


def test_parse_mesh():
    assert sharding.parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    assert sharding.parse_mesh("model=2") == {"data": 1, "model": 2}
    assert sharding.parse_mesh(" data = 8 ") == {"data": 8, "model": 1}
    for bad in ["data=two", "data=4,data=2", "pipe=2", "data=0", "data=4;model=2"]:
        with pytest.raises(ValueError, match="mesh"):
            sharding.parse_mesh(bad)


def test_make_mesh_sizes_and_errors():
    assert jax.device_count() == 8  # tests/conftest.py
    mesh = sharding.make_mesh("data=4,model=2")
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (4, 2)
    assert sharding.make_mesh("data=-1,model=2").devices.shape == (4, 2)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh("data=8,model=2")
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh("data=-1,model=3")


def test_partition_rules():
    mesh = sharding.make_mesh("data=4,model=2")
    specs = sharding.param_specs(get_preset("paper-2.8b"), mesh)
    assert specs["embed"] == P("model", "data")            # vocab over model, d_model FSDP
    assert specs["layers"]["wq"] == P(None, "data", "model")  # heads tensor-parallel
    assert specs["layers"]["wk"] == P(None, "data", None)     # 1 kv head: not split
    assert specs["layers"]["wo"] == P(None, "model", "data")
    assert specs["layers"]["w_gate"] == P(None, "data", "model")
    assert specs["layers"]["w_down"] == P(None, "model", "data")
    assert specs["layers"]["attn_norm"] == P(None, None) and specs["final_norm"] == P(None)
    # a dim the axis does not divide is replicated along it
    odd = get_preset("tiny-student").replace(vocab_size=301)
    assert sharding.param_specs(odd, mesh)["embed"] == P(None, "data")
    # one device: nothing sharded
    one = sharding.param_specs(get_preset("paper-2.8b"), sharding.make_mesh("data=1,model=1"))
    assert all(all(a is None for a in s) for s in jax.tree.leaves(
        one, is_leaf=lambda x: isinstance(x, P)))


def test_params_are_placed_per_rules():
    config = get_preset("tiny-student")
    mesh = sharding.make_mesh("data=4,model=2")
    params = sharding.shard_params(model.init_params(config, 0), config, mesh)
    embed = params["embed"]
    assert embed.sharding.spec == P("model", "data")
    assert {s.data.shape for s in embed.addressable_shards} == {(32, 4)}  # 64/2 x 16/4
    windows = sharding.global_batch_array(np.zeros((8, 5), np.int32), mesh, 8)
    assert windows.sharding.spec == P("data", None)
    assert {s.data.shape for s in windows.addressable_shards} == {(2, 5)}
    with pytest.raises(ValueError, match="expected 8"):
        sharding.global_batch_array(np.zeros((6, 5), np.int32), mesh, 8)


@pytest.mark.slow
def test_init_on_devices_is_sharded_and_independent_of_the_mesh():
    """The trainer's initialisation: one jitted program whose outputs land sharded (no host
    copy of the model), with the same values on any mesh."""
    config = get_preset("tiny-student").replace(vocab_size=300)
    plain = model.init_params_jax(config, 3)
    for spec in ("data=4,model=2", "data=8"):
        mesh = sharding.make_mesh(spec)
        want = sharding.param_shardings(config, mesh)
        placed = model.init_params_jax(config, 3, out_shardings=want)
        for a, b, s in zip(jax.tree.leaves(placed), jax.tree.leaves(plain), jax.tree.leaves(want)):
            assert a.sharding == s
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_trainer_initialises_on_the_devices(tiny, monkeypatch):
    """The trainer never builds the parameters on the host (the NumPy init is not called)."""
    def host_init(*args, **kwargs):
        raise AssertionError("the trainer built the parameters on the host")
    monkeypatch.setattr(model, "init_params", host_init)
    monkeypatch.setattr("salt.reference.model.init_params", host_init)
    out = tiny / "device_init"
    train(TrainConfig(preset="tiny-student", data=str(tiny / "data"), out=str(out), steps=1, batch=8,
                      seq_len=16, optimizer="adamw", mesh="data=4,model=2"), progress=False)
    assert (out / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.tpu_aot
def test_paper_86b_init_compiles_sharded_for_a_tpu_pod():
    """paper-8.6b in float32 (34 GB) initialised on a 16-chip v5p mesh: each chip's outputs
    are its 1/16 share and the program needs no whole-model buffer."""
    from jax.sharding import Mesh
    from salt.kernels import tpu_aot
    from salt.reference.config import param_count
    if not tpu_aot.libtpu_available():
        pytest.skip("libtpu is not installed")
    config = get_preset("paper-8.6b")
    mesh = Mesh(np.array(tpu_aot.topology_devices("v5p:2x2x4")).reshape(16, 1), ("data", "model"))
    fn = jax.jit(lambda seed: model._init_params_jax(config, seed),
                 out_shardings=sharding.param_shardings(config, mesh))
    mem = fn.lower(jax.ShapeDtypeStruct((), jnp.uint32)).compile().memory_analysis()
    whole = 4 * param_count(config)
    assert whole > 34e9
    assert mem.output_size_in_bytes <= 1.01 * whole / 16
    assert mem.temp_size_in_bytes < 0.25 * whole / 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from salt.data import prepare
    root = tmp_path_factory.mktemp("shard")
    src = make_tiny_corpus(root / "src", n_docs=20, words=200, seed=1)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    # vocabulary 300: the embedding's vocab dim splits over model=2; d_model=16 over data=4
    train(TrainConfig(preset="tiny-teacher", data=str(root / "data"), out=str(root / "teacher"),
                      steps=2, batch=8, seq_len=16, optimizer="adamw", lr=1e-2), progress=False)
    return root


@pytest.mark.slow
def test_eight_device_losses_equal_one_device(tiny):
    """RKD (every step a KD step: the teacher forward sharded too), Adafactor, 5 steps."""
    rows = {}
    # the 8-device run also routes attention and the KD loss through salt.kernels (their
    # pure-JAX paths), which run under shard_map on a mesh (as the Pallas kernels must)
    for mesh, kernels in (("data=1,model=1", "naive"), ("data=4,model=2", "xla")):
        out = tiny / mesh.replace(",", "_").replace("=", "")
        train(TrainConfig(preset="tiny-student", data=str(tiny / "data"), out=str(out),
                          teacher=str(tiny / "teacher"), kd_steps=5, steps=5, batch=8, seq_len=16,
                          optimizer="adafactor", lr=1e-2, mesh=mesh, kernels=kernels),
              progress=False)
        rows[mesh] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    one, eight = rows["data=1,model=1"], rows["data=4,model=2"]
    assert len(one) == len(eight) == 5
    for a, b in zip(one, eight):
        for key in ("loss", "ce", "kd", "kl"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    assert one[-1]["loss"] != one[0]["loss"]  # it trained


@pytest.mark.slow
@pytest.mark.tpu_aot
def test_sharded_kd_step_with_pallas_kernels_compiles_for_tpu():
    """The KD train step with the Pallas kernels (under shard_map: GSPMD cannot partition a
    Mosaic kernel) compiles ahead of time for a 4-chip TPU v5p mesh data=2, model=2."""
    from jax.sharding import Mesh
    from salt.kernels import tpu_aot
    from salt.runtime.train import step as train_mod
    if not tpu_aot.libtpu_available():
        pytest.skip("libtpu is not installed")
    tpu_aot.ensure_env()
    mesh = Mesh(np.array(tpu_aot.topology_devices("v5p:2x2x1")).reshape(2, 2), ("data", "model"))
    student = get_preset("tiny-student").replace(n_heads=4, d_model=32)
    teacher = get_preset("tiny-teacher")

    def abstract(c):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            model.abstract_params(c), sharding.param_shardings(c, mesh))

    params, t_params = abstract(student), abstract(teacher)
    opt = train_mod.opt_state_abstract("adafactor", params, mesh)
    windows = jax.ShapeDtypeStruct((8, 129), np.int32, sharding=sharding.batch_sharding(mesh))
    fn = train_mod.make_step_fn(student, teacher, "adafactor", dtype="bfloat16", kernels="pallas",
                                remat=True, mesh=mesh)
    compiled = train_mod.compile_step(fn, params, opt, t_params, windows, mesh=mesh)
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the Mosaic kernels are in the program
    assert compiled.memory_analysis().temp_size_in_bytes > 0
