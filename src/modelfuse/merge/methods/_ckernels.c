/* CPU kernels for the sparsifying merges (see _kernels.py, which loads this library with
 * ctypes and documents what each function computes).
 *
 * Every function does the IEEE float32 operations of the torch path in _sparsify.py, in
 * the same order per entry, so the results are the same bytes. Hence: no -ffast-math, and
 * no contraction of a * b + c into a fused multiply-add (setup.py compiles with
 * -ffp-contract=off). Loops run over blocks of KBLOCK entries whose per-model buffers stay
 * in L1/L2; the compiler vectorises the elementwise loops (AVX2 where the CPU has it, chosen
 * at run time through target_clones).
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
#define MF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MF_CLONES
#endif

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* high[j] = the high 16 bits of |x[j] - base[j]|; hist (2 x NBUCKETS, added to) counts them. */
MF_CLONES
void mf_magnitude_highs(const float *x, const float *base, int64_t n, uint16_t *high, int64_t *hist) {
    float mag[KBLOCK];
    uint32_t bits[KBLOCK];
    int64_t *h0 = hist, *h1 = hist + NBUCKETS; /* two histograms: equal neighbours do not wait */
    for (int64_t a = 0; a < n; a += KBLOCK) {
        int64_t m = n - a < KBLOCK ? n - a : KBLOCK;
        const float *xa = x + a, *ba = base + a;
        uint16_t *ha = high + a;
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

/* The entries whose high half is `bucket`, in position order: their magnitudes' bits and
 * positions (at most `count`). Returns how many were found. */
int64_t mf_bucket_entries(const float *x, const float *base, const uint16_t *high, int64_t n, int64_t bucket,
                          uint32_t *bits, int64_t *where, int64_t count) {
    int64_t c = 0;
    for (int64_t j = 0; j < n && c < count; j++) {
        if (high[j] == bucket) {
            bits[c] = bits_of(fabsf(x[j] - base[j]));
            where[c] = j;
            c++;
        }
    }
    return c;
}

/* Columns of a model's rule (int64) and scale (float32) rows; see mf_cut_merge. */
enum { R_LO, R_HI, R_MODE, R_KEPT0, R_KEPT1, R_SEED, R_RESCALE, R_COLS };
enum { S_WEIGHT, S_P, S_FACTOR, S_COLS };
enum { KEEP_ALL = 0, KEEP_CUT = 1, KEEP_RANDOM = 3 };
enum { RESCALE_NONE = 0, RESCALE_DIVIDE = 1, RESCALE_FACTOR = 2 };

/* Output j of SplitMix64 seeded `seed`, top 24 bits on the float32 grid of [0, 1)
 * (_sparsify.uniforms). */
static inline float uniform(uint64_t seed, int64_t j) {
    uint64_t z = seed + (uint64_t)(j + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (float)(int32_t)(z >> 40) * 0x1p-24f;
}

/* One model's kept task vector on [a, a + m) into t (tau * 1 where kept, tau * 0 where
 * not: the torch path's products), before any rescale. */
static inline void keep_block(const float *x, const float *base, float *t, float *mag, uint32_t *bits,
                              const int64_t *rule, const int64_t *kept, int64_t *cursor, float p, int64_t a,
                              int64_t m) {
    const float *xa = x + a, *ba = base + a;
    const int64_t mode = rule[R_MODE];
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
        for (int64_t j = 0; j < m; j++) t[j] = t[j] * (uniform(seed, a + j) < p ? 1.0f : 0.0f);
    }
}

/* u[i] = w_i * rescaled kept tau_i on [a, a + m). */
static inline void cut_block(const float *const *xs, int64_t n_models, const float *base, float *u, float *mag,
                             uint32_t *bits, const int64_t *rules, const int64_t *kept, int64_t *cursor,
                             const float *scale, int64_t a, int64_t m) {
    for (int64_t i = 0; i < n_models; i++) {
        const int64_t *rule = rules + i * R_COLS;
        const float *sc = scale + i * S_COLS;
        float *ui = u + i * KBLOCK;
        keep_block(xs[i], base, ui, mag, bits, rule, kept, cursor + i, sc[S_P], a, m);
        if (rule[R_RESCALE] == RESCALE_DIVIDE) {
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

/* The norms of one model's task vector and of its kept part (float64; sums in 8 lanes,
 * lane k over the positions j = k mod 8, then the lanes in order; kind 1: L1, 2: L2
 * squared, 3: max), into norms[0] and norms[1]. */
MF_CLONES
void mf_keep_norms(const float *x, const float *base, int64_t n, const int64_t *rule, const int64_t *kept, float p,
                   int kind, double *norms) {
    float t[KBLOCK], mag[KBLOCK];
    uint32_t bits[KBLOCK];
    double before[8] = {0}, after[8] = {0};
    int64_t cursor = rule[R_KEPT0];
    for (int64_t a = 0; a < n; a += KBLOCK) {
        int64_t m = n - a < KBLOCK ? n - a : KBLOCK;
        keep_block(x, base, t, mag, bits, rule, kept, &cursor, p, a, m);
        const float *xa = x + a, *ba = base + a;
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
    norms[0] = norms[1] = 0.0;
    for (int k = 0; k < 8; k++) {
        if (kind == 3) {
            norms[0] = before[k] > norms[0] ? before[k] : norms[0];
            norms[1] = after[k] > norms[1] ? after[k] : norms[1];
        } else {
            norms[0] += before[k];
            norms[1] += after[k];
        }
    }
}

/* merge_block of _sparsify.py on [a, a + m): sum, elected sign, agreeing sum and divisor. */
static inline void merge_block(const float *u, int64_t n_models, const float *base, float *out, float *s, float *acc,
                               float *div, const float *w, int64_t a, int64_t m, int elect, int normalize,
                               int positive, float total, float lam) {
    for (int64_t j = 0; j < m; j++) s[j] = u[j];
    for (int64_t i = 1; i < n_models; i++) {
        const float *ui = u + i * KBLOCK;
        for (int64_t j = 0; j < m; j++) s[j] += ui[j];
    }
    if (elect) {
        for (int64_t j = 0; j < m; j++) {
            s[j] = copysignf(1.0f, s[j]);
            acc[j] = 0.0f;
            div[j] = 0.0f;
        }
        for (int64_t i = 0; i < n_models; i++) {
            const float *ui = u + i * KBLOCK;
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
 * uniform(R_SEED, j) < scale[i][S_P]. Then R_RESCALE: none, divide by scale[i][S_P], or
 * multiply by scale[i][S_FACTOR]; the weight is scale[i][S_WEIGHT] (and w[i]).
 * Returns 0, or -1 when memory ran out. */
MF_CLONES
int mf_cut_merge(const float *const *xs, int64_t n_models, const float *base, int64_t n, float *out,
                 const int64_t *rules, const int64_t *kept, const float *scale, const float *w, int elect,
                 int normalize, int positive, float total, float lam) {
    float *u = malloc(sizeof(float) * KBLOCK * (size_t)(n_models > 0 ? n_models : 1));
    int64_t *cursor = malloc(sizeof(int64_t) * (size_t)(n_models > 0 ? n_models : 1));
    if (u == NULL || cursor == NULL) {
        free(u);
        free(cursor);
        return -1;
    }
    float mag[KBLOCK], s[KBLOCK], acc[KBLOCK], div[KBLOCK];
    uint32_t bits[KBLOCK];
    for (int64_t i = 0; i < n_models; i++) cursor[i] = rules[i * R_COLS + R_KEPT0];
    for (int64_t a = 0; a < n; a += KBLOCK) {
        int64_t m = n - a < KBLOCK ? n - a : KBLOCK;
        cut_block(xs, n_models, base, u, mag, bits, rules, kept, cursor, scale, a, m);
        merge_block(u, n_models, base, out, s, acc, div, w, a, m, elect, normalize, positive, total, lam);
    }
    free(u);
    free(cursor);
    return 0;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernels",
                                    "CPU merge kernels, called through ctypes (see _kernels.py).", -1, NULL};

PyMODINIT_FUNC PyInit__ckernels(void) { return PyModule_Create(&module); }
