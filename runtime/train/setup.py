"""What a training run reads before its first step: the token store, window-id files, the
student's architecture, the teacher (a checkpoint or a teacher cache) and the data loaders.

Everything here validates and raises :class:`TrainError` with a message for the user; nothing
here writes.  ``salt teacher cache`` and ``salt score`` use the same functions, so a cache, a
selection and a run agree on the data order and the teacher's identity.  (Opening a teacher
*cache* is the trainer's: the cache's builder sits above this module.)
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from salt.data import Loader, TokenStore
from salt.data.ids import load_window_ids
from salt.data.tokenizer import sentinel_ids
from salt.reference.config import VOCAB_FROM_DATA, ModelConfig, get_preset
from salt.runtime.model import checkpoint, sharding
from salt.runtime.train.config import TrainConfig, TrainError


def open_store(path: str) -> TokenStore:
    p = pathlib.Path(path)
    if not p.exists():
        raise TrainError(f"data directory {path!r} does not exist (prepare it with `salt data`)")
    try:
        return TokenStore(p)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise TrainError(f"cannot open the token store {path!r}: {e}") from None


def load_ids(path: str, what: str) -> np.ndarray:
    """The window ids of a ``--subset`` / ``--exclude`` file (``what`` names the flag)."""
    try:
        ids = load_window_ids(path, what=f"--{what}")
    except ValueError as e:
        raise TrainError(str(e)) from None
    if ids.size == 0:
        raise TrainError(f"--{what} file {path!r} is empty")
    return ids


def student_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The student's architecture: the ``--init`` run's, else the preset's (vocabulary from the
    data for the presets that take it)."""
    if cfg.init is not None:  # the architecture of the run the student starts from
        try:
            config = ModelConfig.from_dict(checkpoint.read_meta(cfg.init)["config"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise TrainError(f"init {cfg.init!r}: {e}") from None
        if config.vocab_size < vocab_size:
            raise TrainError(f"init {cfg.init!r} has vocab_size={config.vocab_size} < the data's vocabulary "
                             f"{vocab_size}")
        return config
    config = get_preset(cfg.preset)
    if cfg.preset in VOCAB_FROM_DATA:
        return config.replace(vocab_size=int(vocab_size))
    if config.vocab_size < vocab_size:
        raise TrainError(f"preset {cfg.preset} has vocab_size={config.vocab_size} < the data's "
                         f"vocabulary {vocab_size}")
    return config


def load_teacher(cfg: TrainConfig, tokenizer_sha256: str, tokenizer_vocab: int, mesh=None,
                 pinned: dict | None = None):
    """(teacher config, params (sharded when ``mesh``), identity dict) of the checkpoint that
    :func:`check_teacher` accepts."""
    identity = check_teacher(cfg, tokenizer_sha256, tokenizer_vocab, pinned=pinned)
    t_config = ModelConfig.from_dict(identity["config"])
    shardings = sharding.param_shardings(t_config, mesh) if mesh is not None else None
    t_config, t_params, _ = checkpoint.load_params(identity["path"], identity["step"], shardings=shardings)
    return t_config, t_params, identity


def check_teacher(cfg: TrainConfig, tokenizer_sha256: str, tokenizer_vocab: int,
                  pinned: dict | None = None) -> dict:
    """The identity dict (path, step, manifest sha256, config) of ``cfg.teacher``'s checkpoint
    after checking it against the data; reads no parameters.  TrainError naming the teacher
    otherwise.

    The teacher must use the data's tokenizer (sha256) and hold all of its ``tokenizer_vocab``
    ids; its embedding may have more rows than the student's or the tokenizer's (padding: the
    padded columns get no probability, see :func:`padded_vocab`).

    ``pinned``: the identity a resumed run recorded at its start; exactly that step is used and
    its manifest hash must match (a teacher checkpoint that is gone or changed is refused)."""
    step = cfg.teacher_step
    if pinned is not None:
        step = pinned.get("step")
        if not isinstance(step, int):
            raise TrainError(f"run {cfg.out!r} records no teacher step to resume with: {pinned!r}")
    try:
        run_dir, step = checkpoint.resolve(cfg.teacher, step)
        digest = checkpoint.manifest_sha256(checkpoint.step_dir(run_dir, step))
        meta = checkpoint.meta_of(run_dir, step)
        t_config = ModelConfig.from_dict(meta["config"])
    except (ValueError, KeyError, OSError) as e:
        if pinned is not None:
            raise TrainError(f"teacher {cfg.teacher!r}: the checkpoint this run started with (step "
                             f"{pinned.get('step')}) cannot be used: {e}; the run cannot be resumed "
                             "reproducibly") from None
        raise TrainError(f"teacher {cfg.teacher!r}: {e}") from None
    if pinned is not None and pinned.get("manifest_sha256") not in (None, digest):
        raise TrainError(f"teacher {cfg.teacher!r} step {step} changed since this run started "
                         f"(manifest sha256 {digest[:16]}..., recorded "
                         f"{str(pinned.get('manifest_sha256'))[:16]}...); refusing to resume with "
                         "another teacher")
    t_sha = meta.get("tokenizer_sha256")
    if t_sha != tokenizer_sha256:
        raise TrainError(f"teacher {cfg.teacher!r} (step {step}) was trained with tokenizer sha256 "
                         f"{t_sha}, but the data {cfg.data!r} uses {tokenizer_sha256}")
    if t_config.vocab_size < tokenizer_vocab:
        raise TrainError(f"teacher {cfg.teacher!r} (step {step}) has vocab_size={t_config.vocab_size}, "
                         f"fewer than the {tokenizer_vocab} ids of the shared tokenizer")
    return {"path": str(pathlib.Path(run_dir).absolute()), "step": int(step),
            "manifest_sha256": digest, "config": t_config.to_dict()}


def padded_vocab(tokenizer_vocab: int, *configs) -> int | None:
    """The tokenizer's vocabulary when some model's embedding has more rows (padding: the loss
    then cuts the embeddings to the tokenizer's ids, so padded columns get no probability), else
    None (every embedding row is a token)."""
    sizes = {c.vocab_size for c in configs if c is not None}
    return None if sizes == {tokenizer_vocab} else int(tokenizer_vocab)


def make_loaders(cfg: TrainConfig, store: TokenStore, subset_ids, exclude_ids) -> tuple[Loader, Loader]:
    """(full loader, KD-phase loader): the KD phase draws from ``subset_ids`` when given (SALT_DS)."""
    common = dict(seq_len=cfg.seq_len, global_batch=cfg.batch, seed=cfg.seed, split="train",
                  process_index=jax.process_index(), process_count=jax.process_count())
    try:
        full = Loader(store, exclude=exclude_ids, **common)
        kd = Loader(store, subset=subset_ids, **common) if subset_ids is not None else full
    except ValueError as e:
        raise TrainError(f"data {cfg.data!r}: {e}") from None
    return full, kd


def ul2_sentinels(cfg: TrainConfig, store: TokenStore) -> list[int]:
    ids = sentinel_ids(store.processor())
    if not ids:
        raise TrainError(f"objective='ul2' needs sentinel ids for span corruption, but the tokenizer of "
                         f"{cfg.data!r} reserves none: prepare the data with "
                         f"`salt data prepare --sentinels 100`")
    return ids


@dataclasses.dataclass
class Teacher:
    """The KD phase's teacher: a checkpoint's ``config`` and ``params``, or a teacher ``cache``;
    ``identity`` is what the run records (and a resume must match).  The loop sets ``params`` to
    None at the switch to the standard phase, so nothing keeps the teacher's weights alive."""

    config: ModelConfig | None = None
    params: Any = None
    identity: dict | None = None
    cache: Any = None  # a salt.runtime.train.teacher_cache.TeacherCache
