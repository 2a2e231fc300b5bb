//! Attention for prefill and mixed steps on tensor cores (`prefill_attention.cu`): which kernel
//! takes a head size, the query tiles a step is cut into (packed on the host with the step's
//! inputs), and the typed launch. Decode steps (one token a sequence) use `decode_attention`
//! (kernels.rs) instead; shapes this kernel does not take fall back to `paged_attention`.

use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{cfg, Gpu, KernelArg};
use super::kernels::Module;
use crate::error::Result;

pub const MODULE: Module = Module {
    name: "prefill_attention",
    body: include_str!("prefill_attention.cu"),
    kernels: &["prefill_attention_64", "prefill_attention_128"],
};

/// Query rows of a block (`FA_BM`): (token, query head) pairs of one KV head's group.
pub const ROWS: usize = 64;
/// Threads of a block (`FA_THREADS`).
const THREADS: u32 = 128;

/// The kernel for `head_dim` with `group` query heads per KV head, if there is one: head_dim a
/// multiple of 8 up to 128 (rows are padded to 64 or 128 dims), and a group that fits a tile.
pub fn kernel(head_dim: usize, group: usize) -> Option<&'static str> {
    if head_dim == 0 || head_dim % 8 != 0 || group == 0 || group > ROWS {
        return None;
    }
    match head_dim {
        ..=64 => Some("prefill_attention_64"),
        ..=128 => Some("prefill_attention_128"),
        _ => None,
    }
}

/// Cuts each sequence's query tokens (`query_start`, as in `StepBatch`) into tiles of at most
/// `ROWS / group` tokens, written as `(first token, end token)` pairs into `tiles` (room for
/// one tile per token, so any step fits); returns their number. A sequence's tiles go last
/// first: the later a tile, the more keys it reads, so the longest blocks start first.
pub fn pack_tiles(query_start: &[u32], group: usize, tiles: &mut [u32]) -> usize {
    let per = (ROWS / group) as u32;
    let mut n = 0;
    for w in query_start.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        let count = (hi - lo).div_ceil(per);
        for i in (0..count).rev() {
            let start = lo + i * per;
            tiles[2 * n..2 * n + 2].copy_from_slice(&[start, (start + per).min(hi)]);
            n += 1;
        }
    }
    n
}

/// The paged cache and step inputs the kernel reads (device pointers, u32 inputs).
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    /// `[T, ld]` f32, q rotated
    pub qkv: CUdeviceptr,
    pub ld: usize,
    /// `[T, nh * hd]` elem
    pub out: CUdeviceptr,
    /// `[slots, nkv * hd]` elem
    pub k_cache: CUdeviceptr,
    pub v_cache: CUdeviceptr,
    /// `[num_tiles, 2]` from [`pack_tiles`]
    pub tiles: CUdeviceptr,
    pub num_tiles: usize,
    /// `[T]`
    pub token_seq: CUdeviceptr,
    pub positions: CUdeviceptr,
    /// `[S, max_blocks]`
    pub block_tables: CUdeviceptr,
    pub max_blocks: usize,
    pub block_size: usize,
}

/// Launches the prefill attention kernel `name` (from [`kernel`]) over `inp.num_tiles` tiles.
pub fn launch(gpu: &Gpu, name: &'static str, inp: &Inputs, nh: usize, nkv: usize, hd: usize) -> Result<()> {
    assert!(
        kernel(hd, nh / nkv) == Some(name),
        "prefill attention kernel {name} for hd {hd}"
    );
    let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
    let args = [
        inp.qkv,
        (inp.ld as i32).bits(),
        inp.out,
        inp.k_cache,
        inp.v_cache,
        inp.tiles,
        inp.token_seq,
        inp.positions,
        inp.block_tables,
        (inp.max_blocks as i32).bits(),
        (inp.block_size as i32).bits(),
        (nh as i32).bits(),
        (nkv as i32).bits(),
        (hd as i32).bits(),
        scale_log2.bits(),
    ];
    let grid = (inp.num_tiles as u32, nkv as u32, 1);
    // SAFETY: both prefill_attention kernels take (qkv, ld, out, k_cache, v_cache, tiles,
    // token_seq, positions, block_tables, max_blocks, block_size, nh, nkv, hd, scale_log2)
    // (prefill_attention.cu), in this order; the caller's buffers have the shapes of `Inputs`.
    unsafe { gpu.launch(name, cfg(grid, THREADS), &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_constants_match_the_kernel_defines() {
        let defines = [("FA_BM", ROWS), ("FA_THREADS", THREADS as usize)];
        crate::cuda::kernels::assert_defines("prefill_attention.cu", MODULE.body, &defines);
    }

    fn tiles(query_start: &[u32], group: usize) -> Vec<(u32, u32)> {
        let t = *query_start.last().unwrap() as usize;
        let mut buf = vec![u32::MAX; 2 * t];
        let n = pack_tiles(query_start, group, &mut buf);
        buf[..2 * n].chunks(2).map(|c| (c[0], c[1])).collect()
    }

    #[test]
    fn tiles_cover_every_token_once_within_its_sequence() {
        // Sequences of 130, 1 (a decode token in a mixed step) and 64 tokens, GQA 1..8 and 7.
        let qs = [0u32, 130, 131, 195];
        for group in [1usize, 2, 4, 7, 8, 64] {
            let per = (ROWS / group) as u32;
            let got = tiles(&qs, group);
            let mut seen = vec![0u8; 195];
            for &(lo, hi) in &got {
                assert!(lo < hi && hi - lo <= per, "group {group}: tile {lo}..{hi}");
                let seq = qs.partition_point(|&q| q <= lo) - 1;
                assert!(
                    hi <= qs[seq + 1],
                    "group {group}: tile {lo}..{hi} crosses a sequence end"
                );
                for t in lo..hi {
                    seen[t as usize] += 1;
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "group {group}: every token in one tile"
            );
            let want: u32 = qs.windows(2).map(|w| (w[1] - w[0]).div_ceil(per)).sum();
            assert_eq!(got.len(), want as usize, "group {group}: the fewest tiles");
        }
        // Last tile of a sequence first.
        assert_eq!(tiles(&[0, 130], 1), vec![(128, 130), (64, 128), (0, 64)]);
        assert_eq!(tiles(&[0, 3, 4], 8), vec![(0, 3), (3, 4)]);
    }

    #[test]
    fn head_sizes_and_groups_it_takes() {
        assert_eq!(kernel(128, 1), Some("prefill_attention_128"));
        assert_eq!(kernel(80, 7), Some("prefill_attention_128"));
        assert_eq!(kernel(64, 8), Some("prefill_attention_64"));
        assert_eq!(kernel(16, 2), Some("prefill_attention_64"));
        for (hd, group) in [(256, 1), (12, 1), (0, 1), (128, 0), (128, 65)] {
            assert_eq!(kernel(hd, group), None, "hd {hd}, group {group}");
        }
    }
}
