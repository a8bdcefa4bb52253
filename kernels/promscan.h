/* The sample lines of a few metrics, out of a whole Prometheus text page, in one pass.
 *
 * One scan, two callers: kernels/promlines.pyx (sample_lines, a page handed over from
 * Python) and kernels/pagescrape.pyx (the native scraper's thread, a page it read off the
 * socket itself). Both call promscan_lines, so the two cannot disagree on which lines a
 * page holds. The pure-Python twin is scheduler/codec/prom.py::_sample_lines.
 *
 * A line of a wanted metric: at a line start after optional blanks, the metric name exactly,
 * followed by '{', a blank or a tab; reported from the name to its newline (exclusive).
 *
 * Why a line walk. A vLLM 0.33 page is 60 KB and 650 lines, of which kvsched reads five.
 * bytes.find compares byte by byte on text this repetitive (every line starts with "vllm:"):
 * ~1.2 bytes/ns, 50 us per name over a whole page, and every name has to be searched to the
 * page's end to catch a family split into two groups. This walks the lines once instead:
 * to each newline (promscan_lines), and a compare of the line's first bytes with each name
 * (most differ at the first or sixth byte).
 */
#ifndef KVSCHED_PROMSCAN_H
#define KVSCHED_PROMSCAN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define PROMSCAN_MAX_NAMES 16

typedef struct {
    int count;
    const unsigned char *starts[PROMSCAN_MAX_NAMES];
    size_t sizes[PROMSCAN_MAX_NAMES];
    /* A name's first 8 bytes (fewer for a shorter name, the rest masked off) as one word: a
     * line is compared with each name in a register, and only a line that shares them goes on
     * to memcmp (on a vLLM page every line starts "vllm:", so a byte-wise compare would get
     * five bytes in before failing). */
    uint64_t heads[PROMSCAN_MAX_NAMES];
    uint64_t masks[PROMSCAN_MAX_NAMES];
} promscan_names;

/* Called per sample line of name `which`, in page order. */
typedef void (*promscan_hit)(void *context, int which, const unsigned char *line, size_t size);

/* 0, or -1 for more than PROMSCAN_MAX_NAMES names or an empty one. The names' bytes must
 * outlive the struct. */
static int promscan_prepare(promscan_names *names, const unsigned char *const *starts,
                            const size_t *sizes, int count) {
    if (count < 0 || count > PROMSCAN_MAX_NAMES) return -1;
    names->count = count;
    for (int k = 0; k < count; k++) {
        if (sizes[k] == 0) return -1;
        size_t m = sizes[k] < 8 ? sizes[k] : 8;
        unsigned char ones[8];
        for (size_t i = 0; i < 8; i++) ones[i] = i < m ? 0xFF : 0;
        names->starts[k] = starts[k];
        names->sizes[k] = sizes[k];
        memcpy(&names->masks[k], ones, 8);
        names->heads[k] = 0;
        memcpy(&names->heads[k], starts[k], m);
    }
    return 0;
}

/* One line, from `pos` to its newline `eol` (exclusive). */
static inline void promscan_line(const promscan_names *names, const unsigned char *base, size_t n,
                                 size_t pos, size_t eol, promscan_hit hit, void *context) {
    size_t start = pos;
    while (start < eol && (base[start] == ' ' || base[start] == '\t')) start++;
    if (eol - start <= 1) return; /* a name and what follows it, or nothing to read */
    uint64_t word = 0;
    memcpy(&word, base + start, n - start >= 8 ? 8 : n - start);
    for (int k = 0; k < names->count; k++) {
        size_t size = names->sizes[k];
        if ((word & names->masks[k]) == names->heads[k] && eol - start > size &&
            memcmp(base + start, names->starts[k], size) == 0) {
            unsigned char after = base[start + size];
            if (after == '{' || after == ' ' || after == '\t') hit(context, k, base + start, eol - start);
        }
    }
}

/* Every line of the page, in order. The newlines are found 64 bytes at a time with SSE2
 * (a bitmask per block, its set bits walked) rather than by a memchr call per line: a vLLM
 * page's 650 lines average 95 bytes, and the calls cost more than the search (perf over
 * kvsched bench scrape: memchr was 26% of the scraper thread, the line checks 9%). */
static void promscan_lines(const promscan_names *names, const unsigned char *base, size_t n,
                           promscan_hit hit, void *context) {
    if (n == 0 || names->count == 0) return;
    size_t pos = 0; /* the current line's start */
    size_t i = 0;
#if defined(__SSE2__)
    const __m128i newline = _mm_set1_epi8('\n');
    for (; i + 64 <= n; i += 64) {
        const __m128i *block = (const __m128i *)(base + i);
        uint64_t mask = (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128(block), newline)) |
                        (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128(block + 1), newline)) << 16 |
                        (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128(block + 2), newline)) << 32 |
                        (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128(block + 3), newline)) << 48;
        while (mask != 0) {
            size_t eol = i + (size_t)__builtin_ctzll(mask);
            promscan_line(names, base, n, pos, eol, hit, context);
            pos = eol + 1;
            mask &= mask - 1;
        }
    }
#endif
    while (i < n) {
        const unsigned char *nl = (const unsigned char *)memchr(base + i, '\n', n - i);
        if (nl == NULL) break;
        size_t eol = (size_t)(nl - base);
        promscan_line(names, base, n, pos, eol, hit, context);
        pos = i = eol + 1;
    }
    if (pos < n) promscan_line(names, base, n, pos, n, hit, context); /* no newline at the end */
}

#endif
