"""``salt teacher cache``: the teacher's top-k logits over exactly the KD-phase batches of a
``salt train`` run, computed once, so that ``salt train --teacher-cache CACHE`` runs its KD phase
with no teacher forward (top-k KD, docs/design.md §2).

The KD phase's batches are known in advance: step ``j`` reads the loader's batch ``j - 1``, a
function of the seed, the pool (subset / exclude) and the step.  For each of the first ``steps``
batches the cache holds, per target position, the teacher's top-k set (ids and raw logits) and the
full-vocabulary ``lse(t)`` (so that both sparse-KD variants are possible: renormalised top-k, and
top-k with the remaining mass spread), in one of two layouts:

* ``compact`` (the default): ``step_SSSSSS.rows.npy``, uint8 ``[B, T, R]``, one fixed-size row
  per position coded by :mod:`salt.runtime.train.cache_codec` (ids as an Elias-Fano set, logits
  quantised to ``logit_bits`` relative to the row's max);
* ``bfloat16`` / ``float16`` / ``float32`` (uncompressed; float32 is exact, for checks):
  ``step_SSSSSS.logits.npy`` (descending, ties to the lower id; bfloat16 as its uint16 bit
  pattern), ``step_SSSSSS.ids.npy`` (the smallest unsigned type that holds ``V``) and
  ``step_SSSSSS.lse.npy`` (float32).

``cache.json`` holds the key (format, tokenizer sha256 and vocabulary, teacher run + step +
manifest sha256, the loader state, k, steps, the encoding), ``complete`` and, once complete, every
shard's size and sha256.  A run opening the cache checks every shard's size, and every shard read
is hashed and compared before use (the bytes are in memory anyway), so a damaged shard stops the
run with a one-line error naming the file; :meth:`TeacherCache.verify` (``salt teacher verify``)
hashes all of them up front.  Every file is written atomically (temp + rename), a step's last file
(``rows`` or ``lse``) last, so a step is done when that file exists; a killed build (even ``kill
-9``) resumes at the first missing step and, the teacher forward being deterministic, ends with
byte-identical files.  No pickle anywhere.  Caches of the first format (``salt-teacher-cache-v1``,
no hashes) are still read, unverified.
"""
from __future__ import annotations

import hashlib
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from salt.core import outputs
from salt.core.lock import LOCK_NAME, DirLock
from salt.kernels.topk_kd import teacher_topk
from salt.runtime.model import transformer as model
from salt.runtime.train import cache_codec, setup
from salt.runtime.train.config import TrainError, resolve_kernels
from salt.runtime.train.run_dir import jsonable

CACHE_FORMAT = "salt-teacher-cache-v2"
OLD_FORMATS = ("salt-teacher-cache-v1",)  # read (no shard hashes), never written
VALUE_DTYPES = ("compact", "bfloat16", "float16", "float32")  # float32: exact, for checks
DEFAULT_VALUES = "compact"
DEFAULT_LOGIT_BITS = 5  # the compact layout's logit bits: 298 B/token at k = 128, V = 256,000
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


def _paths(cache: pathlib.Path, step0: int, values_dtype: str) -> dict:
    """The step's files, the one that marks it done last."""
    stem = f"step_{step0 + 1:06d}"
    names = ("rows",) if values_dtype == "compact" else ("logits", "ids", "lse")
    return {name: cache / f"{stem}.{name}.npy" for name in names}


def _npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def _shard(data: bytes) -> list:
    """A shard's manifest entry: ``[size, sha256]``."""
    return [len(data), hashlib.sha256(data).hexdigest()]


