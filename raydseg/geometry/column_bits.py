"""Range-image floods on bit masks: one uint64 per image column, bit r = row r (images of at most 64 rows).

The ground flood and the segment labelling both join 4-neighbours of a column-major range image under a pairwise
test. Here the tests are turned into masks first, and the flood then moves whole columns with word operations:
  joined[c]   bit i: rows i and i + 1 of column c are joined (a vertical pair r, r + k bridging empty rows sets
              the bits r .. r + k - 1, see pair_run);
  pair[k-1, c] bit r: pixel (c, r) and pixel (c + k, r) are joined (columns wrap).
A flood grows a set of marked rows per column (`marked`) to the fixpoint of these joins, which is what a BFS over
the same joins reaches, in any visiting order.
"""
from __future__ import annotations

import numba
import numpy as np

MAX_ROWS = 64


@numba.njit(cache=True, inline="always", error_model="numpy")
def above_bits(a, thr):  # pragma: no cover - numba
    """uint64 with bit r set where a[r] > thr (a: one column, at most 64 rows); branch-free, vectorises."""
    m = np.uint64(0)
    for r in range(a.shape[0]):
        m |= (np.uint64(1) << np.uint64(r)) if a[r] > thr else np.uint64(0)
    return m


@numba.njit(cache=True, inline="always", error_model="numpy")
def at_most_bits(a, thr):  # pragma: no cover - numba
    """uint64 with bit r set where a[r] <= thr (NaN: unset)."""
    m = np.uint64(0)
    for r in range(a.shape[0]):
        m |= (np.uint64(1) << np.uint64(r)) if a[r] <= thr else np.uint64(0)
    return m


@numba.njit(cache=True, inline="always", error_model="numpy")
def near_bits(a0, a1, thr, n):  # pragma: no cover - numba
    """uint64 with bit r set where |a0[r] - a1[r]| < thr, r < n (NaN: unset); branch-free, vectorises."""
    m = np.uint64(0)
    for r in range(n):
        m |= (np.uint64(1) << np.uint64(r)) if abs(a0[r] - a1[r]) < thr else np.uint64(0)
    return m


@numba.njit(cache=True, inline="always", error_model="numpy")
def pair_run(q, k):  # pragma: no cover - numba
    """`joined` bits of the vertical pairs (r, r + k) marked in q (bit r): rows r .. r + k - 1."""
    b = np.uint64(0)
    for j in range(k):
        b |= q << np.uint64(j)
    return b


@numba.njit(cache=True, inline="always", error_model="numpy")
def closure(s, b, v):  # pragma: no cover - numba
    """The rows that marked rows `s` reach along a column's joined bits b, kept to the rows v. Shifts by 1, 2,
    4, .., 32 rows, each through the runs of 2^j joined pairs, reach up to 63 rows up, then down."""
    bk = b
    for k in (1, 2, 4, 8, 16, 32):
        s |= (s >> np.uint64(k)) & bk
        bk &= bk >> np.uint64(k)
    bk = b << np.uint64(1)
    for k in (1, 2, 4, 8, 16, 32):
        s |= (s << np.uint64(k)) & bk
        bk &= bk << np.uint64(k)
    return s & v


@numba.njit(cache=True, error_model="numpy")
def flood(marked, joined, valid, enter, pair, queue, queued, tail, touched, n_touched):  # pragma: no cover - numba
    """Grow `marked` (W,) uint64 from the columns queue[:tail] to the fixpoint: a column takes its closure along
    joined / valid, then marks its neighbours' rows that `pair` joins and `enter` allows. A column whose rows grew
    is queued again (queue: (W + 1,) ring buffer, queued: (W,) bool flags, all clear on return).
    touched: (W,) int64; the columns that go from no marked row to some are appended after its first n_touched.
    Returns the new count."""
    W = marked.shape[0]
    K = pair.shape[0]
    head = 0
    while head != tail:
        c = queue[head]
        head = head + 1 if head < W else 0
        queued[c] = False
        g = closure(marked[c], joined[c], valid[c])
        marked[c] = g
        for k in range(1, K + 1):
            for d, p in (((c + k) % W, c), ((c - k) % W, (c - k) % W)):
                t = g & pair[k - 1, p] & enter[d] & ~marked[d]
                if t:
                    if not marked[d]:
                        touched[n_touched] = d
                        n_touched += 1
                    marked[d] |= t
                    if not queued[d]:
                        queued[d] = True
                        queue[tail] = d
                        tail = tail + 1 if tail < W else 0
    return n_touched
