"""``salt teacher cache``: the teacher's top-k logits over exactly the KD-phase batches of a
``salt train`` run, computed once, so that ``salt train --teacher-cache CACHE`` runs its KD phase
with no teacher forward (top-k KD, docs/design.md §2).

The KD phase's batches are known in advance: step ``j`` reads the loader's batch ``j - 1``, a
function of the seed, the pool (subset / exclude) and the step.  For each of the first ``steps``
batches the cache holds, per target position (``[B, T, k]`` / ``[B, T]``):

* ``step_SSSSSS.logits.npy``: the teacher's top-k raw logits in descending order (ties to the
  lower id), ``bfloat16`` (stored as its uint16 bit pattern), ``float16`` or (exact, for checks)
  ``float32``;
* ``step_SSSSSS.ids.npy``: their token ids, the smallest unsigned type that holds ``V``;
* ``step_SSSSSS.lse.npy``: the full-vocabulary ``lse(t)`` (float32), so that both sparse-KD
  variants are possible (renormalised top-k, and top-k with the remaining mass spread).

``cache.json`` holds the key (format, tokenizer sha256 and vocabulary, teacher run + step +
manifest sha256, the loader state, k, steps, dtypes) and ``complete``.  Every file is written
atomically (temp + rename) and ``lse`` last, so a step is done when its three files exist; a
killed build (even ``kill -9``) resumes at the first missing step and, the teacher forward being
deterministic, ends with byte-identical files.  No pickle anywhere.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from salt.core import outputs

CACHE_FORMAT = "salt-teacher-cache-v1"
VALUE_DTYPES = ("bfloat16", "float16", "float32")  # float32: exact, for checks
MANIFEST = "cache.json"
DEFAULT_TOP_K = 64  # `salt teacher cache --top-k`, and `salt reproduce --teacher-cache auto` without --kd-topk


class CacheError(ValueError):
    """A cache that cannot be built or used, with a message meant for the user."""


def ids_dtype(vocab: int) -> np.dtype:
    """The smallest unsigned integer type that holds the ids ``0 … vocab − 1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _paths(cache: pathlib.Path, step0: int) -> dict:
    stem = f"step_{step0 + 1:06d}"
    return {name: cache / f"{stem}.{name}.npy" for name in ("logits", "ids", "lse")}


def write_step(cache, step0: int, top_BxTxK, ids_BxTxK, lse_BxT, *, values_dtype: str, ids_dtype) -> None:
    """Write 0-based step ``step0``'s three files, each atomically (temp + rename), ``lse`` last:
    the step is done once its ``lse`` file exists."""
    paths = _paths(pathlib.Path(cache), step0)
    outputs.save_npy(paths["logits"], _encode_logits(np.asarray(top_BxTxK, np.float32), values_dtype))
    outputs.save_npy(paths["ids"], np.asarray(ids_BxTxK).astype(ids_dtype))
    outputs.save_npy(paths["lse"], np.asarray(lse_BxT, np.float32))


def stored_bytes(cache) -> int:
    """The bytes of a cache's step files on disk (``.npy`` headers included; not ``cache.json``)."""
    return sum(p.stat().st_size for p in pathlib.Path(cache).glob("step_*.npy"))


def bytes_per_token(top_k: int, vocab: int, *, values_dtype: str = "bfloat16", batch: int = 8,
                    seq_len: int = 128) -> float:
    """On-disk bytes per target position of a cache with these settings, measured: one step of
    ``[batch, seq_len]`` is written with :func:`write_step` into a temporary directory and its
    files' sizes (``.npy`` headers included) are divided by ``batch * seq_len``."""
    import tempfile
    shape = (batch, seq_len, top_k)
    with tempfile.TemporaryDirectory(prefix="salt-cache-size-") as tmp:
        write_step(tmp, 0, np.zeros(shape, np.float32), np.zeros(shape, np.int64), np.zeros(shape[:2], np.float32),
                   values_dtype=values_dtype, ids_dtype=ids_dtype(vocab))
        size = sum(p.stat().st_size for p in _paths(pathlib.Path(tmp), 0).values())
    return size / (batch * seq_len)


def _encode_logits(top_BxTxK: np.ndarray, values_dtype: str) -> np.ndarray:
    if values_dtype in ("float16", "float32"):
        return top_BxTxK.astype(values_dtype)
    import ml_dtypes
    return top_BxTxK.astype(ml_dtypes.bfloat16).view(np.uint16)


def _decode_logits(stored: np.ndarray, values_dtype: str) -> np.ndarray:
    if values_dtype in ("float16", "float32"):
        return stored.astype(np.float32)
    import ml_dtypes
    return stored.view(ml_dtypes.bfloat16).astype(np.float32)


