// q8_0 decode attention, split part, in CUDA C++ (engine.kernels.cuda_q8 builds and launches it).
//
// Contract: the same partials as the Triton split kernels of engine/kernels/decode_attention.py,
// read by its combine kernel. Grid (Hkv, n_splits), 128 threads. Program (h, sp) attends query
// heads h*G .. h*G+G-1 to cache rows [sp*per, min(sp*per+per, n_keys)) of KV head h and writes,
// for each of those query heads hq, m_out[hq, sp] (the running max of the scores in log2 units,
// the scores being q.k * qk_scale with qk_scale = softmax scale * log2(e)), l_out[hq, sp] (the
// sum of 2^(s - m)) and acc_out[hq, sp, :] (the sum of 2^(s - m) v, unnormalised). A split with
// no key writes nothing (the combine reads only the splits that hold keys).
//
// Cache layout (engine/kernels/q8_layout.py): quants int8 [rows, Hkv, D] and fp16 scales
// [rows, Hkv, D/32], two arrays; value = quant * scale (exact in float32).
//
// Arithmetic: float32 on CUDA cores, no tensor cores. Each quant becomes an exact float32 by a
// byte permute and one subtraction (2^23 + 128 + q, minus 2^23 + 128); a block's 32-value dot is
// taken against the quants and multiplied by the block's scale once, so a score is the float32
// dot of q with the dequantized key up to summation order; p * v likewise, with p * (V scale)
// formed once a key and block. Tiles of 64 keys go through shared memory by cp.async, NSTAGE
// tiles in flight, so a program's loads overlap its arithmetic.
#include <cuda_fp16.h>
#include <stdint.h>

#define NT 128
#define TILE 64

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int n = valid ? 16 : 0;     // 0: the 16 bytes are zero-filled, nothing is read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}

