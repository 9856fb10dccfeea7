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
// pdl: 0 a plain launch; 1 programmatic dependent launch, the kernel waiting for the grid before it
// (griddepcontrol.wait) before any load or store; 2 the same, but the loads of the first tiles in flight
// (cache rows before the newest key, row n_keys - 1) go out before the wait (PDL_EARLY). That is exact when
// the grid launched just before writes neither the position, nor n_keys' source, nor any cache row before
// the newest key: in a decode step it is the K/V append of row n_keys - 1 (with RoPE: and q), and in
// bench_attention's layered graph the previous launch's combine. Nothing is stored before the wait.
//
// Cache layout (engine/kernels/q8_layout.py): quants int8 [rows, Hkv, D] and fp16 scales
// [rows, Hkv, D/32], two arrays; value = quant * scale (exact in float32).
//
// Arithmetic: mma.sync m16n8k16 tensor-core dots (float16 operands, float32 accumulation) over
// exact float16 quants; a block's 32-value dot is taken against the quants and multiplied by the
// block's scale once, so a score is q.k of the dequantized key to ~2^-22 relative (q in two float16
// terms); p * v likewise, with p * (V scale) formed once a key and block, in two terms. Tiles of 64
// keys go through shared memory by cp.async, NSTAGE tiles in flight (entry points for 2, 3 and 4),
// so a program's loads overlap its arithmetic. An earlier form on float32 FMAs (q8_impl "cuda") was
// issue-bound at ~1600 warp instructions a tile (reports/h100-2026-12-07g: level with the Triton rows
// kernel) and was removed after this one measured 1.2x faster (reports/h100-2026-12-07h); commit
// 3850518 has it.
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

// Programmatic dependent launch: wait until the grid launched before this one has finished and its writes
// are visible, then let the next grid be scheduled (it waits the same way before it reads what this one
// writes). The launcher asks for PDL only on sm_90+ (griddepcontrol is sm_90 PTX).
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }


// One tile's loads into a stage: K quant rows at a stride of KS bytes, then V quant rows
// at VS, then the K and V scales (SB bytes a key each). Rows past hi are zero-filled (nothing read).
template <int D, int KS, int VS>
__device__ __forceinline__ void issue_tile(unsigned char* st, int r0, int lo, int hi, int h, long long qstride,
                                           long long sstride, const int8_t* kq, const __half* ks,
                                           const int8_t* vq, const __half* vs, int tid) {
    constexpr int NB = D / 32, SB = NB * 2, KQB = TILE * KS, VQB = TILE * VS, CH = D / 16;
#pragma unroll
    for (int c = tid; c < TILE * CH; c += NT) {
        const int j = c / CH, k = c % CH, r = r0 + j;
        const bool ok = r < hi;
        const long long rr = ok ? r : lo;
        cp_async16(st + j * KS + k * 16, kq + rr * qstride + h * D + k * 16, ok);
        cp_async16(st + KQB + j * VS + k * 16, vq + rr * qstride + h * D + k * 16, ok);
    }
    if (tid < TILE) {
        const int r = r0 + tid;
        const bool ok = r < hi;
        const long long rr = ok ? r : lo;
        cp_async_ca<SB>(st + KQB + VQB + tid * SB, ks + rr * sstride + h * NB, ok);
        cp_async_ca<SB>(st + KQB + VQB + TILE * SB + tid * SB, vs + rr * sstride + h * NB, ok);
    }
}

// One query head's online softmax over a tile, a warp: a and b are the scores of keys lane and
// lane + 32 (log2 units); writes their p to *pa / *pb and, lane 0, the head's rescale, sum and max.
__device__ __forceinline__ void softmax_tile(float a, float b, int g, int r0, int hi, int lane, float* sm,
                                             float* sl, float* sa, float* pa, float* pb) {
    if (r0 + lane >= hi) a = -INFINITY;
    if (r0 + lane + 32 >= hi) b = -INFINITY;
    const float m_old = sm[g];
    float mx = fmaxf(a, b);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float m_new = fmaxf(m_old, mx);
    const float ea = exp2f(a - m_new), eb = exp2f(b - m_new);
    *pa = ea;
    *pb = eb;
    float sum = ea + eb;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
        const float al = exp2f(m_old - m_new);
        sa[g] = al;
        sl[g] = sl[g] * al + sum;
        sm[g] = m_new;
    }
}

