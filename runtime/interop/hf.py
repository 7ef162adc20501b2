"""``salt import hf`` and ``salt export hf``: Hugging Face checkpoints <-> SALT runs (docs/interop.md).

Import reads a local model directory (``config.json``, ``model.safetensors`` or the shards named by
``model.safetensors.index.json``, in float32, float16 or bfloat16, and ``tokenizer.json``), checks
everything first (the config through :mod:`salt.runtime.interop.hf_config`, every tensor's name,
dtype and shape, the tokenizer against the vocabulary), and only then writes a SALT run with one
checkpoint (step 0, float32 parameters) through :mod:`salt.runtime.model.checkpoint`: the run a
teacher, ``salt score``, ``salt eval`` and ``salt teacher cache`` read.  Its metadata pins the
tokenizer's sha256 (so a store prepared with the same ``tokenizer.json`` matches it) and keeps the
source ``config.json``.

Export writes ``config.json``, ``model.safetensors`` and the tokenizer files that
``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load, plus ``salt_export.json`` (the
provenance, and the marker of the output safety rule).  Tensors go back in the dtype they were
imported in (float32 for SALT's own runs; ``dtype`` overrides), so import then export is bit-exact.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np

from salt.core import outputs
from salt.data import store as store_format
from salt.data.tokenizer import (HF_CONFIG_FILE, HF_TOKENIZER_FILE, HFTokenizer, is_hf_tokenizer, load_tokenizer,
                                 read_hf_tokenizer, sha256_bytes, sentencepiece_to_hf_json)
from salt.reference.config import ModelConfig, flatten_params, param_shapes, unflatten_params
from salt.runtime.interop import hf_config, safetensors_io
from salt.runtime.interop.hf_config import UnsupportedModel
from salt.runtime.model import checkpoint

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPORT_MARKER = "salt_export.json"
EXPORT_FORMAT = "salt-hf-export-v1"
# SALT name (per layer) <- Hugging Face name under model.layers.{l}., and whether it is transposed
# (torch's Linear keeps [out, in]; SALT's dense layers are [in, out])
LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
TOP_TENSORS = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
NORMS = ("attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm")
# tensors some checkpoints carry that the model recomputes
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": np.dtype(jnp.bfloat16)}


class InteropError(ValueError):
    """Bad input to import / export (the message names the file, tensor or field)."""


def tensor_map(config: ModelConfig) -> dict:
    """``{hf_name: (salt flat name, layer or None, transposed)}`` for every parameter of ``config``."""
    shapes = param_shapes(config)
    out = {hf: (name, None, False) for name, hf in TOP_TENSORS.items() if name in shapes}
    for name in shapes["layers"]:
        hf, transposed = LAYER_TENSORS[name]
        for l in range(config.n_layers):
            out[f"model.layers.{l}.{hf}"] = (f"layers/{name}", l, transposed)
    return out


def _expected_shape(config: ModelConfig, name: str, layer, transposed: bool) -> tuple:
    shapes = param_shapes(config)
    shape = shapes["layers"][name.split("/")[1]][1:] if layer is not None else shapes[name]
    return tuple(reversed(shape)) if transposed else tuple(shape)


# ----------------------------------------------------------------------------- import

def _read_json(path: pathlib.Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InteropError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InteropError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InteropError(f"{path}: not a JSON object")
    return obj


def _weight_files(src: pathlib.Path) -> dict:
    """``{tensor name: safetensors file}`` of a checkpoint directory (single file or sharded)."""
    index = src / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InteropError(f"{index}: no weight_map")
        files = {name: src / str(f) for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise InteropError(f"{index} names the shard {f.name}, which is missing from {src}")
    elif (src / WEIGHTS_FILE).is_file():
        files = None
    else:
        other = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
        hint = f" (found {', '.join(other[:3])}: only safetensors are read, no pickle)" if other else ""
        raise InteropError(f"{src}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")
    out = {}
    for f in sorted({src / WEIGHTS_FILE} if files is None else set(files.values())):
        try:
            header, _ = safetensors_io.read_header(f)
        except (OSError, safetensors_io.SafetensorsError) as e:
            raise InteropError(str(e)) from None
        for name, entry in header.items():
            if files is not None and files.get(name) != f:
                raise InteropError(f"{f}: tensor {name!r} is not where {INDEX_FILE} says it is")
            out[name] = (f, entry)
    if files is not None:
        missing = sorted(set(files) - set(out))
        if missing:
            raise InteropError(f"{src / INDEX_FILE}: tensor {missing[0]!r} is not in its shard "
                               f"{files[missing[0]].name}")
    return out


def read_checkpoint(src) -> tuple[ModelConfig, dict, dict, dict]:
    """(ModelConfig, float32 params, the config.json dict, info) of a Hugging Face model directory,
    everything checked; raises :class:`InteropError` / :class:`UnsupportedModel` naming what is wrong."""
    src = pathlib.Path(src)
    if not src.is_dir():
        raise InteropError(f"{src}: not a directory (give the folder holding config.json and the weights)")
    hf = _read_json(src / CONFIG_FILE)
    config = hf_config.to_salt(hf, name=f"hf-{hf.get('model_type')}")
    found = _weight_files(src)
    wanted = tensor_map(config)
    tied_extra = config.tied_head and TOP_TENSORS["lm_head"] in found
    unexpected = sorted(n for n in found if n not in wanted and not n.endswith(IGNORED_SUFFIXES)
                        and not (tied_extra and n == TOP_TENSORS["lm_head"]))
    if unexpected:
        raise UnsupportedModel(f"{src}: tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) has no place in "
                               f"a {hf['model_type']} model as SALT reads it (supported: the dense decoder of "
                               f"docs/interop.md)")
    missing = sorted(n for n in wanted if n not in found)
    if missing:
        raise InteropError(f"{src}: tensor {missing[0]!r} is missing from the checkpoint")
    dtypes = set()
    for hf_name, (name, layer, transposed) in wanted.items():
        f, entry = found[hf_name]
        if entry["dtype"] not in FLOAT_DTYPES:
            raise InteropError(f"{f}: tensor {hf_name!r} has dtype {entry['dtype']}; supported: "
                               f"{', '.join(FLOAT_DTYPES)}")
        dtypes.add(FLOAT_DTYPES[entry["dtype"]])
        want = _expected_shape(config, name, layer, transposed)
        if tuple(entry["shape"]) != want:
            raise InteropError(f"{f}: tensor {hf_name!r} has shape {list(entry['shape'])}, config.json implies "
                               f"{list(want)}")
    flat = {name: np.empty(shape, np.float32) for name, shape in flatten_params(param_shapes(config)).items()}
    by_file: dict = {}
    for hf_name in wanted:
        by_file.setdefault(found[hf_name][0], []).append(hf_name)
    for f, names in sorted(by_file.items()):
        for hf_name, value in safetensors_io.read(f, names).items():
            name, layer, transposed = wanted[hf_name]
            value = value.astype(np.float32)
            if transposed:
                value = value.T
            if layer is None:
                flat[name][...] = value
            else:
                flat[name][layer] = value
    info = {"source": str(src.resolve()), "model_type": hf["model_type"], "dtype": "/".join(sorted(dtypes)),
            "files": sorted({f.name for f, _ in found.values()})}
    return config, unflatten_params(flat), hf, info


def import_hf(src, out, *, name: str | None = None) -> dict:
    """Import the Hugging Face model directory ``src`` as the SALT run ``out`` (created; absent or
    empty only).  Returns a summary.  Nothing is written unless every check passes."""
    src, out = pathlib.Path(src), pathlib.Path(out)
    outputs.check_output_dir(out, "run", mode="create", inputs=[src])
    config, params, hf, info = read_checkpoint(src)
    if name:
        config = config.replace(name=name)
    tok_bytes, special, _ = read_hf_tokenizer(src)
    tok = load_tokenizer(tok_bytes, special, name=str(src / HF_TOKENIZER_FILE))
    if tok.vocab_size() > config.vocab_size:
        raise InteropError(f"{src / HF_TOKENIZER_FILE}: the tokenizer has {tok.vocab_size()} ids, more than the "
                           f"model's vocab_size {config.vocab_size} (config.json)")
    tok_sha = sha256_bytes(tok_bytes)
    meta = {"config": config.to_dict(), "tokenizer_sha256": tok_sha, "vocab_size": config.vocab_size,
            "special_ids": special, "hf": dict(info, config=hf)}
    run_record = {"train": {}, "model": config.to_dict(), "imported": dict(info, tokenizer_sha256=tok_sha)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        outputs.write_json(tmp / "run_config.json", run_record)
        # an imported model has no optimizer state: a scalar placeholder (orbax refuses an empty item)
        checkpoint.save(tmp, 0, _as_jnp(params), {"imported": jnp.zeros((), jnp.int32)}, meta)
        outputs.check_output_dir(out, "run", mode="create", inputs=[src])  # may have appeared meanwhile
        outputs.move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"run": str(out), "step": 0, "model_type": info["model_type"], "dtype": info["dtype"],
            "config": config.to_dict(), "tokenizer_sha256": tok_sha, "tokenizer_vocab": tok.vocab_size()}


def _as_jnp(params: dict) -> dict:
    return {k: (_as_jnp(v) if isinstance(v, dict) else jnp.asarray(v)) for k, v in params.items()}


# ----------------------------------------------------------------------------- export

def hf_tensors(config: ModelConfig, params: dict, model_type: str, dtype) -> dict:
    """``{hf_name: array}`` in ``dtype`` of SALT ``params`` as ``model_type``.  A model with ``w``
    norms written as Gemma (``1 + w``) gets ``w - 1`` (exact for ``w`` in [0.5, 2])."""
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
    shift = 1.0 if model_type == "gemma" and config.norm_offset == 0.0 else 0.0
    out = {}
    for hf_name, (name, layer, transposed) in tensor_map(config).items():
        value = flat[name] if layer is None else flat[name][layer]
        if shift and name.split("/")[-1] in NORMS:
            value = value - np.float32(shift)
        out[hf_name] = np.ascontiguousarray(value.T if transposed else value).astype(dtype)
    return out


def _tokenizer_source(run_dir: pathlib.Path, meta: dict, tokenizer) -> tuple[pathlib.Path, str]:
    """(path, how found) of the tokenizer for an export: ``tokenizer`` if given, else the run's
    token store (run_config.json), else the directory an imported run came from."""
    if tokenizer is not None:
        return pathlib.Path(tokenizer), "--tokenizer"
    candidates = []
    try:
        record = json.loads((run_dir / "run_config.json").read_text(encoding="utf-8"))
        data = (record.get("train") or {}).get("data")
        if data:
            candidates.append((pathlib.Path(data), f"the run's data {data}"))
    except (OSError, ValueError, AttributeError):
        pass
    source = (meta.get("hf") or {}).get("source")
    if source:
        candidates.append((pathlib.Path(source), f"the imported model {source}"))
    for path, how in candidates:
        if path.is_dir():
            return path, how
    raise InteropError(f"run {run_dir}: cannot find its tokenizer (no token store or imported model directory "
                       "recorded, or they moved); pass --tokenizer PATH")


def _is_json_file(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return is_hf_tokenizer(f.read(64))


def _tokenizer_files(path: pathlib.Path, want_sha: str | None, where: str) -> tuple[dict, dict]:
    """({file name: bytes} for the export, special ids) from a token store, a model directory or a
    tokenizer file; its sha256 must be the run's."""
    extra = {}
    if path.is_dir() and (path / store_format.METADATA_FILE).is_file():  # a token store
        store = store_format.TokenStore(path)
        data, special = store.tokenizer_path.read_bytes(), store.special_ids
    elif path.is_dir() or _is_json_file(path):
        data, special, config = read_hf_tokenizer(path)
        folder = path if path.is_dir() else path.parent
        if config is not None:
            extra[HF_CONFIG_FILE] = (folder / HF_CONFIG_FILE).read_bytes()
            if (folder / "special_tokens_map.json").is_file():
                extra["special_tokens_map.json"] = (folder / "special_tokens_map.json").read_bytes()
    else:
        data = path.read_bytes()
        special = None
    if want_sha is not None and sha256_bytes(data) != want_sha:
        raise InteropError(f"tokenizer from {where} has sha256 {sha256_bytes(data)[:16]}..., the run was trained "
                           f"with {want_sha[:16]}...; pass the run's own tokenizer with --tokenizer")
    tok = load_tokenizer(data, special, name=where)
    special = tok.special_ids if isinstance(tok, HFTokenizer) else \
        {"bos": tok.bos_id(), "eos": tok.eos_id(), "pad": tok.pad_id(), "unk": tok.unk_id()}
    if not is_hf_tokenizer(data):  # SALT's SentencePiece model, as the tokenizer.json it equals
        data = sentencepiece_to_hf_json(data)
    files = {HF_TOKENIZER_FILE: data}
    files.update(extra)
    if HF_CONFIG_FILE not in files:
        vocab = tok.vocab_size()
        pieces = json.loads(data)
        id_to_token = {t["id"]: t["content"] for t in pieces.get("added_tokens", [])}
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
               "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
        for key, i in special.items():
            if i is not None and 0 <= i < vocab and i in id_to_token:
                cfg[f"{key}_token"] = id_to_token[i]
        files[HF_CONFIG_FILE] = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    return files, special


