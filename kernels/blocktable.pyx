# cython: language_level=3
"""Block table: the storage under the prefix index, in C structures.

Same API and results as scheduler/core/blocktable_ref.py (read its docstring for the
rules). The budget is one cache line per block on a prefix walk and at most 64 bytes per
(block, worker) entry, from 8 to 4,096 workers. Layout and why:

* nodes: 40-byte records in chunks of 2**20 (no moves on growth; exactly 20 huge pages,
  so a walk's node reads do not miss the TLB as well as the cache): key, parent, a meta
  word (child count, holder format, a "has reference counts above one" flag) and 24
  bytes of holders in one of three formats:
  - LOW: GPU, CPU and STORAGE bitmasks of workers 0..63. Every node of a pool of up to
    64 workers (the index hands out the lowest free worker id) is LOW, so the walk is a
    chain of ANDs on one word: a block whose mask ANDs to zero ends it.
  - SPARSE: up to 12 16-bit entries (worker << 3 | tier bits), for a node held by few
    workers once some worker id is 64 or more (sessions live on one to three workers).
  - WIDE: the index of an out-of-line record of three bitmasks as wide as the pool, for
    a node held by more than 12 workers of a wide pool (shared system prompts).
  A 1,000-worker pool thus pays 40 bytes for a session block and 40 + 384 for a system
  prompt block that all 1,000 hold, instead of 384 for every block.
* key -> node: open addressing over 8-byte slots (32-bit tag of the key's hash, 32-bit
  node index), linear probing, tombstones on deletion and a rebuild from the node chunks
  (sequential reads) when they or the load pass 3/4. The tag decides almost every probe
  without touching a node; a tag match is confirmed against the node's key, which the
  walk reads next anyway. Half the bytes of a (key, index) slot.
* per worker: engine hash -> key (16-byte slots, load kept in 0.57-0.85: the capacity
  grows by half, not doubles, as this map is most of the bytes) and a count of the nodes
  it holds. Clearing a worker walks its engine map (plus a small set of nodes whose
  mapping a later store of the same engine hash overwrote), so no per-worker set of
  nodes is kept: that set cost 8 bytes per entry for an operation that happens on
  restarts only.
* reference counts above one (rare: vLLM stores a hash once per tier) live in a side
  map keyed by (node, worker, tier); the holder bit means "count >= 1".
* only under a block bound: per node, sibling links and an LRU stamp (a parallel
  24-byte record; subtree eviction needs the children, unbounded tables only their
  count), plus a queue of (node, stamp) in touch order; entries whose stamp is stale are
  skipped, and the queue is compacted when it outgrows the table. The front valid entry
  is the least recently touched node, exactly as the reference's ordered dict has it.
* a lookup whose keys are a PromptKeys (below) hashes blocks as the walk reaches them:
  once no worker matches, the rest of the prompt is never hashed. Table slots are
  fetched 8 blocks ahead and nodes 4 ahead of the walk (32 and 16 when the keys are
  given), so the walk overlaps its cache misses with hashing instead of waiting on them.
* vLLM's event batches (msgpack) are decoded by _kvbatch.pxi into arrays of hashes and
  token ids and applied from there (apply_payload): no Python object per block.
"""

include "_hashcore.pxi"

cimport cython
from cpython.long cimport PyLong_FromUnsignedLongLong
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from libc.stdlib cimport calloc, realloc
from libc.string cimport memcpy, memset

import sys

import numpy as np
from msgpack import unpackb as _unpackb

cdef extern from *:
    """
    #include <stdlib.h>
    #include <string.h>
    #if defined(__GNUC__) || defined(__clang__)
    #define kv_ctz64(x) __builtin_ctzll(x)
    #define kv_popcount64(x) __builtin_popcountll(x)
    #define kv_prefetch(p) __builtin_prefetch((p), 0, 3)
    #define kv_prefetch_w(p) __builtin_prefetch((p), 1, 3)
    #else
    static inline int kv_ctz64(uint64_t x) { int n = 0; while (!(x & 1)) { x >>= 1; n++; } return n; }
    static inline int kv_popcount64(uint64_t x) { int n = 0; while (x) { x &= x - 1; n++; } return n; }
    #define kv_prefetch(p) ((void)(p))
    #define kv_prefetch_w(p) ((void)(p))
    #endif
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    #define KV_HUGE ((size_t)2 << 20)

    /* Cache-line aligned; with `huge`, regions of 2 MiB and more are 2 MiB aligned and
       offered to transparent huge pages, because a big table is touched at random and
       4 KiB pages would add a TLB miss to every cache miss. Small tables stay on small
       pages so that many of them cost little resident memory. */
    static inline void *kv_big_alloc(size_t size, int zero, int huge) {
        void *p = NULL;
        huge = huge && size >= KV_HUGE;
        if (posix_memalign(&p, huge ? KV_HUGE : 64, size) != 0) return NULL;
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (huge) madvise(p, size, MADV_HUGEPAGE);
    #endif
        if (zero) memset(p, 0, size);
        return p;
    }

    /* A node's holders, in the format its meta word names (see the module docstring).
       A union, so that the three views of the same 24 bytes are legal C. */
    typedef union { uint64_t m[3]; uint16_t e[12]; } kv_holders;
    typedef struct { uint64_t key; int32_t parent; uint32_t meta; kv_holders h; } kv_node;
    typedef struct { int32_t first_child; int32_t next_sib; int32_t prev_sib; uint32_t spare;
                     uint64_t stamp; } kv_links;

    /* One prefix match as an instance of a tuple subclass (the index's PrefixMatch),
       built the way tuple.__new__ builds one for a subclass, minus the argument tuple. */
    static PyObject *kv_match_tuple(PyTypeObject *cls, long total, long gpu, long cpu, long storage) {
        long values[4] = {total, gpu, cpu, storage};
        PyObject *t = cls->tp_alloc(cls, 4);
        int i;
        if (t == NULL) return NULL;
        for (i = 0; i < 4; i++) {
            PyObject *v = PyLong_FromLong(values[i]);
            if (v == NULL) { Py_DECREF(t); return NULL; }
            PyTuple_SET_ITEM(t, i, v);
        }
        return t;
    }

    static PyObject *kv_new_dict(Py_ssize_t n) {
    #if PY_VERSION_HEX < 0x030E0000
        return _PyDict_NewPresized(n);
    #else
        (void)n;
        return PyDict_New();
    #endif
    }
    """
    int kv_ctz64(uint64_t x) nogil
    int kv_popcount64(uint64_t x) nogil
    void kv_prefetch(const void* p) nogil
    void kv_prefetch_w(const void* p) nogil
    void* kv_big_alloc(size_t size, int zero, int huge) nogil
    ctypedef union kv_holders:
        uint64_t m[3]
        uint16_t e[12]
    ctypedef struct kv_node:
        uint64_t key
        int32_t parent
        uint32_t meta
        kv_holders h
    ctypedef struct kv_links:
        int32_t first_child
        int32_t next_sib
        int32_t prev_sib
        uint32_t spare
        uint64_t stamp
    object kv_match_tuple(PyTypeObject* cls, long total, long gpu, long cpu, long storage)
    object kv_new_dict(Py_ssize_t n)

# Worker ids fit 12 bits so that a SPARSE entry (worker << 3 | tiers) fits 16.
MAX_WORKERS_LIMIT = 1 << 12

cdef enum:
    TIERS = 3
    # 2**20 nodes of 40 bytes are exactly 20 huge pages (and their 24-byte links 12).
    CHUNK_SHIFT = 20
    CHUNK_NODES = 1 << 20
    CHUNK_MASK = (1 << 20) - 1
    MAX_CHUNKS = 1 << 9             # 2**29 nodes, what the child count's 29 bits allow
    META_CHILDREN = 0x1FFFFFFF
    META_FMT_SHIFT = 29
    FMT_LOW = 0
    FMT_SPARSE = 1
    FMT_WIDE = 2
    SPARSE_SLOTS = 12
    RING = 32
    # Blocks hashed per call into PromptKeys during a walk: ids in a uint64 buffer hash at
    # ~17 ns a block, a list's at ~30-50 (one int object read per token), vLLM's SHA-256 at
    # ~350; the walk's prefetch lead follows (see _walk).
    LAZY_STEP = 4
    LAZY_STEP_BUFFER = 8

cdef uint32_t META_MULTI = 0x80000000U
cdef uint32_t TOMB = 0xFFFFFFFFU
cdef uint64_t FIB64 = 0x9E3779B97F4A7C15ULL


from scheduler.core import blockhash_ref as _ref

cdef object _cbor_canonical = _ref.cbor_canonical

include "_cbor.pxi"
include "_sha256.pxi"
include "_promptkeys.pxi"
include "_kvbatch.pxi"


# --- uint64 -> uint64 open addressing (value 0 = empty slot) ------------------------------
# Linear probing over a capacity that grows by half at 0.85 load (the home is a
# multiply-high, not a mask), so the load stays in 0.57-0.85. The per-worker engine maps
# are one 16-byte slot per (block, worker) entry: doubling at 0.8 left them at 0.4-0.8
# load, 20-40 bytes an entry, the table's largest cost. (Robin Hood probing held 0.9 but
# cost 137 instructions an insert, 20% of the ingest rate.)

