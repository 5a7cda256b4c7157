/* CPU kernels for the sparsifying merges (see _kernels.py, which loads this library with
 * ctypes and documents what each function computes).
 *
 * Every function does the IEEE float32 operations of the torch path (_engine.py,
 * _sparsifiers.py) in the same order per entry, so the results are the same bytes. Hence: no -ffast-math, and
 * no contraction of a * b + c into a fused multiply-add (setup.py compiles with
 * -ffp-contract=off). Loops run over blocks of KBLOCK entries whose per-model buffers stay
 * in L1/L2; the compiler vectorises the elementwise loops for AVX-512 (x86-64-v4) or AVX2
 * where the CPU has them, chosen at run time through target_clones (AVX-512 multiplies
 * 64-bit lanes, which the random draws need).
 *
 * The module init at the end only makes the file importable as a Python extension (so
 * that setuptools builds and installs it); the functions are called through ctypes.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KBLOCK 2048
#define NBUCKETS 32768 /* high 16 bits of a non-negative float32: the sign bit is clear */

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MF_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MF_CLONES
#endif

/* Helpers are inlined into the exported functions, so that each of their target clones
 * compiles them for its instruction set (a helper left out of line gets the baseline one). */
#define MF_INLINE static inline __attribute__((always_inline))

MF_INLINE uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* high[j] = the high 16 bits of |x[j] - base[j]|; hist (2 x NBUCKETS, added to) counts them.
 * With high == NULL only the histogram is made (the bucket scan then recomputes). */
MF_CLONES
void mf_magnitude_highs(const float *x, const float *base, int64_t n, uint16_t *high, int64_t *hist) {
    float mag[KBLOCK];
    uint32_t bits[KBLOCK];
    uint16_t local[KBLOCK];
    int64_t *h0 = hist, *h1 = hist + NBUCKETS; /* two histograms: equal neighbours do not wait */
    for (int64_t a = 0; a < n; a += KBLOCK) {
        int64_t m = n - a < KBLOCK ? n - a : KBLOCK;
        const float *xa = x + a, *ba = base + a;
        uint16_t *ha = high != NULL ? high + a : local;
        for (int64_t j = 0; j < m; j++) mag[j] = fabsf(xa[j] - ba[j]);
        memcpy(bits, mag, (size_t)m * sizeof(float));
        for (int64_t j = 0; j < m; j++) ha[j] = (uint16_t)(bits[j] >> 16);
        int64_t j = 0;
        for (; j + 1 < m; j += 2) {
            h0[ha[j]]++;
            h1[ha[j + 1]]++;
        }
        if (j < m) h0[ha[j]]++;
    }
}

/* The entries whose high half is `b1` or `b2`, in position order: their magnitudes' bits
 * and positions (at most `count`); the high halves from `high`, or recomputed when it is
 * NULL. Returns how many were found. */
int64_t mf_bucket_entries(const float *x, const float *base, const uint16_t *high, int64_t n, int64_t b1,
                          int64_t b2, uint32_t *bits, int64_t *where, int64_t count) {
    int64_t c = 0;
    for (int64_t j = 0; j < n; j++) {
        const uint32_t h = high != NULL ? high[j] : bits_of(fabsf(x[j] - base[j])) >> 16;
        if ((h == b1) | (h == b2)) {
            if (c < count) {
                bits[c] = bits_of(fabsf(x[j] - base[j]));
                where[c] = j;
            }
            c++;
        }
    }
    return c;
}

/* Columns of a model's rule (int64) and scale (float32) rows; see mf_cut_merge. */
enum { R_LO, R_HI, R_MODE, R_KEPT0, R_KEPT1, R_SEED, R_RESCALE, R_ROW, R_COLS };
enum { S_WEIGHT, S_P, S_FACTOR, S_LOW, S_SPAN, S_COLS };
enum { KEEP_ALL = 0, KEEP_CUT = 1, KEEP_RANDOM = 3, KEEP_RANK = 4, KEEP_MASK = 5 };
enum { RESCALE_NONE = 0, RESCALE_DIVIDE = 1, RESCALE_FACTOR = 2 };

/* Output j of SplitMix64 seeded `seed`, top 24 bits on the float32 grid of [0, 1)
 * (_random.uniforms). */
