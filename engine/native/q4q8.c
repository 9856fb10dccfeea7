/* kvbench: one MoE layer's routed experts for one token on the host CPU, straight from their
 * GGUF Q4_0 blocks, with the activations rounded to 8-bit blocks (integer dot products).
 * Contract and reference: engine/native/__init__.py (moe_q4_decode). Written for kvbench. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
/* AVX-512 with VNNI (vpdpbusd): two blocks a step in dot_rows4, the AVX2 loop for an odd last block */
#if defined(__AVX2__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define KVB_AVX512_VNNI 1
#else
#define KVB_AVX512_VNNI 0
#endif

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
    if (e == 0) {
        float v = ldexpf((float)m, -24);
        return s ? -v : v;
    }
    f = e == 31 ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112) << 23) | (m << 13));
    float out;
    memcpy(&out, &f, 4);
    return out;
#endif
}

/* x [K] -> 8-bit blocks of 32: d = max|x| / 127, q = round-half-even(x * (1 / d)) */
static void quantize_blocks(const float *x, int K, int8_t *q, float *d) {
    for (int b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
        float db = amax / 127.0f;
        float id = db > 0.0f ? 1.0f / db : 0.0f;
        for (int i = 0; i < 32; i++)
            q[32 * b + i] = (int8_t)(int)nearbyintf(xb[i] * id);
        d[b] = db;
    }
}

/* four Q4_0 rows (qs: 16 bytes a block, element j in the low nibble of byte j and element j + 16 in
 * its high nibble, rows qstride bytes apart; dw: one fp16 scale a block, rows dstride apart) against
 * one vector of 8-bit blocks: out[r] = sum_b dw[r][b] dx[b] sum_i (w_ri - 8) x_i. The x block is
 * loaded once for the four rows, which keep four independent accumulators. */
static inline void dot_rows4(const uint8_t *qs, size_t qstride, const uint16_t *dw, size_t dstride,
                             const int8_t *qx, const float *dx, int nb, float *out) {
    float sc[4][nb];
    for (int r = 0; r < 4; r++) {
        const uint16_t *d = dw + r * dstride;
        int b = 0;
#ifdef __AVX2__
        for (; b + 8 <= nb; b += 8)
            _mm256_storeu_ps(sc[r] + b, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + b))),
                                                      _mm256_loadu_ps(dx + b)));
#endif
        for (; b < nb; b++)
            sc[r][b] = half_to_float(d[b]) * dx[b];
    }
#ifdef __AVX2__
    float tot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int b = 0;
#if KVB_AVX512_VNNI
    /* two blocks a step in 512-bit registers: a row's 32 bytes split into its low nibbles [b0 0-15 |
     * b1 0-15] and high ones [b0 16-31 | b1 16-31], x's two blocks reordered to match once for the
     * four rows; the nibbles (0..15, unsigned) dot x with vpdpbusd, started from -8 * sum(x) over
     * the same four values a lane, so each lane holds sum (w - 8) x exactly; lanes 0-3 and 8-11 are
     * block b's, 4-7 and 12-15 block b + 1's, each scaled by its block's scale */
    {
        __m512 acc5[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        const __m256i low = _mm256_set1_epi8(0x0f);
        const __m512i eight = _mm512_set1_epi8(8);
        const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
        for (; b + 2 <= nb; b += 2) {
            if ((b & 3) == 0) {        /* as the AVX2 loop below */
                for (int r = 4; r < 12; r++)
                    _mm_prefetch((const char *)(qs + r * qstride + 16 * b), _MM_HINT_T1);
                if ((b & 31) == 0)
                    for (int r = 4; r < 12; r++)
                        _mm_prefetch((const char *)(dw + r * dstride + b), _MM_HINT_T1);
            }
            __m512i x = _mm512_loadu_si512((const void *)(qx + 32 * b));
            x = _mm512_shuffle_i64x2(x, x, _MM_SHUFFLE(3, 1, 2, 0));          /* [b0 lo, b1 lo, b0 hi, b1 hi] */
            const __m512i nc = _mm512_sub_epi32(_mm512_setzero_si512(),
                                                _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, x));
            for (int r = 0; r < 4; r++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + r * qstride + 16 * b));
                const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, low)),
                                                     _mm256_and_si256(_mm256_srli_epi16(raw, 4), low), 1);
                const __m512 s = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(
                    _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(sc[r] + b)))));
                acc5[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(nc, w, x)), s, acc5[r]);
            }
        }
        for (int r = 0; r < 4; r++)
            tot[r] = _mm512_reduce_add_ps(acc5[r]);
    }
