# Included by blocktable.pyx: vLLM's KV-event batch (msgpack) decoded straight into the
# table, the fast twin of scheduler/codec/kvevents.py + PrefixIndex.apply_batch.
#
# Why: msgpack.unpackb alone builds a Python int per token id and per hash (17 objects a
# block) and runs at ~2.5M blocks/s here; with the codec's dataclasses and the index's
# per-event calls the whole path was 1.2M blocks/s. Decoding into C arrays and applying
# from them skips every per-block Python object.
#
# Exactness: the reference codec stays the specification. This decoder accepts only what
# it reproduces exactly - well-formed msgpack whose events all decode without error, in
# either encoding (tagged maps, legacy arrays) - and declines anything else *before
# changing anything*, so the caller decodes that payload with the codec. Declined: any
# malformed byte, extension types, non-ASCII strings (the codec upper-cases ``medium``
# with Unicode rules), nesting deeper than 32, any event the codec would reject or report
# (bad fields, unknown types), and events the index would report as errors (block size
# mismatch, too few or non-integer tokens, a 0 key in exact mode, extra keys whose salt
# cannot be computed). tests/test_kvbatch_fast.py holds the two paths equal.

cdef extern from *:
    """
    /* A msgpack reader over one payload. kv_head reads the head of the next value:
       scalars, str and bin are consumed whole; an array or a map leaves the reader at its
       first element with the count in len. -1: malformed, or a kind this decoder leaves
       to the reference codec (0xc1, extension types, non-ASCII str). */
    enum { KV_NIL, KV_BOOL, KV_INT, KV_FLOAT, KV_STR, KV_BIN, KV_ARRAY, KV_MAP };
    #define KV_MAX_DEPTH 32
    typedef struct { const uint8_t *p; const uint8_t *end; } kv_reader;
    typedef struct { int kind; int neg; uint64_t u; const uint8_t *ptr; uint64_t len; } kv_val;

    static inline uint64_t kv_be(const uint8_t *p, int n) {
        uint64_t v = 0;
        int i;
        for (i = 0; i < n; i++) v = (v << 8) | p[i];
        return v;
    }

    static inline int kv_take(kv_reader *r, uint64_t n, const uint8_t **at) {
        if ((uint64_t)(r->end - r->p) < n) return -1;
        *at = r->p;
        r->p += n;
        return 0;
    }

    static int kv_bytes(kv_reader *r, kv_val *v, int kind, int lenbytes) {
        const uint8_t *at;
        uint64_t i;
        if (kv_take(r, (uint64_t)lenbytes, &at)) return -1;
        v->len = kv_be(at, lenbytes);
        if (kv_take(r, v->len, &v->ptr)) return -1;
        v->kind = kind;
        if (kind == KV_STR)
            for (i = 0; i < v->len; i++)
                if (v->ptr[i] & 0x80) return -1;
        return 0;
    }

    static int kv_head(kv_reader *r, kv_val *v) {
        const uint8_t *at;
        uint8_t b;
        if (r->p >= r->end) return -1;
        b = *r->p++;
        v->neg = 0;
        if (b <= 0x7f) { v->kind = KV_INT; v->u = b; return 0; }
        if (b >= 0xe0) { v->kind = KV_INT; v->u = (uint64_t)(int64_t)(int8_t)b; v->neg = 1; return 0; }
        if ((b & 0xf0) == 0x80) { v->kind = KV_MAP; v->len = b & 0x0f; return 0; }
        if ((b & 0xf0) == 0x90) { v->kind = KV_ARRAY; v->len = b & 0x0f; return 0; }
        if ((b & 0xe0) == 0xa0) {
            uint64_t i;
            v->len = b & 0x1f;
            if (kv_take(r, v->len, &v->ptr)) return -1;
            v->kind = KV_STR;
            for (i = 0; i < v->len; i++)
                if (v->ptr[i] & 0x80) return -1;
            return 0;
        }
        switch (b) {
        case 0xc0: v->kind = KV_NIL; return 0;
        case 0xc2: v->kind = KV_BOOL; v->u = 0; return 0;
        case 0xc3: v->kind = KV_BOOL; v->u = 1; return 0;
        case 0xc4: return kv_bytes(r, v, KV_BIN, 1);
        case 0xc5: return kv_bytes(r, v, KV_BIN, 2);
        case 0xc6: return kv_bytes(r, v, KV_BIN, 4);
        case 0xca: v->kind = KV_FLOAT; return kv_take(r, 4, &at);
        case 0xcb: v->kind = KV_FLOAT; return kv_take(r, 8, &at);
        case 0xcc: case 0xcd: case 0xce: case 0xcf: {
            int n = 1 << (b - 0xcc);
            if (kv_take(r, n, &at)) return -1;
            v->kind = KV_INT; v->u = kv_be(at, n);
            return 0;
        }
        case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
            int n = 1 << (b - 0xd0);
            uint64_t raw;
            if (kv_take(r, n, &at)) return -1;
            raw = kv_be(at, n);
            if (n < 8 && (raw >> (8 * n - 1)) & 1) raw |= ~(uint64_t)0 << (8 * n);  /* sign-extend */
            v->kind = KV_INT; v->u = raw; v->neg = (int64_t)raw < 0;
            return 0;
        }
        case 0xd9: return kv_bytes(r, v, KV_STR, 1);
        case 0xda: return kv_bytes(r, v, KV_STR, 2);
        case 0xdb: return kv_bytes(r, v, KV_STR, 4);
        case 0xdc: if (kv_take(r, 2, &at)) return -1; v->kind = KV_ARRAY; v->len = kv_be(at, 2); return 0;
        case 0xdd: if (kv_take(r, 4, &at)) return -1; v->kind = KV_ARRAY; v->len = kv_be(at, 4); return 0;
        case 0xde: if (kv_take(r, 2, &at)) return -1; v->kind = KV_MAP; v->len = kv_be(at, 2); return 0;
        case 0xdf: if (kv_take(r, 4, &at)) return -1; v->kind = KV_MAP; v->len = kv_be(at, 4); return 0;
        default: return -1;  /* 0xc1, extension types */
        }
    }

    /* Bytes taken by a value that has a fixed size given its first byte (ints, floats,
       nil, bools), else 0: token ids and hashes are most of a batch, and skipping them
       must not cost a kv_head each. */
    static const uint8_t kv_fixed[256] = {
        /* 0x00-0x7f positive fixint */
        1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1, 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,
        1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1, 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,
        1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1, 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,
        1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1, 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,
        /* 0x80-0xbf fixmap, fixarray, fixstr */
        0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0, 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
        0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0, 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
        /* 0xc0 nil, c1 -, c2 c3 bools, c4-c9 bin/ext, ca cb floats, cc-cf uints,
           d0-d3 ints, d4-d8 fixext, d9-df str/array/map */
        1,0,1,1,0,0,0,0,0,0,5,9,2,3,5,9, 2,3,5,9,0,0,0,0,0,0,0,0,0,0,0,0,
        /* 0xe0-0xff negative fixint */
        1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1, 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,
    };

    /* Skip one whole value. A map key must be hashable once decoded (msgpack-python
       raises on an array or map key), so those are declined. */
    static int kv_skip(kv_reader *r, int depth) {
        kv_val v, k;
        uint64_t i;
        uint8_t size;
        if (r->p < r->end && (size = kv_fixed[*r->p]) != 0) {
            if ((uint64_t)(r->end - r->p) < size) return -1;
            r->p += size;
            return 0;
        }
        if (kv_head(r, &v)) return -1;
        if (v.kind == KV_ARRAY) {
            if (depth >= KV_MAX_DEPTH) return -1;
            for (i = 0; i < v.len; i++) {
                if (r->p < r->end && (size = kv_fixed[*r->p]) != 0) {
                    if ((uint64_t)(r->end - r->p) < size) return -1;
                    r->p += size;
                } else if (kv_skip(r, depth + 1)) {
                    return -1;
                }
            }
        } else if (v.kind == KV_MAP) {
            if (depth >= KV_MAX_DEPTH) return -1;
            for (i = 0; i < v.len; i++) {
                if (kv_head(r, &k) || k.kind == KV_ARRAY || k.kind == KV_MAP) return -1;
                if (kv_skip(r, depth + 1)) return -1;
            }
        }
        return 0;
    }

    /* Token ids in the encodings a tokenizer's ids take (fixint, uint8/16/32/64), read
       into out until n are read or another encoding comes; returns how many. The
       uint widths share one branch-free path (a big-endian 8-byte load shifted down):
       a vocabulary of 128k ids mixes uint16 and uint32 at random, and a branch per
       width would be mispredicted every other token. */
    static inline uint64_t kv_uints(kv_reader *r, uint64_t *out, uint64_t n) {
        const uint8_t *p = r->p, *end = r->end;
        uint64_t i = 0;
        while (i < n && end - p >= 9) {
            uint8_t b = *p;
            if (b <= 0x7f) { out[i++] = b; p += 1; continue; }
            if ((b & 0xfc) != 0xcc) break;
            {
                unsigned width = 1u << (b & 3);      /* 0xcc..0xcf: 1, 2, 4, 8 bytes */
                uint64_t word;
                memcpy(&word, p + 1, 8);
    #if defined(__GNUC__) || defined(__clang__)
                word = __builtin_bswap64(word);
    #else
                word = kv_be(p + 1, 8);
    #endif
                out[i++] = width == 8 ? word : word >> (64 - 8 * width);
                p += 1 + width;
            }
        }
        r->p = p;
        return i;
    }

    /* One token id: 1 and the value (mod 2**64) for an int or a bool (operator.index
       accepts both), 0 for anything else (skipped whole), -1 when malformed. */
    static inline int kv_token(kv_reader *r, uint64_t *out) {
        const uint8_t *p = r->p;
        kv_val v;
        if (p < r->end) {
            uint8_t b = *p;
            if (b <= 0x7f) { *out = b; r->p = p + 1; return 1; }
            if (b == 0xce && r->end - p >= 5) { *out = kv_be(p + 1, 4); r->p = p + 5; return 1; }
            if (b == 0xcd && r->end - p >= 3) { *out = kv_be(p + 1, 2); r->p = p + 3; return 1; }
        }
        if (kv_head(r, &v)) return -1;
        if (v.kind == KV_INT || v.kind == KV_BOOL) { *out = v.u; return 1; }
        if (v.kind == KV_ARRAY || v.kind == KV_MAP) {
            r->p = p;
            if (kv_skip(r, 1)) return -1;
        }
        return 0;
    }
    """
    enum:
        KV_NIL
        KV_BOOL
        KV_INT
        KV_FLOAT
        KV_STR
        KV_BIN
        KV_ARRAY
        KV_MAP
    ctypedef struct kv_reader:
        const uint8_t* p
        const uint8_t* end
    ctypedef struct kv_val:
        int kind
        int neg
        uint64_t u
        const uint8_t* ptr
        uint64_t len
    int kv_head(kv_reader* r, kv_val* v) nogil
    uint64_t kv_be(const uint8_t* p, int n) nogil
    int kv_skip(kv_reader* r, int depth) nogil
    int kv_token(kv_reader* r, uint64_t* out) nogil
    uint64_t kv_uints(kv_reader* r, uint64_t* out, uint64_t n) nogil

