# cython: language_level=3
"""Block table: the storage under the prefix index, in C structures.

Same API and results as scheduler/core/blocktable_ref.py (read its docstring for the
rules). Layout, chosen so that a prefix walk costs about one cache line per block:

* nodes: fixed-size records in 32,768-node chunks (no moves on growth): key, LRU stamp,
  parent / first-child / sibling links, flags, then per-tier worker bitmasks
  (GPU words, CPU words, STORAGE words; words = ceil(max_workers / 64)). With 64
  workers a record is exactly one 64-byte line.
* key -> node: open addressing with linear probing, Fibonacci hashing, backward-shift
  deletion, power-of-two capacity kept under 0.7 load.
* per worker: engine hash -> key (same kind of table) and the set of nodes it holds
  (4-byte slots), so clearing a worker costs only its own blocks.
* reference counts above one (rare: vLLM stores a hash once per tier) live in a side
  dict; the bitmask bit means "count >= 1".
* recency: an operation counter stamped on the node, plus (only under a block bound) a
  queue of (node, stamp) in touch order; entries whose stamp is stale are skipped, and
  the queue is compacted when it outgrows the table. The front valid entry is the least
  recently touched node, exactly as the reference's ordered dict has it.
"""

include "_hashcore.pxi"

cimport cython
from libc.stdlib cimport calloc, realloc
from libc.string cimport memset

import sys

cdef extern from *:
    """
    #include <stdlib.h>
    #if defined(__GNUC__) || defined(__clang__)
    #define kv_ctz64(x) __builtin_ctzll(x)
    #define kv_prefetch(p) __builtin_prefetch((p), 0, 3)
    #define kv_prefetch_w(p) __builtin_prefetch((p), 1, 3)
    #else
    static inline int kv_ctz64(uint64_t x) { int n = 0; while (!(x & 1)) { x >>= 1; n++; } return n; }
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
    """
    int kv_ctz64(uint64_t x) nogil
    void kv_prefetch(const void* p) nogil
    void kv_prefetch_w(const void* p) nogil
    void* kv_big_alloc(size_t size, int zero, int huge) nogil

MAX_WORKERS_LIMIT = 1 << 16

cdef enum:
    TIERS = 3
    CHUNK_SHIFT = 15
    CHUNK_NODES = 1 << 15
    CHUNK_MASK = (1 << 15) - 1
    FLAG_LIVE = 1
    FLAG_MULTI = 2     # some (worker, tier) of this node has a count > 1 in the side dict
    PREFETCH_SLOTS = 32
    PREFETCH_NODES = 16
    RING = 32

cdef uint64_t FIB64 = 0x9E3779B97F4A7C15ULL
cdef uint32_t FIB32 = 0x9E3779B1U


cdef struct Node:
    uint64_t key
    uint64_t stamp
    int32_t parent
    int32_t first_child
    int32_t next_sib      # also the free-list link of a freed node
    int32_t prev_sib
    uint32_t flags
    uint32_t spare
    # followed by uint64_t masks[3 * words]


# --- uint64 -> uint64 open addressing (value 0 = empty slot) ------------------------------

cdef struct MapSlot:
    uint64_t k
    uint64_t v

cdef struct U64Map:
    MapSlot* slots
    uint64_t mask
    Py_ssize_t count
    int shift


cdef inline uint64_t _home(const U64Map* m, uint64_t k) noexcept nogil:
    return (k * FIB64) >> m.shift


cdef int _map_init(U64Map* m, Py_ssize_t capacity) except -1:
    cdef int bits = 4
    while (<Py_ssize_t>1 << bits) < capacity:
        bits += 1
    m.slots = <MapSlot*>kv_big_alloc((<size_t>1 << bits) * sizeof(MapSlot), 1, 1)
    if m.slots == NULL:
        raise MemoryError()
    m.mask = (<uint64_t>1 << bits) - 1
    m.shift = 64 - bits
    m.count = 0
    return 0


cdef void _map_free(U64Map* m) noexcept nogil:
    free(m.slots)
    m.slots = NULL
    m.mask = 0
    m.count = 0
    m.shift = 0