#endif
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi8(8);
    const __m256i ones = _mm256_set1_epi16(1);
    for (; b < nb; b++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(qx + 32 * b));
        /* the lines at this offset 4 to 11 rows on, into L2 (T1: more misses in flight than L1's fill
         * buffers hold; 12-15% faster than T0 on the 2-core box, 2026-12-06) */
        if ((b & 3) == 0) {
            for (int r = 4; r < 12; r++)
                _mm_prefetch((const char *)(qs + r * qstride + 16 * b), _MM_HINT_T1);
            if ((b & 31) == 0)
                for (int r = 4; r < 12; r++)
                    _mm_prefetch((const char *)(dw + r * dstride + b), _MM_HINT_T1);
        }
        for (int r = 0; r < 4; r++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(qs + r * qstride + 16 * b));
            __m256i w = _mm256_sub_epi8(_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low),
                                                         _mm_and_si128(raw, low)), eight);   /* -8..7 */
            /* |w| (unsigned) times x carrying w's sign: pairs summed, |.| <= 2 * 8 * 127, no saturation */
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sc[r][b]), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        s = _mm_hadd_ps(s, s);
        s = _mm_hadd_ps(s, s);
        out[r] = tot[r] + _mm_cvtss_f32(s);
    }
#else
    for (int r = 0; r < 4; r++) {
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            const uint8_t *q = qs + r * qstride + 16 * b;
            const int8_t *x = qx + 32 * b;
            int32_t isum = 0;
            for (int j = 0; j < 16; j++)
                isum += ((int32_t)(q[j] & 0x0f) - 8) * x[j] + ((int32_t)(q[j] >> 4) - 8) * x[j + 16];
            acc += sc[r][b] * (float)isum;
        }
        out[r] = acc;
    }
#endif
}

/* The host's read rate through this library's compiler and OpenMP: the XOR of n 64-bit words of
 * buf, read by nthreads threads over static ranges (the XOR keeps the reads from being elided).
 * The roof the experts' rate is read against (benchmarks; engine.native.read_rate). */
uint64_t kvb_read_xor(const uint64_t *buf, long n, int nthreads) {
    uint64_t total = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(^ : total)
    for (long i = 0; i < n; i++)
        total ^= buf[i];
    return total;
}

int kvb_simd(void) {
#if KVB_AVX512_VNNI
    return 3;
#elif defined(__AVX2__)
    return 2;
#else
    return 0;
#endif
}

/* y [d] = sum_e wts[e] * down[ids[e]] @ (silu(gate[ids[e]] @ x) * (up[ids[e]] @ x)), x rounded to
 * 8-bit blocks, the k experts' gate/up rows in one parallel loop and the output rows in another */