from libc.string cimport memcmp, strcmp, strlen
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_FromLongLong
from cpython.set cimport PySet_Add, PySet_Contains

cdef enum:
    EV_STORED = 1
    EV_REMOVED = 2
    EV_CLEARED = 3
    # Field slots: 0 the tag, then BlockStored's positional order (vLLM 0.33.0
    # vllm/distributed/kv_events.py, as codec/kvevents.py _STORED_FIELDS).
    F_TYPE = 0
    F_HASHES = 1
    F_PARENT = 2
    F_TOKENS = 3
    F_BLOCK_SIZE = 4
    F_LORA_ID = 5
    F_MEDIUM = 6
    F_LORA_NAME = 7
    F_EXTRA = 8
    F_GROUP = 9
    F_KIND = 10
    NFIELDS = 11

# BlockRemoved's positional fields: block_hashes, medium, group_idx.
cdef int REMOVED_SLOTS[3]
REMOVED_SLOTS[:] = [F_HASHES, F_MEDIUM, F_GROUP]

cdef const char* FIELD_NAMES[NFIELDS]
FIELD_NAMES[:] = [b"type", b"block_hashes", b"parent_block_hash", b"token_ids", b"block_size",
                  b"lora_id", b"medium", b"lora_name", b"extra_keys", b"group_idx",
                  b"kv_cache_spec_kind"]


