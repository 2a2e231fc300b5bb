//! Segmented multi-LoRA (SGMV) for long prefill and mixed steps (shorter ones use BGMV): the
//! tokens of one sequence are contiguous and share one adapter slot, so a step's tokens fall into *segments* (runs of
//! tokens with the same slot), and each segment is a small GEMM whose adapter weights are loaded
//! once per tile of up to [`SGMV_TILE_TOKENS`] tokens instead of once per token (BGMV).
//!
//! Same contract and buffer layouts as the BGMV kernels in `kernels.rs` (tmp `[nsub, T, R]` f32,
//! A `[nsub, L, R, K]`, B `[L, N, R]` elem_t), so SGMV and BGMV shrink/expand can be mixed. Both
//! kernels use bf16 or f16 tensor cores (`mma.sync m16n8k16`, f32 accumulation). The reduction index of
//! one mma (16 logical k) is mapped to physical k so that every lane loads contiguous vectors:
//! logical `{2q, 2q+1, 2q+8, 2q+9}` of lane `q = lane % 4` is physical `{4q .. 4q+3}` (expand)
//! or, over two mmas, `{8q .. 8q+7}` (shrink). Any permutation of k is exact as long as both
//! operands use the same one; `tests::fragment_mapping_*` check this on the host.

use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{cfg, Gpu, KernelArg};
use crate::error::Result;
use crate::lora::LoraSlot;

/// Tokens of one segment tile (4 mma row fragments of 16): longer runs are split.
pub const SGMV_TILE_TOKENS: usize = 64;
/// Tokens and ranks one shrink block covers (an mma row fragment, two column fragments).
const SHRINK_TOKENS: usize = 16;
const SHRINK_RANKS: usize = 16;
/// Threads of a shrink block: `SHRINK_WARPS` (16) warps splitting K.
const SHRINK_THREADS: u32 = 512;
/// Threads of an expand block (a warp per row fragment) and the outputs one block covers.
const EXPAND_THREADS: u32 = 128;
const EXPAND_OUTPUTS: usize = 256;

pub const SGMV: &str = r#"
#define SGMV_TILE 64
#define SHRINK_WARPS 16
#define EXPAND_N 256

// The elem_t rounding residual of v, so hi + lo carries ~16 (bf16) or ~22 (f16) mantissa bits
// of an f32. With f16, |v| must stay below 65504 (f16's largest finite value; tmp is a LoRA
// shrink output, far smaller), and below f16's normal range (6.1e-5) lo loses bits, an absolute
// error under 3e-8.
__device__ __forceinline__ float resid(float v) { return v - e2f(f2e(v)); }

