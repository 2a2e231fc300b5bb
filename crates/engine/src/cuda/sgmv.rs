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

use super::gpu::{cfg, Gpu};
use super::launch;
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

pub const SGMV: &str = include_str!("kernels/sgmv.cu");

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
    let [nsub, t, k, r, l] = [w.nsub, t, w.k, w.r, w.max_loras].map(|v| v as i32);
    let c = cfg(grid, SHRINK_THREADS);
    // SAFETY: the group's stacked weights, the step's segments and buffers of its shapes.
    unsafe {
        launch::sgmv_shrink(
            gpu,
            c,
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
        )
    }
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
    let [t, n, r, l, ldy, n1, n2] = [t, w.n, w.r, w.max_loras, ldy, w.n1, w.n2].map(|v| v as i32);
    let (c, (segs, num)) = (cfg(grid, EXPAND_THREADS), (seg.segs, seg.num_segs));
    // SAFETY: the group's stacked weights, the step's segments and buffers of its shapes.
    unsafe { launch::sgmv_expand(gpu, c, tmp, w.b, w.ranks, segs, num, y, t, n, r, l, ldy, n1, n2) }
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
    let [t, k, r, l] = [t, w.k, w.r, w.max_loras].map(|v| v as i32);
    // SAFETY: the group's stacked weights, the step's token slots and buffers of its shapes.
    unsafe {
        launch::lora_shrink(
            gpu,
            name,
            cfg(grid, 256),
            x,
            w.a,
            w.ranks,
            w.scales,
            tok_slot,
            tmp,
            t,
            k,
            r,
            l,
        )
    }
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
    let [t, n, r, l, ldy, n1, n2] = [t, w.n, w.r, w.max_loras, ldy, w.n1, w.n2].map(|v| v as i32);
    // SAFETY: the group's stacked weights, the step's token slots and buffers of its shapes.
    unsafe {
        launch::lora_expand(
            gpu,
            cfg(grid, 256),
            tmp,
            w.b,
            w.ranks,
            tok_slot,
            y,
            t,
            n,
            r,
            l,
            ldy,
            n1,
            n2,
        )
    }
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
