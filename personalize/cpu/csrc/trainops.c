/* The elementwise parts of a LoRA training step, forward and backward, each in one pass over memory
 * (see personalize/fasttrain.py for why and how they are used).
 *
 * - dropout masks drawn from torch's own CPU generator state, bit for bit as `Tensor.bernoulli_(p)` draws them
 *   (mt19937, two 32-bit words per element, 53-bit uniform compared with p), so a seeded run drops exactly what
 *   peft's nn.Dropout would, at a fraction of the cost of torch's serial per-element kernel;
 * - RMSNorm (Hugging Face's: w * (x * rsqrt(mean(x^2) + eps))), rotary embedding (half-split), SwiGLU.
 *
 * Built at first use by personalize/kernels.py with the machine's own compiler (-O3 -march=native -fopenmp).
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* ---- torch's mt19937 (aten/src/ATen/core/MT19937RNGEngine.h) --------------------------------------------------- */

#define MT_N 624
#define MT_M 397

/* The bytes of `torch.random.get_rng_state()` (THGeneratorState): seed u64, left i32, seeded i32, next u64,
 * state[624] as u64, then fields we leave alone. */
#define STATE_LEFT 8
#define STATE_NEXT 16
#define STATE_WORDS 24

typedef struct {
    uint32_t state[MT_N];
    uint32_t tempered[MT_N];
    int32_t left;
    uint32_t next;
} mt_t;

static inline uint32_t temper(uint32_t y) {
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= (y >> 18);
    return y;
}

static inline uint32_t twist(uint32_t u, uint32_t v) {
    uint32_t mixed = (u & 0x80000000u) | (v & 0x7fffffffu);
    return (mixed >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

static void temper_all(mt_t *mt) {
    for (int i = 0; i < MT_N; i++) mt->tempered[i] = temper(mt->state[i]);
}

static void next_state(mt_t *mt) {
    uint32_t *s = mt->state;
    int i = 0;
    for (; i < MT_N - MT_M; i++) s[i] = s[i + MT_M] ^ twist(s[i], s[i + 1]);
    for (; i < MT_N - 1; i++) s[i] = s[i + MT_M - MT_N] ^ twist(s[i], s[i + 1]);
    s[MT_N - 1] = s[MT_M - 1] ^ twist(s[MT_N - 1], s[0]);
    mt->left = MT_N;
    mt->next = 0;
    temper_all(mt);
}

static inline uint32_t mt_word(mt_t *mt) {
    if (--mt->left == 0) next_state(mt);
    return mt->tempered[mt->next++];
}

static void mt_load(mt_t *mt, const uint8_t *bytes) {
    int32_t left;
    uint64_t next, word;
    memcpy(&left, bytes + STATE_LEFT, 4);
    memcpy(&next, bytes + STATE_NEXT, 8);
    for (int i = 0; i < MT_N; i++) {
        memcpy(&word, bytes + STATE_WORDS + 8 * i, 8);
        mt->state[i] = (uint32_t)word;
    }
    mt->left = left;
    mt->next = (uint32_t)next;
    temper_all(mt);
}

static void mt_store(const mt_t *mt, uint8_t *bytes) {
    int32_t left = mt->left;
    uint64_t next = mt->next, word;
    memcpy(bytes + STATE_LEFT, &left, 4);
    memcpy(bytes + STATE_NEXT, &next, 8);
    for (int i = 0; i < MT_N; i++) {
        word = mt->state[i];
        memcpy(bytes + STATE_WORDS + 8 * i, &word, 8);
    }
}

/* Draw n Bernoulli(keep) values as `bernoulli_(keep)` does, advancing the generator state in `rng_bytes`:
 * keep_threshold = ceil(keep * 2^53), so that (53-bit draw) * 2^-53 < keep  <=>  draw < keep_threshold.
 * mask[i] = 1 where kept (torch's dropout is then x * (mask / keep)). */
void mt_dropout(uint8_t *rng_bytes, int64_t n, uint64_t keep_threshold, uint8_t *mask) {
    mt_t mt;
    mt_load(&mt, rng_bytes);
    const uint64_t low53 = (UINT64_C(1) << 53) - 1;
    int64_t i = 0;
    while (i < n) {
        int64_t pairs = (mt.left - 1) / 2; /* whole (hi, lo) pairs left in this block: no regeneration inside */
        if (pairs > n - i) pairs = n - i;
        if (pairs > 0) {
            const uint32_t *t = mt.tempered + mt.next;
            uint8_t *m = mask + i;
            for (int64_t k = 0; k < pairs; k++) {
                uint64_t draw = (((uint64_t)t[2 * k] << 32) | t[2 * k + 1]) & low53;
                m[k] = (uint8_t)(draw < keep_threshold);
            }
            mt.left -= (int32_t)(2 * pairs);
            mt.next += (uint32_t)(2 * pairs);
            i += pairs;
        } else { /* a pair across a block boundary */
            uint64_t hi = mt_word(&mt);
            uint64_t lo = mt_word(&mt);
            mask[i++] = (uint8_t)((((hi << 32) | lo) & low53) < keep_threshold);
        }
    }
    mt_store(&mt, rng_bytes);
}

/* ---- RMSNorm --------------------------------------------------------------------------------------------------- */

/* y = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), per row of d; rstd is kept for the backward pass. */
void rmsnorm_fwd(int64_t rows, int64_t d, const float *x, const float *w, float eps, float *y, float *rstd) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < d; i++) sum += xr[i] * xr[i];
        float s = 1.0f / sqrtf(sum / (float)d + eps);
        rstd[r] = s;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) yr[i] = w[i] * (xr[i] * s);
    }
}

/* dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd (w is frozen: no gradient for it). */
void rmsnorm_bwd(int64_t rows, int64_t d, const float *dy, const float *x, const float *w, const float *rstd,
                 float *dx) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *dyr = dy + r * d, *xr = x + r * d;
        float *dxr = dx + r * d;
        float s = rstd[r], dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d; i++) dot += dyr[i] * w[i] * xr[i];
        float c = dot * s * s / (float)d; /* mean(g * xhat) * rstd */
#pragma omp simd
        for (int64_t i = 0; i < d; i++) dxr[i] = s * (dyr[i] * w[i] - xr[i] * c);
    }
}

/* ---- rotary embedding (half-split: rotate_half(x) = cat(-x2, x1)) ---------------------------------------------- */

/* x and out (rows, heads, dim), cos and sin (rows, dim), rows = batch * seq. sign = +1 forward; the backward pass
 * is the rotation by -angle: dx = dy * cos + rotate_half^T(dy * sin), which is sign = -1 with the same tables. */
void rope(int64_t rows, int64_t heads, int64_t dim, const float *x, const float *cos_t, const float *sin_t,
          float sign, float *out) {
    int64_t half = dim / 2;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_t + r * dim, *s = sin_t + r * dim;
        for (int64_t h = 0; h < heads; h++) {
            const float *xr = x + (r * heads + h) * dim;
            float *o = out + (r * heads + h) * dim;
            if (sign > 0) {
#pragma omp simd
                for (int64_t i = 0; i < half; i++) o[i] = xr[i] * c[i] + (-xr[i + half]) * s[i];
#pragma omp simd
                for (int64_t i = half; i < dim; i++) o[i] = xr[i] * c[i] + xr[i - half] * s[i];
            } else {
#pragma omp simd
                for (int64_t i = 0; i < half; i++) o[i] = xr[i] * c[i] + xr[i + half] * s[i + half];
#pragma omp simd
                for (int64_t i = half; i < dim; i++) o[i] = xr[i] * c[i] - xr[i - half] * s[i - half];
            }
        }
    }
}

/* ---- SwiGLU ---------------------------------------------------------------------------------------------------- */

#ifdef __AVX2__
/* exp(x) in fp32, within ~2 ulp (Cephes' polynomial on a range reduced by ln 2), 8 at a time. */
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 sigmoid8(__m256 g) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}
#endif

static inline float sigmoid1(float g) { return 1.0f / (1.0f + expf(-g)); }

