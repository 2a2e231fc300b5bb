//! Skinny GEMM for decode-sized batches: `y = x · Wᵀ` for up to [`SKINNY_MAX_M`] tokens on tensor
//! cores, streaming every weight byte once, with the step's next elementwise op fused into the
//! epilogue (store, residual add, SiLU·mul of gate and up, or, for q/k/v on decode steps, RoPE
//! and the K/V-cache write).
//!
//! At a handful of tokens the product is memory-bound: what matters is keeping enough bytes in
//! flight to saturate HBM, not the math. Each warp owns a tile of 16 weight rows and a share of
//! K; each lane loads 32 bytes of each of two rows per 64-wide K chunk (16-byte vectors, two
//! chunks in flight by default). The trick that makes plain vector loads valid `mma.m16n8k16`
//! fragments: lane (g = lane/4, t = lane%4) holds elements `8t..8t+8` and `32+8t..32+8t+8` of
//! each chunk, of weight rows g and g+8 and of token g, and both operands number K the same
//! (permuted) way, so the dot products are unchanged and neither operand goes through shared
//! memory. The four lanes of a row read 64 contiguous bytes per load: whole 32-byte sectors.
//! Warps then sum their partial tiles in shared memory and the epilogue writes the output.
//! A residual add with too few rows to fill the GPU may also cut K across `gridDim.y` blocks
//! that add their partial sums atomically; the order of those adds varies, so such a step's
//! output is not bitwise reproducible from run to run (last-bit differences).
//!
//! Weights never depend on the kernel before: each warp issues its first loads before
//! `pdl_wait` (programmatic dependent launch, kernels.rs), so a GEMM's blocks fetch weights in
//! the free slots while the kernels ahead of it drain, and HBM stays busy across launches.

use super::kernels::Module;

/// Most tokens the skinny GEMM takes (4 n-tiles of 8).
pub const SKINNY_MAX_M: usize = 32;
/// Token counts it is used for by default; cuBLAS above. On the H200, with programmatic
/// dependent launch and the first weight loads issued before the wait, the skinny GEMM streams
/// the 7B projections at 86% of copy bandwidth at one token against cuBLAS's 79%, and whole
/// decode steps ran 2–5% faster with it up to 8 tokens; at 16 its x fragments, re-read from L2
/// by every warp, make it lose (BENCHMARKS.md).
pub const SKINNY_DEFAULT_M: usize = 8;
/// Weight rows per block (one mma tile).
pub const SKINNY_ROWS: usize = 16;
/// Threads per block (`SK_WARPS * 32`).
pub const SKINNY_THREADS: u32 = 256;
/// The residual add of up to 8 tokens in 16-warp blocks, for adds with a norm output where K
/// would otherwise be split across blocks, and its threads per block (`SK_WIDE_WARPS * 32`).
pub const ADD_WIDE: &str = "skinny_add_8_w16";
pub const ADD_WIDE_THREADS: u32 = 512;

/// What the epilogue does with `acc = x · Wᵀ` (kernel name prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `y[m, n] = acc (+ bias)`, f32
    Store,
    /// `y[m, n] += acc (+ bias)`, f32: the residual stream
    Add,
    /// W is `[gate; up]` (2I rows): `y[m, j] = silu(gate_j) · up_j`, elem_t, `j < I`
    SiluMul,
}

/// Whether the skinny GEMM takes `m` tokens of an `n × k` weight (else cuBLAS does).
pub fn fits(skinny_max_m: usize, epi: Epilogue, n: usize, k: usize, m: usize) -> bool {
    m <= skinny_max_m && k.is_multiple_of(8) && (epi != Epilogue::SiluMul || n.is_multiple_of(2))
}

/// The RMSNorm split across a residual add and the next GEMM (`NormArgs` in the kernels): the
/// add writes `out = h · gamma` unscaled and each token's sum of squares into `out_ss` (zero
/// before the step); the next GEMM reads `out` as its x with `in_ss` and scales by 1/rms.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NormIo {
    /// The GEMM's x is unscaled: these per-token sums of squares give its 1/rms (0: x is final).
    pub in_ss: u64,
    pub eps: f32,
    /// Add: the next norm's weight, the unscaled output and its sums of squares (0: none).
    pub gamma: u64,
    pub out: u64,
    pub out_ss: u64,
}

