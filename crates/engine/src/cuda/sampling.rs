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

use super::gpu::{cfg, DevBuf, Gpu};
use super::launch;
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
pub const BODY: &str = include_str!("kernels/sampling.cu");

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
        let c = cfg((num_rows as u32, 1, 1), THREADS);
        // SAFETY: `logits` holds num_rows rows of `vocab`, and the parameter buffers were
        // written for at least num_rows rows.
        unsafe {
            launch::sample_rows(
                gpu,
                c,
                logits,
                vocab as i32,
                self.rows.ptr,
                self.banned.ptr,
                self.ids.ptr,
            )
        }
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