/* m = silu(g) * u = g * sigmoid(g) * u. */
void swiglu_fwd(int64_t n, const float *g, const float *u, float *m) {
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (n + 7) / 8; b++) {
            int64_t i = b * 8;
#ifdef __AVX2__
            if (i + 8 <= n) {
                __m256 gv = _mm256_loadu_ps(g + i);
                __m256 s = sigmoid8(gv);
                _mm256_storeu_ps(m + i, _mm256_mul_ps(_mm256_mul_ps(gv, s), _mm256_loadu_ps(u + i)));
                continue;
            }
#endif
            for (int64_t j = i; j < n && j < i + 8; j++) m[j] = g[j] * sigmoid1(g[j]) * u[j];
        }
    }
}

/* dg = dm * u * sig * (1 + g * (1 - sig)), du = dm * g * sig. */
void swiglu_bwd(int64_t n, const float *dm, const float *g, const float *u, float *dg, float *du) {
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (n + 7) / 8; b++) {
            int64_t i = b * 8;
#ifdef __AVX2__
            if (i + 8 <= n) {
                const __m256 one = _mm256_set1_ps(1.0f);
                __m256 gv = _mm256_loadu_ps(g + i), dmv = _mm256_loadu_ps(dm + i);
                __m256 s = sigmoid8(gv);
                __m256 silu = _mm256_mul_ps(gv, s);
                __m256 dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one));
                _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(dmv, _mm256_loadu_ps(u + i)), dsilu));
                _mm256_storeu_ps(du + i, _mm256_mul_ps(dmv, silu));
                continue;
            }
#endif
            for (int64_t j = i; j < n && j < i + 8; j++) {
                float s = sigmoid1(g[j]);
                dg[j] = dm[j] * u[j] * s * (1.0f + g[j] * (1.0f - s));
                du[j] = dm[j] * g[j] * s;
            }
        }
    }
}

/* ---- LoRA's low-rank products (rank r, a few to a few dozen) ---------------------------------------------------
 * BLAS runs these thin products at a fraction of its large-matrix rate (each is a pass over a (T, n) matrix with
 * very little arithmetic); here each is one pass, with LoRA's dropout applied on the fly from its byte mask:
 * xm[t, i] = x[t, i] * (mask ? (mask[t, i] ? scale : 0) : 1). */

/* out (T, r) = xm (T, n) @ W.T, W (r, n). */
void lora_rows_dot(int64_t rows, int64_t n, int64_t r, const float *x, const uint8_t *mask, float scale,
                   const float *w, float *out) {
#pragma omp parallel
    {
        float xm[n];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) {
            const float *xr = x + t * n;
            const float *in = xr;
            if (mask) {
                const uint8_t *mr = mask + t * n;
#pragma omp simd
                for (int64_t i = 0; i < n; i++) xm[i] = xr[i] * (mr[i] ? scale : 0.0f);
                in = xm;
            }
            int64_t j = 0;
            for (; j + 4 <= r; j += 4) {
                const float *w0 = w + j * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                for (int64_t i = 0; i < n; i++) {
                    a0 += in[i] * w0[i];
                    a1 += in[i] * w1[i];
                    a2 += in[i] * w2[i];
                    a3 += in[i] * w3[i];
                }
                out[t * r + j] = a0;
                out[t * r + j + 1] = a1;
                out[t * r + j + 2] = a2;
                out[t * r + j + 3] = a3;
            }
            for (; j < r; j++) {
                const float *wj = w + j * n;
                float a = 0.0f;
#pragma omp simd reduction(+ : a)
                for (int64_t i = 0; i < n; i++) a += in[i] * wj[i];
                out[t * r + j] = a;
            }
        }
    }
}

