//! Sampling on the device, so a step copies back `num_seqs` token ids instead of
//! `[num_seqs, vocab]` logits. One launch samples the whole batch, a block per row, greedy and
//! sampled rows alike, with the host sampler's semantics (`crate::sampling`): banned ids get
//! -inf; temperature 0 takes the argmax (first index on ties); otherwise logits / temperature →
//! top-k → top-p → a draw with the row's random number.
//!
//! Instead of sorting 32k–152k logits per row, top-k and top-p are thresholds on the logit,
//! found by bisection over the logit's order-preserving u32 key (exact, at most 32 block-wide
//! passes each; none for greedy rows or disabled filters). Ties at a threshold are all kept: a
//! row whose k-th largest logit is tied keeps every token of that value (more than `top_k`),
//! and the top-p cut keeps every token tied with the last one needed to reach `top_p`, where
//! the host sampler keeps an arbitrary subset of the ties. Sums are reduced in a fixed order, so
//! the same random number draws the same token on every run.
//!
//! Parameters live in persistent device buffers, written before each step (and each replay of
//! a captured decode graph), like the model's other inputs.

use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{cfg, DevBuf, Gpu, KernelArg};
use crate::backend::SamplingBatch;
use crate::error::Result;

/// u32 words of one row's parameters on the device (`ROW_WORDS` in the kernel).
const ROW_WORDS: usize = 8;
/// Banned ids the device buffer holds per sequence of the largest batch (shared by the step's
/// rows); a step that bans more is sampled on the host.
const BANNED_PER_SEQ: usize = 16;
/// Threads of a sampling block (`SAMPLE_THREADS`).
const THREADS: u32 = 1024;

/// The kernels, compiled as their own module after the shared prelude.
pub const BODY: &str = r#"
#define SAMPLE_THREADS 1024
#define ROW_WORDS 8

// A u32 whose unsigned order is the float order (-inf lowest), so a threshold on the logit is
// an integer bisection.
__device__ __forceinline__ u32 order_key(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A logit as the sampler reads it: NaN counts as -inf (never drawn).
__device__ __forceinline__ float logit_at(const float* x, int i) {
    float v = x[i];
    return v > -INFINITY ? v : -INFINITY;
}

// Unnormalized probability of logit l at inverse temperature inv_t, the row's maximum m at 1.
__device__ __forceinline__ float prob(float l, float m, float inv_t) { return expf((l - m) * inv_t); }

__device__ __forceinline__ u64 splitmix64(u64 z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Sum over the block of a count; every thread gets it.
__device__ u32 block_count(u32 v) {
    __shared__ u32 part[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    u32 s = 0;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) s += part[i];
    return s;
}

// Exclusive prefix sum in thread order; *total gets the block's sum. Fixed association, so it is
// the same on every run.
__device__ float block_exclusive_sum(float v, float* total) {
    __shared__ float part[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float s = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float t = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += t;
    }
    float excl = __shfl_up_sync(0xffffffffu, s, 1);
    if (lane == 0) excl = 0.f;
    __syncthreads();
    if (lane == 31) part[warp] = s;
    __syncthreads();
    float before = 0.f, all = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
        if (w < warp) before += part[w];
        all += part[w];
    }
    *total = all;
    return before + excl;
}

// Largest value over the block and its first index (the lower index on ties, as torch.argmax);
// every thread gets both.
__device__ void block_argmax(float* best, int* idx) {
    __shared__ float sv[32];
    __shared__ int si[32];
    float b = *best;
    int bi = *idx;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, b, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > b || (ov == b && oi < bi)) { b = ov; bi = oi; }
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) { sv[warp] = b; si[warp] = bi; }
    __syncthreads();
    b = sv[0];
    bi = si[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++)
        if (sv[w] > b || (sv[w] == b && si[w] < bi)) { b = sv[w]; bi = si[w]; }
    *best = b;
    *idx = bi;
}

// Per-thread mass of the tokens whose key is at least thr.
__device__ float kept_mass(const float* x, int V, u32 thr, float m, float inv_t) {
    float s = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float l = logit_at(x, i);
        if (order_key(l) >= thr) s += prob(l, m, inv_t);
    }
    return s;
}