def make_topk_fn(t_config, vocab: int, k: int, attention: str):
    """``jit((teacher_params, windows_BxT1) -> (top_BxTxK f32, ids_BxTxK i32, lse_BxT f32))``: the
    teacher's top-k logits (descending, ties to the lower id), their ids and the full-vocabulary
    lse over the tokenizer's ``vocab`` ids, from the same hidden states and streaming top-k
    (:func:`salt.kernels.topk_kd.teacher_topk`) as the online top-k KD step."""
    import jax

    from salt.kernels.topk_kd import teacher_topk
    from salt.runtime.model import transformer as model

    @jax.jit
    def run(params, windows_BxT1):
        hidden = model.hidden(params, windows_BxT1[:, :-1], t_config, attention_impl=attention)
        B, T, D = hidden.shape
        top, ids, lse = teacher_topk(hidden.reshape(B * T, D), model.head_matrix(params)[:vocab], k, with_lse=True,
                                     impl="pallas" if attention == "pallas" else "xla")
        return top.reshape(B, T, k), ids.reshape(B, T, k), lse.reshape(B, T)
    return run


def build(cfg, *, top_k: int, out, values_dtype: str = "bfloat16", progress: bool = True) -> dict:
    """Build (or resume building) the cache ``out`` for the KD phase of ``cfg`` (a
    :class:`salt.runtime.train.config.TrainConfig`: teacher, teacher_step, data, batch, seq_len, seed,
    subset, exclude; ``kd_steps`` is the number of steps cached).  Returns the manifest."""
    import jax
    import jax.numpy as jnp

    from salt.runtime.train import trainer as train_mod
    from salt.runtime.train.config import TrainError

    if values_dtype not in VALUE_DTYPES:
        raise CacheError(f"--values-dtype must be one of {VALUE_DTYPES}, got {values_dtype!r}")
    if not cfg.teacher:
        raise CacheError("--teacher is required")
    if not isinstance(cfg.kd_steps, int) or cfg.kd_steps < 1:
        raise CacheError(f"--steps must be >= 1, got {cfg.kd_steps!r}")
    out = pathlib.Path(out)
    try:
        store = train_mod._open_store(cfg.data)
        if not 1 <= top_k <= store.vocab_size:
            raise CacheError(f"--top-k must be in [1, V={store.vocab_size}], got {top_k}")
        subset = train_mod._load_ids(cfg.subset, "subset") if cfg.subset else None
        exclude = train_mod._load_ids(cfg.exclude, "exclude") if cfg.exclude else None
        # (load_teacher compares vocabularies with a student's: one holding exactly the tokenizer's ids)
        student = train_mod.get_preset("tiny-student").replace(vocab_size=store.vocab_size)
        t_config, t_params, identity = train_mod.load_teacher(cfg, student, store.tokenizer_sha256,
                                                              tokenizer_vocab=store.vocab_size)
        _, kd_loader = train_mod.make_loaders(cfg, store, subset, exclude)
    except TrainError as e:
        raise CacheError(str(e)) from None
    key = {"format": CACHE_FORMAT, "tokenizer_sha256": store.tokenizer_sha256, "vocab": int(store.vocab_size),
           "teacher": {k: identity[k] for k in ("path", "step", "manifest_sha256")},
           "loader_state": train_mod.jsonable(kd_loader.state(0)), "top_k": int(top_k),
           "steps": int(cfg.kd_steps), "batch": int(cfg.batch), "seq_len": int(cfg.seq_len),
           "seed": int(cfg.seed), "values_dtype": values_dtype,
           "ids_dtype": ids_dtype(store.vocab_size).name}
    manifest_path = out / MANIFEST
    own_tmp = [*out.glob(".step_*.npy.*.tmp"), *out.glob(f".{MANIFEST}.*.tmp")] if out.is_dir() else []
    if own_tmp and set(out.iterdir()) == set(own_tmp):  # killed while writing the first cache.json
        for tmp in own_tmp:
            tmp.unlink()
    try:  # the output rule of docs/safety.md: absent, empty, or a teacher cache (resumed)
        state = outputs.check_output_dir(out, "teacher_cache", mode="resume")
    except outputs.OutputError as e:
        raise CacheError(str(e)) from None
    if state == "own":
        old = _read_manifest(out)
        diffs = [k for k in key if old.get(k) != key[k]]
        if diffs:
            raise CacheError(f"--out {str(out)!r} holds a teacher cache of other settings ({', '.join(diffs)} "
                             "differ); choose another --out")
        for tmp in own_tmp:
            tmp.unlink()  # our own temporaries, left by a killed build
    outputs.write_json(manifest_path, dict(key, complete=False))

    vocab = store.vocab_size

    from salt.runtime.train.config import resolve_kernels
    run = make_topk_fn(t_config, vocab, top_k, resolve_kernels(cfg.kernels))  # the KD step's attention

    from tqdm import tqdm
    bar = tqdm(total=cfg.kd_steps, desc="teacher cache", disable=not progress, dynamic_ncols=True)
    try:
        for step0 in range(cfg.kd_steps):
            paths = _paths(out, step0)
            if all(p.is_file() for p in paths.values()):
                bar.update(1)
                continue
            top, ids, lse = jax.device_get(run(t_params, jnp.asarray(kd_loader.batch(step0))))
            write_step(out, step0, top, ids, lse, values_dtype=values_dtype, ids_dtype=key["ids_dtype"])
            bar.update(1)
    finally:
        bar.close()
    manifest = dict(key, complete=True)
    outputs.write_json(manifest_path, manifest)
    return manifest