// ---------------------------------------------------------------------------------------------------
// The kernel (q8_impl "cuda_mma"): the dots on mma.sync m16n8k16 (float16 operands, float32
// accumulation), ~430 warp instructions a 64-key tile a warp at G 8.
// Each quant is an exact float16 (a byte permute into 0x64xx = 1152 + q, one half2 subtraction for
// two). q * qk_scale is normalised per (query head, block) by a power of two (|x| <= 2^13) and split
// into two float16 terms, x = hi + lo (~2^-22 relative), both against the same quants, as the Triton
// rows kernel does; p * (V scale) likewise per (block, tile), normalised by the tile's largest V scale.
//   K phase: warp w takes keys 16w..16w+15 (M) of the tile, all G <= 8 query heads (N, zero-padded),
//            head_dim in k-steps of 16 (two a 32-value block); a block's partial scores times its
//            scale and q's norm are summed into the score (fragment C, float32).
//   V phase: warp w takes D/4 dims (M, one block's), keys in k-steps of 16 (K), the heads (N):
//            out^T[dim, head] += v^T[dim, key] * (p[head, key] * dv[key, block] / pn) * pn.
// Within a k-step the order of the 16 summed indices is free (A and B permuted alike): a thread's
// A values are then whole 32-bit words of shared memory.
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// four int8 (one 32-bit word) -> two half2, exact: lo = (q0, q1), hi = (q2, q3)
__device__ __forceinline__ void i8x4_to_h2(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const uint32_t u = w ^ 0x80808080u;                     // q + 128 in each byte
    uint32_t a = __byte_perm(u, 0x64646464u, 0x4140);       // (0x64, q0 + 128), (0x64, q1 + 128)
    uint32_t b = __byte_perm(u, 0x64646464u, 0x4342);
    const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));   // 1152
    __half2 ha = __hsub2(*reinterpret_cast<__half2*>(&a), bias);
    __half2 hb = __hsub2(*reinterpret_cast<__half2*>(&b), bias);
    lo = *reinterpret_cast<uint32_t*>(&ha);
    hi = *reinterpret_cast<uint32_t*>(&hb);
}

// the smallest power of two >= x (x a positive normal float)
__device__ __forceinline__ float pow2_at_least(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x007fffffu) ? __uint_as_float((b & 0x7f800000u) + 0x00800000u) : x;
}

// x0, x1 -> float16 hi + lo terms, as half2 (x0 in the low half)
__device__ __forceinline__ void split_h2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
    __half2 h = __floats2half2_rn(x0, x1);
    __half2 l = __floats2half2_rn(x0 - __low2float(h), x1 - __high2float(h));
    hi = *reinterpret_cast<uint32_t*>(&h);
    lo = *reinterpret_cast<uint32_t*>(&l);
}

template <int G, int D, int NSTAGE>
struct Q8MmaGeom {
    static constexpr int NB = D / 32;
    static constexpr int SB = NB * 2;
    static constexpr int KS = D + 32;                 // K rows: a 16-lane phase of 8-byte loads (4 rows x
                                                      // 32 bytes) on distinct banks
    static constexpr int VS = D + 16;                 // V rows: the 4 keys of a load on distinct banks
    static constexpr int KQB = TILE * KS;
    static constexpr int VQB = TILE * VS;
    static constexpr int STAGE = KQB + VQB + 2 * TILE * SB;
    static constexpr int DW = D / 4;                  // V phase: dims a warp
    static constexpr int MT = DW / 16;                //          its 16-dim M tiles (1 or 2)
    static constexpr int SMEM = NSTAGE * STAGE + 4 * (2 * 8 * TILE + NB * TILE + 3 * 8 + NB);
    static_assert(G <= 8 && (D == 64 || D == 128), "mma form: G <= 8, head_dim 64 or 128");
};