def write_step(cache, step0: int, top_BxTxZ, ids_BxTxZ, lse_BxT, *, values_dtype: str, ids_dtype=None,
               vocab: int | None = None, logit_bits: int = DEFAULT_LOGIT_BITS) -> dict:
    """Write 0-based step ``step0``'s files, each atomically (temp + rename), the one that marks
    the step done last; returns ``{file name: [size, sha256]}``.  ``compact`` needs ``vocab``
    (and ``logit_bits``), the uncompressed layouts ``ids_dtype``."""
    paths = _paths(pathlib.Path(cache), step0, values_dtype)
    if values_dtype == "compact":
        B, T, k = np.shape(top_BxTxZ)
        rows = cache_codec.encode(np.reshape(top_BxTxZ, (B * T, k)), np.reshape(ids_BxTxZ, (B * T, k)),
                                  np.reshape(lse_BxT, B * T), vocab=vocab, logit_bits=logit_bits)
        arrays = {"rows": rows.reshape(B, T, -1)}
    else:
        arrays = {"logits": _encode_logits(np.asarray(top_BxTxZ, np.float32), values_dtype),
                  "ids": np.asarray(ids_BxTxZ).astype(ids_dtype), "lse": np.asarray(lse_BxT, np.float32)}
    shards = {}
    for name, path in paths.items():
        data = _npy_bytes(arrays[name])
        outputs.write_bytes(path, data)
        shards[path.name] = _shard(data)
    return shards


def write_one_step(path, top_BxTxZ, ids_BxTxZ, lse_BxT, *, vocab: int, teacher: dict,
                   values_dtype: str = DEFAULT_VALUES, logit_bits: int = DEFAULT_LOGIT_BITS) -> "TeacherCache":
    """A complete one-step cache of these arrays in the (empty) directory ``path``, opened (for
    ``salt bench step``, which times the cached step's read from real files)."""
    B, T, k = np.shape(top_BxTxZ)
    manifest = {"format": CACHE_FORMAT, "vocab": vocab, "top_k": k, "steps": 1, "batch": B, "seq_len": T,
                "values_dtype": values_dtype, "ids_dtype": ids_dtype(vocab).name, "teacher": teacher,
                "complete": True}
    if values_dtype == "compact":
        manifest["logit_bits"] = logit_bits
    manifest["shards"] = write_step(path, 0, top_BxTxZ, ids_BxTxZ, lse_BxT, values_dtype=values_dtype,
                                    ids_dtype=manifest["ids_dtype"], vocab=vocab, logit_bits=logit_bits)
    outputs.write_json(pathlib.Path(path) / MANIFEST, manifest)
    return TeacherCache(path)


def stored_bytes(cache) -> int:
    """The bytes of a cache's step files on disk (``.npy`` headers included; not ``cache.json``)."""
    return sum(p.stat().st_size for p in pathlib.Path(cache).glob("step_*.npy"))


def bytes_per_token(top_k: int, vocab: int, *, values_dtype: str = DEFAULT_VALUES, batch: int = 8,
                    seq_len: int = 128, logit_bits: int = DEFAULT_LOGIT_BITS) -> float:
    """On-disk bytes per target position of a cache with these settings, measured: one step of
    ``[batch, seq_len]`` (distinct ids, random logits) is written with :func:`write_step` into a
    temporary directory and its files' sizes (``.npy`` headers included) are divided by ``batch *
    seq_len``."""
    import tempfile
    shape = (batch, seq_len, top_k)
    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((batch * seq_len, vocab)), axis=-1)[:, :top_k] if vocab <= 8192 else \
        np.stack([rng.choice(vocab, top_k, replace=False) for _ in range(batch * seq_len)])
    with tempfile.TemporaryDirectory(prefix="salt-cache-size-") as tmp:
        write_step(tmp, 0, rng.standard_normal(shape).astype(np.float32), ids.reshape(shape),
                   np.zeros(shape[:2], np.float32), values_dtype=values_dtype, ids_dtype=ids_dtype(vocab),
                   vocab=vocab, logit_bits=logit_bits)
        size = sum(p.stat().st_size for p in _paths(pathlib.Path(tmp), 0, values_dtype).values())
    return size / (batch * seq_len)


def _encode_logits(top_BxTxZ: np.ndarray, values_dtype: str) -> np.ndarray:
    if values_dtype in ("float16", "float32"):
        return top_BxTxZ.astype(values_dtype)
    import ml_dtypes
    return top_BxTxZ.astype(ml_dtypes.bfloat16).view(np.uint16)


