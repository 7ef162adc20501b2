"""Hugging Face ``config.json`` <-> :class:`salt.reference.config.ModelConfig` (docs/interop.md).

Supported ``model_type``: :data:`FAMILIES`.  Every field that changes the function of a model is
either mapped or checked; a model that uses something SALT's architecture lacks (a sliding
window, biases beyond q/k/v, an unknown RoPE scaling, an unknown activation, ...) is refused with
:class:`UnsupportedModel`, naming the field and what is supported.
"""
from __future__ import annotations

from salt.reference.config import ModelConfig

# model_type -> (architecture class, q/k/v biases, q/k norms, default tie_word_embeddings)
FAMILIES = {
    "llama": ("LlamaForCausalLM", False, False, False),     # Llama 2 / 3.x, SmolLM / SmolLM2
    "mistral": ("MistralForCausalLM", False, False, False),  # without a sliding window
    "qwen2": ("Qwen2ForCausalLM", True, False, False),      # Qwen2 / Qwen2.5
    "qwen3": ("Qwen3ForCausalLM", False, True, False),      # dense Qwen3
    "gemma": ("GemmaForCausalLM", False, False, True),      # Gemma 1
}
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_ROPE_THETA = 10000.0


class UnsupportedModel(ValueError):
    """A config.json SALT cannot represent exactly (the message names the field)."""


def _unsupported(field: str, value, supported: str) -> UnsupportedModel:
    return UnsupportedModel(f"config.json: {field}={value!r} is not supported; supported: {supported}")


def _int(hf: dict, key: str, default=None) -> int:
    value = hf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UnsupportedModel(f"config.json: {key}={value!r} must be a positive integer")
    return value


