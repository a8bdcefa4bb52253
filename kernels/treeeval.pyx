# cython: language_level=3
"""Tree-ensemble evaluation for the latency predictor: every tree, every candidate, one call.

The layout is scheduler/core/predictor/model.py's CompiledEnsemble:

* ``nodes``: one 16-byte record per node (feature, threshold, left, value), so a step
  touches a single cache line. A split's children are adjacent records, ``left`` and
  ``left + 1``: the step is ``left + (x >= threshold)``, an add instead of a branch,
  because the direction a candidate takes is data-dependent and a branch on it would be
  mispredicted half the time. A leaf points to itself with a NaN threshold (no value
  compares >= NaN), so walking every tree to its full depth needs no "is this a leaf" test.
* ``missing_right``: 1 where a missing (NaN) feature goes right (xgboost's default_left
  is 0). Read only for rows holding a NaN, which take a slower walk.
* ``roots`` / ``depths``: each tree's root record and the steps that reach its deepest leaf.

Trees run in the outer loop and all candidates advance one level at a time: a tree's
nodes stay in L1 while every candidate walks it, and the candidates' walks at one level
are independent loads the CPU overlaps, instead of one walk's dependent loads in a row.
"""

cimport cython
from libc.stdlib cimport free, malloc

ctypedef struct Node:
    int feature
    float threshold
    int left
    float value


@cython.boundscheck(False)
@cython.wraparound(False)
def ensemble_margin(
    const float[:, ::1] features,
    const Node[::1] nodes,
    const unsigned char[::1] missing_right,
    const int[::1] roots,
    const int[::1] depths,
    double base_score,
    double[::1] out,
):
    """Write base_score + the sum of every tree's leaf value for each row into ``out``.

    The caller guarantees what the walk does not check: every feature index is below
    ``features.shape[1]``, every child index and root is a valid record, and
    ``missing_right`` has an entry per record (model.py validates an ensemble once, when
    it is compiled or loaded).
    """
    cdef Py_ssize_t rows = features.shape[0]
    cdef Py_ssize_t width = features.shape[1]
    cdef Py_ssize_t trees = roots.shape[0]
    cdef Py_ssize_t t, r, step, depth, i
    cdef int root, at_r
    cdef const Node* node
    cdef const float* base_row
    cdef float x
    cdef int* at
    cdef bint any_missing = False
    if out.shape[0] < rows:
        raise ValueError("out has fewer slots than there are rows")
    if missing_right.shape[0] != nodes.shape[0]:
        raise ValueError("missing_right needs one entry per node")
    if rows == 0:
        return
    base_row = &features[0, 0]
    at = <int*>malloc(rows * sizeof(int))
    if at == NULL:
        raise MemoryError()
    with nogil:
        for i in range(rows * width):
            if base_row[i] != base_row[i]:
                any_missing = True
                break
        for r in range(rows):
            out[r] = base_score
        for t in range(trees):
            root = roots[t]
            depth = depths[t]
            for r in range(rows):
                at[r] = root
            if not any_missing:
                for step in range(depth):
                    for r in range(rows):
                        node = &nodes[at[r]]
                        at[r] = node.left + (base_row[r * width + node.feature] >= node.threshold)
            else:
                for step in range(depth):
                    for r in range(rows):
                        at_r = at[r]
                        node = &nodes[at_r]
                        x = base_row[r * width + node.feature]
                        if x != x:
                            at[r] = node.left + missing_right[at_r]
                        else:
                            at[r] = node.left + (x >= node.threshold)
            for r in range(rows):
                out[r] += nodes[at[r]].value
    free(at)