// PACK (G <= 4): the N columns hold both float16 terms, 0-3 the heads' hi terms and 4-7 their lo terms, so
// each k-step is one mma instead of two; the two columns of a head are summed (a shuffle, lane ^ 2) once a
// tile for the scores and once at the end for the output, both sums being linear in them.
// WSM (warp softmax): each warp's 16 keys of a tile are their own online-softmax stream (its max and sum
// across the warp's lanes, no scores through shared memory, one barrier a tile fewer); the V phase keeps
// one accumulator a stream (k-step kst is stream kst) and the streams are merged once at the end.
template <int G, int D, int NSTAGE, bool PACK, bool WSM = false>
__device__ __forceinline__ void q8_decode_mma(const float* __restrict__ q, const int8_t* __restrict__ kq,
                                              const __half* __restrict__ ks, const int8_t* __restrict__ vq,
                                              const __half* __restrict__ vs, float* __restrict__ m_out,
                                              float* __restrict__ l_out, float* __restrict__ acc_out,
                                              const void* __restrict__ pos, int pos64, int n_keys, int per,
                                              int n_splits, float qk_scale, int hkv, int pdl) {
    static_assert(!PACK || G <= 4, "packed terms: G <= 4");
    using Geo = Q8MmaGeom<G, D, NSTAGE>;
    constexpr int NB = Geo::NB, SB = Geo::SB, KS = Geo::KS, VS = Geo::VS, KQB = Geo::KQB, VQB = Geo::VQB;
    constexpr int STAGE = Geo::STAGE, DW = Geo::DW, MT = Geo::MT;
    extern __shared__ __align__(16) unsigned char smem[];
    float* ss = reinterpret_cast<float*>(smem + NSTAGE * STAGE);   // [8][TILE] scores
    float* sp = ss + 8 * TILE;                                      // [8][TILE] p
    float* dvn = sp + 8 * TILE;                                     // [NB][TILE] V scale / pn
    float* sm = dvn + NB * TILE;                                    // [8] running max
    float* sl = sm + 8;                                             // [8] running sum
    float* sa = sl + 8;                                             // [8] this tile's rescale
    float* pns = sa + 8;                                            // [NB] this tile's pn
    float* sal = ss;                                                // WSM: [4][8] the streams' rescales
    float* swm = ss + 32;                                           //      [4][8] their maxima (at the end)
    float* swl = ss + 64;                                           //      [4][8] their sums (at the end)
    constexpr int NS = WSM ? 4 : 1;                                 // accumulators (streams)

    const int h = blockIdx.x, split = blockIdx.y, tid = threadIdx.x;
    if (pdl == 1)   // programmatic dependent launch: wait for the grid before (and its writes), then let the
        pdl_wait(); // next one (the combine, which waits the same way) be scheduled; before any load or store
    if (pos != nullptr)
        n_keys = (pos64 ? (int)*reinterpret_cast<const long long*>(pos) : *reinterpret_cast<const int*>(pos)) + 1;
    const int lo = split * per;
    if (lo >= n_keys) return;
    const int hi = min(lo + per, n_keys);
    const int n_tiles = (hi - lo + TILE - 1) / TILE;
    const long long qstride = (long long)hkv * D;
    const long long sstride = (long long)hkv * NB;
    const int wp = tid / 32, lane = tid % 32, gid = lane / 4, tig = lane % 4;
    const int head = PACK ? (gid & 3) : gid;    // the query head of this thread's B column gid
    const bool lo_col = PACK && gid >= 4;       // PACK: the column holds that head's lo term

    if (tid < 8) {
        sm[tid] = -INFINITY;
        sl[tid] = 0.0f;
        sa[tid] = 0.0f;
    }
    for (int i = tid; i < 8 * TILE; i += NT) sp[i] = 0.0f;      // heads >= G stay 0

    auto issue = [&](int t) {
        issue_tile<D, KS, VS>(smem + (t % NSTAGE) * STAGE, lo + t * TILE, lo, hi, h, qstride, sstride, kq, ks, vq, vs, tid);
    };
    int t0 = 0;
    if (pdl == 2) {     // early (PDL_EARLY): the first tiles' loads go out before the wait, up to the tile that
                        // holds the newest key (row n_keys - 1), which the grid before may be writing; rows
                        // before it, the position and n_keys were written before that grid began (see PDL_EARLY)
        for (; t0 < NSTAGE - 1 && t0 < n_tiles && lo + (t0 + 1) * TILE < n_keys; ++t0) {
            issue(t0);
            cp_async_commit();
        }
        pdl_wait();
    }
    for (int t = t0; t < NSTAGE - 1; ++t) {
        if (t < n_tiles) issue(t);
        cp_async_commit();
    }

    // q as B fragments, once: k-step (b, e) of block b takes this thread's dims 32b + 8tig + 4e + {0,1}
    // (b0) and {2,3} (b1), column gid = query head gid (PACK: gid & 3, the lo term from gid 4);
    // normalised per (head, block), two terms
    uint32_t qh[NB][2][2], ql[NB][2][2];
    float qc0[NB], qc1[NB];         // the norms of the heads of this thread's C columns, 2tig and 2tig + 1
#pragma unroll
    for (int b = 0; b < NB; ++b) {
        float x[8];
        if (head < G) {
            const float4* src = reinterpret_cast<const float4*>(q + (long long)(h * G + head) * D + 32 * b + 8 * tig);
            const float4 u = src[0], v = src[1];
            x[0] = u.x; x[1] = u.y; x[2] = u.z; x[3] = u.w; x[4] = v.x; x[5] = v.y; x[6] = v.z; x[7] = v.w;
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) x[i] = 0.0f;
        }
        float mx = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            x[i] *= qk_scale;
            mx = fmaxf(mx, fabsf(x[i]));
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float qn = pow2_at_least(fmaxf(mx, 1e-30f)) * (1.0f / 8192.0f);
        const float inv = 1.0f / qn;        // a power of two: exact
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            split_h2(x[4 * e] * inv, x[4 * e + 1] * inv, qh[b][e][0], ql[b][e][0]);
            split_h2(x[4 * e + 2] * inv, x[4 * e + 3] * inv, qh[b][e][1], ql[b][e][1]);
            if (lo_col) {           // PACK: this column's term is the lo one
                qh[b][e][0] = ql[b][e][0];
                qh[b][e][1] = ql[b][e][1];
            }
        }
        qc0[b] = __shfl_sync(0xffffffffu, qn, (2 * tig) * 4);
        qc1[b] = __shfl_sync(0xffffffffu, qn, (2 * tig + 1) * 4);
    }

    const int w0 = wp * DW;                 // V phase: this warp's dims
    const int vb = w0 / 32;                 //          their block
    float acc[NS][MT][4];