impl NormIo {
    /// Neither end of a split norm: a plain GEMM.
    pub const NONE: NormIo = NormIo {
        in_ss: 0,
        eps: 0.0,
        gamma: 0,
        out: 0,
        out_ss: 0,
    };

    /// The kernel arguments after (x, W, bias, y, M, N, K, ldy).
    pub fn args(&self) -> [u64; NORM_ARGS] {
        [
            self.in_ss,
            self.eps.to_bits() as u64,
            self.gamma,
            self.out,
            self.out_ss,
        ]
    }
}

/// Kernel arguments of a [`NormIo`].
pub const NORM_ARGS: usize = 5;

/// Kernel name for an epilogue and a token count (rounded up to 8, 16 or 32).
pub fn kernel_name(epi: Epilogue, m: usize) -> &'static str {
    let names: [&'static str; 3] = match epi {
        Epilogue::Store => ["skinny_store_8", "skinny_store_16", "skinny_store_32"],
        Epilogue::Add => ["skinny_add_8", "skinny_add_16", "skinny_add_32"],
        Epilogue::SiluMul => ["skinny_silu_8", "skinny_silu_16", "skinny_silu_32"],
    };
    names[token_class(m)]
}

/// The q/k/v kernel with RoPE and the K/V cache write as its epilogue (`RopeArgs` in the
/// kernels), for `m` tokens (rounded up to 8, 16 or 32); its weight's heads need `hd % 16 == 0`.
pub fn rope_kernel_name(m: usize) -> &'static str {
    ["skinny_rope_8", "skinny_rope_16", "skinny_rope_32"][token_class(m)]
}

/// Which instantiation takes `m` tokens: 8, 16 or 32 of them (one, two or four n-tiles).
fn token_class(m: usize) -> usize {
    match m {
        0..=8 => 0,
        9..=16 => 1,
        _ => 2,
    }
}

/// The skinny GEMM template (CUDA C), instantiated by [`MODULE`] and [`TUNING`].
macro_rules! skinny_template {
    () => {
        r#"
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

"#
    };
}

pub const MODULE: Module = Module {
    name: "skinny",
    body: concat!(
        skinny_template!(),
        r#"
// Two chunks in flight per warp and four blocks per SM (the fastest variant at one token on
// the H200, BENCHMARKS.md); more tokens need more registers: two blocks. Every skinny kernel
// takes (x, W, bias, y, M, N, K, ldy, in_ss, eps, gamma, out, out_ss): NormArgs last.
#define SKINNY_PARAMS                                                                                  \
    const elem_t *x, const elem_t *W, const elem_t *bias, void *y, int M, int N, int K, int ldy,      \
        const float *in_ss, float eps, const elem_t *gamma, elem_t *nout, float *out_ss
#define SKINNY(NAME, NT, EPI)                                                                          \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32, NT == 1 ? 4 : 2) NAME(SKINNY_PARAMS) { \
        skinny<NT, EPI, 2, true, true>(x, W, bias, y, M, N, K, ldy, NormArgs{in_ss, eps, gamma, nout, out_ss}); \
    }
SKINNY(skinny_store_8, 1, EPI_STORE)
SKINNY(skinny_store_16, 2, EPI_STORE)
SKINNY(skinny_store_32, 4, EPI_STORE)
SKINNY(skinny_add_8, 1, EPI_ADD)
SKINNY(skinny_add_16, 2, EPI_ADD)
SKINNY(skinny_add_32, 4, EPI_ADD)
SKINNY(skinny_silu_8, 1, EPI_SILU)
SKINNY(skinny_silu_16, 2, EPI_SILU)
SKINNY(skinny_silu_32, 4, EPI_SILU)

// A residual add of up to 8 tokens in 16-warp blocks: twice the warps on a tile's K in one
// block, where a split across blocks would leave the tile's sum to atomics (the norm output
// needs it whole).
#define SK_WIDE_WARPS 16
extern "C" __global__ void __launch_bounds__(SK_WIDE_WARPS * 32, 2) skinny_add_8_w16(SKINNY_PARAMS) {
    skinny<1, EPI_ADD, 2, true, true, SK_WIDE_WARPS>(x, W, bias, y, M, N, K, ldy, NormArgs{in_ss, eps, gamma, nout, out_ss});
}

// q/k/v with RoPE and the K/V cache write as the epilogue (decode steps): the skinny
// parameters, then RopeArgs.
#define SKINNY_ROPE(NAME, NT)                                                                          \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32, NT == 1 ? 4 : 2) NAME(SKINNY_PARAMS,  \
        const float* cos_t, const float* sin_t, const u32* positions, const u32* slots,                  \
        elem_t* k_cache, elem_t* v_cache, int nh, int nkv, int hd) {                                     \
        RopeArgs ra{cos_t, sin_t, positions, slots, k_cache, v_cache, nh, nkv, hd};                      \
        skinny<NT, EPI_ROPE, 2, true, true>(x, W, bias, y, M, N, K, ldy, NormArgs{in_ss, eps, gamma, nout, out_ss}, ra); \
    }