/* y (T, n) = or += (h (T, r) @ W (r, n)) * (mask ? mask * scale : 1). */
void lora_rank_update(int64_t rows, int64_t n, int64_t r, const float *h, const float *w, const uint8_t *mask,
                      float scale, int accumulate, float *y) {
#pragma omp parallel
    {
        float acc[n];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) {
            const float *hr = h + t * r;
            float *yr = y + t * n;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) acc[i] = hr[0] * w[i];
            for (int64_t j = 1; j < r; j++) {
                const float *wj = w + j * n;
                float hj = hr[j];
#pragma omp simd
                for (int64_t i = 0; i < n; i++) acc[i] += hj * wj[i];
            }
            if (mask) {
                const uint8_t *mr = mask + t * n;
#pragma omp simd
                for (int64_t i = 0; i < n; i++) acc[i] *= (mr[i] ? scale : 0.0f);
            }
            if (accumulate) {
#pragma omp simd
                for (int64_t i = 0; i < n; i++) yr[i] += acc[i];
            } else {
#pragma omp simd
                for (int64_t i = 0; i < n; i++) yr[i] = acc[i];
            }
        }
    }
}

/* g (r, n) = h (T, r).T @ xm (T, n): each thread owns a block of columns and runs down all rows. */
void lora_outer_sum(int64_t rows, int64_t n, int64_t r, const float *h, const float *x, const uint8_t *mask,
                    float scale, float *g) {
    const int64_t block = 32;
    int64_t blocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t i0 = b * block, i1 = i0 + block < n ? i0 + block : n, w = i1 - i0;
        float acc[r * block];
        memset(acc, 0, sizeof(float) * (size_t)(r * block));
        float xm[block];
        for (int64_t t = 0; t < rows; t++) {
            const float *xr = x + t * n + i0;
            if (mask) {
                const uint8_t *mr = mask + t * n + i0;
                for (int64_t i = 0; i < w; i++) xm[i] = xr[i] * (mr[i] ? scale : 0.0f);
            } else {
                for (int64_t i = 0; i < w; i++) xm[i] = xr[i];
            }
            const float *hr = h + t * r;
            for (int64_t j = 0; j < r; j++) {
                float hj = hr[j];
                float *aj = acc + j * block;
#pragma omp simd
                for (int64_t i = 0; i < w; i++) aj[i] += hj * xm[i];
            }
        }
        for (int64_t j = 0; j < r; j++) memcpy(g + j * n + i0, acc + j * block, sizeof(float) * (size_t)w);
    }
}

/* ---- the output layer on a few rows ----------------------------------------------------------------------------
 * Training needs logits only at the output positions (a few rows), against a (vocab, d) embedding matrix: BLAS
 * runs such skinny products far below its rate. Here each embedding row is read once per pass. */

/* logits (rows, vocab) = h (rows, d) @ E.T. */
void lm_head_fwd(int64_t rows, int64_t d, int64_t vocab, const float *h, const float *e, float *logits) {
#pragma omp parallel for schedule(static)
    for (int64_t v = 0; v < vocab; v += 4) {
        int64_t nv = vocab - v < 4 ? vocab - v : 4;
        const float *e0 = e + v * d, *e1 = nv > 1 ? e0 + d : e0, *e2 = nv > 2 ? e0 + 2 * d : e0;
        const float *e3 = nv > 3 ? e0 + 3 * d : e0;
        for (int64_t t = 0; t < rows; t++) {
            const float *ht = h + t * d;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int64_t i = 0; i < d; i++) {
                a0 += ht[i] * e0[i];
                a1 += ht[i] * e1[i];
                a2 += ht[i] * e2[i];
                a3 += ht[i] * e3[i];
            }
            float *out = logits + t * vocab + v;
            out[0] = a0;
            if (nv > 1) out[1] = a1;
            if (nv > 2) out[2] = a2;
            if (nv > 3) out[3] = a3;
        }
    }
}

/* dh (rows, d) = dlogits (rows, vocab) @ E: each of `threads` threads sums over a share of the vocabulary into its
 * own (rows, d) slice of `scratch` (threads * rows * d floats, zeroed by the caller); the slices are then added. */