def export_hf(run, out, *, step: int | None = None, tokenizer=None, dtype: str | None = None,
              overwrite: bool = False) -> dict:
    """Export step ``step`` (default: the newest intact) of the SALT run ``run`` to the Hugging Face
    model directory ``out``.  Returns a summary."""
    out = pathlib.Path(out)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise InteropError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    inputs = [run] + ([tokenizer] if tokenizer is not None else [])
    outputs.check_output_dir(out, "hf_export", mode="replace" if overwrite else "create", inputs=inputs)
    config, params, meta = checkpoint.load_params(run, step)
    run_dir, step = checkpoint.resolve(run, meta["step"])
    imported = meta.get("hf") or {}  # the source of an imported run (a trained run has none)
    model_type = hf_config.family_of(config, imported.get("model_type"))
    if dtype is None:
        dtype = imported.get("dtype") if imported.get("dtype") in EXPORT_DTYPES else "float32"
    src, how = _tokenizer_source(run_dir, meta, tokenizer)
    files, special = _tokenizer_files(src, meta.get("tokenizer_sha256"), how)
    record_len = None
    try:
        record_len = json.loads((run_dir / "run_config.json").read_text())["train"].get("seq_len")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    base = imported.get("config") if imported.get("model_type") == model_type else None
    hf = hf_config.from_salt(config, model_type, special_ids=special, base=base, dtype=dtype, max_len=record_len)
    tensors = hf_tensors(config, params, model_type, EXPORT_DTYPES[dtype])
    marker = {"format": EXPORT_FORMAT, "run": str(pathlib.Path(run_dir).resolve()), "step": int(step),
              "manifest_sha256": meta["manifest_sha256"], "model_type": model_type, "dtype": dtype,
              "tokenizer_sha256": meta.get("tokenizer_sha256"), "salt_config": config.to_dict()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        safetensors_io.write(tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        outputs.write_json(tmp / CONFIG_FILE, hf)
        for fname, data in files.items():
            outputs.write_bytes(tmp / fname, data)
        outputs.write_json(tmp / EXPORT_MARKER, marker)
        outputs.fsync_dir(tmp)
        outputs.check_output_dir(out, "hf_export", mode="replace" if overwrite else "create", inputs=inputs)
        outputs.move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "run": str(run_dir), "step": int(step), "model_type": model_type, "dtype": dtype,
            "tokenizer": how}