MF_INLINE float uniform(uint64_t seed, int64_t j) {
    uint64_t z = seed + (uint64_t)(j + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (float)(int32_t)(z >> 40) * 0x1p-24f;
}

/* Per-block work memory: `blk` entries (a block holds whole rows for ranked drops). */
typedef struct {
    int64_t blk;
    float *mag, *p, *u, *ptab;
    uint16_t *bucket;
    uint8_t *high;
    int64_t ptab_n; /* ptab[r] = DELLA's p of rank r in rows of ptab_n entries, for ptab_low, ptab_span */
    float ptab_low, ptab_span;
    uint32_t *bits;
    uint8_t *keep;
    uint64_t *pairs1, *pairs2;
} scratch_t;

static void scratch_free(scratch_t *w) {
    free(w->mag);
    free(w->p);
    free(w->u);
    free(w->ptab);
    free(w->bucket);
    free(w->high);
    free(w->bits);
    free(w->keep);
    free(w->pairs1);
    free(w->pairs2);
}

static int scratch_alloc(scratch_t *w, int64_t blk) {
    size_t n = (size_t)(blk > 0 ? blk : 1);
    w->blk = blk;
    w->mag = malloc(n * sizeof(float));
    w->p = malloc(n * sizeof(float));
    w->u = malloc(n * sizeof(float));
    w->ptab = malloc(n * sizeof(float));
    w->bucket = malloc(n * sizeof(uint16_t));
    w->high = malloc(n);
    w->ptab_n = -1;
    w->bits = malloc(n * sizeof(uint32_t));
    w->keep = malloc(n);
    w->pairs1 = malloc(n * sizeof(uint64_t));
    w->pairs2 = malloc(n * sizeof(uint64_t));
    if (!w->mag || !w->p || !w->u || !w->ptab || !w->bucket || !w->high || !w->bits || !w->keep || !w->pairs1 || !w->pairs2) {
        scratch_free(w);
        return -1;
    }
    return 0;
}

/* Sorts n (key << 32 | position) pairs ascending, from `from` (scratch: `to`); returns the
 * buffer that holds the result. Small sets: insertion sort; else an LSD radix sort on the
 * key's bytes, the four histograms counted in one pass, bytes that all keys share skipped.
 * The pairs are distinct, so the order is the stable order of the keys. */
MF_INLINE uint64_t *sort_pairs(uint64_t *from, uint64_t *to, int64_t n) {
    if (n <= 32) {
        for (int64_t i = 1; i < n; i++) {
            const uint64_t v = from[i];
            int64_t j = i;
            for (; j > 0 && from[j - 1] > v; j--) from[j] = from[j - 1];
            from[j] = v;
        }
        return from;
    }
    int64_t count[4][256];
    memset(count, 0, sizeof count);
    for (int64_t j = 0; j < n; j++) {
        const uint32_t k = (uint32_t)(from[j] >> 32);
        count[0][k & 255]++;
        count[1][(k >> 8) & 255]++;
        count[2][(k >> 16) & 255]++;
        count[3][k >> 24]++;
    }
    for (int byte = 0; byte < 4; byte++) {
        const int shift = 32 + 8 * byte;
        int64_t *c = count[byte];
        if (c[(from[0] >> shift) & 255] == n) continue; /* every key has this byte */
        int64_t next = 0;
        for (int d = 0; d < 256; d++) {
            int64_t here = c[d];
            c[d] = next;
            next += here;
        }
        for (int64_t j = 0; j < n; j++) to[c[(from[j] >> shift) & 255]++] = from[j];
        uint64_t *t = from;
        from = to;
        to = t;
    }
    return from;
}

/* DELLA's keep probabilities of one row of n magnitudes (their float32 bit patterns):
 * p = ((float)r / (float)(n - 1)) * span + low, r the rank in a stable ascending sort;
 * p = one for n = 1. */
MF_INLINE void row_probabilities(const uint32_t *keys, int64_t n, float low, float span, float one, float *p,
                              scratch_t *w) {
    if (n <= 1) {
        if (n == 1) p[0] = one;
        return;
    }
    for (int64_t j = 0; j < n; j++) w->pairs1[j] = ((uint64_t)keys[j] << 32) | (uint64_t)j;
    const uint64_t *sorted = sort_pairs(w->pairs1, w->pairs2, n);
    const float last = (float)(n - 1);
    for (int64_t r = 0; r < n; r++) p[(uint32_t)sorted[r]] = ((float)r / last) * span + low;
}

/* keep[j] = u[j] < ptab[r_j], r_j the stable rank of keys[j] among the n keys. */
MF_INLINE void keep_by_rank(const uint32_t *keys, int64_t n, const float *u, const float *ptab, uint8_t *keep,
                         scratch_t *w) {
    for (int64_t j = 0; j < n; j++) w->pairs1[j] = ((uint64_t)keys[j] << 32) | (uint64_t)j;
    const uint64_t *sorted = sort_pairs(w->pairs1, w->pairs2, n);
    for (int64_t r = 0; r < n; r++) {
        const int64_t j = (uint32_t)sorted[r];
        keep[j] = u[j] < ptab[r];
    }
}

#define RANK_BUCKETS 4096
#define RANK_FILL 4
#define RANK_COUNT_MAX 16

/* DELLA's keep decisions for one row of n magnitudes (their float32 bit patterns) whose
 * first entry is position `a` of the tensor: keep[j] = uniform(seed, a + j) < p_j with p_j
 * as in row_probabilities, without ranking every entry. Since p(r) is non-decreasing in
 * the rank r, most decisions follow from the ranks an entry's bucket spans: the keys are
 * counted into buckets ordered like the keys (zero, then equal widths of key from the
 * least non-zero key up; about RANK_FILL entries per bucket), so an entry of bucket b has
 * a rank in [start_b, start_b + count_b - 1]; u < p(start_b) keeps it, u >= p(start_b +
 * count_b - 1) drops it. The members of the buckets where an entry is left open (u in
 * between: a small share when buckets are small) are sorted (sort_pairs) and decided by
 * their exact ranks. The decisions equal those of the full ranking. */
MF_INLINE void row_keep(const uint32_t *keys, int64_t n, float low, float span, float one, uint64_t seed, int64_t a,
                     uint8_t *keep, scratch_t *w) {
    float *u = w->u;
    for (int64_t j = 0; j < n; j++) u[j] = uniform(seed, a + j);
    if (n <= 1) {
        if (n == 1) keep[0] = u[0] < one;
        return;
    }
    float *ptab = w->ptab; /* p of each rank, made once for all rows alike */
    if (w->ptab_n != n || bits_of(w->ptab_low) != bits_of(low) || bits_of(w->ptab_span) != bits_of(span)) {
        const float last = (float)(n - 1);
        for (int64_t r = 0; r < n; r++) ptab[r] = ((float)r / last) * span + low;
        w->ptab_n = n;
        w->ptab_low = low;
        w->ptab_span = span;
    }
    uint32_t least = UINT32_MAX, most = 0; /* least non-zero key (keys - 1 wraps zero to the top), largest */
    for (int64_t j = 0; j < n; j++) {
        const uint32_t k = keys[j], k1 = k - 1u;
        least = k1 < least ? k1 : least;
        most = k > most ? k : most;
    }
    least += 1u;
    if (most == 0) { /* all zero: ranks are positions */
        for (int64_t j = 0; j < n; j++) keep[j] = u[j] < ptab[j];
        return;
    }
    const int64_t limit = n / RANK_FILL < RANK_BUCKETS ? n / RANK_FILL + 2 : RANK_BUCKETS;
    int shift = 0;
    while ((int64_t)((most - least) >> shift) >= limit - 1) shift++;
    const int64_t buckets = (int64_t)((most - least) >> shift) + 2;
    uint16_t *bk = w->bucket;
    for (int64_t j = 0; j < n; j++) {
        const uint32_t k = keys[j];
        bk[j] = k == 0 ? 0 : (uint16_t)(1u + ((k - least) >> shift));
    }
    int32_t count[RANK_BUCKETS], start[RANK_BUCKETS];
    float lo[RANK_BUCKETS], hi[RANK_BUCKETS];
    uint8_t open[RANK_BUCKETS];
    memset(count, 0, sizeof(int32_t) * (size_t)buckets);
    for (int64_t j = 0; j < n; j++) count[bk[j]]++;
    int32_t next = 0, crowded = 0;
    for (int64_t b = 0; b < buckets; b++) {
        const int32_t c = count[b];
        crowded = c > crowded ? c : crowded;
        start[b] = next;
        lo[b] = ptab[next];
        hi[b] = ptab[next + c - (c > 0)];
        next += c;
    }
    uint64_t *members = w->pairs1;
    if (2 * (int64_t)crowded > n) { /* most keys in one bucket: rank them all */
        keep_by_rank(keys, n, u, ptab, keep, w);
        return;
    }
    /* keep where u < p(first rank of the bucket); open where p(first) <= u < p(last) */
    uint8_t *open_at = w->high;
    for (int64_t j = 0; j < n; j++) {
        const float x = u[j], l = lo[bk[j]], h = hi[bk[j]];
        keep[j] = x < l;
        open_at[j] = (x >= l) & (x < h);
    }
    int32_t *left = (int32_t *)w->pairs2; /* the open entries */
    int64_t n_left = 0;
    for (int64_t j = 0; j < n; j += 64) { /* open entries are few: skip 64 settled ones at a time */
        const int64_t e = n - j < 64 ? n - j : 64;
        uint8_t any = 0;
        for (int64_t q = 0; q < e; q++) any |= open_at[j + q];
        if (!any) continue;
        for (int64_t q = j; q < j + e; q++) {
            left[n_left] = (int32_t)q;
            n_left += open_at[q];
        }
    }
    if (n_left == 0) return;
    if (n_left <= RANK_COUNT_MAX) { /* rank each: the smaller keys, and the equal ones before it */
        for (int64_t q = 0; q < n_left; q++) {
            const int64_t j = left[q];
            const uint32_t k = keys[j];
            int32_t r = 0;
            for (int64_t i = 0; i < n; i++) r += keys[i] < k;
            for (int64_t i = 0; i < j; i++) r += keys[i] == k;
            keep[j] = u[j] < ptab[r];
        }
        return;
    }
    memset(open, 0, (size_t)buckets); /* else sort the members of the open entries' buckets */
    int64_t m = 0;
    for (int64_t q = 0; q < n_left; q++) {
        const int64_t b = bk[left[q]];
        m += open[b] ? 0 : count[b];
        open[b] = 1;
    }
    if (2 * m > n) { /* most of the row: rank it all */
        keep_by_rank(keys, n, u, ptab, keep, w);
        return;
    }
    m = 0;
    for (int64_t j = 0; j < n; j++) {
        members[m] = ((uint64_t)keys[j] << 32) | (uint64_t)j;
        m += open[bk[j]];
    }
    const uint64_t *sorted = sort_pairs(members, w->pairs2, m);
    int64_t first = 0, current = -1; /* bucket after bucket */
    for (int64_t q = 0; q < m; q++) {
        const int64_t j = (uint32_t)sorted[q], b = bk[j];
        if (b != current) {
            current = b;
            first = q;
        }
        keep[j] = u[j] < ptab[start[b] + (q - first)];
    }
}

/* spread_bits[b][k] = bit k of b: a mask byte as 8 keep bytes */
#define MF_SPREAD(b)                                                                               \
    {(b) & 1, ((b) >> 1) & 1, ((b) >> 2) & 1, ((b) >> 3) & 1, ((b) >> 4) & 1, ((b) >> 5) & 1, ((b) >> 6) & 1, \
     ((b) >> 7) & 1}
#define MF_SPREAD4(b) MF_SPREAD(b), MF_SPREAD((b) + 1), MF_SPREAD((b) + 2), MF_SPREAD((b) + 3)
#define MF_SPREAD16(b) MF_SPREAD4(b), MF_SPREAD4((b) + 4), MF_SPREAD4((b) + 8), MF_SPREAD4((b) + 12)
#define MF_SPREAD64(b) MF_SPREAD16(b), MF_SPREAD16((b) + 16), MF_SPREAD16((b) + 32), MF_SPREAD16((b) + 48)
static const uint8_t spread_bits[256][8] = {MF_SPREAD64(0), MF_SPREAD64(64), MF_SPREAD64(128), MF_SPREAD64(192)};

/* One model's kept task vector on [a, a + m) into t (tau * 1 where kept, tau * 0 where
 * not: the torch path's products), before any rescale; for KEEP_RANK the keep
 * probabilities are left in w->p. */
MF_INLINE void keep_block(const float *x, const float *base, float *t, const int64_t *rule, const float *sc,
                              const int64_t *kept, int64_t *cursor, const uint8_t *mask, int64_t a, int64_t m,
                              scratch_t *w) {
    const float *xa = x + a, *ba = base + a;
    const int64_t mode = rule[R_MODE];
    float *mag = w->mag;
    uint32_t *bits = w->bits;
    for (int64_t j = 0; j < m; j++) t[j] = xa[j] - ba[j];
    if (mode == KEEP_CUT) {
        const int64_t lo = rule[R_LO], hi = rule[R_HI];
        for (int64_t j = 0; j < m; j++) mag[j] = fabsf(t[j]);
        memcpy(bits, mag, (size_t)m * sizeof(float));
        for (int64_t j = 0; j < m; j++) {
            int64_t b = (int64_t)bits[j];
            t[j] = t[j] * ((b > lo) & (b < hi) ? 1.0f : 0.0f);
        }
        /* entries equal to a split value, kept by position */
        int64_t c = *cursor;
        const int64_t end = rule[R_KEPT1];
        while (c < end && kept[c] < a + m) {
            int64_t j = kept[c] - a;
            t[j] = xa[j] - ba[j];
            c++;
        }
        *cursor = c;
    } else if (mode == KEEP_RANDOM) {
        const uint64_t seed = (uint64_t)rule[R_SEED];
        const float p = sc[S_P];
        for (int64_t j = 0; j < m; j++) t[j] = t[j] * (uniform(seed, a + j) < p ? 1.0f : 0.0f);
    } else if (mode == KEEP_RANK) {
        const int64_t row = rule[R_ROW];
        const uint64_t seed = (uint64_t)rule[R_SEED];
        for (int64_t j = 0; j < m; j++) mag[j] = fabsf(t[j]);
        memcpy(bits, mag, (size_t)m * sizeof(float));
        if (rule[R_RESCALE] == RESCALE_DIVIDE) { /* the probabilities themselves are needed */
            for (int64_t r = 0; r < m; r += row)
                row_probabilities(bits + r, row, sc[S_LOW], sc[S_SPAN], sc[S_P], w->p + r, w);
            const float *p = w->p;
            for (int64_t j = 0; j < m; j++) t[j] = t[j] * (uniform(seed, a + j) < p[j] ? 1.0f : 0.0f);
        } else { /* only the decisions */
            for (int64_t r = 0; r < m; r += row)
                row_keep(bits + r, row, sc[S_LOW], sc[S_SPAN], sc[S_P], seed, a + r, w->keep + r, w);
            const uint8_t *keep = w->keep;
            for (int64_t j = 0; j < m; j++) t[j] = t[j] * (keep[j] ? 1.0f : 0.0f);
        }
    } else if (mode == KEEP_MASK) { /* one bit per entry, position j at bit j % 8 of byte j / 8 */
        uint8_t *keep = w->keep;
        int64_t j = 0;
        for (; j < m && ((a + j) & 7); j++) keep[j] = (mask[(a + j) >> 3] >> ((a + j) & 7)) & 1;
        const uint8_t *bytes = mask + ((a + j) >> 3);
        for (; j + 8 <= m; j += 8) memcpy(keep + j, spread_bits[*bytes++], 8);
        for (; j < m; j++) keep[j] = (mask[(a + j) >> 3] >> ((a + j) & 7)) & 1;
        for (j = 0; j < m; j++) t[j] = t[j] * (keep[j] ? 1.0f : 0.0f);
    }
}

/* u[i] = w_i * rescaled kept tau_i on [a, a + m). */
MF_INLINE void cut_block(const float *const *xs, int64_t n_models, const float *base, float *u,
                             const int64_t *rules, const float *scale, const int64_t *kept, int64_t *cursor,
                             const uint8_t *const *masks, int64_t a, int64_t m, scratch_t *w) {
    for (int64_t i = 0; i < n_models; i++) {
        const int64_t *rule = rules + i * R_COLS;
        const float *sc = scale + i * S_COLS;
        float *ui = u + i * w->blk;
        keep_block(xs[i], base, ui, rule, sc, kept, cursor + i, masks ? masks[i] : NULL, a, m, w);
        if (rule[R_RESCALE] == RESCALE_DIVIDE && rule[R_MODE] == KEEP_RANK) {
            const float *p = w->p;
            for (int64_t j = 0; j < m; j++) ui[j] = ui[j] / p[j];
        } else if (rule[R_RESCALE] == RESCALE_DIVIDE) {
            const float d = sc[S_P];
            for (int64_t j = 0; j < m; j++) ui[j] = ui[j] / d;
        } else if (rule[R_RESCALE] == RESCALE_FACTOR) {
            const float f = sc[S_FACTOR];
            for (int64_t j = 0; j < m; j++) ui[j] = ui[j] * f;
        }
        const float wi = sc[S_WEIGHT];
        for (int64_t j = 0; j < m; j++) ui[j] = ui[j] * wi;
    }
}

MF_INLINE void set_bit(uint8_t *mask, int64_t at, int on) {
    const uint8_t bit = (uint8_t)(1u << (at & 7));
    mask[at >> 3] = on ? (uint8_t)(mask[at >> 3] | bit) : (uint8_t)(mask[at >> 3] & ~bit);
}

/* The norms of one model's task vector and of its kept part on the entries [start, stop)
 * as float64 partial sums in 8 lanes (kind 1: L1, 2: L2 squared, 3: max): lanes[k] and
 * lanes[8 + k] (the whole and the kept part) gather, block after block of `blk` entries,
 * the block's entries j with j % 8 == k, and the tail past its last multiple of 8 from
 * lane 0 on. The caller adds the lanes of consecutive ranges in order, then the lanes
 * (_kernels.keep_norms), so that the result does not depend on how the ranges are spread
 * over threads. With `mask_out`, the keep decisions are stored there, one bit per entry
 * (position j: bit j % 8 of byte j / 8), for the merge pass. `blk`: entries per block
 * (whole rows for KEEP_RANK); start must be a multiple of blk (and of 8 with mask_out).
 * Returns 0, -1 for a bad range or when memory ran out. */
MF_CLONES
int mf_keep_norms(const float *x, const float *base, int64_t n, const int64_t *rule, const float *sc,
                  const int64_t *kept, int kind, int64_t blk, uint8_t *mask_out, int64_t start, int64_t stop,
                  double *lanes) {
    if (blk <= 0 || start % blk != 0 || (mask_out != NULL && start % 8 != 0)) return -1;
    if (stop > n) stop = n;
    scratch_t w;
    float *t = malloc(sizeof(float) * (size_t)blk);
    if (t == NULL || scratch_alloc(&w, blk) != 0) {
        free(t);
        return -1;
    }
    double before[8] = {0}, after[8] = {0};
    int64_t cursor = rule[R_KEPT0]; /* the first kept position at or after start */
    while (cursor < rule[R_KEPT1] && kept[cursor] < start) cursor++;
    float *mag = w.mag;
    for (int64_t a = start; a < stop; a += blk) {
        int64_t m = stop - a < blk ? stop - a : blk;
        keep_block(x, base, t, rule, sc, kept, &cursor, NULL, a, m, &w);
        const float *xa = x + a, *ba = base + a;
        if (mask_out != NULL) { /* one bit per entry, position j at bit j % 8 of byte j / 8 */
            uint8_t *kb = w.keep; /* m bytes of keep decisions (KEEP_RANK: made above), then packed */
            if (rule[R_MODE] != KEEP_RANK || rule[R_RESCALE] == RESCALE_DIVIDE)
                for (int64_t j = 0; j < m; j++) kb[j] = t[j] != 0.0f || xa[j] - ba[j] == 0.0f;
            int64_t j = 0;
            for (; j < m && ((a + j) & 7); j++) set_bit(mask_out, a + j, kb[j]);
            for (; j + 8 <= m; j += 8) {
                uint8_t byte = 0;
                for (int k = 0; k < 8; k++) byte |= (uint8_t)(kb[j + k] << k);
                mask_out[(a + j) >> 3] = byte;
            }
            for (; j < m; j++) set_bit(mask_out, a + j, kb[j]);
        }
        for (int64_t j = 0; j < m; j++) mag[j] = fabsf(xa[j] - ba[j]);
        for (int64_t j = 0; j < m; j++) t[j] = fabsf(t[j]);
        int64_t j = 0;
        if (kind == 1) {
            for (; j + 8 <= m; j += 8)
                for (int k = 0; k < 8; k++) {
                    before[k] += (double)mag[j + k];
                    after[k] += (double)t[j + k];
                }
        } else if (kind == 2) {
            for (; j + 8 <= m; j += 8)
                for (int k = 0; k < 8; k++) {
                    before[k] += (double)mag[j + k] * (double)mag[j + k];
                    after[k] += (double)t[j + k] * (double)t[j + k];
                }
        } else {
            for (; j + 8 <= m; j += 8)
                for (int k = 0; k < 8; k++) {
                    before[k] = (double)mag[j + k] > before[k] ? (double)mag[j + k] : before[k];
                    after[k] = (double)t[j + k] > after[k] ? (double)t[j + k] : after[k];
                }
        }
        for (int k = 0; j < m; j++, k++) { /* the tail, lanes 0.. */
            double all = (double)mag[j], part = (double)t[j];
            if (kind == 1) {
                before[k] += all;
                after[k] += part;
            } else if (kind == 2) {
                before[k] += all * all;
                after[k] += part * part;
            } else {
                before[k] = all > before[k] ? all : before[k];
                after[k] = part > after[k] ? part : after[k];
            }
        }
    }
    memcpy(lanes, before, sizeof before);
    memcpy(lanes + 8, after, sizeof after);
    free(t);
    scratch_free(&w);
    return 0;
}

/* merge_block of _engine.py on [a, a + m): sum, elected sign, agreeing sum and divisor. */
MF_INLINE void merge_block(const float *u, int64_t blk, int64_t n_models, const float *base, float *out, float *s, float *acc,
                               float *div, const float *w, int64_t a, int64_t m, int elect, int normalize,
                               int positive, float total, float lam) {
    /* torch.sum starts from +0: 0 + u_0 + u_1 + ..., so a sum of -0s is +0, as there */
    for (int64_t j = 0; j < m; j++) s[j] = 0.0f + u[j];
    for (int64_t i = 1; i < n_models; i++) {
        const float *ui = u + i * blk;
        for (int64_t j = 0; j < m; j++) s[j] += ui[j];
    }
    if (elect) {
        for (int64_t j = 0; j < m; j++) {
            s[j] = copysignf(1.0f, s[j]);
            acc[j] = 0.0f;
            div[j] = 0.0f;
        }
        for (int64_t i = 0; i < n_models; i++) {
            const float *ui = u + i * blk;
            const float wi = w[i];
            for (int64_t j = 0; j < m; j++) {
                const float v = ui[j] * s[j]; /* |u_i| where u_i agrees with the sign */
                const float agrees = v > 0.0f ? 1.0f : 0.0f;
                acc[j] += v * agrees; /* a disagreeing v adds -0: the sum is unchanged */
                div[j] += agrees * wi;
            }
        }
        const float tiny = 1.17549435e-38f; /* FLT_MIN */
        for (int64_t j = 0; j < m; j++) {
            acc[j] = acc[j] * s[j];
            if (positive)
                div[j] = div[j] > tiny ? div[j] : tiny;
            else if (div[j] == 0.0f)
                div[j] = 1.0f;
        }
    } else {
        for (int64_t j = 0; j < m; j++) {
            acc[j] = s[j];
            div[j] = total;
        }
    }
    const float *ba = base + a;
    float *oa = out + a;
    const int scale_lam = lam != 1.0f;
    for (int64_t j = 0; j < m; j++) {
        float mixed = acc[j];
        if (normalize) mixed = mixed / div[j];
        if (scale_lam) mixed = mixed * lam;
        oa[j] = ba[j] + mixed;
    }
}

/* out = base + lam * sum_i m_i w_i s_i [/ D] over n entries; xs[i] is model i's tensor.
 * Model i's task vector tau_i = xs[i] - base is kept per rules[i] (R_COLS int64s):
 * R_MODE KEEP_ALL; KEEP_CUT: the entries whose magnitude bits b satisfy R_LO < b < R_HI,
 * plus the positions kept[R_KEPT0:R_KEPT1] (ascending); KEEP_RANDOM: where
 * uniform(R_SEED, j) < scale[i][S_P]; KEEP_RANK: where uniform(R_SEED, j) < p_j, DELLA's
 * probabilities over rows of R_ROW entries; KEEP_MASK: where bit j of masks[i] is set. Then
 * R_RESCALE: none, divide by the keep probability, or multiply by scale[i][S_FACTOR]; the
 * weight is scale[i][S_WEIGHT] (and w[i]). Computes the entries [start, stop) (start a
 * multiple of blk, so that blocks hold whole rows; blk entries per block): disjoint
 * ranges can run on several threads. Returns 0, or -1 when memory ran out. */
MF_CLONES
int mf_cut_merge(const float *const *xs, int64_t n_models, const float *base, int64_t n, float *out,
                 const int64_t *rules, const int64_t *kept, const float *scale, const uint8_t *const *masks,
                 const float *w, int elect, int normalize, int positive, float total, float lam, int64_t blk,
                 int64_t start, int64_t stop) {
    if (blk <= 0) return -1;
    size_t models = (size_t)(n_models > 0 ? n_models : 1), size = (size_t)blk;
    float *u = malloc(sizeof(float) * size * models);
    float *s = malloc(sizeof(float) * size), *acc = malloc(sizeof(float) * size), *div = malloc(sizeof(float) * size);
    int64_t *cursor = malloc(sizeof(int64_t) * models);
    scratch_t work;
    int ok = u && s && acc && div && cursor && scratch_alloc(&work, blk) == 0;
    if (ok) {
        for (int64_t i = 0; i < n_models; i++) { /* the first kept position at or after start */
            int64_t c = rules[i * R_COLS + R_KEPT0];
            while (c < rules[i * R_COLS + R_KEPT1] && kept[c] < start) c++;
            cursor[i] = c;
        }
        if (stop > n) stop = n;
        for (int64_t a = start; a < stop; a += blk) {
            int64_t m = stop - a < blk ? stop - a : blk;
            cut_block(xs, n_models, base, u, rules, scale, kept, cursor, masks, a, m, &work);
            merge_block(u, blk, n_models, base, out, s, acc, div, w, a, m, elect, normalize, positive, total, lam);
        }
        scratch_free(&work);
    }
    free(u);
    free(s);
    free(acc);
    free(div);
    free(cursor);
    return ok ? 0 : -1;
}

/* SLERP's sums over two float32 vectors in float64: sums[0] = <a, a>, sums[1] = <b, b>,
 * sums[2] = <a, b> (8 lanes, lane k over j = k mod 8, then the lanes in order). */
MF_CLONES
void mf_dots(const float *a, const float *b, int64_t n, double *sums) {
    double aa[8] = {0}, bb[8] = {0}, ab[8] = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++) {
            const double x = (double)a[j + k], y = (double)b[j + k];
            aa[k] += x * x;
            bb[k] += y * y;
            ab[k] += x * y;
        }
    for (int k = 0; j < n; j++, k++) {
        const double x = (double)a[j], y = (double)b[j];
        aa[k] += x * x;
        bb[k] += y * y;
        ab[k] += x * y;
    }
    sums[0] = sums[1] = sums[2] = 0.0;
    for (int k = 0; k < 8; k++) {
        sums[0] += aa[k];
        sums[1] += bb[k];
        sums[2] += ab[k];
    }
}