// One token per row. logits: [S, V] f32, banned ids set to -inf in place (so logits copied back
// are the ones drawn from); rows: [S, ROW_WORDS] u32 = temperature (f32 bits), top_p (f32 bits),
// top_k (0: off), banned ids [lo, hi) in banned, random (u64, low word first), unused;
// ids: [S]. grid S, SAMPLE_THREADS threads.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(float* logits, int V, const u32* rows,
                                                                       const u32* banned, u32* ids) {
    pdl_begin();
    int tid = threadIdx.x, nt = blockDim.x;
    float* x = logits + (size_t)blockIdx.x * V;
    const u32* r = rows + (size_t)blockIdx.x * ROW_WORDS;
    float temperature = __uint_as_float(r[0]), top_p = __uint_as_float(r[1]);
    u32 top_k = r[2];
    u64 random = (u64)r[5] | ((u64)r[6] << 32);
    for (u32 b = r[3] + tid; b < r[4]; b += nt) {
        u32 id = banned[b];
        if (id < (u32)V) x[id] = -INFINITY;
    }
    // Also makes the block's writes above visible to its reads below.
    __syncthreads();

    float m = -INFINITY;
    int am = 0x7fffffff;
    for (int i = tid; i < V; i += nt) {
        float v = x[i];
        if (v > m) { m = v; am = i; }
    }
    block_argmax(&m, &am);
    if (am >= V) am = 0;  // every logit -inf or NaN: token 0, as the host argmax
    // Greedy; or a temperature so small that 1 / t overflows; or nothing finite to draw from.
    float inv_t = 1.f / temperature;
    if (temperature == 0.f || !(inv_t < INFINITY) || top_k == 1 || !(m > -INFINITY && m < INFINITY)) {
        if (tid == 0) ids[blockIdx.x] = (u32)am;
        return;
    }
    u32 key_max = order_key(m);
    // Tokens whose key is >= thr are kept; order_key(-inf) keeps all.
    u32 thr = order_key(-INFINITY);
    if (top_k > 1 && top_k < (u32)V) {
        // The largest threshold that keeps at least top_k tokens (the k-th largest logit).
        // Invariant: count(lo) >= top_k > count(hi).
        u32 lo = thr, hi = key_max + 1;
        while (hi - lo > 1) {
            u32 mid = lo + (hi - lo) / 2, c = 0;
            for (int i = tid; i < V; i += nt) c += order_key(logit_at(x, i)) >= mid ? 1u : 0u;
            if (block_count(c) >= top_k) lo = mid; else hi = mid;
        }
        thr = lo;
    }
    if (top_p < 1.f) {
        // The largest threshold that still keeps top_p of the top-k mass: the smallest set of
        // most likely tokens reaching top_p. Invariant: mass(lo) >= want > mass(hi).
        float want = top_p * block_sum(kept_mass(x, V, thr, m, inv_t));
        u32 lo = thr, hi = key_max + 1;
        while (hi - lo > 1) {
            u32 mid = lo + (hi - lo) / 2;
            if (block_sum(kept_mass(x, V, mid, m, inv_t)) >= want) lo = mid; else hi = mid;
        }
        thr = lo;
    }

    // The draw: target = u * total mass; the thread whose slice of the prefix sum (in thread
    // order, then index order within a thread) holds the target walks its tokens.
    float total, part = kept_mass(x, V, thr, m, inv_t);
    float excl = block_exclusive_sum(part, &total);
    float target = (float)(splitmix64(random) >> 40) * (1.f / 16777216.f) * total;
    __shared__ int first, last;
    if (tid == 0) { first = nt; last = -1; }
    __syncthreads();
    if (part > 0.f) {
        atomicMax(&last, tid);
        if (target < excl + part) atomicMin(&first, tid);
    }
    __syncthreads();
    // Past the total (float rounding) the last thread with mass takes its last kept token.
    // The maximum's mass is 1, so some thread has mass; thread 0 writes the argmax otherwise.
    int owner = first < nt ? first : (last >= 0 ? last : 0);
    if (tid == owner) {
        float rest = target - excl;
        int pick = am;
        for (int i = tid; i < V; i += nt) {
            float l = logit_at(x, i);
            if (order_key(l) < thr) continue;
            float p = prob(l, m, inv_t);
            if (p <= 0.f) continue;
            pick = i;
            if (rest < p) break;
            rest -= p;
        }
        ids[blockIdx.x] = (u32)pick;
    }
}
"#;

/// Kernel names of [`BODY`].
pub const NAMES: &[&str] = &["sample_rows"];

/// The device side of sampling: per-row parameters and banned ids (persistent, so a captured
/// graph reads each step's values), and the sampled ids.
pub struct DeviceSampler {
    max_rows: usize,
    /// `[max_rows, ROW_WORDS]` u32
    rows: DevBuf,
    /// `[max_rows * BANNED_PER_SEQ]` u32
    banned: DevBuf,
    /// `[max_rows]` u32
    ids: DevBuf,
    host_rows: Vec<u32>,
    host_ids: Vec<u32>,
}