def _rope(hf: dict) -> dict:
    """ModelConfig's RoPE fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (earlier releases)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise UnsupportedModel(f"config.json: rope_parameters={params!r} must be an object")
    theta = params.get("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _unsupported("rope_type", rope_type, ", ".join(ROPE_TYPES))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported("partial_rotary_factor", params.get("partial_rotary_factor",
                                                               hf.get("partial_rotary_factor")), "1.0")
    out = {"rope_base": float(theta)}
    if rope_type == "linear":
        out.update(rope_scaling="linear", rope_factor=float(params["factor"]))
    elif rope_type == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_len=int(params["original_max_position_embeddings"]))
    return out


def to_salt(hf: dict, name: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face ``config.json`` dict (raises :class:`UnsupportedModel`)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise _unsupported("model_type", model_type, ", ".join(sorted(FAMILIES)))
    _, qkv_bias, qk_norm, tie_default = FAMILIES[model_type]
    act_key = "hidden_act"
    if model_type == "gemma":  # transformers reads Gemma's legacy "gelu" as the tanh approximation
        act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
        act = "gelu_pytorch_tanh" if act == "gelu" else act
        act_key = "hidden_activation" if hf.get("hidden_activation") else act_key
    else:
        act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise _unsupported(act_key, act, ", ".join(ACTIVATIONS))
    for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if hf.get(key):
            raise _unsupported(key, hf[key], "false")
    if model_type == "mistral" and hf.get("sliding_window", 4096) is not None:
        # transformers' default for a missing key is a 4096-token window
        raise _unsupported("sliding_window", hf.get("sliding_window", "absent (4096)"), "null (no window)")
    if hf.get("use_sliding_window"):
        raise _unsupported("use_sliding_window", hf["use_sliding_window"], "false")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise _unsupported("layer_types", sorted(set(layer_types)), "full_attention only")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise _unsupported("pretraining_tp", hf["pretraining_tp"], "1")
    d_model, n_heads = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
    head_dim = _int(hf, "head_dim") if hf.get("head_dim") is not None else d_model // n_heads  # transformers' rule
    head_dim = None if head_dim * n_heads == d_model else head_dim
    tied = hf.get("tie_word_embeddings", tie_default)
    try:
        return ModelConfig(
            name=name, vocab_size=_int(hf, "vocab_size"), n_layers=_int(hf, "num_hidden_layers"),
            d_model=d_model, d_ff=_int(hf, "intermediate_size"), n_heads=n_heads,
            n_kv_heads=_int(hf, "num_key_value_heads", n_heads),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), activation=ACTIVATIONS[act], tied_head=bool(tied),
            embed_scale=None if model_type == "gemma" else 1.0,
            norm_offset=1.0 if model_type == "gemma" else 0.0, attn_head_dim=head_dim,
            qkv_bias=qkv_bias, qk_norm=qk_norm, **_rope(hf))
    except (KeyError, TypeError) as e:
        raise UnsupportedModel(f"config.json: a RoPE scaling field is missing or malformed ({e!r})") from None
    except ValueError as e:
        raise UnsupportedModel(f"config.json: {e}") from None


def family_of(config: ModelConfig, model_type: str | None = None) -> str:
    """The Hugging Face ``model_type`` that represents ``config`` exactly (``model_type``: the one
    an imported run came from, kept when it fits).  SALT's own architecture (tanh-GELU gated MLP,
    sqrt(d) embedding scale, tied head) is Gemma's: its ``w`` norms export as Gemma's ``1 + w``."""
    c = config
    no_extras = not c.qkv_bias and not c.qk_norm
    if c.activation == "gelu_tanh" and c.embed_scale is None and c.tied_head and no_extras \
            and c.rope_scaling == "none":
        return "gemma"
    if c.activation == "silu" and c.embed_scale == 1.0 and c.norm_offset == 0.0:
        wanted = "qwen3" if c.qk_norm and not c.qkv_bias else "qwen2" if c.qkv_bias and not c.qk_norm else \
            "llama" if no_extras else None
        if wanted is not None:
            if wanted == "llama" and model_type == "mistral":
                return "mistral"
            return wanted
    raise UnsupportedModel(
        f"model {c.name!r}: no Hugging Face family has this architecture (activation={c.activation}, "
        f"embed_scale={c.embed_scale}, norm_offset={c.norm_offset}, tied_head={c.tied_head}, "
        f"qkv_bias={c.qkv_bias}, qk_norm={c.qk_norm}, rope_scaling={c.rope_scaling}); exportable: "
        "Gemma (SALT's own architecture), Llama / Mistral, Qwen2, Qwen3")


def from_salt(config: ModelConfig, model_type: str, *, special_ids: dict, base: dict | None = None,
              dtype: str = "float32", max_len: int | None = None) -> dict:
    """The ``config.json`` dict of ``config`` as ``model_type`` (from :func:`family_of`).

    ``base``: the config.json an imported run came from; its other fields (token ids, maximum
    length, ...) are kept.  ``special_ids``: bos / eos / pad ids of the tokenizer (None: unset)."""
    c = config
    hf = dict(base or {})
    for key in ("rope_scaling", "rope_theta", "rope_parameters", "torch_dtype", "dtype", "hidden_activation",
                "transformers_version"):
        hf.pop(key, None)
    hf.update(
        architectures=[FAMILIES[model_type][0]], model_type=model_type, vocab_size=c.vocab_size,
        hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        hidden_act={"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[c.activation],
        rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tied_head, attention_bias=False,
        rope_theta=c.rope_base, torch_dtype=dtype)
    if model_type == "gemma":
        hf["hidden_activation"] = hf["hidden_act"]
    if model_type == "mistral":
        hf["sliding_window"] = None
    if model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    rope = {"rope_type": "default", "rope_theta": c.rope_base}
    if c.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=c.rope_factor)
    elif c.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                    high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_len)
    hf["rope_scaling"] = None if c.rope_scaling == "none" else {k: v for k, v in rope.items() if k != "rope_theta"}
    hf["rope_parameters"] = rope
    for key in ("bos", "eos", "pad"):
        if base is None or f"{key}_token_id" not in hf:
            hf[f"{key}_token_id"] = special_ids.get(key)
    if max_len is not None and "max_position_embeddings" not in hf:
        hf["max_position_embeddings"] = int(max_len)
    return hf