void lm_head_bwd(int64_t rows, int64_t d, int64_t vocab, const float *dlogits, const float *e, int threads,
                 float *scratch, float *dh) {
#pragma omp parallel num_threads(threads)
    {
        float *acc = scratch + (int64_t)omp_get_thread_num() * rows * d;
#pragma omp for schedule(static)
        for (int64_t v = 0; v < vocab; v += 4) {
            int64_t nv = vocab - v < 4 ? vocab - v : 4;
            const float *e0 = e + v * d;
            const float *e1 = nv > 1 ? e0 + d : e0, *e2 = nv > 2 ? e0 + 2 * d : e0, *e3 = nv > 3 ? e0 + 3 * d : e0;
            for (int64_t t = 0; t < rows; t++) {
                const float *dl = dlogits + t * vocab + v;
                float c0 = dl[0], c1 = nv > 1 ? dl[1] : 0.0f, c2 = nv > 2 ? dl[2] : 0.0f, c3 = nv > 3 ? dl[3] : 0.0f;
                float *at = acc + t * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) at[i] += c0 * e0[i] + c1 * e1[i] + c2 * e2[i] + c3 * e3[i];
            }
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows * d; i++) {
        float sum = 0.0f;
        for (int k = 0; k < threads; k++) sum += scratch[(int64_t)k * rows * d + i];
        dh[i] = sum;
    }
}

/* ---- causal attention with grouped key/value heads, for short training sequences -------------------------------
 * q (B, Lq, H, D) with query i at position q_offset + i; k, v (B, L, KV, D); real (B, L): 1 for a token, 0 for left
 * padding. Query position p sees keys j <= p that are real, and itself (a padded row attends to itself alone, so no
 * row is empty). out (B, Lq, H, D); lse (B, H, Lq) keeps log-sum-exp of the scaled scores for the backward pass,
 * which recomputes the probabilities (as flash attention does) instead of storing them. Laid out as the projections
 * write them, so no transposes are needed; causal rows cost half the products of a dense (L x L) block. */

/* s[j] = scale * sum_c q[c] * kt[c * ld + j] for j < n: scores against keys held transposed (d, ld), 8 keys per
 * vector, 4 vectors per pass over q, so no horizontal sums. ld is a multiple of 8 (zero columns past the keys). */
static void scores_t(const float *q, const float *kt, int64_t ld, int64_t n, int64_t d, float scale, float *s) {
    int64_t j = 0;
#ifdef __AVX2__
    const __m256 sc = _mm256_set1_ps(scale);
    for (; j < n; j += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t width = n - j; /* the last block may cover fewer than 32 keys: its columns past n are zeros */
        for (int64_t c = 0; c < d; c++) {
            __m256 qc = _mm256_set1_ps(q[c]);
            const float *row = kt + c * ld + j;
            a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(row), a0);
            if (width > 8) a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(row + 8), a1);
            if (width > 16) a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(row + 16), a2);
            if (width > 24) a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(row + 24), a3);
        }
        _mm256_storeu_ps(s + j, _mm256_mul_ps(a0, sc));
        if (width > 8) _mm256_storeu_ps(s + j + 8, _mm256_mul_ps(a1, sc));
        if (width > 16) _mm256_storeu_ps(s + j + 16, _mm256_mul_ps(a2, sc));
        if (width > 24) _mm256_storeu_ps(s + j + 24, _mm256_mul_ps(a3, sc));
    }
#else
    for (; j < n; j++) s[j] = 0.0f;
    for (int64_t c = 0; c < d; c++)
        for (j = 0; j < n; j++) s[j] += q[c] * kt[c * ld + j];
    for (j = 0; j < n; j++) s[j] *= scale;
#endif
}

/* out[c] (=, or += with accumulate) sum_{j < n} p[j * p_stride] * rows[j * stride + c] for c < d: 64 outputs at a
 * time held in registers across the rows. */
static void weighted_rows(const float *p, int64_t p_stride, const float *rows, int64_t stride, int64_t n, int64_t d,
                          int accumulate, float *out) {
    int64_t c0 = 0;
#ifdef __AVX2__
    for (; c0 + 64 <= d; c0 += 64) {
        __m256 a[8];
        for (int u = 0; u < 8; u++) a[u] = accumulate ? _mm256_loadu_ps(out + c0 + 8 * u) : _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            __m256 pj = _mm256_set1_ps(p[j * p_stride]);
            const float *r = rows + j * stride + c0;
            for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 8 * u), a[u]);
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(out + c0 + 8 * u, a[u]);
    }