impl DeviceSampler {
    pub fn new(gpu: &Gpu, max_rows: usize) -> Result<Self> {
        Ok(DeviceSampler {
            max_rows,
            rows: gpu.alloc(max_rows * ROW_WORDS * 4)?,
            banned: gpu.alloc(max_rows * BANNED_PER_SEQ * 4)?,
            ids: gpu.alloc(max_rows * 4)?,
            host_rows: Vec::with_capacity(max_rows * ROW_WORDS),
            host_ids: Vec::with_capacity(max_rows),
        })
    }

    /// Whether the device buffers hold this step's rows and banned ids.
    pub fn fits(&self, s: &SamplingBatch) -> bool {
        s.rows.len() <= self.max_rows && s.banned.len() <= self.max_rows * BANNED_PER_SEQ
    }

    /// Writes the rows' parameters to the device, padded to `num_rows` with greedy rows (the
    /// rows a graph bucket pads with).
    pub fn upload(&mut self, gpu: &Gpu, s: &SamplingBatch, num_rows: usize) -> Result<()> {
        assert!(self.fits(s) && s.rows.len() <= num_rows && num_rows <= self.max_rows);
        pack_rows(s, num_rows, &mut self.host_rows);
        gpu.htod(self.rows.ptr, &self.host_rows)?;
        if !s.banned.is_empty() {
            gpu.htod(self.banned.ptr, &s.banned)?;
        }
        Ok(())
    }

    /// Enqueues the sampling of `num_rows` rows of `logits` (`[num_rows, vocab]` f32; banned ids
    /// are set to -inf in place). Capturable.
    pub fn record(&self, gpu: &Gpu, logits: CUdeviceptr, num_rows: usize, vocab: usize) -> Result<()> {
        assert!(num_rows <= self.max_rows);
        if num_rows == 0 {
            return Ok(());
        }
        let args = [
            logits,
            (vocab as i32).bits(),
            self.rows.ptr,
            self.banned.ptr,
            self.ids.ptr,
        ];
        // SAFETY: the arguments match `sample_rows` above; `logits` holds num_rows rows of
        // `vocab`, and the parameter buffers were written for at least num_rows rows.
        unsafe { gpu.launch("sample_rows", cfg((num_rows as u32, 1, 1), THREADS), &args) }
    }

    /// Copies the ids of the first `n` rows to the host (waits for the stream).
    pub fn download_ids(&mut self, gpu: &Gpu, n: usize) -> Result<()> {
        assert!(n <= self.max_rows);
        self.host_ids.resize(n, 0);
        gpu.dtoh(&mut self.host_ids, self.ids.ptr)
    }

    /// The ids of the last [`DeviceSampler::download_ids`].
    pub fn ids(&self) -> &[u32] {
        &self.host_ids
    }
}

/// The device layout of the rows' parameters (`rows` of `sample_rows`), `num_rows` rows, the
/// ones past the batch greedy with nothing banned.
fn pack_rows(s: &SamplingBatch, num_rows: usize, out: &mut Vec<u32>) {
    out.clear();
    for (i, r) in s.rows.iter().enumerate() {
        out.extend([
            r.temperature.to_bits(),
            r.top_p.to_bits(),
            r.top_k,
            s.banned_start[i],
            s.banned_start[i + 1],
            r.random as u32,
            (r.random >> 32) as u32,
            0,
        ]);
    }
    out.resize(num_rows * ROW_WORDS, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RowSampling;

    #[test]
    fn host_constants_match_the_kernel_defines() {
        let defines = [("SAMPLE_THREADS", THREADS as usize), ("ROW_WORDS", ROW_WORDS)];
        crate::cuda::kernels::assert_defines("sampling.rs", BODY, &defines);
    }

    #[test]
    fn rows_pack_as_the_kernel_reads_them() {
        let mut s = SamplingBatch::default();
        s.clear();
        let row = RowSampling {
            temperature: 0.5,
            top_k: 40,
            top_p: 0.9,
            random: 0x1122_3344_5566_7788,
        };
        s.push(row, [3, 9]);
        s.push(RowSampling::default(), []);
        let mut out = Vec::new();
        pack_rows(&s, 3, &mut out);
        assert_eq!(out.len(), 3 * ROW_WORDS);
        assert_eq!(
            out[..ROW_WORDS],
            [
                0.5f32.to_bits(),
                0.9f32.to_bits(),
                40,
                0,
                2,
                0x5566_7788,
                0x1122_3344,
                0
            ]
        );
        // the second row bans nothing: an empty range after the first row's ids
        assert_eq!(out[ROW_WORDS + 3..ROW_WORDS + 5], [2, 2]);
        // padding: greedy (temperature 0), nothing banned
        assert!(out[2 * ROW_WORDS..].iter().all(|&w| w == 0));
    }
}
