//! The linear layer `y = x · wᵀ (+ bias)` on the CPU: a weight-streaming GEMV for up to a few
//! dozen tokens (each weight row read once per tile of four tokens, so a decode step reads every
//! weight once from memory) and the `gemm` crate's cache-blocked, panel-packing GEMM for more
//! (prefill); [`linear_group`] runs several weights that read the same input in one parallel loop.
//! Weights may be f32, bf16 or f16 ([`WeightElem`]): 16-bit ones are widened as they are loaded
//! (up to four tokens) or a chunk at a time into an f32 copy that stays in cache, so a decode step
//! streams half the bytes from memory and every sum is still f32.

use std::cell::RefCell;

use half::{bf16, f16};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::ops::has_avx2;
use super::ops::SendPtr;
use crate::weights::Weight;

/// Dot product; AVX2+FMA where the CPU has it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, FMA and F16C; both slices have length n.
        return unsafe { avx2::dot_n::<f32, 1>(a, [b]) }[0];
    }
    dot_n::<f32, 1>(a, [b])[0]
}

/// An element of a weight matrix as the linear kernels read it: widened to f32 on load.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// The elements themselves when they are f32 (the GEMM then reads them in place).
    fn as_f32(w: &[Self]) -> Option<&[f32]>;

    /// Eight elements from `p`, widened.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and `p..p + 8` is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn as_f32(w: &[f32]) -> Option<&[f32]> {
        Some(w)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the upper half of an f32.
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p.cast());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

/// `dst[i] = src[i]` widened to f32.
pub fn widen<W: WeightElem>(src: &[W], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, FMA and F16C; the lengths are equal.
        return unsafe { avx2::widen(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Explicit AVX2/FMA kernels: the autovectorizer scalarizes the multi-row accumulators.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::WeightElem;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen<W: WeightElem>(src: &[W], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut k = 0;
        while k + 8 <= n {
            _mm256_storeu_ps(dst.as_mut_ptr().add(k), W::load8(src.as_ptr().add(k)));
            k += 8;
        }
        for kk in k..n {
            dst[kk] = src[kk].to_f32();
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `N` dot products of `w` against `x[r]`, reading `w` once (widened to f32 as it is
    /// loaded); two accumulators per row so FMA latency is hidden. Every `x[r]` must be at
    /// least as long as `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_n<W: WeightElem, const N: usize>(w: &[W], x: [&[f32]; N]) -> [f32; N] {
        let n = w.len();
        for xr in &x {
            assert!(xr.len() >= n);
        }
        let (wp, xp): (*const W, [*const f32; N]) = (w.as_ptr(), std::array::from_fn(|r| x[r].as_ptr()));
        let mut a0 = [_mm256_setzero_ps(); N];
        let mut a1 = [_mm256_setzero_ps(); N];
        let mut k = 0;
        while k + 16 <= n {
            let w0 = W::load8(wp.add(k));
            let w1 = W::load8(wp.add(k + 8));
            for r in 0..N {
                a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[r].add(k)), a0[r]);
                a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp[r].add(k + 8)), a1[r]);
            }
            k += 16;
        }
        if k + 8 <= n {
            let w0 = W::load8(wp.add(k));
            for r in 0..N {
                a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[r].add(k)), a0[r]);
            }
            k += 8;
        }
        std::array::from_fn(|r| {
            let mut s = hsum(_mm256_add_ps(a0[r], a1[r]));
            for kk in k..n {
                s += (*wp.add(kk)).to_f32() * *xp[r].add(kk);
            }
            s
        })
    }
}

