// The skinny tensor-core GEMM template (skinny.rs explains the fragment trick), instantiated
// by skinny.cu and skinny_tuning.cu. Compiled after prelude.cuh.

#define SK_WARPS 8
#define EPI_STORE 0
#define EPI_ADD 1
#define EPI_SILU 2
#define EPI_ROPE 3

// What the RoPE epilogue needs (decode steps; see rope_kv_write in the core kernels, whose work
// it does): cos/sin [max_pos, hd/2] f32, a position and a cache slot per token, the paged
// caches [num_slots, nkv * hd] elem_t, and the head layout of W's rows (q, k, v heads).
struct RopeArgs {
    const float* cos;
    const float* sin;
    const u32* positions;
    const u32* slots;
    elem_t* k_cache;
    elem_t* v_cache;
    int nh, nkv, hd;
};

// The RMSNorm between a residual add and the next GEMM, split across both (decode steps of up
// to 8 tokens): the add's epilogue writes out = h * gamma (elem_t, not yet scaled) and adds each
// token's sum of squares into out_ss; the next GEMM reads out as its x and scales its dot
// products by 1/rms = rsqrt(in_ss / K + eps) before the bias, the norm being linear in x. The
// 16-bit rounding then comes before the scale rather than after it: the same relative error in
// bf16; in f16 h * gamma could overflow or go subnormal, so the engine splits only bf16 norms.
// Every block adds its part of a token's sum of squares atomically: 1/rms, and so the step, is
// reproducible only to the last bits from run to run.
struct NormArgs {
    const float* in_ss;  // this GEMM's x is unscaled: per-token sums of squares (null: x is final)
    float eps;
    const elem_t* gamma; // Add: the next norm's weight (null: no norm output)
    elem_t* out;         // Add: [M, ldy] h * gamma
    float* out_ss;       // Add: [M] sums of squares, zero before the step
};