cdef struct MapSlot:
    uint64_t k
    uint64_t v

cdef struct U64Map:
    MapSlot* slots
    uint64_t cap
    Py_ssize_t count


cdef extern from *:
    """
    static inline uint64_t kv_mulhi(uint64_t a, uint64_t b) {
    #if defined(__SIZEOF_INT128__)
        return (uint64_t)(((__uint128_t)a * b) >> 64);
    #else
        uint64_t al = a & 0xFFFFFFFFu, ah = a >> 32, bl = b & 0xFFFFFFFFu, bh = b >> 32;
        uint64_t mid = (al * bl >> 32) + (al * bh & 0xFFFFFFFFu) + (ah * bl & 0xFFFFFFFFu);
        return ah * bh + (al * bh >> 32) + (ah * bl >> 32) + (mid >> 32);
    #endif
    }
    """
    uint64_t kv_mulhi(uint64_t a, uint64_t b) nogil


cdef inline uint64_t _home(const U64Map* m, uint64_t k) noexcept nogil:
    return kv_mulhi(k * FIB64, m.cap)


cdef inline uint64_t _next(const U64Map* m, uint64_t i) noexcept nogil:
    i += 1
    return 0 if i == m.cap else i


cdef inline uint64_t _dist(const U64Map* m, uint64_t i, uint64_t home) noexcept nogil:
    return i - home if i >= home else i + m.cap - home


cdef int _map_init(U64Map* m, uint64_t capacity) except -1:
    m.slots = <MapSlot*>kv_big_alloc(capacity * sizeof(MapSlot), 1, 1)
    if m.slots == NULL:
        raise MemoryError()
    m.cap = capacity
    m.count = 0
    return 0


cdef void _map_free(U64Map* m) noexcept nogil:
    free(m.slots)
    m.slots = NULL
    m.cap = 0
    m.count = 0


cdef inline MapSlot* _map_place(const U64Map* m, uint64_t k) noexcept nogil:
    """The slot holding k, or the empty slot where k goes."""
    cdef uint64_t i = _home(m, k)
    cdef MapSlot* s
    while True:
        s = &m.slots[i]
        if s.v == 0 or s.k == k:
            return s
        i = _next(m, i)


cdef inline MapSlot* _map_find(const U64Map* m, uint64_t k) noexcept nogil:
    cdef MapSlot* s
    if m.slots == NULL:
        return NULL
    s = _map_place(m, k)
    return NULL if s.v == 0 else s


cdef inline uint64_t _map_get(const U64Map* m, uint64_t k) noexcept nogil:
    cdef MapSlot* s = _map_find(m, k)
    return 0 if s == NULL else s.v


cdef inline void _map_prefetch(const U64Map* m, uint64_t k) noexcept nogil:
    if m.slots != NULL:
        kv_prefetch_w(&m.slots[_home(m, k)])