/// The AVX-512 GEMV tile: 32 registers hold a tile of 4 weight rows × 4 tokens, so each weight
/// vector loaded feeds four FMAs and each activation vector four (AVX2's 16 registers fit one
/// row × four tokens). f32 weights only: from [`AVX512_MIN_TOKENS`] tokens 16-bit weights come
/// widened into an f32 panel anyway.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `R × N` dot products: weight rows `w[r]` against activation rows `x[c]`, all `len` long.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL; every `w[r]` and `x[c]` points at `len` readable elements.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn dot_tile<const R: usize, const N: usize>(
        w: [*const f32; R],
        x: [*const f32; N],
        len: usize,
    ) -> [[f32; N]; R] {
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let mut k = 0;
        while k < len {
            // The last block loads only its first n lanes (masked lanes are not read) as 0.
            let n = (len - k).min(16);
            let mask = ((1u32 << n) - 1) as u16;
            let mut xs = [_mm512_setzero_ps(); N];
            for c in 0..N {
                xs[c] = _mm512_maskz_loadu_ps(mask, x[c].add(k));
            }
            for r in 0..R {
                let wv = _mm512_maskz_loadu_ps(mask, w[r].add(k));
                for c in 0..N {
                    acc[r][c] = _mm512_fmadd_ps(wv, xs[c], acc[r][c]);
                }
            }
            k += 16;
        }
        let mut out = [[0.0; N]; R];
        if R == 4 && N == 4 {
            // The full tile's 16 sums at once, into one register laid out as out[r][c].
            let sums =
                reduce_4x4([acc[0], acc[1], acc[2], acc[3]].map(|row| [row[0], row[1], row[2], row[3]]));
            _mm512_storeu_ps(out.as_mut_ptr().cast(), sums);
            return out;
        }
        for r in 0..R {
            for c in 0..N {
                out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
            }
        }
        out
    }

    /// Lane `4r + c` = the sum of the 16 lanes of `v[r][c]`: a transpose-and-add tree of 15
    /// shuffles and 15 adds, where a horizontal sum of each register would take ~8 instructions
    /// apiece.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn reduce_4x4(v: [[__m512; 4]; 4]) -> __m512 {
        // Per 128-bit lane, two registers' four elements into two partial sums each:
        // [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
        let pair = |a, b| _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        // Per 128-bit lane, [a, b, c, d]'s sums of that lane's four elements.
        let quad = |v: [__m512; 4]| {
            let (ab, cd) = (pair(v[0], v[1]), pair(v[2], v[3]));
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(ab, cd),
                _mm512_shuffle_ps::<0xEE>(ab, cd),
            )
        };
        let z = v.map(quad);
        // Across the four 128-bit lanes: z[r]'s lanes summed into lane r.
        let half = |a, b| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            )
        };
        let (u01, u23) = (half(z[0], z[1]), half(z[2], z[3]));
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(u01, u23),
            _mm512_shuffle_f32x4::<0xDD>(u01, u23),
        )
    }
}

/// `N` dot products of one weight row against `N` activation rows, reading `w` once: the
/// portable path (aarch64, or x86 without AVX2).
#[inline(always)]
fn dot_n<W: WeightElem, const N: usize>(w: &[W], x: [&[f32]; N]) -> [f32; N] {
    let n = w.len();
    let mut acc = [[0.0f32; 8]; N];
    let full = n / 8 * 8;
    let mut k = 0;
    while k < full {
        let wc = &w[k..k + 8];
        for (a, xr) in acc.iter_mut().zip(&x) {
            let xc = &xr[k..k + 8];
            for j in 0..8 {
                a[j] += wc[j].to_f32() * xc[j];
            }
        }
        k += 8;
    }
    std::array::from_fn(|r| {
        let a = &acc[r];
        let tail: f32 = (full..n).map(|kk| w[kk].to_f32() * x[r][kk]).sum();
        (a[0] + a[4]) + (a[1] + a[5]) + (a[2] + a[6]) + (a[3] + a[7]) + tail
    })
}

/// One chunk of output features of [`linear`]: rows `o0..` of the weight, all tokens.
struct LinearChunk<'a, W> {
    x: &'a [f32],
    w: &'a [W],
    bias: Option<&'a [f32]>,
    o0: usize,
    num_tokens: usize,
    in_f: usize,
    out_f: usize,
    y: SendPtr,
}

