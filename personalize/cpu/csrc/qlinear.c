/* Weight-only quantised linear layers for the CPU (see personalize/quantization.py for the format and why).
 *
 * A weight matrix W (N outputs x K inputs) is stored as one 8-bit code per weight, row-major, plus a scale and an
 * offset per group of 32 consecutive inputs of a row:  W[n, k] = scale[n, g] * code[n, k] + offset[n, g],  g = k / 32.
 * Codes are unsigned (0..255) with an offset, or signed (-128..127) with no offset. The products run in fp32:
 *     y[m, n] = sum_g scale[n, g] * (sum_{k in g} code[n, k] * x[m, k]) + offset[n, g] * (sum_{k in g} x[m, k])
 * so the only difference from an fp32 matrix of the same weights is the order of the fp32 sums.
 *
 * Built at first use by personalize/quantization.py with the machine's own compiler (-O3 -march=native -fopenmp);
 * the OpenMP runtime it links is the one torch already loaded, so both share one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define GROUP 32
#ifdef __AVX512F__
#define ROW_BLOCK 8 /* a group's codes are widened once per 8 input rows: 32 zmm registers hold 8 rows' sums */
#else
#define ROW_BLOCK 4
#endif

#ifdef __AVX512F__
static inline __attribute__((always_inline)) __m512 codes16(const uint8_t *p, int is_signed) {
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    return _mm512_cvtepi32_ps(is_signed ? _mm512_cvtepi8_epi32(raw) : _mm512_cvtepu8_epi32(raw));
}
#endif

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __attribute__((always_inline)) __m256 codes8(const uint8_t *p, int is_signed) {
    __m128i raw = _mm_loadl_epi64((const __m128i *)p);
    return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(raw) : _mm256_cvtepu8_epi32(raw));
}
#endif

/* The dot products of one output row with ROWS input rows (dot excludes the offset term). ROWS and SIGNED are
 * constants in each expansion, so the accumulators stay in registers. A row's sums never depend on the other rows
 * or on ROWS, so a row decodes to the same bits alone or in a batch. */
#if defined(__AVX512F__)
/* 16 wide: a group's 32 codes are widened and scaled once (two vectors), then fused into each row's two sums. */
#define ROW_DOTS(NAME, ROWS, SIGNED)                                                                     \
    static void NAME(const float *x, int64_t K, const uint8_t *code, const float *scale, float *dot) {   \
        __m512 even[ROWS], odd[ROWS];                                                                    \
        for (int r = 0; r < ROWS; r++) even[r] = odd[r] = _mm512_setzero_ps();                          \
        for (int64_t g = 0; g < K / GROUP; g++) {                                                        \
            const uint8_t *c = code + g * GROUP;                                                         \
            __m512 s = _mm512_set1_ps(scale[g]);                                                         \
            __m512 w0 = _mm512_mul_ps(codes16(c, SIGNED), s), w1 = _mm512_mul_ps(codes16(c + 16, SIGNED), s); \
            for (int r = 0; r < ROWS; r++) {                                                             \
                const float *xr = x + r * K + g * GROUP;                                                 \
                even[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), even[r]);                             \
                odd[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), odd[r]);                          \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < ROWS; r++) dot[r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));   \
    }
#elif defined(__AVX2__)
#define ROW_DOTS(NAME, ROWS, SIGNED)                                                                     \
    static void NAME(const float *x, int64_t K, const uint8_t *code, const float *scale, float *dot) {   \
        __m256 total[ROWS];                                                                              \
        for (int r = 0; r < ROWS; r++) total[r] = _mm256_setzero_ps();                                   \
        for (int64_t g = 0; g < K / GROUP; g++) {                                                        \
            const uint8_t *c = code + g * GROUP;                                                         \
            __m256 w0 = codes8(c, SIGNED), w1 = codes8(c + 8, SIGNED);                                   \
            __m256 w2 = codes8(c + 16, SIGNED), w3 = codes8(c + 24, SIGNED);                             \
            __m256 s = _mm256_broadcast_ss(scale + g);                                                   \
            for (int r = 0; r < ROWS; r++) {                                                             \
                const float *xr = x + r * K + g * GROUP;                                                 \
                __m256 a = _mm256_mul_ps(w0, _mm256_loadu_ps(xr));                                       \
                __m256 b = _mm256_mul_ps(w1, _mm256_loadu_ps(xr + 8));                                   \
                a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), a);                                    \
                b = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), b);                                    \
                total[r] = _mm256_fmadd_ps(_mm256_add_ps(a, b), s, total[r]);                            \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < ROWS; r++) dot[r] = hsum(total[r]);                                          \
    }