template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem, bool valid) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int n = valid ? BYTES : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(gmem), "n"(BYTES), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// four int8 (one 32-bit word, little-endian) -> four exact float32
__device__ __forceinline__ void i8x4_to_f32(uint32_t w, float* f) {
    const uint32_t u = w ^ 0x80808080u;       // q + 128 in each byte
    f[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - 8388736.0f;
    f[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - 8388736.0f;
    f[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - 8388736.0f;
    f[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - 8388736.0f;
}

template <int G, int D, int NSTAGE>
struct Q8Geom {
    static constexpr int NB = D / 32;                 // scales a head row
    static constexpr int SB = NB * 2;                 // their bytes
    static constexpr int KS = D + 16;                 // K rows in shared memory: padded, so the 8 lanes
                                                      // of a 16-byte load phase hit distinct banks
    static constexpr int KQB = TILE * KS;             // K quant bytes of a tile
    static constexpr int VQB = TILE * D;              // V quant bytes of a tile
    static constexpr int STAGE = KQB + VQB + 2 * TILE * SB;
    static constexpr int VD = 8;                      // V phase: dims a thread
    static constexpr int DG = D / VD;                 //          dim groups
    static constexpr int KL = NT / DG;                //          key lanes
    static constexpr int KW = (NT / 32) / NB;         // K phase: a warp a 32-value block; key groups
    static constexpr int KPL = TILE / (32 * KW);      //          keys a lane
    static constexpr int RED = KL * G * D * 4;        // the key lanes' accumulators, summed at the end
    static constexpr int BASE = (NSTAGE * STAGE > RED ? NSTAGE * STAGE : RED);
    static constexpr int SMEM = BASE + 4 * (G * D + NB * G * TILE + G * TILE + 3 * G);
    static_assert(NB * KW == NT / 32 && KPL * 32 * KW == TILE, "K phase mapping");
};

template <int G, int D, int NSTAGE>
__device__ __forceinline__ void q8_decode(const float* __restrict__ q, const int8_t* __restrict__ kq,
                                          const __half* __restrict__ ks, const int8_t* __restrict__ vq,
                                          const __half* __restrict__ vs, float* __restrict__ m_out,
                                          float* __restrict__ l_out, float* __restrict__ acc_out,
                                          const void* __restrict__ pos, int pos64, int n_keys, int per, int n_splits,
                                          float qk_scale, int hkv) {
    using Geo = Q8Geom<G, D, NSTAGE>;
    constexpr int NB = Geo::NB, SB = Geo::SB, KS = Geo::KS, KQB = Geo::KQB, VQB = Geo::VQB, STAGE = Geo::STAGE;
    constexpr int VD = Geo::VD, DG = Geo::DG, KL = Geo::KL, KPL = Geo::KPL;
    extern __shared__ __align__(16) unsigned char smem[];
    float* sq = reinterpret_cast<float*>(smem + Geo::BASE);    // [G][D] q * qk_scale
    float* ss = sq + G * D;                                     // [NB][G][TILE] scores, a block's part
    float* sp = ss + NB * G * TILE;                             // [TILE][G] p
    float* sm = sp + TILE * G;                                  // [G] running max
    float* sl = sm + G;                                         // [G] running sum
    float* sa = sl + G;                                         // [G] this tile's rescale

    const int h = blockIdx.x, split = blockIdx.y, tid = threadIdx.x;
    if (pos != nullptr)    // the position on the device (a captured step): int64 or int32
        n_keys = (pos64 ? (int)*reinterpret_cast<const long long*>(pos) : *reinterpret_cast<const int*>(pos)) + 1;
    const int lo = split * per;
    if (lo >= n_keys) return;
    const int hi = min(lo + per, n_keys);
    const int n_tiles = (hi - lo + TILE - 1) / TILE;
    const long long qstride = (long long)hkv * D;      // bytes from a head's row to the next row's
    const long long sstride = (long long)hkv * NB;     // halfs

    for (int i = tid; i < G * D; i += NT) sq[i] = q[(long long)h * G * D + i] * qk_scale;
    if (tid < G) {
        sm[tid] = -INFINITY;
        sl[tid] = 0.0f;
    }

    auto issue = [&](int t) {
        unsigned char* st = smem + (t % NSTAGE) * STAGE;
        const int r0 = lo + t * TILE;
        constexpr int CH = D / 16;
#pragma unroll
        for (int c = tid; c < TILE * CH; c += NT) {
            const int j = c / CH, k = c % CH, r = r0 + j;
            const bool ok = r < hi;
            const long long rr = ok ? r : lo;
            cp_async16(st + j * KS + k * 16, kq + rr * qstride + h * D + k * 16, ok);
            cp_async16(st + KQB + j * D + k * 16, vq + rr * qstride + h * D + k * 16, ok);
        }
        if (tid < TILE) {
            const int r = r0 + tid;
            const bool ok = r < hi;
            const long long rr = ok ? r : lo;
            cp_async_ca<SB>(st + KQB + VQB + tid * SB, ks + rr * sstride + h * NB, ok);
            cp_async_ca<SB>(st + KQB + VQB + TILE * SB + tid * SB, vs + rr * sstride + h * NB, ok);
        }
    };
#pragma unroll
    for (int t = 0; t < NSTAGE - 1; ++t) {
        if (t < n_tiles) issue(t);
        cp_async_commit();
    }

    const int dg = tid % DG, kl = tid / DG;     // V phase
    const int wp = tid / 32, lane = tid % 32;
    const int kb = wp % NB, kg = wp / NB;       // K phase: this warp's block and key group
    float acc[G][VD];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < VD; ++i) acc[g][i] = 0.0f;

    for (int t = 0; t < n_tiles; ++t) {
        cp_async_wait<NSTAGE - 2>();
        __syncthreads();     // tile t landed for every thread; tile t-1's stage is free
        if (t + NSTAGE - 1 < n_tiles) issue(t + NSTAGE - 1);
        cp_async_commit();
        const unsigned char* st = smem + (t % NSTAGE) * STAGE;
        const int r0 = lo + t * TILE;

        // K: a lane's KPL keys against one 32-value block (this warp's): q read from shared memory is
        // the same address for every lane (a broadcast), each q value used for KPL keys; four quants
        // are widened at a time and used for every query head
        {
            uint32_t kw[KPL][8];
            float d[KPL], a[KPL][G];
#pragma unroll
            for (int u = 0; u < KPL; ++u) {
                const int j = (kg * KPL + u) * 32 + lane;
                const uint4 w0 = *reinterpret_cast<const uint4*>(st + j * KS + kb * 32);
                const uint4 w1 = *reinterpret_cast<const uint4*>(st + j * KS + kb * 32 + 16);
                kw[u][0] = w0.x; kw[u][1] = w0.y; kw[u][2] = w0.z; kw[u][3] = w0.w;
                kw[u][4] = w1.x; kw[u][5] = w1.y; kw[u][6] = w1.z; kw[u][7] = w1.w;
                d[u] = __half2float(reinterpret_cast<const __half*>(st + KQB + VQB + j * SB)[kb]);
#pragma unroll
                for (int g = 0; g < G; ++g) a[u][g] = 0.0f;
            }
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                float kf[KPL][4];
#pragma unroll
                for (int u = 0; u < KPL; ++u) i8x4_to_f32(kw[u][c], kf[u]);
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    const float4 x = reinterpret_cast<const float4*>(sq + g * D + kb * 32)[c];
#pragma unroll
                    for (int u = 0; u < KPL; ++u) {
                        a[u][g] = fmaf(x.x, kf[u][0], a[u][g]);
                        a[u][g] = fmaf(x.y, kf[u][1], a[u][g]);
                        a[u][g] = fmaf(x.z, kf[u][2], a[u][g]);
                        a[u][g] = fmaf(x.w, kf[u][3], a[u][g]);
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < G; ++g)
#pragma unroll
                for (int u = 0; u < KPL; ++u)
                    ss[(kb * G + g) * TILE + (kg * KPL + u) * 32 + lane] = a[u][g] * d[u];
        }
        __syncthreads();

        // softmax over the tile: warp w takes heads w, w + 4, ...; two keys a lane
        {
            for (int g = wp; g < G; g += NT / 32) {
                float a = 0.0f, b = 0.0f;
#pragma unroll
                for (int k = 0; k < NB; ++k) {
                    a += ss[(k * G + g) * TILE + lane];
                    b += ss[(k * G + g) * TILE + lane + 32];
                }
                if (r0 + lane >= hi) a = -INFINITY;
                if (r0 + lane + 32 >= hi) b = -INFINITY;
                const float m_old = sm[g];
                float mx = fmaxf(a, b);
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
                const float m_new = fmaxf(m_old, mx);
                const float pa = exp2f(a - m_new), pb = exp2f(b - m_new);
                sp[lane * G + g] = pa;
                sp[(lane + 32) * G + g] = pb;
                float sum = pa + pb;
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
                if (lane == 0) {
                    const float al = exp2f(m_old - m_new);
                    sa[g] = al;
                    sl[g] = sl[g] * al + sum;
                    sm[g] = m_new;
                }
            }
        }
        __syncthreads();

        // V: acc[g][dims] += p[g] * (V scale) * quants, KL key lanes, VD dims a thread
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float al = sa[g];
#pragma unroll
            for (int i = 0; i < VD; ++i) acc[g][i] *= al;
        }
#pragma unroll
        for (int j = kl; j < TILE; j += KL) {
            const uint2 w = *reinterpret_cast<const uint2*>(st + KQB + j * D + dg * VD);
            float vf[8];
            i8x4_to_f32(w.x, vf);
            i8x4_to_f32(w.y, vf + 4);
            const float dv = __half2float(
                reinterpret_cast<const __half*>(st + KQB + VQB + TILE * SB + j * SB)[(dg * VD) / 32]);
            float pj[G];
            if constexpr (G % 4 == 0) {      // a key's G values of p as 16-byte loads
#pragma unroll
                for (int g = 0; g < G; g += 4) {
                    const float4 x = reinterpret_cast<const float4*>(sp + j * G)[g / 4];
                    pj[g] = x.x; pj[g + 1] = x.y; pj[g + 2] = x.z; pj[g + 3] = x.w;
                }
            } else {
#pragma unroll
                for (int g = 0; g < G; ++g) pj[g] = sp[j * G + g];
            }
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const float pv = pj[g] * dv;
#pragma unroll
                for (int i = 0; i < VD; ++i) acc[g][i] = fmaf(pv, vf[i], acc[g][i]);
            }
        }
    }

    // the key lanes' accumulators summed through shared memory (the stages are free now)
    cp_async_wait<0>();
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem);      // [KL][G][D]
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < VD; ++i) red[(kl * G + g) * D + dg * VD + i] = acc[g][i];
    __syncthreads();
    for (int x = tid; x < G * D; x += NT) {
        const int g = x / D, d = x % D;
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < KL; ++k) s += red[(k * G + g) * D + d];
        acc_out[((long long)(h * G + g) * n_splits + split) * D + d] = s;
    }
    if (tid < G) {
        m_out[(long long)(h * G + tid) * n_splits + split] = sm[tid];
        l_out[(long long)(h * G + tid) * n_splits + split] = sl[tid];
    }
}