impl<'a, W: WeightElem> LinearChunk<'a, W> {
    /// The same chunk over other weights (its rows widened to f32, say).
    fn with_weights<'b, V>(&self, w: &'b [V]) -> LinearChunk<'b, V>
    where
        'a: 'b,
    {
        LinearChunk {
            x: self.x,
            w,
            bias: self.bias,
            o0: self.o0,
            num_tokens: self.num_tokens,
            in_f: self.in_f,
            out_f: self.out_f,
            y: self.y,
        }
    }

    #[inline(always)]
    fn tile<const N: usize>(&self, t: usize, dot: impl Fn(&[W], [&[f32]; N]) -> [f32; N]) {
        let in_f = self.in_f;
        let xs: [&[f32]; N] = std::array::from_fn(|r| &self.x[(t + r) * in_f..][..in_f]);
        for (ro, wrow) in self.w.chunks_exact(in_f).enumerate() {
            self.store(t, ro, dot(wrow, xs));
        }
    }

    /// Writes token tile `t..t + N` of the chunk's row `ro`, plus the bias.
    #[inline(always)]
    fn store<const N: usize>(&self, t: usize, ro: usize, vals: [f32; N]) {
        let o = self.o0 + ro;
        let b = self.bias.map_or(0.0, |b| b[o]);
        for (r, v) in vals.into_iter().enumerate() {
            // SAFETY: (t + r, o) is written by this chunk only: o lies in this chunk.
            unsafe { *self.y.get().add((t + r) * self.out_f + o) = v + b };
        }
    }

    #[inline(always)]
    fn run_tiles(&self, avx2: bool) {
        let mut t = 0;
        while t < self.num_tokens {
            let nt = (self.num_tokens - t).min(TOKEN_TILE);
            macro_rules! tile {
                ($n:literal) => {{
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: `avx2` is true only when the CPU has AVX2, FMA and F16C.
                        self.tile::<$n>(t, |w, x| unsafe { avx2::dot_n::<W, $n>(w, x) });
                        t += $n;
                        continue;
                    }
                    let _ = avx2;
                    self.tile::<$n>(t, dot_n::<W, $n>);
                }};
            }
            match nt {
                1 => tile!(1),
                2 => tile!(2),
                3 => tile!(3),
                _ => tile!(4),
            }
            t += nt;
        }
    }

    /// [`Self::run_tiles`] with AVX-512's tiles of [`ROW_TILE`] rows × [`TOKEN_TILE`] tokens,
    /// over the chunk's weights `w` as f32.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_avx512(&self, w: &[f32]) {
        let in_f = self.in_f;
        let rows = w.len() / in_f;
        let mut t = 0;
        while t < self.num_tokens {
            let nt = (self.num_tokens - t).min(TOKEN_TILE);
            let mut ro = 0;
            while ro < rows {
                let nr = (rows - ro).min(ROW_TILE);
                macro_rules! tile {
                    ($r:literal, $n:literal) => {{
                        let w = std::array::from_fn(|i| w[(ro + i) * in_f..][..in_f].as_ptr());
                        let x = std::array::from_fn(|c| self.x[(t + c) * in_f..][..in_f].as_ptr());
                        // SAFETY: the CPU has AVX-512 (the caller's contract); rows ro..ro + $r
                        // of the chunk and tokens t..t + $n exist, each in_f long.
                        let vals = unsafe { avx512::dot_tile::<$r, $n>(w, x, in_f) };
                        for (i, v) in vals.into_iter().enumerate() {
                            self.store(t, ro + i, v);
                        }
                    }};
                }
                match (nr, nt) {
                    (4, 4) => tile!(4, 4),
                    (4, 3) => tile!(4, 3),
                    (4, 2) => tile!(4, 2),
                    (4, 1) => tile!(4, 1),
                    (3, 4) => tile!(3, 4),
                    (3, 3) => tile!(3, 3),
                    (3, 2) => tile!(3, 2),
                    (3, 1) => tile!(3, 1),
                    (2, 4) => tile!(2, 4),
                    (2, 3) => tile!(2, 3),
                    (2, 2) => tile!(2, 2),
                    (2, 1) => tile!(2, 1),
                    (_, 4) => tile!(1, 4),
                    (_, 3) => tile!(1, 3),
                    (_, 2) => tile!(1, 2),
                    (_, _) => tile!(1, 1),
                }
                ro += nr;
            }
            t += nt;
        }
    }

    fn run(&self) {
        #[cfg(target_arch = "x86_64")]
        if let Some(w) = W::as_f32(self.w).filter(|_| self.num_tokens >= AVX512_MIN_TOKENS && has_avx512()) {
            // SAFETY: the CPU has AVX-512 F/BW/VL.
            return unsafe { self.run_avx512(w) };
        }
        #[cfg(target_arch = "x86_64")]
        let avx2 = has_avx2();
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        self.run_tiles(avx2)
    }
}

/// Tokens a GEMV tile reads each weight row for.
const TOKEN_TILE: usize = 4;
/// Weight rows an AVX-512 GEMV tile reads at once.
#[cfg(target_arch = "x86_64")]
const ROW_TILE: usize = 4;
/// From this many tokens the GEMV takes AVX-512's 4 × 4 tiles, where they make it faster (the
/// arithmetic is the limit); below, the weight stream is, and one row at a time streams it
/// best. Measured with `examples/cpu_steps.rs` (BENCHMARKS.md, "CPU backend against
/// transformers").
#[cfg(target_arch = "x86_64")]
const AVX512_MIN_TOKENS: usize = 8;