#else
#define ROW_DOTS(NAME, ROWS, SIGNED)                                                                     \
    static void NAME(const float *x, int64_t K, const uint8_t *code, const float *scale, float *dot) {   \
        for (int r = 0; r < ROWS; r++) {                                                                 \
            float total = 0.0f;                                                                          \
            for (int64_t g = 0; g < K / GROUP; g++) {                                                    \
                float acc = 0.0f;                                                                        \
                for (int i = 0; i < GROUP; i++) {                                                        \
                    uint8_t u = code[g * GROUP + i];                                                     \
                    acc += (SIGNED ? (float)(int8_t)u : (float)u) * x[r * K + g * GROUP + i];            \
                }                                                                                        \
                total += acc * scale[g];                                                                 \
            }                                                                                            \
            dot[r] = total;                                                                              \
        }                                                                                                \
    }
#endif

ROW_DOTS(dots_u1, 1, 0)
ROW_DOTS(dots_u2, 2, 0)
ROW_DOTS(dots_u3, 3, 0)
ROW_DOTS(dots_u4, 4, 0)
ROW_DOTS(dots_u5, 5, 0)
ROW_DOTS(dots_u6, 6, 0)
ROW_DOTS(dots_u7, 7, 0)
ROW_DOTS(dots_u8, 8, 0)
ROW_DOTS(dots_s1, 1, 1)
ROW_DOTS(dots_s2, 2, 1)
ROW_DOTS(dots_s3, 3, 1)
ROW_DOTS(dots_s4, 4, 1)
ROW_DOTS(dots_s5, 5, 1)
ROW_DOTS(dots_s6, 6, 1)
ROW_DOTS(dots_s7, 7, 1)
ROW_DOTS(dots_s8, 8, 1)

typedef void (*dots_fn)(const float *, int64_t, const uint8_t *, const float *, float *);
/* Up to 8 rows per call; qlinear asks for at most ROW_BLOCK. */
static const dots_fn DOTS[2][8] = {{dots_u1, dots_u2, dots_u3, dots_u4, dots_u5, dots_u6, dots_u7, dots_u8},
                                   {dots_s1, dots_s2, dots_s3, dots_s4, dots_s5, dots_s6, dots_s7, dots_s8}};

/* out[m, n] (+)= (x[m] . W[n]) for m < M, n < N: x is (M, K) and out is (M, N), both contiguous fp32. */
void qlinear(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scales, const float *offsets,
             int is_signed, int64_t N, float *out, int accumulate) {
    int64_t groups = K / GROUP;
    float *xsum = NULL; /* sum of each input row over each group: multiplies the offsets */
    if (offsets) {
        xsum = (float *)malloc(sizeof(float) * (size_t)(M * groups));
        for (int64_t m = 0; m < M; m++)
            for (int64_t g = 0; g < groups; g++) {
                float s = 0.0f;
                for (int i = 0; i < GROUP; i++) s += x[m * K + g * GROUP + i];
                xsum[m * groups + g] = s;
            }
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *code = codes + n * K;
        const float *scale = scales + n * groups;
        for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
            int rows = (int)(M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK);
            float dot[ROW_BLOCK];
            DOTS[is_signed != 0][rows - 1](x + m0 * K, K, code, scale, dot);
            for (int r = 0; r < rows; r++) {
                float y = dot[r];
                if (offsets) {
                    const float *off = offsets + n * groups, *xs = xsum + (m0 + r) * groups;
                    float o = 0.0f;
                    for (int64_t g = 0; g < groups; g++) o += off[g] * xs[g];
                    y += o;
                }
                float *dst = out + (m0 + r) * N + n;
                *dst = accumulate ? *dst + y : y;
            }
        }
    }
    free(xsum);
}