int kvb_moe_q4_decode(const float *x, int d, int ff, int k, const int64_t *ids, const float *wts,
                      const uint8_t *gate_qs, const uint16_t *gate_d, const uint8_t *up_qs,
                      const uint16_t *up_d, const uint8_t *down_qs, const uint16_t *down_d,
                      float *y, int nthreads) {
    if (d % 32 || ff % 32 || k < 1)   /* d, ff multiples of 32: the 4-row blocks divide them too */
        return 1;
    const int nbd = d / 32, nbf = ff / 32;
    int8_t *qx = malloc((size_t)d + (size_t)k * ff);
    float *fl = malloc(sizeof(float) * ((size_t)nbd + (size_t)k * 2 * ff + (size_t)k * ff + (size_t)k * nbf));
    if (!qx || !fl) {
        free(qx), free(fl);
        return 2;
    }
    int8_t *qa = qx + d;
    float *dx = fl, *gu = dx + nbd, *a = gu + (size_t)k * 2 * ff, *da = a + (size_t)k * ff;
    const size_t grow = (size_t)d / 2, gsc = (size_t)nbd, drow = (size_t)ff / 2, dsc = (size_t)nbf;
    /* one parallel region, four phases with a barrier after each: x to 8-bit blocks; the k experts'
     * gate/up rows; SiLU(gate) * up to 8-bit blocks, a block at a time; the output rows (the two
     * middle phases ran on one thread until 2026-12-06: ~1/9 of a layer at 16 threads) */
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (long b = 0; b < nbd; b++)
            quantize_blocks(x + 32 * b, 32, qx + 32 * b, dx + b);
#pragma omp for schedule(static)
        for (long r4 = 0; r4 < (long)k * 2 * ff / 4; r4++) {
            const long r = 4 * r4, e = r / (2 * ff), j = r % (2 * ff);      /* 4 rows of one matrix: ff % 4 == 0 */
            const size_t row = (size_t)ids[e] * ff + (size_t)(j < ff ? j : j - ff);
            dot_rows4((j < ff ? gate_qs : up_qs) + row * grow, grow, (j < ff ? gate_d : up_d) + row * gsc, gsc,
                      qx, dx, nbd, gu + r);
        }
#pragma omp for schedule(static)
        for (long eb = 0; eb < (long)k * nbf; eb++) {
            const long e = eb / nbf, b = eb % nbf;
            const float *g = gu + (size_t)e * 2 * ff + 32 * b, *u = g + ff;
            float *ab = a + (size_t)e * ff + 32 * b;
            for (int j = 0; j < 32; j++)
                ab[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
            quantize_blocks(ab, 32, qa + (size_t)e * ff + 32 * b, da + (size_t)e * nbf + b);
        }
        /* each thread a contiguous range of output rows, expert by expert: one long stream of each
         * expert's down rows at a time (interleaving the k experts row by row starved the prefetchers) */
#ifdef _OPENMP
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
        const int nt = 1, t = 0;
#endif
        const long blocks = d / 4, per = (blocks + nt - 1) / nt;
        const long lo = 4 * (t * per < blocks ? t * per : blocks), hi = 4 * ((t + 1) * per < blocks ? (t + 1) * per : blocks);
        float part[4];
        for (long r = lo; r < hi; r++)
            y[r] = 0.0f;
        for (int e = 0; e < k; e++) {
            for (long r = lo; r < hi; r += 4) {
                const size_t row = (size_t)ids[e] * d + (size_t)r;
                dot_rows4(down_qs + row * drow, drow, down_d + row * dsc, dsc, qa + (size_t)e * ff,
                          da + (size_t)e * nbf, nbf, part);
                for (int i = 0; i < 4; i++)
                    y[r + i] += wts[e] * part[i];
            }
        }
    }
    free(qx), free(fl);
    return 0;
}

/* One host layer of a captured decode step, run by a CUDA host node (cuLaunchHostFunc): the
 * graph copies the token's row and routing into ``stage`` (page-locked: [d] row, [k] weights,
 * [k] expert ids as float32, the layout of engine.model.CpuExperts' stage), this function
 * computes the layer into ``out`` ([d], page-locked), and the graph copies ``out`` back. It must
 * make no CUDA call (a host node may not). An id outside 0..E-1 (never from a top-k) writes NaN
 * rows, so the step's logits show it, and sets ``rc``. */
typedef struct {
    const float *stage;
    float *out;
    int d, ff, k, E, nthreads, rc;
    const uint8_t *gate_qs, *up_qs, *down_qs;
    const uint16_t *gate_d, *up_d, *down_d;
    long long runs;
} kvb_job;

void kvb_run_job(void *p) {
    kvb_job *j = (kvb_job *)p;
    int64_t ids[64];
    int rc = j->k < 1 || j->k > 64;
    for (int e = 0; !rc && e < j->k; e++) {
        const float f = j->stage[j->d + j->k + e];
        rc = !(f >= 0.0f && f < (float)j->E);
        ids[e] = rc ? 0 : (int64_t)f;
    }
    if (!rc)
        rc = kvb_moe_q4_decode(j->stage, j->d, j->ff, j->k, ids, j->stage + j->d, j->gate_qs, j->gate_d,
                               j->up_qs, j->up_d, j->down_qs, j->down_d, j->out, j->nthreads);
    if (rc) {
        for (int r = 0; r < j->d; r++)
            j->out[r] = NAN;
        j->rc = rc;
    }
    j->runs++;
}