/// AVX-512 F/BW/VL (the 16-bit masked loads need BW and VL), beside AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx512() -> bool {
    has_avx2()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// From this many tokens on, [`linear`] takes the cache-blocked GEMM, which packs the weights on
/// every call; below, the weight-streaming GEMV, which reads each weight once per tile of four
/// tokens from where it lies. Crossover measured with `examples/linear_shapes.rs`
/// (BENCHMARKS.md, "CPU backend against transformers").
pub const GEMM_MIN_TOKENS: usize = 96;

/// `y[T, out] = x[T, in] · w[out, in]ᵀ (+ bias)`: the GEMV for a few tokens, the GEMM for many.
pub fn linear<W: WeightElem>(
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    num_tokens: usize,
    in_f: usize,
    out_f: usize,
    y: &mut [f32],
) {
    linear_split(
        x,
        w,
        bias,
        num_tokens,
        in_f,
        out_f,
        y,
        num_tokens >= GEMM_MIN_TOKENS,
    );
}

/// [`linear`] over a weight matrix kept in any of the CPU's dtypes.
pub fn linear_weight(
    x: &[f32],
    w: &Weight,
    bias: Option<&[f32]>,
    num_tokens: usize,
    in_f: usize,
    out_f: usize,
    y: &mut [f32],
) {
    match w {
        Weight::F32(w) => linear(x, w, bias, num_tokens, in_f, out_f, y),
        Weight::Bf16(w) => linear(x, w, bias, num_tokens, in_f, out_f, y),
        Weight::F16(w) => linear(x, w, bias, num_tokens, in_f, out_f, y),
    }
}

/// One weight matrix of a [`linear_group`]: `y[T, out_f] = x · wᵀ (+ bias)`.
pub struct LinearCall<'a> {
    pub w: &'a Weight,
    pub bias: Option<&'a [f32]>,
    pub out_f: usize,
    pub y: &'a mut [f32],
}

/// Most weight matrices one [`linear_group`] takes (q, k and v).
pub const MAX_GROUP: usize = 3;