cdef inline uint64_t _map_get(const U64Map* m, uint64_t k) noexcept nogil:
    cdef uint64_t i
    cdef const MapSlot* s
    if m.slots == NULL:
        return 0
    i = _home(m, k)
    while True:
        s = &m.slots[i]
        if s.v == 0:
            return 0
        if s.k == k:
            return s.v
        i = (i + 1) & m.mask


cdef inline void _map_prefetch(const U64Map* m, uint64_t k) noexcept nogil:
    if m.slots != NULL:
        kv_prefetch(&m.slots[_home(m, k)])


cdef int _map_grow(U64Map* m) except -1:
    cdef U64Map bigger
    cdef uint64_t i, j
    cdef MapSlot* s
    _map_init(&bigger, 2 * (<Py_ssize_t>m.mask + 1) if m.slots != NULL else 16)
    if m.slots != NULL:
        for i in range(m.mask + 1):
            s = &m.slots[i]
            if s.v != 0:
                j = _home(&bigger, s.k)
                while bigger.slots[j].v != 0:
                    j = (j + 1) & bigger.mask
                bigger.slots[j] = s[0]
        bigger.count = m.count
        free(m.slots)
    m[0] = bigger
    return 0


cdef inline MapSlot* _map_claim(U64Map* m, uint64_t k) except NULL:
    """The slot holding k, or the empty slot where k goes (room for one insert is made)."""
    cdef uint64_t i
    cdef MapSlot* s
    if m.slots == NULL or (m.count + 1) * 10 > <Py_ssize_t>(m.mask + 1) * 7:
        _map_grow(m)
    i = _home(m, k)
    while True:
        s = &m.slots[i]
        if s.v == 0 or s.k == k:
            return s
        i = (i + 1) & m.mask


cdef inline int _map_put(U64Map* m, uint64_t k, uint64_t v) except -1:
    cdef MapSlot* s = _map_claim(m, k)
    if s.v == 0:
        m.count += 1
        s.k = k
    s.v = v
    return 0


cdef bint _map_del(U64Map* m, uint64_t k) noexcept nogil:
    cdef uint64_t i, j, home
    if m.slots == NULL:
        return False
    i = _home(m, k)
    while True:
        if m.slots[i].v == 0:
            return False
        if m.slots[i].k == k:
            break
        i = (i + 1) & m.mask
    # Backward-shift deletion: pull later entries of the cluster into the hole when the
    # hole lies between their home and where they sit, so probes never need tombstones.
    j = i
    while True:
        j = (j + 1) & m.mask
        if m.slots[j].v == 0:
            break
        home = _home(m, m.slots[j].k)
        if ((j - home) & m.mask) >= ((j - i) & m.mask):
            m.slots[i] = m.slots[j]
            i = j
    m.slots[i].v = 0
    m.slots[i].k = 0
    m.count -= 1
    return True


# --- per-worker set of node indices (slot = index + 1, 0 = empty) ------------------------

cdef struct I32Set:
    uint32_t* slots
    uint32_t mask
    Py_ssize_t count
    int shift


cdef inline uint32_t _set_home(const I32Set* s, uint32_t x) noexcept nogil:
    return <uint32_t>(x * FIB32) >> s.shift


cdef int _set_grow(I32Set* s) except -1:
    cdef uint32_t cap = 2 * (s.mask + 1) if s.slots != NULL else 16
    cdef uint32_t* slots = <uint32_t*>calloc(cap, sizeof(uint32_t))
    cdef uint32_t i, j, x
    cdef int bits = 0
    cdef I32Set bigger
    if slots == NULL:
        raise MemoryError()
    while (<uint32_t>1 << bits) < cap:
        bits += 1
    bigger.slots = slots
    bigger.mask = cap - 1
    bigger.shift = 32 - bits
    bigger.count = s.count
    if s.slots != NULL:
        for i in range(s.mask + 1):
            x = s.slots[i]
            if x != 0:
                j = _set_home(&bigger, x)
                while slots[j] != 0:
                    j = (j + 1) & bigger.mask
                slots[j] = x
        free(s.slots)
    s[0] = bigger
    return 0