#endif
    for (int64_t c = c0; c < d; c++) {
        float acc = accumulate ? out[c] : 0.0f;
        for (int64_t j = 0; j < n; j++) acc += p[j * p_stride] * rows[j * stride + c];
        out[c] = acc;
    }
}

/* dst (d, ld) = src rows j < n (stride apart) transposed, zero columns from n up to ld. */
static void transpose_rows(const float *src, int64_t stride, int64_t n, int64_t d, int64_t ld, float *dst) {
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = n; j < ld; j++) dst[c * ld + j] = 0.0f;
    for (int64_t j = 0; j < n; j++)
        for (int64_t c = 0; c < d; c++) dst[c * ld + j] = src[j * stride + c];
}

static inline float dot_d(const float *a, const float *b, int64_t d) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < d; i++) acc += a[i] * b[i];
    return acc;
}

static inline void exp_inplace(float *s, int64_t n) {
    int64_t j = 0;
#ifdef __AVX2__
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, exp8(_mm256_loadu_ps(s + j)));
#endif
    for (; j < n; j++) s[j] = expf(s[j]);
}

/* s[j] = exp(s[j] - shift) for the keys query position `pos` sees, 0 for the (padding) keys it does not; s holds
 * room for pos + 1 rounded up to 8 (the lanes past pos are computed and ignored). */
static void attn_exp(const uint8_t *real_b, int64_t pos, float shift, float *s) {
    int64_t n = (pos + 8) / 8 * 8;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) s[j] -= shift;
    exp_inplace(s, n);
    for (int64_t j = 0; j < pos; j++) s[j] = real_b[j] ? s[j] : 0.0f;
}

/* The largest score among the keys position `pos` sees. */
static float seen_max(const uint8_t *real_b, int64_t pos, const float *s) {
    float m = s[pos];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < pos; j++) m = fmaxf(m, real_b[j] ? s[j] : -INFINITY);
    return m;
}

void attn_fwd(int64_t batch, int64_t lq, int64_t len, int64_t heads, int64_t kv_heads, int64_t d, int64_t q_offset,
              float scale, const float *q, const float *k, const float *v, const uint8_t *real, float *out,
              float *lse) {
    int64_t group = heads / kv_heads, kv_stride = kv_heads * d, ld = (len + 31) / 32 * 32;
#pragma omp parallel
    {
        float *kt = malloc(sizeof(float) * (size_t)(d * ld)), *s = malloc(sizeof(float) * (size_t)ld);
#pragma omp for schedule(dynamic) collapse(2)
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t kvh = 0; kvh < kv_heads; kvh++) {
                const float *kb = k + b * len * kv_stride + kvh * d, *vb = v + b * len * kv_stride + kvh * d;
                const uint8_t *real_b = real + b * len;
                transpose_rows(kb, kv_stride, len, d, ld, kt);
                for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
                    for (int64_t i = 0; i < lq; i++) {
                        int64_t pos = q_offset + i;
                        const float *qi = q + ((b * lq + i) * heads + h) * d;
                        float *oi = out + ((b * lq + i) * heads + h) * d;
                        scores_t(qi, kt, ld, pos + 1, d, scale, s);
                        float m = seen_max(real_b, pos, s);
                        attn_exp(real_b, pos, m, s);
                        float total = 0.0f;
                        for (int64_t j = 0; j <= pos; j++) total += s[j];
                        weighted_rows(s, 1, vb, kv_stride, pos + 1, d, 0, oi);
                        float inv = 1.0f / total;
#pragma omp simd
                        for (int64_t c = 0; c < d; c++) oi[c] *= inv;
                        lse[(b * heads + h) * lq + i] = m + logf(total);
                    }
                }
            }
        }
        free(kt);
        free(s);
    }
}