/// [`linear_weight`] for up to [`MAX_GROUP`] weight matrices that read the same `x` (q/k/v,
/// gate/up): one parallel loop over the chunks of all of them, so the threads meet once rather
/// than once per matrix, and a thread that finishes its share of one matrix moves on to the next.
pub fn linear_group(x: &[f32], num_tokens: usize, in_f: usize, calls: &mut [LinearCall<'_>]) {
    assert!(calls.len() <= MAX_GROUP);
    let gemm = num_tokens >= GEMM_MIN_TOKENS;
    let mut splits = [Split::EMPTY; MAX_GROUP];
    let mut ys = [SendPtr(std::ptr::null_mut()); MAX_GROUP];
    // starts[k]..starts[k + 1]: the chunks of call k in the combined loop.
    let mut starts = [0usize; MAX_GROUP + 1];
    for (k, call) in calls.iter_mut().enumerate() {
        let len = match call.w {
            Weight::F32(w) => w.len(),
            Weight::Bf16(w) => w.len(),
            Weight::F16(w) => w.len(),
        };
        prepare(x, len, call.bias, num_tokens, in_f, call.out_f, call.y, gemm);
        splits[k] = Split::new(call.out_f, gemm);
        ys[k] = SendPtr(call.y.as_mut_ptr());
        starts[k + 1] = starts[k] + splits[k].chunks;
    }
    let calls = &*calls;
    (0..starts[calls.len()]).into_par_iter().for_each(|j| {
        let k = (0..calls.len())
            .rfind(|&k| starts[k] <= j)
            .expect("starts[0] is 0");
        let LinearCall { w, bias, out_f, .. } = calls[k];
        let (split, c, y) = (splits[k], j - starts[k], ys[k]);
        // SAFETY: `prepare` checked every call's buffers; chunks of one call write disjoint
        // columns of its own y, which aliases no other call's y, nor x or any weight.
        unsafe {
            match w {
                Weight::F32(w) => run_chunk(x, w, bias, num_tokens, in_f, out_f, split, c, y),
                Weight::Bf16(w) => run_chunk(x, w, bias, num_tokens, in_f, out_f, split, c, y),
                Weight::F16(w) => run_chunk(x, w, bias, num_tokens, in_f, out_f, split, c, y),
            }
        }
    });
}

/// Column chunks of [`linear_gemm`]: several a thread, so a thread the OS preempts (a shared
/// machine) does not hold up the step; at least this many output features each.
const LINEAR_CHUNKS_PER_THREAD: usize = 8;
const LINEAR_MIN_CHUNK: usize = 64;

/// How a linear call splits its output features (rows of `w`) over threads.
#[derive(Clone, Copy)]
struct Split {
    /// the cache-blocked GEMM, not the GEMV
    gemm: bool,
    /// rows of `w` a chunk
    rows: usize,
    chunks: usize,
}

impl Split {
    const EMPTY: Split = Split {
        gemm: false,
        rows: 1,
        chunks: 0,
    };

    fn new(out_f: usize, gemm: bool) -> Split {
        let threads = rayon::current_num_threads();
        let rows = if gemm {
            // A multiple of 16 columns (one AVX-512 register of f32) so microkernels stay full.
            (out_f / (threads * LINEAR_CHUNKS_PER_THREAD))
                .max(LINEAR_MIN_CHUNK)
                .div_ceil(16)
                * 16
        } else {
            // Enough chunks to balance the threads, each a few rows so the weight chunk stays
            // in cache while every token tile streams past it.
            (out_f / (threads * 8)).clamp(4, 64)
        };
        Split {
            gemm,
            rows,
            chunks: out_f.div_ceil(rows),
        }
    }
}

/// Checks a linear call's buffers and, for the GEMM (which accumulates onto `y`), writes the
/// bias into `y` first.
#[allow(clippy::too_many_arguments)]
fn prepare(
    x: &[f32],
    w_len: usize,
    bias: Option<&[f32]>,
    num_tokens: usize,
    in_f: usize,
    out_f: usize,
    y: &mut [f32],
    gemm: bool,
) {
    assert_eq!(w_len, in_f * out_f);
    assert!(x.len() >= num_tokens * in_f && y.len() >= num_tokens * out_f);
    if let Some(b) = bias {
        assert_eq!(b.len(), out_f);
        if gemm {
            for row in y[..num_tokens * out_f].chunks_exact_mut(out_f) {
                row.copy_from_slice(b);
            }
        }
    }
}

/// [`linear`] taking the GEMM (`gemm`) or the GEMV whatever the token count.
#[allow(clippy::too_many_arguments)]
fn linear_split<W: WeightElem>(
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    num_tokens: usize,
    in_f: usize,
    out_f: usize,
    y: &mut [f32],
    gemm: bool,
) {
    prepare(x, w.len(), bias, num_tokens, in_f, out_f, y, gemm);
    let split = Split::new(out_f, gemm);
    let yp = SendPtr(y.as_mut_ptr());
    // SAFETY: `prepare` checked the buffers; chunks write disjoint columns of y, which aliases
    // neither x nor w.
    (0..split.chunks)
        .into_par_iter()
        .for_each(|c| unsafe { run_chunk(x, w, bias, num_tokens, in_f, out_f, split, c, yp) });
}

/// [`linear`] through `gemm`: packs cache-sized panels of `x` and `wᵀ` and runs a register-tiled
/// microkernel picked at run time (AVX-512, AVX2/FMA, NEON or scalar). Threads split the output
/// features (contiguous rows of `w`), each a single-threaded `gemm` over all tokens: `gemm`'s
/// own rayon split cost more in hand-offs than it gained at these sizes on 2 cores. Packing
/// the weights on every call pays only with many tokens (see [`GEMM_MIN_TOKENS`]). 16-bit
/// weights are widened `GEMM_WIDEN_ROWS` rows at a time into a per-thread f32 panel first:
/// with at least [`GEMM_MIN_TOKENS`] tokens that costs well under 1% of the arithmetic.
pub fn linear_gemm<W: WeightElem>(
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    num_tokens: usize,
    in_f: usize,
    out_f: usize,
    y: &mut [f32],
) {
    linear_split(x, w, bias, num_tokens, in_f, out_f, y, true);
}

/// [`linear`] by streaming weights: output features are split across threads and each weight
/// row is read once per tile of four tokens.
pub fn linear_gemv<W: WeightElem>(
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    num_tokens: usize,
    in_f: usize,
    out_f: usize,
    y: &mut [f32],
) {
    linear_split(x, w, bias, num_tokens, in_f, out_f, y, false);
}

/// Chunk `c` of a linear call split by `split`: rows `c · split.rows..` of `w`, i.e. those
/// columns of `y[T, out]`, over every token.
///
/// # Safety
/// `y` points at a `[num_tokens, out_f]` buffer (holding the bias already for the GEMM), `x`
/// and `w` are as [`prepare`] checked, and no other thread writes this chunk's columns
/// meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn run_chunk<W: WeightElem>(
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    num_tokens: usize,
    in_f: usize,
    out_f: usize,
    split: Split,
    c: usize,
    y: SendPtr,
) {
    let o0 = c * split.rows;
    let wchunk = &w[o0 * in_f..((o0 + split.rows).min(out_f)) * in_f];
    if split.gemm {
        // SAFETY (both calls): `rows` holds whole rows of w starting at row o, those columns
        // of y lie within [T, out], and y aliases neither x nor w nor the panel.
        match W::as_f32(wchunk) {
            Some(rows) => gemm_rows(x, rows, bias.is_some(), num_tokens, in_f, out_f, o0, y),
            None => WIDE_PANEL.with_borrow_mut(|panel| {
                for (p, rows) in wchunk.chunks(GEMM_WIDEN_ROWS * in_f).enumerate() {
                    panel.resize(rows.len(), 0.0);
                    widen(rows, panel);
                    let o = o0 + p * GEMM_WIDEN_ROWS;
                    gemm_rows(x, panel, bias.is_some(), num_tokens, in_f, out_f, o, y)
                }
            }),
        }
        return;
    }
    let chunk = LinearChunk {
        x,
        w: wchunk,
        bias,
        o0,
        num_tokens,
        in_f,
        out_f,
        y,
    };
    // 16-bit weights read by more than one token tile are widened once, into an f32 copy of the
    // chunk that stays in cache for every tile, rather than once per tile: the bytes from memory
    // are still 16-bit.
    if num_tokens > TOKEN_TILE && W::as_f32(wchunk).is_none() {
        WIDE_PANEL.with_borrow_mut(|panel| {
            panel.resize(wchunk.len(), 0.0);
            widen(wchunk, panel);
            chunk.with_weights(&panel[..]).run()
        });
    } else {
        chunk.run();
    }
}