/* out = (float)(ca * (double)a + cb * (double)b) on [start, stop): the float64 blend of
 * SLERP (and of the linear fallback), rounded once. */
MF_CLONES
void mf_blend(const float *a, const float *b, float *out, double ca, double cb, int64_t start, int64_t stop) {
    for (int64_t j = start; j < stop; j++) out[j] = (float)(ca * (double)a[j] + cb * (double)b[j]);
}

/* Model Stock's output on [start, stop): out = t * avg + u * base, avg = (0 + x_0 + ... +
 * x_{N-1}) / N summed in model order (u = 1 - t, rounded by the caller as torch does). */
MF_CLONES
void mf_stock_blend(const float *const *xs, int64_t n_models, const float *base, float *out, float t, float u,
                    int64_t start, int64_t stop) {
    const float count = (float)n_models;
    for (int64_t a = start; a < stop; a += KBLOCK) {
        const int64_t m = stop - a < KBLOCK ? stop - a : KBLOCK;
        float s[KBLOCK];
        for (int64_t j = 0; j < m; j++) s[j] = 0.0f + xs[0][a + j];
        for (int64_t i = 1; i < n_models; i++) {
            const float *xa = xs[i] + a;
            for (int64_t j = 0; j < m; j++) s[j] += xa[j];
        }
        const float *ba = base + a;
        float *oa = out + a;
        for (int64_t j = 0; j < m; j++) oa[j] = t * (s[j] / count) + u * ba[j];
    }
}