SKINNY_ROPE(skinny_rope_8, 1)
SKINNY_ROPE(skinny_rope_16, 2)
SKINNY_ROPE(skinny_rope_32, 4)

"#
    ),
    kernels: &[
        "skinny_store_8",
        "skinny_store_16",
        "skinny_store_32",
        "skinny_add_8",
        "skinny_add_16",
        "skinny_add_32",
        "skinny_add_8_w16",
        "skinny_silu_8",
        "skinny_silu_16",
        "skinny_silu_32",
        "skinny_rope_8",
        "skinny_rope_16",
        "skinny_rope_32",
    ],
};

/// Tuning variants of the Store kernel (up to 8 tokens), timed by `gpu_bench --micro` next to
/// the default (`skinny_store_8`). Not loaded by the backend.
pub const TUNING: Module = Module {
    name: "skinny-tuning",
    body: concat!(
        skinny_template!(),
        r#"
// Tuning variants (Store, up to 8 tokens), timed by `gpu_bench --micro`: chunks in flight,
// blocks per SM asked of the register allocator, L2 prefetch, weights loaded before the
// programmatic-launch wait.
#define SKINNY_VAR(NAME, U, MINB, PF, PL)                                                          \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32, MINB) NAME(                           \
        const elem_t* x, const elem_t* W, const elem_t* bias, void* y, int M, int N, int K, int ldy,   \
        const float* in_ss, float eps, const elem_t* gamma, elem_t* nout, float* out_ss) {             \
        skinny<1, EPI_STORE, U, PF, PL>(x, W, bias, y, M, N, K, ldy, NormArgs{in_ss, eps, gamma, nout, out_ss}); \
    }
SKINNY_VAR(skinny_var_u2_b4_nopl, 2, 4, true, false)
SKINNY_VAR(skinny_var_u2_b4_nopf, 2, 4, false, true)
SKINNY_VAR(skinny_var_u4_b2, 4, 2, true, true)

// The read-only ceiling: streams n16 16-byte vectors once (4 in flight per thread) and only
// sums them (the sink is written when the sum hits a value no test data makes).
extern "C" __global__ void __launch_bounds__(256) read_stream(const elem_t* p, unsigned long long n16, u32* sink) {
    const uint4* v = (const uint4*)p;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    u32 acc = 0;
    pdl_begin();
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = ld_stream<true>((const elem_t*)(v + i)), b = ld_stream<true>((const elem_t*)(v + i + stride));
        uint4 c = ld_stream<true>((const elem_t*)(v + i + 2 * stride)), d = ld_stream<true>((const elem_t*)(v + i + 3 * stride));
        acc += a.x ^ b.y ^ c.z ^ d.w ^ a.w ^ b.x ^ c.y ^ d.z;
    }
    for (; i < n16; i += stride) acc += ld_stream<true>((const elem_t*)(v + i)).x;
    if (acc == 0x9e3779b9u) *sink = acc;
}
"#
    ),
    kernels: &[
        "skinny_var_u2_b4_nopl",
        "skinny_var_u2_b4_nopf",
        "skinny_var_u4_b2",
        "read_stream",
    ],
};
