"""The parts of salt import / export hf that need no transformers: the safetensors reader and writer
(bfloat16 included), config.json <-> ModelConfig and its refusals, and the export family choice.
(tests/test_interop_hf.py checks the whole path against transformers itself.)"""
import json
import math

import ml_dtypes
import numpy as np
import pytest

from salt.reference.config import get_preset
from salt.runtime.interop import hf_config, safetensors_io
from salt.runtime.interop.hf_config import UnsupportedModel

LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
         "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0}


def test_safetensors_round_trip_every_float_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"b": rng.standard_normal((3, 4)).astype(np.float32),
               "a": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
               "c": rng.standard_normal((2, 2, 2)).astype(np.float16), "d": np.arange(4, dtype=np.int64)}
    path = tmp_path / "x.safetensors"
    safetensors_io.write(path, tensors, metadata={"format": "pt"})
    header, start = safetensors_io.read_header(path)
    assert start % 8 == 0 and set(header) == set(tensors)
    assert header["a"]["dtype"] == "BF16" and header["c"]["dtype"] == "F16"
    back = safetensors_io.read(path)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].tobytes() == value.tobytes(), name


def test_safetensors_read_by_the_reference_library(tmp_path):
    """The writer's files are what the safetensors package reads (float32 / float16: its NumPy API
    has no bfloat16)."""
    st = pytest.importorskip("safetensors.numpy")
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "h": np.ones(3, np.float16)}
    safetensors_io.write(tmp_path / "x.safetensors", tensors)
    back = st.load_file(str(tmp_path / "x.safetensors"))
    assert all(np.array_equal(back[k], v) for k, v in tensors.items())
    st.save_file(tensors, str(tmp_path / "y.safetensors"))
    assert all(np.array_equal(safetensors_io.read(tmp_path / "y.safetensors")[k], v) for k, v in tensors.items())


def test_truncated_or_garbled_safetensors_name_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors_io.write(path, {"w": np.zeros((64, 64), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(safetensors_io.SafetensorsError, match=r"x\.safetensors: tensor 'w'.*truncated"):
        safetensors_io.read_header(path)
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(safetensors_io.SafetensorsError, match="unreadable safetensors header"):
        safetensors_io.read_header(path)


def test_llama_config_maps_every_field():
    c = hf_config.to_salt(dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192},
                               rope_theta=500000.0), "x")
    assert (c.vocab_size, c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads) == (64, 2, 16, 32, 2, 1)
    assert c.activation == "silu" and not c.tied_head and c.embed_scale == 1.0 and c.norm_offset == 0.0
    assert c.norm_eps == 1e-5 and c.rope_base == 500000.0 and c.rope_scaling == "llama3" and c.rope_factor == 8.0
    assert c.attn_head_dim is None and c.head_dim == 8
    # transformers 5 writes rope_parameters instead
    c5 = hf_config.to_salt(dict(LLAMA, rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}), "x")
    assert c5.rope_scaling == "linear" and c5.rope_factor == 2.0 and c5.rope_base == 1e6
    gemma = {k: v for k, v in LLAMA.items() if k != "tie_word_embeddings"}  # Gemma ties by default
    g = hf_config.to_salt(dict(gemma, model_type="gemma", head_dim=32, hidden_act="gelu"), "g")
    assert g.activation == "gelu_tanh" and g.tied_head and g.embed_scale is None and g.norm_offset == 1.0
    assert g.head_dim == 32
    assert hf_config.to_salt(dict(LLAMA, model_type="qwen2"), "q").qkv_bias
    assert hf_config.to_salt(dict(LLAMA, model_type="qwen3"), "q").qk_norm


@pytest.mark.parametrize("change, field", [
    (dict(model_type="mixtral"), "model_type"),
    (dict(model_type="mistral"), "sliding_window"),           # transformers' default is a 4096 window
    (dict(model_type="mistral", sliding_window=4096), "sliding_window"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(hidden_size=14), "head_dim=7 must be even"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
])
def test_unsupported_configs_name_the_field(change, field):
    with pytest.raises(UnsupportedModel, match=f"config.json: .*{field}"):
        hf_config.to_salt(dict(LLAMA, **change), "x")


def test_family_of_and_back():
    salt = get_preset("tiny-student")
    assert hf_config.family_of(salt) == "gemma"
    llama = hf_config.to_salt(LLAMA, "x")
    assert hf_config.family_of(llama) == "llama" and hf_config.family_of(llama, "mistral") == "mistral"
    assert hf_config.family_of(llama.replace(qkv_bias=True)) == "qwen2"
    assert hf_config.family_of(llama.replace(qk_norm=True)) == "qwen3"
    with pytest.raises(UnsupportedModel, match="no Hugging Face family"):
        hf_config.family_of(llama.replace(activation="gelu_tanh"))
    for model_type in ("llama", "qwen2"):
        c = llama.replace(qkv_bias=model_type == "qwen2")
        hf = hf_config.from_salt(c, model_type, special_ids={"bos": 1, "eos": 2, "pad": None})
        assert hf_config.to_salt(json.loads(json.dumps(hf)), c.name) == c
    g = hf_config.from_salt(salt, "gemma", special_ids={"bos": 2, "eos": 3, "pad": 0})
    back = hf_config.to_salt(g, salt.name)
    assert back.replace(norm_offset=0.0) == salt and back.norm_offset == 1.0
    assert math.isclose(g["rope_parameters"]["rope_theta"], salt.rope_base) and g["eos_token_id"] == 3


def test_hf_special_ids_from_config_or_names():
    tokenizers = pytest.importorskip("tokenizers")
    from salt.data.tokenizer import hf_special_ids
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.add_special_tokens(["<|endoftext|>", "<s>", "<pad>"])
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<s>", "<pad>")}
    assert hf_special_ids(tok, None, "t") == {"eos": ids["<|endoftext|>"], "bos": ids["<s>"],
                                              "pad": ids["<pad>"], "unk": None}
    # the config decides what it names (null: none); unnamed keys fall back to the usual names
    got = hf_special_ids(tok, {"eos_token": {"content": "<s>"}, "bos_token": None}, "t")
    assert got == {"eos": ids["<s>"], "bos": None, "pad": ids["<pad>"], "unk": None}
    with pytest.raises(ValueError, match="names eos_token '</s>', which is not in its vocabulary"):
        hf_special_ids(tok, {"eos_token": "</s>"}, "t")
    with pytest.raises(ValueError, match="no eos token"):
        hf_special_ids(tok, {"eos_token": None}, "t")