cdef struct Ev:
    int kind
    int tier
    bint full                   # counts for prefix reuse (full attention)
    bint has_parent
    bint has_lora
    bint group_neg
    uint64_t group              # group_idx as msgpack gave it (two's complement when negative)
    uint64_t parent
    uint64_t lora
    uint64_t block_size
    Py_ssize_t h_off
    Py_ssize_t h_n
    Py_ssize_t t_off
    Py_ssize_t t_n
    Py_ssize_t t_bad            # first token that is not an int or bool, or -1
    Py_ssize_t x_off
    Py_ssize_t x_n              # extra_keys elements, -1 when not an array


cdef struct Span:
    Py_ssize_t start
    Py_ssize_t end


cdef struct Decoded:
    Ev* ev
    Py_ssize_t nev
    Py_ssize_t ev_cap
    uint64_t* h
    Py_ssize_t nh
    Py_ssize_t h_cap
    uint64_t* t
    Py_ssize_t nt
    Py_ssize_t t_cap
    Span* x
    Py_ssize_t nx
    Py_ssize_t x_cap


cdef int _grow(void** buf, Py_ssize_t* cap, Py_ssize_t want, size_t item) except -1:
    cdef Py_ssize_t new_cap
    cdef void* p
    if want <= cap[0]:
        return 0
    new_cap = max(want, 2 * cap[0], 64)
    p = realloc(buf[0], new_cap * item)
    if p == NULL:
        raise MemoryError()
    buf[0] = p
    cap[0] = new_cap
    return 0