/* dq like q; dk, dv like k and v. Each thread owns one (batch row, key/value head) at a time: it recomputes the
 * probabilities P and score gradients dS of the group's query rows into buffers, then forms each key's gradients
 * from them (dV_j = sum_r P[r, j] dout_r, dK_j = sum_r dS[r, j] q_r) with the sums held in registers. */
void attn_bwd(int64_t batch, int64_t lq, int64_t len, int64_t heads, int64_t kv_heads, int64_t d, int64_t q_offset,
              float scale, const float *q, const float *k, const float *v, const uint8_t *real, const float *out,
              const float *lse, const float *dout, float *dq, float *dk, float *dv) {
    int64_t group = heads / kv_heads, kv_stride = kv_heads * d, ld = (len + 31) / 32 * 32, q_stride = heads * d;
#pragma omp parallel
    {
        float *kt = malloc(sizeof(float) * (size_t)(d * ld)), *vt = malloc(sizeof(float) * (size_t)(d * ld));
        float *pbuf = malloc(sizeof(float) * (size_t)(group * lq * ld));
        float *dsbuf = malloc(sizeof(float) * (size_t)(group * lq * ld));
#pragma omp for schedule(dynamic) collapse(2)
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t kvh = 0; kvh < kv_heads; kvh++) {
                const float *kb = k + b * len * kv_stride + kvh * d, *vb = v + b * len * kv_stride + kvh * d;
                float *dkb = dk + b * len * kv_stride + kvh * d, *dvb = dv + b * len * kv_stride + kvh * d;
                const uint8_t *real_b = real + b * len;
                transpose_rows(kb, kv_stride, len, d, ld, kt);
                transpose_rows(vb, kv_stride, len, d, ld, vt);
                for (int64_t g = 0; g < group; g++) {
                    int64_t h = kvh * group + g;
                    for (int64_t i = 0; i < lq; i++) {
                        int64_t pos = q_offset + i;
                        int64_t at = ((b * lq + i) * heads + h) * d;
                        const float *qi = q + at, *oi = out + at, *doi = dout + at;
                        float *p = pbuf + (g * lq + i) * ld, *ds = dsbuf + (g * lq + i) * ld;
                        float di = dot_d(doi, oi, d);
                        scores_t(qi, kt, ld, pos + 1, d, scale, p);
                        attn_exp(real_b, pos, lse[(b * heads + h) * lq + i], p);
                        scores_t(doi, vt, ld, pos + 1, d, 1.0f, ds); /* dout_i . v_j */
#pragma omp simd
                        for (int64_t j = 0; j <= pos; j++) ds[j] = p[j] * (ds[j] - di) * scale;
                        for (int64_t j = pos + 1; j < ld; j++) p[j] = ds[j] = 0.0f;
                        weighted_rows(ds, 1, kb, kv_stride, pos + 1, d, 0, dq + at);
                    }
                }
                for (int64_t j = 0; j < len; j++) {
                    int64_t first = j > q_offset ? j - q_offset : 0; /* the query rows that see key j */
                    if (first >= lq) {
                        memset(dkb + j * kv_stride, 0, sizeof(float) * (size_t)d);
                        memset(dvb + j * kv_stride, 0, sizeof(float) * (size_t)d);
                        continue;
                    }
                    for (int64_t g = 0; g < group; g++) {
                        int64_t h = kvh * group + g, n = lq - first;
                        const float *prow = pbuf + (g * lq + first) * ld + j, *dsrow = dsbuf + (g * lq + first) * ld + j;
                        const float *dor = dout + ((b * lq + first) * heads + h) * d;
                        const float *qr = q + ((b * lq + first) * heads + h) * d;
                        weighted_rows(prow, ld, dor, q_stride, n, d, g > 0, dvb + j * kv_stride);
                        weighted_rows(dsrow, ld, qr, q_stride, n, d, g > 0, dkb + j * kv_stride);
                    }
                }
            }
        }
        free(kt);
        free(vt);
        free(pbuf);
        free(dsbuf);
    }
}