#pragma unroll
    for (int w = 0; w < NS; ++w)
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[w][t][i] = 0.0f;
    // WSM: this thread's stream state (the stream of warp wp) for its C columns 2tig, 2tig + 1
    float wm0 = -INFINITY, wm1 = -INFINITY, wl0 = 0.0f, wl1 = 0.0f;

    for (int t = 0; t < n_tiles; ++t) {
        cp_async_wait<NSTAGE - 2>();
        __syncthreads();
        if (t + NSTAGE - 1 < n_tiles) issue(t + NSTAGE - 1);
        cp_async_commit();
        const unsigned char* st = smem + (t % NSTAGE) * STAGE;
        const int r0 = lo + t * TILE;

        // K: scores of keys 16wp + gid (c0, c1) and 16wp + gid + 8 (c2, c3), heads 2tig, 2tig + 1
        {
            const int ra = 16 * wp + gid, rb = ra + 8;
            const __half* ksa = reinterpret_cast<const __half*>(st + KQB + VQB + ra * SB);
            const __half* ksb = reinterpret_cast<const __half*>(st + KQB + VQB + rb * SB);
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                const uint2 wa = *reinterpret_cast<const uint2*>(st + ra * KS + 32 * b + 8 * tig);
                const uint2 wb = *reinterpret_cast<const uint2*>(st + rb * KS + 32 * b + 8 * tig);
                uint32_t a[4];
                float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                i8x4_to_h2(wa.x, a[0], a[2]);
                i8x4_to_h2(wb.x, a[1], a[3]);
                mma16816(c, a, qh[b][0][0], qh[b][0][1]);
                if constexpr (!PACK) mma16816(c, a, ql[b][0][0], ql[b][0][1]);
                i8x4_to_h2(wa.y, a[0], a[2]);
                i8x4_to_h2(wb.y, a[1], a[3]);
                mma16816(c, a, qh[b][1][0], qh[b][1][1]);
                if constexpr (!PACK) mma16816(c, a, ql[b][1][0], ql[b][1][1]);
                const float da = __half2float(ksa[b]), db = __half2float(ksb[b]);
                s[0] = fmaf(c[0], da * qc0[b], s[0]);
                s[1] = fmaf(c[1], da * qc1[b], s[1]);
                s[2] = fmaf(c[2], db * qc0[b], s[2]);
                s[3] = fmaf(c[3], db * qc1[b], s[3]);
            }
            if constexpr (PACK) {   // hi column 2tig (+1) plus lo column 2tig + 4 (+5): lanes tig and tig ^ 2
#pragma unroll
                for (int i = 0; i < 4; ++i) s[i] += __shfl_xor_sync(0xffffffffu, s[i], 2);
            }
            const int g0 = 2 * tig, g1 = g0 + 1;       // (PACK: tig 2, 3 hold the lo columns, g0 >= 4 >= G)
            if constexpr (WSM) {    // this warp's stream: max over its 16 keys (lanes of one tig), p, rescale
                const bool oka = r0 + ra < hi, okb = r0 + rb < hi;
                const float x0 = oka ? s[0] : -INFINITY, x1 = oka ? s[1] : -INFINITY;
                const float x2 = okb ? s[2] : -INFINITY, x3 = okb ? s[3] : -INFINITY;
                float mx0 = fmaxf(x0, x2), mx1 = fmaxf(x1, x3);
#pragma unroll
                for (int off = 4; off < 32; off <<= 1) {
                    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
                }
                const float mn0 = fmaxf(wm0, mx0), mn1 = fmaxf(wm1, mx1);
                const float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;
                const float al0 = exp2f(wm0 - mu0), al1 = exp2f(wm1 - mu1);
                const float p0 = exp2f(x0 - mu0), p1 = exp2f(x1 - mu1), p2 = exp2f(x2 - mu0), p3 = exp2f(x3 - mu1);
                wl0 = fmaf(wl0, al0, p0 + p2);
                wl1 = fmaf(wl1, al1, p1 + p3);
                wm0 = mn0;
                wm1 = mn1;
                if (g0 < G) {
                    sp[g0 * TILE + ra] = p0;
                    sp[g0 * TILE + rb] = p2;
                }
                if (g1 < G) {
                    sp[g1 * TILE + ra] = p1;
                    sp[g1 * TILE + rb] = p3;
                }
                if (gid == 0) {     // by column: the V phase's thread of this tig reads its own columns
                    sal[wp * 8 + g0] = al0;
                    sal[wp * 8 + g1] = al1;
                }
            } else {
                if (g0 < G) {
                    ss[g0 * TILE + ra] = s[0];
                    ss[g0 * TILE + rb] = s[2];
                }
                if (g1 < G) {
                    ss[g1 * TILE + ra] = s[1];
                    ss[g1 * TILE + rb] = s[3];
                }
            }
        }
        if constexpr (!WSM) __syncthreads();

        // softmax over the tile (warp w: heads w, w + 4; WSM: done above), and warp b < NB: block b's V
        // scales / pn
        {
            if constexpr (!WSM)
                for (int g = wp; g < G; g += NT / 32)
                    softmax_tile(ss[g * TILE + lane], ss[g * TILE + lane + 32], g, r0, hi, lane, sm, sl, sa,
                                 &sp[g * TILE + lane], &sp[g * TILE + lane + 32]);
            if (wp < NB) {
                const __half* vsc = reinterpret_cast<const __half*>(st + KQB + VQB + TILE * SB);
                const float da = __half2float(vsc[lane * NB + wp]), db = __half2float(vsc[(lane + 32) * NB + wp]);
                float mx = fmaxf(fabsf(da), fabsf(db));
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
                const float pn = pow2_at_least(fmaxf(mx, 1e-30f)) * (1.0f / 8192.0f);
                const float inv = 1.0f / pn;
                dvn[wp * TILE + lane] = da * inv;
                dvn[wp * TILE + lane + 32] = db * inv;
                if (lane == 0) pns[wp] = pn;
            }
        }
        __syncthreads();

        // V: warp's dims w0 + gid * 2MT + j (j = 2 * mtile + row half), keys in k-steps of 16
        {
            float c[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < 4; ++i) c[mt][i] = 0.0f;
            const unsigned char* vt = st + KQB + w0 + gid * 2 * MT;
            const float* pg = sp + head * TILE;
            const float* dq = dvn + vb * TILE;
            const float pn = pns[vb];
#pragma unroll
            for (int kst = 0; kst < TILE / 16; ++kst) {
                const int ka = 16 * kst + 2 * tig, kb = ka + 8;
                uint32_t wa0, wa1, wb0, wb1;
                if constexpr (MT == 2) {
                    wa0 = *reinterpret_cast<const uint32_t*>(vt + ka * VS);
                    wa1 = *reinterpret_cast<const uint32_t*>(vt + (ka + 1) * VS);
                    wb0 = *reinterpret_cast<const uint32_t*>(vt + kb * VS);
                    wb1 = *reinterpret_cast<const uint32_t*>(vt + (kb + 1) * VS);
                } else {
                    wa0 = *reinterpret_cast<const uint16_t*>(vt + ka * VS);
                    wa1 = *reinterpret_cast<const uint16_t*>(vt + (ka + 1) * VS);
                    wb0 = *reinterpret_cast<const uint16_t*>(vt + kb * VS);
                    wb1 = *reinterpret_cast<const uint16_t*>(vt + (kb + 1) * VS);
                }
                // (key, key + 1) pairs of each dim j: j 0, 1 from t0, j 2, 3 from t1
                uint32_t aA[4], aB[4];
                i8x4_to_h2(__byte_perm(wa0, wa1, 0x5140), aA[0], aA[1]);
                i8x4_to_h2(__byte_perm(wb0, wb1, 0x5140), aB[0], aB[1]);
                if constexpr (MT == 2) {
                    i8x4_to_h2(__byte_perm(wa0, wa1, 0x7362), aA[2], aA[3]);
                    i8x4_to_h2(__byte_perm(wb0, wb1, 0x7362), aB[2], aB[3]);
                }
                const float2 pa = *reinterpret_cast<const float2*>(pg + ka);
                const float2 pb = *reinterpret_cast<const float2*>(pg + kb);
                const float2 da = *reinterpret_cast<const float2*>(dq + ka);
                const float2 db = *reinterpret_cast<const float2*>(dq + kb);
                uint32_t bh0, bl0, bh1, bl1;
                split_h2(pa.x * da.x, pa.y * da.y, bh0, bl0);
                split_h2(pb.x * db.x, pb.y * db.y, bh1, bl1);
                if (lo_col) {       // PACK: this column's term is the lo one
                    bh0 = bl0;
                    bh1 = bl1;
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const uint32_t a[4] = {aA[2 * mt], aA[2 * mt + 1], aB[2 * mt], aB[2 * mt + 1]};
                    mma16816(c[mt], a, bh0, bh1);
                    if constexpr (!PACK) mma16816(c[mt], a, bl0, bl1);
                }
                if constexpr (WSM) {    // k-step kst is stream kst: its rescale, then a fresh C
                    const float al0 = sal[kst * 8 + 2 * tig], al1 = sal[kst * 8 + 2 * tig + 1];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        acc[kst][mt][0] = fmaf(c[mt][0], pn, acc[kst][mt][0] * al0);
                        acc[kst][mt][1] = fmaf(c[mt][1], pn, acc[kst][mt][1] * al1);
                        acc[kst][mt][2] = fmaf(c[mt][2], pn, acc[kst][mt][2] * al0);
                        acc[kst][mt][3] = fmaf(c[mt][3], pn, acc[kst][mt][3] * al1);
#pragma unroll
                        for (int i = 0; i < 4; ++i) c[mt][i] = 0.0f;
                    }
                }
            }
            if constexpr (!WSM) {
                const float al0 = sa[(2 * tig) & (PACK ? 3 : 7)], al1 = sa[(2 * tig + 1) & (PACK ? 3 : 7)];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    acc[0][mt][0] = fmaf(c[mt][0], pn, acc[0][mt][0] * al0);
                    acc[0][mt][1] = fmaf(c[mt][1], pn, acc[0][mt][1] * al1);
                    acc[0][mt][2] = fmaf(c[mt][2], pn, acc[0][mt][2] * al0);
                    acc[0][mt][3] = fmaf(c[mt][3], pn, acc[0][mt][3] * al1);
                }
            }
        }
    }
    cp_async_wait<0>();
    if constexpr (WSM) {    // merge the 4 streams: each one's sum over its lanes, then its weight 2^(m_w - M)
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
            wl0 += __shfl_xor_sync(0xffffffffu, wl0, off);
            wl1 += __shfl_xor_sync(0xffffffffu, wl1, off);
        }
        if (gid == 0) {
            swm[wp * 8 + 2 * tig] = wm0;
            swm[wp * 8 + 2 * tig + 1] = wm1;
            swl[wp * 8 + 2 * tig] = wl0;
            swl[wp * 8 + 2 * tig + 1] = wl1;
        }
        __syncthreads();
        float f[2][4];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int col = 2 * tig + e;
            float mx = -INFINITY;