/* The fp32 weights W (N, K), row-major, for products with many input rows (prefill), where a BLAS GEMM wins. */
void qlinear_dequantize(const uint8_t *codes, const float *scales, const float *offsets, int is_signed, int64_t N,
                        int64_t K, float *out) {
    int64_t groups = K / GROUP;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < groups; g++) {
            float s = scales[n * groups + g], o = offsets ? offsets[n * groups + g] : 0.0f;
            const uint8_t *c = codes + n * K + g * GROUP;
            float *dst = out + n * K + g * GROUP;
            if (is_signed)
                for (int i = 0; i < GROUP; i++) dst[i] = s * (float)(int8_t)c[i] + o;
            else
                for (int i = 0; i < GROUP; i++) dst[i] = s * (float)c[i] + o;
        }
}

/* ---- one decoding step of a Llama-family model (one new token per row), for personalize/fastpath.py ---------- */

typedef struct {
    const uint8_t *codes;
    const float *scales;
    const float *offsets; /* NULL for signed codes */
    int64_t is_signed, out_features, in_features;
} qmatrix;

typedef struct {
    const float *ln1, *ln2;
    qmatrix qkv, o, gate_up, down; /* q/k/v and gate/up fused along the outputs */
    float *cache_k, *cache_v;      /* (B, n_kv, T, D) */
} qlayer;

typedef struct {
    int64_t hidden, n_heads, n_kv, head_dim, inter, n_layers, max_rank;
    float eps;
} qdims;

enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN, N_PROJ };

static void apply(const qmatrix *m, const float *x, int64_t rows, float *out, int accumulate) {
    qlinear(x, rows, m->in_features, m->codes, m->scales, m->offsets, (int)m->is_signed, m->out_features, out,
            accumulate);
}

static void rms_norm(const float *x, int64_t rows, int64_t dim, const float *w, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float ss = 0.0f;
        for (int64_t i = 0; i < dim; i++) ss += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) out[r * dim + i] = xr[i] * inv * w[i];
    }
}

/* HF Llama's rotate_half convention, with full-width cos/sin rows (the two halves repeat). */
static void rope(float *v, int64_t d, const float *cos_row, const float *sin_row) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos_row[i] - b * sin_row[i];
        v[i + half] = b * cos_row[i + half] + a * sin_row[i + half];
    }
}

/* out[r, start:start+size] += (x[r] @ A) @ B for each row r with an adapter on this projection. The table holds,
 * per row, the addresses of A (in, rank) and B (rank, size) with its scaling folded in, and the rank (0: none). */
static void add_lora(const int64_t *table, int64_t rows, const float *x, int64_t in, float *out, int64_t width,
                     int64_t start, int64_t size, float *tmp) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t *entry = table + r * 3;
        int64_t rank = entry[2];
        if (rank == 0) continue;
        const float *a = (const float *)(intptr_t)entry[0], *b = (const float *)(intptr_t)entry[1];
        for (int64_t j = 0; j < rank; j++) tmp[j] = 0.0f;
        for (int64_t i = 0; i < in; i++) {
            float xi = x[r * in + i];
            for (int64_t j = 0; j < rank; j++) tmp[j] += xi * a[i * rank + j];
        }
        float *dst = out + r * width + start;
        for (int64_t j = 0; j < rank; j++) {
            float t = tmp[j];
            for (int64_t n = 0; n < size; n++) dst[n] += t * b[j * size + n];
        }
    }
}

/* One new token per row through every layer. x (B, hidden) holds the token embeddings on entry and the final
 * normed hidden state on return. positions (B): each row's rotary position; valid (B, T): the cache positions each
 * row may attend to, position `offset` (where this step writes) included. lora: NULL, or a table of
 * (n_layers, N_PROJ, B, 3) int64 entries (see add_lora). */