def _decode_logits(stored: np.ndarray, values_dtype: str) -> np.ndarray:
    if values_dtype in ("float16", "float32"):
        return stored.astype(np.float32)
    import ml_dtypes
    return stored.view(ml_dtypes.bfloat16).astype(np.float32)


def make_topk_fn(t_config, vocab: int, k: int, attention: str):
    """``jit((teacher_params, windows_BxT1) -> (top_BxTxZ f32, ids_BxTxZ i32, lse_BxT f32))``: the
    teacher's top-k logits (descending, ties to the lower id), their ids and the full-vocabulary
    lse over the tokenizer's ``vocab`` ids, from the same hidden states and streaming top-k
    (:func:`salt.kernels.topk_kd.teacher_topk`) as the online top-k KD step."""

    @jax.jit
    def run(params, windows_BxT1):
        hidden = model.hidden(params, windows_BxT1[:, :-1], t_config, attention_impl=attention)
        B, T, D = hidden.shape
        top, ids, lse = teacher_topk(hidden.reshape(B * T, D), model.head_matrix(params)[:vocab], k, with_lse=True,
                                     impl="pallas" if attention == "pallas" else "xla")
        return top.reshape(B, T, k), ids.reshape(B, T, k), lse.reshape(B, T)
    return run


def build(cfg, *, top_k: int, out, values_dtype: str = DEFAULT_VALUES, logit_bits: int = DEFAULT_LOGIT_BITS,
          progress: bool = True) -> dict:
    """Build (or resume building) the cache ``out`` for the KD phase of ``cfg`` (a
    :class:`salt.runtime.train.config.TrainConfig`: teacher, teacher_step, data, batch, seq_len, seed,
    subset, exclude; ``kd_steps`` is the number of steps cached).  Returns the manifest."""
    if values_dtype not in VALUE_DTYPES:
        raise CacheError(f"--values-dtype must be one of {VALUE_DTYPES}, got {values_dtype!r}")
    if values_dtype == "compact" and not (isinstance(logit_bits, int) and 1 <= logit_bits <= 16):
        raise CacheError(f"--logit-bits must be in [1, 16], got {logit_bits!r}")
    if not cfg.teacher:
        raise CacheError("--teacher is required")
    if not isinstance(cfg.kd_steps, int) or cfg.kd_steps < 1:
        raise CacheError(f"--steps must be >= 1, got {cfg.kd_steps!r}")
    out = pathlib.Path(out)
    try:
        store = setup.open_store(cfg.data)
        if not 1 <= top_k <= store.vocab_size:
            raise CacheError(f"--top-k must be in [1, V={store.vocab_size}], got {top_k}")
        subset = setup.load_ids(cfg.subset, "subset") if cfg.subset else None
        exclude = setup.load_ids(cfg.exclude, "exclude") if cfg.exclude else None
        t_config, t_params, identity = setup.load_teacher(cfg, store.tokenizer_sha256, store.vocab_size)
        _, kd_loader = setup.make_loaders(cfg, store, subset, exclude)
    except TrainError as e:
        raise CacheError(str(e)) from None
    key = {"format": CACHE_FORMAT, "tokenizer_sha256": store.tokenizer_sha256, "vocab": int(store.vocab_size),
           "teacher": {k: identity[k] for k in ("path", "step", "manifest_sha256")},
           "loader_state": jsonable(kd_loader.state(0)), "top_k": int(top_k),
           "steps": int(cfg.kd_steps), "batch": int(cfg.batch), "seq_len": int(cfg.seq_len),
           "seed": int(cfg.seed), "values_dtype": values_dtype,
           "ids_dtype": ids_dtype(store.vocab_size).name}
    if values_dtype == "compact":
        key["logit_bits"] = int(logit_bits)
    run = make_topk_fn(t_config, store.vocab_size, top_k, resolve_kernels(cfg.kernels))  # the KD step's attention
    _check_out(out)  # before the lock writes anything into --out
    # one writer per cache directory (docs/safety.md §3); a dead holder's lock is taken over
    with DirLock(out):
        return _build_locked(out, key, cfg, run, t_params, kd_loader, vocab=store.vocab_size,
                             values_dtype=values_dtype, logit_bits=logit_bits, progress=progress)