cdef inline int _set_add(I32Set* s, int32_t idx) except -1:
    cdef uint32_t x = <uint32_t>idx + 1
    cdef uint32_t i
    if s.slots == NULL or (s.count + 1) * 10 > <Py_ssize_t>(s.mask + 1) * 7:
        _set_grow(s)
    i = _set_home(s, x)
    while s.slots[i] != 0:
        if s.slots[i] == x:
            return 0
        i = (i + 1) & s.mask
    s.slots[i] = x
    s.count += 1
    return 0


cdef void _set_discard(I32Set* s, int32_t idx) noexcept nogil:
    cdef uint32_t x = <uint32_t>idx + 1
    cdef uint32_t i, j, home
    if s.slots == NULL:
        return
    i = _set_home(s, x)
    while True:
        if s.slots[i] == 0:
            return
        if s.slots[i] == x:
            break
        i = (i + 1) & s.mask
    j = i
    while True:
        j = (j + 1) & s.mask
        if s.slots[j] == 0:
            break
        home = _set_home(s, s.slots[j])
        if ((j - home) & s.mask) >= ((j - i) & s.mask):
            s.slots[i] = s.slots[j]
            i = j
    s.slots[i] = 0
    s.count -= 1


cdef void _set_free(I32Set* s) noexcept nogil:
    free(s.slots)
    s.slots = NULL
    s.mask = 0
    s.count = 0
    s.shift = 0


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


cdef struct LruEntry:
    int32_t idx
    uint32_t spare
    uint64_t stamp