cdef int _map_grow(U64Map* m) except -1:
    cdef U64Map bigger
    cdef uint64_t i
    cdef MapSlot* s
    _map_init(&bigger, m.cap + m.cap // 2 if m.slots != NULL else 8)
    if m.slots != NULL:
        for i in range(m.cap):
            if m.slots[i].v != 0:
                s = _map_place(&bigger, m.slots[i].k)
                s[0] = m.slots[i]
        bigger.count = m.count
        free(m.slots)
    m[0] = bigger
    return 0


cdef inline MapSlot* _map_claim(U64Map* m, uint64_t k) except NULL:
    """The slot holding k, or the empty slot where k goes, its key set (room for one
    insert is made first); the caller sets the value (and counts a new entry)."""
    cdef MapSlot* s
    if m.slots == NULL or <uint64_t>(m.count + 1) * 20 > m.cap * 17:
        _map_grow(m)
    s = _map_place(m, k)
    s.k = k
    return s


cdef inline int _map_put(U64Map* m, uint64_t k, uint64_t v) except -1:
    cdef MapSlot* s = _map_claim(m, k)
    if s.v == 0:
        m.count += 1
    s.v = v
    return 0


cdef bint _map_del(U64Map* m, uint64_t k) noexcept nogil:
    cdef MapSlot* s = _map_find(m, k)
    cdef uint64_t i, j
    if s == NULL:
        return False
    # Backward-shift deletion: pull later entries of the cluster into the hole when the
    # hole lies between their home and where they sit, so probes never need tombstones.
    i = s - m.slots
    j = i
    while True:
        j = _next(m, j)
        if m.slots[j].v == 0:
            break
        if _dist(m, j, _home(m, m.slots[j].k)) >= _dist(m, j, i):
            m.slots[i] = m.slots[j]
            i = j
    m.slots[i].v = 0
    m.slots[i].k = 0
    m.count -= 1
    return True


cdef inline Py_ssize_t _map_bytes(const U64Map* m) noexcept nogil:
    return <Py_ssize_t>m.cap * sizeof(MapSlot)


# --- walk helpers ----------------------------------------------------------------------

cdef inline void _record_drops(uint64_t bits, int base, int32_t depth, int32_t* total) noexcept nogil:
    while bits:
        total[base + kv_ctz64(bits)] = depth
        bits &= bits - 1


cdef inline void _count_slow_tiers(uint64_t now, uint64_t gpu, uint64_t cpu_mask, int base,
                                   int32_t* cpu, int32_t* storage) noexcept nogil:
    # Workers still matching that hold this block only outside GPU memory.
    cdef uint64_t bits = now & ~gpu
    cdef int worker
    while bits:
        worker = base + kv_ctz64(bits)
        if (cpu_mask >> (worker - base)) & 1:
            cpu[worker] += 1
        else:
            storage[worker] += 1
        bits &= bits - 1


cdef inline Py_ssize_t _touched(Py_ssize_t records, size_t size) noexcept nogil:
    """Bytes of huge pages that the first ``records`` records of a chunked array reach."""
    cdef Py_ssize_t full = records >> CHUNK_SHIFT
    cdef Py_ssize_t rest = (records & CHUNK_MASK) * <Py_ssize_t>size
    cdef Py_ssize_t page = 2 << 20
    return full * CHUNK_NODES * <Py_ssize_t>size + (rest + page - 1) // page * page


cdef inline uint32_t _fmt(const kv_node* node) noexcept nogil:
    return (node.meta >> META_FMT_SHIFT) & 3


cdef inline void _set_fmt(kv_node* node, uint32_t fmt) noexcept nogil:
    node.meta = (node.meta & ~(<uint32_t>3 << META_FMT_SHIFT)) | (fmt << META_FMT_SHIFT)


cdef inline int _sparse_len(const kv_node* node) noexcept nogil:
    cdef int k = 0
    while k < SPARSE_SLOTS and node.h.e[k] != 0:
        k += 1
    return k


cdef struct KeySrc:
    const uint64_t* keys
    Py_ssize_t n
    Py_ssize_t ready
    PyObject* lazy          # a PromptKeys that hashes on demand, or NULL
    Py_ssize_t step         # blocks hashed per call into it


cdef struct LruEntry:
    int32_t idx
    uint32_t spare
    uint64_t stamp


@cython.final
cdef class BlockTable:
    """Blocks per worker and tier, as a forest of chained keys (C structures)."""

    cdef int _max_workers
    cdef int _words
    cdef int _hi                   # highest worker id ever added to a node (-1: none)
    cdef Py_ssize_t _max_blocks
    cdef kv_node** _chunks
    cdef kv_links** _lchunks       # parallel link records, only under a block bound
    cdef Py_ssize_t _nchunks
    cdef Py_ssize_t _used
    cdef Py_ssize_t _count
    cdef int32_t _free_head
    # key -> node
    cdef uint64_t* _kslots
    cdef uint64_t _kmask
    cdef int _kshift
    cdef Py_ssize_t _klive
    cdef Py_ssize_t _ktomb
    # per worker
    cdef U64Map* _engine
    cdef U64Map* _extra
    cdef Py_ssize_t* _held
    # WIDE holder records: 3 * words uint64 each
    cdef uint64_t* _wide
    cdef Py_ssize_t _wide_used
    cdef Py_ssize_t _wide_cap
    cdef int64_t _wide_free
    cdef Py_ssize_t _wide_live
    cdef int _rec_words
    # counts above one, keyed (node << 14 | worker << 2 | tier)
    cdef U64Map _multi
    # recency (bounded tables)
    cdef uint64_t _clock
    cdef LruEntry* _lru
    cdef Py_ssize_t _lru_head
    cdef Py_ssize_t _lru_tail
    cdef Py_ssize_t _lru_cap
    cdef Py_ssize_t _unknown
    cdef Py_ssize_t _evicted
    # scratch
    cdef uint64_t* _s_keys
    cdef uint64_t* _s_hashes
    cdef int32_t* _s_idx
    cdef Py_ssize_t _s_cap
    cdef uint64_t* _alive
    cdef uint64_t* _now
    cdef uint64_t* _ever
    cdef int32_t* _run_total
    cdef int32_t* _run_cpu
    cdef int32_t* _run_storage
    cdef int32_t* _stack
    cdef Py_ssize_t _stack_cap
    # vLLM batches decoded in place (apply_payload), and the salts of their extra keys
    cdef Decoded _dec
    cdef uint64_t* _dec_salts
    cdef Py_ssize_t _dec_salts_cap

    def __cinit__(self, int max_workers=128, Py_ssize_t max_blocks=0):
        if not 1 <= max_workers <= MAX_WORKERS_LIMIT:
            raise ValueError(f"max_workers must be in 1..{MAX_WORKERS_LIMIT}")
        if max_blocks < 0:
            raise ValueError("max_blocks must be >= 0")
        self._max_workers = max_workers
        self._words = (max_workers + 63) // 64
        self._rec_words = TIERS * self._words
        self._hi = -1
        self._max_blocks = max_blocks
        self._free_head = -1
        self._wide_free = -1
        self._kslots = <uint64_t*>kv_big_alloc(16 * sizeof(uint64_t), 1, 0)
        if self._kslots == NULL:
            raise MemoryError()
        self._kmask = 15
        self._kshift = 60
        self._engine = <U64Map*>calloc(max_workers, sizeof(U64Map))
        self._extra = <U64Map*>calloc(max_workers, sizeof(U64Map))
        self._held = <Py_ssize_t*>calloc(max_workers, sizeof(Py_ssize_t))
        self._alive = <uint64_t*>calloc(self._words, sizeof(uint64_t))
        self._now = <uint64_t*>calloc(self._words, sizeof(uint64_t))
        self._ever = <uint64_t*>calloc(self._words, sizeof(uint64_t))
        self._run_total = <int32_t*>calloc(max_workers, sizeof(int32_t))
        self._run_cpu = <int32_t*>calloc(max_workers, sizeof(int32_t))
        self._run_storage = <int32_t*>calloc(max_workers, sizeof(int32_t))
        if (self._engine == NULL or self._extra == NULL or self._held == NULL
                or self._alive == NULL or self._now == NULL or self._ever == NULL
                or self._run_total == NULL or self._run_cpu == NULL or self._run_storage == NULL):
            raise MemoryError()

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self._nchunks):
            free(self._chunks[i])
            if self._lchunks != NULL:
                free(self._lchunks[i])
        free(self._chunks)
        free(self._lchunks)
        free(self._kslots)
        if self._engine != NULL:
            for i in range(self._max_workers):
                _map_free(&self._engine[i])
            free(self._engine)
        if self._extra != NULL:
            for i in range(self._max_workers):
                _map_free(&self._extra[i])
            free(self._extra)
        free(self._held)
        free(self._wide)
        _map_free(&self._multi)
        free(self._lru)
        free(self._s_keys)
        free(self._s_hashes)
        free(self._s_idx)
        free(self._alive)
        free(self._now)
        free(self._ever)
        free(self._run_total)
        free(self._run_cpu)
        free(self._run_storage)
        free(self._stack)
        _decoded_free(&self._dec)
        free(self._dec_salts)

    # --- nodes -----------------------------------------------------------------------

    cdef inline kv_node* _node(self, int32_t idx) noexcept nogil:
        return &self._chunks[idx >> CHUNK_SHIFT][idx & CHUNK_MASK]

    cdef inline kv_links* _links(self, int32_t idx) noexcept nogil:
        return &self._lchunks[idx >> CHUNK_SHIFT][idx & CHUNK_MASK]

    cdef int32_t _new_node(self, uint64_t key, int32_t parent) except -1:
        cdef int32_t idx
        cdef kv_node* node
        cdef kv_links* link
        if self._free_head >= 0:
            idx = self._free_head
            self._free_head = self._node(idx).parent
        else:
            if self._used == self._nchunks * CHUNK_NODES:
                self._add_chunk()
            idx = <int32_t>self._used
            self._used += 1
        node = self._node(idx)
        node.key = key
        node.parent = parent
        node.meta = 0
        node.h.m[0] = 0
        node.h.m[1] = 0
        node.h.m[2] = 0
        if parent >= 0:
            self._node(parent).meta += 1
        if self._lchunks != NULL:
            link = self._links(idx)
            link.first_child = -1
            link.next_sib = -1
            link.prev_sib = -1
            link.stamp = 0
            if parent >= 0:
                link.next_sib = self._links(parent).first_child
                if link.next_sib >= 0:
                    self._links(link.next_sib).prev_sib = idx
                self._links(parent).first_child = idx
        self._count += 1
        return idx

    cdef int _add_chunk(self) except -1:
        cdef void* grown
        cdef kv_node* chunk
        cdef kv_links* links
        if self._nchunks >= MAX_CHUNKS:
            raise MemoryError("block table is full (2**29 nodes)")
        grown = realloc(self._chunks, (self._nchunks + 1) * sizeof(kv_node*))
        if grown == NULL:
            raise MemoryError()
        self._chunks = <kv_node**>grown
        chunk = <kv_node*>kv_big_alloc(CHUNK_NODES * sizeof(kv_node), 0, 1)
        if chunk == NULL:
            raise MemoryError()
        self._chunks[self._nchunks] = chunk
        if self._max_blocks:
            grown = realloc(self._lchunks, (self._nchunks + 1) * sizeof(kv_links*))
            if grown == NULL:
                free(chunk)
                raise MemoryError()
            self._lchunks = <kv_links**>grown
            links = <kv_links*>kv_big_alloc(CHUNK_NODES * sizeof(kv_links), 0, 1)
            if links == NULL:
                free(chunk)
                raise MemoryError()
            self._lchunks[self._nchunks] = links
        self._nchunks += 1
        return 0

    cdef void _unlink(self, int32_t idx) noexcept nogil:
        """Detach a node from its parent (child count, and sibling links when kept)."""
        cdef kv_node* node = self._node(idx)
        cdef kv_links* link
        if node.parent >= 0:
            self._node(node.parent).meta -= 1
        if self._lchunks != NULL:
            link = self._links(idx)
            if link.prev_sib >= 0:
                self._links(link.prev_sib).next_sib = link.next_sib
            elif node.parent >= 0:
                self._links(node.parent).first_child = link.next_sib
            if link.next_sib >= 0:
                self._links(link.next_sib).prev_sib = link.prev_sib
            link.prev_sib = -1
            link.next_sib = -1
        node.parent = -1

    cdef void _discard(self, int32_t idx) noexcept nogil:
        """Free a node already detached from the tree (or inside a subtree being freed)."""
        cdef kv_node* node = self._node(idx)
        self._kdelete(node.key, idx)
        if _fmt(node) == FMT_WIDE:
            self._wide_release(node.h.m[0])
        node.key = 0
        node.meta = 0
        node.parent = self._free_head
        self._free_head = idx
        if self._lchunks != NULL:
            self._links(idx).stamp = 0
        self._count -= 1

    cdef void _release(self, int32_t idx) noexcept nogil:
        """Free the node if nothing holds it and nothing hangs below it, then its parent likewise."""
        cdef kv_node* node
        cdef int32_t parent
        while idx >= 0:
            node = self._node(idx)
            if (node.meta & META_CHILDREN) or self._present(node):
                return
            parent = node.parent
            self._unlink(idx)
            self._discard(idx)
            idx = parent

    # --- key -> node -------------------------------------------------------------------
    # Slot: tag (high 32 bits) | node index + 1 (low 32 bits); 0 empty, low bits TOMB deleted.

    cdef inline int32_t _kfind(self, uint64_t key) noexcept nogil:
        cdef uint64_t h = key * FIB64
        cdef uint64_t i = h >> self._kshift
        cdef uint64_t tag = h & 0xFFFFFFFFULL
        cdef uint64_t s
        cdef uint32_t low
        while True:
            s = self._kslots[i]
            if s == 0:
                return -1
            low = <uint32_t>s
            if low != TOMB and (s >> 32) == tag and self._node(<int32_t>(low - 1)).key == key:
                return <int32_t>(low - 1)
            i = (i + 1) & self._kmask

    cdef inline int32_t _kprobe(self, uint64_t key) noexcept nogil:
        """The first node whose tag matches (-1: the key is absent), without reading nodes."""
        cdef uint64_t h = key * FIB64
        cdef uint64_t i = h >> self._kshift
        cdef uint64_t tag = h & 0xFFFFFFFFULL
        cdef uint64_t s
        while True:
            s = self._kslots[i]
            if s == 0:
                return -1
            if <uint32_t>s != TOMB and (s >> 32) == tag:
                return <int32_t>(<uint32_t>s - 1)
            i = (i + 1) & self._kmask

    cdef inline int32_t _kresolve(self, uint64_t key, int32_t candidate) noexcept nogil:
        if candidate < 0:
            return -1
        if self._node(candidate).key == key:
            return candidate
        return self._kfind(key)  # a tag shared by another key: rare

    cdef inline void _kprefetch(self, uint64_t key) noexcept nogil:
        kv_prefetch(&self._kslots[(key * FIB64) >> self._kshift])

    cdef int32_t _kclaim(self, uint64_t key, int32_t parent) except -2:
        """The node of key, created (under parent) when there is none."""
        cdef uint64_t h, i, tag, s
        cdef int64_t hole = -1
        cdef uint32_t low
        cdef int32_t idx
        if (self._klive + self._ktomb + 1) * 4 > <Py_ssize_t>(self._kmask + 1) * 3:
            self._krebuild()
        h = key * FIB64
        i = h >> self._kshift
        tag = h & 0xFFFFFFFFULL
        while True:
            s = self._kslots[i]
            if s == 0:
                break
            low = <uint32_t>s
            if low == TOMB:
                if hole < 0:
                    hole = <int64_t>i
            elif (s >> 32) == tag and self._node(<int32_t>(low - 1)).key == key:
                return <int32_t>(low - 1)
            i = (i + 1) & self._kmask
        idx = self._new_node(key, parent)
        if hole >= 0:
            i = <uint64_t>hole
            self._ktomb -= 1
        self._kslots[i] = (tag << 32) | (<uint64_t>idx + 1)
        self._klive += 1
        return idx

    cdef void _kdelete(self, uint64_t key, int32_t idx) noexcept nogil:
        cdef uint64_t i = (key * FIB64) >> self._kshift
        cdef uint64_t want = <uint64_t>idx + 1
        cdef uint64_t s
        while True:
            s = self._kslots[i]
            if s == 0:
                return
            if (s & 0xFFFFFFFFULL) == want:
                self._kslots[i] = TOMB
                self._klive -= 1
                self._ktomb += 1
                return
            i = (i + 1) & self._kmask

    cdef int _krebuild(self) except -1:
        """Rehash every live node into fresh slots: doubled when over 3/8 full, else the
        same size (tombstones purged). Reads the node chunks in order."""
        cdef uint64_t cap = self._kmask + 1
        cdef uint64_t* slots
        cdef uint64_t h, i, mask
        cdef int shift = self._kshift
        cdef Py_ssize_t idx
        cdef kv_node* node
        if (self._klive + 1) * 8 > <Py_ssize_t>cap * 3:
            cap *= 2
            shift -= 1
        slots = <uint64_t*>kv_big_alloc(cap * sizeof(uint64_t), 1, 1)
        if slots == NULL:
            raise MemoryError()
        mask = cap - 1
        for idx in range(self._used):
            node = &self._chunks[idx >> CHUNK_SHIFT][idx & CHUNK_MASK]
            if node.key == 0:
                continue
            h = node.key * FIB64
            i = h >> shift
            while slots[i] != 0:
                i = (i + 1) & mask
            slots[i] = ((h & 0xFFFFFFFFULL) << 32) | (<uint64_t>idx + 1)
        free(self._kslots)
        self._kslots = slots
        self._kmask = mask
        self._kshift = shift
        self._ktomb = 0
        return 0

    # --- holders -----------------------------------------------------------------------

    cdef inline uint64_t* _rec(self, uint64_t r) noexcept nogil:
        return self._wide + r * <uint64_t>self._rec_words

    cdef uint64_t _wide_alloc(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t r
        cdef Py_ssize_t cap
        cdef void* grown
        if self._wide_free >= 0:
            r = <uint64_t>self._wide_free
            self._wide_free = <int64_t>self._rec(r)[0]
        else:
            if self._wide_used == self._wide_cap:
                cap = max(2 * self._wide_cap, 16)
                grown = realloc(self._wide, cap * self._rec_words * sizeof(uint64_t))
                if grown == NULL:
                    raise MemoryError()
                self._wide = <uint64_t*>grown
                self._wide_cap = cap
            r = <uint64_t>self._wide_used
            self._wide_used += 1
        memset(self._rec(r), 0, self._rec_words * sizeof(uint64_t))
        self._wide_live += 1
        return r

    cdef void _wide_release(self, uint64_t r) noexcept nogil:
        self._rec(r)[0] = <uint64_t>self._wide_free
        self._wide_free = <int64_t>r
        self._wide_live -= 1

    cdef inline uint32_t _tiers(self, const kv_node* node, int worker) noexcept nogil:
        """Tier bits (1 GPU, 2 CPU, 4 STORAGE) that worker holds node in."""
        cdef uint32_t fmt = _fmt(node)
        cdef uint64_t bit
        cdef uint64_t* rec
        cdef int k, word
        if fmt == FMT_LOW:
            if worker >= 64:
                return 0
            bit = <uint64_t>1 << worker
            return (<uint32_t>((node.h.m[0] & bit) != 0) | (<uint32_t>((node.h.m[1] & bit) != 0) << 1)
                    | (<uint32_t>((node.h.m[2] & bit) != 0) << 2))
        if fmt == FMT_SPARSE:
            for k in range(SPARSE_SLOTS):
                if node.h.e[k] == 0:
                    break
                if (node.h.e[k] >> 3) == worker:
                    return node.h.e[k] & 7
            return 0
        rec = self._rec(node.h.m[0])
        word = worker >> 6
        bit = <uint64_t>1 << (worker & 63)
        return (<uint32_t>((rec[word] & bit) != 0) | (<uint32_t>((rec[self._words + word] & bit) != 0) << 1)
                | (<uint32_t>((rec[2 * self._words + word] & bit) != 0) << 2))

    cdef inline bint _present(self, const kv_node* node) noexcept nogil:
        cdef uint32_t fmt = _fmt(node)
        cdef uint64_t* rec
        cdef int i
        if fmt == FMT_LOW:
            return (node.h.m[0] | node.h.m[1] | node.h.m[2]) != 0
        if fmt == FMT_SPARSE:
            return node.h.e[0] != 0
        rec = self._rec(node.h.m[0])
        for i in range(self._rec_words):
            if rec[i]:
                return True
        return False

    cdef int _to_wide(self, kv_node* node) except -1:
        """Move a LOW or SPARSE node's holders to a WIDE record."""
        cdef uint64_t r = self._wide_alloc()
        cdef uint64_t* rec = self._rec(r)
        cdef uint32_t fmt = _fmt(node)
        cdef int k, t, worker, W = self._words
        cdef uint16_t entry
        if fmt == FMT_LOW:
            rec[0] = node.h.m[0]
            rec[W] = node.h.m[1]
            rec[2 * W] = node.h.m[2]
        else:
            for k in range(SPARSE_SLOTS):
                entry = node.h.e[k]
                if entry == 0:
                    break
                worker = entry >> 3
                for t in range(TIERS):
                    if entry & (1 << t):
                        rec[t * W + (worker >> 6)] |= <uint64_t>1 << (worker & 63)
        node.h.m[0] = r
        node.h.m[1] = 0
        node.h.m[2] = 0
        _set_fmt(node, FMT_WIDE)
        return 0

    cdef int _low_to_sparse(self, kv_node* node) except -1:
        cdef uint64_t g = node.h.m[0], c = node.h.m[1], s = node.h.m[2]
        cdef uint64_t bits = g | c | s
        cdef uint16_t entries[SPARSE_SLOTS]
        cdef int k = 0, worker
        memset(entries, 0, sizeof(entries))
        while bits:
            worker = kv_ctz64(bits)
            bits &= bits - 1
            entries[k] = <uint16_t>((worker << 3) | ((g >> worker) & 1) | (((c >> worker) & 1) << 1)
                                    | (((s >> worker) & 1) << 2))
            k += 1
        memcpy(node.h.e, entries, sizeof(entries))
        _set_fmt(node, FMT_SPARSE)
        return 0

    cdef uint32_t _add_tier(self, kv_node* node, int worker, int tier) except 0xFFFFFFFF:
        """Mark worker as holding node in tier; returns its tier bits before."""
        cdef uint32_t fmt = _fmt(node)
        cdef uint32_t old
        cdef uint64_t bit
        cdef uint64_t* rec
        cdef int k, n
        if worker > self._hi:
            self._hi = worker
        if fmt == FMT_LOW:
            if worker < 64:
                old = self._tiers(node, worker)
                node.h.m[tier] |= <uint64_t>1 << worker
                return old
            n = kv_popcount64(node.h.m[0] | node.h.m[1] | node.h.m[2])
            if n < SPARSE_SLOTS:
                self._low_to_sparse(node)
            else:
                self._to_wide(node)
            fmt = _fmt(node)
        if fmt == FMT_SPARSE:
            for k in range(SPARSE_SLOTS):
                if node.h.e[k] == 0:
                    node.h.e[k] = <uint16_t>((worker << 3) | (1 << tier))
                    return 0
                if (node.h.e[k] >> 3) == worker:
                    old = node.h.e[k] & 7
                    node.h.e[k] |= <uint16_t>(1 << tier)
                    return old
            self._to_wide(node)
        old = self._tiers(node, worker)
        rec = self._rec(node.h.m[0])
        rec[tier * self._words + (worker >> 6)] |= <uint64_t>1 << (worker & 63)
        return old

    cdef void _drop_tiers(self, kv_node* node, int worker, uint32_t tiers) noexcept nogil:
        """Clear the given tier bits of worker; a node nobody holds goes back to LOW."""
        cdef uint32_t fmt = _fmt(node)
        cdef uint64_t keep
        cdef uint64_t* rec
        cdef int k, last, t
        if fmt == FMT_LOW:
            if worker < 64:
                keep = ~(<uint64_t>1 << worker)
                for t in range(TIERS):
                    if tiers & (1 << t):
                        node.h.m[t] &= keep
            return
        if fmt == FMT_SPARSE:
            last = _sparse_len(node) - 1
            for k in range(last + 1):
                if (node.h.e[k] >> 3) == worker:
                    node.h.e[k] &= ~(<uint16_t>tiers)
                    if (node.h.e[k] & 7) == 0:
                        node.h.e[k] = node.h.e[last]
                        node.h.e[last] = 0
                        if last == 0:
                            _set_fmt(node, FMT_LOW)
                    return
            return
        rec = self._rec(node.h.m[0])
        keep = ~(<uint64_t>1 << (worker & 63))
        for t in range(TIERS):
            if tiers & (1 << t):
                rec[t * self._words + (worker >> 6)] &= keep
        if not self._present(node):
            self._wide_release(node.h.m[0])
            node.h.m[0] = 0
            _set_fmt(node, FMT_LOW)

    # --- reference counts above one ---------------------------------------------------------

    cdef inline uint64_t _multi_key(self, int32_t idx, int worker, int tier) noexcept nogil:
        return (<uint64_t>idx << 14) | (<uint64_t>worker << 2) | <uint64_t>tier

    cdef int _count_again(self, kv_node* node, int32_t idx, int worker, int tier) except -1:
        cdef uint64_t k = self._multi_key(idx, worker, tier)
        cdef MapSlot* s = _map_claim(&self._multi, k)
        if s.v == 0:
            self._multi.count += 1
            s.v = 2
        else:
            s.v += 1
        node.meta |= META_MULTI
        return 0

    cdef bint _uncount(self, int32_t idx, int worker, int tier) noexcept nogil:
        """Drop one of several references; False when only one was left."""
        cdef uint64_t k = self._multi_key(idx, worker, tier)
        cdef MapSlot* slot = _map_find(&self._multi, k)
        if slot == NULL:
            return False
        if slot.v == 2:
            _map_del(&self._multi, k)
        else:
            slot.v -= 1
        return True

    cdef void _drop_multi(self, int32_t idx, int worker) noexcept nogil:
        cdef int tier
        for tier in range(TIERS):
            _map_del(&self._multi, self._multi_key(idx, worker, tier))

    # --- recency ---------------------------------------------------------------------

    cdef int _touch(self, int32_t idx) except -1:
        cdef LruEntry* entry
        self._clock += 1
        self._links(idx).stamp = self._clock
        if self._lru_tail == self._lru_cap:
            self._lru_compact()
        entry = &self._lru[self._lru_tail]
        entry.idx = idx
        entry.stamp = self._clock
        self._lru_tail += 1
        return 0

    cdef inline bint _lru_valid(self, const LruEntry* entry) noexcept nogil:
        return self._node(entry.idx).key != 0 and self._links(entry.idx).stamp == entry.stamp

    cdef int _lru_compact(self) except -1:
        cdef Py_ssize_t i, kept = 0
        cdef Py_ssize_t cap
        cdef LruEntry* grown
        for i in range(self._lru_head, self._lru_tail):
            if self._lru_valid(&self._lru[i]):
                self._lru[kept] = self._lru[i]
                kept += 1
        self._lru_head = 0
        self._lru_tail = kept
        if kept * 2 >= self._lru_cap:
            cap = max(self._lru_cap * 2, 1024)
            grown = <LruEntry*>realloc(self._lru, cap * sizeof(LruEntry))
            if grown == NULL:
                raise MemoryError()
            self._lru = grown
            self._lru_cap = cap
        return 0

    cdef int32_t _lru_pop(self) noexcept nogil:
        cdef LruEntry* entry
        while self._lru_head < self._lru_tail:
            entry = &self._lru[self._lru_head]
            self._lru_head += 1
            if self._lru_valid(entry):
                return entry.idx
        return -1

    cdef int _push(self, int32_t idx, Py_ssize_t depth) except -1:
        cdef Py_ssize_t cap
        cdef int32_t* grown
        if depth == self._stack_cap:
            cap = max(self._stack_cap * 2, 256)
            grown = <int32_t*>realloc(self._stack, cap * sizeof(int32_t))
            if grown == NULL:
                raise MemoryError()
            self._stack = grown
            self._stack_cap = cap
        self._stack[depth] = idx
        return 0

    cdef void _forget_holders(self, kv_node* node, int32_t idx) noexcept nogil:
        """An evicted node: every holder loses it (engine mappings stay, as the reference's)."""
        cdef uint32_t fmt = _fmt(node)
        cdef uint64_t bits
        cdef uint64_t* rec
        cdef int k, i, worker
        if fmt == FMT_LOW:
            bits = node.h.m[0] | node.h.m[1] | node.h.m[2]
            while bits:
                worker = kv_ctz64(bits)
                bits &= bits - 1
                self._forget_holder(node, idx, worker)
        elif fmt == FMT_SPARSE:
            for k in range(SPARSE_SLOTS):
                if node.h.e[k] == 0:
                    break
                self._forget_holder(node, idx, node.h.e[k] >> 3)
        else:
            rec = self._rec(node.h.m[0])
            for k in range(self._words):
                bits = rec[k] | rec[self._words + k] | rec[2 * self._words + k]
                while bits:
                    worker = k * 64 + kv_ctz64(bits)
                    bits &= bits - 1
                    self._forget_holder(node, idx, worker)
            for i in range(self._rec_words):
                rec[i] = 0
        node.h.m[1] = 0
        node.h.m[2] = 0
        if fmt != FMT_WIDE:
            node.h.m[0] = 0

    cdef inline void _forget_holder(self, kv_node* node, int32_t idx, int worker) noexcept nogil:
        self._held[worker] -= 1
        if node.meta & META_MULTI:
            self._drop_multi(idx, worker)

    cdef int _enforce_bound(self) except -1:
        cdef int32_t victim, parent, x, child
        cdef Py_ssize_t before, depth
        cdef kv_node* node
        while self._count > self._max_blocks:
            victim = self._lru_pop()
            if victim < 0:
                return 0
            before = self._count
            parent = self._node(victim).parent
            self._unlink(victim)
            self._push(victim, 0)
            depth = 1
            while depth:
                depth -= 1
                x = self._stack[depth]
                child = self._links(x).first_child
                while child >= 0:
                    self._push(child, depth)
                    depth += 1
                    child = self._links(child).next_sib
                node = self._node(x)
                self._forget_holders(node, x)
                self._discard(x)
            if parent >= 0:
                self._release(parent)
            self._evicted += before - self._count
        return 0

    # --- arguments -------------------------------------------------------------------

    cdef int _check(self, int worker, int tier) except -1:
        if not 0 <= worker < self._max_workers:
            raise ValueError(f"worker {worker} outside 0..{self._max_workers - 1}")
        if not 0 <= tier < TIERS:
            raise ValueError(f"tier {tier} outside 0..{TIERS - 1}")
        return 0

    cdef int _reserve(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap
        cdef void* p
        if n <= self._s_cap:
            return 0
        cap = max(n, 2 * self._s_cap, 64)
        p = realloc(self._s_keys, cap * sizeof(uint64_t))
        if p == NULL:
            raise MemoryError()
        self._s_keys = <uint64_t*>p
        p = realloc(self._s_hashes, cap * sizeof(uint64_t))
        if p == NULL:
            raise MemoryError()
        self._s_hashes = <uint64_t*>p
        p = realloc(self._s_idx, cap * sizeof(int32_t))
        if p == NULL:
            raise MemoryError()
        self._s_idx = <int32_t*>p
        self._s_cap = cap
        return 0

    cdef int _read_u64s(self, object values, Py_ssize_t n, uint64_t* out) except -1:
        cdef Py_ssize_t i
        cdef U64View view
        if type(values) is list:
            for i in range(n):
                kv_mask_u64(PyList_GET_ITEM(values, i), &out[i])
            return 0
        _view_open(values, n, &view)
        try:
            if view.n < n:
                raise ValueError("sequence shorter than its len()")
            for i in range(n):
                out[i] = view.data[i]
        finally:
            _view_close(&view)
        return 0

    # --- writes ----------------------------------------------------------------------

    def store_blocks(self, int worker, int tier, engine_hashes, parent_engine_hash, tokens,
                     Py_ssize_t block_size, root_key, salts=None):
        """Own-key mode: key each block from its tokens, chained from the parent's key.

        Returns the number of blocks stored, or -1 (and changes nothing) when the worker
        never reported the parent block.
        """
        cdef Py_ssize_t n, needed, ntokens, nsalts = 0
        cdef uint64_t parent_hash = 0
        cdef uint64_t* salt_values = NULL
        cdef bint chained
        cdef U64View view
        self._check(worker, tier)
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        n = len(engine_hashes)
        needed = n * block_size
        ntokens = len(tokens)
        if ntokens < needed:
            raise ValueError(f"{n} blocks of {block_size} need {needed} tokens, got {ntokens}")
        self._reserve(n)
        self._read_u64s(engine_hashes, n, self._s_hashes)
        chained = parent_engine_hash is not None
        if chained:
            parent_hash = _mask_obj(parent_engine_hash)
        if n == 0:
            # Nothing to store, but an unknown parent still says a message went missing.
            if chained and _map_get(&self._engine[worker], parent_hash) == 0:
                return -1
            return 0
        _salts_array(salts, &nsalts, &salt_values)
        view.owned = NULL
        view.has_buffer = False
        view.data = NULL
        try:
            if type(tokens) is not list:
                _view_open(tokens, needed, &view)
            return self._store_own(worker, tier, n, chained, parent_hash, tokens, view.data, block_size,
                                   _mask_obj(root_key), salt_values, nsalts)
        finally:
            free(salt_values)
            _view_close(&view)

    cdef Py_ssize_t _store_own(self, int worker, int tier, Py_ssize_t n, bint chained, uint64_t parent_hash,
                               object tokens, const uint64_t* data, Py_ssize_t block_size, uint64_t root,
                               const uint64_t* salts, Py_ssize_t nsalts) except -2:
        """Store n blocks whose engine hashes are in _s_hashes; -1 (nothing changed) when the
        worker never reported the parent."""
        cdef uint64_t parent_key = root
        cdef int32_t parent_idx = -1
        if chained:
            parent_key = _map_get(&self._engine[worker], parent_hash)
            if parent_key == 0:
                return -1
        _chain_keys(tokens, data, 0, n, block_size, parent_key, salts, nsalts, self._s_keys)
        if chained:
            parent_idx = self._kfind(parent_key)
        return self._apply(worker, tier, n, parent_idx)

    def store_keys(self, int worker, int tier, keys, parent_key):
        """Exact mode: the engine's wire hash is the key.

        Returns the number of blocks stored, or -1 (and changes nothing) when the worker
        never reported the parent block, as store_blocks.
        """
        cdef Py_ssize_t n, i
        cdef int32_t parent_idx = -1
        cdef uint64_t parent
        self._check(worker, tier)
        n = len(keys)
        self._reserve(n)
        self._read_u64s(keys, n, self._s_keys)
        for i in range(n):
            if self._s_keys[i] == 0:
                raise ValueError("0 is not a valid block key")
            self._s_hashes[i] = self._s_keys[i]
        if parent_key is not None:
            parent = _mask_obj(parent_key)
            if _map_get(&self._engine[worker], parent) == 0:
                return -1
            parent_idx = self._kfind(parent)
        if n == 0:
            return 0
        return self._apply(worker, tier, n, parent_idx)

    cdef Py_ssize_t _apply(self, int worker, int tier, Py_ssize_t n, int32_t parent_idx) except -1:
        cdef U64Map* engine = &self._engine[worker]
        cdef uint64_t* keys = self._s_keys
        cdef uint64_t* hashes = self._s_hashes
        cdef int32_t* idxs = self._s_idx
        cdef Py_ssize_t i
        cdef int32_t idx
        cdef kv_node* node
        cdef uint32_t old
        cdef MapSlot* slot
        # Two passes so that each block's misses are in flight before they are needed:
        # the first resolves or creates the nodes (table slots fetched ahead) and fetches
        # the worker's engine-map slots that the second writes.
        for i in range(n):
            if i + 8 < n:
                self._kprefetch(keys[i + 8])
            idx = self._kclaim(keys[i], parent_idx)
            if engine.slots != NULL:
                kv_prefetch_w(&engine.slots[_home(engine, hashes[i])])
            idxs[i] = idx
            parent_idx = idx
        for i in range(n):
            idx = idxs[i]
            node = self._node(idx)
            old = self._add_tier(node, worker, tier)
            if old & (1 << tier):
                self._count_again(node, idx, worker, tier)
            elif old == 0:
                self._held[worker] += 1
            slot = _map_claim(engine, hashes[i])
            if slot.v == 0:
                engine.count += 1
            elif slot.v != keys[i]:
                # The engine hash now names another block: the node it named may still
                # be held with no mapping left, so clear_worker must find it another way.
                self._remember_unmapped(worker, slot.v)
            slot.v = keys[i]
        if self._max_blocks:
            for i in range(n - 1, -1, -1):
                self._touch(idxs[i])
            if self._count > self._max_blocks:
                self._enforce_bound()
        return n

    cdef int _remember_unmapped(self, int worker, uint64_t key) except -1:
        cdef U64Map* extra = &self._extra[worker]
        cdef MapSlot* s
        cdef uint64_t i
        cdef int32_t idx
        if extra.count >= 64 and extra.count >= self._held[worker]:
            # Keep the set to the nodes still held: it only grows on unusual streams.
            i = 0
            while i < extra.cap:
                s = &extra.slots[i]
                if s.v != 0:
                    idx = self._kfind(s.k)
                    if idx < 0 or self._tiers(self._node(idx), worker) == 0:
                        _map_del(extra, s.k)
                        continue  # a later entry may have shifted into slot i
                i += 1
        _map_put(extra, key, 1)
        return 0

    def remove_blocks(self, int worker, int tier, engine_hashes):
        """Drop one reference per hash; unknown hashes or absent tiers count as unknown removals."""
        cdef Py_ssize_t n
        self._check(worker, tier)
        n = len(engine_hashes)
        self._reserve(n)
        self._read_u64s(engine_hashes, n, self._s_hashes)
        return self._remove(worker, tier, self._s_hashes, n)

    cdef Py_ssize_t _remove(self, int worker, int tier, const uint64_t* hashes, Py_ssize_t n) noexcept nogil:
        cdef U64Map* engine = &self._engine[worker]
        cdef Py_ssize_t i, applied = 0
        cdef uint64_t h, key
        cdef int32_t idx
        cdef kv_node* node
        cdef uint32_t tiers
        for i in range(n):
            if i + 4 < n:
                _map_prefetch(engine, hashes[i + 4])
            h = hashes[i]
            key = _map_get(engine, h)
            if key == 0:
                self._unknown += 1
                continue
            idx = self._kfind(key)
            tiers = 0 if idx < 0 else self._tiers(self._node(idx), worker)
            if tiers == 0:
                self._unknown += 1
                _map_del(engine, h)
                continue
            if not tiers & (1 << tier):
                self._unknown += 1
                continue
            applied += 1
            node = self._node(idx)
            if node.meta & META_MULTI and self._uncount(idx, worker, tier):
                continue
            self._drop_tiers(node, worker, 1 << tier)
            if tiers == <uint32_t>(1 << tier):
                self._held[worker] -= 1
                _map_del(engine, h)
                self._release(idx)
        return applied

    def clear_worker(self, int worker):
        """Forget every block and mapping of a worker; returns the number of blocks it held."""
        self._check(worker, 0)
        return self._clear(worker)

    cdef Py_ssize_t _clear(self, int worker) noexcept nogil:
        cdef Py_ssize_t cleared = self._held[worker]
        self._clear_via(worker, &self._engine[worker], True)
        self._clear_via(worker, &self._extra[worker], False)
        _map_free(&self._engine[worker])
        _map_free(&self._extra[worker])
        self._held[worker] = 0
        return cleared

    cdef void _clear_via(self, int worker, U64Map* m, bint values_are_keys) noexcept nogil:
        """Drop worker from every node a map leads to: an engine map's values, or a set's keys."""
        cdef uint64_t i, key
        cdef int32_t idx
        cdef kv_node* node
        if m.slots == NULL:
            return
        for i in range(m.cap):
            if m.slots[i].v == 0:
                continue
            key = m.slots[i].v if values_are_keys else m.slots[i].k
            idx = self._kfind(key)
            if idx < 0:
                continue
            node = self._node(idx)
            if self._tiers(node, worker) == 0:
                continue
            self._drop_tiers(node, worker, 7)
            if node.meta & META_MULTI:
                self._drop_multi(idx, worker)
            self._release(idx)

    # --- vLLM batches straight from the wire ------------------------------------------

    def apply_payload(self, bytes payload, resolve_worker, bint own_keys, Py_ssize_t block_size,
                      own_seed, dict skipped_groups, salt_of):
        """Decode one vLLM event batch and apply it, as codec decode_batch + PrefixIndex.apply_batch.

        Returns (stored, removed, cleared, skipped, orphans, had_clear), or None, having
        changed nothing, when the payload is anything but a batch whose every event the
        reference path would apply without an error or a report (see _kvbatch.pxi).
        ``resolve_worker()`` gives the worker id once the batch is known to apply;
        ``skipped_groups`` maps worker id -> set of KV-cache groups that are not full
        attention (updated here); ``salt_of(item)`` is one extra-keys item's salt. ``own_keys``: keys from tokens chained from ``own_seed``'s roots; else the
        hashes are the keys (exact mode).
        """
        cdef Decoded* d = &self._dec
        cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(payload)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
        cdef Py_ssize_t i, k, n, needed, stored = 0, removed = 0, cleared = 0, skipped = 0, orphans = 0
        cdef Py_ssize_t got
        cdef bint had_clear = False
        cdef Ev* ev
        cdef int worker
        cdef uint64_t seed = _mask_obj(own_seed)
        cdef uint64_t lora
        cdef uint64_t root
        cdef uint64_t root_none
        cdef dict salt_cache = None
        cdef object groups
        cdef object group
        if _decode_batch(d, base, size) < 0:
            return None
        # Everything that could make the reference report an error, checked before any change.
        _grow(<void**>&self._dec_salts, &self._dec_salts_cap, d.nx, sizeof(uint64_t))
        for i in range(d.nev):
            ev = &d.ev[i]
            if ev.kind != EV_STORED or not ev.full or ev.h_n == 0:
                continue
            if not own_keys:
                for k in range(ev.h_n):
                    if d.h[ev.h_off + k] == 0:
                        return None
                continue
            if ev.has_lora:
                # Keys of an adapter's blocks are rooted at its name (lora_name), which this
                # decoder does not read: the reference path places them.
                return None
            needed = ev.h_n * block_size
            if <Py_ssize_t>ev.block_size != block_size:
                return None
            if ev.t_n < needed or (0 <= ev.t_bad < needed):
                return None
            for k in range(ev.x_off, ev.x_off + max(ev.x_n, 0)):
                raw = PyBytes_FromStringAndSize(<const char*>base + d.x[k].start, d.x[k].end - d.x[k].start)
                if salt_cache is None:
                    salt_cache = {}
                salt = salt_cache.get(raw)
                if salt is None:
                    try:
                        # Decoded alone, an item is the object the whole payload's decode
                        # gives (msgpack is context-free; same options as the codec).
                        salt = salt_of(_unpackb(raw, raw=False, strict_map_key=False))
                    except Exception:
                        return None
                    salt_cache[raw] = salt
                self._dec_salts[k] = _mask_obj(salt)
        worker = resolve_worker()
        self._check(worker, 0)
        root_none = _own_root(seed, False, 0)
        for i in range(d.nev):
            ev = &d.ev[i]
            if ev.kind == EV_CLEARED:
                cleared += self._clear(worker)
                had_clear = True
                continue
            group = (PyLong_FromLongLong(<int64_t>ev.group) if ev.group_neg
                     else PyLong_FromUnsignedLongLong(ev.group))
            n = ev.h_n
            if ev.kind == EV_REMOVED:
                groups = skipped_groups.get(worker)
                if groups is not None and group in groups:
                    skipped += n
                    continue
                removed += self._remove(worker, ev.tier, &d.h[ev.h_off], n)
                continue
            if not ev.full:
                groups = skipped_groups.get(worker)
                if groups is None:
                    groups = skipped_groups[worker] = set()
                groups.add(group)
                skipped += n
                continue
            if n == 0:
                continue
            if not own_keys and ev.has_parent and _map_get(&self._engine[worker], ev.parent) == 0:
                orphans += 1  # as store_keys: a parent this worker never reported
                continue
            self._reserve(n)
            memcpy(self._s_hashes, &d.h[ev.h_off], n * sizeof(uint64_t))
            if not own_keys:
                memcpy(self._s_keys, self._s_hashes, n * sizeof(uint64_t))
                stored += self._apply(worker, ev.tier, n,
                                      self._kfind(ev.parent) if ev.has_parent else -1)
                continue
            root = _own_root(seed, True, ev.lora) if ev.has_lora else root_none
            got = self._store_own(worker, ev.tier, n, ev.has_parent, ev.parent, None, &d.t[ev.t_off],
                                  block_size, root, &self._dec_salts[ev.x_off] if ev.x_n > 0 else NULL,
                                  max(ev.x_n, 0))
            if got < 0:
                orphans += 1
            else:
                stored += got
        return (stored, removed, cleared, skipped, orphans, had_clear)

    # --- reads -----------------------------------------------------------------------

    def match(self, keys, worker_filter=None, bint touch=True):
        """Per worker holding keys[0]: (worker, leading blocks held, of which GPU, CPU, storage).

        A worker's run continues while it holds the next block in any tier; each block is
        counted in the fastest tier the worker holds it in. ``keys`` may be a PromptKeys,
        which hashes only as far as the walk goes. ``touch`` False leaves the recency order
        (the memory bound's) as it was.
        """
        cdef list result = []
        cdef Py_ssize_t matched
        cdef int wd, worker
        cdef uint64_t bits
        matched = self._walk_any(keys, worker_filter, touch)
        for wd in range(self._words):
            bits = self._ever[wd] if matched else 0
            self._ever[wd] = 0
            while bits:
                worker = wd * 64 + kv_ctz64(bits)
                bits &= bits - 1
                result.append((worker, self._run_total[worker],
                               self._run_total[worker] - self._run_cpu[worker] - self._run_storage[worker],
                               self._run_cpu[worker], self._run_storage[worker]))
                self._reset_run(worker)
        return result

    def match_named(self, keys, list names, type match_type, worker_filter=None, bint touch=True):
        """As match, as {names[worker]: match_type(total, gpu, cpu, storage)}; workers whose
        name is None (or past the list) are left out. match_type is a tuple subclass of
        four fields; equal results share one instance (tuples are immutable), so a
        64-worker answer allocates a handful of tuples, and its cost is the dict: about
        40 ns an entry here (2.6 us for 64, measured; a copy of a dict of every name
        with values replaced was no faster).
        """
        cdef Py_ssize_t matched, nworkers = 0, nnames = len(names)
        cdef int wd, worker, k, cached = 0
        cdef uint64_t bits
        cdef long total, cpu, storage
        cdef long seen[4][3]
        cdef list made = []
        cdef object value
        cdef object name
        cdef dict result
        matched = self._walk_any(keys, worker_filter, touch)
        if matched == 0:
            for wd in range(self._words):
                self._ever[wd] = 0
            return {}
        for wd in range(self._words):
            nworkers += kv_popcount64(self._ever[wd])
        result = kv_new_dict(nworkers)
        try:
            for wd in range(self._words):
                bits = self._ever[wd]
                while bits:
                    worker = wd * 64 + kv_ctz64(bits)
                    bits &= bits - 1
                    total = self._run_total[worker]
                    cpu = self._run_cpu[worker]
                    storage = self._run_storage[worker]
                    self._reset_run(worker)
                    if worker >= nnames:
                        continue
                    name = <object>PyList_GET_ITEM(names, worker)
                    if name is None:
                        continue
                    value = None
                    for k in range(cached):
                        if seen[k][0] == total and seen[k][1] == cpu and seen[k][2] == storage:
                            value = made[k]
                            break
                    if value is None:
                        value = kv_match_tuple(<PyTypeObject*>match_type, total, total - cpu - storage,
                                               cpu, storage)
                        if cached < 4:
                            seen[cached][0] = total
                            seen[cached][1] = cpu
                            seen[cached][2] = storage
                            made.append(value)
                            cached += 1
                    result[name] = value
        finally:
            for wd in range(self._words):
                bits = self._ever[wd]
                self._ever[wd] = 0
                while bits:
                    self._reset_run(wd * 64 + kv_ctz64(bits))
                    bits &= bits - 1
        return result

    cdef inline void _reset_run(self, int worker) noexcept nogil:
        self._run_total[worker] = 0
        self._run_cpu[worker] = 0
        self._run_storage[worker] = 0

    cdef Py_ssize_t _walk_any(self, object keys, object worker_filter, bint touch) except -1:
        """Walk keys (a PromptKeys or any integer sequence); fills _ever and the run counters."""
        cdef KeySrc src
        cdef U64View view
        cdef PromptKeys lazy
        cdef Py_ssize_t matched
        if type(keys) is PromptKeys:
            lazy = <PromptKeys>keys
            src.keys = lazy._keys
            src.n = lazy._n
            src.ready = lazy._ready
            src.lazy = <PyObject*>lazy
            src.step = LAZY_STEP if lazy._is_list or lazy._vllm else LAZY_STEP_BUFFER
            try:
                return self._walk(&src, worker_filter, touch)
            except BaseException:
                self._reset_all_runs()
                raise
        _view_open(keys, -1, &view)
        try:
            src.keys = view.data
            src.n = view.n
            src.ready = view.n
            src.lazy = NULL
            src.step = 0
            matched = self._walk(&src, worker_filter, touch)
        except BaseException:
            self._reset_all_runs()
            raise
        finally:
            _view_close(&view)
        return matched

    cdef void _reset_all_runs(self) noexcept nogil:
        # A walk that raised (a token that is not an integer) left counters behind.
        cdef int i
        for i in range(self._words):
            self._ever[i] = 0
        for i in range(self._max_workers):
            self._reset_run(i)

    cdef inline int _need(self, KeySrc* src, Py_ssize_t j) except -1:
        cdef PromptKeys lazy
        if j < src.ready:
            return 0
        lazy = <PromptKeys>src.lazy
        lazy._extend(min(src.n, j + src.step))
        src.ready = lazy._ready
        return 0

    cdef Py_ssize_t _walk(self, KeySrc* src, object worker_filter, bint touch) except -1:
        cdef Py_ssize_t n = src.n
        cdef const uint64_t* keys = src.keys
        cdef int W = self._words
        cdef int act = (self._hi >> 6) + 1 if self._hi >= 0 else 1
        cdef uint64_t* alive = self._alive
        cdef int32_t* path = NULL
        cdef int32_t ring[RING]
        cdef Py_ssize_t i, j, d_slot, d_node
        cdef int wd, worker, tail_bits
        cdef int32_t idx
        if n == 0:
            return 0
        if act > W:
            act = W
        if self._max_blocks and touch:
            self._reserve(n)
            path = self._s_idx
        for wd in range(W):
            alive[wd] = 0
        if worker_filter is None:
            for wd in range(act):
                alive[wd] = ~(<uint64_t>0)
            tail_bits = self._max_workers & 63
            if tail_bits and act == W:
                alive[W - 1] = (<uint64_t>1 << tail_bits) - 1
        else:
            for wanted in worker_filter:
                wanted = int(wanted)
                if 0 <= wanted < self._max_workers and (wanted >> 6) < act:
                    worker = wanted
                    alive[worker >> 6] |= <uint64_t>1 << (worker & 63)
        # Given keys cost nothing to read, so the walk runs far ahead of its misses; lazy
        # keys cost a hash a block, so a shorter lead covers a memory access. Leads measured
        # on the index benchmark (64 workers, 1M blocks): for a uint64 buffer's keys 24/12
        # took the best-of-3 p99 from 20.0 to 17.7-17.9 us against 8/4; for a list's 8/4 stays
        # the best (16/8 and 32/16 were 1-3 us slower at p99).
        if src.lazy == NULL:
            d_slot, d_node = 32, 16
        elif src.step == LAZY_STEP_BUFFER:
            d_slot, d_node = 24, 12
        else:
            d_slot, d_node = 8, 4
        for j in range(min(n, d_slot)):
            self._need(src, j)
            self._kprefetch(keys[j])
        for j in range(min(n, d_node)):
            idx = self._kprobe(keys[j])
            ring[j] = idx
            if idx >= 0:
                kv_prefetch(self._node(idx))
        if act == 1:
            return self._walk_low(src, d_slot, d_node, ring, path)
        return self._walk_wide(src, act, d_slot, d_node, ring, path)

    cdef inline int32_t _step(self, KeySrc* src, Py_ssize_t i, Py_ssize_t d_slot, Py_ssize_t d_node,
                              int32_t* ring) except -2:
        """Resolve block i's node (or -1) and start fetching the blocks ahead of it."""
        cdef Py_ssize_t j = i + d_slot
        cdef int32_t idx
        if j < src.n:
            if j >= src.ready:
                self._need(src, j)
            self._kprefetch(src.keys[j])
        j = i + d_node
        if j < src.n:
            idx = self._kprobe(src.keys[j])
            ring[j & (RING - 1)] = idx
            if idx >= 0:
                kv_prefetch(self._node(idx))
        return self._kresolve(src.keys[i], ring[i & (RING - 1)])

    cdef Py_ssize_t _walk_low(self, KeySrc* src, Py_ssize_t d_slot, Py_ssize_t d_node, int32_t* ring,
                              int32_t* path) except -1:
        """Every worker id is below 64, so every node is LOW: one word per block."""
        cdef int32_t* total = self._run_total
        cdef int32_t* cpu = self._run_cpu
        cdef int32_t* storage = self._run_storage
        cdef uint64_t single = self._alive[0]
        cdef uint64_t now, g
        cdef kv_node* node
        cdef int32_t idx
        cdef Py_ssize_t i = 0
        while i < src.n:
            idx = self._step(src, i, d_slot, d_node, ring)
            if idx < 0:
                break
            node = self._node(idx)
            g = node.h.m[0]
            now = single & (g | node.h.m[1] | node.h.m[2])
            if now == 0:
                break
            if i == 0:
                self._ever[0] = now
            elif now != single:
                _record_drops(single & ~now, 0, <int32_t>i, total)
            if now & ~g:
                _count_slow_tiers(now, g, node.h.m[1], 0, cpu, storage)
            single = now
            if path != NULL:
                path[i] = idx
            i += 1
        if i:
            _record_drops(single, 0, <int32_t>i, total)
            self._touch_path(path, i)
        return i

    cdef Py_ssize_t _walk_wide(self, KeySrc* src, int act, Py_ssize_t d_slot, Py_ssize_t d_node,
                               int32_t* ring, int32_t* path) except -1:
        """Some worker id is 64 or more: nodes of any format, act words of workers."""
        cdef int32_t* total = self._run_total
        cdef int32_t* cpu = self._run_cpu
        cdef int32_t* storage = self._run_storage
        cdef uint64_t* alive = self._alive
        cdef uint64_t* now = self._now
        cdef int W = self._words
        cdef uint64_t anyone, g, c, bits
        cdef uint64_t* rec
        cdef kv_node* node
        cdef int32_t idx
        cdef uint32_t fmt
        cdef uint16_t entry
        cdef int wd, k, worker
        cdef Py_ssize_t i = 0
        while i < src.n:
            idx = self._step(src, i, d_slot, d_node, ring)
            if idx < 0:
                break
            node = self._node(idx)
            fmt = _fmt(node)
            anyone = 0
            if fmt == FMT_LOW:
                g = node.h.m[0]
                now[0] = alive[0] & (g | node.h.m[1] | node.h.m[2])
                anyone = now[0]
                for wd in range(1, act):
                    now[wd] = 0
                if anyone & ~g:
                    _count_slow_tiers(anyone, g, node.h.m[1], 0, cpu, storage)
            elif fmt == FMT_SPARSE:
                for wd in range(act):
                    now[wd] = 0
                for k in range(SPARSE_SLOTS):
                    entry = node.h.e[k]
                    if entry == 0:
                        break
                    worker = entry >> 3
                    if (alive[worker >> 6] >> (worker & 63)) & 1:
                        now[worker >> 6] |= <uint64_t>1 << (worker & 63)
                        anyone = 1
                        if not entry & 1:
                            if entry & 2:
                                cpu[worker] += 1
                            else:
                                storage[worker] += 1
            else:
                rec = self._rec(node.h.m[0])
                for wd in range(act):
                    g = rec[wd]
                    c = rec[W + wd]
                    now[wd] = alive[wd] & (g | c | rec[2 * W + wd])
                    anyone |= now[wd]
                    if now[wd] & ~g:
                        _count_slow_tiers(now[wd], g, c, wd * 64, cpu, storage)
            if anyone == 0:
                break
            for wd in range(act):
                if i == 0:
                    self._ever[wd] = now[wd]
                else:
                    bits = alive[wd] & ~now[wd]
                    if bits:
                        _record_drops(bits, wd * 64, <int32_t>i, total)
                alive[wd] = now[wd]
            if path != NULL:
                path[i] = idx
            i += 1
        if i:
            for wd in range(act):
                _record_drops(alive[wd], wd * 64, <int32_t>i, total)
            self._touch_path(path, i)
        return i

    cdef int _touch_path(self, int32_t* path, Py_ssize_t matched) except -1:
        cdef Py_ssize_t j
        if path != NULL:
            for j in range(matched - 1, -1, -1):
                self._touch(path[j])
        return 0

    @property
    def num_blocks(self):
        return self._count

    def worker_blocks(self, int worker):
        self._check(worker, 0)
        return self._held[worker]

    def entries(self):
        """(block, worker) pairs held: the unit of the memory goal."""
        cdef Py_ssize_t total = 0
        cdef int i
        for i in range(self._max_workers):
            total += self._held[i]
        return total

    @property
    def unknown_removals(self):
        return self._unknown

    @property
    def evictions(self):
        return self._evicted

    def bytes_used(self):
        """Bytes held: allocated capacities of every structure."""
        cdef Py_ssize_t total = 0, i
        # Node chunks are reserved 2**20 records at a time but only the pages written are
        # ever resident (the allocator maps them untouched): count the nodes handed out,
        # up to the 2 MiB page they reach.
        total += _touched(self._used, sizeof(kv_node)) + self._nchunks * sizeof(kv_node*)
        if self._lchunks != NULL:
            total += _touched(self._used, sizeof(kv_links)) + self._nchunks * sizeof(kv_links*)
        total += (self._kmask + 1) * sizeof(uint64_t)
        total += self._max_workers * (2 * sizeof(U64Map) + sizeof(Py_ssize_t) + 3 * sizeof(int32_t))
        for i in range(self._max_workers):
            total += _map_bytes(&self._engine[i]) + _map_bytes(&self._extra[i])
        total += _map_bytes(&self._multi)
        total += self._wide_cap * self._rec_words * sizeof(uint64_t)
        total += self._lru_cap * sizeof(LruEntry)
        total += self._s_cap * (2 * sizeof(uint64_t) + sizeof(int32_t))
        total += 3 * self._words * sizeof(uint64_t) + self._stack_cap * sizeof(int32_t)
        return total