def _own_temporaries(out: pathlib.Path) -> list[pathlib.Path]:
    """The temporary files a killed build left in ``out`` (never anything else)."""
    return [*out.glob(".step_*.npy.*.tmp"), *out.glob(f".{MANIFEST}.*.tmp")] if out.is_dir() else []


def _check_out(out: pathlib.Path) -> str:
    """The output rule of docs/safety.md: absent, empty, or a teacher cache (resumed); a
    directory holding nothing but the temporaries of a build killed while it wrote its first
    cache.json counts as empty."""
    own_tmp = _own_temporaries(out)
    if own_tmp and {p for p in out.iterdir() if p.name != LOCK_NAME} == set(own_tmp):
        return "empty"
    try:
        return outputs.check_output_dir(out, "teacher_cache", mode="resume")
    except outputs.OutputError as e:
        raise CacheError(str(e)) from None


def _build_locked(out: pathlib.Path, key: dict, cfg, run, t_params, kd_loader, *, vocab: int,
                  values_dtype: str, logit_bits: int, progress: bool) -> dict:
    """:func:`build`'s writing part, holding ``out``'s lock: the output rule again, then every
    missing step."""
    manifest_path = out / MANIFEST
    if _check_out(out) == "own":
        old = _read_manifest(out)
        diffs = [k for k in key if old.get(k) != key[k]]
        if diffs:
            raise CacheError(f"--out {str(out)!r} holds a teacher cache of other settings ({', '.join(diffs)} "
                             "differ); choose another --out")
    for tmp in _own_temporaries(out):
        tmp.unlink()  # our own temporaries, left by a killed build
    outputs.write_json(manifest_path, dict(key, complete=False))

    from tqdm import tqdm
    bar = tqdm(total=cfg.kd_steps, desc="teacher cache", disable=not progress, dynamic_ncols=True)
    shards: dict = {}
    try:
        for step0 in range(cfg.kd_steps):
            paths = _paths(out, step0, values_dtype)
            if all(p.is_file() for p in paths.values()):  # done by a killed build: hash what it wrote
                shards.update({p.name: _shard(p.read_bytes()) for p in paths.values()})
                bar.update(1)
                continue
            top, ids, lse = jax.device_get(run(t_params, jnp.asarray(kd_loader.batch(step0))))
            shards.update(write_step(out, step0, top, ids, lse, values_dtype=values_dtype,
                                     ids_dtype=key["ids_dtype"], vocab=vocab, logit_bits=logit_bits))
            bar.update(1)
    finally:
        bar.close()
    manifest = dict(key, complete=True, shards=shards)
    outputs.write_json(manifest_path, manifest)
    return manifest