// SGMV shrink: tmp[z, t, r] = scale[z, s] · x[t] · A[z, s, r]ᵀ for the tokens t of each segment
// (s its slot) and the nsub projections of a group sharing x. One block per (segment tile,
// 16-token row fragment, 16-rank chunk): x is read once for all projections, each A row once
// per 16 tokens (not per token). The block's SHRINK_WARPS warps take every SHRINK_WARPS-th
// 32-wide K chunk (a long K is the whole cost, and prefill tiles are few) and are summed in
// shared memory. Ranks past a projection's rank get 0 and read no weights.
// x: [T, K] elem_t (K % 8 == 0); A: [nsub, L, R, K] elem_t; ranks, scales: [nsub, L];
// segs: [*, 3] (start, end, slot), end - start <= SGMV_TILE; num_segs: [1];
// tmp: [nsub, T, R] f32. grid (>= num_segs, SGMV_TILE / 16, ceil(R / 16)), 32 * SHRINK_WARPS threads.
extern "C" __global__ void __launch_bounds__(32 * SHRINK_WARPS) sgmv_shrink(
    const elem_t* __restrict__ x, const elem_t* __restrict__ A, const int* ranks, const float* scales,
    const u32* segs, const u32* num_segs, float* tmp, int nsub, int T, int K, int R, int L) {
    pdl_begin();
    __shared__ float red[SHRINK_WARPS - 1][24][32];
    int seg = blockIdx.x;
    if (seg >= (int)*num_segs) return;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int t0 = (int)segs[3 * seg], nt = (int)segs[3 * seg + 1] - t0, s = (int)segs[3 * seg + 2];
    int ra = blockIdx.y * 16 + g, rb = ra + 8;
    if (blockIdx.y * 16 >= nt) return;  // block-uniform
    int r0 = blockIdx.z * 16;
    bool va = ra < nt, vb = rb < nt;
    // Active 8-rank column fragments per projection: rows past the rank are zero padding.
    int nfz[3];
    const uint4* ap[3][2];
#pragma unroll
    for (int z = 0; z < 3; z++) {
        int rk = z < nsub ? ranks[z * L + s] : 0;
        int nf = min((rk - r0 + 7) >> 3, (R - r0) >> 3);
        nfz[z] = max(0, min(nf, 2));
#pragma unroll
        for (int f = 0; f < 2; f++)
            ap[z][f] = (const uint4*)(A + (((size_t)(z < nsub ? z : 0) * L + s) * R + r0 + f * 8 + g) * K);
    }
    float acc[3][2][4];
#pragma unroll
    for (int z = 0; z < 3; z++)
#pragma unroll
        for (int f = 0; f < 2; f++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[z][f][i] = 0.f;
    if (nfz[0] | nfz[1] | nfz[2]) {
        int K8 = K >> 3, nchunks = (K8 + 3) >> 2;
        const uint4* xa = (const uint4*)(x + (size_t)(t0 + (va ? ra : 0)) * K);
        const uint4* xb = (const uint4*)(x + (size_t)(t0 + (vb ? rb : 0)) * K);
        uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll 2
        for (int c = warp; c < nchunks; c += SHRINK_WARPS) {
            // This lane's 8 consecutive k: physical 8q..8q+7 of the chunk (see the module doc).
            // Every load of the chunk is issued before the first mma.
            int k8 = c * 4 + q;
            bool kv = k8 < K8;
            uint4 xva = (va && kv) ? __ldg(xa + k8) : zero;
            uint4 xvb = (vb && kv) ? __ldg(xb + k8) : zero;
            uint4 w[3][2];
#pragma unroll
            for (int z = 0; z < 3; z++)
#pragma unroll
                for (int f = 0; f < 2; f++) w[z][f] = (kv && f < nfz[z]) ? __ldg(ap[z][f] + k8) : zero;
#pragma unroll
            for (int z = 0; z < 3; z++)
#pragma unroll
                for (int f = 0; f < 2; f++)
                    if (f < nfz[z]) {
                        mma_16816(acc[z][f], xva.x, xvb.x, xva.y, xvb.y, w[z][f].x, w[z][f].y);
                        mma_16816(acc[z][f], xva.z, xvb.z, xva.w, xvb.w, w[z][f].z, w[z][f].w);
                    }
        }
    }
    if (warp > 0) {
#pragma unroll
        for (int z = 0; z < 3; z++)
#pragma unroll
            for (int f = 0; f < 2; f++)
#pragma unroll
                for (int i = 0; i < 4; i++) red[warp - 1][(z * 2 + f) * 4 + i][lane] = acc[z][f][i];
    }
    __syncthreads();
    if (warp > 0) return;
    for (int j = 0; j < SHRINK_WARPS - 1; j++)
#pragma unroll
        for (int z = 0; z < 3; z++)
#pragma unroll
            for (int f = 0; f < 2; f++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[z][f][i] += red[j][(z * 2 + f) * 4 + i][lane];
    // c0,c1: token row ra, ranks r0 + 8f + 2q, +1; c2,c3: token row rb. Padding ranks get 0.
#pragma unroll
    for (int z = 0; z < 3; z++) {
        if (z >= nsub) break;
        float sc = scales[z * L + s];
#pragma unroll
        for (int f = 0; f < 2; f++) {
            int r = r0 + f * 8 + 2 * q;
            if (r0 + f * 8 >= R) break;
            float* o = tmp + ((size_t)z * T + t0) * R + r;
            if (va) *(float2*)(o + (size_t)ra * R) = make_float2(acc[z][f][0] * sc, acc[z][f][1] * sc);
            if (vb) *(float2*)(o + (size_t)rb * R) = make_float2(acc[z][f][2] * sc, acc[z][f][3] * sc);
        }
    }
}

// SGMV expand: y[t, o] += tmp[z(o), t, :rank] · B[s, o, :rank] for the tokens t of each segment.
// The group's projections are concatenated along N: outputs below n1 belong to sub 0, below n2
// to sub 1, the rest to sub 2 (as lora_expand). One block per (segment tile, EXPAND_N outputs),
// a warp per 16-token row fragment; each B row is read once per tile. tmp enters the tensor
// cores as elem_t hi + lo halves (two mmas), so the result keeps f32-like precision.
// tmp: [nsub, T, R] f32; B: [L, N, R] elem_t; ranks: [nsub, L]; segs, num_segs: as sgmv_shrink;
// y: [T, ldy] f32. grid (>= num_segs, ceil(N / EXPAND_N)), 128 threads.
extern "C" __global__ void __launch_bounds__(128) sgmv_expand(
    const float* tmp, const elem_t* __restrict__ B, const int* ranks, const u32* segs, const u32* num_segs,
    float* y, int T, int N, int R, int L, int ldy, int n1, int n2) {
    pdl_begin();
    int seg = blockIdx.x;
    if (seg >= (int)*num_segs) return;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int t0 = (int)segs[3 * seg], nt = (int)segs[3 * seg + 1] - t0, s = (int)segs[3 * seg + 2];
    int m0 = warp * 16;
    if (m0 >= nt) return;  // warp-uniform; no block-wide synchronization below
    int ra = m0 + g, rb = ra + 8;
    bool va = ra < nt, vb = rb < nt;
    int nend = min((int)(blockIdx.y + 1) * EXPAND_N, N);
    for (int n0 = blockIdx.y * EXPAND_N; n0 < nend; n0 += 32) {
        int zlo = n0 < n1 ? 0 : (n0 < n2 ? 1 : 2);
        int nl = min(n0 + 31, N - 1);
        int zhi = nl < n1 ? 0 : (nl < n2 ? 1 : 2);
        float acc[4][4];
#pragma unroll
        for (int f = 0; f < 4; f++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[f][i] = 0.f;
        bool any = false;
        for (int z = zlo; z <= zhi; z++) {
            int rk = ranks[z * L + s];
            any |= rk > 0;
            const float* ta = tmp + ((size_t)z * T + t0 + (va ? ra : 0)) * R;
            const float* tb = tmp + ((size_t)z * T + t0 + (vb ? rb : 0)) * R;
            for (int r0 = 0; r0 < rk; r0 += 16) {
                // This lane's ranks: physical r0+4q..r0+4q+3 = logical {2q, 2q+1, 2q+8, 2q+9}.
                int rr = r0 + 4 * q;
                bool rv = rr < R;
                float4 fa = (va && rv) ? *(const float4*)(ta + rr) : make_float4(0.f, 0.f, 0.f, 0.f);
                float4 fb = (vb && rv) ? *(const float4*)(tb + rr) : make_float4(0.f, 0.f, 0.f, 0.f);
                u32 h0 = pack2(fa.x, fa.y), h1 = pack2(fb.x, fb.y);
                u32 h2 = pack2(fa.z, fa.w), h3 = pack2(fb.z, fb.w);
                u32 l0 = pack2(resid(fa.x), resid(fa.y)), l1 = pack2(resid(fb.x), resid(fb.y));
                u32 l2 = pack2(resid(fa.z), resid(fa.w)), l3 = pack2(resid(fb.z), resid(fb.w));
#pragma unroll
                for (int f = 0; f < 4; f++) {
                    int o = n0 + f * 8 + g;
                    int zo = o < n1 ? 0 : (o < n2 ? 1 : 2);
                    uint2 bw = (o < N && zo == z && rv) ? __ldg((const uint2*)(B + ((size_t)s * N + o) * R + rr))
                                                        : make_uint2(0, 0);
                    mma_16816(acc[f], h0, h1, h2, h3, bw.x, bw.y);
                    mma_16816(acc[f], l0, l1, l2, l3, bw.x, bw.y);
                }
            }
        }
        if (!any) continue;
        // c0,c1: token row ra, outputs n0 + 8f + 2q, +1; c2,c3: token row rb.
#pragma unroll
        for (int f = 0; f < 4; f++) {
            int o = n0 + f * 8 + 2 * q;  // even: a float2 when ldy is even too
#pragma unroll
            for (int h = 0; h < 2; h++) {
                if (!(h ? vb : va)) continue;
                float* p = y + (size_t)(t0 + (h ? rb : ra)) * ldy + o;
                float c0 = acc[f][2 * h], c1 = acc[f][2 * h + 1];
                if (o + 1 < N && !(ldy & 1)) {
                    float2 v = *(float2*)p;
                    *(float2*)p = make_float2(v.x + c0, v.y + c1);
                } else {
                    if (o < N) p[0] += c0;
                    if (o + 1 < N) p[1] += c1;
                }
            }
        }
    }
}
"#;

/// Kernel names of [`SGMV`].
pub const SGMV_NAMES: &[&str] = &["sgmv_shrink", "sgmv_expand"];

/// Splits a step's tokens into LoRA segments: runs of consecutive tokens with the same adapter
/// slot, at most [`SGMV_TILE_TOKENS`] long (longer runs are split; tokens without adapter belong
/// to none). Writes rows `(start, end, slot)` into `segs` (`[max_tokens, 3]`, so any step fits)
/// and returns their number. Allocates nothing.
pub fn pack_lora_segments(token_lora: &[Option<LoraSlot>], segs: &mut [u32]) -> usize {
    assert!(segs.len() >= 3 * token_lora.len());
    let mut n = 0;
    let mut t = 0;
    while t < token_lora.len() {
        let Some(slot) = token_lora[t] else {
            t += 1;
            continue;
        };
        let mut end = t + 1;
        while end < token_lora.len() && end - t < SGMV_TILE_TOKENS && token_lora[end] == Some(slot) {
            end += 1;
        }
        segs[3 * n..3 * n + 3].copy_from_slice(&[t as u32, end as u32, slot.0]);
        n += 1;
        t = end;
    }
    n
}

/// One projection group's stacked adapter weights on the device (layouts as `LoraGroup`), as
/// the SGMV and BGMV launchers take them.
#[derive(Debug, Clone, Copy)]
pub struct GroupWeights {
    /// `[nsub, L, R, K]` elem_t
    pub a: CUdeviceptr,
    /// `[L, N, R]` elem_t
    pub b: CUdeviceptr,
    /// `[nsub, L]` i32
    pub ranks: CUdeviceptr,
    /// `[nsub, L]` f32
    pub scales: CUdeviceptr,
    pub nsub: usize,
    pub k: usize,
    /// Total outputs, and where sub 1 and sub 2 start (`n` where absent).
    pub n: usize,
    pub n1: usize,
    pub n2: usize,
    /// Device rank R (a multiple of 8) and `max_loras` L.
    pub r: usize,
    pub max_loras: usize,
}

/// A step's segments on the device: `segs` `[*, 3]` and `num_segs` `[1]` (u32), and the count
/// the grid is sized for (at least the device count).
#[derive(Debug, Clone, Copy)]
pub struct Segments {
    pub segs: CUdeviceptr,
    pub num_segs: CUdeviceptr,
    pub max_segs: usize,
}

/// `tmp[nsub, t, R] = scale · x[t, K] · Aᵀ` for every token in a segment (others untouched).
pub fn shrink(
    gpu: &Gpu,
    w: &GroupWeights,
    seg: &Segments,
    x: CUdeviceptr,
    tmp: CUdeviceptr,
    t: usize,
) -> Result<()> {
    assert!(w.k.is_multiple_of(8) && w.r.is_multiple_of(8) && (1..=3).contains(&w.nsub));
    if seg.max_segs == 0 {
        return Ok(());
    }
    let grid = (
        seg.max_segs as u32,
        (SGMV_TILE_TOKENS / SHRINK_TOKENS) as u32,
        w.r.div_ceil(SHRINK_RANKS) as u32,
    );
    let [nsub, t, k, r, l] = [w.nsub, t, w.k, w.r, w.max_loras].map(|v| (v as i32).bits());
    let args = [
        x,
        w.a,
        w.ranks,
        w.scales,
        seg.segs,
        seg.num_segs,
        tmp,
        nsub,
        t,
        k,
        r,
        l,
    ];
    // SAFETY: arguments match sgmv_shrink's signature and point at buffers of its shapes.
    unsafe { gpu.launch("sgmv_shrink", cfg(grid, SHRINK_THREADS), &args) }
}

/// `y[t, ldy] += tmp[z(o), t, :rank] · B[s, o, :rank]` for every token in a segment.
pub fn expand(
    gpu: &Gpu,
    w: &GroupWeights,
    seg: &Segments,
    tmp: CUdeviceptr,
    y: CUdeviceptr,
    t: usize,
    ldy: usize,
) -> Result<()> {
    if seg.max_segs == 0 || w.n == 0 {
        return Ok(());
    }
    let grid = (seg.max_segs as u32, w.n.div_ceil(EXPAND_OUTPUTS) as u32, 1);
    let [t, n, r, l, ldy, n1, n2] = [t, w.n, w.r, w.max_loras, ldy, w.n1, w.n2].map(|v| (v as i32).bits());
    let args = [
        tmp,
        w.b,
        w.ranks,
        seg.segs,
        seg.num_segs,
        y,
        t,
        n,
        r,
        l,
        ldy,
        n1,
        n2,
    ];
    // SAFETY: arguments match sgmv_expand's signature and point at buffers of its shapes.
    unsafe { gpu.launch("sgmv_expand", cfg(grid, EXPAND_THREADS), &args) }
}

/// BGMV shrink (every token its own slot, `tok_slot` `[t]` i32, -1: none), as [`shrink`]
/// computes it per segment: `lora_shrink` (a block per SHRINK_ROWS rank rows, for decode) or,
/// with `wide`, `lora_shrink_wide` (a warp per rank row, for many tokens).
pub fn bgmv_shrink(
    gpu: &Gpu,
    w: &GroupWeights,
    tok_slot: CUdeviceptr,
    x: CUdeviceptr,
    tmp: CUdeviceptr,
    t: usize,
    wide: bool,
) -> Result<()> {
    let (name, rows) = if wide {
        ("lora_shrink_wide", 8)
    } else {
        ("lora_shrink", super::kernels::SHRINK_ROWS)
    };
    let grid = (t as u32, w.nsub as u32, w.r.div_ceil(rows) as u32);
    let [t, k, r, l] = [t, w.k, w.r, w.max_loras].map(|v| (v as i32).bits());
    let args = [x, w.a, w.ranks, w.scales, tok_slot, tmp, t, k, r, l];
    // SAFETY: both shrink kernels take these arguments (kernels.rs), over buffers of these shapes.
    unsafe { gpu.launch(name, cfg(grid, 256), &args) }
}

/// BGMV expand: `y[t, ldy] += tmp[z(o), t, :rank] · B[slot(t), o, :rank]` (`lora_expand`).
pub fn bgmv_expand(
    gpu: &Gpu,
    w: &GroupWeights,
    tok_slot: CUdeviceptr,
    tmp: CUdeviceptr,
    y: CUdeviceptr,
    t: usize,
    ldy: usize,
) -> Result<()> {
    let grid = (w.n.div_ceil(256) as u32, t as u32, 1);
    let [t, n, r, l, ldy, n1, n2] = [t, w.n, w.r, w.max_loras, ldy, w.n1, w.n2].map(|v| (v as i32).bits());
    let args = [tmp, w.b, w.ranks, tok_slot, y, t, n, r, l, ldy, n1, n2];
    // SAFETY: lora_expand takes these arguments (kernels.rs), over buffers of these shapes.
    unsafe { gpu.launch("lora_expand", cfg(grid, 256), &args) }
}

#[cfg(test)]
// Lane loops index several per-lane arrays at once, as the hardware does.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn host_constants_match_the_kernel_defines() {
        let defines = [
            ("SGMV_TILE", SGMV_TILE_TOKENS),
            ("SHRINK_WARPS", SHRINK_THREADS as usize / 32),
            ("EXPAND_N", EXPAND_OUTPUTS),
        ];
        crate::cuda::kernels::assert_defines("sgmv.rs", SGMV, &defines);
    }

    fn segments(lora: &[Option<u32>]) -> Vec<(u32, u32, u32)> {
        let lora: Vec<Option<LoraSlot>> = lora.iter().map(|s| s.map(LoraSlot)).collect();
        let mut buf = vec![u32::MAX; 3 * lora.len()];
        let n = pack_lora_segments(&lora, &mut buf);
        assert!(n <= lora.len());
        buf[..3 * n].chunks(3).map(|c| (c[0], c[1], c[2])).collect()
    }

    #[test]
    fn segments_follow_runs_of_one_slot() {
        let (a, b) = (Some(0), Some(2));
        // Two sequences with different adapters, one without, then one sharing the first's:
        // runs merge across sequence boundaries when the slot is the same (same weights).
        let toks = [a, a, a, b, b, None, None, a, a];
        assert_eq!(segments(&toks), vec![(0, 3, 0), (3, 5, 2), (7, 9, 0)]);
        // Decode-like single tokens alternating slots.
        assert_eq!(
            segments(&[a, b, a, None, b]),
            vec![(0, 1, 0), (1, 2, 2), (2, 3, 0), (4, 5, 2)]
        );
        // No adapter at all, or nothing: no segments.
        assert!(segments(&[None; 5]).is_empty());
        assert!(segments(&[]).is_empty());
        // Trailing tokens without adapter (as graph padding) are skipped.
        assert_eq!(segments(&[b, None, None, None]), vec![(0, 1, 2)]);
    }

    #[test]
    fn long_runs_split_into_tiles() {
        let mut toks = vec![Some(1); 150];
        toks.extend([Some(3); 64]);
        let segs = segments(&toks);
        assert_eq!(segs, vec![(0, 64, 1), (64, 128, 1), (128, 150, 1), (150, 214, 3)]);
        // Every segment fits a tile; every token with an adapter is in exactly one segment.
        let covered: usize = segs.iter().map(|&(s, e, _)| (e - s) as usize).sum();
        assert_eq!(covered, toks.len());
        assert!(segs
            .iter()
            .all(|&(s, e, _)| e > s && (e - s) as usize <= SGMV_TILE_TOKENS));
    }

    /// `mma.sync.m16n8k16` as the PTX ISA defines it, on bf16 pairs packed in u32 (low half =
    /// lower index): D[16x8] += A[16x16] · B[16x8].
    fn mma_ref(c: &mut [[f32; 4]; 32], a: &[[u32; 4]; 32], b: &[[u32; 2]; 32]) {
        let el = |v: u32, i: usize| bf16::from_bits((v >> (16 * i)) as u16).to_f32();
        let mut am = [[0f32; 16]; 16];
        let mut bm = [[0f32; 8]; 16];
        for lane in 0..32 {
            let (g, q) = (lane / 4, lane % 4);
            for j in 0..2 {
                am[g][2 * q + j] = el(a[lane][0], j);
                am[g + 8][2 * q + j] = el(a[lane][1], j);
                am[g][2 * q + 8 + j] = el(a[lane][2], j);
                am[g + 8][2 * q + 8 + j] = el(a[lane][3], j);
                bm[2 * q + j][g] = el(b[lane][0], j);
                bm[2 * q + 8 + j][g] = el(b[lane][1], j);
            }
        }
        for lane in 0..32 {
            let (g, q) = (lane / 4, lane % 4);
            for (i, row) in [(0, g), (1, g), (2, g + 8), (3, g + 8)] {
                let col = 2 * q + (i & 1);
                c[lane][i] += (0..16).map(|k| am[row][k] * bm[k][col]).sum::<f32>();
            }
        }
    }

    fn pack(lo: f32, hi: f32) -> u32 {
        bf16::from_f32(lo).to_bits() as u32 | (bf16::from_f32(hi).to_bits() as u32) << 16
    }

    /// Small integers: exact in bf16 (and f16) and in f32 sums, so the check is equality.
    fn ints(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 + seed * 13) % 11) as f32 - 5.0).collect()
    }

    /// The shrink's loads (lane (g, q) takes physical k 8q..8q+7 of a 32-wide chunk, two mmas
    /// per chunk) give x[16, K] · w[8, K]ᵀ.
    #[test]
    fn fragment_mapping_shrink() {
        let k = 64;
        let (x, w) = (ints(16 * k, 1), ints(8 * k, 2));
        let mut c = [[0f32; 4]; 32];
        for c0 in (0..k).step_by(32) {
            for half in 0..2 {
                let (mut a, mut b) = ([[0u32; 4]; 32], [[0u32; 2]; 32]);
                for lane in 0..32 {
                    let (g, q) = (lane / 4, lane % 4);
                    // uint4 component j holds physical k 8q + 2j, +1; mma `half` takes .x,.y or .z,.w
                    let kk = |j: usize| c0 + 8 * q + 2 * (2 * half + j);
                    let xp = |row: usize, j: usize| pack(x[row * k + kk(j)], x[row * k + kk(j) + 1]);
                    a[lane] = [xp(g, 0), xp(g + 8, 0), xp(g, 1), xp(g + 8, 1)];
                    b[lane] = [
                        pack(w[g * k + kk(0)], w[g * k + kk(0) + 1]),
                        pack(w[g * k + kk(1)], w[g * k + kk(1) + 1]),
                    ];
                }
                mma_ref(&mut c, &a, &b);
            }
        }
        for lane in 0..32 {
            let (g, q) = (lane / 4, lane % 4);
            for (i, row) in [(0, g), (1, g), (2, g + 8), (3, g + 8)] {
                let col = 2 * q + (i & 1);
                let want: f32 = (0..k).map(|kk| x[row * k + kk] * w[col * k + kk]).sum();
                assert_eq!(c[lane][i], want, "shrink row {row} rank {col}");
            }
        }
    }

    /// The expand's loads (lane (g, q) takes physical ranks 4q..4q+3 of a 16-rank chunk) give
    /// tmp[16, R] · B[8, R]ᵀ, with R = 24 (a partial last chunk, lanes past R loading zeros).
    #[test]
    fn fragment_mapping_expand() {
        let r = 24;
        let (t, bw) = (ints(16 * r, 3), ints(8 * r, 4));
        let mut c = [[0f32; 4]; 32];
        for r0 in (0..r).step_by(16) {
            let (mut a, mut b) = ([[0u32; 4]; 32], [[0u32; 2]; 32]);
            for lane in 0..32 {
                let (g, q) = (lane / 4, lane % 4);
                let rr = r0 + 4 * q;
                let v = |m: &[f32], row: usize, j: usize| if rr < r { m[row * r + rr + j] } else { 0.0 };
                a[lane] = [
                    pack(v(&t, g, 0), v(&t, g, 1)),
                    pack(v(&t, g + 8, 0), v(&t, g + 8, 1)),
                    pack(v(&t, g, 2), v(&t, g, 3)),
                    pack(v(&t, g + 8, 2), v(&t, g + 8, 3)),
                ];
                b[lane] = [pack(v(&bw, g, 0), v(&bw, g, 1)), pack(v(&bw, g, 2), v(&bw, g, 3))];
            }
            mma_ref(&mut c, &a, &b);
        }
        for lane in 0..32 {
            let (g, q) = (lane / 4, lane % 4);
            for (i, row) in [(0, g), (1, g), (2, g + 8), (3, g + 8)] {
                let col = 2 * q + (i & 1);
                let want: f32 = (0..r).map(|j| t[row * r + j] * bw[col * r + j]).sum();
                assert_eq!(c[lane][i], want, "expand token {row} output {col}");
            }
        }
    }
}
