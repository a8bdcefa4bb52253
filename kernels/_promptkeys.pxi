# Included by blocktable.pyx: a prompt's block keys, hashed as far as a walk needs them.
#
# Hashing the whole prompt before the walk is what made a lookup cost the prompt's length
# whatever it matched: 512 blocks hashed when the walk ends after ~160 (see the index
# benchmark). PromptKeys keeps the tokens and hashes on demand; BlockTable.match pulls
# keys a few blocks ahead of its position, so the hashing stops within that lead of the
# block where no worker matches any more.


@cython.final
cdef class PromptKeys:
    """The chained keys of a prompt's full blocks, hashed on demand.

    ``BlockTable.match`` hashes only the blocks its walk reaches; ``len()`` needs no
    hashing; iterating, indexing or ``np.asarray`` hash the rest. Hashed keys are kept.
    The token sequence is read when a block is hashed, so it must not change meanwhile
    (a list that shrank raises ValueError; a token that is not an integer raises
    TypeError when its block is hashed).
    """

    cdef object _tokens            # the list, or the object whose buffer _view holds
    cdef U64View _view
    cdef bint _is_list
    cdef Py_ssize_t _block_size
    cdef Py_ssize_t _n
    cdef Py_ssize_t _ready
    cdef uint64_t* _keys
    cdef uint64_t _chain           # own: key of the last hashed block (the root before any)
    cdef uint64_t* _salts
    cdef Py_ssize_t _nsalts
    # vLLM mode: keys are the wire hashes of sha256_cbor digests chained from _parent
    cdef bint _vllm
    cdef object _parent            # the root digest (any CBOR-encodable value, bytes in practice)
    cdef uint8_t _digest[34]       # CBOR bytes(32) head + the last hashed block's digest
    cdef object _extra             # per-block extra keys, or None
    cdef Py_ssize_t _nextra
    cdef object _last_extra
    cdef bytes _last_encoded
    cdef CBuf _buf

    def __cinit__(self):
        self._view.owned = NULL
        self._view.has_buffer = False
        self._view.data = NULL
        self._keys = NULL
        self._salts = NULL
        self._buf.data = NULL
        self._buf.length = 0
        self._buf.capacity = 0

    def __dealloc__(self):
        _view_close(&self._view)
        free(self._keys)
        free(self._salts)
        free(self._buf.data)

    cdef int _extend(self, Py_ssize_t upto) except -1:
        """Hash blocks [_ready, upto)."""
        cdef Py_ssize_t bs = self._block_size
        if upto > self._n:
            upto = self._n
        if upto <= self._ready:
            return 0
        if self._is_list and PyList_GET_SIZE(self._tokens) < upto * bs:
            raise ValueError("the prompt's token list shrank after its keys were requested")
        if self._vllm:
            return self._extend_vllm(upto)
        _chain_keys(self._tokens, self._view.data, self._ready, upto - self._ready, bs, self._chain,
                    self._salts, self._nsalts, &self._keys[self._ready])
        self._chain = self._keys[upto - 1]
        self._ready = upto
        return 0

    cdef int _extend_vllm(self, Py_ssize_t upto) except -1:
        # blockhash_ref.vllm_block_digests, one block at a time: sha256 of the canonical
        # CBOR of (parent digest, tokens, extra keys or None); the key is the wire hash.
        cdef CBuf* buf = &self._buf
        cdef Py_ssize_t i, k, at, bs = self._block_size
        cdef uint64_t wire
        cdef object extra
        for i in range(self._ready, upto):
            buf.length = 0
            _cbuf_reserve(buf, 1)
            buf.data[0] = <char>0x83  # array of 3: (parent, tokens, extra)
            buf.length = 1
            if i == 0:
                _put_value(buf, self._parent)
            else:
                _put_raw(buf, <const char*>self._digest, 34)
            if self._is_list:
                _put_tokens_list(buf, <list>self._tokens, i * bs, bs)
            else:
                _put_tokens_view(buf, &self._view, i * bs, bs)
            extra = self._extra[i] if i < self._nextra else None
            if extra is None:
                _put_raw(buf, b"\xf6", 1)
            else:
                # LoRA extra keys repeat the same tuple on every block: encode it once.
                if extra is not self._last_extra:
                    at = buf.length
                    _put_value(buf, extra)
                    self._last_encoded = PyBytes_FromStringAndSize(buf.data + at, buf.length - at)
                    self._last_extra = extra
                else:
                    _put_raw(buf, PyBytes_AS_STRING(self._last_encoded), PyBytes_GET_SIZE(self._last_encoded))
            kv_sha256(<const uint8_t*>buf.data, buf.length, &self._digest[2])
            wire = 0
            for k in range(26, 34):
                wire = (wire << 8) | self._digest[k]
            self._keys[i] = wire
            self._ready = i + 1
        return 0

    @property
    def hashed(self):
        """Blocks hashed so far."""
        return self._ready

    def __len__(self):
        return self._n

    def __repr__(self):
        return f"PromptKeys({self._n} blocks, {self._ready} hashed)"

    def __getitem__(self, index):
        cdef Py_ssize_t i
        if isinstance(index, slice):
            return self.__array__()[index]
        i = index
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("block index out of range")
        self._extend(i + 1)
        return PyLong_FromUnsignedLongLong(self._keys[i])

    def __iter__(self):
        self._extend(self._n)
        return iter(self.tolist())

    def tolist(self):
        cdef Py_ssize_t i
        self._extend(self._n)
        return [PyLong_FromUnsignedLongLong(self._keys[i]) for i in range(self._n)]

    def __array__(self, dtype=None, copy=None):
        cdef uint64_t[::1] dest
        self._extend(self._n)
        result = np.empty(self._n, dtype=np.uint64)
        if self._n:
            dest = result
            memcpy(&dest[0], self._keys, self._n * sizeof(uint64_t))
        return result if dtype is None else result.astype(dtype)


