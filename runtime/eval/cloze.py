"""A LAMBADA-style last-word task from the held-out split, and its difficulty buckets (appendix J).

Passages (:func:`build_passages`, deterministic for a token store and a window length ``T``):

* text: the validation-split documents of the token store (never trained on: ``salt data
  prepare`` splits by document), decoded with the store's tokenizer;
* target: a word of at least three ASCII letters that ends a sentence: preceded by a space,
  followed by ``.``, ``!`` or ``?`` and then whitespace or the end of the document
  (:data:`TARGET`); the passage ends with the word, its punctuation is not part of the task;
* context: the longest stretch of the same document before the target that starts after a
  whitespace character (or at the document's start) and fits the model's window with the
  target: ``[EOS] + context + target`` has at most ``T + 1`` tokens.  A passage whose context
  gets fewer than half of that budget (a sentence at the very start of a document) is dropped;
* tokens as lm-eval's ``loglikelihood`` splits them: the context text stops before the space
  in front of the word, the target is ``encode(" " + word)``, and a candidate is dropped unless
  ``encode(context + " " + word)`` is exactly context ids + target ids; the sequence starts
  with EOS (the "start of a document" the model saw), as in ``salt eval --tasks``;
* at most :data:`MAX_PASSAGES` passages, evenly spaced over the passages found in (document,
  position) order; identical token sequences are kept once.  Documents are read in order until
  ``SCAN_FACTOR x MAX_PASSAGES`` passages are found (all of them on the embedded corpus),
  so a large validation split is not decoded whole.

LAMBADA's passages were filtered by people so that the word is guessable from the whole
passage but not from its last sentence; nothing here does that (docs/evaluation.md).

Scoring (:func:`score_passages`) runs the held-out evaluation's compiled per-position
statistics (``salt.runtime.eval.evaluate``: fused-linear CE and argmax from the final hidden states)
on windows padded to the evaluation's fixed ``[batch, T + 1]`` shape: the log-likelihood of a
passage is the sum of its target tokens' log-probabilities, and it is *correct* when every
target token is the argmax (LAMBADA's accuracy).

Buckets (:func:`difficulty_buckets`, paper appendix J): passages ranked easiest first by the
SLM's correctness, ties by the SLM's log-likelihood (higher = more confident = easier), then
by passage index; tertiles of the ranking (``numpy.array_split``: the first buckets take the
remainder) are ``easy`` / ``medium`` / ``hard``.  :func:`reproduce_stage` scores every model of
``salt reproduce`` and :func:`summarize` makes the report's numbers.
"""
from __future__ import annotations

import hashlib
import math
import re

import numpy as np

from salt.runtime.model.tokens import WindowStats
from salt.runtime.train.config import resolve_kernels

BUCKETS = ("easy", "medium", "hard")
MAX_PASSAGES = 512
SCAN_FACTOR = 4  # documents are read until SCAN_FACTOR * max_passages passages are found
TARGET = re.compile(r"(?<= )([A-Za-z]{3,})(?=[.!?](?:\s|$))")


# --------------------------------------------------------------------------- passages

def held_out_documents(store):
    """The validation split's documents as text, in store order, one at a time (the store's
    tokenizer; the trailing EOS, the store's ``eos_id``, dropped)."""
    sp = store.processor()
    tokens, offsets = store.tokens("val"), store.doc_offsets("val")
    for d in range(offsets.size - 1):
        ids = np.asarray(tokens[offsets[d]:offsets[d + 1]]).tolist()
        if ids and ids[-1] == store.eos_id:
            ids = ids[:-1]
        yield sp.decode(ids)


