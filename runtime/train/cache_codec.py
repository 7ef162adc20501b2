"""The compact row codec of the teacher cache (docs/design.md §2): one target position's top-k
set of the teacher — ids, logits, the full-vocabulary lse — as a fixed-size byte row.

Row layout (little-endian), for vocabulary ``V``, set size ``k`` and ``b`` logit bits:

* bytes 0-3: ``lse`` (float32); 4-7: the row's largest logit ``m`` (float32); 8-9: the row's
  gap range ``G = m - min`` (float16, rounded up so every gap is <= G);
* then one bit stream (bit ``i`` is bit ``i % 8`` of byte ``i // 8``):

  - the ids as a set, Elias-Fano coded: ascending ``x_0 < … < x_{k-1}``, ``L = ⌊log2(V/k)⌋``
    low bits each (``k·L`` bits), then the high parts ``x_i >> L`` in unary (bit ``(x_i >> L) + i``
    set; ``((V-1) >> L) + k`` bits);
  - per id (ascending order) the gap ``g = m - logit`` quantised with square-root companding:
    ``q = round(sqrt(g / G)·M)``, ``M = 2^b - 1``, decoded ``g' = G·(q/M)²`` (``b`` bits each).

The set costs ``k·L + ((V-1) >> L) + k`` bits — near the ``log2 C(V, k)`` of an arbitrary set,
whatever the ids — so a row is ``10 + ⌈(k·L + ((V-1) >> L) + k + k·b) / 8⌉`` bytes (298 at
k = 128, V = 256,000, b = 5).  The error of a decoded logit is ``|g' - g| <= sqrt(g·G)/M +
G/(4M²)`` plus the float16 rounding of ``G`` (relative 2^-11 of ``g``); the top-k order is recovered
by sorting on ``q`` (ties to the lower id), so quantisation may swap entries whose logits differ by
less than one step.
"""
from __future__ import annotations

import numba
import numpy as np

HEAD_BYTES = 10  # lse f32, m f32, G f16
_BIT = np.zeros(129, np.int64)  # _BIT[1 << b] = b
for _b in range(8):
    _BIT[1 << _b] = _b


def low_bits(vocab: int, k: int) -> int:
    """``L = ⌊log2(V / k)⌋`` (0 when ``k >= V / 2``): the Elias-Fano low bits per id."""
    return max(0, int(np.floor(np.log2(vocab / k))))


def row_bytes(vocab: int, k: int, logit_bits: int) -> int:
    """Bytes of one coded row."""
    L = low_bits(vocab, k)
    bits = k * L + ((vocab - 1) >> L) + k + k * logit_bits
    return HEAD_BYTES + (bits + 7) // 8


@numba.njit(cache=True, nogil=True)
def _put(row, pos, value, n):
    for i in range(n):
        if (value >> i) & 1:
            row[(pos + i) >> 3] |= np.uint8(1 << ((pos + i) & 7))


@numba.njit(cache=True, nogil=True)
def _get(row, pos, n):
    first, shift = pos >> 3, pos & 7
    last = min((pos + n + 7) >> 3, row.shape[0])
    window = 0
    for j in range(first, last):
        window |= np.int64(row[j]) << (8 * (j - first))
    return (window >> shift) & ((1 << n) - 1)


@numba.njit(cache=True, nogil=True)
def _encode_bits(ids_NxK, q_NxK, out_NxR, vocab, L, logit_bits):
    N, k = ids_NxK.shape
    upper = ((vocab - 1) >> L) + k
    mask = (1 << L) - 1
    for n in range(N):
        row = out_NxR[n]
        pos = HEAD_BYTES * 8
        for i in range(k):
            _put(row, pos + i * L, ids_NxK[n, i] & mask, L)
        pos += k * L
        for i in range(k):
            p = pos + (ids_NxK[n, i] >> L) + i
            row[p >> 3] |= np.uint8(1 << (p & 7))
        pos += upper
        for i in range(k):
            _put(row, pos + i * logit_bits, q_NxK[n, i], logit_bits)


@numba.njit(cache=True, nogil=True)
def _decode_rows(rows_NxR, logits_NxK, ids_NxK, vocab, k, L, logit_bits):
    """Decode into the first ``K`` (``logits_NxK.shape[1]``) entries by ascending gap (ties to the
    lower id); returns the first damaged row's index or -1."""
    N, K = logits_NxK.shape
    upper = ((vocab - 1) >> L) + k
    M = np.float32((1 << logit_bits) - 1)
    ids = np.zeros(k, np.int64)
    key = np.zeros(k, np.int64)
    order = np.zeros(k, np.int64)
    count = np.zeros((1 << min(logit_bits, 10)) + 1, np.int64)
    for n in range(N):
        row = rows_NxR[n]
        pos = HEAD_BYTES * 8
        for i in range(k):
            ids[i] = _get(row, pos + i * L, L)
        pos += k * L
        i = 0
        for j in range(pos >> 3, (pos + upper + 7) >> 3):  # set bits of the unary stream, byte by byte
            byte = np.int64(row[j])
            while byte:
                low = byte & -byte
                p = 8 * j + _BIT[low] - pos
                byte ^= low
                if 0 <= p < upper and i < k:
                    ids[i] |= (p - i) << L
                    i += 1
        if i < k or ids[k - 1] >= vocab:
            return n
        pos += upper
        m = _f32(row, 4)
        G = _f16(row, 8)
        for i in range(k):
            key[i] = _get(row, pos + i * logit_bits, logit_bits)
        if logit_bits <= 10:  # counting sort by q: stable, so ties keep the lower id first
            count[:] = 0
            for i in range(k):
                count[key[i] + 1] += 1
            for v in range(1, count.shape[0]):
                count[v] += count[v - 1]
            for i in range(k):
                order[count[key[i]]] = i
                count[key[i]] += 1
        else:
            for i in range(k):
                key[i] = key[i] * k + i  # unique keys: the stable order
            order[:] = np.argsort(key)
            for i in range(k):
                key[i] //= k
        for j in range(K):
            u = np.float32(key[order[j]]) / M
            logits_NxK[n, j] = m - G * u * u
            ids_NxK[n, j] = ids[order[j]]
    return -1