void qdecode_step(const qdims *d, const qlayer *layers, const float *final_norm, int64_t B, float *x,
                  const int64_t *positions, const float *cos_t, const float *sin_t, int64_t T, int64_t offset,
                  const uint8_t *valid, const int64_t *lora) {
    int64_t H = d->hidden, D = d->head_dim, qo = d->n_heads * D, kvo = d->n_kv * D, I = d->inter;
    int64_t width = qo + 2 * kvo, group = d->n_heads / d->n_kv;
    float *y = malloc(sizeof(float) * B * H), *qkv = malloc(sizeof(float) * B * width);
    float *attn = malloc(sizeof(float) * B * qo), *gu = malloc(sizeof(float) * B * 2 * I);
    float *act = malloc(sizeof(float) * B * I), *tmp = malloc(sizeof(float) * (d->max_rank + 1));
    float scale = 1.0f / sqrtf((float)D);
    for (int64_t l = 0; l < d->n_layers; l++) {
        const qlayer *L = layers + l;
        const int64_t *lt = lora ? lora + l * N_PROJ * B * 3 : NULL;
        rms_norm(x, B, H, L->ln1, d->eps, y);
        apply(&L->qkv, y, B, qkv, 0);
        if (lt) {
            add_lora(lt + P_Q * B * 3, B, y, H, qkv, width, 0, qo, tmp);
            add_lora(lt + P_K * B * 3, B, y, H, qkv, width, qo, kvo, tmp);
            add_lora(lt + P_V * B * 3, B, y, H, qkv, width, qo + kvo, kvo, tmp);
        }
        for (int64_t b = 0; b < B; b++) { /* rotate q and k, then write k and v into the cache */
            float *row = qkv + b * width;
            const float *c = cos_t + positions[b] * D, *s = sin_t + positions[b] * D;
            for (int64_t h = 0; h < d->n_heads; h++) rope(row + h * D, D, c, s);
            for (int64_t h = 0; h < d->n_kv; h++) {
                rope(row + qo + h * D, D, c, s);
                memcpy(L->cache_k + ((b * d->n_kv + h) * T + offset) * D, row + qo + h * D, sizeof(float) * D);
                memcpy(L->cache_v + ((b * d->n_kv + h) * T + offset) * D, row + qo + kvo + h * D, sizeof(float) * D);
            }
        }
#pragma omp parallel for schedule(static)
        for (int64_t bh = 0; bh < B * d->n_heads; bh++) { /* attention over the cache, one (row, head) each */
            int64_t b = bh / d->n_heads, h = bh % d->n_heads, kvh = h / group;
            const float *q = qkv + b * width + h * D;
            const float *keys = L->cache_k + (b * d->n_kv + kvh) * T * D;
            const float *values = L->cache_v + (b * d->n_kv + kvh) * T * D;
            const uint8_t *ok = valid + b * T;
            float *out = attn + b * qo + h * D;
            float *scores = malloc(sizeof(float) * (offset + 1));
            float top = -INFINITY, total = 0.0f;
            for (int64_t t = 0; t <= offset; t++) {
                if (!ok[t]) continue;
                float s = 0.0f;
                for (int64_t i = 0; i < D; i++) s += q[i] * keys[t * D + i];
                scores[t] = s * scale;
                if (scores[t] > top) top = scores[t];
            }
            for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
            for (int64_t t = 0; t <= offset; t++) {
                if (!ok[t]) continue;
                float p = expf(scores[t] - top);
                total += p;
                for (int64_t i = 0; i < D; i++) out[i] += p * values[t * D + i];
            }
            for (int64_t i = 0; i < D; i++) out[i] /= total;
            free(scores);
        }
        apply(&L->o, attn, B, x, 1);
        if (lt) add_lora(lt + P_O * B * 3, B, attn, qo, x, H, 0, H, tmp);
        rms_norm(x, B, H, L->ln2, d->eps, y);
        apply(&L->gate_up, y, B, gu, 0);
        if (lt) {
            add_lora(lt + P_GATE * B * 3, B, y, H, gu, 2 * I, 0, I, tmp);
            add_lora(lt + P_UP * B * 3, B, y, H, gu, 2 * I, I, I, tmp);
        }
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < I; i++) {
                float g = gu[b * 2 * I + i];
                act[b * I + i] = g / (1.0f + expf(-g)) * gu[b * 2 * I + I + i];
            }
        apply(&L->down, act, B, x, 1);
        if (lt) add_lora(lt + P_DOWN * B * 3, B, act, I, x, H, 0, H, tmp);
    }
    rms_norm(x, B, H, final_norm, d->eps, x);
    free(y), free(qkv), free(attn), free(gu), free(act), free(tmp);
}
