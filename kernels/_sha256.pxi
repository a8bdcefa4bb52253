# Shared by blockhash.pyx and blocktable.pyx (textual include): SHA-256 (FIPS 180-4) in C.
#
# vLLM's block hash is sha256 over ~120 bytes of CBOR per block. Through hashlib each
# block costs an argument bytes object, a hash object and a digest bytes object (~1 us
# here); in C it is two compression calls. x86-64 CPUs with the SHA extensions (this
# machine's Zen 2 has them) run the compression in hardware instructions; elsewhere the
# portable C below runs. tests/test_kernels_hashing.py checks both against hashlib.

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    static const uint32_t kv_k256[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    };

    #define KV_ROTR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

    static void kv_sha256_blocks_c(uint32_t s[8], const uint8_t *data, size_t blocks) {
        uint32_t w[64];
        int t;
        while (blocks--) {
            uint32_t a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
            for (t = 0; t < 16; t++)
                w[t] = ((uint32_t)data[4 * t] << 24) | ((uint32_t)data[4 * t + 1] << 16)
                       | ((uint32_t)data[4 * t + 2] << 8) | data[4 * t + 3];
            for (t = 16; t < 64; t++) {
                uint32_t s0 = KV_ROTR32(w[t - 15], 7) ^ KV_ROTR32(w[t - 15], 18) ^ (w[t - 15] >> 3);
                uint32_t s1 = KV_ROTR32(w[t - 2], 17) ^ KV_ROTR32(w[t - 2], 19) ^ (w[t - 2] >> 10);
                w[t] = w[t - 16] + s0 + w[t - 7] + s1;
            }
            for (t = 0; t < 64; t++) {
                uint32_t t1 = h + (KV_ROTR32(e, 6) ^ KV_ROTR32(e, 11) ^ KV_ROTR32(e, 25))
                              + ((e & f) ^ (~e & g)) + kv_k256[t] + w[t];
                uint32_t t2 = (KV_ROTR32(a, 2) ^ KV_ROTR32(a, 13) ^ KV_ROTR32(a, 22))
                              + ((a & b) ^ (a & c) ^ (b & c));
                h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
            }
            s[0] += a; s[1] += b; s[2] += c; s[3] += d; s[4] += e; s[5] += f; s[6] += g; s[7] += h;
            data += 64;
        }
    }

    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <immintrin.h>
    #include <cpuid.h>
    #define KV_SHA_NI 1
    static int kv_cpu_has_sha(void) {
        unsigned a, b, c, d;
        if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
        if (!(c & (1u << 19)) || !(c & (1u << 9))) return 0;      /* SSE4.1, SSSE3 */
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
        return (b >> 29) & 1;                                      /* SHA */
    }
    /* The SHA extensions keep the state as (A,B,E,F) and (C,D,G,H) and run two rounds
       per sha256rnds2; message groups w[t] = 4 schedule words each. */
    __attribute__((target("sha,sse4.1,ssse3")))
    static void kv_sha256_blocks_ni(uint32_t s[8], const uint8_t *data, size_t blocks) {
        const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
        __m128i tmp = _mm_loadu_si128((const __m128i *)&s[0]);   /* D C B A */
        __m128i st1 = _mm_loadu_si128((const __m128i *)&s[4]);   /* H G F E */
        __m128i st0, abef, cdgh, msg, w[4];
        int t;
        tmp = _mm_shuffle_epi32(tmp, 0xB1);                        /* C D A B */
        st1 = _mm_shuffle_epi32(st1, 0x1B);                        /* E F G H */
        st0 = _mm_alignr_epi8(tmp, st1, 8);                        /* A B E F */
        st1 = _mm_blend_epi16(st1, tmp, 0xF0);                     /* C D G H */
        while (blocks--) {
            abef = st0;
            cdgh = st1;
            for (t = 0; t < 16; t++) {
                if (t < 4) {
                    w[t] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 16 * t)), swap);
                } else {
                    __m128i x = _mm_sha256msg1_epu32(w[t & 3], w[(t - 3) & 3]);
                    x = _mm_add_epi32(x, _mm_alignr_epi8(w[(t - 1) & 3], w[(t - 2) & 3], 4));
                    w[t & 3] = _mm_sha256msg2_epu32(x, w[(t - 1) & 3]);
                }
                msg = _mm_add_epi32(w[t & 3], _mm_loadu_si128((const __m128i *)&kv_k256[4 * t]));
                st1 = _mm_sha256rnds2_epu32(st1, st0, msg);
                st0 = _mm_sha256rnds2_epu32(st0, st1, _mm_shuffle_epi32(msg, 0x0E));
            }
            st0 = _mm_add_epi32(st0, abef);
            st1 = _mm_add_epi32(st1, cdgh);
            data += 64;
        }
        tmp = _mm_shuffle_epi32(st0, 0x1B);                        /* F E B A */
        st1 = _mm_shuffle_epi32(st1, 0xB1);                        /* D C H G */
        st0 = _mm_blend_epi16(tmp, st1, 0xF0);                     /* D C B A */
        st1 = _mm_alignr_epi8(st1, tmp, 8);                        /* H G F E */
        _mm_storeu_si128((__m128i *)&s[0], st0);
        _mm_storeu_si128((__m128i *)&s[4], st1);
    }
    #else
    #define KV_SHA_NI 0
    #endif

    /* 1: the SHA extensions are used (decided once), 0: portable C. */
    static int kv_sha256_uses_ni = -1;
    static int kv_sha256_force_portable = 0;

    static void kv_sha256_blocks(uint32_t s[8], const uint8_t *data, size_t blocks) {
    #if KV_SHA_NI
        if (kv_sha256_uses_ni < 0) kv_sha256_uses_ni = kv_cpu_has_sha();
        if (kv_sha256_uses_ni && !kv_sha256_force_portable) {
            kv_sha256_blocks_ni(s, data, blocks);
            return;
        }
    #else
        kv_sha256_uses_ni = 0;
    #endif
        kv_sha256_blocks_c(s, data, blocks);
    }

    static void kv_sha256(const uint8_t *data, size_t len, uint8_t out[32]) {
        uint32_t s[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                         0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
        uint8_t tail[128];
        size_t full = len / 64, rest = len % 64, pad;
        uint64_t bits = (uint64_t)len * 8;
        int i;
        kv_sha256_blocks(s, data, full);
        memcpy(tail, data + 64 * full, rest);
        tail[rest] = 0x80;
        pad = rest < 56 ? 64 : 128;
        memset(tail + rest + 1, 0, pad - rest - 1);
        for (i = 0; i < 8; i++) tail[pad - 1 - i] = (uint8_t)(bits >> (8 * i));
        kv_sha256_blocks(s, tail, pad / 64);
        for (i = 0; i < 8; i++) {
            out[4 * i] = (uint8_t)(s[i] >> 24);
            out[4 * i + 1] = (uint8_t)(s[i] >> 16);
            out[4 * i + 2] = (uint8_t)(s[i] >> 8);
            out[4 * i + 3] = (uint8_t)s[i];
        }
    }
    """
    void kv_sha256(const uint8_t* data, size_t length, uint8_t* out) nogil
    int kv_sha256_uses_ni
    int kv_sha256_force_portable