#define Q8_ARGS                                                                                         \
    const float *q, const int8_t *kq, const __half *ks, const int8_t *vq, const __half *vs, float *m_out, \
        float *l_out, float *acc_out, const void *pos, int pos64, int n_keys, int per, int n_splits, float qk_scale, int hkv
#define Q8_PASS q, kq, ks, vq, vs, m_out, l_out, acc_out, pos, pos64, n_keys, per, n_splits, qk_scale, hkv

// One entry point a (G, D): kvbench_q8_decode_g<G>_d<D>; shared bytes: kvbench_q8_smem_g<G>_d<D>.
#define Q8_KERNEL(G, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(NT) kvbench_q8_decode_g##G##_d##D(Q8_ARGS) {         \
        q8_decode<G, D, 3>(Q8_PASS);                                                                 \
    }                                                                                                \
    extern "C" __device__ int kvbench_q8_smem_g##G##_d##D = Q8Geom<G, D, 3>::SMEM;

Q8_KERNEL(1, 64)
Q8_KERNEL(2, 64)
Q8_KERNEL(3, 64)
Q8_KERNEL(4, 64)
Q8_KERNEL(8, 64)
Q8_KERNEL(1, 128)
Q8_KERNEL(2, 128)
Q8_KERNEL(3, 128)
Q8_KERNEL(4, 128)
Q8_KERNEL(8, 128)