@numba.njit(cache=True, nogil=True)
def _f32(row, at):
    bits = np.uint32(row[at]) | (np.uint32(row[at + 1]) << 8) | (np.uint32(row[at + 2]) << 16) \
        | (np.uint32(row[at + 3]) << 24)
    return np.array([bits], np.uint32).view(np.float32)[0]


@numba.njit(cache=True, nogil=True)
def _f16(row, at):
    bits = np.int64(row[at]) | (np.int64(row[at + 1]) << 8)  # IEEE half, widened by hand
    sign = -1.0 if bits >> 15 else 1.0
    exp, frac = (bits >> 10) & 31, bits & 1023
    if exp == 0:
        return np.float32(sign * frac * 2.0 ** -24)
    return np.float32(sign * (1.0 + frac / 1024.0) * 2.0 ** (exp - 15))


def encode(top_NxK, ids_NxK, lse_N, *, vocab: int, logit_bits: int) -> np.ndarray:
    """Rows ``[N, row_bytes]`` uint8 of the top-k logits ``top_NxK`` (float32, any order), their
    distinct ids ``ids_NxK`` in ``[0, V)`` and ``lse_N``."""
    top = np.asarray(top_NxK, np.float32)
    ids = np.asarray(ids_NxK, np.int64)
    N, k = top.shape
    if not 1 <= logit_bits <= 16:
        raise ValueError(f"logit_bits must be in [1, 16], got {logit_bits}")
    order = np.argsort(ids, axis=-1, kind="stable")
    ids = np.take_along_axis(ids, order, -1)
    top = np.take_along_axis(top, order, -1)
    if N and k and (ids.min() < 0 or ids.max() >= vocab or (k > 1 and (np.diff(ids, axis=-1) == 0).any())):
        raise ValueError(f"ids must be distinct per row and in [0, {vocab})")
    m = top.max(-1) if k else np.zeros(N, np.float32)
    gap = (m[:, None] - top).astype(np.float64)
    G = np.asarray(gap.max(-1) if k else np.zeros(N), np.float16)
    G = np.where(G.astype(np.float64) < gap.max(-1, initial=0.0), np.nextafter(G, np.float16(np.inf)), G)
    M = (1 << logit_bits) - 1
    Gf = G.astype(np.float64)[:, None]
    u = np.sqrt(np.divide(gap, Gf, out=np.zeros_like(gap), where=Gf > 0))
    q = np.clip(np.rint(u * M), 0, M).astype(np.int64)
    out = np.zeros((N, row_bytes(vocab, k, logit_bits)), np.uint8)
    out[:, 0:4] = np.asarray(lse_N, np.float32).reshape(N, 1).view(np.uint8)
    out[:, 4:8] = m.astype(np.float32).reshape(N, 1).view(np.uint8)
    out[:, 8:10] = G.reshape(N, 1).view(np.uint8)
    _encode_bits(ids, q, out, vocab, low_bits(vocab, k), logit_bits)
    return out


def decode(rows_NxR, *, vocab: int, k: int, logit_bits: int, keep: int | None = None):
    """``(logits_NxK float32, ids_NxK int32, lse_N float32)`` of coded rows, the first ``keep``
    (default ``k``) in descending logit order (ties to the lower id).  Raises ValueError for a row
    that does not decode to ``k`` ids in ``[0, V)``."""
    rows = np.ascontiguousarray(rows_NxR, np.uint8)
    N = rows.shape[0]
    if rows.shape[1:] != (row_bytes(vocab, k, logit_bits),):
        raise ValueError(f"rows are {rows.shape[1:]} bytes, expected {row_bytes(vocab, k, logit_bits)}")
    keep = k if keep is None else keep
    logits = np.empty((N, keep), np.float32)
    ids = np.empty((N, keep), np.int32)
    bad = _decode_rows(rows, logits, ids, vocab, k, low_bits(vocab, k), logit_bits) if k else -1
    if bad >= 0:
        raise ValueError(f"row {bad} does not hold {k} distinct ids < {vocab}")
    return logits, ids, rows[:, 0:4].copy().view(np.float32).reshape(N)