#pragma unroll
            for (int w = 0; w < 4; ++w) mx = fmaxf(mx, swm[w * 8 + col]);
            const float mu = mx == -INFINITY ? 0.0f : mx;
#pragma unroll
            for (int w = 0; w < 4; ++w) f[e][w] = exp2f(swm[w * 8 + col] - mu);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float x = acc[0][mt][i] * f[i & 1][0];
#pragma unroll
                for (int w = 1; w < NS; ++w) x = fmaf(acc[w][mt][i], f[i & 1][w], x);
                acc[0][mt][i] = x;
            }
        if (tid < G) {      // column tid is head tid's (PACK: its hi column)
            float mx = -INFINITY, l = 0.0f;
#pragma unroll
            for (int w = 0; w < 4; ++w) mx = fmaxf(mx, swm[w * 8 + tid]);
            const float mu = mx == -INFINITY ? 0.0f : mx;
#pragma unroll
            for (int w = 0; w < 4; ++w) l = fmaf(swl[w * 8 + tid], exp2f(swm[w * 8 + tid] - mu), l);
            sm[tid] = mx;
            sl[tid] = l;
        }
        __syncthreads();
    }
    if constexpr (PACK) {   // each head's hi and lo columns: lanes tig and tig ^ 2 (the writes below take tig 0, 1)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[0][mt][i] += __shfl_xor_sync(0xffffffffu, acc[0][mt][i], 2);
    }

    // C rows: dim w0 + gid * 2MT + 2mt (c0, c1) and + 1 (c2, c3); columns: heads 2tig, 2tig + 1
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int d0 = w0 + gid * 2 * MT + 2 * mt;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int g = 2 * tig + e;
            if (g < G) {
                float* o = acc_out + ((long long)(h * G + g) * n_splits + split) * D;
                o[d0] = acc[0][mt][e];
                o[d0 + 1] = acc[0][mt][2 + e];
            }
        }
    }
    if (tid < G) {
        m_out[(long long)(h * G + tid) * n_splits + split] = sm[tid];
        l_out[(long long)(h * G + tid) * n_splits + split] = sl[tid];
    }
}

