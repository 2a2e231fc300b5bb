//! Elementwise CPU kernels of the forward (RMSNorm, SiLU·mul, residual add, RoPE) and the
//! helpers the other kernels share: f32, multithreaded with rayon. The linear layer is in
//! [`super::linear`], attention in [`super::attention`].

use rayon::prelude::*;

use crate::model_config::ModelConfig;
use crate::models::rope;

/// AVX2 with FMA and F16C (every AVX2 CPU has both).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// A raw pointer that may cross threads; each thread writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: used only for accesses to disjoint indices (writes, and the GEMM's read of what it
// accumulates onto) from rayon tasks that all finish before the owning slice is used again.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    // A method (not field access) so closures capture the whole Send wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Defines `fn $name(args)` that runs `$inner(args)` compiled with AVX2 and FMA enabled where
/// the CPU has them, and as built elsewhere (SSE2 on x86-64, NEON on aarch64): `$inner` is a
/// plain `#[inline(always)]` loop the compiler vectorizes for whichever it is inlined into.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $inner:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if $crate::cpu::ops::has_avx2() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    $inner($($arg),*)
                }
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { wide($($arg),*) };
            }
            $inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `e^x` in plain f32 arithmetic that vectorizes (no libm call): `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2` (ln 2 split in two parts, Cody–Waite), `e^r` by the degree-5 polynomial of
/// Cephes' `expf`, and `2^n` written into the exponent bits. Within a few ulp of `f32::exp` on
/// [-87, 88] (tested). Clamped outside that: x ≥ 88 gives e^88 and x ≤ -87.3 (also -inf) about
/// 1.2e-38 rather than a subnormal or 0, which changes nothing for its callers (softmax weights
/// and SiLU; SiLU of |x| ≳ 1e30 is then off, as no activation is). NaN stays NaN.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LO: f32 = -87.3;
    const HI: f32 = 88.0;
    // Adding 1.5 · 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(LO, HI); // NaN stays NaN
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let er = p * (r * r) + r + 1.0;
    // n + 127 in the exponent field: 2^n for n in [-126, 127].
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    er * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// `a · b` over their common length in eight interleaved partial sums, so the loop vectorizes
/// (a single running sum is a dependency chain the compiler may not reorder).
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
    let tail: f32 = a.remainder().iter().zip(b.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0.0f32; 8];
    for (x, y) in a.zip(b) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Σ `a[i]`, vectorized as [`dot_lanes`] is.
#[inline(always)]
pub(crate) fn sum_lanes(a: &[f32]) -> f32 {
    let chunks = a.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    let mut acc = [0.0f32; 8];
    for x in chunks {
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// RMSNorm over rows of `hidden` features, as HF computes it (f32 mean of squares).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .for_each(|(o, xr)| rms_norm_row(xr, w, eps, o));
}

multiversion! {
    /// One row of [`rms_norm`].
    pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) => rms_norm_row_impl
}

#[inline(always)]
fn rms_norm_row_impl(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = dot_lanes(x, x) / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// In-place per-head RMSNorm (Qwen3's q_norm/k_norm): rows of `head_dim`.
pub fn rms_norm_heads(x: &mut [f32], w: &[f32], eps: f32) {
    x.par_chunks_mut(w.len())
        .for_each(|row| rms_norm_head(row, w, eps));
}

multiversion! {
    fn rms_norm_head(row: &mut [f32], w: &[f32], eps: f32) => rms_norm_head_impl
}

#[inline(always)]
fn rms_norm_head_impl(row: &mut [f32], w: &[f32], eps: f32) {
    let ms = dot_lanes(row, row) / row.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for (v, &g) in row.iter_mut().zip(w) {
        *v = g * (*v * inv);
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gate.par_chunks_mut(4096)
        .zip(up.par_chunks(4096))
        .for_each(|(g, u)| silu_mul_chunk(g, u));
}

multiversion! {
    fn silu_mul_chunk(gate: &mut [f32], up: &[f32]) => silu_mul_chunk_impl
}

#[inline(always)]
fn silu_mul_chunk_impl(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + fast_exp(-*g)) * u;
    }
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(4096)
        .zip(y.par_chunks(4096))
        .for_each(|(a, b)| add_chunk(a, b));
}

multiversion! {
    fn add_chunk(x: &mut [f32], y: &[f32]) => add_chunk_impl
}

#[inline(always)]
fn add_chunk_impl(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotary embedding tables, `[max_positions, head_dim / 2]` each, HF's non-interleaved layout.
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, max_positions: usize) -> Self {
        let (cos, sin) = rope::tables(cfg, max_positions);
        Rope {
            half: cfg.head_dim / 2,
            cos,
            sin,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates `x: [T, num_heads * head_dim]` in place; `positions: [T]`.
    pub fn apply(&self, x: &mut [f32], positions: &[u32], num_heads: usize) {
        let half = self.half;
        let row = num_heads * 2 * half;
        x.par_chunks_mut(row)
            .zip(positions.par_iter())
            .for_each(|(xt, &p)| {
                let p = p as usize;
                let (cos, sin) = (
                    &self.cos[p * half..(p + 1) * half],
                    &self.sin[p * half..(p + 1) * half],
                );
                for head in xt.chunks_exact_mut(2 * half) {
                    let (lo, hi) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = b * cos[i] + a * sin[i];
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm_and_clamps_at_the_ends() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let rel = ((fast_exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.000_37;
        }
        // 4 ulp of f32 is 4.8e-7 relative.
        assert!(worst < 4.8e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(f32::NEG_INFINITY) < 1.3e-38 && fast_exp(-1000.0) >= 0.0);
        assert!(fast_exp(100.0).is_finite() && fast_exp(f32::INFINITY).is_finite());
        assert!(fast_exp(f32::NAN).is_nan());
    }

    #[test]
    fn elementwise_kernels_match_their_definitions() {
        let n = 4096 + 37; // one full chunk and a ragged one
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0)
            .collect();
        let u: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729) % 997) as f32 / 500.0 - 1.0)
            .collect();
        let mut got = g.clone();
        silu_mul(&mut got, &u);
        for i in 0..n {
            let want = (g[i] as f64 / (1.0 + (-g[i] as f64).exp()) * u[i] as f64) as f32;
            assert!((got[i] - want).abs() <= 1e-6 * (1.0 + want.abs()), "silu {i}");
        }
        let mut sum = g.clone();
        add_inplace(&mut sum, &u);
        assert!(sum.iter().zip(g.iter().zip(&u)).all(|(s, (a, b))| *s == a + b));
        let (h, w) = (37, vec![0.5f32; 37]);
        let mut out = vec![0.0; 2 * h];
        rms_norm(&g[..2 * h], &w, 1e-5, &mut out);
        for r in 0..2 {
            let row = &g[r * h..(r + 1) * h];
            let ms = row.iter().map(|v| (v * v) as f64).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for i in 0..h {
                let want = 0.5 * row[i] as f64 * inv;
                assert!((out[r * h + i] as f64 - want).abs() < 1e-5, "rms {r} {i}");
            }
        }
    }
}