/// Rows of 16-bit weights [`linear_gemm`] widens at a time: a multiple of 16 (full microkernel
/// columns), and 128 rows of 4096 f32 (2 MiB) stay in L2/L3 while `gemm` packs them.
const GEMM_WIDEN_ROWS: usize = 128;

thread_local! {
    /// Widened 16-bit weights: `[GEMM_WIDEN_ROWS, in]` of [`linear_gemm`], or one chunk of
    /// [`linear_gemv`]
    static WIDE_PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One single-threaded `gemm`: columns `o..o + n` of `y[T, out]` (+)= `x[T, in] · rowsᵀ`, where
/// `rows` is `[n, in]` (rows `o..` of the weight).
///
/// # Safety
/// `y` points at a `[num_tokens, out_f]` buffer, `o + n <= out_f`, no other thread writes
/// those columns meanwhile, and `y` aliases neither `x` nor `rows`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows(
    x: &[f32],
    rows: &[f32],
    read_dst: bool,
    num_tokens: usize,
    in_f: usize,
    out_f: usize,
    o: usize,
    y: SendPtr,
) {
    let n = rows.len() / in_f;
    assert!(x.len() >= num_tokens * in_f && o + n <= out_f);
    // x is [T, in] row-major, rows read as rowsᵀ [in, n], y's columns o.. with row stride out_f.
    let rhs = Rhs::Transposed(rows.as_ptr(), in_f);
    let y = y.get().add(o);
    sgemm(
        (num_tokens, n, in_f),
        (y, out_f),
        read_dst,
        (x.as_ptr(), in_f),
        rhs,
        1.0,
        false,
    )
}

/// The right operand of [`sgemm`], `[k, n]`: stored row-major with this row stride, or stored
/// as its transpose `[n, k]` (row stride given) and read transposed.
#[derive(Clone, Copy)]
pub(crate) enum Rhs {
    RowMajor(*const f32, usize),
    Transposed(*const f32, usize),
}