def _read_manifest(cache: pathlib.Path) -> dict:
    path = cache / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CacheError(f"teacher cache {str(cache)!r}: {MANIFEST} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"{str(cache)!r} is not a teacher cache (format {CACHE_FORMAT})")
    return manifest


class TeacherCache:
    """A complete cache opened for a run; :meth:`check` names the first mismatch."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        if not (self.path / MANIFEST).is_file():
            raise CacheError(f"teacher cache {str(path)!r}: no {MANIFEST} (build it with `salt teacher cache`)")
        self.manifest = _read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise CacheError(f"teacher cache {str(path)!r} is incomplete (its build was interrupted): "
                             "re-run the same `salt teacher cache` command to finish it")

    def check(self, cfg, store, kd_loader, vocab: int) -> None:
        """Refuse (CacheError naming the field) a cache whose data order, tokenizer, seq-len, batch,
        steps or k does not fit the run ``cfg``."""
        m, where = self.manifest, f"teacher cache {str(self.path)!r}"
        if m.get("tokenizer_sha256") != store.tokenizer_sha256:
            raise CacheError(f"{where} was built with tokenizer sha256 {m.get('tokenizer_sha256')}, but "
                             f"{cfg.data!r} uses {store.tokenizer_sha256}")
        for field in ("seq_len", "batch", "seed"):
            if m.get(field) != getattr(cfg, field):
                raise CacheError(f"{where} was built with {field}={m.get(field)!r}, this run has "
                                 f"{field}={getattr(cfg, field)!r}")
        try:
            kd_loader.check_state(m.get("loader_state") or {})
        except ValueError as e:
            raise CacheError(f"{where} does not match this run's KD data order: {e}") from None
        if m.get("vocab") != vocab:
            raise CacheError(f"{where} has vocabulary {m.get('vocab')}, the data {vocab}")
        if m.get("steps", 0) < cfg.kd_steps:
            raise CacheError(f"{where} holds {m.get('steps')} KD steps, this run needs kd_steps={cfg.kd_steps}")
        if cfg.kd_topk is None or cfg.kd_topk > m.get("top_k", 0):
            raise CacheError(f"{where} holds the teacher's top-{m.get('top_k')}: the run needs --kd-topk K "
                             f"with K <= {m.get('top_k')}, got {cfg.kd_topk}")

    def batch(self, step0: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(logits_BxTxK float32, ids_BxTxK int32)`` of 0-based step ``step0``, the first ``k``."""
        paths = _paths(self.path, step0)
        try:
            arrays = {name: np.load(p, allow_pickle=False) for name, p in paths.items() if name != "lse"}
        except (OSError, ValueError) as e:
            raise CacheError(f"teacher cache {str(self.path)!r}: step {step0 + 1} is unreadable ({e})") from None
        m = self.manifest
        shape = (m["batch"], m["seq_len"], m["top_k"])
        stored = np.dtype(np.uint16 if m["values_dtype"] == "bfloat16" else m["values_dtype"])
        for name, dtype in (("logits", stored),
                            ("ids", np.dtype(m["ids_dtype"]))):
            if arrays[name].shape != shape or arrays[name].dtype != dtype:
                raise CacheError(f"teacher cache {str(self.path)!r}: {paths[name].name} has "
                                 f"{arrays[name].dtype} {arrays[name].shape}, expected {np.dtype(dtype)} {shape}")
        ids = arrays["ids"][..., :k].astype(np.int32)
        if ids.size and int(ids.max()) >= m["vocab"]:
            raise CacheError(f"teacher cache {str(self.path)!r}: {paths['ids'].name} holds an id >= V={m['vocab']}")
        return _decode_logits(arrays["logits"][..., :k], m["values_dtype"]), ids

    def identity(self) -> dict:
        return {"cache": str(self.path.absolute()), **self.manifest["teacher"]}