@cython.final
cdef class BlockTable:
    """Blocks per worker and tier, as a forest of chained keys (C structures)."""

    cdef int _max_workers
    cdef int _words
    cdef Py_ssize_t _max_blocks
    cdef Py_ssize_t _stride
    cdef char** _chunks
    cdef Py_ssize_t _nchunks
    cdef Py_ssize_t _used
    cdef Py_ssize_t _count
    cdef int32_t _free_head
    cdef U64Map _table
    cdef U64Map* _engine
    cdef I32Set* _held
    cdef uint64_t _clock
    cdef LruEntry* _lru
    cdef Py_ssize_t _lru_head
    cdef Py_ssize_t _lru_tail
    cdef Py_ssize_t _lru_cap
    cdef Py_ssize_t _unknown
    cdef Py_ssize_t _evicted
    cdef dict _multi
    cdef uint64_t* _s_keys
    cdef uint64_t* _s_hashes
    cdef int32_t* _s_idx
    cdef Py_ssize_t _s_cap
    cdef uint64_t* _alive
    cdef uint64_t* _ever
    cdef int32_t* _run_total
    cdef int32_t* _run_cpu
    cdef int32_t* _run_storage
    cdef int32_t* _stack
    cdef Py_ssize_t _stack_cap

    def __cinit__(self, int max_workers=128, Py_ssize_t max_blocks=0):
        if not 1 <= max_workers <= MAX_WORKERS_LIMIT:
            raise ValueError(f"max_workers must be in 1..{MAX_WORKERS_LIMIT}")
        if max_blocks < 0:
            raise ValueError("max_blocks must be >= 0")
        self._max_workers = max_workers
        self._words = (max_workers + 63) // 64
        self._max_blocks = max_blocks
        self._stride = sizeof(Node) + TIERS * self._words * sizeof(uint64_t)
        self._free_head = -1
        self._multi = {}
        _map_init(&self._table, 16)
        self._engine = <U64Map*>calloc(max_workers, sizeof(U64Map))
        self._held = <I32Set*>calloc(max_workers, sizeof(I32Set))
        self._alive = <uint64_t*>calloc(self._words, sizeof(uint64_t))
        self._ever = <uint64_t*>calloc(self._words, sizeof(uint64_t))
        self._run_total = <int32_t*>calloc(max_workers, sizeof(int32_t))
        self._run_cpu = <int32_t*>calloc(max_workers, sizeof(int32_t))
        self._run_storage = <int32_t*>calloc(max_workers, sizeof(int32_t))
        if (self._engine == NULL or self._held == NULL or self._alive == NULL or self._ever == NULL
                or self._run_total == NULL or self._run_cpu == NULL or self._run_storage == NULL):
            raise MemoryError()

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self._nchunks):
            free(self._chunks[i])
        free(self._chunks)
        _map_free(&self._table)
        if self._engine != NULL:
            for i in range(self._max_workers):
                _map_free(&self._engine[i])
            free(self._engine)
        if self._held != NULL:
            for i in range(self._max_workers):
                _set_free(&self._held[i])
            free(self._held)
        free(self._lru)
        free(self._s_keys)
        free(self._s_hashes)
        free(self._s_idx)
        free(self._alive)
        free(self._ever)
        free(self._run_total)
        free(self._run_cpu)
        free(self._run_storage)
        free(self._stack)

    # --- nodes -----------------------------------------------------------------------

    cdef inline Node* _node(self, int32_t idx) noexcept nogil:
        return <Node*>(self._chunks[idx >> CHUNK_SHIFT] + (idx & CHUNK_MASK) * self._stride)

    cdef inline int32_t _find(self, uint64_t key) noexcept nogil:
        return <int32_t>_map_get(&self._table, key) - 1

    cdef inline bint _holds(self, Node* node, int worker) noexcept nogil:
        cdef uint64_t* m = <uint64_t*>(node + 1)
        cdef int word = worker >> 6
        cdef uint64_t bit = <uint64_t>1 << (worker & 63)
        return ((m[word] | m[self._words + word] | m[2 * self._words + word]) & bit) != 0

    cdef inline bint _has_presence(self, Node* node) noexcept nogil:
        cdef uint64_t* m = <uint64_t*>(node + 1)
        cdef int i
        for i in range(TIERS * self._words):
            if m[i]:
                return True
        return False

    cdef int32_t _new_node(self, uint64_t key, int32_t parent) except -1:
        cdef int32_t idx
        cdef Node* node
        cdef Node* up
        cdef char** chunks
        cdef char* chunk
        if self._free_head >= 0:
            idx = self._free_head
            self._free_head = self._node(idx).next_sib
        else:
            if self._used == self._nchunks * CHUNK_NODES:
                if self._nchunks >= (1 << (31 - CHUNK_SHIFT)) - 1:
                    raise MemoryError("block table is full (2**31 nodes)")
                chunks = <char**>realloc(self._chunks, (self._nchunks + 1) * sizeof(char*))
                if chunks == NULL:
                    raise MemoryError()
                self._chunks = chunks
                chunk = <char*>kv_big_alloc(CHUNK_NODES * self._stride, 0, self._nchunks > 0)
                if chunk == NULL:
                    raise MemoryError()
                self._chunks[self._nchunks] = chunk
                self._nchunks += 1
            idx = <int32_t>self._used
            self._used += 1
        node = self._node(idx)
        memset(node, 0, self._stride)
        node.key = key
        node.parent = parent
        node.first_child = -1
        node.next_sib = -1
        node.prev_sib = -1
        node.flags = FLAG_LIVE
        if parent >= 0:
            up = self._node(parent)
            node.next_sib = up.first_child
            if up.first_child >= 0:
                self._node(up.first_child).prev_sib = idx
            up.first_child = idx
        self._count += 1
        return idx

    cdef void _unlink(self, int32_t idx) noexcept nogil:
        cdef Node* node = self._node(idx)
        if node.prev_sib >= 0:
            self._node(node.prev_sib).next_sib = node.next_sib
        elif node.parent >= 0:
            self._node(node.parent).first_child = node.next_sib
        if node.next_sib >= 0:
            self._node(node.next_sib).prev_sib = node.prev_sib
        node.prev_sib = -1
        node.next_sib = -1
        node.parent = -1

    cdef void _discard(self, int32_t idx) noexcept nogil:
        """Free a node already detached from the tree (or inside a subtree being freed)."""
        cdef Node* node = self._node(idx)
        _map_del(&self._table, node.key)
        node.flags = 0
        node.stamp = 0
        node.next_sib = self._free_head
        self._free_head = idx
        self._count -= 1

    cdef void _release(self, int32_t idx) noexcept nogil:
        """Free the node if nothing holds it and nothing hangs below it, then its parent likewise."""
        cdef Node* node
        cdef int32_t parent
        while idx >= 0:
            node = self._node(idx)
            if node.first_child >= 0 or self._has_presence(node):
                return
            parent = node.parent
            self._unlink(idx)
            self._discard(idx)
            idx = parent

    cdef inline object _multi_key(self, int32_t idx, int worker, int tier):
        return (<uint64_t>idx << 20) | (<uint64_t>worker << 2) | <uint64_t>tier

    cdef int _drop_multi(self, int32_t idx, int worker) except -1:
        cdef int tier
        for tier in range(TIERS):
            self._multi.pop(self._multi_key(idx, worker, tier), None)
        return 0

    # --- recency ---------------------------------------------------------------------

    cdef int _touch(self, int32_t idx) except -1:
        cdef LruEntry* entry
        self._clock += 1
        self._node(idx).stamp = self._clock
        if self._max_blocks == 0:
            return 0  # no bound, so the order is never consulted
        if self._lru_tail == self._lru_cap:
            self._lru_compact()
        entry = &self._lru[self._lru_tail]
        entry.idx = idx
        entry.stamp = self._clock
        self._lru_tail += 1
        return 0

    cdef inline bint _lru_valid(self, const LruEntry* entry) noexcept nogil:
        cdef Node* node = self._node(entry.idx)
        return (node.flags & FLAG_LIVE) != 0 and node.stamp == entry.stamp

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

    cdef int _enforce_bound(self) except -1:
        cdef int32_t victim, parent, x, child
        cdef Py_ssize_t before, depth, i
        cdef Node* node
        cdef uint64_t* m
        cdef uint64_t bits
        cdef int worker
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
                node = self._node(x)
                child = node.first_child
                while child >= 0:
                    self._push(child, depth)
                    depth += 1
                    child = self._node(child).next_sib
                node = self._node(x)
                m = <uint64_t*>(node + 1)
                for i in range(TIERS * self._words):
                    bits = m[i]
                    while bits:
                        worker = <int>((i % self._words) * 64 + kv_ctz64(bits))
                        bits &= bits - 1
                        _set_discard(&self._held[worker], x)
                        if node.flags & FLAG_MULTI:
                            self._drop_multi(x, worker)
                    m[i] = 0
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
        cdef uint64_t parent_key, chain_parent
        cdef uint64_t* salt_values = NULL
        cdef int32_t parent_idx = -1
        cdef bint chained = False
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
        if parent_engine_hash is None:
            parent_key = _mask_obj(root_key)
        else:
            parent_key = _map_get(&self._engine[worker], _mask_obj(parent_engine_hash))
            if parent_key == 0:
                return -1
            chained = True
        if n == 0:
            return 0
        chain_parent = parent_key
        _salts_array(salts, &nsalts, &salt_values)
        view.owned = NULL
        view.has_buffer = False
        view.data = NULL
        try:
            if type(tokens) is not list:
                _view_open(tokens, needed, &view)
            _chain_keys(tokens, view.data, 0, n, block_size, parent_key, salt_values, nsalts, self._s_keys)
        finally:
            free(salt_values)
            _view_close(&view)
        if chained:
            parent_idx = self._find(chain_parent)
        return self._apply(worker, tier, n, parent_idx)

    def store_keys(self, int worker, int tier, keys, parent_key):
        """Exact mode: the engine's wire hash is the key; an unknown parent makes a root."""
        cdef Py_ssize_t n, i
        cdef int32_t parent_idx = -1
        self._check(worker, tier)
        n = len(keys)
        self._reserve(n)
        self._read_u64s(keys, n, self._s_keys)
        for i in range(n):
            if self._s_keys[i] == 0:
                raise ValueError("0 is not a valid block key")
            self._s_hashes[i] = self._s_keys[i]
        if parent_key is not None:
            parent_idx = self._find(_mask_obj(parent_key))
        if n == 0:
            return 0
        return self._apply(worker, tier, n, parent_idx)

    cdef Py_ssize_t _apply(self, int worker, int tier, Py_ssize_t n, int32_t parent_idx) except -1:
        cdef U64Map* engine = &self._engine[worker]
        cdef I32Set* held = &self._held[worker]
        cdef uint64_t* keys = self._s_keys
        cdef uint64_t* hashes = self._s_hashes
        cdef int word = tier * self._words + (worker >> 6)
        cdef uint64_t bit = <uint64_t>1 << (worker & 63)
        cdef Py_ssize_t i
        cdef MapSlot* slot
        cdef int32_t idx
        cdef Node* node
        cdef uint64_t* m
        cdef int32_t* idxs = self._s_idx
        # Two passes so that each block's misses are in flight before they are needed:
        # the first resolves or creates the nodes (table slots fetched ahead) and fetches
        # what the second touches (node record, the worker's held-set and engine slots).
        for i in range(n):
            if i + 8 < n:
                _map_prefetch(&self._table, keys[i + 8])
            slot = _map_claim(&self._table, keys[i])
            if slot.v == 0:
                idx = self._new_node(keys[i], parent_idx)
                slot.k = keys[i]
                slot.v = <uint64_t>idx + 1
                self._table.count += 1
            else:
                idx = <int32_t>slot.v - 1
                kv_prefetch_w(<char*>self._node(idx) + sizeof(Node))
            if held.slots != NULL:
                kv_prefetch_w(&held.slots[_set_home(held, <uint32_t>idx + 1)])
            if engine.slots != NULL:
                kv_prefetch_w(&engine.slots[_home(engine, hashes[i])])
            idxs[i] = idx
            parent_idx = idx
        for i in range(n):
            idx = idxs[i]
            node = self._node(idx)
            m = <uint64_t*>(node + 1)
            if m[word] & bit:
                self._count_again(idx, worker, tier)
            else:
                if not self._holds(node, worker):
                    _set_add(held, idx)
                m[word] |= bit
            _map_put(engine, hashes[i], keys[i])
        for i in range(n - 1, -1, -1):
            self._touch(self._s_idx[i])
        if self._max_blocks and self._count > self._max_blocks:
            self._enforce_bound()
        return n

    cdef int _count_again(self, int32_t idx, int worker, int tier) except -1:
        key = self._multi_key(idx, worker, tier)
        self._multi[key] = self._multi.get(key, 1) + 1
        self._node(idx).flags |= FLAG_MULTI
        return 0

    def remove_blocks(self, int worker, int tier, engine_hashes):
        """Drop one reference per hash; unknown hashes or absent tiers count as unknown removals."""
        cdef Py_ssize_t n, i, applied = 0
        cdef U64Map* engine
        cdef uint64_t h, key
        cdef int32_t idx
        cdef Node* node
        cdef uint64_t* m
        cdef int word = tier * self._words + (worker >> 6)
        cdef uint64_t bit = <uint64_t>1 << (worker & 63)
        self._check(worker, tier)
        n = len(engine_hashes)
        self._reserve(n)
        self._read_u64s(engine_hashes, n, self._s_hashes)
        engine = &self._engine[worker]
        for i in range(n):
            h = self._s_hashes[i]
            key = _map_get(engine, h)
            if key == 0:
                self._unknown += 1
                continue
            idx = self._find(key)
            if idx < 0 or not self._holds(self._node(idx), worker):
                self._unknown += 1
                _map_del(engine, h)
                continue
            node = self._node(idx)
            m = <uint64_t*>(node + 1)
            if not m[word] & bit:
                self._unknown += 1
                continue
            applied += 1
            if node.flags & FLAG_MULTI and self._uncount(idx, worker, tier):
                continue
            m[word] &= ~bit
            if not self._holds(node, worker):
                _set_discard(&self._held[worker], idx)
                _map_del(engine, h)
                self._release(idx)
        return applied

    cdef bint _uncount(self, int32_t idx, int worker, int tier) except -1:
        """Drop one of several references; False when only one was left."""
        key = self._multi_key(idx, worker, tier)
        count = self._multi.get(key)
        if count is None:
            return False
        if count == 2:
            del self._multi[key]
        else:
            self._multi[key] = count - 1
        return True

    def clear_worker(self, int worker):
        """Forget every block and mapping of a worker; returns the number of blocks it held."""
        cdef I32Set* held
        cdef Py_ssize_t cleared, i
        cdef uint32_t slot
        cdef int32_t idx
        cdef Node* node
        cdef uint64_t* m
        cdef int word = worker >> 6
        cdef uint64_t keep = ~(<uint64_t>1 << (worker & 63))
        self._check(worker, 0)
        held = &self._held[worker]
        cleared = held.count
        if held.slots != NULL:
            for i in range(held.mask + 1):
                slot = held.slots[i]
                if slot == 0:
                    continue
                idx = <int32_t>(slot - 1)
                node = self._node(idx)
                m = <uint64_t*>(node + 1)
                m[word] &= keep
                m[self._words + word] &= keep
                m[2 * self._words + word] &= keep
                if node.flags & FLAG_MULTI:
                    self._drop_multi(idx, worker)
                self._release(idx)
        _set_free(held)
        _map_free(&self._engine[worker])
        return cleared

    # --- reads -----------------------------------------------------------------------

    def match(self, keys, worker_filter=None):
        """Per worker holding keys[0]: (worker, leading blocks held, of which GPU, CPU, storage).

        A worker's run continues while it holds the next block in any tier; each block is
        counted in the fastest tier the worker holds it in.
        """
        cdef U64View view
        _view_open(keys, -1, &view)
        try:
            return self._match(view.data, view.n, worker_filter)
        finally:
            _view_close(&view)

    cdef inline int32_t _lookahead(self, const uint64_t* keys, Py_ssize_t n, Py_ssize_t i,
                                   int32_t* ring) noexcept nogil:
        # Keys are known up front, so table slots are fetched PREFETCH_SLOTS blocks ahead
        # and node records PREFETCH_NODES ahead: the walk overlaps its cache misses
        # instead of paying them one after another.
        cdef int32_t idx
        if i + PREFETCH_SLOTS < n:
            _map_prefetch(&self._table, keys[i + PREFETCH_SLOTS])
        if i + PREFETCH_NODES < n:
            idx = self._find(keys[i + PREFETCH_NODES])
            ring[(i + PREFETCH_NODES) & (RING - 1)] = idx
            if idx >= 0:
                kv_prefetch(<char*>self._node(idx) + sizeof(Node))
        return ring[i & (RING - 1)]

    cdef list _match(self, const uint64_t* keys, Py_ssize_t n, object worker_filter):
        cdef int W = self._words
        cdef uint64_t* alive = self._alive
        cdef uint64_t* ever = self._ever
        cdef int32_t* total = self._run_total
        cdef int32_t* cpu = self._run_cpu
        cdef int32_t* storage = self._run_storage
        cdef int32_t* path = NULL
        cdef int32_t ring[RING]
        cdef Py_ssize_t i, j, matched
        cdef int wd, worker, tail_bits
        cdef int32_t idx
        cdef uint64_t* m
        cdef uint64_t g, before, now, anyone, bits, single
        cdef list result = []
        if n == 0:
            return result
        if self._max_blocks:
            self._reserve(n)
            path = self._s_idx
        if worker_filter is None:
            for wd in range(W):
                alive[wd] = ~(<uint64_t>0)
            tail_bits = self._max_workers & 63
            if tail_bits:
                alive[W - 1] = (<uint64_t>1 << tail_bits) - 1
        else:
            for wd in range(W):
                alive[wd] = 0
            for wanted in worker_filter:
                wanted = int(wanted)
                if 0 <= wanted < self._max_workers:
                    worker = wanted
                    alive[worker >> 6] |= <uint64_t>1 << (worker & 63)

        for j in range(min(n, <Py_ssize_t>PREFETCH_SLOTS)):
            _map_prefetch(&self._table, keys[j])
        for j in range(min(n, <Py_ssize_t>PREFETCH_NODES)):
            idx = self._find(keys[j])
            ring[j] = idx
            if idx >= 0:
                kv_prefetch(<char*>self._node(idx) + sizeof(Node))

        # Block 0 decides who can match at all; from then on only workers that drop out
        # or hold a block outside GPU memory cost per-worker work.
        matched = 0
        idx = self._lookahead(keys, n, 0, ring)
        anyone = 0
        if idx >= 0:
            m = <uint64_t*>(self._node(idx) + 1)
            for wd in range(W):
                now = alive[wd] & (m[wd] | m[W + wd] | m[2 * W + wd])
                alive[wd] = now
                ever[wd] = now
                anyone |= now
                if now & ~m[wd]:
                    _count_slow_tiers(now, m[wd], m[W + wd], wd * 64, cpu, storage)
        if anyone:
            if path != NULL:
                path[0] = idx
            i = 1
            if W == 1:
                single = alive[0]
                while i < n:
                    idx = self._lookahead(keys, n, i, ring)
                    if idx < 0:
                        break
                    m = <uint64_t*>(self._node(idx) + 1)
                    g = m[0]
                    now = single & (g | m[1] | m[2])
                    if now == 0:
                        break
                    if now != single:
                        _record_drops(single & ~now, 0, <int32_t>i, total)
                    if now & ~g:
                        _count_slow_tiers(now, g, m[1], 0, cpu, storage)
                    single = now
                    if path != NULL:
                        path[i] = idx
                    i += 1
                alive[0] = single
            else:
                while i < n:
                    idx = self._lookahead(keys, n, i, ring)
                    if idx < 0:
                        break
                    m = <uint64_t*>(self._node(idx) + 1)
                    anyone = 0
                    for wd in range(W):
                        anyone |= alive[wd] & (m[wd] | m[W + wd] | m[2 * W + wd])
                    if anyone == 0:
                        break
                    for wd in range(W):
                        before = alive[wd]
                        g = m[wd]
                        now = before & (g | m[W + wd] | m[2 * W + wd])
                        if now != before:
                            _record_drops(before & ~now, wd * 64, <int32_t>i, total)
                        if now & ~g:
                            _count_slow_tiers(now, g, m[W + wd], wd * 64, cpu, storage)
                        alive[wd] = now
                    if path != NULL:
                        path[i] = idx
                    i += 1
            matched = i
            for wd in range(W):
                _record_drops(alive[wd], wd * 64, <int32_t>matched, total)

        for wd in range(W):
            bits = ever[wd] if matched else 0
            while bits:
                worker = wd * 64 + kv_ctz64(bits)
                bits &= bits - 1
                result.append((worker, total[worker], total[worker] - cpu[worker] - storage[worker],
                               cpu[worker], storage[worker]))
                total[worker] = 0
                cpu[worker] = 0
                storage[worker] = 0
        if path != NULL:
            for j in range(matched - 1, -1, -1):
                self._touch(path[j])
        return result

    @property
    def num_blocks(self):
        return self._count

    def worker_blocks(self, int worker):
        self._check(worker, 0)
        return self._held[worker].count

    @property
    def unknown_removals(self):
        return self._unknown

    @property
    def evictions(self):
        return self._evicted

    def bytes_used(self):
        """Bytes held: allocated capacities of every structure, plus the side dict."""
        cdef Py_ssize_t total = 0, i
        total += self._nchunks * (CHUNK_NODES * self._stride + sizeof(char*))
        total += (self._table.mask + 1) * sizeof(MapSlot)
        total += self._max_workers * (sizeof(U64Map) + sizeof(I32Set) + 3 * sizeof(int32_t))
        for i in range(self._max_workers):
            if self._engine[i].slots != NULL:
                total += (self._engine[i].mask + 1) * sizeof(MapSlot)
            if self._held[i].slots != NULL:
                total += (self._held[i].mask + 1) * sizeof(uint32_t)
        total += self._lru_cap * sizeof(LruEntry)
        total += self._s_cap * (2 * sizeof(uint64_t) + sizeof(int32_t))
        total += 2 * self._words * sizeof(uint64_t) + self._stack_cap * sizeof(int32_t)
        total += sys.getsizeof(self._multi)
        return total