/* Weighted sums on [start, stop) in float32, in model order, as the torch code of linear
 * and task_arithmetic rounds them:
 *   base == NULL (linear):           s = x_0 w_0 + x_1 w_1 + ... [/ div]; out = s
 *   base != NULL (task arithmetic):  s = 0 + (x_0 - b) w_0 + ... [/ div]; out = s lam + b */
MF_CLONES
void mf_weighted_sum(const float *const *xs, int64_t n_models, const float *base, float *out, const float *w,
                     int normalize, float div, float lam, int64_t start, int64_t stop) {
    for (int64_t a = start; a < stop; a += KBLOCK) {
        const int64_t m = stop - a < KBLOCK ? stop - a : KBLOCK;
        float s[KBLOCK];
        float *oa = out + a;
        if (base == NULL) {
            const float *x0 = xs[0] + a;
            for (int64_t j = 0; j < m; j++) s[j] = x0[j] * w[0];
            for (int64_t i = 1; i < n_models; i++) {
                const float *xa = xs[i] + a;
                const float wi = w[i];
                for (int64_t j = 0; j < m; j++) s[j] += xa[j] * wi;
            }
            if (normalize)
                for (int64_t j = 0; j < m; j++) s[j] = s[j] / div;
            for (int64_t j = 0; j < m; j++) oa[j] = s[j];
        } else {
            const float *ba = base + a;
            for (int64_t j = 0; j < m; j++) s[j] = 0.0f;
            for (int64_t i = 0; i < n_models; i++) {
                const float *xa = xs[i] + a;
                const float wi = w[i];
                for (int64_t j = 0; j < m; j++) s[j] += (xa[j] - ba[j]) * wi;
            }
            if (normalize)
                for (int64_t j = 0; j < m; j++) s[j] = s[j] / div;
            for (int64_t j = 0; j < m; j++) oa[j] = s[j] * lam + ba[j];
        }
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernels",
                                    "CPU merge kernels, called through ctypes (see _kernels.py).", -1, NULL};

PyMODINIT_FUNC PyInit__ckernels(void) { return PyModule_Create(&module); }