def _read_manifest(cache: pathlib.Path) -> dict:
    path = cache / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CacheError(f"teacher cache {str(cache)!r}: {MANIFEST} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (CACHE_FORMAT, *OLD_FORMATS):
        raise CacheError(f"{str(cache)!r} is not a teacher cache (format {CACHE_FORMAT})")
    return manifest


class TeacherCache:
    """A complete cache opened for a run; :meth:`check` names the first mismatch.  Opening checks
    that every shard the manifest lists exists with its size; :meth:`batch` hashes each shard it
    reads against the manifest; :meth:`verify` hashes them all."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        if not (self.path / MANIFEST).is_file():
            raise CacheError(f"teacher cache {str(path)!r}: no {MANIFEST} (build it with `salt teacher cache`)")
        self.manifest = _read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise CacheError(f"teacher cache {str(path)!r} is incomplete (its build was interrupted): "
                             "re-run the same `salt teacher cache` command to finish it")
        self.shards = self.manifest.get("shards") if self.manifest["format"] == CACHE_FORMAT else None
        if self.manifest["format"] == CACHE_FORMAT and not isinstance(self.shards, dict):
            raise CacheError(f"teacher cache {str(path)!r}: {MANIFEST} lists no shard hashes")
        for name, entry in (self.shards or {}).items():
            file = self.path / name
            try:
                size = file.stat().st_size
            except OSError:
                raise CacheError(f"teacher cache shard {str(file)!r} is missing: rebuild the cache") from None
            if not isinstance(entry, list) or size != entry[0]:
                raise CacheError(f"teacher cache shard {str(file)!r} is damaged (size {size}, expected "
                                 f"{entry[0] if isinstance(entry, list) else '?'}): rebuild the cache")

    def _read(self, file: pathlib.Path) -> bytes:
        """A shard's bytes, checked against its manifest hash (unchecked in a v1 cache)."""
        try:
            data = file.read_bytes()
        except OSError as e:
            raise CacheError(f"teacher cache shard {str(file)!r} is unreadable ({e.strerror})") from None
        if self.shards is not None:
            entry = self.shards.get(file.name)
            if entry is None:
                raise CacheError(f"teacher cache shard {str(file)!r} is not listed in {MANIFEST}")
            if _shard(data) != entry:
                raise CacheError(f"teacher cache shard {str(file)!r} is damaged (sha256 mismatch): rebuild "
                                 "the cache")
        return data

    def verify(self) -> int:
        """Hash every shard against the manifest (CacheError naming the first damaged one);
        returns the number of shards checked."""
        if self.shards is None:
            raise CacheError(f"teacher cache {str(self.path)!r} is of format {self.manifest['format']}, which has "
                             "no shard hashes: rebuild it to verify it")
        for name in sorted(self.shards):
            self._read(self.path / name)
        return len(self.shards)

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
        """``(logits_BxTxZ float32, ids_BxTxZ int32)`` of 0-based step ``step0``, the first ``k``
        (descending logits, ties to the lower id)."""
        m = self.manifest
        paths = _paths(self.path, step0, m["values_dtype"])
        try:
            arrays = {name: np.load(io.BytesIO(self._read(p)), allow_pickle=False) for name, p in paths.items()
                      if name != "lse"}
        except ValueError as e:
            raise CacheError(f"teacher cache {str(self.path)!r}: step {step0 + 1} is unreadable ({e})") from None
        B, T, K = m["batch"], m["seq_len"], m["top_k"]
        if m["values_dtype"] == "compact":
            expected = {"rows": (np.dtype(np.uint8), (B, T, cache_codec.row_bytes(m["vocab"], K, m["logit_bits"])))}
        else:
            expected = {"logits": (np.dtype(np.uint16 if m["values_dtype"] == "bfloat16" else m["values_dtype"]),
                                   (B, T, K)), "ids": (np.dtype(m["ids_dtype"]), (B, T, K))}
        for name, (dtype, shape) in expected.items():
            if arrays[name].shape != shape or arrays[name].dtype != dtype:
                raise CacheError(f"teacher cache {str(self.path)!r}: {paths[name].name} has "
                                 f"{arrays[name].dtype} {arrays[name].shape}, expected {dtype} {shape}")
        if m["values_dtype"] == "compact":
            try:
                logits, ids, _ = cache_codec.decode(arrays["rows"].reshape(B * T, -1), vocab=m["vocab"], k=K,
                                                    logit_bits=m["logit_bits"], keep=k)
            except ValueError as e:
                raise CacheError(f"teacher cache {str(self.path)!r}: {paths['rows'].name}: {e}") from None
            return logits.reshape(B, T, k), ids.reshape(B, T, k)
        ids = arrays["ids"][..., :k].astype(np.int32)
        if ids.size and int(ids.max()) >= m["vocab"]:
            raise CacheError(f"teacher cache {str(self.path)!r}: {paths['ids'].name} holds an id >= V={m['vocab']}")
        return _decode_logits(arrays["logits"][..., :k], m["values_dtype"]), ids

    def identity(self) -> dict:
        return {"cache": str(self.path.absolute()), **self.manifest["teacher"]}