def _context_start(encode, doc: str, end: int, budget: int) -> tuple[int, list[int]] | None:
    """Smallest whitespace-boundary start ``p <= end`` with ``len(encode(doc[p:end])) <= budget``
    (binary search: token counts grow with the text), with its ids; None when nothing fits."""
    lo_char = max(0, end - 32 * (budget + 1))
    starts = [p for p in range(lo_char, end + 1) if p == 0 or doc[p - 1].isspace()]
    lo, hi = 0, len(starts)  # find the first index whose suffix fits
    while lo < hi:
        mid = (lo + hi) // 2
        if len(encode(doc[starts[mid]:end])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    if lo == len(starts):
        return None
    ids = encode(doc[starts[lo]:end])
    return (starts[lo], ids) if len(ids) <= budget else None


def build_passages(store, seq_len: int, max_passages: int = MAX_PASSAGES) -> dict:
    """The task's passages for windows of ``seq_len + 1`` tokens (module docstring).

    Returns ``windows_PxT1`` (int32, ``[EOS] + context + target`` then PAD: the store's
    ``eos_id`` and ``pad_id``), ``length_P``
    (tokens in use), ``n_target_P`` (target tokens, at the end), ``doc_P`` / ``char_P`` (the
    target's document in the validation split and its character offset), ``word_P`` (str) and
    ``n_candidates`` (sentence-final words in the documents read, before the fit/length rules and
    the cap), ``n_documents`` (validation documents read)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 for a last-word task, got {seq_len}")
    sp = store.processor()

    def encode(text):
        return sp.encode(text) if text else []

    found, n_candidates, seen, n_docs = [], 0, set(), 0
    for d, doc in enumerate(held_out_documents(store)):
        if len(found) >= SCAN_FACTOR * max_passages:
            break  # a large validation split: enough passages to choose from
        n_docs += 1
        for m in TARGET.finditer(doc):
            n_candidates += 1
            word, end = m.group(1), m.start(1) - 1  # the context ends before the space
            target = encode(" " + word)
            budget = seq_len - len(target)
            fit = _context_start(encode, doc, end, budget) if budget >= 1 else None
            if fit is None or len(fit[1]) < max(1, budget // 2):
                continue
            if encode(doc[fit[0]:end] + " " + word) != fit[1] + target:
                continue  # the target's tokens depend on the context: dropped
            seq = [store.eos_id] + fit[1] + target
            key = tuple(seq)
            if key in seen:
                continue
            seen.add(key)
            found.append((seq, len(target), d, m.start(1), word))
    if len(found) > max_passages:
        keep = np.unique(np.round(np.linspace(0, len(found) - 1, max_passages)).astype(np.int64))
        found = [found[i] for i in keep]
    P = len(found)
    windows = np.full((P, seq_len + 1), store.pad_id, np.int32)
    for i, (seq, *_rest) in enumerate(found):
        windows[i, :len(seq)] = seq
    return {"windows_PxT1": windows,
            "length_P": np.asarray([len(f[0]) for f in found], np.int64).reshape(P),
            "n_target_P": np.asarray([f[1] for f in found], np.int64).reshape(P),
            "doc_P": np.asarray([f[2] for f in found], np.int64).reshape(P),
            "char_P": np.asarray([f[3] for f in found], np.int64).reshape(P),
            "word_P": np.asarray([f[4] for f in found], dtype=str).reshape(P),
            "n_candidates": int(n_candidates), "n_documents": n_docs}


def passages_sha(passages: dict) -> str:
    """Fingerprint of the scored token sequences (a score cache is valid for these only)."""
    h = hashlib.sha256()
    for key in ("windows_PxT1", "length_P", "n_target_P"):
        h.update(np.ascontiguousarray(passages[key]).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- scoring

def score_passages(params, config, passages: dict, *, batch_size: int = 32) -> dict:
    """``{"loglik_P": float64, "correct_P": bool}``: the target tokens' summed log-probability
    and whether each of them is the argmax, from the per-token statistics
    (:class:`salt.runtime.model.tokens.WindowStats`) on fixed ``[batch, T + 1]`` windows (one compile per model)."""
    windows = passages["windows_PxT1"]
    stats = WindowStats(params, config, batch_size=batch_size, impl=resolve_kernels("auto"))
    batch = stats.batch
    n_pass = windows.shape[0]
    loglik, correct = np.zeros(n_pass, np.float64), np.zeros(n_pass, bool)
    for start in range(0, n_pass, batch):
        rows = windows[start:start + batch]
        n = rows.shape[0]
        token_stats = stats(rows)
        ce_BxT, ok_BxT = token_stats["ce"].astype(np.float64), token_stats["correct"]
        for r in range(n):
            i = start + r
            span = slice(passages["length_P"][i] - passages["n_target_P"][i] - 1,
                         passages["length_P"][i] - 1)  # position j predicts token j + 1
            loglik[i] = -float(np.sum(ce_BxT[r, span]))
            correct[i] = bool(np.all(ok_BxT[r, span]))
    return {"loglik_P": loglik, "correct_P": correct}


# --------------------------------------------------------------------------- buckets

def difficulty_order(correct_P, loglik_P) -> np.ndarray:
    """Passage indices easiest first: correct before wrong, then higher log-likelihood, then index."""
    correct_P, loglik_P = np.asarray(correct_P, bool), np.asarray(loglik_P, np.float64)
    index_P = np.arange(correct_P.size)
    return np.lexsort((index_P, -loglik_P, ~correct_P))


def difficulty_buckets(correct_P, loglik_P) -> dict:
    """``{"easy": indices, "medium": ..., "hard": ...}``: tertiles of :func:`difficulty_order`."""
    order = difficulty_order(correct_P, loglik_P)
    if order.size < len(BUCKETS):
        raise ValueError(f"need at least {len(BUCKETS)} passages to bucket, got {order.size}")
    return dict(zip(BUCKETS, np.array_split(order, len(BUCKETS))))


def model_summary(scores: dict, buckets: dict) -> dict:
    """Accuracy and mean log-likelihood overall and per bucket."""
    c, ll = np.asarray(scores["correct_P"], np.float64), np.asarray(scores["loglik_P"])
    out = {"accuracy": float(c.mean()), "loglik": float(ll.mean()), "n": int(c.size), "buckets": {}}
    for b, idx in buckets.items():
        out["buckets"][b] = {"accuracy": float(c[idx].mean()), "loglik": float(ll[idx].mean()),
                             "n": int(idx.size)}
    return out


def paired_bucket_difference(scores: dict, base: dict, buckets: dict) -> dict:
    """Per metric (``accuracy``, ``loglik``), per bucket and overall (``all``): the mean
    per-passage difference (model - base) and its standard error."""
    out = {}
    for metric, key in (("accuracy", "correct_P"), ("loglik", "loglik_P")):
        d_P = np.asarray(scores[key], np.float64) - np.asarray(base[key], np.float64)
        out[metric] = {}
        for b, idx in list(buckets.items()) + [("all", np.arange(d_P.size))]:
            d = d_P[idx]
            se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
            out[metric][b] = {"mean": float(d.mean()), "se": se, "n": int(d.size)}
    return out