cdef void _decoded_free(Decoded* d) noexcept nogil:
    free(d.ev)
    free(d.h)
    free(d.t)
    free(d.x)


cdef inline int _field_of(const kv_val* key) noexcept nogil:
    cdef int f
    if key.kind != KV_STR:
        return -1
    for f in range(NFIELDS):
        if key.len == strlen(FIELD_NAMES[f]) and memcmp(key.ptr, FIELD_NAMES[f], key.len) == 0:
            return f
    return -1


cdef inline bint _str_is(const kv_val* v, const char* text) noexcept nogil:
    return v.len == strlen(text) and memcmp(v.ptr, text, v.len) == 0


cdef int _medium_tier(const kv_val* v) noexcept nogil:
    """Tier.from_wire for an ASCII string: GPU 0, CPU 1, anything else STORAGE 2."""
    cdef char upper[16]
    cdef uint64_t i
    cdef uint8_t c
    if v.len >= 16:
        return 2
    for i in range(v.len):
        c = v.ptr[i]
        upper[i] = <char>(c - 32 if 97 <= c <= 122 else c)
    upper[v.len] = 0
    if strcmp(upper, b"GPU") == 0 or strcmp(upper, b"CUDA") == 0 or strcmp(upper, b"HBM") == 0:
        return 0
    if strcmp(upper, b"CPU") == 0 or strcmp(upper, b"DRAM") == 0 or strcmp(upper, b"CPU_PINNED") == 0:
        return 1
    return 2


