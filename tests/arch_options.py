"""Model configs with the architecture options of reference/config.py (shared by the reference
and runtime model tests)."""
import numpy as np

from salt.reference.config import flatten_params, get_preset, unflatten_params
from salt.reference.model import init_params

# Architecture options (reference/config.py): one config per family of options, each checked by
# the same finite differences as SALT's own architecture.
OPTION_CONFIGS = {
    # Llama 3.x: SiLU, separate head, no embedding multiplier, llama3 RoPE scaling (the tiny head
    # dimension and original length put one frequency in each of its three bands), Qwen2's biases
    "llama-qwen2": get_preset("tiny-student").replace(
        name="tiny-llama", activation="silu", tied_head=False, embed_scale=1.0, qkv_bias=True,
        rope_base=500000.0, rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_len=64, vocab_size=41),
    # Gemma 1: 1 + w norms, a head dimension independent of d_model / n_heads
    "gemma": get_preset("tiny-teacher").replace(name="tiny-gemma", norm_offset=1.0, attn_head_dim=6,
                                                n_heads=4, n_kv_heads=1, vocab_size=39),
    # Qwen3: q/k norms; linear RoPE scaling
    "qwen3": get_preset("tiny-student").replace(name="tiny-qwen3", activation="silu", qk_norm=True,
                                                rope_scaling="linear", rope_factor=2.0, vocab_size=33),
}


def perturbed_params(config, seed):
    """Initial parameters with every norm scale and bias moved off its initial value (so that
    ``1 + w``, biases and q/k norms all matter in the checks)."""
    params = init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    flat = flatten_params(params)
    for name, value in flat.items():
        leaf = name.split("/")[-1]
        if leaf.endswith("norm") or leaf in ("bq", "bk", "bv"):
            flat[name] = value + 0.3 * rng.standard_normal(value.shape)
    return unflatten_params(flat)