def vllm_prompt_keys(tokens, Py_ssize_t block_size, parent_digest, extra_keys=None):
    """vLLM's sha256_cbor wire hashes of the full blocks of ``tokens`` (see blockhash_ref), lazily."""
    cdef PromptKeys keys = PromptKeys.__new__(PromptKeys)
    cdef Py_ssize_t ntokens
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    keys._vllm = True
    if type(tokens) is not list and PyObject_CheckBuffer(tokens):
        _view_open(tokens, -1, &keys._view)
        if not keys._view.has_buffer:
            # Not an integer buffer: encode the items as the objects they are.
            _view_close(&keys._view)
            tokens = list(tokens)
    elif type(tokens) is not list:
        tokens = list(tokens)
    keys._is_list = type(tokens) is list
    keys._tokens = tokens
    ntokens = PyList_GET_SIZE(tokens) if keys._is_list else keys._view.n
    keys._block_size = block_size
    keys._n = ntokens // block_size
    keys._parent = parent_digest
    keys._digest[0] = 0x58  # CBOR byte string, one-byte length: 32
    keys._digest[1] = 32
    keys._extra = extra_keys
    keys._nextra = 0 if extra_keys is None else len(extra_keys)
    keys._keys = <uint64_t*>malloc(max(keys._n, 1) * sizeof(uint64_t))
    if keys._keys == NULL:
        raise MemoryError()
    return keys


def own_prompt_keys(tokens, Py_ssize_t block_size, root_key, salts=None):
    """kvsched's chained keys of the full blocks of ``tokens`` (see blockhash_ref), lazily."""
    cdef PromptKeys keys = PromptKeys.__new__(PromptKeys)
    cdef Py_ssize_t i, ntokens
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if type(tokens) is list:
        keys._is_list = True
        keys._tokens = tokens
        ntokens = PyList_GET_SIZE(tokens)
    else:
        _view_open(tokens, -1, &keys._view)
        keys._tokens = tokens
        ntokens = keys._view.n
    keys._block_size = block_size
    keys._n = ntokens // block_size
    keys._chain = _mask_obj(root_key)
    keys._keys = <uint64_t*>malloc(max(keys._n, 1) * sizeof(uint64_t))
    if keys._keys == NULL:
        raise MemoryError()
    if salts is not None and len(salts):
        keys._nsalts = len(salts)
        keys._salts = <uint64_t*>malloc(keys._nsalts * sizeof(uint64_t))
        if keys._salts == NULL:
            raise MemoryError()
        for i in range(keys._nsalts):
            keys._salts[i] = _mask_obj(salts[i])
    return keys