cdef inline int _field(const uint8_t** pos, int f, const uint8_t* end, kv_reader* r, kv_val* v) noexcept nogil:
    """Head of field f into v (1), or 0 when the event lacks it (the codec's .get -> None)."""
    if pos[f] == NULL:
        return 0
    r.p = pos[f]
    r.end = end
    if kv_head(r, v):
        return -1
    return 1


cdef inline int _read_hash(kv_reader* r, uint64_t* out) noexcept nogil:
    """normalize_block_hash: an int mod 2**64, or bytes read big-endian from their last 8."""
    cdef kv_val v
    cdef uint64_t i, start
    if r.p < r.end and r.p[0] == 0xcf and r.end - r.p >= 9:   # vLLM's uint64 hashes
        out[0] = kv_be(r.p + 1, 8)
        r.p += 9
        return 0
    if kv_head(r, &v):
        return -1
    if v.kind == KV_INT:
        out[0] = v.u
        return 0
    if v.kind == KV_BIN and v.len > 0:
        start = v.len - 8 if v.len > 8 else 0
        out[0] = 0
        for i in range(start, v.len):
            out[0] = (out[0] << 8) | v.ptr[i]
        return 0
    return -1


cdef int _take_hashes(Decoded* d, kv_reader* r, Ev* ev) except -2:
    """block_hashes at r: decoded into d.h (1), not an array of hashes (0: skipped, the
    event may not need it), or malformed (-1)."""
    cdef const uint8_t* start = r.p
    cdef kv_val v
    cdef uint64_t i
    cdef uint64_t* h
    cdef Py_ssize_t nh
    if kv_head(r, &v):
        return -1
    if v.kind == KV_ARRAY:
        _grow(<void**>&d.h, &d.h_cap, d.nh + <Py_ssize_t>v.len, sizeof(uint64_t))
        h = d.h
        nh = d.nh
        for i in range(v.len):
            if _read_hash(r, &h[nh + <Py_ssize_t>i]):
                break
        else:
            ev.h_off = nh
            ev.h_n = <Py_ssize_t>v.len
            d.nh = nh + <Py_ssize_t>v.len
            return 1
    r.p = start
    return -1 if kv_skip(r, 2) else 0


cdef int _take_tokens(Decoded* d, kv_reader* r, Ev* ev) except -2:
    """token_ids at r: nil or an array, decoded into d.t (1, items that are not ints noted
    in t_bad); something else (0, skipped); malformed (-1)."""
    cdef const uint8_t* start = r.p
    cdef kv_val v
    cdef uint64_t i
    cdef uint64_t token
    cdef uint64_t* t
    cdef Py_ssize_t nt, bad = -1
    cdef int k
    if kv_head(r, &v):
        return -1
    ev.t_off = d.nt
    ev.t_n = 0
    ev.t_bad = -1
    if v.kind == KV_NIL:
        return 1
    if v.kind != KV_ARRAY:
        r.p = start
        return -1 if kv_skip(r, 2) else 0
    _grow(<void**>&d.t, &d.t_cap, d.nt + <Py_ssize_t>v.len, sizeof(uint64_t))
    t = d.t
    nt = d.nt
    i = 0
    while i < v.len:
        i += kv_uints(r, &t[nt + <Py_ssize_t>i], v.len - i)
        if i == v.len:
            break
        k = kv_token(r, &token)
        if k < 0:
            return -1
        if k == 0:
            token = 0
            if bad < 0:
                bad = <Py_ssize_t>i
        t[nt + <Py_ssize_t>i] = token
        i += 1
    nt += <Py_ssize_t>v.len
    ev.t_n = nt - d.nt
    ev.t_bad = bad
    d.nt = nt
    return 1