#define Q8_ARGS                                                                                         \
    const float *q, const int8_t *kq, const __half *ks, const int8_t *vq, const __half *vs, float *m_out, \
        float *l_out, float *acc_out, const void *pos, int pos64, int n_keys, int per, int n_splits, float qk_scale, int hkv, \
        int pdl
#define Q8_PASS q, kq, ks, vq, vs, m_out, l_out, acc_out, pos, pos64, n_keys, per, n_splits, qk_scale, hkv, pdl

// Entry points kvbench_q8_mma_g<G>_d<D>_s<NSTAGE>, shared bytes kvbench_q8_mma_smem_g<G>_d<D>_s<NSTAGE>;
// for G <= 4 the packed-terms form too, at 3 stages: kvbench_q8_mmap_g<G>_d<D>_s3 (the same shared bytes).
#define Q8_KERNEL_S(G, D, S)                                                                         \
    extern "C" __global__ void __launch_bounds__(NT) kvbench_q8_mma_g##G##_d##D##_s##S(Q8_ARGS) {     \
        q8_decode_mma<G, D, S, false>(Q8_PASS);                                                      \
    }                                                                                                \
    extern "C" __device__ int kvbench_q8_mma_smem_g##G##_d##D##_s##S = Q8MmaGeom<G, D, S>::SMEM;