/// `dst[m, n] = (dst if accumulate) + scale · lhs[m, k] · rhs[k, n]` in f32 with the `gemm`
/// crate, `dst` and `lhs` row-major with the given row strides; on rayon's threads with
/// `parallel`, else on this one.
///
/// # Safety
/// Every operand holds its `[rows, cols]` at its strides, `dst` aliases neither input, and no
/// other thread touches `dst`'s elements meanwhile.
pub(crate) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    (lhs, lhs_rs): (*const f32, usize),
    rhs: Rhs,
    scale: f32,
    parallel: bool,
) {
    let (rhs, rhs_cs, rhs_rs) = match rhs {
        Rhs::RowMajor(p, rs) => (p, 1, rs as isize),
        Rhs::Transposed(p, rs) => (p, rs as isize, 1),
    };
    let par = match rayon::current_num_threads() {
        n if parallel && n > 1 => gemm::Parallelism::Rayon(n),
        _ => gemm::Parallelism::None,
    };
    let alpha = if accumulate { 1.0 } else { 0.0 };
    // gemm takes each operand as (column stride, row stride).
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        1,
        lhs_rs as isize,
        rhs,
        rhs_cs,
        rhs_rs,
        alpha,
        scale,
        false,
        false,
        false,
        par,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_naive_for_all_tile_remainders() {
        let (in_f, out_f) = (37, 70);
        let w: Vec<f32> = (0..in_f * out_f)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let bias: Vec<f32> = (0..out_f).map(|i| i as f32 * 0.01).collect();
        for t in [1, 2, 3, 4, 5, 9] {
            let x: Vec<f32> = (0..t * in_f)
                .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
                .collect();
            let mut y = vec![0.0; t * out_f];
            linear(&x, &w, Some(&bias), t, in_f, out_f, &mut y);
            for tt in 0..t {
                for o in 0..out_f {
                    let want: f32 =
                        (0..in_f).map(|k| x[tt * in_f + k] * w[o * in_f + k]).sum::<f32>() + bias[o];
                    assert!((y[tt * out_f + o] - want).abs() < 1e-4, "t={t} ({tt},{o})");
                }
            }
        }
    }

    /// `x · wᵀ + bias` by the definition, in f64.
    fn naive(x: &[f32], w: &[f32], bias: &[f32], t: usize, in_f: usize, out_f: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; t * out_f];
        for tt in 0..t {
            for o in 0..out_f {
                let dot: f64 = (0..in_f)
                    .map(|k| x[tt * in_f + k] as f64 * w[o * in_f + k] as f64)
                    .sum();
                y[tt * out_f + o] = (dot + bias[o] as f64) as f32;
            }
        }
        y
    }

    #[test]
    fn widen_matches_the_scalar_conversion_for_every_bit_pattern() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let b: Vec<bf16> = all.iter().map(|&u| bf16::from_bits(u)).collect();
        let h: Vec<f16> = all.iter().map(|&u| f16::from_bits(u)).collect();
        let mut out = vec![0.0f32; all.len()];
        // An odd length, so the scalar tail runs too.
        widen(&b[..all.len() - 3], &mut out[..all.len() - 3]);
        for (i, (&o, v)) in out.iter().zip(&b[..all.len() - 3]).enumerate() {
            let want = v.to_f32();
            assert!(
                o.to_bits() == want.to_bits() || (o.is_nan() && want.is_nan()),
                "bf16 {i:#x}"
            );
        }
        widen(&h[..all.len() - 3], &mut out[..all.len() - 3]);
        for (i, (&o, v)) in out.iter().zip(&h[..all.len() - 3]).enumerate() {
            let want = f16::to_f32(*v);
            assert!(
                o.to_bits() == want.to_bits() || (o.is_nan() && want.is_nan()),
                "f16 {i:#x}"
            );
        }
    }

    /// The portable dot products (what aarch64 runs) against the AVX2 ones and a plain sum, for
    /// each weight type, across lengths around the 8-wide blocks.
    #[test]
    fn portable_and_avx2_dot_products_agree() {
        fn check<W: WeightElem>(narrow: fn(f32) -> W) {
            for n in [1, 7, 8, 9, 16, 17, 45] {
                let w: Vec<W> = (0..n).map(|i| narrow((i as f32 * 0.37).cos())).collect();
                let x: Vec<Vec<f32>> = (0..3)
                    .map(|r| (0..n).map(|i| ((i + r) as f32 * 0.91).sin()).collect())
                    .collect();
                let xs = [&x[0][..], &x[1][..], &x[2][..]];
                let want: Vec<f32> = xs
                    .iter()
                    .map(|xr| w.iter().zip(*xr).map(|(a, b)| a.to_f32() * b).sum())
                    .collect();
                let portable = dot_n::<W, 3>(&w, xs);
                #[cfg(target_arch = "x86_64")]
                let fast = if has_avx2() {
                    // SAFETY: the CPU has AVX2, FMA and F16C; every x row is as long as w.
                    unsafe { avx2::dot_n::<W, 3>(&w, xs) }
                } else {
                    portable
                };
                #[cfg(not(target_arch = "x86_64"))]
                let fast = portable;
                for r in 0..3 {
                    assert!((portable[r] - want[r]).abs() < 1e-5, "portable n={n} row {r}");
                    assert!((fast[r] - want[r]).abs() < 1e-5, "avx2 n={n} row {r}");
                }
            }
        }
        check::<f32>(|x| x);
        check(bf16::from_f32);
        check(f16::from_f32);
    }

    /// 16-bit weights give what f32 weights holding the same (widened) values give, on the GEMV
    /// and GEMM paths, across odd shapes and thread counts.
    #[test]
    fn sixteen_bit_weights_match_their_widened_values() {
        fn check<W: WeightElem>(name: &str, narrow: fn(f32) -> W) {
            for (in_f, out_f) in [(37, 70), (130, 333), (5, 1), (24, 150)] {
                let w: Vec<W> = (0..in_f * out_f)
                    .map(|i| narrow(((i * 7919) % 101) as f32 / 50.0 - 1.0))
                    .collect();
                let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                let bias: Vec<f32> = (0..out_f).map(|i| i as f32 * 0.01 - 0.2).collect();
                for t in [1, 3, 4, 9, GEMM_MIN_TOKENS + 5] {
                    let x: Vec<f32> = (0..t * in_f)
                        .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
                        .collect();
                    let want = naive(&x, &wf, &bias, t, in_f, out_f);
                    for threads in [1, 3] {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        for (path, f) in [
                            (
                                "gemm",
                                linear_gemm::<W>
                                    as fn(&[f32], &[W], Option<&[f32]>, usize, usize, usize, &mut [f32]),
                            ),
                            ("gemv", linear_gemv::<W>),
                        ] {
                            let mut y = vec![f32::NAN; t * out_f];
                            pool.install(|| f(&x, &w, Some(&bias), t, in_f, out_f, &mut y));
                            for i in 0..t * out_f {
                                let tol = 1e-4 * (1.0 + want[i].abs());
                                assert!(
                                    (y[i] - want[i]).abs() < tol,
                                    "{name} {path} {in_f}x{out_f} t={t} [{i}]: {} vs {}",
                                    y[i],
                                    want[i]
                                );
                            }
                        }
                    }
                }
            }
        }
        check("bf16", bf16::from_f32);
        check("f16", f16::from_f32);
    }

    #[test]
    fn gemm_and_gemv_match_naive_across_odd_shapes_and_thread_counts() {
        // Sizes off every block: output features not a multiple of 16, of 4 (AVX-512's row
        // tile) or of the thread split, inputs not a multiple of 8, and token counts on both
        // sides of GEMM_MIN_TOKENS and of the GEMV's 4-token tile.
        for (in_f, out_f) in [(37, 70), (64, 17), (130, 333), (5, 1), (33, 75)] {
            let w: Vec<f32> = (0..in_f * out_f)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..out_f).map(|i| i as f32 * 0.01 - 0.2).collect();
            for t in [1, 2, 3, 7, 8, 11, 15, 17, 70, GEMM_MIN_TOKENS + 5] {
                let x: Vec<f32> = (0..t * in_f)
                    .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
                    .collect();
                let want = naive(&x, &w, &bias, t, in_f, out_f);
                let want_nb = naive(&x, &w, &vec![0.0; out_f], t, in_f, out_f);
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    for (name, f) in [
                        (
                            "gemm",
                            linear_gemm
                                as fn(&[f32], &[f32], Option<&[f32]>, usize, usize, usize, &mut [f32]),
                        ),
                        ("gemv", linear_gemv),
                        ("linear", linear),
                    ] {
                        // NaN-filled: every element must be written (and the bias one read).
                        let mut y = vec![f32::NAN; t * out_f + 3];
                        pool.install(|| f(&x, &w, Some(&bias), t, in_f, out_f, &mut y));
                        let mut y_nb = vec![f32::NAN; t * out_f];
                        pool.install(|| f(&x, &w, None, t, in_f, out_f, &mut y_nb));
                        for i in 0..t * out_f {
                            let tol = 1e-4 * (1.0 + want[i].abs());
                            assert!(
                                (y[i] - want[i]).abs() < tol,
                                "{name} {in_f}x{out_f} t={t} [{i}]: {} vs {}",
                                y[i],
                                want[i]
                            );
                            assert!(
                                (y_nb[i] - want_nb[i]).abs() < tol,
                                "{name} {in_f}x{out_f} t={t} [{i}] no bias"
                            );
                        }
                        assert!(
                            y[t * out_f..].iter().all(|v| v.is_nan()),
                            "{name} wrote past [T, out]"
                        );
                    }
                }
            }
        }
    }
}