cdef int _decode_event(Decoded* d, kv_reader* r, const uint8_t* base, const uint8_t* end) except -2:
    """Decode one event into d; 0 done, -1 declined (the codec must handle the payload).

    Checks follow codec/kvevents.py's decode_event, _stored and _removed field by field.
    The hashes and token ids are decoded as the scan meets them (not skipped, then read
    again): they are nearly all of a batch's bytes.
    """
    cdef const uint8_t* pos[NFIELDS]
    cdef const uint8_t* elem[10]
    cdef kv_val head, key, v
    cdef kv_reader fr
    cdef Ev* ev
    cdef int f, k, got, hashes = 0, tokens = 0
    cdef uint64_t i, nelem = 0
    for f in range(NFIELDS):
        pos[f] = NULL
    _grow(<void**>&d.ev, &d.ev_cap, d.nev + 1, sizeof(Ev))
    ev = &d.ev[d.nev]
    memset(ev, 0, sizeof(Ev))
    ev.t_bad = -1
    ev.x_n = -1
    if kv_head(r, &head):
        return -1
    if head.kind == KV_MAP:
        for i in range(head.len):
            if kv_head(r, &key) or key.kind == KV_ARRAY or key.kind == KV_MAP:
                return -1
            f = _field_of(&key)
            if f >= 0:
                pos[f] = r.p   # a repeated key: the last one wins, as in a dict
            if f == F_HASHES:
                hashes = _take_hashes(d, r, ev)
                if hashes < 0:
                    return -1
            elif f == F_TOKENS:
                tokens = _take_tokens(d, r, ev)
                if tokens < 0:
                    return -1
            elif kv_skip(r, 2):
                return -1
    elif head.kind == KV_ARRAY and head.len > 0:
        # Legacy positional event: [tag, field1, ...]; fields past the known ones ignored.
        pos[F_TYPE] = r.p
        if kv_skip(r, 2):
            return -1
        for i in range(head.len - 1):
            if i < 10:
                elem[i] = r.p
                nelem = i + 1
            if kv_skip(r, 2):
                return -1
    else:
        return -1
    # The tag: a str, or bytes (decoded as UTF-8, where anything but these names differs).
    if _field(pos, F_TYPE, end, &fr, &v) != 1 or (v.kind != KV_STR and v.kind != KV_BIN):
        return -1
    if _str_is(&v, b"AllBlocksCleared"):
        ev.kind = EV_CLEARED
        d.nev += 1
        return 0
    if _str_is(&v, b"BlockRemoved"):
        ev.kind = EV_REMOVED
        if head.kind == KV_ARRAY:
            for i in range(min(nelem, 3)):
                pos[REMOVED_SLOTS[i]] = elem[i]
    elif _str_is(&v, b"BlockStored"):
        ev.kind = EV_STORED
        if head.kind == KV_ARRAY:
            for i in range(nelem):
                pos[i + 1] = elem[i]
    else:
        return -1
    if head.kind == KV_ARRAY:
        # Positional: the fields were skipped in the scan; decode them now.
        if pos[F_HASHES] != NULL:
            fr.p = pos[F_HASHES]
            fr.end = end
            hashes = _take_hashes(d, &fr, ev)
        if ev.kind == EV_STORED and pos[F_TOKENS] != NULL:
            fr.p = pos[F_TOKENS]
            fr.end = end
            tokens = _take_tokens(d, &fr, ev)
    # block_hashes: required, an array of ints or non-empty bytes.
    if hashes != 1:
        return -1
    # medium: nil/absent is GPU; otherwise a string.
    got = _field(pos, F_MEDIUM, end, &fr, &v)
    if got < 0 or (got == 1 and v.kind != KV_NIL and v.kind != KV_STR):
        return -1
    ev.tier = _medium_tier(&v) if got == 1 and v.kind == KV_STR else 0
    # group_idx: nil/absent is 0; otherwise an int (a bool is refused).
    got = _field(pos, F_GROUP, end, &fr, &v)
    if got < 0 or (got == 1 and v.kind != KV_NIL and v.kind != KV_INT):
        return -1
    if got == 1 and v.kind == KV_INT:
        ev.group = v.u
        ev.group_neg = v.neg
    if ev.kind == EV_REMOVED:
        d.nev += 1
        return 0
    # parent_block_hash: nil/absent, or a hash.
    got = _field(pos, F_PARENT, end, &fr, &v)
    if got < 0:
        return -1
    if got == 1 and v.kind != KV_NIL:
        fr.p = pos[F_PARENT]
        if _read_hash(&fr, &ev.parent):
            return -1
        ev.has_parent = True
    # token_ids: nil/absent is empty; otherwise an array (items are checked when used).
    if pos[F_TOKENS] != NULL and tokens != 1:
        return -1
    # block_size: a positive int.
    got = _field(pos, F_BLOCK_SIZE, end, &fr, &v)
    if got != 1 or v.kind != KV_INT or v.neg or v.u == 0:
        return -1
    ev.block_size = v.u
    # lora_id: nil/absent, or an int.
    got = _field(pos, F_LORA_ID, end, &fr, &v)
    if got < 0 or (got == 1 and v.kind != KV_NIL and v.kind != KV_INT):
        return -1
    if got == 1 and v.kind == KV_INT:
        ev.has_lora = True
        ev.lora = v.u
    # lora_name: a block stored under a named adapter hangs from that adapter's root
    # (PrefixIndex._event_root, by name before id); this decoder keys by lora_id alone, so
    # such an event is the codec's (it stored the blocks under the base model's root).
    got = _field(pos, F_LORA_NAME, end, &fr, &v)
    if got < 0 or (got == 1 and v.kind != KV_NIL):
        return -1
    # extra_keys: an array (its items kept as raw spans), else None whatever it is.
    got = _field(pos, F_EXTRA, end, &fr, &v)
    if got < 0:
        return -1
    if got == 1 and v.kind == KV_ARRAY:
        _grow(<void**>&d.x, &d.x_cap, d.nx + <Py_ssize_t>v.len, sizeof(Span))
        ev.x_off = d.nx
        for i in range(v.len):
            d.x[d.nx].start = fr.p - base
            if kv_skip(&fr, 2):
                return -1
            d.x[d.nx].end = fr.p - base
            d.nx += 1
        ev.x_n = d.nx - ev.x_off
    # kv_cache_spec_kind: nil/absent or a full-attention name counts for prefix reuse
    # (any other value's str() is none of those names).
    got = _field(pos, F_KIND, end, &fr, &v)
    if got < 0:
        return -1
    ev.full = (got == 0 or v.kind == KV_NIL or (v.kind == KV_STR and (
        _str_is(&v, b"full_attention") or _str_is(&v, b"FullAttentionSpec") or _str_is(&v, b"full"))))
    d.nev += 1
    return 0


cdef int _decode_batch(Decoded* d, const uint8_t* base, Py_ssize_t size) except -2:
    """The batch [ts, events, data_parallel_rank, ...] into d; -1 declined."""
    cdef kv_reader r
    cdef kv_val top, v
    cdef uint64_t i
    d.nev = 0
    d.nh = 0
    d.nt = 0
    d.nx = 0
    r.p = base
    r.end = base + size
    if kv_head(&r, &top) or top.kind != KV_ARRAY or top.len < 2:
        return -1
    if kv_head(&r, &v) or (v.kind != KV_INT and v.kind != KV_FLOAT):
        return -1
    if kv_head(&r, &v) or v.kind != KV_ARRAY:
        return -1
    for i in range(v.len):
        if _decode_event(d, &r, base, r.end) < 0:
            return -1
    if top.len > 2:
        if kv_head(&r, &v) or (v.kind != KV_NIL and v.kind != KV_INT):
            return -1
        for i in range(top.len - 3):
            if kv_skip(&r, 1):
                return -1
    if r.p != r.end:
        return -1  # trailing bytes: msgpack.unpackb raises ExtraData
    return 0