#define Q8_KERNEL_P(G, D, S)                                                                         \
    extern "C" __global__ void __launch_bounds__(NT) kvbench_q8_mmap_g##G##_d##D##_s##S(Q8_ARGS) {    \
        q8_decode_mma<G, D, S, true>(Q8_PASS);                                                       \
    }
// the warp-softmax form (WSM) at 3 stages, at the geometries measured (SmolLM2 3 x 64; the bench
// geometry 4 x 128; coder30b 8 x 128): kvbench_q8_mmaw_g<G>_d<D>_s3, packed kvbench_q8_mmapw_...
#define Q8_KERNEL_W(G, D, PK, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(NT) NAME(Q8_ARGS) {                                  \
        q8_decode_mma<G, D, 3, PK, true>(Q8_PASS);                                                   \
    }
#define Q8_KERNEL(G, D) Q8_KERNEL_S(G, D, 2) Q8_KERNEL_S(G, D, 3) Q8_KERNEL_S(G, D, 4)
#define Q8_KERNEL_PACKED(G, D) Q8_KERNEL_P(G, D, 3)

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
Q8_KERNEL_PACKED(1, 64)
Q8_KERNEL_PACKED(2, 64)
Q8_KERNEL_PACKED(3, 64)
Q8_KERNEL_PACKED(4, 64)
Q8_KERNEL_PACKED(1, 128)
Q8_KERNEL_PACKED(2, 128)
Q8_KERNEL_PACKED(3, 128)
Q8_KERNEL_PACKED(4, 128)
Q8_KERNEL_W(3, 64, false, kvbench_q8_mmaw_g3_d64_s3)
Q8_KERNEL_W(4, 128, false, kvbench_q8_mmaw_g4_d128_s3)
Q8_KERNEL_W(8, 128, false, kvbench_q8_mmaw_g8_d128_s3)
Q8_KERNEL_W(3, 64, true, kvbench_q8_mmapw_g3_d64_s3)
Q8_KERNEL_W(4, 128, true, kvbench_q8_mmapw_g4_d128_s3)