// A weight vector read once: no L1 allocation, and a 256-byte L2 prefetch (the row goes on).
template <bool PF>
__device__ __forceinline__ uint4 ld_stream(const elem_t* p) {
    uint4 v;
    if (PF)
        asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    else
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// y = x[M, K] · W[rows, K]ᵀ for M <= 8 * NT. Block b owns 16 output rows: for Store/Add rows
// 16b..16b+15 of W (N rows); for SiLU, gate rows 8b..8b+7 (rows of W) and the matching up rows
// I + 8b.. (N = I); for RoPE (W is q/k/v, N rows, hd a multiple of 16), block c of a head owns
// the head's rows 8c..8c+7 and their rotation partners hd/2 further, so a lane holds both
// halves of its pairs: q rows go to y rotated, k rows rotated and v rows as they are to the
// caches (K/V not kept in y). K must be a multiple of 8.
// grid: (ceil(N / 16), S) for Store/Add, (ceil(I / 8), 1) for SiLU, (N / 16, 1) for RoPE. With
// S > 1 (Add only, never with a norm output: that needs a tile's whole sum in one block), block
// (b, s) takes the s-th of S equal shares of K's 64-wide chunks and adds its partial sum
// atomically (bias from s = 0).
// na: the norm split across GEMMs (NormArgs): Store/SiLU/RoPE scale by in_ss, Add writes out.
// SK_U: 64-wide chunks each warp has in flight; PF: ask L2 to prefetch 256-byte segments;
// PL: issue the first iteration's weight loads before waiting on the previous kernel.
// WARPS: warps of the block, each taking every WARPS-th chunk of K.
template <int NT, int EPI, int SK_U, bool PF, bool PL, int WARPS = SK_WARPS>
__device__ __forceinline__ void skinny(const elem_t* __restrict__ x, const elem_t* __restrict__ W,
                                       const elem_t* __restrict__ bias, void* yv, int M, int N, int K, int ldy,
                                       NormArgs na, RopeArgs ra = RopeArgs{}) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int lo, hi;
    bool vlo, vhi;
    // RoPE: the block's head and the first of its 8 frequencies.
    int head = 0, j0 = 0;
    if (EPI == EPI_ROPE) {
        head = blockIdx.x / (ra.hd >> 4);
        j0 = (blockIdx.x % (ra.hd >> 4)) * 8;
        lo = head * ra.hd + j0 + g;
        hi = lo + (ra.hd >> 1);
        vlo = vhi = hi < N;
    } else if (EPI == EPI_SILU) {
        lo = blockIdx.x * 8 + g;
        hi = N + lo;
        vlo = vhi = lo < N;
    } else {
        lo = blockIdx.x * 16 + g;
        hi = lo + 8;
        vlo = lo < N;
        vhi = hi < N;
    }
    const elem_t* wlo = W + (size_t)(vlo ? lo : 0) * K + t * 8;
    const elem_t* whi = W + (size_t)(vhi ? hi : 0) * K + t * 8;
    const uint4 z4 = make_uint4(0, 0, 0, 0);
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    int nchunks = (K + 63) >> 6;
    int cb = (int)(blockIdx.y * nchunks / gridDim.y), ce = (int)((blockIdx.y + 1) * nchunks / gridDim.y);
    auto load = [&](uint4 (&w)[SK_U][4], int c0) {
#pragma unroll
        for (int u = 0; u < SK_U; u++) {
            int c = c0 + u * WARPS;
            int e = c * 64 + t * 8;
            bool ok0 = c < ce && e < K, ok1 = c < ce && e + 32 < K;
            w[u][0] = vlo && ok0 ? ld_stream<PF>(wlo + c * 64) : z4;
            w[u][1] = vlo && ok1 ? ld_stream<PF>(wlo + c * 64 + 32) : z4;
            w[u][2] = vhi && ok0 ? ld_stream<PF>(whi + c * 64) : z4;
            w[u][3] = vhi && ok1 ? ld_stream<PF>(whi + c * 64 + 32) : z4;
        }
    };
    auto mul = [&](const uint4 (&w)[SK_U][4], int c0) {
#pragma unroll
        for (int u = 0; u < SK_U; u++) {
            int c = c0 + u * WARPS;
            if (c >= ce) break;
            int e = c * 64 + t * 8;
#pragma unroll
            for (int n = 0; n < NT; n++) {
                int m = n * 8 + g;
                uint4 xa = z4, xb = z4;
                if (m < M && e < K) {
                    const elem_t* xp = x + (size_t)m * K + e;
                    xa = __ldg((const uint4*)xp);
                    if (e + 32 < K) xb = __ldg((const uint4*)(xp + 32));
                }
                mma_16816(acc[n], w[u][0].x, w[u][2].x, w[u][0].y, w[u][2].y, xa.x, xa.y);
                mma_16816(acc[n], w[u][0].z, w[u][2].z, w[u][0].w, w[u][2].w, xa.z, xa.w);
                mma_16816(acc[n], w[u][1].x, w[u][3].x, w[u][1].y, w[u][3].y, xb.x, xb.y);
                mma_16816(acc[n], w[u][1].z, w[u][3].z, w[u][1].w, w[u][3].w, xb.z, xb.w);
            }
        }
    };
    // The weights do not depend on the previous kernel: with PL, the first iteration's loads
    // are issued before waiting for it (programmatic dependent launch), so they overlap its tail.
    uint4 w[SK_U][4];
    if (PL) load(w, cb + warp);
    pdl_begin();
    for (int c0 = cb + warp; c0 < ce; c0 += WARPS * SK_U) {
        if (!PL || c0 != cb + warp) load(w, c0);
        mul(w, c0);
    }
    // Sum the warps' partial tiles. Entry (n, i, lane): row lo (i < 2) or hi, token n*8 + 2t + (i & 1).
    __shared__ float red[WARPS][NT * 128];
    __shared__ float tss[NT * 8];  // Add with a norm output: the tile's sums of squares per token
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) red[warp][(n * 4 + i) * 32 + lane] = acc[n][i];
    if (EPI == EPI_ADD && threadIdx.x < NT * 8) tss[threadIdx.x] = 0.f;
    __syncthreads();
    if (EPI == EPI_ADD) {
        // Entry idx of the tile: output row and token.
        auto at = [&](int idx, int& m, int& row) {
            int l = idx & 31, i = (idx >> 5) & 3, n = idx >> 7;
            m = n * 8 + (l & 3) * 2 + (i & 1);
            row = blockIdx.x * 16 + (l >> 2) + (i >= 2 ? 8 : 0);
            return m < M && row < N;
        };
        // The norm output of h, the residual stream's new value at (m, row).
        auto norm_out = [&](int m, int row, float h) {
            na.out[(size_t)m * ldy + row] = f2e(h * e2f(na.gamma[row]));
            atomicAdd(&tss[m], h * h);
        };
        for (int idx = threadIdx.x; idx < NT * 128; idx += blockDim.x) {
            int m, row;
            if (!at(idx, m, row)) continue;
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; w++) s += red[w][idx];
            if (bias && blockIdx.y == 0) s += e2f(bias[row]);
            float* y = (float*)yv + (size_t)m * ldy + row;
            if (gridDim.y > 1) {
                atomicAdd(y, s);
                continue;
            }
            float h = *y + s;
            *y = h;
            if (na.out) norm_out(m, row, h);
        }
        if (!na.out) return;
        __syncthreads();
        if (threadIdx.x < M && threadIdx.x < NT * 8) atomicAdd(&na.out_ss[threadIdx.x], tss[threadIdx.x]);
        return;
    }
    for (int idx = threadIdx.x; idx < NT * 128; idx += blockDim.x) {
        int l = idx & 31, i = (idx >> 5) & 3, n = idx >> 7;
        int m = n * 8 + (l & 3) * 2 + (i & 1);
        if (m >= M) continue;
        if ((EPI == EPI_SILU || EPI == EPI_ROPE) && i >= 2) continue;
        // x unscaled (NormArgs): the token's 1/rms.
        float r = na.in_ss ? rsqrtf(na.in_ss[m] / (float)K + na.eps) : 1.f;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) s += red[w][idx];
        s *= r;
        if (EPI == EPI_ROPE) {
            int half = ra.hd >> 1, j = j0 + (l >> 2);
            int rlo = head * ra.hd + j, rhi = rlo + half;
            if (rhi >= N) continue;
            float b = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; w++) b += red[w][idx + 64];
            b *= r;
            if (bias) {
                s += e2f(bias[rlo]);
                b += e2f(bias[rhi]);
            }
            size_t kvs = (size_t)ra.nkv * ra.hd, slot = ra.slots[m];
            if (head >= ra.nh + ra.nkv) {
                elem_t* v = ra.v_cache + slot * kvs + (size_t)(head - ra.nh - ra.nkv) * ra.hd;
                v[j] = f2e(s);
                v[j + half] = f2e(b);
                continue;
            }
            size_t cs = (size_t)ra.positions[m] * half + j;
            float c = ra.cos[cs], sn = ra.sin[cs];
            float r0 = s * c - b * sn, r1 = b * c + s * sn;
            if (head < ra.nh) {
                float* y = (float*)yv + (size_t)m * ldy;
                y[rlo] = r0;
                y[rhi] = r1;
            } else {
                elem_t* k = ra.k_cache + slot * kvs + (size_t)(head - ra.nh) * ra.hd;
                k[j] = f2e(r0);
                k[j + half] = f2e(r1);
            }
        } else if (EPI == EPI_SILU) {
            int j = blockIdx.x * 8 + (l >> 2);
            if (j >= N) continue;
            float up = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; w++) up += red[w][idx + 64];
            up *= r;
            ((elem_t*)yv)[(size_t)m * ldy + j] = f2e(s / (1.f + __expf(-s)) * up);
        } else {
            int row = blockIdx.x * 16 + (l >> 2) + (i >= 2 ? 8 : 0);
            if (row >= N) continue;
            if (bias) s += e2f(bias[row]);
            ((float*)yv)[(size_t)m * ldy + row] = s;
        }
    }
}

